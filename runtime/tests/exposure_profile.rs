//! The exposer's profiling half (DESIGN.md §7, MLP step 1): block statistics against a naive
//! implementation of the recipe's definitions, balanced clustering (valid, balanced, and
//! recovering planted co-activation groups), and an opt-tiny smoke run of the profiler library
//! that `lexp profile` calls.

use lexp_runtime::data::SplitMix64;
use lexp_runtime::exposure::cluster::{balanced_kmeans, cluster_order, DEFAULT_ITERS};
use lexp_runtime::exposure::coactivation::Coactivation;
use lexp_runtime::exposure::profiler::{profile, write_report, ProfileEvent, ProfileOptions};
use lexp_runtime::exposure::stats::{zero_fraction, BlockAccumulator};

mod common;

fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Non-negative activations, `density` of them positive.
fn sparse_acts(rows: usize, ffn: usize, density: f64, rng: &mut SplitMix64) -> Vec<f32> {
    (0..rows * ffn)
        .map(|_| {
            if unit(rng) < density {
                (unit(rng) * 3.0) as f32 + 1e-3
            } else {
                0.0
            }
        })
        .collect()
}

/// The recipe's `block_stats` transcribed literally (permute columns, reshape, `(cum < q).sum()
/// + 1` with the `+1e-9` guard) for one batch, plus the batch union; all in f64.
struct Naive {
    any: f64,
    m: [f64; 2],
    tiles: Vec<f64>,
    union: f64,
}

fn naive(
    act: &[f32],
    rows: usize,
    ffn: usize,
    block: usize,
    perm: &[usize],
    tiles: &[usize],
) -> Naive {
    let nb = ffn / block;
    let p: Vec<Vec<f64>> = (0..rows)
        .map(|t| perm.iter().map(|&o| act[t * ffn + o] as f64).collect())
        .collect();
    let act_tb: Vec<Vec<bool>> = p
        .iter()
        .map(|r| {
            r.chunks(block)
                .map(|b| b.iter().any(|&v| v > 0.0))
                .collect()
        })
        .collect();
    let any = act_tb.iter().flatten().filter(|&&a| a).count() as f64 / (rows * nb) as f64;
    let mut m = [0.0; 2];
    for (qi, q) in [0.99, 0.999].iter().enumerate() {
        let mut s = 0.0;
        for r in &p {
            let mut mass: Vec<f64> = r.chunks(block).map(|b| b.iter().sum()).collect();
            let tot: f64 = mass.iter().sum::<f64>() + 1e-9;
            mass.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let mut cum = 0.0;
            let mut below = 0;
            for v in &mass {
                cum += v;
                if cum / tot < *q {
                    below += 1;
                }
            }
            s += (below + 1) as f64 / nb as f64;
        }
        m[qi] = s / rows as f64;
    }
    let tiles = tiles
        .iter()
        .map(|&tt| {
            let (mut n, mut a) = (0, 0);
            for run in act_tb.chunks(tt) {
                for b in 0..nb {
                    n += 1;
                    a += run.iter().any(|token| token[b]) as usize;
                }
            }
            a as f64 / n as f64
        })
        .collect();
    let union = (0..nb).filter(|&b| (0..rows).any(|t| act_tb[t][b])).count() as f64 / nb as f64;
    Naive {
        any,
        m,
        tiles,
        union,
    }
}

