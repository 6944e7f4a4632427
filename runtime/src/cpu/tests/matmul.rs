//! `matmul`, `linear`, `col_sum` against naive f64 loops.

use super::{assert_close, naive_matmul, rand_vec};
use crate::cpu::{col_sum, linear, matmul};
use crate::data::SplitMix64;

/// Stored shape sizes of `a` and `b` do not depend on the transpose flags (only the layout).
fn check_case(rng: &mut SplitMix64, m: usize, k: usize, n: usize, alpha: f32, beta: f32) {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = rand_vec(rng, m * k);
        let b = rand_vec(rng, k * n);
        let c = if beta == 0.0 {
            vec![f32::NAN; m * n]
        } else {
            rand_vec(rng, m * n)
        };
        let want = naive_matmul(&a, &b, &c, m, k, n, ta, tb, alpha as f64, beta as f64);
        let mut out = c.clone();
        matmul(&mut out, &a, &b, m, k, n, ta, tb, alpha, beta);
        assert_close(
            &format!("matmul {m}x{k}x{n} ta={ta} tb={tb} α={alpha} β={beta}"),
            &out,
            &want,
            1e-5,
        );
    }
}

#[test]
fn matmul_matches_naive_all_transposes() {
    let mut rng = SplitMix64::new(1);
    check_case(&mut rng, 37, 53, 29, 0.75, -1.25);
    check_case(&mut rng, 37, 53, 29, 1.0, 1.0);
    // beta = 0 must ignore the NaN-filled output.
    check_case(&mut rng, 37, 53, 29, -0.5, 0.0);
    // Degenerate and tiny shapes (gemm's small-matrix kernels).
    check_case(&mut rng, 1, 1, 1, 2.0, 0.5);
    check_case(&mut rng, 3, 1, 5, 1.0, 0.0);
    check_case(&mut rng, 1, 17, 1, 1.0, 0.0);
}

#[test]
fn matmul_parallel_path_matches_naive() {
    // m·k·n above the threshold: the rayon path of gemm (when the pool has > 1 thread).
    let mut rng = SplitMix64::new(2);
    check_case(&mut rng, 131, 67, 93, 0.5, 2.0);
    check_case(&mut rng, 131, 67, 93, 1.0, 0.0);
}

#[test]
fn matmul_k_zero_and_alpha_zero_only_scale_out() {
    let mut rng = SplitMix64::new(3);
    let c = rand_vec(&mut rng, 4 * 5);
    let mut out = c.clone();
    matmul(&mut out, &[], &[], 4, 0, 5, false, false, 1.0, 0.5);
    assert_eq!(out, c.iter().map(|v| v * 0.5).collect::<Vec<_>>());
    let mut out = vec![f32::NAN; 20];
    matmul(&mut out, &[], &[], 4, 0, 5, false, true, 1.0, 0.0);
    assert_eq!(out, vec![0.0; 20]);
    // alpha = 0: inf in the inputs must not leak into out as NaN.
    let a = vec![f32::INFINITY; 4 * 3];
    let b = vec![0.0; 3 * 5];
    let mut out = c.clone();
    matmul(&mut out, &a, &b, 4, 3, 5, false, false, 0.0, -2.0);
    assert_eq!(out, c.iter().map(|v| v * -2.0).collect::<Vec<_>>());
}

#[test]
#[should_panic(expected = "matmul: b has")]
fn matmul_panics_on_length_mismatch() {
    let mut out = vec![0.0; 6];
    matmul(
        &mut out, &[0.0; 6], &[0.0; 5], 2, 3, 3, false, false, 1.0, 0.0,
    );
}

#[test]
fn linear_matches_naive() {
    let mut rng = SplitMix64::new(4);
    let (rows, in_f, out_f) = (19, 33, 27);
    let x = rand_vec(&mut rng, rows * in_f);
    let w = rand_vec(&mut rng, out_f * in_f);
    let bias = rand_vec(&mut rng, out_f);
    let no_bias = naive_matmul(&x, &w, &[], rows, in_f, out_f, false, true, 1.0, 0.0);
    assert_close(
        "linear without bias",
        &linear(&x, rows, &w, out_f, in_f, None),
        &no_bias,
        1e-5,
    );
    let with_bias: Vec<f64> = no_bias
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % out_f] as f64)
        .collect();
    assert_close(
        "linear with bias",
        &linear(&x, rows, &w, out_f, in_f, Some(&bias)),
        &with_bias,
        1e-5,
    );
}

#[test]
fn col_sum_matches_naive() {
    let mut rng = SplitMix64::new(5);
    // Small (serial) and large (parallel fold/reduce) cases.
    for (rows, cols) in [(7, 13), (700, 71)] {
        let x = rand_vec(&mut rng, rows * cols);
        let want: Vec<f64> = (0..cols)
            .map(|j| (0..rows).map(|i| x[i * cols + j] as f64).sum())
            .collect();
        assert_close(
            &format!("col_sum {rows}x{cols}"),
            &col_sum(&x, rows, cols),
            &want,
            1e-6,
        );
    }
    assert!(col_sum(&[], 5, 0).is_empty());
    assert_eq!(col_sum(&[], 0, 3), vec![0.0; 3]);
}
