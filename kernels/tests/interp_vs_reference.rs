//! Every kernel, run in the interpreter (the GPU's numerics: bf16/f16 rounding on load and
//! store, f32 arithmetic), against its f64 CPU reference in `lexp_kernels::reference`.
//!
//! The properties draw a seed and a shape; the data is uniform from a seeded `StdRng`. Shapes
//! are mostly *not* multiples of the tile sizes (masking), rows of the row kernels are longer
//! than `BLOCK = 1024` (the loops), and every storage type is run for every case. Outputs are
//! poisoned with [`POISON`] before the run, so an element the kernel never writes is caught;
//! the atomically accumulated outputs (`colsum`, `layernorm_bwd_params`) are zeroed instead.
//!
//! Each property runs 16 cases; set `PROPTEST_CASES` to run more.

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

/// `eps` of the LayerNorm tests.
const EPS: f32 = 1e-5;

fn config() -> ProptestConfig {
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default().cases,
        Err(_) => 16,
    };
    ProptestConfig {
        cases,
        // Integration tests have no `lib.rs` to persist failing seeds next to; a failure
        // prints its seed and shape instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A size from `range`, or (one time in four) one of `edges`: exact multiples of a tile size and
/// their neighbours.
fn size(range: Range<usize>, edges: &'static [usize]) -> impl Strategy<Value = usize> {
    prop_oneof![3 => range, 1 => prop::sample::select(edges)]
}

/// Seeded random data for one test case.
struct Data(StdRng);

impl Data {
    fn new(seed: u64) -> Data {
        Data(StdRng::seed_from_u64(seed))
    }

    /// `n` values uniform in `[-scale, scale]`.
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.gen_range(-scale..=scale)).collect()
    }

    /// A `dims` tensor of uniform values in `[-SCALE, SCALE]`, rounded to `dtype`.
    fn tensor(&mut self, dtype: Storage, dims: &[usize]) -> HostTensor {
        let v = self.values(dims.iter().product(), SCALE);
        HostTensor::new(dtype, dims, &v)
    }
}

/// An output tensor filled with [`POISON`].
fn poisoned(dtype: Storage, dims: &[usize]) -> HostTensor {
    HostTensor::new(dtype, dims, &vec![POISON; dims.iter().product()])
}

/// Relative L2 tolerance for an output *stored* as `dtype`: rounding to the storage type moves
/// each element by at most its unit roundoff (2^-8 for bf16, 2^-11 for f16, relative), so the
/// rounded output is within that of the exact one, plus what the f32 arithmetic before the store
/// costs ([`tolerance`]`(F32)`). That is ~3.9e-3 for bf16, ~5e-4 for f16 and 1e-5 for f32.
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

/// Checks an output against its reference: every element written, finiteness agreeing
/// everywhere, and a relative L2 error of at most `rtol`, or else every error at most
/// `rtol * floor`, where `floor` is the typical magnitude of one output element (for outputs
/// such as sums of random numbers, which may all be close to 0 when there are few of them).
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

/// The per-row `mean` and `rstd` that the LayerNorm forward saves for the backward, from the
/// reference (as f32, as the kernel stores them).
fn stats(x: &HostTensor, rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let ones = vec![1.0; cols];
    let (_, mean, rstd) = reference::layernorm_fwd(&x.data, rows, cols, &ones, &ones, EPS);
    (mean, rstd)
}

