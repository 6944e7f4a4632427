//! The kernels of the GPU fine-tuning step (bias epilogues, embedding, causal softmax and its
//! backward, cross-entropy, AdamW), run in the interpreter (the GPU's numerics) against their
//! f64 CPU references in `lexp_kernels::reference`.
//!
//! As in `interp_vs_reference.rs`: the properties draw a seed and a shape, shapes are mostly
//! not multiples of the tiles (with the tile edges drawn one time in four), every storage type
//! runs for every case, and outputs are poisoned with [`POISON`] before the run (in-place
//! outputs start from their input data, which the kernel must overwrite everywhere it is
//! defined). Kernels with long-row loops are also run with their small tile configuration so
//! that the loops are exercised at shapes the interpreter runs quickly.
//!
//! Each property runs 12 cases; set `PROPTEST_CASES` to run more.

use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as kernels;
use lexp_kernels::reference::{self, compare, tolerance, POISON};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ops::Range;

const DTYPES: [Storage; 3] = [Storage::BF16, Storage::F16, Storage::F32];

/// Magnitude of the random data: uniform in `[-SCALE, SCALE]`.
const SCALE: f32 = 3.0;

fn config() -> ProptestConfig {
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default().cases,
        Err(_) => 12,
    };
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A size from `range`, or (one time in four) one of `edges`.
fn size(range: Range<usize>, edges: &'static [usize]) -> impl Strategy<Value = usize> {
    prop_oneof![3 => range, 1 => prop::sample::select(edges)]
}

/// Seeded random data for one test case.
struct Data(StdRng);

impl Data {
    fn new(seed: u64) -> Data {
        Data(StdRng::seed_from_u64(seed))
    }

    /// `n` values uniform in `[lo, hi]`.
    fn values(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.gen_range(lo..=hi)).collect()
    }

    /// A `dims` tensor of uniform values in `[-SCALE, SCALE]`, rounded to `dtype`.
    fn tensor(&mut self, dtype: Storage, dims: &[usize]) -> HostTensor {
        let v = self.values(dims.iter().product(), -SCALE, SCALE);
        HostTensor::new(dtype, dims, &v)
    }

    /// `n` indices in `lo..hi`.
    fn ints(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i32> {
        (0..n).map(|_| self.0.gen_range(lo..hi)).collect()
    }
}

/// An i32 tensor holding `v`.
fn int_tensor(v: &[i32]) -> HostTensor {
    let f: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    HostTensor::new(Storage::I32, &[v.len()], &f)
}

/// An output tensor filled with [`POISON`].
fn poisoned(dtype: Storage, dims: &[usize]) -> HostTensor {
    HostTensor::new(dtype, dims, &vec![POISON; dims.iter().product()])
}

/// Relative L2 tolerance for an output stored as `dtype` (see `interp_vs_reference.rs`): its
/// unit roundoff plus what f32 arithmetic costs.
fn out_tol(dtype: Storage) -> f64 {
    let f32_tol = tolerance(Storage::F32);
    match dtype {
        Storage::BF16 => 2f64.powi(-8) + f32_tol,
        Storage::F16 => 2f64.powi(-11) + f32_tol,
        _ => f32_tol,
    }
}

/// Runs a kernel's `interpret`, turning a launch error into a test failure.
fn run(what: &str, r: Result<(), LaunchError>) -> Result<(), TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
}

/// Every element written, finiteness agreeing everywhere, and a relative L2 error of at most
/// `rtol`, or else every error at most `rtol * floor` (for outputs that may all be near 0).
fn check_with(
    what: &str,
    got: &HostTensor,
    want: &[f32],
    rtol: f64,
    floor: f64,
) -> Result<(), TestCaseError> {
    let d = compare(&got.data, want);
    let close = d.rel_l2 <= rtol || d.max_abs <= rtol * floor;
    if d.non_finite == 0 && d.unwritten == 0 && close {
        return Ok(());
    }
    let first = got
        .data
        .iter()
        .zip(want)
        .position(|(g, w)| {
            g.is_finite() != w.is_finite()
                || g.to_bits() == POISON.to_bits()
                || (f64::from(*g) - f64::from(*w)).abs() > d.max_abs / 2.0
        })
        .map(|i| format!("; e.g. [{i}]: got {} want {}", got.data[i], want[i]))
        .unwrap_or_default();
    Err(TestCaseError::fail(format!(
        "{what}: {d} (tolerance {rtol:.1e}){first}"
    )))
}

