//! CPU references for the kernels of the GPU fine-tuning step (`bias`, `embedding`,
//! `attention_softmax`, `xent`, `optimizer`), re-exported from [`reference`](super).
//!
//! Same conventions as the rest of [`reference`](super): inputs already rounded to the
//! kernel's storage type, f64 arithmetic, f32 results not rounded to the storage type, no
//! panics on malformed input (out-of-range indices give NaN rows, short inputs shorten the
//! output).

use super::{f, row};

/// `x[r, c] + bias[c]` for a `rows x cols` tensor (the `bias_add` kernel writes it over `x`).
pub fn bias_add(x: &[f32], rows: usize, cols: usize, bias: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        y.extend(
            row(x, cols, r)
                .iter()
                .zip(bias)
                .map(|(&xv, &bv)| (f(xv) + f(bv)) as f32),
        );
    }
    y
}

/// `max(x[r, c] + bias[c], 0)` for a `rows x cols` tensor (`bias_relu`, in place on `x`).
pub fn bias_relu(x: &[f32], rows: usize, cols: usize, bias: &[f32]) -> Vec<f32> {
    bias_add(x, rows, cols, bias)
        .into_iter()
        .map(|v| if v > 0.0 { v } else { 0.0 })
        .collect()
}

/// OPT's embedding: `y[r, :] = tok[ids[r], :] + pos[pos_ids[r] + 2, :]` for `tok` of
/// `[V, hidden]` and `pos` of `[P + 2, hidden]`; one output row per id. A row whose token or
/// (offset) position is out of range is all NaN.
pub fn embedding_fwd(
    tok: &[f32],
    pos: &[f32],
    hidden: usize,
    ids: &[i32],
    pos_ids: &[i32],
) -> Vec<f32> {
    let mut y = Vec::with_capacity(ids.len() * hidden);
    for (&t, &p) in ids.iter().zip(pos_ids) {
        let tr = usize::try_from(t).ok().map(|t| row(tok, hidden, t));
        let pr = usize::try_from(i64::from(p) + 2)
            .ok()
            .map(|p| row(pos, hidden, p));
        match (tr, pr) {
            (Some(tr), Some(pr)) if tr.len() == hidden && pr.len() == hidden => {
                y.extend(tr.iter().zip(pr).map(|(&a, &b)| (f(a) + f(b)) as f32))
            }
            _ => y.extend(std::iter::repeat_n(f32::NAN, hidden)),
        }
    }
    y
}

/// Causal softmax of the attention scores of one sequence, all heads: `s` is `[rows, len]`
/// with row `r` the scores of query `i = r % len` (head `r / len`). Returns `(p, lse)`:
/// `p[r, j] = exp(s[r, j] - lse[r])` for `j <= i`, exactly 0 for `j > i`, and
/// `lse[r] = ln(sum_{j <= i} exp(s[r, j]))`. Entries past the diagonal are never read.
pub fn causal_softmax(s: &[f32], rows: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut p = Vec::with_capacity(rows * len);
    let mut lse = Vec::with_capacity(rows);
    for r in 0..rows {
        let xs = row(s, len, r);
        let i = r % len.max(1);
        let seen = &xs[..xs.len().min(i + 1)];
        let m = seen.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f(v)));
        let shift = if m == f64::NEG_INFINITY { 0.0 } else { m };
        let total: f64 = seen.iter().map(|&v| (f(v) - shift).exp()).sum();
        let l = shift + total.ln();
        p.extend(xs.iter().enumerate().map(
            |(j, &v)| {
                if j <= i {
                    (f(v) - l).exp() as f32
                } else {
                    0.0
                }
            },
        ));
        lse.push(l as f32);
    }
    (p, lse)
}

/// Softmax backward for a `rows x cols` tensor: `ds = p * (dp - sum_j p[r, j] * dp[r, j])`
/// per row.
pub fn softmax_bwd(p: &[f32], dp: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut ds = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let (pr, gr) = (row(p, cols, r), row(dp, cols, r));
        let d: f64 = pr.iter().zip(gr).map(|(&a, &b)| f(a) * f(b)).sum();
        ds.extend(pr.iter().zip(gr).map(|(&a, &b)| (f(a) * (f(b) - d)) as f32));
    }
    ds
}

