//! The LoRA branch at memory bandwidth, for when the frozen projection runs on its own (cuBLAS,
//! with its epilogues). The branch is two skinny products per direction (RUNTIME.md §2.6):
//!
//! ```text
//! forward:  u  = x·Aᵀ            (lora_down,   w = A  [r, in])
//!           y += s·u·Bᵀ           (lora_expand, w = Bᵀ [r, out])
//! backward: du = s·dy·B           (lora_down,   w = Bᵀ [r, out])
//!           dx += du·A            (lora_expand, w = A  [r, in])
//! ```
//!
//! Every one of them is a pass over a `[tokens, features]` activation with a rank of 4–16 on
//! the other side, so its time is the bytes it moves: `lora_down` reads its input once and
//! `lora_expand` reads and writes its output once. cuBLAS runs such shapes (`4096 x 2048 x 4`)
//! at a fraction of the bandwidth (25 µs where 32 MB take 8 µs on an H200), and a LoRA step at
//! OPT-1.3B spent 16% of its kernel time in them.
//!
//! Both kernels take the rank-side matrix as `w [r, features]` (rows of `features`, 16-byte
//! aligned): `A` as PEFT stores it, `B` transposed ([`transpose`], once per step; PEFT's
//! `B [out, r]` has rows of `r` elements, too narrow for the tensor cores' 16-byte operands).
//! The rank is padded to `R = 16` by the bounds masks; `u` is stored `[tokens, rp]` with `rp`
//! a multiple of 8 and its padding columns written as zeros, so `lora_expand` may read them.

use lexp_macros::kernel;

/// `u[M, rp] = T(s · x[M, K] · w[r, K]ᵀ)` for `r <= rp <= R`; the columns `r..rp` are zero.
/// One program per `BM` rows streams the whole `K` extent through the `cp.async` pipeline.
#[kernel(
    variants(T = [bf16, f16], BM = [32, 64], BK = [128, 64], R = [16], S = [4], W = [4]),
    warps = W,
    stages = S,
    grid = [cdiv(x.dim(0), BM)],
    require = [w.dim(1) == x.dim(1), w.dim(0) <= u.dim(1), u.dim(1) <= R, u.dim(0) == x.dim(0)]
)]
pub fn lora_down<
    T,
    const BM: usize,
    const BK: usize,
    const R: usize,
    const S: usize,
    const W: usize,
>(
    x: Tensor<T, 2>,
    w: Tensor<T, 2>,
    s: f32,
    u: TensorMut<T, 2>,
) {
    let rows = program_id(0).cast::<i64>() * BM + range::<BM>();
    let ranks = range::<R>();
    let mut acc = zeros::<f32, BM, R>();
    for k in (0..x.dim(1)).step_by(BK) {
        let ks = k + range::<BK>();
        acc = dot(x.load([rows, ks]), w.load([ranks, ks]).t(), acc);
    }
    u.store([rows, ranks], (acc * s).cast::<T>());
}

/// `y[M, N] += s · u[M, rp] · w[r, N]` in place (f32 sum, rounded once), `r <= rp <= R`; the
/// padding columns of `u` must be finite (`lora_down` writes them as zeros).
#[kernel(
    variants(T = [bf16, f16], BM = [64, 128], BN = [128, 64], R = [16], W = [4]),
    warps = W,
    grid = [cdiv(y.dim(0), BM) * cdiv(y.dim(1), BN)],
    require = [u.dim(0) == y.dim(0), u.dim(1) <= R, w.dim(0) <= u.dim(1), w.dim(1) == y.dim(1)]
)]
pub fn lora_expand<T, const BM: usize, const BN: usize, const R: usize, const W: usize>(
    u: Tensor<T, 2>,
    w: Tensor<T, 2>,
    s: f32,
    y: TensorMut<T, 2>,
) {
    let np_n = cdiv(y.dim(1), BN);
    let rows = (program_id(0) / np_n) * BM + range::<BM>();
    let cols = (program_id(0) % np_n) * BN + range::<BN>();
    let ranks = range::<R>();
    let p = dot(
        u.load([rows, ranks]),
        w.load([ranks, cols]),
        zeros::<f32, BM, BN>(),
    );
    let out = y.load([rows, cols]).cast::<f32>() + p * s;
    y.store([rows, cols], out.cast::<T>());
}

/// `y = xᵀ` for `x [rows, cols]` and `y [cols, rows]`, both passed flat (any alignment; one
/// element per lane, so a transpose is a gather rather than two tiles along swapped
/// dimensions): LoRA's `B [out, r]` as the `Bᵀ [r, out]` that [`lora_down`] and
/// [`lora_expand`] take.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [1024]),
    warps = 4,
    grid = [cdiv(y.dim(0), BLOCK)],
    require = [y.dim(0) == x.dim(0), rows > 0, x.dim(0) as i64 % rows == 0]
)]
pub fn transpose<T, const BLOCK: usize>(x: Tensor<T, 1>, rows: usize, y: TensorMut<T, 1>) {
    let cols = x.dim(0) / rows;
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    // y[j, c] (flat i = j * rows + c) is x[c, j] (flat c * cols + j).
    let j = i / rows;
    let c = i % rows;
    y.store([i], x.load([c * cols + j]));
}
