//! The softmax of materialised attention scores, forward (causal, with the log-sum-exp kept
//! for the backward) and backward.
//!
//! One program per row. A row of at most `BLOCK` elements is read once into registers; longer
//! rows loop in `CHUNK`-wide tiles (see `row_softmax.rs`). Two tile configurations are
//! compiled: `BLOCK = 2048` (the default, one pass up to OPT's 2048 positions) and
//! `BLOCK = 256` for short rows, where the wide tile would mostly compute masked lanes.

use lexp_macros::kernel;

/// Causal softmax of one sequence's attention scores, all heads: `s` is `[nh*L, L]` (head
/// `h` in rows `h*L .. (h+1)*L`, row `r` is query `i = r % L`); `p[r, j] = exp(s[r, j] -
/// lse[r])` for `j <= i` and 0 for `j > i`, `lse[r] = ln(sum_{j <= i} exp(s[r, j]))` (f32).
/// Scores past the diagonal are ignored (they may hold anything, NaN included).
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048, 256], CHUNK = [1024, 128]),
    only = [BLOCK == 2 * CHUNK],
    warps = 4,
    grid = [s.dim(0)],
    require = [
        p.dim(0) == s.dim(0), p.dim(1) == s.dim(1), lse.dim(0) == s.dim(0),
        s.dim(0) == 0 || (s.dim(1) > 0 && s.dim(0) % s.dim(1) == 0)
    ]
)]
pub fn causal_softmax<T, const BLOCK: usize, const CHUNK: usize>(
    s: Tensor<f32, 2>,
    p: TensorMut<T, 2>,
    lse: TensorMut<f32, 1>,
) {
    let row = program_id(0);
    let n = s.dim(1);
    let i = row % n;
    if n <= BLOCK {
        let cols = range::<BLOCK>();
        let v = select(
            cols <= i,
            s.load_or([row, cols], NEG_INFINITY),
            NEG_INFINITY,
        );
        let mx = v.reduce_max(0);
        // A row of only -inf has no finite maximum: shift by 0 instead (-inf - -inf is NaN).
        let shift = select(mx == NEG_INFINITY, 0.0, mx);
        let e = exp(v - shift);
        let total = e.sum(0);
        p.store([row, cols], e * (1.0 / total));
        lse.store([row], shift + ln(total));
        return;
    }
    // Long rows: maximum and sum over the visible part `0..=i` only, then one pass over the
    // whole row that writes the probabilities and the zeros past the diagonal.
    let mut m = full::<f32, CHUNK>(NEG_INFINITY);
    for c in (0..i + 1).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let v = select(
            cols <= i,
            s.load_or([row, cols], NEG_INFINITY),
            NEG_INFINITY,
        );
        m = max(m, v);
    }
    let mx = m.reduce_max(0);
    let shift = select(mx == NEG_INFINITY, 0.0, mx);
    let mut acc = zeros::<f32, CHUNK>();
    for c in (0..i + 1).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let v = select(
            cols <= i,
            s.load_or([row, cols], NEG_INFINITY),
            NEG_INFINITY,
        );
        acc += exp(v - shift);
    }
    let total = acc.sum(0);
    let inv = 1.0 / total;
    lse.store([row], shift + ln(total));
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        if c > i {
            p.store([row, cols], zeros::<f32, CHUNK>());
        } else {
            let v = select(
                cols <= i,
                s.load_or([row, cols], NEG_INFINITY),
                NEG_INFINITY,
            );
            p.store([row, cols], exp(v - shift) * inv);
        }
    }
}

/// Softmax backward, per row of `[R, C]`: `ds = p * (dp - sum_j p[r, j] * dp[r, j])`, with
/// `dp` in f32 (a GEMM's f32 output) and `p`, `ds` in `T`. Masked entries (`p = 0`) get 0.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048, 256], CHUNK = [1024, 128]),
    only = [BLOCK == 2 * CHUNK],
    warps = 4,
    grid = [p.dim(0)],
    require = [
        dp.dim(0) == p.dim(0), dp.dim(1) == p.dim(1), ds.dim(0) == p.dim(0), ds.dim(1) == p.dim(1)
    ]
)]
pub fn softmax_bwd<T, const BLOCK: usize, const CHUNK: usize>(
    p: Tensor<T, 2>,
    dp: Tensor<f32, 2>,
    ds: TensorMut<T, 2>,
) {
    let row = program_id(0);
    let n = p.dim(1);
    if n <= BLOCK {
        let cols = range::<BLOCK>();
        let pv = p.load_or([row, cols], 0.0).cast::<f32>();
        let g = dp.load_or([row, cols], 0.0);
        let d = (pv * g).sum(0);
        ds.store([row, cols], pv * (g - d));
        return;
    }
    let mut acc = zeros::<f32, CHUNK>();
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        acc += p.load_or([row, cols], 0.0).cast::<f32>() * dp.load_or([row, cols], 0.0);
    }
    let d = acc.sum(0);
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let pv = p.load([row, cols]).cast::<f32>();
        ds.store([row, cols], pv * (dp.load([row, cols]) - d));
    }
}
