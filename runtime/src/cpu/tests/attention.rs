//! Varlen causal attention against a naive f64 implementation, finite differences of it, and
//! segment isolation.

use super::{assert_close, f64s, fd_grad, rand_vec};
use crate::cpu::{attention_bwd, attention_fwd, CpuError};
use crate::data::SplitMix64;

/// Naive attention in f64: `(o [T, nh·hd], lse [nh, T])`.
fn naive_attn(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu: &[i32],
    nh: usize,
    hd: usize,
) -> (Vec<f64>, Vec<f64>) {
    let w = nh * hd;
    let t = q.len() / w;
    let mut o = vec![0.0; t * w];
    let mut lse = vec![0.0; nh * t];
    for seg in cu.windows(2) {
        let (s0, s1) = (seg[0] as usize, seg[1] as usize);
        for h in 0..nh {
            for i in s0..s1 {
                let scores: Vec<f64> = (s0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[i * w + h * hd + d] * k[j * w + h * hd + d])
                            .sum()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                lse[h * t + i] = mx + sum.ln();
                for (jj, s) in scores.iter().enumerate() {
                    let p = (s - mx).exp() / sum;
                    for d in 0..hd {
                        o[i * w + h * hd + d] += p * v[(s0 + jj) * w + h * hd + d];
                    }
                }
            }
        }
    }
    (o, lse)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

struct Case {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

fn case(seed: u64, t: usize, w: usize) -> Case {
    let mut rng = SplitMix64::new(seed);
    // q scaled by hd^-0.5-ish as OPT does, but large enough for peaked softmaxes.
    let q = rand_vec(&mut rng, t * w).iter().map(|x| x * 1.5).collect();
    Case {
        q,
        k: rand_vec(&mut rng, t * w),
        v: rand_vec(&mut rng, t * w),
        d_o: rand_vec(&mut rng, t * w),
    }
}

#[test]
fn attention_fwd_matches_naive() {
    // Uneven segments (1, 7, 12), an empty one, and long ones spanning several query blocks;
    // one long single-pair case so the inner products take gemm's rayon path.
    for (cu, nh, hd) in [
        (vec![0, 1, 8, 20], 2, 8),
        (vec![0, 0, 5, 5, 9], 3, 4),
        (vec![0, 3, 3, 140, 300], 2, 8),
        (vec![0, 270], 1, 16),
    ] {
        let t = *cu.last().unwrap() as usize;
        let c = case(20 + t as u64, t, nh * hd);
        let (o, saved) = attention_fwd(&c.q, &c.k, &c.v, &cu, nh, hd).unwrap();
        let (wo, wl) = naive_attn(&f64s(&c.q), &f64s(&c.k), &f64s(&c.v), &cu, nh, hd);
        assert_close(&format!("attention o {cu:?}"), &o, &wo, 1e-5);
        assert_close(&format!("attention lse {cu:?}"), &saved.lse, &wl, 1e-5);
    }
}

#[test]
fn attention_bwd_matches_finite_differences() {
    let (cu, nh, hd) = (vec![0, 1, 8, 20], 2, 8);
    let t = 20;
    let c = case(30, t, nh * hd);
    let (o, saved) = attention_fwd(&c.q, &c.k, &c.v, &cu, nh, hd).unwrap();
    let (dq, dk, dv) = attention_bwd(&c.q, &c.k, &c.v, &o, &c.d_o, &saved, &cu, nh, hd).unwrap();
    let (q, k, v, d_o) = (f64s(&c.q), f64s(&c.k), f64s(&c.v), f64s(&c.d_o));
    let f = |q: &[f64], k: &[f64], v: &[f64]| dot(&d_o, &naive_attn(q, k, v, &cu, nh, hd).0);
    assert_close("dq", &dq, &fd_grad(&q, 1e-5, |x| f(x, &k, &v)), 1e-3);
    assert_close("dk", &dk, &fd_grad(&k, 1e-5, |x| f(&q, x, &v)), 1e-3);
    assert_close("dv", &dv, &fd_grad(&v, 1e-5, |x| f(&q, &k, x)), 1e-3);
}

#[test]
fn attention_bwd_long_segments_directional_derivatives() {
    // Segments longer than a query block: compare ⟨∇, δ⟩ with a central difference of the
    // naive forward along random directions δ (cheaper than every coordinate).
    for (cu, nh, hd) in [(vec![0, 3, 3, 140, 300], 2, 8), (vec![0, 270], 1, 16)] {
        let t = *cu.last().unwrap() as usize;
        let w = nh * hd;
        let c = case(40 + t as u64, t, w);
        let (o, saved) = attention_fwd(&c.q, &c.k, &c.v, &cu, nh, hd).unwrap();
        let (dq, dk, dv) =
            attention_bwd(&c.q, &c.k, &c.v, &o, &c.d_o, &saved, &cu, nh, hd).unwrap();
        let (q, k, v, d_o) = (f64s(&c.q), f64s(&c.k), f64s(&c.v), f64s(&c.d_o));
        let mut rng = SplitMix64::new(41);
        for dir in 0..3 {
            let dirs: Vec<Vec<f64>> = (0..3).map(|_| f64s(&rand_vec(&mut rng, t * w))).collect();
            let at = |e: f64| {
                let shift = |x: &[f64], d: &[f64]| {
                    x.iter().zip(d).map(|(a, b)| a + e * b).collect::<Vec<_>>()
                };
                let (qs, ks, vs) = (
                    shift(&q, &dirs[0]),
                    shift(&k, &dirs[1]),
                    shift(&v, &dirs[2]),
                );
                dot(&d_o, &naive_attn(&qs, &ks, &vs, &cu, nh, hd).0)
            };
            let h = 1e-5;
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let an =
                dot(&f64s(&dq), &dirs[0]) + dot(&f64s(&dk), &dirs[1]) + dot(&f64s(&dv), &dirs[2]);
            assert!(
                (an - fd).abs() <= 1e-3 * fd.abs().max(1.0),
                "{cu:?} direction {dir}: analytic {an} vs fd {fd}"
            );
        }
    }
}

#[test]
fn attention_segments_are_isolated_and_causal() {
    let (cu, nh, hd) = (vec![0, 1, 8, 20], 2, 8);
    let w = nh * hd;
    let c = case(50, 20, w);
    let (o, _) = attention_fwd(&c.q, &c.k, &c.v, &cu, nh, hd).unwrap();
    // Perturb key and value of token 4 (segment 1 = tokens 1..8).
    let (mut k2, mut v2) = (c.k.clone(), c.v.clone());
    for d in 0..w {
        k2[4 * w + d] += 0.7;
        v2[4 * w + d] -= 0.9;
    }
    let (o2, _) = attention_fwd(&c.q, &k2, &v2, &cu, nh, hd).unwrap();
    for tok in 0..20 {
        let same = o[tok * w..(tok + 1) * w] == o2[tok * w..(tok + 1) * w];
        // Tokens before 4, and all of segments 0 and 2, must not see token 4.
        let should_change = (4..8).contains(&tok);
        assert_eq!(
            !same, should_change,
            "token {tok}: output changed = {}",
            !same
        );
    }
}

#[test]
fn attention_rejects_bad_cu_seqlens() {
    let (nh, hd) = (2, 4);
    let c = case(60, 10, nh * hd);
    let bad: [(&[i32], CpuError); 5] = [
        (&[], CpuError::CuSeqlensEmpty),
        (&[1, 10], CpuError::CuSeqlensStart { first: 1 }),
        (
            &[0, 6, 4, 10],
            CpuError::CuSeqlensDecreasing {
                index: 2,
                prev: 6,
                value: 4,
            },
        ),
        (
            &[0, 4, 9],
            CpuError::CuSeqlensEnd {
                last: 9,
                tokens: 10,
            },
        ),
        (
            &[0, 4, 11],
            CpuError::CuSeqlensEnd {
                last: 11,
                tokens: 10,
            },
        ),
    ];
    let (o, saved) = attention_fwd(&c.q, &c.k, &c.v, &[0, 4, 10], nh, hd).unwrap();
    for (cu, want) in bad {
        assert_eq!(
            attention_fwd(&c.q, &c.k, &c.v, cu, nh, hd).unwrap_err(),
            want,
            "fwd {cu:?}"
        );
        let err = attention_bwd(&c.q, &c.k, &c.v, &o, &c.d_o, &saved, cu, nh, hd).unwrap_err();
        assert_eq!(err, want, "bwd {cu:?}");
    }
    assert!(attention_fwd(&c.q, &c.k, &c.v, &[0, -1, 10], nh, hd)
        .unwrap_err()
        .to_string()
        .contains("decreases at index 1"));
    // A k of the wrong length is a shape error, not a panic.
    assert!(matches!(
        attention_fwd(&c.q, &c.k[1..], &c.v, &[0, 10], nh, hd),
        Err(CpuError::Shape { .. })
    ));
}
