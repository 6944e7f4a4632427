//! Row softmax, numerically stable, for any row length.
//!
//! One program per row. The first pass keeps a running maximum and a rescaled running sum per
//! lane (online softmax, no reduction inside the loop), then combines lanes once; the second
//! pass writes `exp(x - max) / sum`. Rows of any length loop in `BLOCK`-wide chunks; the second
//! read of a row normally hits L2.

use lexp_macros::kernel;

/// `y[r, :] = softmax(x[r, :])`, computed in f32.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [1024]),
    warps = 4,
    grid = [x.dim(0)],
    require = [x.dim(0) == y.dim(0), x.dim(1) == y.dim(1)]
)]
pub fn softmax<T, const BLOCK: usize>(x: Tensor<T, 2>, y: TensorMut<T, 2>) {
    let row = program_id(0);
    let n = x.dim(1);
    let mut m = full::<f32, BLOCK>(NEG_INFINITY);
    let mut s = zeros::<f32, BLOCK>();
    for c in (0..n).step_by(BLOCK) {
        let cols = c + range::<BLOCK>();
        let v = x.load_or([row, cols], NEG_INFINITY).cast::<f32>();
        let m_new = max(m, v);
        // A lane that has seen only -inf keeps sum 0 (and avoids -inf - -inf).
        let shift = select(m_new == NEG_INFINITY, 0.0, m_new);
        s = s * exp(m - shift) + exp(v - shift);
        m = m_new;
    }
    let mx = m.reduce_max(0);
    let shift = select(mx == NEG_INFINITY, 0.0, mx);
    let total = (s * exp(m - shift)).sum(0);
    let inv = 1.0 / total;
    for c in (0..n).step_by(BLOCK) {
        let cols = c + range::<BLOCK>();
        let v = x.load_or([row, cols], NEG_INFINITY).cast::<f32>();
        y.store([row, cols], exp(v - shift) * inv);
    }
}
