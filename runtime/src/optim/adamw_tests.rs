//! AdamW against an independent f64 re-derivation of `torch.optim.AdamW` (RUNTIME.md §2.10).

use super::*;
use crate::data::SplitMix64;

/// Uniform in `[-scale, scale)`.
fn random(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale) as f32)
        .collect()
}

/// The textbook algorithm in f64, written from torch's documentation (decoupled decay on
/// the pre-update θ, bias-corrected moments, eps added to √v̂):
/// `θ ← θ − lr·λ·θ`, `m̂ = m/(1−β1^t)`, `v̂ = v/(1−β2^t)`, `θ ← θ − lr·m̂/(√v̂ + eps)`.
struct Reference {
    lr_decay: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    t: i32,
    theta: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Reference {
    fn new(c: &AdamWConfig, theta: &[f32]) -> Self {
        let d = |x: f32| x.to_string().parse::<f64>().unwrap();
        Reference {
            lr_decay: d(c.weight_decay),
            b1: d(c.betas.0),
            b2: d(c.betas.1),
            eps: d(c.eps),
            t: 0,
            theta: theta.iter().map(|&x| x as f64).collect(),
            m: vec![0.0; theta.len()],
            v: vec![0.0; theta.len()],
        }
    }

    fn step(&mut self, g: &[f32], lr: f64) {
        self.t += 1;
        for i in 0..g.len() {
            let g = g[i] as f64;
            self.theta[i] -= lr * self.lr_decay * self.theta[i];
            self.m[i] = self.b1 * self.m[i] + (1.0 - self.b1) * g;
            self.v[i] = self.b2 * self.v[i] + (1.0 - self.b2) * g * g;
            let m_hat = self.m[i] / (1.0 - self.b1.powi(self.t));
            let v_hat = self.v[i] / (1.0 - self.b2.powi(self.t));
            self.theta[i] -= lr * m_hat / (v_hat.sqrt() + self.eps);
        }
    }
}

fn rel_frobenius(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Runs three steps on three tensors (one with gradients near eps, where its placement
/// matters) and compares θ, the updates, m and v with the f64 reference.
fn check_against_reference(config: AdamWConfig, lrs: [f32; 3], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let sizes = [300usize, 1000, 7];
    let grad_scale = [1.0, 1e-3, 3e-8];
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let theta0 = params.clone();
    let mut refs: Vec<Reference> = params.iter().map(|p| Reference::new(&config, p)).collect();
    let mut opt = AdamW::new(config, &sizes);
    for lr in lrs {
        let grads: Vec<Vec<f32>> = sizes
            .iter()
            .zip(grad_scale)
            .map(|(&n, s)| random(&mut rng, n, s))
            .collect();
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        opt.step(&mut p, &g, lr);
        for (r, g) in refs.iter_mut().zip(&grads) {
            r.step(g, lr.to_string().parse().unwrap());
        }
    }
    assert_eq!(opt.step_count(), 3);
    let state = opt.state().unwrap();
    for i in 0..sizes.len() {
        let r = &refs[i];
        let e = rel_frobenius(&params[i], &r.theta);
        assert!(e <= 1e-6, "tensor {i}: θ rel error {e}");
        let upd: Vec<f32> = params[i]
            .iter()
            .zip(&theta0[i])
            .map(|(a, b)| a - b)
            .collect();
        let ref_upd: Vec<f64> = r
            .theta
            .iter()
            .zip(&theta0[i])
            .map(|(a, &b)| a - b as f64)
            .collect();
        let e = rel_frobenius(&upd, &ref_upd);
        // The update is a difference of two f32 values of size ~1: its own error is ~1 ulp(θ).
        assert!(e <= 2e-4, "tensor {i}: update rel error {e}");
        let e = rel_frobenius(&state.m[i], &r.m);
        assert!(e <= 1e-6, "tensor {i}: m rel error {e}");
        let e = rel_frobenius(&state.v[i], &r.v);
        assert!(e <= 1e-6, "tensor {i}: v rel error {e}");
    }
}

#[test]
fn matches_f64_reference_default_and_large_decay() {
    // torch defaults (wd 1e-2), a schedule-like varying lr.
    check_against_reference(AdamWConfig::default(), [1e-3, 5e-4, 2.5e-4], 1);
    // Large lr·λ, so decaying after the update instead of before would be caught; β1 small so
    // lerp takes its other branch (weight 1 − β1 ≥ 0.5).
    check_against_reference(
        AdamWConfig {
            lr: 0.1,
            betas: (0.3, 0.95),
            eps: 1e-6,
            weight_decay: 0.5,
        },
        [0.1, 0.2, 0.05],
        2,
    );
}

#[test]
fn first_step_moves_each_element_by_lr() {
    // Step 1: m̂ = g and v̂ = g², so the update is lr·g/(|g| + eps) ≈ lr·sign(g) (|g| ≫ eps),
    // after the decay θ·(1 − lr·λ). A step count starting at 0 would divide by zero.
    let config = AdamWConfig::default();
    let mut rng = SplitMix64::new(3);
    let theta0 = random(&mut rng, 64, 1.0);
    let g: Vec<f32> = random(&mut rng, 64, 1.0)
        .into_iter()
        .map(|x| if x.abs() < 1e-3 { 0.5 } else { x })
        .collect();
    let mut theta = theta0.clone();
    let mut opt = AdamW::new(config, &[64]);
    opt.step(&mut [&mut theta], &[&g], 1e-3);
    for i in 0..64 {
        let decayed = theta0[i] * (1.0 - 1e-3 * 1e-2);
        let want = decayed - 1e-3 * g[i].signum();
        assert!(
            (theta[i] - want).abs() < 2e-7,
            "{i}: {} vs {want}",
            theta[i]
        );
    }
    // Zero weight decay and zero gradient leave θ untouched.
    let mut opt = AdamW::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..config
        },
        &[64],
    );
    let mut same = theta0.clone();
    opt.step(&mut [&mut same], &[&[0.0; 64]], 1e-3);
    assert_eq!(same, theta0);
}

#[test]
fn state_round_trips_and_resumes_identically() {
    let config = AdamWConfig {
        lr: 2e-4,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let sizes = [5usize, 12];
    let names = vec!["a.weight".to_owned(), "b.weight".to_owned()];
    let mut rng = SplitMix64::new(4);
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..4)
        .map(|_| sizes.iter().map(|&n| random(&mut rng, n, 1.0)).collect())
        .collect();
    let run = |opt: &mut AdamW, params: &mut Vec<Vec<f32>>, g: &Vec<Vec<f32>>| {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        let g: Vec<&[f32]> = g.iter().map(Vec::as_slice).collect();
        opt.step(&mut p, &g, 2e-4);
    };
    let mut opt = AdamW::new(config, &sizes);
    run(&mut opt, &mut params, &grads[0]);
    run(&mut opt, &mut params, &grads[1]);

    let path = std::env::temp_dir().join(format!("lexp-adamw-{}.safetensors", std::process::id()));
    opt.save(&path, &names).unwrap();
    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.metadata()["step"], "2");
    assert_eq!(st.metadata()["weight_decay"], "0.1");
    assert_eq!(st.get("v.b.weight").unwrap().shape(), [12]);
    drop(st);
    let mut resumed = AdamW::load(&path, &names, &sizes).unwrap();
    assert_eq!(resumed, opt);