/// [`check_with`] for an output stored as `got.dtype`, at its [`out_tol`].
fn check(what: &str, got: &HostTensor, want: &[f32]) -> Result<(), TestCaseError> {
    check_with(what, got, want, out_tol(got.dtype), 0.0)
}

const BR_EDGES: &[usize] = &[16, 17, 32];
const BC256_EDGES: &[usize] = &[255, 256, 257, 512];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn bias_add_and_relu(
        seed: u64,
        rows in size(1..40, BR_EDGES),
        cols in size(1..600, BC256_EDGES),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let x0 = data.tensor(dtype, &[rows, cols]);
            let mut bias = data.tensor(dtype, &[cols]);
            for relu in [false, true] {
                let what = format!("bias_{} {dtype:?} {rows}x{cols}", if relu { "relu" } else { "add" });
                let mut x = x0.clone();
                let r = if relu {
                    kernels::bias_relu::interpret(&[], kernels::bias_relu::HostArgs {
                        x: &mut x, bias: &mut bias,
                    })
                } else {
                    kernels::bias_add::interpret(&[], kernels::bias_add::HostArgs {
                        x: &mut x, bias: &mut bias,
                    })
                };
                run(&what, r)?;
                let want = if relu {
                    reference::bias_relu(&x0.data, rows, cols, &bias.data)
                } else {
                    reference::bias_add(&x0.data, rows, cols, &bias.data)
                };
                check(&what, &x, &want)?;
            }
        }
    }
}

/// In place means every element is rewritten: an input that already holds the answer's
/// complement (`-bias`) must come out exactly 0 everywhere, including the tile edges.
#[test]
fn bias_add_rewrites_every_element() {
    let (rows, cols) = (17, 257);
    let mut data = Data::new(1);
    for dtype in DTYPES {
        let mut bias = data.tensor(dtype, &[cols]);
        let neg: Vec<f32> = (0..rows * cols).map(|i| -bias.data[i % cols]).collect();
        let mut x = HostTensor::new(dtype, &[rows, cols], &neg);
        let r = kernels::bias_add::interpret(
            &[],
            kernels::bias_add::HostArgs {
                x: &mut x,
                bias: &mut bias,
            },
        );
        if let Err(e) = r {
            panic!("bias_add {dtype:?}: {e}");
        }
        assert!(x.data.iter().all(|v| *v == 0.0), "{dtype:?}");
    }
}