#[test]
fn block_stats_match_a_naive_transcription_of_the_recipe() {
    let (ffn, block) = (96, 16);
    let mut rng = SplitMix64::new(21);
    let mut perm: Vec<usize> = (0..ffn).collect();
    rng.shuffle(&mut perm);
    let identity: Vec<usize> = (0..ffn).collect();
    for order in [&identity, &perm] {
        let tiles = [16, 64];
        let mut acc = BlockAccumulator::new(ffn, block, Some(order), &tiles).unwrap();
        // Two batches of different length (the second ends in partial tiles), different density.
        let batches = [(80, 0.04), (45, 0.15)];
        let mut want_any = 0.0;
        let mut want_tiles = [0.0; 2];
        let mut tile_counts = [0.0; 2];
        let mut want_union = 0.0;
        for (rows, density) in batches {
            let act = sparse_acts(rows, ffn, density, &mut rng);
            acc.add(&act, rows).unwrap();
            let n = naive(&act, rows, ffn, block, order, &tiles);
            want_any += n.any * rows as f64;
            for (k, &tt) in tiles.iter().enumerate() {
                let count = rows.div_ceil(tt) as f64;
                want_tiles[k] += n.tiles[k] * count;
                tile_counts[k] += count;
            }
            want_union += n.union / 2.0;
            assert!(
                (zero_fraction(&act)
                    - act.iter().filter(|&&v| v == 0.0).count() as f64 / act.len() as f64)
                    .abs()
                    < 1e-12
            );
        }
        let got = acc.finish();
        assert_eq!(got.tokens, 125);
        let close =
            |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-9, "{what}: {a} vs {b}");
        close(got.any, want_any / 125.0, "any");
        close(got.tiles[0].1, want_tiles[0] / tile_counts[0], "tile16");
        close(got.tiles[1].1, want_tiles[1] / tile_counts[1], "tile64");
        close(got.batch_union, want_union, "batch union");
        assert!(
            got.any > 0.3 && got.any < 0.95,
            "a non-trivial test needs partial activity: {}",
            got.any
        );
    }
    // Mass statistics, on rows that all have mass (for a zero-mass token the recipe's guard
    // counts nb + 1 blocks and we count 0): equal to the recipe's definition.
    let rows = 70;
    let mut act = sparse_acts(rows, ffn, 0.2, &mut rng);
    for t in 0..rows {
        act[t * ffn + (t * 7) % ffn] = 0.5; // every token has some mass
    }
    let mut acc = BlockAccumulator::new(ffn, block, Some(&perm), &[16]).unwrap();
    acc.add(&act, rows).unwrap();
    let got = acc.finish();
    let n = naive(&act, rows, ffn, block, &perm, &[16]);
    assert!(
        (got.m99 - n.m[0]).abs() < 1e-9,
        "m99 {} vs {}",
        got.m99,
        n.m[0]
    );
    assert!(
        (got.m999 - n.m[1]).abs() < 1e-9,
        "m999 {} vs {}",
        got.m999,
        n.m[1]
    );
    assert!(got.m99 < got.m999 + 1e-12 && got.m99 > 0.2 && got.m99 < got.any);
}

/// Planted structure: 12 hidden groups of 8 neurons (scattered over the 96 indices) that fire
/// together; each token switches on 1–3 groups, plus rare noise.
#[test]
fn clustering_is_balanced_and_recovers_planted_groups() {
    let (ffn, block, groups) = (96, 8, 12);
    let mut rng = SplitMix64::new(5);
    let mut scatter: Vec<usize> = (0..ffn).collect();
    rng.shuffle(&mut scatter);
    let group_of: Vec<usize> = {
        let mut g = vec![0; ffn];
        for (pos, &n) in scatter.iter().enumerate() {
            g[n] = pos / block;
        }
        g
    };
    let rows = 3000;
    let mut act = vec![0.0f32; rows * ffn];
    for t in 0..rows {
        let on: Vec<usize> = (0..1 + rng.below(3) as usize)
            .map(|_| rng.below(groups as u64) as usize)
            .collect();
        for n in 0..ffn {
            let fire = if on.contains(&group_of[n]) {
                unit(&mut rng) < 0.85
            } else {
                unit(&mut rng) < 0.02
            };
            if fire {
                act[t * ffn + n] = 1.0 + unit(&mut rng) as f32;
            }
        }
    }
    let mut co = Coactivation::new(ffn);
    co.add(&act[..1000 * ffn], 1000).unwrap();
    co.add(&act[1000 * ffn..], rows - 1000).unwrap();
    let assign = balanced_kmeans(&co.cosine(), ffn, block, DEFAULT_ITERS, 1).unwrap();
    // Balanced: every cluster exactly `block` neurons; the order is a permutation.
    let mut sizes = vec![0; ffn / block];
    for &c in &assign {
        sizes[c] += 1;
    }
    assert!(sizes.iter().all(|&s| s == block), "{sizes:?}");
    let order = cluster_order(&assign);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..ffn).collect::<Vec<_>>());
    // Every cluster is one planted group, for most seeds; k-means from random centroids can
    // settle in a local optimum (two initial centroids in one group), which still leaves most
    // groups intact.
    let mut full = 0;
    for seed in 0..12 {
        let a = balanced_kmeans(&co.cosine(), ffn, block, DEFAULT_ITERS, seed).unwrap();
        let pure = cluster_order(&a)
            .chunks(block)
            .filter(|c| c.iter().all(|&n| group_of[n] == group_of[c[0]]))
            .count();
        assert!(
            pure >= groups - 2,
            "seed {seed}: only {pure} of {groups} clusters pure"
        );
        full += (pure == groups) as usize;
    }
    assert!(full >= 9, "only {full} of 12 seeds recover every group");
    // And the block statistics see it: far fewer active blocks than in the scattered order.
    let nat = lexp_runtime::exposure::stats::block_stats(&act, rows, ffn, block, None).unwrap();
    let clu =
        lexp_runtime::exposure::stats::block_stats(&act, rows, ffn, block, Some(&order)).unwrap();
    assert!(clu.any < 0.5 * nat.any, "{} vs {}", clu.any, nat.any);
    // Errors: block not dividing ffn, wrong matrix size.
    assert!(balanced_kmeans(&co.cosine(), ffn, 7, 3, 0).is_err());
    assert!(balanced_kmeans(&[0.0; 10], ffn, 8, 3, 0).is_err());
}