    // Continuing from the file gives bit-identical parameters.
    let mut p2 = params.clone();
    run(&mut opt, &mut params, &grads[2]);
    run(&mut opt, &mut params, &grads[3]);
    run(&mut resumed, &mut p2, &grads[2]);
    run(&mut resumed, &mut p2, &grads[3]);
    assert_eq!(params, p2);
    assert_eq!(resumed.step_count(), 4);

    // Validation: wrong size, missing name, extra tensor, mismatched state.
    let err = AdamW::load(&path, &names, &[5, 13])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `m.b.weight`: shape [12], expected [13]"),
        "{err}"
    );
    let err = AdamW::load(&path, &["a.weight".into(), "c".into()], &sizes).unwrap_err();
    assert!(
        matches!(err, OptimError::MissingTensor { ref tensor, .. } if tensor == "m.c"),
        "{err}"
    );
    let err = AdamW::load(&path, &names[..1], &sizes[..1]).unwrap_err();
    assert!(
        matches!(err, OptimError::UnexpectedTensor { ref tensor, .. } if tensor.ends_with("b.weight")),
        "{err}"
    );
    let mut state = opt.state().unwrap();
    state.v[1].pop();
    assert!(matches!(
        AdamW::from_state(config, state, &sizes),
        Err(OptimError::State { .. })
    ));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn config_validation() {
    assert!(AdamWConfig::default().validate().is_ok());
    for c in [
        AdamWConfig {
            lr: -1.0,
            ..AdamWConfig::default()
        },
        AdamWConfig {
            betas: (1.0, 0.999),
            ..AdamWConfig::default()
        },
        AdamWConfig {
            betas: (0.9, -0.1),
            ..AdamWConfig::default()
        },
        AdamWConfig {
            eps: f32::NAN,
            ..AdamWConfig::default()
        },
        AdamWConfig {
            weight_decay: -0.1,
            ..AdamWConfig::default()
        },
    ] {
        assert!(
            matches!(c.validate(), Err(OptimError::InvalidConfig { .. })),
            "{c:?}"
        );
    }
}

