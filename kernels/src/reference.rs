//! Plain-Rust CPU references for every kernel of this crate, and the comparison helpers that
//! the interpreter tests and the GPU checker share.
//!
//! Why: a kernel is only as trustworthy as what it is compared with. These functions state each
//! kernel's math in the most direct way possible (no tiling, no masking, no online tricks), so
//! a disagreement points at the kernel, the compiler or the interpreter rather than at a second
//! clever implementation.
//!
//! Conventions:
//! - Inputs are `f32` slices holding values *already rounded* to the kernel's storage type
//!   (take them from the `HostTensor` given to the kernel), so that the reference sees exactly
//!   the numbers the kernel loads.
//! - All arithmetic is done in `f64`, and results are returned as `f32` *without* rounding to
//!   the storage type: comparisons use tolerances ([`tolerance`]) instead of bit equality.
//! - 2-D tensors are row-major `rows x cols` slices. Lengths are expected to match the given
//!   shapes; on malformed input the functions never panic (extra elements are ignored, missing
//!   ones shorten the output).

use lexp_compiler::dtype::Storage;
use std::fmt;

#[path = "reference_attention.rs"]
mod attention;
pub use attention::{
    attention_bwd, attention_bwd_masked, attention_fwd, attention_fwd_masked, AttnShape, Keep,
};

#[path = "reference_train.rs"]
mod train;
pub use train::{
    adamw, bias_add, bias_relu, causal_softmax, dropout_mask, embedding_fwd, mul_inplace,
    softmax_bwd, sum_squares, xent_fwd_bwd, AdamwStep,
};

/// `sqrt(2 / pi)`, the GELU tanh-approximation constant (the kernel's literal).
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// Cubic coefficient of the GELU tanh approximation.
const GELU_C: f64 = 0.044715;

fn f(x: f32) -> f64 {
    x as f64
}

/// Row `r` of a row-major `rows x cols` slice, or an empty slice if `x` is too short.
fn row(x: &[f32], cols: usize, r: usize) -> &[f32] {
    r.checked_mul(cols)
        .and_then(|start| x.get(start..start + cols))
        .unwrap_or(&[])
}

/// Element `[r, c]` of a row-major slice as f64, 0 if out of range.
fn at(x: &[f32], cols: usize, r: usize, c: usize) -> f64 {
    x.get(r * cols + c).copied().map(f).unwrap_or(0.0)
}

/// `a * x + b * y` element-wise (the `axpby` kernel, which overwrites `y` with it).
pub fn axpby(a: f32, x: &[f32], b: f32, y: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(y)
        .map(|(&xv, &yv)| (f(a) * f(xv) + f(b) * f(yv)) as f32)
        .collect()
}

/// `max(x, 0)` element-wise.
pub fn relu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect()
}

/// ReLU backward from the forward *output* `y`: `dx = dy` where `y > 0`, else 0.
///
/// Using the output rather than the input is what the kernel does (the output is what a
/// training step keeps); the two agree because `relu(x) > 0` exactly when `x > 0`.
pub fn relu_bwd(y: &[f32], dy: &[f32]) -> Vec<f32> {
    y.iter()
        .zip(dy)
        .map(|(&yv, &g)| if yv > 0.0 { g } else { 0.0 })
        .collect()
}

/// The tanh argument `sqrt(2/pi) * (x + 0.044715 x^3)` of the GELU approximation.
fn gelu_u(x: f64) -> f64 {
    SQRT_2_OVER_PI * (x + GELU_C * x * x * x)
}

/// GELU, tanh approximation (as the kernel and PyTorch's `approximate="tanh"`):
/// `y = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let v = f(v);
            (0.5 * v * (1.0 + gelu_u(v).tanh())) as f32
        })
        .collect()
}

/// GELU (tanh approximation) backward: `dx = dy * gelu'(x)`, the exact derivative of
/// [`gelu`]: `gelu'(x) = (1 + t)/2 + x/2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2)`
/// with `t = tanh(u)`.
pub fn gelu_bwd(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let v = f(v);
            let t = gelu_u(v).tanh();
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
            let d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du;
            (f(g) * d) as f32
        })
        .collect()
}