const FLAT_EDGES: &[usize] = &[1, 2047, 2048, 2049, 4096];
const ROW_EDGES: &[usize] = &[1, 1023, 1024, 1025, 2048];
const BR_EDGES: &[usize] = &[16, 17, 32];
const BC256_EDGES: &[usize] = &[255, 256, 257, 512];
const CHUNK_EDGES: &[usize] = &[255, 256, 257, 512];
const BC64_EDGES: &[usize] = &[63, 64, 65, 128];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn axpby(seed: u64, n in size(1..5000, FLAT_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let (a, b) = (data.0.gen_range(-2.0f32..2.0), data.0.gen_range(-2.0f32..2.0));
            let mut x = data.tensor(dtype, &[n]);
            let mut y = data.tensor(dtype, &[n]);
            let want = reference::axpby(a, &x.data, b, &y.data);
            let what = format!("axpby {dtype:?} n={n} a={a} b={b}");
            run(&what, kernels::axpby::interpret(&[], kernels::axpby::HostArgs {
                a, x: &mut x, b, y: &mut y,
            }))?;
            check(&what, &y, &want)?;
        }
    }

    #[test]
    fn relu(seed: u64, n in size(1..5000, FLAT_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[n]);
            let mut y = poisoned(dtype, &[n]);
            let want = reference::relu(&x.data);
            let what = format!("relu {dtype:?} n={n}");
            run(&what, kernels::relu::interpret(&[], kernels::relu::HostArgs {
                x: &mut x, y: &mut y,
            }))?;
            check(&what, &y, &want)?;
        }
    }

    #[test]
    fn relu_bwd(seed: u64, n in size(1..5000, FLAT_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            // A genuine forward output: about half of it exactly 0.
            let mut y = data.tensor(dtype, &[n]);
            y.data = reference::relu(&y.data);
            let mut dy = data.tensor(dtype, &[n]);
            let mut dx = poisoned(dtype, &[n]);
            let want = reference::relu_bwd(&y.data, &dy.data);
            let what = format!("relu_bwd {dtype:?} n={n}");
            run(&what, kernels::relu_bwd::interpret(&[], kernels::relu_bwd::HostArgs {
                y: &mut y, dy: &mut dy, dx: &mut dx,
            }))?;
            check(&what, &dx, &want)?;
        }
    }

    #[test]
    fn gelu(seed: u64, n in size(1..5000, FLAT_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[n]);
            let mut y = poisoned(dtype, &[n]);
            let want = reference::gelu(&x.data);
            let what = format!("gelu {dtype:?} n={n}");
            run(&what, kernels::gelu::interpret(&[], kernels::gelu::HostArgs {
                x: &mut x, y: &mut y,
            }))?;
            check(&what, &y, &want)?;
        }
    }

    #[test]
    fn gelu_bwd(seed: u64, n in size(1..5000, FLAT_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[n]);
            let mut dy = data.tensor(dtype, &[n]);
            let mut dx = poisoned(dtype, &[n]);
            let want = reference::gelu_bwd(&x.data, &dy.data);
            let what = format!("gelu_bwd {dtype:?} n={n}");
            run(&what, kernels::gelu_bwd::interpret(&[], kernels::gelu_bwd::HostArgs {
                x: &mut x, dy: &mut dy, dx: &mut dx,
            }))?;
            check(&what, &dx, &want)?;
        }
    }

    #[test]
    fn softmax(seed: u64, rows in 1usize..6, cols in size(1..2600, ROW_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[rows, cols]);
            let mut y = poisoned(dtype, &[rows, cols]);
            let want = reference::softmax(&x.data, rows, cols);
            let what = format!("softmax {dtype:?} {rows}x{cols}");
            run(&what, kernels::softmax::interpret(&[], kernels::softmax::HostArgs {
                x: &mut x, y: &mut y,
            }))?;
            check(&what, &y, &want)?;
        }
    }

    #[test]
    fn layernorm_fwd(seed: u64, rows in 1usize..6, cols in size(1..2600, ROW_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[rows, cols]);
            let mut w = data.tensor(dtype, &[cols]);
            let mut b = data.tensor(dtype, &[cols]);
            let mut y = poisoned(dtype, &[rows, cols]);
            let mut mean = poisoned(Storage::F32, &[rows]);
            let mut rstd = poisoned(Storage::F32, &[rows]);
            let (want_y, want_mean, want_rstd) =
                reference::layernorm_fwd(&x.data, rows, cols, &w.data, &b.data, EPS);
            let what = format!("layernorm_fwd {dtype:?} {rows}x{cols}");
            run(&what, kernels::layernorm_fwd::interpret(&[], kernels::layernorm_fwd::HostArgs {
                x: &mut x, w: &mut w, b: &mut b, y: &mut y, mean: &mut mean, rstd: &mut rstd,
                eps: EPS,
            }))?;
            check(&format!("{what} y"), &y, &want_y)?;
            // A mean of random numbers may be close to 0: judge its error against the data.
            check_with(&format!("{what} mean"), &mean, &want_mean, out_tol(Storage::F32),
                f64::from(SCALE))?;
            check(&format!("{what} rstd"), &rstd, &want_rstd)?;
        }
    }

    #[test]
    fn layernorm_bwd_dx(seed: u64, rows in 1usize..6, cols in size(1..2600, ROW_EDGES)) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[rows, cols]);
            let mut w = data.tensor(dtype, &[cols]);
            let mut dy = data.tensor(dtype, &[rows, cols]);
            let (m, r) = stats(&x, rows, cols);
            let mut mean = HostTensor::new(Storage::F32, &[rows], &m);
            let mut rstd = HostTensor::new(Storage::F32, &[rows], &r);
            // beta = 0 writes every element of a poisoned dx; beta = 1 adds onto what is there.
            for beta in [0.0f32, 1.0] {
                let mut dx = if beta == 0.0 { poisoned(dtype, &[rows, cols]) } else { data.tensor(dtype, &[rows, cols]) };
                let old = dx.data.clone();
                let want: Vec<f32> = reference::layernorm_bwd_dx(&x.data, rows, cols, &w.data, &dy.data, &m, &r)
                    .iter().zip(&old).map(|(v, o)| if beta == 0.0 { *v } else { v + o }).collect();
                let what = format!("layernorm_bwd_dx {dtype:?} {rows}x{cols} beta {beta}");
                run(&what, kernels::layernorm_bwd_dx::interpret(&[],
                    kernels::layernorm_bwd_dx::HostArgs {
                        x: &mut x, w: &mut w, dy: &mut dy, mean: &mut mean, rstd: &mut rstd,
                        beta, dx: &mut dx,
                    }))?;
                check(&what, &dx, &want)?;
            }
        }
    }

    #[test]
    fn layernorm_bwd_params(
        seed: u64,
        rows in size(1..600, CHUNK_EDGES),
        cols in size(1..200, BC64_EDGES),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[rows, cols]);
            let mut dy = data.tensor(dtype, &[rows, cols]);
            let (m, r) = stats(&x, rows, cols);
            let mut mean = HostTensor::new(Storage::F32, &[rows], &m);
            let mut rstd = HostTensor::new(Storage::F32, &[rows], &r);
            let mut dw = HostTensor::zeros(Storage::F32, &[cols]);
            let mut db = HostTensor::zeros(Storage::F32, &[cols]);
            let (want_dw, want_db) =
                reference::layernorm_bwd_params(&x.data, rows, cols, &dy.data, &m, &r);
            let what = format!("layernorm_bwd_params {dtype:?} {rows}x{cols}");
            run(&what, kernels::layernorm_bwd_params::interpret(&[],
                kernels::layernorm_bwd_params::HostArgs {
                    x: &mut x, dy: &mut dy, mean: &mut mean, rstd: &mut rstd,
                    dw: &mut dw, db: &mut db,
                }))?;
            // Sums of `rows` random terms: typically sqrt(rows) * SCALE in magnitude.
            let floor = (rows as f64).sqrt() * f64::from(SCALE);
            check_with(&format!("{what} dw"), &dw, &want_dw, out_tol(Storage::F32), floor)?;
            check_with(&format!("{what} db"), &db, &want_db, out_tol(Storage::F32), floor)?;
        }
    }

    #[test]
    fn bias_residual(
        seed: u64,
        rows in size(1..40, BR_EDGES),
        cols in size(1..600, BC256_EDGES),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[rows, cols]);
            let mut bias = data.tensor(dtype, &[cols]);
            let mut res = data.tensor(dtype, &[rows, cols]);
            let mut y = poisoned(dtype, &[rows, cols]);
            let want = reference::bias_residual(&x.data, rows, cols, &bias.data, &res.data);
            let what = format!("bias_residual {dtype:?} {rows}x{cols}");
            run(&what, kernels::bias_residual::interpret(&[],
                kernels::bias_residual::HostArgs {
                    x: &mut x, bias: &mut bias, res: &mut res, y: &mut y,
                }))?;
            check(&what, &y, &want)?;
        }
    }

    #[test]
    fn colsum(
        seed: u64,
        rows in size(1..600, CHUNK_EDGES),
        cols in size(1..200, BC64_EDGES),
    ) {
        let mut data = Data::new(seed);
        for dtype in DTYPES {
            let mut x = data.tensor(dtype, &[rows, cols]);
            let mut out = HostTensor::zeros(Storage::F32, &[cols]);
            let want = reference::colsum(&x.data, rows, cols);
            let what = format!("colsum {dtype:?} {rows}x{cols}");
            run(&what, kernels::colsum::interpret(&[], kernels::colsum::HostArgs {
                x: &mut x, out: &mut out,
            }))?;
            let floor = (rows as f64).sqrt() * f64::from(SCALE);
            check_with(&what, &out, &want, out_tol(Storage::F32), floor)?;
        }
    }
}