/// Cross-entropy forward and backward on `rows x cols` logits `z` with one target per row.
/// Returns `(dz, loss)`: for a row with `targets[r] >= 0`,
/// `loss[r] = logsumexp(z[r]) - z[r, targets[r]]` and
/// `dz[r, :] = scale * (softmax(z[r]) - onehot(targets[r]))`; a row with a negative target
/// gets `loss 0` and `dz 0`. A target `>= cols` gives a NaN row (the runtime never passes one).
pub fn xent_fwd_bwd(
    z: &[f32],
    rows: usize,
    cols: usize,
    targets: &[i32],
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut dz = Vec::with_capacity(rows * cols);
    let mut loss = Vec::with_capacity(rows);
    for (r, &t) in (0..rows).zip(targets) {
        let zs = row(z, cols, r);
        if t < 0 {
            dz.extend(zs.iter().map(|_| 0.0f32));
            loss.push(0.0);
            continue;
        }
        let t = t as usize;
        let Some(&zt) = zs.get(t) else {
            dz.extend(zs.iter().map(|_| f32::NAN));
            loss.push(f32::NAN);
            continue;
        };
        let m = zs.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f(v)));
        let lse = m + zs.iter().map(|&v| (f(v) - m).exp()).sum::<f64>().ln();
        loss.push((lse - f(zt)) as f32);
        dz.extend(zs.iter().enumerate().map(|(j, &v)| {
            let onehot = if j == t { 1.0 } else { 0.0 };
            (f(scale) * ((f(v) - lse).exp() - onehot)) as f32
        }));
    }
    (dz, loss)
}

pub use crate::optimizer::AdamwStep;

/// One AdamW step on `g = grad * grad_scale`, torch order: `param *= 1 - lr*wd; m += (1 - beta1)(g - m);
/// v = beta2 v + (1 - beta2) g^2; param -= (lr / bc1) m / (sqrt(v) / bc2_sqrt + eps)`.
/// Returns the updated `(param, m, v)`.
pub fn adamw(
    param: &[f32],
    grad: &[f32],
    m: &[f32],
    v: &[f32],
    s: &AdamwStep,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = param.len().min(grad.len()).min(m.len()).min(v.len());
    let (mut po, mut mo, mut vo) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let step = f(s.lr) / f(s.bias_correction1);
    for i in 0..n {
        // The kernel rounds the scaled gradient to f32, as torch's in-place clipping does.
        let g = f(grad[i] * s.grad_scale);
        let p = f(param[i]) * (1.0 - f(s.lr) * f(s.weight_decay));
        let m1 = f(m[i]) + (1.0 - f(s.beta1)) * (g - f(m[i]));
        let v1 = f(s.beta2) * f(v[i]) + (1.0 - f(s.beta2)) * g * g;
        let denom = v1.sqrt() / f(s.bias_correction2_sqrt) + f(s.eps);
        po.push((p - step * (m1 / denom)) as f32);
        mo.push(m1 as f32);
        vo.push(v1 as f32);
    }
    (po, mo, vo)
}

/// The `sum_squares` kernel's partials: `Σ x²` over each `chunk` elements, in f64.
pub fn sum_squares(x: &[f32], chunk: usize) -> Vec<f32> {
    x.chunks(chunk.max(1))
        .map(|c| c.iter().map(|&v| f(v) * f(v)).sum::<f64>() as f32)
        .collect()
}

/// Inverted dropout from uniforms `u` (the `dropout_mask` kernel): the mask
/// `u >= p ? 1/(1-p) : 0` (a NaN `u` drops) and `x ⊙ mask`, returned as `(x, mask)`. The
/// kernel scales `x` by the mask rounded to its storage type: for `x` in a 16-bit type,
/// compare against [`mul_inplace`] of `x` and the rounded mask.
pub fn dropout_mask(x: &[f32], u: &[f32], p: f32) -> (Vec<f32>, Vec<f32>) {
    let keep = 1.0 / (1.0 - f(p));
    let mask: Vec<f64> = u
        .iter()
        .map(|&uv| if uv >= p { keep } else { 0.0 })
        .collect();
    let y = x
        .iter()
        .zip(&mask)
        .map(|(&xv, &m)| (f(xv) * m) as f32)
        .collect();
    (y, mask.into_iter().map(|m| m as f32).collect())
}

