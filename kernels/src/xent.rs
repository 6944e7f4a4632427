//! The LM head's cross-entropy, forward and backward in one kernel: per row of f32 logits, the
//! loss against the target token and their gradient, written in the type of the GEMM that
//! takes it next (bf16 in training).
//!
//! One program per row; the vocabulary (50272 for OPT) is read in `CHUNK`-wide tiles, twice:
//! the first pass keeps a running maximum and a running sum of exponentials per lane (the
//! online log-sum-exp: a lane's sum is rescaled whenever its maximum grows) and picks out the
//! target's logit; the second writes the gradient, walking the row backwards so that its
//! reads start with the chunks the first pass left in L2 (0.711 against 0.763 ms for the four
//! launches of an OPT-1.3B 4 x 1024 step on the H200,
//! `bench/results/2026-11-30-h200-timing/call78`). Two tile configurations are compiled:
//! `CHUNK = 2048` (the default) and `CHUNK = 256`. Eight warps: the three per-lane running
//! tiles stay at ~80 registers per thread at 2048.

use lexp_macros::kernel;

/// Cross-entropy of f32 logits `z [R, V]` against `targets [R]`, and the scaled gradient
/// rounded to `T` into `dz [R, V]`: for a row with `targets[r] >= 0`, `loss[r] =
/// logsumexp(z[r, :]) - z[r, targets[r]]` and `dz[r, :] = scale * (softmax(z[r, :]) -
/// onehot(targets[r]))`; a row with a negative target (ignored, e.g. -100) gets `loss[r] = 0`
/// and `dz[r, :] = 0`. Targets must be `< V` (the runtime validates them; this kernel does
/// not). f32 arithmetic. Writing `dz` in the GEMM's type here saves the separate f32 → bf16
/// pass over the logits (and half the gradient's bytes).
#[kernel(
    variants(T = [bf16, f16, f32], CHUNK = [2048, 256]),
    warps = 8,
    grid = [z.dim(0)],
    require = [
        targets.dim(0) == z.dim(0), loss.dim(0) == z.dim(0), dz.dim(0) == z.dim(0),
        dz.dim(1) == z.dim(1)
    ]
)]
pub fn xent_fwd_bwd<T, const CHUNK: usize>(
    z: Tensor<f32, 2>,
    targets: Tensor<i32, 1>,
    loss: TensorMut<f32, 1>,
    scale: f32,
    dz: TensorMut<T, 2>,
) {
    let row = program_id(0);
    let n = z.dim(1);
    let t = targets.load([row]);
    if t < 0 {
        for c in (0..n).step_by(CHUNK) {
            dz.store([row, c + range::<CHUNK>()], zeros::<f32, CHUNK>());
        }
        loss.store([row], 0.0);
        return;
    }
    // Per-lane running maximum (starting finite, so that `m - max(m, v)` is never
    // -inf - -inf), running sum of `exp(v - m)`, and the target's logit.
    let mut m = full::<f32, CHUNK>(-3.0e38);
    let mut s = zeros::<f32, CHUNK>();
    let mut zt = zeros::<f32, CHUNK>();
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let v = z.load_or([row, cols], NEG_INFINITY);
        let m2 = max(m, v);
        s = s * exp(m - m2) + exp(v - m2);
        m = m2;
        zt += select(cols == t, v, 0.0);
    }
    let mx = m.reduce_max(0);
    let lse = mx + ln((s * exp(m - mx)).sum(0));
    loss.store([row], lse - zt.sum(0));
    // Last chunk first: the chunks the first pass read last are the likeliest to be still in
    // L2 (a row of OPT's vocabulary is 201 KB of f32, and the rows in flight outgrow L2).
    let chunks = cdiv(n, CHUNK);
    for i in (0..chunks).step_by(1) {
        let c = (chunks - 1 - i) * CHUNK;
        let cols = c + range::<CHUNK>();
        let v = z.load([row, cols]);
        let g = exp(v - lse) - select(cols == t, 1.0, 0.0);
        dz.store([row, cols], scale * g);
    }
}
