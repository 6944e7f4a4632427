//! Column sums (bias gradients): `out[c] += sum_r x[r, c]`, accumulated atomically in f32.

use lexp_macros::kernel;

/// `out[c] += sum over rows of x[r, c]` (zero `out` first). Programs tile columns by `BC`
/// (axis 0) and rows by `CHUNK` (axis 1), each accumulating a `[BR, BC]` tile in registers.
#[kernel(
    variants(T = [bf16, f16, f32], BR = [16], BC = [64], CHUNK = [256]),
    warps = 4,
    grid = [cdiv(x.dim(1), BC), cdiv(x.dim(0), CHUNK)],
    require = [out.dim(0) == x.dim(1)]
)]
pub fn colsum<T, const BR: usize, const BC: usize, const CHUNK: usize>(
    x: Tensor<T, 2>,
    out: TensorMut<f32, 1>,
) {
    let cols = program_id(0) * BC + range::<BC>();
    let r0 = program_id(1).cast::<i64>() * CHUNK;
    let mut acc = zeros::<f32, BR, BC>();
    for r in (r0..r0 + CHUNK).step_by(BR) {
        let rows = r + range::<BR>();
        acc += x.load([rows, cols]).cast::<f32>();
    }
    out.atomic_add([cols], acc.sum(0));
}
