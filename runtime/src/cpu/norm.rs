//! LayerNorm over the last dimension (RUNTIME.md §1.3, §2.2): biased variance, statistics
//! accumulated in f64 and saved in f32, rows processed in parallel.

use rayon::prelude::*;

/// Rows per rayon task (LayerNorm rows are a few hundred to a few thousand features).
const MIN_ROWS_PER_TASK: usize = 8;

/// What [`layernorm_fwd`] saves for the backward: per row the mean `μ` and
/// `rstd = 1/√(σ²+eps)`, each `[rows]`. `x̂ = (x−μ)·rstd` is recomputed from `x`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormSaved {
    /// Per-row mean, `[rows]`.
    pub mean: Vec<f32>,
    /// Per-row reciprocal standard deviation `1/√(σ²+eps)`, `[rows]`.
    pub rstd: Vec<f32>,
}

/// LayerNorm forward over rows of `x[rows,cols]`: `y = (x−μ)·rstd·γ + β` with `μ` the row
/// mean and `σ²` the biased row variance; `γ` defaults to 1 and `β` to 0 (non-affine).
/// Returns `y` and the saved statistics.
///
/// # Panics
/// If `x.len() != rows·cols` or `gamma`/`beta` are not `[cols]`.
pub fn layernorm_fwd(
    x: &[f32],
    rows: usize,
    cols: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) -> (Vec<f32>, LayerNormSaved) {
    assert_eq!(
        x.len(),
        rows * cols,
        "layernorm_fwd: x is not [{rows},{cols}]"
    );
    check_param("gamma", gamma, cols);
    check_param("beta", beta, cols);
    let mut y = vec![0.0f32; rows * cols];
    let mut mean = vec![0.0f32; rows];
    let mut rstd = vec![0.0f32; rows];
    if cols == 0 {
        return (y, LayerNormSaved { mean, rstd });
    }
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|((yr, xr), (mu_out, rstd_out))| {
            let n = cols as f64;
            let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n;
            let rs = 1.0 / (var + eps as f64).sqrt();
            let (mu32, rs32) = (mu as f32, rs as f32);
            *mu_out = mu32;
            *rstd_out = rs32;
            for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                let mut h = (v - mu32) * rs32;
                if let Some(g) = gamma {
                    h *= g[j];
                }
                if let Some(b) = beta {
                    h += b[j];
                }
                *o = h;
            }
        });
    (y, LayerNormSaved { mean, rstd })
}

/// LayerNorm input gradient: with `g = dy⊙γ` (`γ = 1` if `None`) and `x̂ = (x−μ)·rstd`,
/// `dx = rstd·(g − mean(g) − x̂·mean(g⊙x̂))` per row (the means in f64).
///
/// # Panics
/// If the slice lengths do not match `[rows,cols]` / `[rows]` / `[cols]`.
pub fn layernorm_bwd(
    dy: &[f32],
    x: &[f32],
    saved: &LayerNormSaved,
    gamma: Option<&[f32]>,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    check_bwd_shapes(dy, x, saved, rows, cols);
    check_param("gamma", gamma, cols);
    let mut dx = vec![0.0f32; rows * cols];
    if cols == 0 {
        return dx;
    }
    dx.par_chunks_mut(cols)
        .zip(dy.par_chunks(cols).zip(x.par_chunks(cols)))
        .zip(saved.mean.par_iter().zip(saved.rstd.par_iter()))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|((dxr, (dyr, xr)), (&mu, &rs))| {
            let gj = |j: usize| match gamma {
                Some(g) => dyr[j] * g[j],
                None => dyr[j],
            };
            let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
            for (j, &xv) in xr.iter().enumerate() {
                let g = gj(j) as f64;
                sum_g += g;
                sum_gx += g * ((xv - mu) * rs) as f64;
            }
            let mean_g = (sum_g / cols as f64) as f32;
            let mean_gx = (sum_gx / cols as f64) as f32;
            for (j, d) in dxr.iter_mut().enumerate() {
                let xhat = (xr[j] - mu) * rs;
                *d = rs * (gj(j) - mean_g - xhat * mean_gx);
            }
        });
    dx
}

/// LayerNorm parameter gradients `(dγ, dβ) = (Σ_rows dy⊙x̂, Σ_rows dy)`, each `[cols]`,
/// accumulated in f64 (for PEFT methods that train LayerNorm: Houlsby, BitFit).
///
/// # Panics
/// If the slice lengths do not match `[rows,cols]` / `[rows]`.
pub fn layernorm_param_grads(
    dy: &[f32],
    x: &[f32],
    saved: &LayerNormSaved,
    rows: usize,
    cols: usize,
) -> (Vec<f32>, Vec<f32>) {
    check_bwd_shapes(dy, x, saved, rows, cols);
    if cols == 0 {
        return (Vec::new(), Vec::new());
    }
    let zero = || (vec![0.0f64; cols], vec![0.0f64; cols]);
    let (dg, db) = dy
        .par_chunks(cols)
        .zip(x.par_chunks(cols))
        .zip(saved.mean.par_iter().zip(saved.rstd.par_iter()))
        .with_min_len(4 * MIN_ROWS_PER_TASK)
        .fold(zero, |(mut dg, mut db), ((dyr, xr), (&mu, &rs))| {
            for j in 0..cols {
                let d = dyr[j] as f64;
                dg[j] += d * ((xr[j] - mu) * rs) as f64;
                db[j] += d;
            }
            (dg, db)
        })
        .reduce(zero, |(mut g1, mut b1), (g2, b2)| {
            g1.iter_mut().zip(&g2).for_each(|(a, b)| *a += b);
            b1.iter_mut().zip(&b2).for_each(|(a, b)| *a += b);
            (g1, b1)
        });
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect();
    (to_f32(dg), to_f32(db))
}

fn check_param(name: &str, p: Option<&[f32]>, cols: usize) {
    if let Some(p) = p {
        assert_eq!(
            p.len(),
            cols,
            "layernorm: {name} has {} elements, expected {cols}",
            p.len()
        );
    }
}

fn check_bwd_shapes(dy: &[f32], x: &[f32], saved: &LayerNormSaved, rows: usize, cols: usize) {
    assert_eq!(x.len(), rows * cols, "layernorm: x is not [{rows},{cols}]");
    assert_eq!(
        dy.len(),
        rows * cols,
        "layernorm: dy is not [{rows},{cols}]"
    );
    assert_eq!(
        saved.mean.len(),
        rows,
        "layernorm: saved mean is not [{rows}]"
    );
    assert_eq!(
        saved.rstd.len(),
        rows,
        "layernorm: saved rstd is not [{rows}]"
    );
}
