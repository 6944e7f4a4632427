//! The tied LM head fused with causal-LM cross-entropy (RUNTIME.md §2.5): logits are computed
//! a chunk of rows at a time and reduced to a loss (and optionally turned into `dh`) at once,
//! so `[T, V]` logits never exist. [`logits`] materialises them for tests and small evals.

use rayon::prelude::*;

use super::error::check_len;
use super::fastmath;
use super::matmul::{linear, matmul};
use super::CpuError;
use crate::data::IGNORE_INDEX;

/// The result of [`lm_head_xent`].
#[derive(Debug, Clone, PartialEq)]
pub struct XentOut {
    /// `Σ ℓ_t` over the valid rows (f64 sum of the per-row f32 losses).
    pub loss_sum: f64,
    /// Number of valid rows (targets other than `IGNORE_INDEX`).
    pub count: usize,
    /// `[rows, e]` gradient w.r.t. `h` when a `grad_scale` was given; rows with an ignored
    /// target are 0.
    pub dh: Option<Vec<f32>>,
}

/// LM head + cross-entropy over `h [rows, e]` with the tied embedding `emb [vocab, e]`.
///
/// For each row with `targets[t] ≠ IGNORE_INDEX` (-100): `z_t = h_t·embᵀ`,
/// `ℓ_t = logsumexp(z_t) − z_t[y_t]` (softmax statistics in f32 with an f64 sum). Returns
/// `Σℓ_t`, the number of valid rows and, if `grad_scale = Some(s)` (the caller passes
/// `s = 1/N`), `dh_t = s·(softmax(z_t) − onehot(y_t))·emb`. Valid rows are gathered first and
/// processed `chunk` at a time (64–256 is a good range; 0 is treated as 1), so the working set
/// is `[chunk, vocab]`.
///
/// # Errors
/// [`CpuError::BadTarget`] for a target ≥ `vocab` or negative other than -100 (the first such
/// row); [`CpuError::Shape`] if a buffer does not match its dimensions.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_xent(
    h: &[f32],
    rows: usize,
    e: usize,
    emb: &[f32],
    vocab: usize,
    targets: &[i32],
    grad_scale: Option<f32>,
    chunk: usize,
) -> Result<XentOut, CpuError> {
    check_len("lm_head_xent h [rows, e]", h.len(), rows * e)?;
    check_len("lm_head_xent emb [vocab, e]", emb.len(), vocab * e)?;
    check_len("lm_head_xent targets [rows]", targets.len(), rows)?;
    let mut valid = Vec::with_capacity(rows);
    for (row, &value) in targets.iter().enumerate() {
        if value == IGNORE_INDEX {
            continue;
        }
        if value < 0 || value as usize >= vocab {
            return Err(CpuError::BadTarget { row, value, vocab });
        }
        valid.push(row);
    }

    let chunk = chunk.max(1).min(valid.len().max(1));
    let mut dh = grad_scale.map(|_| vec![0.0f32; rows * e]);
    let mut h_c = Vec::with_capacity(chunk * e);
    let mut z = vec![0.0f32; chunk * vocab];
    let mut dh_c = vec![0.0f32; if dh.is_some() { chunk * e } else { 0 }];
    let mut losses = vec![0.0f64; chunk];
    let mut loss_sum = 0.0f64;
    for rows_c in valid.chunks(chunk) {
        let c = rows_c.len();
        h_c.clear();
        for &r in rows_c {
            h_c.extend_from_slice(&h[r * e..(r + 1) * e]);
        }
        let z = &mut z[..c * vocab];
        matmul(z, &h_c, emb, c, e, vocab, false, true, 1.0, 0.0);
        z.par_chunks_mut(vocab.max(1))
            .zip(rows_c.par_iter())
            .zip(losses[..c].par_iter_mut())
            .for_each(|((zr, &r), loss)| {
                // Targets were validated above: 0 ≤ y < vocab.
                let y = targets[r] as usize;
                *loss = row_xent(zr, y, grad_scale);
            });
        loss_sum += losses[..c].iter().sum::<f64>();
        if let Some(dh) = dh.as_mut() {
            let dh_c = &mut dh_c[..c * e];
            matmul(dh_c, z, emb, c, vocab, e, false, false, 1.0, 0.0);
            for (&r, src) in rows_c.iter().zip(dh_c.chunks_exact(e.max(1))) {
                dh[r * e..(r + 1) * e].copy_from_slice(src);
            }
        }
    }
    Ok(XentOut {
        loss_sum,
        count: valid.len(),
        dh,
    })
}

/// Cross-entropy of one logit row `z` against target `y`: returns `logsumexp(z) − z[y]`; with
/// `grad_scale = Some(s)` overwrites `z` with `s·(softmax(z) − onehot(y))` (otherwise `z` is
/// left holding `exp(z − max z)`).
fn row_xent(z: &mut [f32], y: usize, grad_scale: Option<f32>) -> f64 {
    let zy = z[y];
    let mx = fastmath::max(z);
    let sum = fastmath::exp_shift_sum(z, mx);
    let lse = mx as f64 + sum.ln();
    if let Some(s) = grad_scale {
        let k = (s as f64 / sum) as f32;
        z.iter_mut().for_each(|x| *x *= k);
        z[y] -= s;
    }
    (lse - zy as f64) as f32 as f64
}

/// Full logits `h [rows, e]·embᵀ → [rows, vocab]`, for parity tests and evals of small
/// batches (training uses [`lm_head_xent`]).
///
/// # Panics
/// If `h` is not `[rows, e]` or `emb` not `[vocab, e]`.
pub fn logits(h: &[f32], rows: usize, e: usize, emb: &[f32], vocab: usize) -> Vec<f32> {
    linear(h, rows, emb, vocab, e, None)
}
