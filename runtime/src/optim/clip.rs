//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_` (RUNTIME.md §2.10).

/// Scales every gradient by `min(1, max_norm / (n + 1e-6))`, where `n = √Σ g²` over all
/// tensors (accumulated in f64), and returns `n` (the norm before clipping). The coefficient
/// is computed in f32 as torch does, and gradients are left untouched when it is 1.
///
/// Clipping is disabled when `max_norm` is not a positive finite number (the norm is still
/// returned). A non-finite norm (NaN/inf gradients) is returned with the gradients
/// untouched: the caller decides whether to skip the step.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let sum: f64 = grads
        .iter()
        .map(|g| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .sum();
    let norm = sum.sqrt() as f32;
    if !(norm.is_finite() && max_norm > 0.0 && max_norm.is_finite()) {
        return norm;
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|x| *x *= coef);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_of_known_vectors_and_clipping() {
        // 3-4-5 and 12 across two tensors: √(9 + 16 + 144) = 13.
        let (mut a, mut b) = (vec![3.0f32, 4.0], vec![0.0f32, -12.0]);
        let n = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(n, 13.0);
        let c = 1.0 / (13.0f32 + 1e-6);
        assert_eq!(a, [3.0 * c, 4.0 * c]);
        assert_eq!(b, [0.0, -12.0 * c]);
        let after = clip_grad_norm(&mut [&mut a, &mut b], 0.0);
        assert!((after - 1.0).abs() < 1e-6, "{after}");

        // Under the limit: unchanged (bitwise).
        let (mut a, mut b) = (vec![0.3f32, -0.4], vec![1.2f32]);
        let n = clip_grad_norm(&mut [&mut a, &mut b], 5.0);
        assert!((n - 1.3).abs() < 1e-6);
        assert_eq!((a, b), (vec![0.3f32, -0.4], vec![1.2f32]));
    }

    #[test]
    fn disabled_and_non_finite() {
        for max in [0.0, -1.0, f32::INFINITY, f32::NAN] {
            let mut a = vec![30.0f32, 40.0];
            assert_eq!(clip_grad_norm(&mut [&mut a], max), 50.0);
            assert_eq!(a, [30.0, 40.0]);
        }
        let mut a = vec![1.0f32, f32::NAN];
        assert!(clip_grad_norm(&mut [&mut a], 1.0).is_nan());
        assert_eq!(a[0], 1.0);
        let mut a = vec![f32::INFINITY, 1.0];
        assert_eq!(clip_grad_norm(&mut [&mut a], 1.0), f32::INFINITY);
        assert_eq!(a[1], 1.0);
        // Beyond f32 range as a sum of squares but not as a norm: f64 accumulation.
        let mut a = vec![3e20f32, 4e20];
        let n = clip_grad_norm(&mut [&mut a], 1.0);
        assert!((n / 5e20 - 1.0).abs() < 1e-6, "{n}");
        assert!((a[0] - 0.6).abs() < 1e-6 && (a[1] - 0.8).abs() < 1e-6);
        assert_eq!(clip_grad_norm(&mut [], 1.0), 0.0);
    }

    #[test]
    fn random_tensors_against_naive_norm() {
        let mut rng = crate::data::SplitMix64::new(9);
        let mut t: Vec<Vec<f32>> = [17usize, 1, 300]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| (rng.below(2001) as f32 - 1000.0) / 100.0)
                    .collect()
            })
            .collect();
        let flat: Vec<f32> = t.iter().flatten().copied().collect();
        let naive = flat.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut refs: Vec<&mut [f32]> = t.iter_mut().map(Vec::as_mut_slice).collect();
        let n = clip_grad_norm(&mut refs, 2.0);
        assert!((n as f64 / naive - 1.0).abs() < 1e-6);
        let c = 2.0 / (n + 1e-6);
        for (x, y) in t.iter().flatten().zip(&flat) {
            assert_eq!(*x, y * c);
        }
        let after: f64 = t
            .iter()
            .flatten()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((after - 2.0).abs() < 1e-4, "{after}");
    }
}