proptest! {
    #![proptest_config(config())]

    /// `convert`: every element of the f32 input rounded exactly as the storage type rounds
    /// (round to nearest even), every output element written.
    #[test]
    fn convert_rounds_to_the_storage_type(seed: u64, n in size(1..6000, &[2047, 2048, 2049])) {
        let mut data = Data::new(seed);
        let mut x = HostTensor::new(Storage::F32, &[n], &data.values(n, -SCALE, SCALE));
        for dtype in DTYPES {
            let what = format!("convert {dtype:?} {n}");
            let mut y = poisoned(dtype, &[n]);
            run(&what, kernels::convert::interpret(&[], kernels::convert::HostArgs { x: &mut x, y: &mut y }))?;
            for (i, (&g, &v)) in y.data.iter().zip(&x.data).enumerate() {
                let want = lexp_compiler::dtype::round_to(dtype.dtype(), v);
                prop_assert!(g.to_bits() == want.to_bits(), "{what}: [{i}] {v} -> {g}, want {want}");
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn embedding_fwd(
        seed: u64,
        rows in 1usize..40,
        hidden in size(1..2200, &[1023, 1024, 1025, 2048]),
        vocab in 1usize..50,
        positions in 1usize..30,
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut tok = data.tensor(dtype, &[vocab, hidden]);
            let mut pos = data.tensor(dtype, &[positions + 2, hidden]);
            // Every valid id, including the last row and OPT's padding position -1 (row 1).
            let id = data.ints(rows, 0, vocab as i32);
            let pid = data.ints(rows, -1, positions as i32);
            let (mut ids, mut pos_ids) = (int_tensor(&id), int_tensor(&pid));
            let mut y = poisoned(dtype, &[rows, hidden]);
            let want = reference::embedding_fwd(&tok.data, &pos.data, hidden, &id, &pid);
            let what = format!("embedding_fwd {dtype:?} {rows}x{hidden} V={vocab} P={positions}");
            run(&what, kernels::embedding_fwd::interpret(&[], kernels::embedding_fwd::HostArgs {
                tok: &mut tok, pos: &mut pos, ids: &mut ids, pos_ids: &mut pos_ids, y: &mut y,
            }))?;
            check(&what, &y, &want)?;
        }
    }
}

/// Runs `causal_softmax` with tile configuration `consts` on `heads` heads of length `len`
/// and checks `p` and `lse` against the reference. Scores past the diagonal are NaN: the
/// kernel must never let them through.
fn causal_softmax_case(
    data: &mut Data,
    dtype: Storage,
    heads: usize,
    len: usize,
    consts: &[(&str, usize)],
) -> Result<(), TestCaseError> {
    let rows = heads * len;
    let mut v = data.values(rows * len, -8.0, 8.0);
    for (idx, x) in v.iter_mut().enumerate() {
        if idx % len > (idx / len) % len {
            *x = f32::NAN;
        }
    }
    let mut s = HostTensor::new(Storage::F32, &[rows, len], &v);
    let mut p = poisoned(dtype, &[rows, len]);
    let mut lse = poisoned(Storage::F32, &[rows]);
    let (want_p, want_lse) = reference::causal_softmax(&s.data, rows, len);
    let what = format!("causal_softmax {dtype:?} {heads}x{len} {consts:?}");
    run(
        &what,
        kernels::causal_softmax::interpret(
            consts,
            kernels::causal_softmax::HostArgs {
                s: &mut s,
                p: &mut p,
                lse: &mut lse,
            },
        ),
    )?;
    check(&format!("{what} p"), &p, &want_p)?;
    check_with(
        &format!("{what} lse"),
        &lse,
        &want_lse,
        out_tol(Storage::F32),
        8.0,
    )?;
    for (idx, x) in p.data.iter().enumerate() {
        if idx % len > (idx / len) % len && *x != 0.0 {
            return Err(TestCaseError::fail(format!(
                "{what}: p[{idx}] = {x} past the diagonal"
            )));
        }
    }
    Ok(())
}

/// The small tile configuration of the row kernels: long-row loops at interpreter-sized rows.
const SMALL_ROWS: &[(&str, usize)] = &[("BLOCK", 256), ("CHUNK", 128)];

proptest! {
    #![proptest_config(config())]

    /// The default configuration: every row in one `BLOCK`.
    #[test]
    fn causal_softmax(seed: u64, heads in 1usize..3, len in size(1..100, &[1, 2, 64])) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            causal_softmax_case(&mut data, dtype, heads, len, &[])?;
        }
    }

    /// The small configuration: rows longer than 256 loop in 128-wide chunks, with queries
    /// whose visible part ends inside, at and just past a chunk.
    #[test]
    fn causal_softmax_chunked(
        seed: u64,
        heads in 1usize..3,
        len in size(1..420, &[127, 128, 129, 255, 256, 257, 384, 385]),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            causal_softmax_case(&mut data, dtype, heads, len, SMALL_ROWS)?;
        }
    }
}

