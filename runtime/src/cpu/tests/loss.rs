//! The fused LM head + cross-entropy against a naive f64 loss and its finite differences.

use super::{assert_close, f64s, fd_grad, naive_matmul, rand_vec};
use crate::cpu::{lm_head_xent, logits, CpuError};
use crate::data::{SplitMix64, IGNORE_INDEX};

/// Naive `Σ_t ℓ_t` in f64 over rows with a valid target.
fn naive_loss(h: &[f64], rows: usize, e: usize, emb: &[f64], vocab: usize, targets: &[i32]) -> f64 {
    let mut total = 0.0;
    for r in 0..rows {
        if targets[r] == IGNORE_INDEX {
            continue;
        }
        let z: Vec<f64> = (0..vocab)
            .map(|v| (0..e).map(|d| h[r * e + d] * emb[v * e + d]).sum())
            .collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + z.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        total += lse - z[targets[r] as usize];
    }
    total
}

struct Case {
    h: Vec<f32>,
    emb: Vec<f32>,
    targets: Vec<i32>,
}

const ROWS: usize = 23;
const E: usize = 16;
const VOCAB: usize = 50;

fn case(seed: u64) -> Case {
    let mut rng = SplitMix64::new(seed);
    let h = rand_vec(&mut rng, ROWS * E)
        .iter()
        .map(|x| 2.0 * x)
        .collect();
    let emb = rand_vec(&mut rng, VOCAB * E);
    let targets = (0..ROWS)
        .map(|r| {
            if r % 4 == 1 || r == ROWS - 1 {
                IGNORE_INDEX
            } else {
                rng.below(VOCAB as u64) as i32
            }
        })
        .collect();
    Case { h, emb, targets }
}

#[test]
fn xent_loss_matches_naive_for_any_chunk() {
    let c = case(70);
    let want = naive_loss(&f64s(&c.h), ROWS, E, &f64s(&c.emb), VOCAB, &c.targets);
    let valid = c.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    for chunk in [0, 1, 4, 7, 256] {
        let out = lm_head_xent(&c.h, ROWS, E, &c.emb, VOCAB, &c.targets, None, chunk).unwrap();
        assert_eq!(out.count, valid);
        assert!(out.dh.is_none());
        assert!(
            (out.loss_sum - want).abs() <= 1e-5 * want.abs(),
            "chunk {chunk}: {} vs {want}",
            out.loss_sum
        );
    }
}

#[test]
fn xent_dh_matches_finite_differences() {
    let c = case(71);
    let s = 1.0 / 17.0;
    let out = lm_head_xent(&c.h, ROWS, E, &c.emb, VOCAB, &c.targets, Some(s), 4).unwrap();
    let dh = out.dh.unwrap();
    let emb = f64s(&c.emb);
    let want = fd_grad(&f64s(&c.h), 1e-5, |h| {
        s as f64 * naive_loss(h, ROWS, E, &emb, VOCAB, &c.targets)
    });
    assert_close("xent dh", &dh, &want, 1e-3);
    for (r, &t) in c.targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            assert!(
                dh[r * E..(r + 1) * E].iter().all(|&v| v == 0.0),
                "ignored row {r} has a gradient"
            );
        }
    }
}

#[test]
fn xent_all_ignored_is_empty() {
    let c = case(72);
    let out = lm_head_xent(
        &c.h,
        ROWS,
        E,
        &c.emb,
        VOCAB,
        &[IGNORE_INDEX; ROWS],
        Some(1.0),
        8,
    )
    .unwrap();
    assert_eq!((out.loss_sum, out.count), (0.0, 0));
    assert_eq!(out.dh.unwrap(), vec![0.0; ROWS * E]);
}

#[test]
fn xent_rejects_bad_targets() {
    let c = case(73);
    for (row, value) in [(3, VOCAB as i32), (5, -1), (0, -101), (22, i32::MAX)] {
        let mut targets = c.targets.clone();
        targets[row] = value;
        let err = lm_head_xent(&c.h, ROWS, E, &c.emb, VOCAB, &targets, Some(1.0), 4).unwrap_err();
        assert_eq!(
            err,
            CpuError::BadTarget {
                row,
                value,
                vocab: VOCAB
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("row {row}")) && msg.contains(&value.to_string()),
            "{msg}"
        );
    }
    let err = lm_head_xent(&c.h, ROWS, E, &c.emb, VOCAB, &c.targets[1..], None, 4).unwrap_err();
    assert!(matches!(err, CpuError::Shape { .. }));
}

#[test]
fn logits_match_naive() {
    let c = case(74);
    let want = naive_matmul(&c.h, &c.emb, &[], ROWS, E, VOCAB, false, true, 1.0, 0.0);
    assert_close("logits", &logits(&c.h, ROWS, E, &c.emb, VOCAB), &want, 1e-5);
}
