//! LayerNorm against a naive f64 forward and central finite differences of it.

use super::{assert_close, f64s, fd_grad, rand_vec};
use crate::cpu::{layernorm_bwd, layernorm_fwd, layernorm_param_grads, LayerNormSaved};
use crate::data::SplitMix64;

const EPS: f32 = 1e-5;

/// Naive LayerNorm in f64: `(y, mean, rstd)`.
fn naive_ln(
    x: &[f64],
    rows: usize,
    cols: usize,
    g: Option<&[f64]>,
    b: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; rows * cols];
    let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mu = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / cols as f64;
        let rs = 1.0 / (var + EPS as f64).sqrt();
        (mean[r], rstd[r]) = (mu, rs);
        for j in 0..cols {
            y[r * cols + j] =
                (row[j] - mu) * rs * g.map_or(1.0, |g| g[j]) + b.map_or(0.0, |b| b[j]);
        }
    }
    (y, mean, rstd)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn layernorm_fwd_matches_naive() {
    let mut rng = SplitMix64::new(10);
    let (rows, cols) = (13, 37);
    // Rows with an offset and spread, so mean and variance matter.
    let x: Vec<f32> = rand_vec(&mut rng, rows * cols)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + (i / cols) as f32 * 0.3) + (i / cols) as f32 * 0.1)
        .collect();
    let gamma: Vec<f32> = rand_vec(&mut rng, cols)
        .iter()
        .map(|v| 1.0 + 0.5 * v)
        .collect();
    let beta = rand_vec(&mut rng, cols);
    let (g64, b64) = (f64s(&gamma), f64s(&beta));
    for affine in [true, false] {
        let (g, b) = if affine {
            (Some(&gamma[..]), Some(&beta[..]))
        } else {
            (None, None)
        };
        let (y, saved) = layernorm_fwd(&x, rows, cols, g, b, EPS);
        let (wy, wm, wr) = naive_ln(
            &f64s(&x),
            rows,
            cols,
            affine.then_some(&g64[..]),
            affine.then_some(&b64[..]),
        );
        assert_close("ln y", &y, &wy, 1e-5);
        assert_close("ln mean", &saved.mean, &wm, 1e-5);
        assert_close("ln rstd", &saved.rstd, &wr, 1e-5);
    }
}

#[test]
fn layernorm_bwd_matches_finite_differences() {
    let mut rng = SplitMix64::new(11);
    let (rows, cols) = (5, 11);
    let x = rand_vec(&mut rng, rows * cols);
    let dy = rand_vec(&mut rng, rows * cols);
    let gamma: Vec<f32> = rand_vec(&mut rng, cols)
        .iter()
        .map(|v| 1.0 + 0.5 * v)
        .collect();
    let beta = rand_vec(&mut rng, cols);
    let (x64, dy64, g64, b64) = (f64s(&x), f64s(&dy), f64s(&gamma), f64s(&beta));
    for affine in [true, false] {
        let g = affine.then_some(&gamma[..]);
        let (_, saved) = layernorm_fwd(&x, rows, cols, g, affine.then_some(&beta[..]), EPS);
        let dx = layernorm_bwd(&dy, &x, &saved, g, rows, cols);
        let g64o = affine.then_some(&g64[..]);
        let want = fd_grad(&x64, 1e-5, |xp| {
            dot(&dy64, &naive_ln(xp, rows, cols, g64o, None).0)
        });
        assert_close(&format!("ln dx (affine {affine})"), &dx, &want, 1e-3);
    }
    // Parameter gradients: perturb gamma and beta.
    let (_, saved) = layernorm_fwd(&x, rows, cols, Some(&gamma), Some(&beta), EPS);
    let (dg, db) = layernorm_param_grads(&dy, &x, &saved, rows, cols);
    let want_g = fd_grad(&g64, 1e-5, |gp| {
        dot(&dy64, &naive_ln(&x64, rows, cols, Some(gp), Some(&b64)).0)
    });
    let want_b = fd_grad(&b64, 1e-5, |bp| {
        dot(&dy64, &naive_ln(&x64, rows, cols, Some(&g64), Some(bp)).0)
    });
    assert_close("ln dgamma", &dg, &want_g, 1e-3);
    assert_close("ln dbeta", &db, &want_b, 1e-3);
}

#[test]
fn layernorm_param_grads_parallel_reduce() {
    // Enough rows for several rayon tasks; compare with direct f64 sums.
    let mut rng = SplitMix64::new(12);
    let (rows, cols) = (301, 9);
    let x = rand_vec(&mut rng, rows * cols);
    let dy = rand_vec(&mut rng, rows * cols);
    let (_, saved) = layernorm_fwd(&x, rows, cols, None, None, EPS);
    let LayerNormSaved { mean, rstd } = &saved;
    let (dg, db) = layernorm_param_grads(&dy, &x, &saved, rows, cols);
    let want_g: Vec<f64> = (0..cols)
        .map(|j| {
            (0..rows)
                .map(|r| dy[r * cols + j] as f64 * ((x[r * cols + j] - mean[r]) * rstd[r]) as f64)
                .sum()
        })
        .collect();
    let want_b: Vec<f64> = (0..cols)
        .map(|j| (0..rows).map(|r| dy[r * cols + j] as f64).sum())
        .collect();
    assert_close("dgamma", &dg, &want_g, 1e-6);
    assert_close("dbeta", &db, &want_b, 1e-6);
}
