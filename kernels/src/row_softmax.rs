//! Row softmax, numerically stable, for any row length.
//!
//! One program per row. A row of at most `BLOCK` elements is read once into registers: its
//! maximum and sum are tile reductions, and each element costs one exponential. Longer rows loop
//! in `CHUNK`-wide tiles over three passes (maximum, sum of exponentials, write); the second and
//! third reads of a row normally hit L2.

use lexp_macros::kernel;

/// `y[r, :] = softmax(x[r, :])`, computed in f32.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [4096], CHUNK = [1024]),
    warps = 4,
    grid = [x.dim(0)],
    require = [x.dim(0) == y.dim(0), x.dim(1) == y.dim(1)]
)]
pub fn softmax<T, const BLOCK: usize, const CHUNK: usize>(x: Tensor<T, 2>, y: TensorMut<T, 2>) {
    let row = program_id(0);
    let n = x.dim(1);
    if n <= BLOCK {
        let cols = range::<BLOCK>();
        let v = x.load_or([row, cols], NEG_INFINITY).cast::<f32>();
        let mx = v.reduce_max(0);
        // A row of only -inf has no finite maximum: shift by 0 instead (-inf - -inf is NaN).
        let shift = select(mx == NEG_INFINITY, 0.0, mx);
        let e = exp(v - shift);
        y.store([row, cols], e * (1.0 / e.sum(0)));
        return;
    }
    let mut m = full::<f32, CHUNK>(NEG_INFINITY);
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        m = max(m, x.load_or([row, cols], NEG_INFINITY).cast::<f32>());
    }
    let mx = m.reduce_max(0);
    let shift = select(mx == NEG_INFINITY, 0.0, mx);
    let mut s = zeros::<f32, CHUNK>();
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        s += exp(x.load_or([row, cols], NEG_INFINITY).cast::<f32>() - shift);
    }
    let inv = 1.0 / s.sum(0);
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let v = x.load_or([row, cols], NEG_INFINITY).cast::<f32>();
        y.store([row, cols], exp(v - shift) * inv);
    }
}
