//! Reductions: column sums (bias gradients: `out[c] += sum_r x[r, c]`, accumulated atomically
//! in f32) and the partial sums of squares of a flat f32 tensor (the global gradient norm for
//! clipping, summed without atomics so that it is deterministic).

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

/// Elements per program of [`sum_squares`] (its `CHUNK`; a test checks that they agree): the
/// caller sizes the partials tensor as `cdiv(n, SUM_SQUARES_CHUNK)`.
pub const SUM_SQUARES_CHUNK: usize = 16384;

/// Partial sums of squares: `out[p] = Σ x[i]²` over the `CHUNK` elements `p·CHUNK ..` of `x`
/// (elements past the end count as zero). The host adds the `cdiv(n, CHUNK)` partials in f64:
/// `√Σ out` is the norm `torch.nn.utils.clip_grad_norm_` clips by. Each program sums in a fixed
/// order, so the result does not depend on scheduling.
#[kernel(
    variants(BLOCK = [1024], CHUNK = [16384]),
    warps = 4,
    grid = [cdiv(x.dim(0), CHUNK)],
    require = [out.dim(0) * CHUNK >= x.dim(0)]
)]
pub fn sum_squares<const BLOCK: usize, const CHUNK: usize>(
    x: Tensor<f32, 1>,
    out: TensorMut<f32, 1>,
) {
    let p = program_id(0);
    let c0 = p.cast::<i64>() * CHUNK;
    let mut acc = zeros::<f32, BLOCK>();
    for c in (c0..c0 + CHUNK).step_by(BLOCK) {
        let v = x.load_or([c + range::<BLOCK>()], 0.0);
        acc += v * v;
    }
    out.store([p], acc.sum(0));
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_chunk_constant_is_the_compiled_chunk() {
        let configs = super::sum_squares::INFO.configurations();
        assert!(!configs.is_empty());
        for c in configs {
            assert!(c.contains(&("CHUNK", super::SUM_SQUARES_CHUNK)), "{c:?}");
        }
    }
}
