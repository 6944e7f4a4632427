//! The CPU attention restricted to kept key blocks (`cpu::attention_fwd_masked` /
//! `attention_bwd_masked` with an `AttentionMask`), against a naive f64 attention whose
//! visibility is `AttentionMask::visible` and nothing else: forward outputs and logsumexps,
//! the backward against the naive f64 gradients and against central differences of the naive
//! forward. Packed sequences of uneven lengths, several heads, random masks of several block
//! shapes (smaller than, equal to and larger than the CPU's 128-row query tiles).

use lexp_runtime::cpu::{
    attention_bwd, attention_bwd_masked, attention_fwd, attention_fwd_masked, CpuError,
};
use lexp_runtime::data::SplitMix64;
use lexp_runtime::model::AttentionMask;

/// `n` values uniform in [-1, 1), times `scale`.
fn rand_vec(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32 * scale)
        .collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Asserts `max |got − want| ≤ tol · max |want|` and no NaN.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |a, &w| a.max(w.abs())).max(1e-30);
    let mut worst = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: {g} at {i}");
        let e = (f64::from(g) - w).abs();
        if e > worst.0 {
            worst = (e, i);
        }
    }
    assert!(
        worst.0 <= tol * scale,
        "{what}: error {:e} at {} (got {}, want {}) over {tol:e} × {scale:e}",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

/// A batch: packed sequence offsets, heads, head width, and random q (peaked softmaxes),
/// k, v and output gradient.
struct Case {
    cu: Vec<i32>,
    nh: usize,
    hd: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

fn case(lens: &[usize], nh: usize, hd: usize, seed: u64) -> Case {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    let n = *cu.last().unwrap() as usize * nh * hd;
    let mut rng = SplitMix64::new(seed);
    Case {
        cu,
        nh,
        hd,
        q: rand_vec(&mut rng, n, 1.5),
        k: rand_vec(&mut rng, n, 1.0),
        v: rand_vec(&mut rng, n, 1.0),
        d_o: rand_vec(&mut rng, n, 1.0),
    }
}

/// Per (sequence, head, query): the visible keys (absolute token indices) and their
/// probabilities, in f64, from `mask.visible` alone.
fn naive_probs(
    c: &Case,
    q: &[f64],
    k: &[f64],
    mask: &AttentionMask,
) -> Vec<(usize, usize, Vec<usize>, Vec<f64>)> {
    let (w, hd) = (c.nh * c.hd, c.hd);
    let mut out = vec![];
    for (s, seg) in c.cu.windows(2).enumerate() {
        let (s0, s1) = (seg[0] as usize, seg[1] as usize);
        for h in 0..c.nh {
            for i in s0..s1 {
                let keys: Vec<usize> = (s0..s1)
                    .filter(|&j| mask.visible(s, h, i - s0, j - s0))
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| dot(&q[i * w + h * hd..][..hd], &k[j * w + h * hd..][..hd]))
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                let p = scores.iter().map(|x| (x - mx).exp() / sum).collect();
                out.push((h, i, keys, p));
            }
        }
    }
    out
}

/// Naive masked attention: `(o, lse)`.
fn naive_fwd(
    c: &Case,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: &AttentionMask,
) -> (Vec<f64>, Vec<f64>) {
    let (w, hd) = (c.nh * c.hd, c.hd);
    let t = q.len() / w;
    let (mut o, mut lse) = (vec![0.0; t * w], vec![0.0; c.nh * t]);
    for (h, i, keys, p) in naive_probs(c, q, k, mask) {
        let scores: Vec<f64> = keys
            .iter()
            .map(|&j| dot(&q[i * w + h * hd..][..hd], &k[j * w + h * hd..][..hd]))
            .collect();
        let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        lse[h * t + i] = mx + scores.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        for (&j, &pj) in keys.iter().zip(&p) {
            for d in 0..hd {
                o[i * w + h * hd + d] += pj * v[j * w + h * hd + d];
            }
        }
    }
    (o, lse)
}

/// Naive masked attention gradients `(dq, dk, dv)` straight from the definition
/// (`D_i = Σ_j P_ij·dP_ij`, not from `o`).
fn naive_bwd(c: &Case, mask: &AttentionMask) -> [Vec<f64>; 3] {
    let (q, k, v, d_o) = (f64s(&c.q), f64s(&c.k), f64s(&c.v), f64s(&c.d_o));
    let (w, hd) = (c.nh * c.hd, c.hd);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; q.len()], vec![0.0; q.len()]);
    for (h, i, keys, p) in naive_probs(c, &q, &k, mask) {
        let row = |x: &[f64], j: usize| x[j * w + h * hd..][..hd].to_vec();
        let dp: Vec<f64> = keys
            .iter()
            .map(|&j| dot(&row(&d_o, i), &row(&v, j)))
            .collect();
        let di: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
        for ((&j, &pj), &dpj) in keys.iter().zip(&p).zip(&dp) {
            let ds = pj * (dpj - di);
            for d in 0..hd {
                let (a, b) = (i * w + h * hd + d, j * w + h * hd + d);
                dv[b] += pj * d_o[a];
                dq[a] += ds * k[b];
                dk[b] += ds * q[a];
            }
        }
    }
    [dq, dk, dv]
}

