//! Tests of the CPU ops against naive f64 implementations written out here (triple loops, no
//! `gemm`, no rayon) and against central finite differences of those f64 references.

mod attention;
mod bench;
mod elementwise;
mod fastmath;
mod loss;
mod matmul;
mod norm;

use crate::data::SplitMix64;

/// `n` values uniform in [-1, 1).
pub(super) fn rand_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32)
        .collect()
}

/// Widens to f64.
pub(super) fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Asserts `max_i |got_i − want_i| ≤ tol · max(max_i |want_i|, 1e-30)` (error relative to the
/// reference's scale) and that nothing is NaN.
#[track_caller]
pub(super) fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |a, &w| a.max(w.abs())).max(1e-30);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: NaN at {i}");
        let e = (g as f64 - w).abs();
        if e > worst {
            (worst, at) = (e, i);
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max abs error {worst:e} at {at} (got {}, want {}) exceeds {tol:e} × scale {scale:e}",
        got[at],
        want[at]
    );
}

/// Naive `alpha·op(a)·op(b) + beta·c` in f64 (`c` ignored when `beta == 0`).
#[allow(clippy::too_many_arguments)]
pub(super) fn naive_matmul(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    alpha: f64,
    beta: f64,
) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            out[i * n + j] = alpha * s
                + if beta == 0.0 {
                    0.0
                } else {
                    beta * c[i * n + j] as f64
                };
        }
    }
    out
}

/// Central finite differences of the scalar `f` at `x`, coordinate by coordinate.
pub(super) fn fd_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + h;
            let fp = f(&x);
            x[i] = x0 - h;
            let fm = f(&x);
            x[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}