/// Row-wise softmax of a `rows x cols` tensor, numerically stable (`exp(x - max) / sum`).
///
/// `-inf` entries get probability exactly 0. A row whose entries are *all* `-inf` (or an empty
/// row) has no defined softmax; like the kernel (and PyTorch), the reference returns NaN for
/// every entry of such a row: the kernel computes a sum of 0 and multiplies `exp(-inf) = 0` by
/// `1/0 = inf`.
pub fn softmax(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let xs = row(x, cols, r);
        // f64::max ignores NaN, like the GPU's maxnum.
        let m = xs.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f(v)));
        if m == f64::NEG_INFINITY {
            out.extend(xs.iter().map(|_| f32::NAN));
            continue;
        }
        let e: Vec<f64> = xs.iter().map(|&v| (f(v) - m).exp()).collect();
        let total: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| (v / total) as f32));
    }
    out
}

/// LayerNorm forward over the last dimension of a `rows x cols` tensor:
/// `y = (x - mean) * rstd * w + b` with the biased variance and `rstd = 1/sqrt(var + eps)`.
///
/// Returns `(y, mean, rstd)`, `mean` and `rstd` per row, as the kernel saves them for the
/// backward.
pub fn layernorm_fwd(
    x: &[f32],
    rows: usize,
    cols: usize,
    w: &[f32],
    b: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut y = Vec::with_capacity(rows * cols);
    let mut mean = Vec::with_capacity(rows);
    let mut rstd = Vec::with_capacity(rows);
    let n = cols as f64;
    for r in 0..rows {
        let xs = row(x, cols, r);
        let mu = xs.iter().map(|&v| f(v)).sum::<f64>() / n;
        let var = xs.iter().map(|&v| (f(v) - mu).powi(2)).sum::<f64>() / n;
        let rs = 1.0 / (var + f(eps)).sqrt();
        y.extend(
            xs.iter()
                .zip(w)
                .zip(b)
                .map(|((&v, &wv), &bv)| ((f(v) - mu) * rs * f(wv) + f(bv)) as f32),
        );
        mean.push(mu as f32);
        rstd.push(rs as f32);
    }
    (y, mean, rstd)
}

/// LayerNorm input gradient for a `rows x cols` tensor, from the saved per-row `mean` and
/// `rstd`: `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * w` and
/// `xhat = (x - mean) * rstd` (the means over the row).
///
/// The saved statistics are taken as given (not recomputed), exactly as the kernel does, so
/// the comparison isolates the backward.
pub fn layernorm_bwd_dx(
    x: &[f32],
    rows: usize,
    cols: usize,
    w: &[f32],
    dy: &[f32],
    mean: &[f32],
    rstd: &[f32],
) -> Vec<f32> {
    let mut dx = Vec::with_capacity(rows * cols);
    let n = cols as f64;
    for ((r, &mu), &rs) in (0..rows).zip(mean).zip(rstd) {
        let (mu, rs) = (f(mu), f(rs));
        let xhat: Vec<f64> = row(x, cols, r).iter().map(|&v| (f(v) - mu) * rs).collect();
        let g: Vec<f64> = row(dy, cols, r)
            .iter()
            .zip(w)
            .map(|(&d, &wv)| f(d) * f(wv))
            .collect();
        let c1 = g.iter().sum::<f64>() / n;
        let c2 = g.iter().zip(&xhat).map(|(g, xh)| g * xh).sum::<f64>() / n;
        dx.extend(
            g.iter()
                .zip(&xhat)
                .map(|(g, xh)| (rs * (g - c1 - xh * c2)) as f32),
        );
    }
    dx
}

/// LayerNorm parameter gradients for a `rows x cols` tensor, from the saved per-row `mean`
/// and `rstd`: `dw[c] = sum_r dy[r, c] * xhat[r, c]` and `db[c] = sum_r dy[r, c]`.
///
/// Returns `(dw, db)`; the kernel *adds* these into zeroed outputs.
pub fn layernorm_bwd_params(
    x: &[f32],
    rows: usize,
    cols: usize,
    dy: &[f32],
    mean: &[f32],
    rstd: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut dw = vec![0.0f64; cols];
    let mut db = vec![0.0f64; cols];
    for ((r, &mu), &rs) in (0..rows).zip(mean).zip(rstd) {
        for c in 0..cols {
            let g = at(dy, cols, r, c);
            dw[c] += g * (at(x, cols, r, c) - f(mu)) * f(rs);
            db[c] += g;
        }
    }
    (
        dw.into_iter().map(|v| v as f32).collect(),
        db.into_iter().map(|v| v as f32).collect(),
    )
}

