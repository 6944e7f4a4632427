//! The pure parts of [`super`]: the row-major to cuBLASLt argument mapping and its checks,
//! pointer alignments, plan keys, the missing-library message. The GEMMs
//! themselves are tested on a GPU in `tests/gpu_cublaslt.rs`.

use super::*;
use std::collections::HashSet;

fn dense(rows: usize, cols: usize) -> (MatLayout, usize) {
    (MatLayout::dense(rows, cols), rows * cols)
}

/// `y[M,N] = x[M,K]·W[N,K]ᵀ (+ bias, unless `kind` is `None`)` (a forward projection).
fn forward_args(m: usize, n: usize, k: usize, kind: EpilogueKind) -> BlasResult<LtArgs> {
    let (x, w, y) = (dense(m, k), dense(n, k), dense(m, n));
    lt_args(
        (&x.0, x.1),
        (&w.0, w.1),
        None,
        (&y.0, y.1),
        false,
        true,
        kind,
        (kind != EpilogueKind::None).then_some(n),
    )
}

#[test]
fn forward_projection_maps_to_transposed_weight_times_input() {
    // Row-major y[5,7] = x[5,3]·W[7,3]ᵀ is column-major yᵀ[7,5] = W(stored 3x7, read ᵀ)·xᵀ.
    let a = forward_args(5, 7, 3, EpilogueKind::Bias).unwrap();
    assert_eq!((a.transa, a.transb), (true, false));
    assert_eq!((a.m, a.n, a.k), (7, 5, 3));
    let l = |rows, cols, ld| LtLayout { rows, cols, ld };
    assert_eq!(a.a, l(3, 7, 3), "W's buffer: K rows of N columns, ld K");
    assert_eq!(a.b, l(3, 5, 3), "x's buffer: K rows of M columns, ld K");
    assert_eq!((a.c, a.d), (l(7, 5, 7), l(7, 5, 7)));
}

#[test]
fn backward_projection_maps_without_transposes() {
    // dx[6,9] = dy[6,4]·W[4,9]: column-major dxᵀ[9,6] = W(stored 9x4)·dyᵀ(stored 4x6).
    let (dy, w, dx) = (dense(6, 4), dense(4, 9), dense(6, 9));
    let a = lt_args(
        (&dy.0, dy.1),
        (&w.0, w.1),
        None,
        (&dx.0, dx.1),
        false,
        false,
        EpilogueKind::Bias,
        Some(9),
    )
    .unwrap();
    assert_eq!((a.transa, a.transb, a.m, a.n, a.k), (false, false, 9, 6, 4));
    let l = |rows, cols, ld| LtLayout { rows, cols, ld };
    assert_eq!((a.a, a.b, a.d), (l(9, 4, 9), l(4, 6, 4), l(9, 6, 9)));
    // A transposed row-major A: op(A) = Aᵀ with A stored [K, M].
    let (at, b, d) = (dense(4, 6), dense(4, 9), dense(6, 9));
    let t = lt_args(
        (&at.0, at.1),
        (&b.0, b.1),
        None,
        (&d.0, d.1),
        true,
        false,
        EpilogueKind::Bias,
        Some(9),
    )
    .unwrap();
    assert_eq!((t.transa, t.transb), (false, true));
    assert_eq!(
        t.b,
        l(6, 4, 6),
        "A's row-major [4, 6] buffer is column-major 6x4 (n×k, read transposed), ld 6"
    );
}

#[test]
fn residual_input_keeps_its_own_layout() {
    // C a column block of a wider buffer: its row stride is its own, D's stays dense.
    let (x, w, d) = (dense(5, 3), dense(7, 3), dense(5, 7));
    let c = MatLayout::at(2, 5, 7, 11);
    let a = lt_args(
        (&x.0, x.1),
        (&w.0, w.1),
        Some((&c, 2 + 4 * 11 + 7)),
        (&d.0, d.1),
        false,
        true,
        EpilogueKind::Bias,
        Some(7),
    )
    .unwrap();
    assert_eq!(
        a.c,
        LtLayout {
            rows: 7,
            cols: 5,
            ld: 11
        }
    );
    assert_eq!(
        a.d,
        LtLayout {
            rows: 7,
            cols: 5,
            ld: 7
        }
    );
    // One element short of the last row: refused.
    let short = lt_args(
        (&x.0, x.1),
        (&w.0, w.1),
        Some((&c, 2 + 4 * 11 + 6)),
        (&d.0, d.1),
        false,
        true,
        EpilogueKind::Bias,
        Some(7),
    );
    assert!(matches!(short, Err(BlasError::Shape(_))), "{short:?}");
}