/// A random mask keeping each off-diagonal causal block with probability `keep_pct`%.
fn random_mask(
    c: &Case,
    q_block: usize,
    k_block: usize,
    keep_pct: u64,
    seed: u64,
) -> AttentionMask {
    let mut rng = SplitMix64::new(seed);
    AttentionMask::from_fn(&c.cu, c.nh, q_block, k_block, |_, _, _, _| {
        rng.below(100) < keep_pct
    })
}

#[test]
fn masked_attention_matches_naive_forward_and_backward() {
    // Sequences of 1, 200 and 333 tokens, 3 heads; block shapes below, at and above the CPU's
    // 128-row tiles, keys blocks smaller and larger than query blocks.
    let c = case(&[1, 200, 333], 3, 8, 7);
    let (q, k, v) = (f64s(&c.q), f64s(&c.k), f64s(&c.v));
    for (qb, kb, keep, seed) in [
        (128, 64, 50, 1),
        (8, 4, 40, 2),
        (16, 24, 60, 3),
        (200, 32, 30, 4),
        (64, 64, 0, 5),
    ] {
        let mask = random_mask(&c, qb, kb, keep, seed);
        mask.validate(&c.cu, c.nh).unwrap();
        assert!(
            mask.density() < 0.9,
            "({qb}, {kb}): density {}",
            mask.density()
        );
        let blocks = mask.key_blocks();
        let (o, saved) =
            attention_fwd_masked(&c.q, &c.k, &c.v, &c.cu, c.nh, c.hd, Some(&blocks)).unwrap();
        let (wo, wl) = naive_fwd(&c, &q, &k, &v, &mask);
        let what = format!("blocks ({qb}, {kb}) keeping {keep}%");
        assert_close(&format!("{what}: o"), &o, &wo, 1e-5);
        assert_close(&format!("{what}: lse"), &saved.lse, &wl, 1e-5);
        let (dq, dk, dv) = attention_bwd_masked(
            &c.q,
            &c.k,
            &c.v,
            &o,
            &c.d_o,
            &saved,
            &c.cu,
            c.nh,
            c.hd,
            Some(&blocks),
        )
        .unwrap();
        let [wq, wk, wv] = naive_bwd(&c, &mask);
        assert_close(&format!("{what}: dq"), &dq, &wq, 1e-4);
        assert_close(&format!("{what}: dk"), &dk, &wk, 1e-4);
        assert_close(&format!("{what}: dv"), &dv, &wv, 1e-4);
        // The masked function differs from dense attention.
        let (dense_o, _) = attention_fwd(&c.q, &c.k, &c.v, &c.cu, c.nh, c.hd).unwrap();
        assert!(
            o.iter().zip(&dense_o).any(|(a, b)| (a - b).abs() > 1e-3),
            "{what}"
        );
    }
}

#[test]
fn masked_backward_matches_finite_differences_of_the_naive_forward() {
    // Directional derivatives ⟨∇, δ⟩ against central differences of the f64 naive forward.
    let c = case(&[5, 40, 23], 2, 4, 11);
    let mask = random_mask(&c, 8, 4, 50, 12);
    let blocks = mask.key_blocks();
    let (o, saved) =
        attention_fwd_masked(&c.q, &c.k, &c.v, &c.cu, c.nh, c.hd, Some(&blocks)).unwrap();
    let (dq, dk, dv) = attention_bwd_masked(
        &c.q,
        &c.k,
        &c.v,
        &o,
        &c.d_o,
        &saved,
        &c.cu,
        c.nh,
        c.hd,
        Some(&blocks),
    )
    .unwrap();
    let (q, k, v, d_o) = (f64s(&c.q), f64s(&c.k), f64s(&c.v), f64s(&c.d_o));
    let mut rng = SplitMix64::new(13);
    for dir in 0..4 {
        let dirs: Vec<Vec<f64>> = (0..3)
            .map(|_| f64s(&rand_vec(&mut rng, q.len(), 1.0)))
            .collect();
        let at = |e: f64| {
            let shift =
                |x: &[f64], d: &[f64]| x.iter().zip(d).map(|(a, b)| a + e * b).collect::<Vec<_>>();
            let (qs, ks, vs) = (
                shift(&q, &dirs[0]),
                shift(&k, &dirs[1]),
                shift(&v, &dirs[2]),
            );
            dot(&d_o, &naive_fwd(&c, &qs, &ks, &vs, &mask).0)
        };
        let fd = (at(1e-5) - at(-1e-5)) / 2e-5;
        let an = dot(&f64s(&dq), &dirs[0]) + dot(&f64s(&dk), &dirs[1]) + dot(&f64s(&dv), &dirs[2]);
        assert!(
            (an - fd).abs() <= 1e-4 * fd.abs().max(1.0),
            "direction {dir}: analytic {an} vs finite differences {fd}"
        );
    }
}