/// Bias-add fused with the residual add: `y[r, c] = x[r, c] + bias[c] + res[r, c]`.
pub fn bias_residual(x: &[f32], rows: usize, cols: usize, bias: &[f32], res: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        y.extend(
            row(x, cols, r)
                .iter()
                .zip(bias)
                .zip(row(res, cols, r))
                .map(|((&xv, &bv), &rv)| (f(xv) + f(bv) + f(rv)) as f32),
        );
    }
    y
}

/// Column sums of a `rows x cols` tensor: `out[c] = sum_r x[r, c]` (a bias gradient). The
/// kernel adds these into a zeroed output.
pub fn colsum(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .map(|c| (0..rows).map(|r| at(x, cols, r, c)).sum::<f64>() as f32)
        .collect()
}

/// The value to fill a kernel's outputs with before a run, so that an element the kernel never
/// writes is recognisable afterwards ([`Diff::unwritten`]).
///
/// A quiet NaN whose payload lives in the top mantissa bits, so that it survives rounding to
/// bf16 and f16 and back (`HostTensor::new` rounds) with the same bit pattern, and differs from
/// the default NaN that arithmetic produces (`0x7fc00000`, or the sign-flipped x86 one).
pub const POISON: f32 = f32::from_bits(0x7fe0_0000);

/// How far a kernel's output is from its reference ([`compare`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Diff {
    /// Largest `|got - want|` over the positions where both are finite.
    pub max_abs: f64,
    /// `||got - want||_2 / max(||want||_2, tiny)` over the positions where both are finite.
    pub rel_l2: f64,
    /// Positions where exactly one of `got` and `want` is finite, or both are non-finite but
    /// different (NaN vs inf, or infinities of opposite signs). Unwritten positions are not
    /// counted here.
    pub non_finite: usize,
    /// Positions where `got` still holds [`POISON`] (bit for bit) although `want` is not
    /// NaN: elements the kernel never wrote. A length mismatch between `got` and `want` also
    /// counts here, once per missing or extra element.
    pub unwritten: usize,
}

impl Diff {
    /// True when every element was written, finiteness agrees everywhere and the relative L2
    /// error is at most `rel_tol`.
    pub fn within(&self, rel_tol: f64) -> bool {
        self.non_finite == 0 && self.unwritten == 0 && self.rel_l2 <= rel_tol
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, fm: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            fm,
            "max_abs {:.3e}, rel_l2 {:.3e}, {} non-finite mismatches, {} unwritten",
            self.max_abs, self.rel_l2, self.non_finite, self.unwritten
        )
    }
}

/// Compares a kernel's output `got` with its reference `want` ([`Diff`]).
pub fn compare(got: &[f32], want: &[f32]) -> Diff {
    compare_scaled(got, want, 0.0)
}

/// [`compare`] with the relative error taken against `max(||want||_2, scale)`: for outputs
/// whose values can cancel to near zero (a mean of random data), `scale` is the L2 norm of
/// their natural size (e.g. each row's standard deviation), so that rounding in the sum is
/// judged against the size of what was summed.
pub fn compare_scaled(got: &[f32], want: &[f32], scale: f64) -> Diff {
    let mut d = Diff {
        unwritten: got.len().abs_diff(want.len()),
        ..Diff::default()
    };
    let (mut err2, mut ref2) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.to_bits() == POISON.to_bits() && !w.is_nan() {
            d.unwritten += 1;
        } else if g.is_finite() && w.is_finite() {
            let e = f(g) - f(w);
            d.max_abs = d.max_abs.max(e.abs());
            err2 += e * e;
            ref2 += f(w) * f(w);
        } else {
            let same = (g.is_nan() && w.is_nan()) || g == w;
            if !same {
                d.non_finite += 1;
            }
        }
    }
    d.rel_l2 = err2.sqrt() / ref2.sqrt().max(scale).max(1e-30);
    d
}

