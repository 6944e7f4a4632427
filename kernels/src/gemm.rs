//! Dense GEMMs on tensor cores: `c = op(a) · op(b)` with f32 accumulation, in the three operand
//! layouts training needs (NN, NT, TN; row-major storage). Each program computes one
//! `BM x BN` tile of `c`; programs are ordered in groups of `G` tile rows so that consecutive
//! programs reuse operand panels from L2 (COMPILER.md §4.4). The K loop's operand loads are
//! streamed by the compiler's `cp.async` pipeline (`stages = S`), or on sm_90a with `TMA = 1`
//! by bulk tensor copies that one thread issues (COMPILER.md §8.2).
//!
//! Tile configurations (the autotuner picks per device and shape): 4 warps with 64 x 64 warp
//! tiles (`mma.sync`, the sm_80 shape), and 8 warps in two warpgroups of `64 x BN` (`wgmma` on
//! sm_90; `mma.sync` with the same layout on sm_80). Wide tiles and deep pipelines only with 8
//! warps. Configurations above sm_80's 163 KB of shared memory fail to launch there (the
//! autotuner skips them); the default (first) configuration runs everywhere.

use lexp_macros::kernel;

/// `c[M, N] = a[M, K] · b[K, N]`.
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [128, 256], BK = [32, 64], S = [3, 4, 6, 8], W = [4, 8], G = [8], TMA = [0, 1]),
    only = [W == 8 || BN == 128, S <= 4 || W == 8, (BM + BN) * BK * 2 * S <= 200 * 1024, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(a.dim(0), BM) * cdiv(b.dim(1), BN)],
    require = [b.dim(0) == a.dim(1), c.dim(0) == a.dim(0), c.dim(1) == b.dim(1)]
)]
pub fn gemm_nn<
    T,
    const BM: usize,
    const BN: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const G: usize,
    const TMA: usize,
>(
    a: Tensor<T, 2>,
    b: Tensor<T, 2>,
    c: TensorMut<T, 2>,
) {
    let (pid_m, pid_n) = grouped(program_id(0), cdiv(a.dim(0), BM), cdiv(b.dim(1), BN), G);
    let rows = pid_m * BM + range::<BM>();
    let cols = pid_n * BN + range::<BN>();
    let mut acc = zeros::<f32, BM, BN>();
    for k in (0..a.dim(1)).step_by(BK) {
        let ks = k + range::<BK>();
        acc = dot(a.load([rows, ks]), b.load([ks, cols]), acc);
    }
    c.store([rows, cols], acc.cast::<T>());
}

/// `c[M, N] = a[M, K] · b[N, K]ᵀ` (`x · Wᵀ` with a PyTorch `Linear` weight).
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [128, 256], BK = [32, 64], S = [3, 4, 6, 8], W = [4, 8], G = [8], TMA = [0, 1]),
    only = [W == 8 || BN == 128, S <= 4 || W == 8, (BM + BN) * BK * 2 * S <= 200 * 1024, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(a.dim(0), BM) * cdiv(b.dim(0), BN)],
    require = [b.dim(1) == a.dim(1), c.dim(0) == a.dim(0), c.dim(1) == b.dim(0)]
)]
pub fn gemm_nt<
    T,
    const BM: usize,
    const BN: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const G: usize,
    const TMA: usize,
>(
    a: Tensor<T, 2>,
    b: Tensor<T, 2>,
    c: TensorMut<T, 2>,
) {
    let (pid_m, pid_n) = grouped(program_id(0), cdiv(a.dim(0), BM), cdiv(b.dim(0), BN), G);
    let rows = pid_m * BM + range::<BM>();
    let cols = pid_n * BN + range::<BN>();
    let mut acc = zeros::<f32, BM, BN>();
    for k in (0..a.dim(1)).step_by(BK) {
        let ks = k + range::<BK>();
        acc = dot(a.load([rows, ks]), b.load([cols, ks]).t(), acc);
    }
    c.store([rows, cols], acc.cast::<T>());
}

/// `c[M, N] = a[K, M]ᵀ · b[K, N]` (weight-style gradients: a reduction over tokens).
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [128, 256], BK = [32, 64], S = [3, 4, 6, 8], W = [4, 8], G = [8], TMA = [0, 1]),
    only = [W == 8 || BN == 128, S <= 4 || W == 8, (BM + BN) * BK * 2 * S <= 200 * 1024, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(a.dim(1), BM) * cdiv(b.dim(1), BN)],
    require = [b.dim(0) == a.dim(0), c.dim(0) == a.dim(1), c.dim(1) == b.dim(1)]
)]
pub fn gemm_tn<
    T,
    const BM: usize,
    const BN: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const G: usize,
    const TMA: usize,
>(
    a: Tensor<T, 2>,
    b: Tensor<T, 2>,
    c: TensorMut<T, 2>,
) {
    let (pid_m, pid_n) = grouped(program_id(0), cdiv(a.dim(1), BM), cdiv(b.dim(1), BN), G);
    let rows = pid_m * BM + range::<BM>();
    let cols = pid_n * BN + range::<BN>();
    let mut acc = zeros::<f32, BM, BN>();
    for k in (0..a.dim(0)).step_by(BK) {
        let ks = k + range::<BK>();
        acc = dot(a.load([ks, rows]).t(), b.load([ks, cols]), acc);
    }
    c.store([rows, cols], acc.cast::<T>());
}