#[test]
fn a_dense_mask_is_the_unmasked_attention() {
    let c = case(&[1, 200, 333], 3, 8, 17);
    let (o, saved) = attention_fwd(&c.q, &c.k, &c.v, &c.cu, c.nh, c.hd).unwrap();
    let grads = attention_bwd(&c.q, &c.k, &c.v, &o, &c.d_o, &saved, &c.cu, c.nh, c.hd).unwrap();
    for (qb, kb) in [(128, 64), (8, 4), (200, 32)] {
        let mask = AttentionMask::dense(&c.cu, c.nh, qb, kb);
        let blocks = mask.key_blocks();
        let (mo, ms) =
            attention_fwd_masked(&c.q, &c.k, &c.v, &c.cu, c.nh, c.hd, Some(&blocks)).unwrap();
        let mg = attention_bwd_masked(
            &c.q,
            &c.k,
            &c.v,
            &mo,
            &c.d_o,
            &ms,
            &c.cu,
            c.nh,
            c.hd,
            Some(&blocks),
        )
        .unwrap();
        if (qb, kb) == (128, 64) {
            // The same tiles as the unmasked path, every one dense: the same arithmetic.
            assert_eq!((&mo, &ms), (&o, &saved), "({qb}, {kb})");
            assert_eq!(mg, grads, "({qb}, {kb})");
        } else {
            for (what, got, want) in [
                ("o", &mo, &o),
                ("lse", &ms.lse, &saved.lse),
                ("dq", &mg.0, &grads.0),
                ("dk", &mg.1, &grads.1),
                ("dv", &mg.2, &grads.2),
            ] {
                assert_close(
                    &format!("dense ({qb}, {kb}) {what}"),
                    got,
                    &f64s(want),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn a_mask_that_does_not_fit_is_an_error() {
    let c = case(&[10, 30], 2, 4, 23);
    let run = |m: &AttentionMask| {
        attention_fwd_masked(&c.q, &c.k, &c.v, &c.cu, c.nh, c.hd, Some(&m.key_blocks())).map(|_| ())
    };
    // Made for other sequence lengths (one row too few).
    let other = AttentionMask::dense(&[0, 10, 20], 2, 8, 4);
    assert!(matches!(run(&other), Err(CpuError::KeyBlocks(_))));
    // A missing diagonal block.
    let mut m = AttentionMask::dense(&c.cu, 2, 8, 4);
    let r = m.row(1, 2, 1);
    let last = m.offsets[r + 1] - 1;
    m.keys.remove(last);
    for o in &mut m.offsets[r + 1..] {
        *o -= 1;
    }
    let e = run(&m).unwrap_err().to_string();
    assert!(
        e.contains("segment 1, query block 2, head 1") && e.contains("diagonal"),
        "{e}"
    );
    // A block past the causal range.
    let mut m = AttentionMask::dense(&c.cu, 2, 8, 4);
    let r = m.row(0, 0, 0);
    let at = m.offsets[r + 1];
    m.keys.insert(at, 9);
    for o in &mut m.offsets[r + 1..] {
        *o += 1;
    }
    let e = run(&m).unwrap_err().to_string();
    assert!(e.contains("causal"), "{e}");
}

/// Best wall time of `reps` runs of `f` after a warm-up, in milliseconds.
fn best_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "timing measurement: seconds of CPU work, timing-sensitive on a loaded machine; run with --ignored --release --nocapture"]
fn bench_masked_attention() {
    // The shapes of the CPU bench (cpu::tests::bench): 2048 tokens in segments of 1024, 512,
    // 512, 12 heads of 64; GPU block sizes.
    let c = case(&[1024, 512, 512], 12, 64, 31);
    let bench = |what: &str, mask: Option<&AttentionMask>| {
        let blocks = mask.map(AttentionMask::key_blocks);
        let mut fwd = None;
        let tf = best_ms(3, || {
            fwd = Some(
                attention_fwd_masked(&c.q, &c.k, &c.v, &c.cu, c.nh, c.hd, blocks.as_ref()).unwrap(),
            )
        });
        let (o, saved) = fwd.unwrap();
        let tb = best_ms(3, || {
            attention_bwd_masked(
                &c.q,
                &c.k,
                &c.v,
                &o,
                &c.d_o,
                &saved,
                &c.cu,
                c.nh,
                c.hd,
                blocks.as_ref(),
            )
            .unwrap();
        });
        let density = mask.map_or(1.0, AttentionMask::density);
        println!("{what:<28} density {density:.3}: fwd {tf:.1} ms, bwd {tb:.1} ms");
        (density, tf, tb)
    };
    let (_, full_f, full_b) = bench("unmasked", None);
    bench(
        "dense mask (128, 64)",
        Some(&AttentionMask::dense(&c.cu, c.nh, 128, 64)),
    );
    for keep in [50, 20] {
        let m = random_mask(&c, 128, 64, keep, 32);
        let (density, tf, tb) = bench(&format!("random {keep}% (128, 64)"), Some(&m));
        // A mask must skip work: well below half the blocks, both passes beat the dense ones.
        if density < 0.5 {
            assert!(
                tf < full_f && tb < full_b,
                "density {density:.3}: fwd {tf:.1} / bwd {tb:.1} ms against unmasked {full_f:.1} / {full_b:.1}"
            );
        }
    }
}