#[test]
fn profile_smoke_on_opt_tiny() {
    skip_without_shared!();
    let shared = common::shared_dir();
    let mut opts = ProfileOptions::new(
        shared.join("fixtures/opt-tiny"),
        shared.join("data/corpus/valid.txt"),
    );
    opts.windows = 8;
    opts.seq = 256;
    opts.batch_windows = 2;
    opts.blocks = vec![32, 128];
    let mut batches = 0;
    let mut total = 0;
    let out = profile(&opts, &mut |e| match e {
        ProfileEvent::Start { batches: b } => total = b,
        ProfileEvent::Batch => batches += 1,
        ProfileEvent::Clustering { .. } => {}
    })
    .unwrap();
    assert_eq!((batches, total), (4, 4));
    let dir = std::env::temp_dir().join(format!("lexp-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("profile.json");
    write_report(&out.report, &path).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(j["format"], "lexp-profile/1");
    assert_eq!(j["model"]["layers"], 4);
    assert_eq!(j["model"]["ffn"], 768);
    assert_eq!(j["data"]["fit_tokens"], 4 * 256);
    assert_eq!(j["data"]["report_tokens"], 4 * 256);
    for key in [
        "any",
        "m99",
        "m999",
        "tiles",
        "batch_union",
        "zero_fraction",
        "protocol",
    ] {
        assert!(j["definitions"][key].is_string(), "definition of {key}");
    }
    let layers = j["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for l in layers {
        let z = l["zero_fraction"].as_f64().unwrap();
        assert!(z > 0.3 && z < 1.0, "zero fraction {z}");
        let blocks = l["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 2);
        for b in blocks {
            let (n, c) = (&b["natural"], &b["clustered"]);
            assert_eq!(n["tokens"], 1024);
            for k in ["any", "m99", "m999", "batch_union"] {
                let (nv, cv) = (n[k].as_f64().unwrap(), c[k].as_f64().unwrap());
                assert!(
                    (0.0..=1.0).contains(&nv) && (0.0..=1.0).contains(&cv),
                    "{k}"
                );
            }
            // The clustering, fitted on the other half, concentrates activity and mass.
            assert!(c["any"].as_f64().unwrap() <= n["any"].as_f64().unwrap() + 1e-12);
            assert!(c["m99"].as_f64().unwrap() <= n["m99"].as_f64().unwrap() + 1e-12);
            assert_eq!(c["tiles"].as_array().unwrap().len(), 2);
        }
    }
    // The clustered order helps somewhere at 32-neuron blocks (layers 1..3 are ~90% sparse).
    let b32 = &layers[1]["blocks"][0];
    assert!(
        b32["clustered"]["any"].as_f64().unwrap() < b32["natural"]["any"].as_f64().unwrap() - 0.05
    );
    assert_eq!(out.permutations.len(), 2);
    for (_, p) in &out.permutations {
        p.validate().unwrap();
        assert!(!p.is_identity());
    }
    std::fs::remove_dir_all(&dir).ok();
}