/// Scores of magnitude 1e4 (where `exp` without the shift overflows) and rows whose maximum
/// lies in a later chunk than most of the visible part, in both configurations.
#[test]
fn causal_softmax_large_magnitudes() {
    let len = 300;
    let mut data = Data::new(5);
    let mut v = data.values(len * len, -3.0, 3.0);
    for (idx, x) in v.iter_mut().enumerate() {
        let (i, j) = (idx / len, idx % len);
        *x += match i % 3 {
            0 => 1e4,
            1 => -1e4,
            _ if j >= 200 => 1e4,
            _ => -1e4,
        };
    }
    for dtype in DTYPES {
        for consts in [&[][..], SMALL_ROWS] {
            let mut s = HostTensor::new(Storage::F32, &[len, len], &v);
            let mut p = poisoned(dtype, &[len, len]);
            let mut lse = poisoned(Storage::F32, &[len]);
            let (want_p, want_lse) = reference::causal_softmax(&s.data, len, len);
            let args = kernels::causal_softmax::HostArgs {
                s: &mut s,
                p: &mut p,
                lse: &mut lse,
            };
            if let Err(e) = kernels::causal_softmax::interpret(consts, args) {
                panic!("{dtype:?} {consts:?}: {e}");
            }
            let what = format!("causal_softmax ±1e4 {dtype:?} {consts:?}");
            if let Err(e) = check(&what, &p, &want_p)
                .and_then(|_| check(&format!("{what} lse"), &lse, &want_lse))
            {
                panic!("{e}");
            }
        }
    }
}