/// Runs `softmax` on a `rows x cols` input of any dtype; returns the input as rounded and the
/// output.
fn softmax_of(dtype: Storage, rows: usize, cols: usize, x: &[f32]) -> (HostTensor, HostTensor) {
    let mut x = HostTensor::new(dtype, &[rows, cols], x);
    let mut y = poisoned(dtype, &[rows, cols]);
    let r = kernels::softmax::interpret(
        &[],
        kernels::softmax::HostArgs {
            x: &mut x,
            y: &mut y,
        },
    );
    if let Err(e) = r {
        panic!("softmax {dtype:?} {rows}x{cols}: {e}");
    }
    (x, y)
}

fn assert_ok(r: Result<(), TestCaseError>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Inputs of magnitude 1e4, where `exp` without the max shift overflows, and rows whose maximum
/// sits in a later `BLOCK` chunk than most of the row (the running maximum must rescale the
/// running sum).
#[test]
fn softmax_large_magnitudes() {
    let (rows, cols) = (4, 2500);
    let mut data = Data::new(1);
    let mut x = Vec::with_capacity(rows * cols);
    // Spread over [-1e4, 1e4]: essentially one-hot.
    x.extend(data.values(cols, 1e4));
    // Around -1e4 in the first chunk, around +1e4 after it.
    x.extend(data.values(cols, 3.0).iter().enumerate().map(|(c, v)| {
        if c < 1024 {
            v - 1e4
        } else {
            v + 1e4
        }
    }));
    // All around +1e4, all around -1e4: the shift must avoid overflow and underflow.
    x.extend(data.values(cols, 3.0).iter().map(|v| v + 1e4));
    x.extend(data.values(cols, 3.0).iter().map(|v| v - 1e4));
    for dtype in DTYPES {
        let (x, y) = softmax_of(dtype, rows, cols, &x);
        let want = reference::softmax(&x.data, rows, cols);
        assert_ok(check(&format!("softmax ±1e4 {dtype:?}"), &y, &want));
    }
}

/// Rows with `-inf` entries (never all of them): `-inf` must give exactly 0, including lanes
/// that see only `-inf` in some or all chunks, and must not produce NaN elsewhere.
#[test]
fn softmax_with_neg_inf_entries() {
    let (rows, cols) = (5, 2100);
    let ninf = f32::NEG_INFINITY;
    let mut data = Data::new(2);
    let v = data.values(rows * cols, SCALE);
    let x: Vec<f32> = v
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let (r, c) = (i / cols, i % cols);
            let masked = match r {
                // Every third entry.
                0 => c % 3 == 0,
                // The whole first chunk and the start of the second: lanes 52..476 never see a
                // finite value.
                1 => c < 1500,
                // Only the last entry is finite.
                2 => c + 1 < cols,
                // Only the first entry is finite.
                3 => c > 0,
                // A causal-style mask.
                _ => c > 700,
            };
            if masked {
                ninf
            } else {
                v
            }
        })
        .collect();
    for dtype in DTYPES {
        let (x, y) = softmax_of(dtype, rows, cols, &x);
        let want = reference::softmax(&x.data, rows, cols);
        assert_ok(check(&format!("softmax -inf {dtype:?}"), &y, &want));
        for (i, (xv, yv)) in x.data.iter().zip(&y.data).enumerate() {
            assert!(
                *xv != ninf || *yv == 0.0,
                "{dtype:?} [{i}]: softmax(-inf) = {yv}"
            );
        }
        assert_eq!(
            y.data[2 * cols + cols - 1],
            1.0,
            "{dtype:?}: lone finite entry"
        );
        assert_eq!(y.data[3 * cols], 1.0, "{dtype:?}: lone finite entry");
    }
}