#[test]
fn bad_arguments_are_refused_naming_the_problem() {
    let (x, w, d) = (dense(5, 3), dense(7, 3), dense(5, 7));
    let call = |c: Option<(&MatLayout, usize)>, kind, extra| {
        lt_args(
            (&x.0, x.1),
            (&w.0, w.1),
            c,
            (&d.0, d.1),
            false,
            true,
            kind,
            Some(extra),
        )
        .unwrap_err()
        .to_string()
    };
    let e = call(None, EpilogueKind::Bias, 5);
    assert!(
        e.contains("bias has 5 elements but `d` has 7 columns"),
        "{e}"
    );
    let e = call(None, EpilogueKind::ReluBias, 0);
    assert!(
        e.contains("relu(bias) epilogue: the bias has 0 elements"),
        "{e}"
    );
    let wrong_c = MatLayout::dense(7, 5);
    let e = call(Some((&wrong_c, 35)), EpilogueKind::Bias, 7);
    assert!(e.contains("`c` is 7x5 but `d` is 5x7"), "{e}");
    // Inner dimensions that differ are refused by the shared GEMM checks.
    let w4 = dense(7, 4);
    let e = lt_args(
        (&x.0, x.1),
        (&w4.0, w4.1),
        None,
        (&d.0, d.1),
        false,
        true,
        EpilogueKind::Bias,
        Some(7),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("inner dims differ"), "{e}");
}

#[test]
fn alignment_is_the_power_of_two_divisor_up_to_256() {
    for (ptr, a) in [
        (0u64, 256),
        (0x7f00_0000_0000, 256),
        (0x7f00_0000_0100, 256),
        (0x7f00_0000_0080, 128),
        (0x7f00_0000_0010, 16),
        (0x7f00_0000_0006, 2),
        (0x7f00_0000_0001, 1),
    ] {
        assert_eq!(alignment(ptr), a, "{ptr:#x}");
    }
}

#[test]
fn plan_keys_separate_shapes_epilogues_and_alignments_only() {
    let key = |m, n, k, kind, align| PlanKey {
        args: forward_args(m, n, k, kind).unwrap(),
        ab: Storage::BF16,
        cd: Storage::BF16,
        epilogue: kind,
        align,
    };
    let base = key(5, 7, 3, EpilogueKind::Bias, [256; 5]);
    // The same call again (other buffers of the same alignment) finds the same plan.
    assert_eq!(base, key(5, 7, 3, EpilogueKind::Bias, [256; 5]));
    let mut others = vec![
        key(6, 7, 3, EpilogueKind::Bias, [256; 5]),
        key(5, 8, 3, EpilogueKind::Bias, [256; 5]),
        key(5, 7, 4, EpilogueKind::Bias, [256; 5]),
        key(5, 7, 3, EpilogueKind::ReluBias, [256; 5]),
        key(5, 7, 3, EpilogueKind::Bias, [256, 256, 256, 16, 256]),
        key(5, 7, 3, EpilogueKind::Bias, [256, 256, 256, 256, 2]),
        PlanKey {
            cd: Storage::F32,
            ..base
        },
    ];
    others.push(base);
    let distinct: HashSet<PlanKey> = others.iter().copied().collect();
    assert_eq!(distinct.len(), others.len());
    assert!(distinct.contains(&key(5, 7, 3, EpilogueKind::Bias, [256; 5])));
}

#[test]
fn epilogues_have_cublaslt_header_values() {
    // cublasLt.h: BIAS = 4, RELU_BIAS = RELU | BIAS = 6.
    let v = |k: EpilogueKind| k.sys() as u32;
    assert_eq!(v(EpilogueKind::Bias), 4);
    assert_eq!(v(EpilogueKind::ReluBias), 6);
}

#[test]
fn missing_library_message_says_how_to_fix_it() {
    let m = missing_lt_message(Some("Unable to dynamically load"));
    assert!(m.contains("libcublasLt could not be loaded"), "{m}");
    assert!(m.contains("LD_LIBRARY_PATH"), "{m}");
    assert!(m.contains("Unable to dynamically load"), "{m}");
    assert!(m.contains("libcublasLt ships next to libcublas"), "{m}");
}

#[test]
fn a_plain_gemm_takes_no_bias() {
    // Epilogue::None: the same mapping, no bias to check.
    let a = forward_args(5, 7, 3, EpilogueKind::None).unwrap();
    assert_eq!(a, forward_args(5, 7, 3, EpilogueKind::Bias).unwrap());
    assert_eq!(EpilogueKind::None.name(), "none");
}
