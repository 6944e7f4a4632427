//! Fused LoRA (PEFT's `lora.Linear`): `y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ` in one pass, and the
//! backward pieces LoRA training needs. Shapes follow PEFT: `W [out, in]`, `A = lora_A.weight
//! [R, in]`, `B = lora_B.weight [out, R]`, `s = alpha / r`.
//!
//! The rank-`R` product `x·Aᵀ` is accumulated alongside the main K loop from the `x` tile that
//! is already in shared memory; the expand `·Bᵀ` runs in the epilogue as one more `dot` on the
//! same accumulator (COMPILER.md §5). The scaled rank-`R` activation is rounded to `T` before
//! the expand (what an unfused bf16 PEFT does too) and written out for the backward.

use lexp_macros::kernel;

/// Forward: `y = x·Wᵀ + bias + xa·Bᵀ` with `xa = T(s · x·Aᵀ)`, also stored (programs of the
/// first column tile write it).
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [128, 256], BK = [32, 64], R = [16], S = [4], W = [4, 8], G = [8], TMA = [0, 1]),
    only = [W == 8 || BN == 128, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(x.dim(0), BM) * cdiv(w.dim(0), BN)],
    require = [
        w.dim(1) == x.dim(1), a.dim(0) == R, a.dim(1) == x.dim(1), b.dim(0) == w.dim(0),
        b.dim(1) == R, bias.dim(0) == w.dim(0), y.dim(0) == x.dim(0), y.dim(1) == w.dim(0),
        xa.dim(0) == x.dim(0), xa.dim(1) == R
    ]
)]
pub fn lora_fwd<
    T,
    const BM: usize,
    const BN: usize,
    const BK: usize,
    const R: usize,
    const S: usize,
    const W: usize,
    const G: usize,
    const TMA: usize,
>(
    x: Tensor<T, 2>,
    w: Tensor<T, 2>,
    bias: Tensor<T, 1>,
    a: Tensor<T, 2>,
    b: Tensor<T, 2>,
    s: f32,
    y: TensorMut<T, 2>,
    xa: TensorMut<T, 2>,
) {
    let (pid_m, pid_n) = grouped(program_id(0), cdiv(x.dim(0), BM), cdiv(w.dim(0), BN), G);
    let rows = pid_m * BM + range::<BM>();
    let cols = pid_n * BN + range::<BN>();
    let ranks = range::<R>();
    // The expand's `B` tile (8 registers a thread) is loaded before the K loop, so its global
    // latency hides behind the products instead of stalling the epilogue; the bias (32
    // registers a thread in the accumulator's layout, too many to hold through the loop) is
    // loaded first thing after it, in flight during the expand.
    let bt = b.load([cols, ranks]);
    let mut acc = zeros::<f32, BM, BN>();
    let mut t = zeros::<f32, BM, R>();
    for k in (0..x.dim(1)).step_by(BK) {
        let ks = k + range::<BK>();
        let xt = x.load([rows, ks]);
        acc = dot(xt, w.load([cols, ks]).t(), acc);
        t = dot(xt, a.load([ranks, ks]).t(), t);
    }
    let bias_row = bias.load([cols]);
    let ts = (t * s).cast::<T>();
    if pid_n == 0 {
        xa.store([rows, ranks], ts);
    }
    acc = dot(ts, bt.t(), acc);
    let out = acc + bias_row.cast::<f32>().expand(0);
    y.store([rows, cols], out.cast::<T>());
}

/// Backward to the input: `dx = dy·W + u·A` with `u = T(s · dy·B)`, also stored (for `dA`).
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [128, 256], BK = [32, 64], R = [16], S = [4], W = [4, 8], G = [8], TMA = [0, 1]),
    only = [BN == 128, W == 8 || BK == 32, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(dy.dim(0), BM) * cdiv(w.dim(1), BN)],
    require = [
        w.dim(0) == dy.dim(1), a.dim(0) == R, a.dim(1) == w.dim(1), b.dim(0) == w.dim(0),
        b.dim(1) == R, dx.dim(0) == dy.dim(0), dx.dim(1) == w.dim(1),
        u.dim(0) == dy.dim(0), u.dim(1) == R
    ]
)]
pub fn lora_bwd_dx<
    T,
    const BM: usize,
    const BN: usize,
    const BK: usize,
    const R: usize,
    const S: usize,
    const W: usize,
    const G: usize,
    const TMA: usize,
>(
    dy: Tensor<T, 2>,
    w: Tensor<T, 2>,
    a: Tensor<T, 2>,
    b: Tensor<T, 2>,
    s: f32,
    dx: TensorMut<T, 2>,
    u: TensorMut<T, 2>,
) {
    let (pid_m, pid_n) = grouped(program_id(0), cdiv(dy.dim(0), BM), cdiv(w.dim(1), BN), G);
    let rows = pid_m * BM + range::<BM>();
    let cols = pid_n * BN + range::<BN>();
    let ranks = range::<R>();
    let mut acc = zeros::<f32, BM, BN>();
    let mut t = zeros::<f32, BM, R>();
    for n in (0..dy.dim(1)).step_by(BK) {
        let ns = n + range::<BK>();
        let dyt = dy.load([rows, ns]);
        acc = dot(dyt, w.load([ns, cols]), acc);
        t = dot(dyt, b.load([ns, ranks]), t);
    }
    let ts = (t * s).cast::<T>();
    if pid_n == 0 {
        u.store([rows, ranks], ts);
    }
    acc = dot(ts, a.load([ranks, cols]), acc);
    dx.store([rows, cols], acc.cast::<T>());
}

/// Skinny weight gradients, split over tokens: `c[P, Q] += a[M, P]ᵀ · b[M, Q]` (f32, atomic),
/// each program reducing `CHUNK` tokens. `dA = uᵀ·x` is `(a, b) = (u, x)` with `P = R`;
/// `dB = dyᵀ·xa` is `(a, b) = (dy, xa)` with `Q = R`. Zero `c` first.
#[kernel(
    variants(T = [bf16, f16], BP = [16, 128], BQ = [16, 128], BK = [32], CHUNK = [1024], S = [4], W = [4, 8]),
    warps = W,
    stages = S,
    grid = [cdiv(a.dim(1), BP) * cdiv(b.dim(1), BQ), cdiv(a.dim(0), CHUNK)],
    require = [b.dim(0) == a.dim(0), c.dim(0) == a.dim(1), c.dim(1) == b.dim(1)]
)]
pub fn lora_grad<
    T,
    const BP: usize,
    const BQ: usize,
    const BK: usize,
    const CHUNK: usize,
    const S: usize,
    const W: usize,
>(
    a: Tensor<T, 2>,
    b: Tensor<T, 2>,
    c: TensorMut<f32, 2>,
) {
    let np_q = cdiv(b.dim(1), BQ);
    let rows = (program_id(0) / np_q) * BP + range::<BP>();
    let cols = (program_id(0) % np_q) * BQ + range::<BQ>();
    let m0 = program_id(1).cast::<i64>() * CHUNK;
    let mut acc = zeros::<f32, BP, BQ>();
    for m in (m0..m0 + CHUNK).step_by(BK) {
        let ms = m + range::<BK>();
        acc = dot(a.load([ms, rows]).t(), b.load([ms, cols]), acc);
    }
    c.atomic_add([rows, cols], acc);
}
