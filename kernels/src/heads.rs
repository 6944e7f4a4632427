//! Head padding: flash attention at a head dimension its kernels are not compiled for (OPT-2.7B's
//! 80; tile extents are powers of two) runs the next compiled one on heads padded with zero
//! columns. Zero columns change nothing: they add nothing to `q·kᵀ`, and the output and
//! gradient columns they produce are zero and dropped.
//!
//! Both kernels take one row per program and walk its heads.

use lexp_macros::kernel;

/// `dst[r, g·DP + c] = src[r, g·hd + c]` for `c < hd`, `0` for `hd ≤ c < DP`: the `hd`-wide
/// heads of `src` spread to `DP` columns each (`dst` has `DP` columns per head of `src`).
#[kernel(
    variants(T = [bf16, f16], DP = [128]),
    warps = 1,
    grid = [dst.dim(0)],
    require = [dst.dim(0) == src.dim(0), dst.dim(1) % DP == 0]
)]
pub fn pad_heads<T, const DP: usize>(src: Tensor<T, 2>, hd: i32, dst: TensorMut<T, 2>) {
    let row = program_id(0);
    let c = range::<DP>();
    for g in 0..dst.dim(1) / DP {
        let x = src.load([row, g * hd + c]).cast::<f32>();
        dst.store([row, g * DP + c], select(c < hd, x, 0.0));
    }
}

/// The inverse of [`pad_heads`]: `dst[r, g·hd + c] = src[r, g·DP + c]` for `c < hd`; the
/// padding columns of `src` are not read into `dst`.
#[kernel(
    variants(T = [bf16, f16], DP = [128]),
    warps = 1,
    grid = [dst.dim(0)],
    require = [dst.dim(0) == src.dim(0), src.dim(1) % DP == 0]
)]
pub fn unpad_heads<T, const DP: usize>(src: Tensor<T, 2>, hd: i32, dst: TensorMut<T, 2>) {
    let row = program_id(0);
    let c = range::<DP>();
    for g in 0..src.dim(1) / DP {
        let x = src.load([row, g * DP + c]);
        dst.store([row, select(c < hd, g * hd + c, dst.dim(1))], x);
    }
}
