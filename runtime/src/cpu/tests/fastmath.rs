//! The vectorisable `exp` and row reductions against f64 `exp` and plain loops.

use super::rand_vec;
use crate::cpu::fastmath::{exp, exp_shift_scale, exp_shift_sum, max};
use crate::data::SplitMix64;

#[test]
fn exp_is_accurate_over_the_range() {
    let mut worst = 0.0f64;
    // Dense sweep of [-87, 87.9] plus the points the range reduction switches at.
    let mut xs: Vec<f32> = (0..=174_900).map(|i| -87.0 + i as f32 * 1e-3).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-8,
        -1e-8,
        0.5 * std::f32::consts::LN_2,
        -0.5 * std::f32::consts::LN_2,
    ]);
    for &x in &xs {
        let want = (x as f64).exp();
        let rel = ((exp(x) as f64 - want) / want).abs();
        worst = worst.max(rel);
    }
    // f32 has a relative precision of 6e-8 (half an ulp); allow about 2 ulp.
    assert!(worst < 2.5e-7, "worst relative error {worst:e}");
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-88.0), 0.0);
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert!(exp(f32::NAN).is_nan());
    assert!(exp(1000.0).is_finite());
}

#[test]
fn row_helpers_match_plain_loops() {
    let mut rng = SplitMix64::new(90);
    for n in [0, 1, 7, 8, 9, 1001] {
        let xs: Vec<f32> = rand_vec(&mut rng, n).iter().map(|x| 20.0 * x).collect();
        let want_max = xs.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        assert_eq!(max(&xs), want_max, "n = {n}");
        let mut ys = xs.clone();
        let sum = exp_shift_sum(&mut ys, want_max);
        // The shift itself is an f32 subtraction; compare from its rounded result.
        let want: Vec<f64> = xs.iter().map(|&x| ((x - want_max) as f64).exp()).collect();
        let want_sum: f64 = want.iter().sum();
        assert!(
            (sum - want_sum).abs() <= 1e-6 * want_sum.max(1e-30),
            "n = {n}: {sum} vs {want_sum}"
        );
        for (y, w) in ys.iter().zip(&want) {
            assert!((*y as f64 - w).abs() <= 3e-7 * w, "{y} vs {w}");
        }
        let mut zs = xs.clone();
        exp_shift_scale(&mut zs, 1.5, -0.25);
        for (z, &x) in zs.iter().zip(&xs) {
            let w = -0.25 * ((x - 1.5) as f64).exp();
            assert!((*z as f64 - w).abs() <= 3e-7 * w.abs(), "{z} vs {w}");
        }
    }
}