/// Runs `softmax_bwd` with tile configuration `consts` on genuine probability rows (softmax
/// of random scores, about a quarter of them masked to exactly 0) and an f32 `dp`.
fn softmax_bwd_case(
    data: &mut Data,
    dtype: Storage,
    rows: usize,
    cols: usize,
    consts: &[(&str, usize)],
) -> Result<(), TestCaseError> {
    let scores: Vec<f32> = data
        .values(rows * cols, -4.0, 4.0)
        .into_iter()
        .enumerate()
        .map(|(i, v)| if i % 4 == 3 { f32::NEG_INFINITY } else { v })
        .collect();
    let mut p = HostTensor::new(
        dtype,
        &[rows, cols],
        &reference::softmax(&scores, rows, cols),
    );
    let mut dp = data.tensor(Storage::F32, &[rows, cols]);
    let mut ds = poisoned(dtype, &[rows, cols]);
    let want = reference::softmax_bwd(&p.data, &dp.data, rows, cols);
    let what = format!("softmax_bwd {dtype:?} {rows}x{cols} {consts:?}");
    run(
        &what,
        kernels::softmax_bwd::interpret(
            consts,
            kernels::softmax_bwd::HostArgs {
                p: &mut p,
                dp: &mut dp,
                ds: &mut ds,
            },
        ),
    )?;
    // Rows of one element have p = 1 and ds = 0 (up to rounding): judge against `dp`.
    check_with(&what, &ds, &want, out_tol(dtype), f64::from(SCALE))?;
    for (i, (pv, dv)) in p.data.iter().zip(&ds.data).enumerate() {
        if *pv == 0.0 && *dv != 0.0 {
            return Err(TestCaseError::fail(format!(
                "{what}: ds[{i}] = {dv} where p = 0"
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn softmax_bwd(
        seed: u64,
        rows in 1usize..5,
        cols in size(1..2600, &[1, 1023, 1024, 1025, 2047, 2048, 2049]),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            softmax_bwd_case(&mut data, dtype, rows, cols, &[])?;
        }
    }

    #[test]
    fn softmax_bwd_chunked(
        seed: u64,
        rows in 1usize..5,
        cols in size(1..700, &[127, 128, 129, 255, 256, 257, 384]),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            softmax_bwd_case(&mut data, dtype, rows, cols, SMALL_ROWS)?;
        }
    }
}

/// Runs `xent_fwd_bwd` with tile configuration `consts` on random logits in `[-8, 8]` with
/// targets drawn from the whole vocabulary, about a fifth of them ignored (-100).
fn xent_case(
    data: &mut Data,
    dtype: Storage,
    rows: usize,
    vocab: usize,
    consts: &[(&str, usize)],
) -> Result<(), TestCaseError> {
    let z0 = HostTensor::new(
        Storage::F32,
        &[rows, vocab],
        &data.values(rows * vocab, -8.0, 8.0),
    );
    let tg: Vec<i32> = data
        .ints(rows, -(vocab as i32) / 4 - 1, vocab as i32)
        .into_iter()
        .map(|t| if t < 0 { -100 } else { t })
        .collect();
    let scale = data.0.gen_range(0.01f32..=1.0);
    let (want_dz, want_loss) = reference::xent_fwd_bwd(&z0.data, rows, vocab, &tg, scale);
    let mut z = z0.clone();
    let mut targets = int_tensor(&tg);
    let mut loss = poisoned(Storage::F32, &[rows]);
    let mut dz = poisoned(dtype, &[rows, vocab]);
    let what = format!("xent_fwd_bwd {dtype:?} {rows}x{vocab} {consts:?} targets {tg:?}");
    run(
        &what,
        kernels::xent_fwd_bwd::interpret(
            consts,
            kernels::xent_fwd_bwd::HostArgs {
                z: &mut z,
                targets: &mut targets,
                loss: &mut loss,
                scale,
                dz: &mut dz,
            },
        ),
    )?;
    check_with(
        &format!("{what} dz"),
        &dz,
        &want_dz,
        out_tol(dtype),
        f64::from(scale),
    )?;
    // A loss near 0 (a confident row, or a vocabulary of one) is judged against 1 nat.
    check_with(
        &format!("{what} loss"),
        &loss,
        &want_loss,
        out_tol(Storage::F32),
        1.0,
    )?;
    // Ignored rows: exactly zero.
    for (r, &t) in tg.iter().enumerate() {
        let zr = &dz.data[r * vocab..(r + 1) * vocab];
        if t < 0 && (loss.data[r] != 0.0 || zr.iter().any(|v| *v != 0.0)) {
            return Err(TestCaseError::fail(format!(
                "{what}: ignored row {r} not zeroed"
            )));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn xent_fwd_bwd(
        seed: u64,
        rows in 1usize..6,
        vocab in size(1..4500, &[1, 2047, 2048, 2049, 4096]),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            xent_case(&mut data, dtype, rows, vocab, &[])?;
        }
    }

    #[test]
    fn xent_fwd_bwd_small_chunks(
        seed: u64,
        rows in 1usize..6,
        vocab in size(1..900, &[255, 256, 257, 512, 513]),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            xent_case(&mut data, dtype, rows, vocab, &[("CHUNK", 256)])?;
        }
    }
}

/// Logits of magnitude 1e4 (where `exp` without the running maximum overflows), with the
/// row's maximum in a later chunk than most of the row, so that every lane's running sum is
/// rescaled, and a row whose target holds the maximum (loss ~ 0).
#[test]
fn xent_large_logits() {
    let (rows, vocab) = (4, 5000);
    let mut data = Data::new(9);
    let mut v = data.values(rows * vocab, -3.0, 3.0);
    for (i, x) in v.iter_mut().enumerate() {
        let (r, c) = (i / vocab, i % vocab);
        *x += match r {
            0 => 1e4,
            1 => -1e4,
            _ if c >= 3000 => 1e4,
            _ => -1e4,
        };
    }
    v[3 * vocab + 4321] = 2e4;
    let tg = [7, 4999, 3500, 4321];
    for dtype in DTYPES {
        for consts in [&[][..], &[("CHUNK", 256)][..]] {
            let z0 = HostTensor::new(Storage::F32, &[rows, vocab], &v);
            let (want_dz, want_loss) = reference::xent_fwd_bwd(&z0.data, rows, vocab, &tg, 1.0);
            let mut z = z0.clone();
            let mut targets = int_tensor(&tg);
            let mut loss = poisoned(Storage::F32, &[rows]);
            let mut dz = poisoned(dtype, &[rows, vocab]);
            let args = kernels::xent_fwd_bwd::HostArgs {
                z: &mut z,
                targets: &mut targets,
                loss: &mut loss,
                scale: 1.0,
                dz: &mut dz,
            };
            if let Err(e) = kernels::xent_fwd_bwd::interpret(consts, args) {
                panic!("{dtype:?} {consts:?}: {e}");
            }
            let what = format!("xent ±1e4 {dtype:?} {consts:?}");
            // Loss values are O(1) to O(1e4) differences of O(1e4) numbers: f32 gives ~1e-3
            // absolute on the largest.
            if let Err(e) = check_with(&format!("{what} dz"), &dz, &want_dz, out_tol(dtype), 1.0)
                .and_then(|_| check_with(&format!("{what} loss"), &loss, &want_loss, 1e-5, 100.0))
            {
                panic!("{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn adamw(seed: u64, n in size(1..5000, &[1, 1023, 1024, 1025, 4096]), step in 1u32..2000) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            // A clipping scale below 1 half the time (1: no clipping).
            let grad_scale = if data.0.gen_bool(0.5) { data.0.gen_range(0.05f32..1.0) } else { 1.0 };
            let s = reference::AdamwStep {
                grad_scale,
                ..reference::AdamwStep::at(
                    data.0.gen_range(1e-3f32..1e-1),
                    data.0.gen_range(0.8f32..0.95),
                    data.0.gen_range(0.99f32..0.9999),
                    1e-8,
                    data.0.gen_range(0.0f32..0.1),
                    step,
                )
            };
            let p0 = HostTensor::new(Storage::F32, &[n], &data.values(n, -3.0, 3.0));
            let mut grad = data.tensor(dtype, &[n]);
            let m0 = HostTensor::new(Storage::F32, &[n], &data.values(n, -1.0, 1.0));
            let v0 = HostTensor::new(Storage::F32, &[n], &data.values(n, 0.01, 2.0));
            let (want_p, want_m, want_v) =
                reference::adamw(&p0.data, &grad.data, &m0.data, &v0.data, &s);
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            let what = format!("adamw {dtype:?} n={n} {s:?}");
            run(&what, kernels::adamw::interpret(&[], kernels::adamw::HostArgs {
                param: &mut p, grad: &mut grad, grad_scale: s.grad_scale, m: &mut m, v: &mut v,
                lr: s.lr, beta1: s.beta1, beta2: s.beta2, eps: s.eps,
                weight_decay: s.weight_decay, bias_correction1: s.bias_correction1,
                bias_correction2_sqrt: s.bias_correction2_sqrt,
            }))?;
            check(&format!("{what} m"), &m, &want_m)?;
            check(&format!("{what} v"), &v, &want_v)?;
            // The update is ~lr of a parameter: judge it on its own, not only on the sum
            // (relative 1e-4, or else within 5e-7, a few f32 ulps of a parameter of size 3).
            let du: Vec<f32> = p.data.iter().zip(&p0.data).map(|(a, b)| a - b).collect();
            let want_du: Vec<f32> = want_p.iter().zip(&p0.data).map(|(a, b)| a - b).collect();
            let du = HostTensor::new(Storage::F32, &[n], &du);
            check_with(&format!("{what} param update"), &du, &want_du, 1e-4, 5e-3)?;
            check(&format!("{what} param"), &p, &want_p)?;
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// `dropout_mask` against its reference for uniforms in `[0, 1)`: the mask exactly 0 or
    /// `1/(1-p)` rounded to the storage type (the poisoned mask fully rewritten), `x` scaled
    /// by it in place; then `mul_inplace` (the backward) against its reference.
    #[test]
    fn dropout_mask_and_mul_inplace(
        seed: u64,
        rows in size(1..40, BR_EDGES),
        cols in size(1..600, BC256_EDGES),
        p in 0.05f32..0.6,
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let what = format!("dropout_mask {dtype:?} {rows}x{cols} p={p}");
            let x0 = data.tensor(dtype, &[rows, cols]);
            let u0: Vec<f32> = (0..rows * cols).map(|_| data.0.gen_range(0.0f32..1.0)).collect();
            let mut u = HostTensor::new(Storage::F32, &[rows, cols], &u0);
            let (want_x, want_m) = reference::dropout_mask(&x0.data, &u0, p);
            let mut x = x0.clone();
            let mut mask = poisoned(dtype, &[rows, cols]);
            run(&what, kernels::dropout_mask::interpret(&[], kernels::dropout_mask::HostArgs {
                x: &mut x, u: &mut u, mask: &mut mask, p,
            }))?;
            // The mask exactly: 0 where u < p, else 1/(1-p) (f32 arithmetic) in the storage
            // type.
            let keep = HostTensor::new(dtype, &[1], &[1.0f32 / (1.0 - p)]).data[0];
            let exact = HostTensor::new(dtype, &[rows, cols], &want_m);
            let wrong = (0..rows * cols)
                .filter(|&i| mask.data[i] != if u0[i] >= p { keep } else { 0.0 })
                .count();
            prop_assert_eq!(wrong, 0, "{} mask: {} wrong values", what, wrong);
            check(&format!("{what} mask"), &mask, &want_m)?;
            // x is scaled by the mask as stored (rounded to T), one more rounding than the
            // reference's x ⊙ mask: compare against x ⊙ round(mask), and loosely against it.
            let rounded = reference::mul_inplace(&x0.data, &exact.data);
            check(&format!("{what} x"), &x, &rounded)?;
            check_with(&format!("{what} x (unrounded mask)"), &x, &want_x, 2.0 * out_tol(dtype), 0.0)?;
            let dropped = mask.data.iter().filter(|m| **m == 0.0).count();
            let expect = u0.iter().filter(|v| **v < p).count();
            prop_assert_eq!(dropped, expect, "{} dropped", what);

            let what = format!("mul_inplace {dtype:?} {rows}x{cols}");
            let g0 = data.tensor(dtype, &[rows, cols]);
            let mut g = g0.clone();
            run(&what, kernels::mul_inplace::interpret(&[], kernels::mul_inplace::HostArgs {
                x: &mut g, m: &mut mask,
            }))?;
            check(&what, &g, &reference::mul_inplace(&g0.data, &mask.data))?;
        }
    }
}

/// A NaN uniform drops its element (`NaN >= p` is false); at a shape crossing both tile edges,
/// every element of the poisoned mask and of `x` is rewritten: kept elements scaled exactly
/// (by 2, p = 0.5), dropped ones exactly 0.
#[test]
fn dropout_mask_nan_uniforms_drop_and_edges_are_written() {
    let (rows, cols) = (17, 257);
    let mut data = Data::new(3);
    for dtype in DTYPES {
        let x0 = data.tensor(dtype, &[rows, cols]);
        let u0: Vec<f32> = (0..rows * cols)
            .map(|i| if i % 7 == 0 { f32::NAN } else { 0.9 })
            .collect();
        let mut u = HostTensor::new(Storage::F32, &[rows, cols], &u0);
        let mut x = x0.clone();
        let mut mask = poisoned(dtype, &[rows, cols]);
        let r = kernels::dropout_mask::interpret(
            &[],
            kernels::dropout_mask::HostArgs {
                x: &mut x,
                u: &mut u,
                mask: &mut mask,
                p: 0.5,
            },
        );
        if let Err(e) = r {
            panic!("dropout_mask {dtype:?}: {e}");
        }
        for i in 0..rows * cols {
            if i % 7 == 0 {
                assert_eq!((mask.data[i], x.data[i]), (0.0, 0.0), "{dtype:?} [{i}]");
            } else {
                assert_eq!(mask.data[i], 2.0, "{dtype:?} [{i}]");
                assert_eq!(x.data[i], 2.0 * x0.data[i], "{dtype:?} [{i}]");
            }
        }
    }
}
