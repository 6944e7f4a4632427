//! Bias epilogues applied in place: the `Linear` bias after a cuBLAS GEMM (which writes
//! `x·Wᵀ` without it), alone or fused with the ReLU of OPT's `fc1`.
//!
//! Both read and write `x` (a `TensorMut`), one element per lane, so each element is read and
//! written once by the same thread: in place is safe.

use lexp_macros::kernel;

/// `x[r, c] += bias[c]`, in place (f32 arithmetic, one rounding to `T`). Programs tile rows by
/// `BR` (axis 0) and columns by `BC` (axis 1).
#[kernel(
    variants(T = [bf16, f16, f32], BR = [16], BC = [256]),
    warps = 4,
    grid = [cdiv(x.dim(0), BR), cdiv(x.dim(1), BC)],
    require = [bias.dim(0) == x.dim(1)]
)]
pub fn bias_add<T, const BR: usize, const BC: usize>(x: TensorMut<T, 2>, bias: Tensor<T, 1>) {
    let rows = program_id(0) * BR + range::<BR>();
    let cols = program_id(1) * BC + range::<BC>();
    let v = x.load([rows, cols]).cast::<f32>() + bias.load([cols]).cast::<f32>();
    x.store([rows, cols], v);
}

/// `x[r, c] = max(x[r, c] + bias[c], 0)`, in place (f32 arithmetic, one rounding to `T`).
/// Programs tile rows by `BR` (axis 0) and columns by `BC` (axis 1).
#[kernel(
    variants(T = [bf16, f16, f32], BR = [16], BC = [256]),
    warps = 4,
    grid = [cdiv(x.dim(0), BR), cdiv(x.dim(1), BC)],
    require = [bias.dim(0) == x.dim(1)]
)]
pub fn bias_relu<T, const BR: usize, const BC: usize>(x: TensorMut<T, 2>, bias: Tensor<T, 1>) {
    let rows = program_id(0) * BR + range::<BR>();
    let cols = program_id(1) * BC + range::<BC>();
    let v = x.load([rows, cols]).cast::<f32>() + bias.load([cols]).cast::<f32>();
    x.store([rows, cols], relu(v));
}
