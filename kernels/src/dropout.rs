//! Inverted dropout on the GPU: the mask from uniform random numbers (cuRAND fills `u`), applied
//! in place and saved for the backward, and the backward's in-place product with a saved mask.
//!
//! Both read and write `x` (a `TensorMut`), one element per lane, so each element is read and
//! written by the same thread: in place is safe.

use lexp_macros::kernel;

/// `mask = u >= p ? 1/(1-p) : 0` (stored as `T`) and `x *= mask`, in place, over `[rows,
/// cols]`; the product uses the mask rounded to `T`, so that the forward and a backward that
/// reloads the saved mask scale by the same value. `u` holds uniforms in `[0, 1)` (a NaN
/// drops its element). Programs tile rows by `BR` (axis 0) and columns by `BC` (axis 1).
#[kernel(
    variants(T = [bf16, f16, f32], BR = [16], BC = [256]),
    warps = 4,
    grid = [cdiv(x.dim(0), BR), cdiv(x.dim(1), BC)],
    require = [
        u.dim(0) == x.dim(0), u.dim(1) == x.dim(1),
        mask.dim(0) == x.dim(0), mask.dim(1) == x.dim(1)
    ]
)]
pub fn dropout_mask<T, const BR: usize, const BC: usize>(
    x: TensorMut<T, 2>,
    u: Tensor<f32, 2>,
    mask: TensorMut<T, 2>,
    p: f32,
) {
    let rows = program_id(0) * BR + range::<BR>();
    let cols = program_id(1) * BC + range::<BC>();
    let keep = u.load([rows, cols]) >= p;
    let m = select(keep, 1.0 / (1.0 - p), 0.0).cast::<T>();
    mask.store([rows, cols], m);
    let v = x.load([rows, cols]).cast::<f32>() * m.cast::<f32>();
    x.store([rows, cols], v);
}

/// `x *= m`, in place, over `[rows, cols]` (f32 arithmetic, one rounding to `T`): the dropout
/// backward `dx ⊙= mask`. Programs tile rows by `BR` (axis 0) and columns by `BC` (axis 1).
#[kernel(
    variants(T = [bf16, f16, f32], BR = [16], BC = [256]),
    warps = 4,
    grid = [cdiv(x.dim(0), BR), cdiv(x.dim(1), BC)],
    require = [m.dim(0) == x.dim(0), m.dim(1) == x.dim(1)]
)]
pub fn mul_inplace<T, const BR: usize, const BC: usize>(x: TensorMut<T, 2>, m: Tensor<T, 2>) {
    let rows = program_id(0) * BR + range::<BR>();
    let cols = program_id(1) * BC + range::<BC>();
    let v = x.load([rows, cols]).cast::<f32>() * m.load([rows, cols]).cast::<f32>();
    x.store([rows, cols], v);
}