/// While the moments live on a device, nothing can read, save or update the stale host copy;
/// handing them back restores all three, and the step count follows the device's steps.
#[test]
fn device_moments_protocol() {
    let sizes = [3usize, 2];
    let mut opt = AdamW::new(AdamWConfig::default(), &sizes);
    let s1 = opt.kernel_scalars(1e-3);
    assert_eq!(s1.bias_correction1, (1.0 - 0.9f64) as f32);
    assert_eq!(s1.bias_correction2_sqrt, (1.0 - 0.999f64).sqrt() as f32);
    opt.record_device_step();
    assert!(opt.moments_on_device() && opt.moments().is_none());
    assert_eq!(opt.step_count(), 1);
    assert!(matches!(opt.state(), Err(OptimError::State { .. })));
    let dir = std::env::temp_dir().join(format!("lexp-adamw-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    let names = vec!["a".to_string(), "b".to_string()];
    assert!(opt.save(&path, &names).is_err());
    assert!(!path.exists());
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut p = [vec![0.0f32; 3], vec![0.0; 2]];
        let (a, b) = p.split_at_mut(1);
        let g = [vec![1.0f32; 3], vec![1.0; 2]];
        opt.clone()
            .step(&mut [&mut a[0], &mut b[0]], &[&g[0], &g[1]], 1e-3);
    }));
    assert!(caught.is_err());
    // Wrong sizes are refused and leave the flag set.
    assert!(opt
        .set_moments(vec![vec![0.0; 3]], vec![vec![0.0; 3]])
        .is_err());
    assert!(opt.moments_on_device());
    let (m, v) = (
        vec![vec![0.5f32; 3], vec![0.25; 2]],
        vec![vec![1.0f32; 3], vec![2.0; 2]],
    );
    opt.set_moments(m.clone(), v.clone()).unwrap();
    let st = opt.state().unwrap();
    assert_eq!((st.step, st.m, st.v), (1, m, v));
    opt.save(&path, &names).unwrap();
    let back = AdamW::load(&path, &names, &sizes).unwrap();
    assert_eq!(back.step_count(), 1);
    assert_eq!(
        opt.kernel_scalars(1e-3).bias_correction1,
        (1.0 - 0.9f64.powi(2)) as f32
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