/// `x ⊙ m` (the `mul_inplace` kernel writes it over `x`).
pub fn mul_inplace(x: &[f32], m: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(m)
        .map(|(&a, &b)| (f(a) * f(b)) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((f(*g) - w).abs() <= tol, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn dropout_mask_keeps_at_or_above_p_and_scales() {
        let (y, m) = dropout_mask(&[2.0, -4.0, 6.0, 1.0], &[0.25, 0.2, 0.9, f32::NAN], 0.25);
        close(&m, &[4.0 / 3.0, 0.0, 4.0 / 3.0, 0.0], 1e-6);
        close(&y, &[8.0 / 3.0, 0.0, 8.0, 0.0], 1e-6);
        close(&mul_inplace(&[1.5, -2.0], &[2.0, 0.0]), &[3.0, 0.0], 0.0);
    }

    #[test]
    fn bias_epilogues() {
        let x = [1.0, -2.0, 3.0, -4.0];
        close(
            &bias_add(&x, 2, 2, &[0.5, 1.0]),
            &[1.5, -1.0, 3.5, -3.0],
            0.0,
        );
        close(
            &bias_relu(&x, 2, 2, &[0.5, 1.0]),
            &[1.5, 0.0, 3.5, 0.0],
            0.0,
        );
    }

    #[test]
    fn embedding_adds_token_and_offset_position_rows() {
        // tok: 3 rows of width 2; pos: 4 rows (positions -2..2 after the offset).
        let tok = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
        let pos = [0.0, 0.0, 0.5, 0.5, 0.25, 0.75, 4.0, 8.0];
        let y = embedding_fwd(&tok, &pos, 2, &[2, 0, 1], &[0, 1, -1]);
        close(&y, &[100.25, 200.75, 5.0, 10.0, 10.5, 20.5], 0.0);
        // Out of range: a NaN row, no panic.
        let y = embedding_fwd(&tok, &pos, 2, &[3, 0], &[0, 2]);
        assert!(y.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn causal_softmax_masks_the_future() {
        let ln3 = 3.0f32.ln();
        // One head of length 2 and a second head: row r is query r % 2.
        let s = [5.0, 7.0, 0.0, ln3, 9.0, -9.0, 0.0, 0.0];
        let (p, lse) = causal_softmax(&s, 4, 2);
        close(&p, &[1.0, 0.0, 0.25, 0.75, 1.0, 0.0, 0.5, 0.5], 1e-7);
        close(&lse, &[5.0, f(4.0f32.ln()), 9.0, f(2.0f32.ln())], 1e-6);
    }

    /// `ds` is the gradient of `sum(softmax(x) * dp)` with respect to `x`.
    #[test]
    fn softmax_bwd_matches_finite_differences() {
        let x = [0.5f32, -1.0, 2.0, 0.25, 1.5];
        let dp = [1.0f32, -2.0, 0.5, 3.0, -0.75];
        let loss = |x: &[f32]| -> f64 {
            super::super::softmax(x, 1, 5)
                .iter()
                .zip(&dp)
                .map(|(p, d)| f(*p) * f(*d))
                .sum()
        };
        let p = super::super::softmax(&x, 1, 5);
        let ds = softmax_bwd(&p, &dp, 1, 5);
        let h = 1.0 / 512.0;
        for i in 0..5 {
            let (mut xp, mut xm) = (x, x);
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * f(h));
            assert!((fd - f(ds[i])).abs() < 1e-4, "{i}: {} vs {fd}", ds[i]);
        }
    }

    /// `dz / scale` is the gradient of the loss, and ignored rows are zero.
    #[test]
    fn xent_gradient_and_ignored_rows() {
        let z = [0.5f32, -1.0, 2.0, 0.25, 9.0, 9.0, 9.0, 9.0];
        let (dz, loss) = xent_fwd_bwd(&z, 2, 4, &[2, -100], 0.5);
        close(&dz[4..], &[0.0; 4], 0.0);
        close(&loss[1..], &[0.0], 0.0);
        let h = 1.0 / 512.0;
        for i in 0..4 {
            let (mut zp, mut zm) = (z, z);
            zp[i] += h;
            zm[i] -= h;
            let lp = xent_fwd_bwd(&zp, 1, 4, &[2], 1.0).1[0];
            let lm = xent_fwd_bwd(&zm, 1, 4, &[2], 1.0).1[0];
            let fd = (f(lp) - f(lm)) / (2.0 * f(h));
            assert!((fd * 0.5 - f(dz[i])).abs() < 1e-4, "{i}: {} vs {fd}", dz[i]);
        }
        // logsumexp([9; 4]) - 9 = ln 4.
        let (_, loss) = xent_fwd_bwd(&z[4..], 1, 4, &[3], 1.0);
        close(&loss, &[f(4.0f32.ln())], 1e-6);
    }

    /// Two steps against the textbook form with bias-corrected moments.
    #[test]
    fn adamw_matches_the_bias_corrected_form() {
        let (lr, b1, b2, eps, wd) = (1e-2f32, 0.9f32, 0.999f32, 1e-8f32, 0.1f32);
        let (mut p, mut m, mut v) = (vec![0.5f32, -1.5], vec![0.0f32; 2], vec![0.0f32; 2]);
        let (mut pw, mut mw, mut vw) = ([0.5f64, -1.5], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [(1u32, [0.25f32, -2.0]), (2, [-0.5, 1.0])] {
            let s = AdamwStep::at(lr, b1, b2, eps, wd, t);
            (p, m, v) = adamw(&p, &g, &m, &v, &s);
            for i in 0..2 {
                let gi = f(g[i]);
                pw[i] -= f(lr) * f(wd) * pw[i];
                mw[i] = f(b1) * mw[i] + (1.0 - f(b1)) * gi;
                vw[i] = f(b2) * vw[i] + (1.0 - f(b2)) * gi * gi;
                let mh = mw[i] / (1.0 - f(b1).powi(t as i32));
                let vh = vw[i] / (1.0 - f(b2).powi(t as i32));
                pw[i] -= f(lr) * mh / (vh.sqrt() + f(eps));
            }
        }
        close(&p, &pw, 1e-6);
        close(&m, &mw, 1e-6);
        close(&v, &vw, 1e-6);
    }
}
