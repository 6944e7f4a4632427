//! Micro benchmarks of the CPU ops at OPT-125m-like shapes, ignored by default; run with
//! `cargo test -p lexp-runtime --release --lib cpu:: -- --ignored --nocapture`.

use std::sync::Mutex;
use std::time::Instant;

use super::rand_vec;
use crate::cpu::{attention_bwd, attention_fwd, lm_head_xent, matmul};
use crate::data::SplitMix64;

/// Held by each benchmark, so that the test harness's threads do not run them concurrently.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Best wall time of `reps` runs of `f` after one warm-up run, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The GEMM behind every linear layer (an FFN shape of a 2048-token batch).
#[test]
#[ignore = "micro benchmark: seconds of CPU work in release, asserts nothing; run with --ignored --release --nocapture"]
fn bench_matmul() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (m, k, n) = (2048, 384, 1536);
    let mut rng = SplitMix64::new(6);
    let a = rand_vec(&mut rng, m * k);
    let b = rand_vec(&mut rng, k * n);
    let mut out = vec![0.0f32; m * n];
    let flops = 2.0 * (m * k * n) as f64;
    for (ta, tb) in [(false, false), (false, true), (true, false)] {
        let best = best_of(5, || matmul(&mut out, &a, &b, m, k, n, ta, tb, 1.0, 0.0));
        println!(
            "matmul {m}x{k}x{n} ta={ta} tb={tb}: {:.2} ms, {:.1} GFLOP/s ({} rayon threads)",
            best * 1e3,
            flops / best / 1e9,
            rayon::current_num_threads()
        );
    }
}

/// Attention forward and backward over a packed batch: 2048 tokens in segments of 1024, 512,
/// 512, 12 heads of 64 (FLOPs counted for the causal half of each score matrix).
#[test]
#[ignore = "micro benchmark: seconds of CPU work in release, asserts nothing; run with --ignored --release --nocapture"]
fn bench_attention() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (nh, hd) = (12, 64);
    let cu = [0, 1024, 1536, 2048];
    let t = 2048;
    let mut rng = SplitMix64::new(7);
    let [q, k, v, d_o] = [(); 4].map(|_| rand_vec(&mut rng, t * nh * hd));
    let causal: f64 = cu
        .windows(2)
        .map(|w| ((w[1] - w[0]) as f64).powi(2) / 2.0)
        .sum();
    // Forward: S and P·V; backward: S, dV, dP, dQ, dK.
    let flops_fwd = 2.0 * 2.0 * causal * (nh * hd) as f64;
    let mut fwd = None;
    let tf = best_of(3, || {
        fwd = Some(attention_fwd(&q, &k, &v, &cu, nh, hd).unwrap())
    });
    let (o, saved) = fwd.unwrap();
    let tb = best_of(3, || {
        attention_bwd(&q, &k, &v, &o, &d_o, &saved, &cu, nh, hd).unwrap();
    });
    println!(
        "attention T={t} nh={nh} hd={hd} segments {cu:?}: fwd {:.1} ms ({:.1} GFLOP/s), bwd {:.1} ms ({:.1} GFLOP/s)",
        tf * 1e3,
        flops_fwd / tf / 1e9,
        tb * 1e3,
        2.5 * flops_fwd / tb / 1e9
    );
}

/// The fused LM head + cross-entropy with its gradient at the OPT vocabulary.
#[test]
#[ignore = "micro benchmark: seconds of CPU work in release, asserts nothing; run with --ignored --release --nocapture"]
fn bench_lm_head_xent() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (rows, e, vocab) = (512, 768, 50272);
    let mut rng = SplitMix64::new(8);
    let h = rand_vec(&mut rng, rows * e);
    let emb: Vec<f32> = rand_vec(&mut rng, vocab * e)
        .iter()
        .map(|x| 0.05 * x)
        .collect();
    let targets: Vec<i32> = (0..rows).map(|_| rng.below(vocab as u64) as i32).collect();
    let flops = 2.0 * 2.0 * (rows * e * vocab) as f64;
    for chunk in [64, 128, 256] {
        let t = best_of(2, || {
            lm_head_xent(
                &h,
                rows,
                e,
                &emb,
                vocab,
                &targets,
                Some(1.0 / rows as f32),
                chunk,
            )
            .unwrap();
        });
        println!(
            "lm_head_xent rows={rows} e={e} vocab={vocab} chunk={chunk}: {:.1} ms ({:.1} GFLOP/s incl. softmax)",
            t * 1e3,
            flops / t / 1e9
        );
    }
}