/// The relative-L2 tolerance for a kernel output of storage type `dtype` against its f64
/// reference: 1e-2 for bf16, 5e-3 for f16, 1e-5 for f32 (and i32).
///
/// These bound what rounding to the storage type (8 and 11 significant bits) plus f32
/// arithmetic can cost after a chain of ops, with margin for sums over long rows.
pub fn tolerance(dtype: Storage) -> f64 {
    match dtype {
        Storage::BF16 => 1e-2,
        Storage::F16 => 5e-3,
        Storage::F32 | Storage::I32 => 1e-5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lexp_compiler::dtype::round_to;

    fn close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((f(*g) - w).abs() <= tol, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn elementwise() {
        close(
            &axpby(2.0, &[1.0, -1.0], -0.5, &[4.0, 2.0]),
            &[0.0, -3.0],
            0.0,
        );
        close(&relu(&[-1.0, 0.0, 2.5]), &[0.0, 0.0, 2.5], 0.0);
        close(
            &relu_bwd(&[0.0, 3.0, 0.0], &[5.0, 6.0, 7.0]),
            &[0.0, 6.0, 0.0],
            0.0,
        );
        // gelu(1) = 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715)), gelu(0) = 0, gelu(x) ~ x for large
        // x and ~0 for very negative x.
        close(
            &gelu(&[0.0, 1.0, 10.0, -10.0]),
            &[0.0, 0.841_191_990_607_477_2, 10.0, 0.0],
            1e-6,
        );
        // gelu'(0) = 1/2.
        close(&gelu_bwd(&[0.0], &[3.0]), &[1.5], 1e-7);
    }

    #[test]
    fn gelu_bwd_is_the_derivative_of_gelu() {
        let h = 1.0 / 1024.0;
        for x in [-3.0f32, -0.75, -0.125, 0.5, 1.25, 2.75] {
            let fd = (f(gelu(&[x + h])[0]) - f(gelu(&[x - h])[0])) / (2.0 * f(h));
            let d = f(gelu_bwd(&[x], &[1.0])[0]);
            assert!(
                (fd - d).abs() < 1e-4,
                "x = {x}: {d} vs finite difference {fd}"
            );
        }
    }

    #[test]
    fn softmax_rows() {
        let ln3 = 3.0f32.ln();
        close(&softmax(&[0.0, ln3], 1, 2), &[0.25, 0.75], 1e-7);
        // Stable for large inputs, -inf gives exactly 0, rows are independent.
        let y = softmax(&[1e4, 1e4, f32::NEG_INFINITY, 0.0, -1e4, 1e4], 2, 3);
        close(&y, &[0.5, 0.5, 0.0, 0.0, 0.0, 1.0], 1e-12);
    }

    #[test]
    fn softmax_of_an_all_neg_inf_row_is_nan() {
        let y = softmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 0.0], 2, 2);
        assert!(y[0].is_nan() && y[1].is_nan());
        close(&y[2..], &[0.5, 0.5], 0.0);
    }

    #[test]
    fn layernorm_forward() {
        // x = [1, 2, 3]: mean 2, var 2/3, rstd sqrt(3/2), xhat = [-1, 0, 1] * sqrt(3/2).
        let s = 1.5f64.sqrt();
        let (y, mean, rstd) = layernorm_fwd(&[1.0, 2.0, 3.0], 1, 3, &[1.0; 3], &[0.0; 3], 0.0);
        close(&y, &[-s, 0.0, s], 1e-6);
        close(&mean, &[2.0], 0.0);
        close(&rstd, &[s], 1e-6);
        // Scale and shift, two rows, eps.
        let (y, mean, rstd) = layernorm_fwd(
            &[1.0, 2.0, 3.0, 5.0, 5.0, 5.0],
            2,
            3,
            &[2.0, 1.0, -1.0],
            &[1.0, 0.5, 0.0],
            0.25,
        );
        let s = 1.0 / (2.0f64 / 3.0 + 0.25).sqrt();
        close(&y, &[1.0 - 2.0 * s, 0.5, -s, 1.0, 0.5, 0.0], 1e-6);
        close(&mean, &[2.0, 5.0], 0.0);
        close(&rstd, &[s, 2.0], 1e-6);
    }

    #[test]
    fn layernorm_params_gradients() {
        // Both rows normalise to [-1, 0, 1] * sqrt(3/2).
        let s = 1.5f64.sqrt();
        let x = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0];
        let (_, mean, rstd) = layernorm_fwd(&x, 2, 3, &[1.0; 3], &[0.0; 3], 0.0);
        let (dw, db) =
            layernorm_bwd_params(&x, 2, 3, &[1.0, 1.0, 1.0, 1.0, 2.0, 3.0], &mean, &rstd);
        close(&dw, &[-2.0 * s, 0.0, 4.0 * s], 1e-6);
        close(&db, &[2.0, 3.0, 4.0], 0.0);
    }

    /// `dx` must be the gradient of `sum(y * dy)` through the forward (statistics included).
    #[test]
    fn layernorm_bwd_dx_matches_finite_differences() {
        let (rows, cols) = (2, 5);
        let x = [0.5, -1.25, 2.0, 0.75, -0.5, 3.0, 2.5, -2.0, 0.25, 1.0];
        let w = [1.5, -0.5, 2.0, 0.25, 1.0];
        let b = [0.1, 0.2, 0.3, 0.4, 0.5];
        let dy = [1.0, -2.0, 0.5, 0.25, -1.5, -0.75, 1.25, 2.0, -1.0, 0.5];
        let eps = 1e-5;
        let loss = |x: &[f32]| -> f64 {
            let (y, _, _) = layernorm_fwd(x, rows, cols, &w, &b, eps);
            y.iter().zip(&dy).map(|(y, d)| f(*y) * f(*d)).sum()
        };
        let (_, mean, rstd) = layernorm_fwd(&x, rows, cols, &w, &b, eps);
        let dx = layernorm_bwd_dx(&x, rows, cols, &w, &dy, &mean, &rstd);
        let h = 1.0 / 256.0;
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x, x);
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * f(h));
            assert!(
                (fd - f(dx[i])).abs() < 2e-3 * (1.0 + fd.abs()),
                "element {i}: {} vs finite difference {fd}",
                dx[i]
            );
        }
        // With w = 1 the gradient of a row sums to 0 (shifting x does not change y).
        let dx = layernorm_bwd_dx(&x, rows, cols, &[1.0; 5], &dy, &mean, &rstd);
        for r in 0..rows {
            let s: f64 = dx[r * cols..(r + 1) * cols].iter().map(|v| f(*v)).sum();
            assert!(s.abs() < 1e-5, "row {r} sums to {s}");
        }
    }

    #[test]
    fn bias_residual_and_colsum() {
        let y = bias_residual(
            &[1.0, 2.0, 3.0, 4.0],
            2,
            2,
            &[10.0, 20.0],
            &[0.5, 0.25, -1.0, -2.0],
        );
        close(&y, &[11.5, 22.25, 12.0, 22.0], 0.0);
        close(
            &colsum(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2),
            &[9.0, 12.0],
            0.0,
        );
        close(&colsum(&[], 0, 3), &[0.0, 0.0, 0.0], 0.0);
    }

    #[test]
    fn malformed_input_does_not_panic() {
        assert_eq!(softmax(&[1.0, 2.0], 3, 2).len(), 2);
        assert_eq!(softmax(&[1.0, 2.0], 2, 0).len(), 0);
        assert_eq!(colsum(&[1.0], 2, 2), vec![1.0, 0.0]);
        assert_eq!(
            bias_residual(&[1.0, 2.0], 1, 2, &[1.0], &[0.0, 0.0]).len(),
            1
        );
        let (y, m, r) = layernorm_fwd(&[], 1, 0, &[], &[], 1e-5);
        assert!(y.is_empty() && m[0].is_nan() && r[0].is_nan());
    }

    #[test]
    fn compare_counts() {
        let d = compare(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        assert_eq!(d, Diff::default());
        assert!(d.within(0.0));
        // ||(0, 0.5)|| / ||(3, 4)|| = 0.1.
        let d = compare(&[3.0, 4.5], &[3.0, 4.0]);
        assert_eq!((d.max_abs, d.rel_l2), (0.5, 0.1));
        let d = compare(
            &[
                POISON,
                f32::NAN,
                1.0,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
            ],
            &[1.0, 1.0, f32::NAN, f32::NAN, f32::INFINITY, f32::INFINITY],
        );
        assert_eq!((d.unwritten, d.non_finite), (1, 3));
        assert!(!d.within(1.0));
        assert_eq!(compare(&[1.0], &[1.0, 2.0]).unwritten, 1);
        assert_eq!(compare(&[0.0], &[0.0]).rel_l2, 0.0);
    }

    #[test]
    fn poison_survives_rounding_to_every_storage_type() {
        for s in [Storage::BF16, Storage::F16, Storage::F32] {
            assert_eq!(
                round_to(s.dtype(), POISON).to_bits(),
                POISON.to_bits(),
                "{s:?}"
            );
        }
        // Arithmetic NaNs (computed at run time) are not the poison.
        let zero = std::hint::black_box(0.0f32);
        for nan in [
            f32::NAN,
            zero / zero,
            (zero / zero) * 2.0,
            f32::INFINITY - f32::INFINITY,
        ] {
            assert_ne!(nan.to_bits(), POISON.to_bits());
        }
    }

    #[test]
    fn tolerances() {
        assert_eq!(tolerance(Storage::BF16), 1e-2);
        assert_eq!(tolerance(Storage::F16), 5e-3);
        assert_eq!(tolerance(Storage::F32), 1e-5);
    }
}
