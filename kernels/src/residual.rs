//! Bias-add fused with the residual add: the epilogue of every projection in a transformer
//! block.

use lexp_macros::kernel;

/// `y[r, c] = x[r, c] + bias[c] + res[r, c]` (f32 arithmetic). Programs tile rows by `BR`
/// (axis 0) and columns by `BC` (axis 1).
#[kernel(
    variants(T = [bf16, f16, f32], BR = [16], BC = [256]),
    warps = 4,
    grid = [cdiv(x.dim(0), BR), cdiv(x.dim(1), BC)],
    require = [
        res.dim(0) == x.dim(0), res.dim(1) == x.dim(1), y.dim(0) == x.dim(0), y.dim(1) == x.dim(1),
        bias.dim(0) == x.dim(1)
    ]
)]
pub fn bias_residual<T, const BR: usize, const BC: usize>(
    x: Tensor<T, 2>,
    bias: Tensor<T, 1>,
    res: Tensor<T, 2>,
    y: TensorMut<T, 2>,
) {
    let rows = program_id(0) * BR + range::<BR>();
    let cols = program_id(1) * BC + range::<BC>();
    let v = x.load([rows, cols]).cast::<f32>()
        + bias.load([cols]).cast::<f32>()
        + res.load([rows, cols]).cast::<f32>();
    y.store([rows, cols], v);
}