/// Current behaviour, pinned: a row that is entirely `-inf` comes out as NaN (the sum is 0 and
/// `exp(-inf) * (1/0) = 0 * inf`), as in the reference and in PyTorch; other rows are
/// unaffected.
#[test]
fn softmax_of_an_all_neg_inf_row_is_nan() {
    let (rows, cols) = (2, 1500);
    let mut x = vec![f32::NEG_INFINITY; cols];
    x.extend(Data::new(3).values(cols, SCALE));
    for dtype in DTYPES {
        let (x, y) = softmax_of(dtype, rows, cols, &x);
        assert!(y.data[..cols].iter().all(|v| v.is_nan()), "{dtype:?}");
        let want = reference::softmax(&x.data, rows, cols);
        assert_ok(check(&format!("softmax all -inf {dtype:?}"), &y, &want));
    }
}

/// LayerNorm in f32 with a mean much larger than the spread (1e3 + uniform noise in [-1, 1]):
/// a one-pass `E[x^2] - E[x]^2` variance loses every significant digit here (and may go
/// negative), the kernel's two-pass variance must not.
#[test]
fn layernorm_large_mean_f32() {
    let dtype = Storage::F32;
    for (rows, cols) in [(3, 1000), (2, 2600), (2, 777)] {
        let mut data = Data::new(4);
        let xv: Vec<f32> = data
            .values(rows * cols, 1.0)
            .iter()
            .map(|v| v + 1e3)
            .collect();
        let mut x = HostTensor::new(dtype, &[rows, cols], &xv);
        let mut w = data.tensor(dtype, &[cols]);
        let mut b = data.tensor(dtype, &[cols]);
        let mut y = poisoned(dtype, &[rows, cols]);
        let mut mean = poisoned(Storage::F32, &[rows]);
        let mut rstd = poisoned(Storage::F32, &[rows]);
        let (want_y, want_mean, want_rstd) =
            reference::layernorm_fwd(&x.data, rows, cols, &w.data, &b.data, EPS);
        let r = kernels::layernorm_fwd::interpret(
            &[],
            kernels::layernorm_fwd::HostArgs {
                x: &mut x,
                w: &mut w,
                b: &mut b,
                y: &mut y,
                mean: &mut mean,
                rstd: &mut rstd,
                eps: EPS,
            },
        );
        if let Err(e) = r {
            panic!("layernorm_fwd {rows}x{cols}: {e}");
        }
        let what = format!("layernorm_fwd mean 1e3 {rows}x{cols}");
        eprintln!(
            "{what}: y {}; mean {}; rstd {}",
            compare(&y.data, &want_y),
            compare(&mean.data, &want_mean),
            compare(&rstd.data, &want_rstd)
        );
        // rstd comes from the two-pass variance: it must keep f32 accuracy.
        assert_ok(check_with(
            &format!("{what} rstd"),
            &rstd,
            &want_rstd,
            out_tol(dtype),
            0.0,
        ));
        // The mean is a plain f32 sum of thousands of values near 1e3 (partial sums up to
        // ~3e6, where one ulp is 0.25), so it is off by up to ~1e-3: measured 4e-7 to 7e-7
        // relative in the interpreter, whose f32 reductions are sequential (a GPU's tree
        // reduction rounds less).
        assert_ok(check_with(
            &format!("{what} mean"),
            &mean,
            &want_mean,
            2e-6,
            0.0,
        ));
        // That error of the mean, relative to a spread of ~0.6, shifts every xhat: y is good
        // to ~1e-3 only (measured 5e-4 to 8e-4). A one-pass variance would be far worse: the
        // rounding of a f32 sum of x^2 ~ 1e6 exceeds the variance (~0.33) itself.
        assert_ok(check_with(&format!("{what} y"), &y, &want_y, 2e-3, 0.0));
    }
}
