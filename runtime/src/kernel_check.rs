//! Runs every DSL kernel on the GPU against the CPU reference, and measures achieved memory
//! bandwidth against a device-to-device copy timed in the same run.
//!
//! Correctness: random inputs (uniform in [-3, 3], never zeros), outputs poisoned with NaN
//! before each launch (accumulating outputs zeroed instead), shapes that are not multiples of
//! the tile sizes, every dtype, and both alignment classes (a pointer offset by one element
//! forces the unaligned variant). Speed: minimal bytes moved (each input read once, each output
//! written once) over the median of timed launches after warm-up.

use crate::{time_ms, CudaDevice, DeviceError, DeviceTensor};
use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::{Arch, LaunchError, LaunchSpec, Launcher, TensorArg};
use lexp_kernels as k;
use lexp_kernels::reference as refr;
use std::cell::RefCell;

mod train;

/// One correctness check.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub kernel: &'static str,
    pub dtype: &'static str,
    pub shape: String,
    /// The variant the launcher picked.
    pub variant: String,
    /// Output name, relative L2 error, max abs error, tolerance.
    pub output: &'static str,
    pub rel_l2: f64,
    pub max_abs: f64,
    pub tolerance: f64,
    pub non_finite: usize,
    pub pass: bool,
}

/// One bandwidth measurement.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub kernel: &'static str,
    pub dtype: &'static str,
    pub shape: String,
    pub variant: String,
    /// Minimal bytes moved per launch.
    pub bytes: usize,
    pub median_ms: f64,
    pub gbps: f64,
    /// Fraction of the copy bandwidth measured in the same run.
    pub of_copy: f64,
}

/// A launcher that remembers which variant ran last.
struct Recording<'a> {
    dev: &'a CudaDevice,
    last: RefCell<String>,
}

impl Launcher for Recording<'_> {
    fn arch(&self) -> Arch {
        Launcher::arch(self.dev)
    }
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<(), LaunchError> {
        *self.last.borrow_mut() = spec.variant.symbol.to_string();
        self.dev.launch(spec)
    }
}

struct Output {
    name: &'static str,
    t: DeviceTensor,
    want: Vec<f32>,
    /// Zero before each run (atomic accumulation) instead of poisoning.
    accumulate: bool,
    /// Natural size of the values (see `reference::compare_scaled`); 0 for plain relative error.
    scale: f64,
    /// For a tensor the kernel updates in place: its initial contents (padding included),
    /// written back before each launch instead of poisoning, so that every launch sees the
    /// same input.
    init: Option<Vec<f32>>,
}

/// A kernel ready to run: its tensors and a launch closure.
struct Prepared {
    _inputs: Vec<DeviceTensor>,
    outputs: Vec<Output>,
    launch: Box<dyn Fn(&dyn Launcher, &[(&str, usize)]) -> Result<(), LaunchError>>,
    bytes: usize,
}

/// A small deterministic generator (xorshift) so runs are reproducible without extra crates.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    /// `n` values uniform in `[lo, hi)`.
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.next()).collect()
    }
}

fn round(dtype: Storage, v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| lexp_compiler::dtype::round_to(dtype.dtype(), *x))
        .collect()
}

/// Elementwise kernels take `(n, _)`; row kernels `(rows, cols)`.
const ELEMENTWISE: [&str; 8] = [
    "axpby",
    "convert",
    "relu",
    "relu_bwd",
    "gelu",
    "gelu_bwd",
    "adamw",
    "sum_squares",
];

/// Every kernel the checker knows, in `lexp_kernels::ALL` order.
pub const KERNELS: [&str; 22] = [
    "axpby",
    "convert",
    "relu",
    "relu_bwd",
    "gelu",
    "gelu_bwd",
    "softmax",
    "layernorm_fwd",
    "layernorm_bwd_dx",
    "layernorm_bwd_params",
    "bias_residual",
    "colsum",
    "bias_add",
    "bias_relu",
    "embedding_fwd",
    "causal_softmax",
    "softmax_bwd",
    "xent_fwd_bwd",
    "adamw",
    "sum_squares",
    "dropout_mask",
    "mul_inplace",
];

struct Ctx<'a> {
    dev: &'a CudaDevice,
    dtype: Storage,
    rng: Rng,
    with_ref: bool,
    /// Offset tensor pointers by one element (forces the unaligned variant).
    misalign: bool,
    inputs: Vec<DeviceTensor>,
}

impl Ctx<'_> {
    /// Uploads an input; returns its host values (rounded) and its kernel argument.
    fn input(
        &mut self,
        dims: &[usize],
        lo: f32,
        hi: f32,
        dtype: Option<Storage>,
    ) -> Result<(Vec<f32>, TensorArg), DeviceError> {
        let dtype = dtype.unwrap_or(self.dtype);
        let n: usize = dims.iter().product();
        let host = round(dtype, &self.rng.uniform(n, lo, hi));
        let (t, arg) = self.place(dtype, dims, &host)?;
        self.inputs.push(t);
        Ok((host, arg))
    }

    /// A device tensor for `host`, at an offset of one element when misaligning.
    fn place(
        &self,
        dtype: Storage,
        dims: &[usize],
        host: &[f32],
    ) -> Result<(DeviceTensor, TensorArg), DeviceError> {
        if self.misalign {
            let mut padded = vec![0.0; host.len() + 1];
            padded[1..].copy_from_slice(host);
            let t = DeviceTensor::from_f32(self.dev, dtype, &[host.len() + 1], &padded)?;
            let arg = t.offset_arg(1, dims)?;
            Ok((t, arg))
        } else {
            let t = DeviceTensor::from_f32(self.dev, dtype, dims, host)?;
            let arg = t.as_arg();
            Ok((t, arg))
        }
    }

    fn output(
        &self,
        name: &'static str,
        dims: &[usize],
        dtype: Option<Storage>,
        want: Vec<f32>,
        accumulate: bool,
    ) -> Result<(Output, TensorArg), DeviceError> {
        let dtype = dtype.unwrap_or(self.dtype);
        let n: usize = dims.iter().product();
        let (t, arg) = self.place(dtype, dims, &vec![0.0; n])?;
        Ok((
            Output {
                name,
                t,
                want,
                accumulate,
                scale: 0.0,
                init: None,
            },
            arg,
        ))
    }

    fn want<F: FnOnce() -> Vec<f32>>(&self, f: F) -> Vec<f32> {
        if self.with_ref {
            f()
        } else {
            vec![]
        }
    }
}

fn elem_bytes(s: Storage) -> usize {
    s.bytes()
}

fn prepare(cx: &mut Ctx<'_>, kernel: &str, dims: (usize, usize)) -> Result<Prepared, DeviceError> {
    let e = elem_bytes(cx.dtype);
    let (r, c) = dims;
    let f32s = Some(Storage::F32);
    let p = match kernel {
        "axpby" => {
            let n = r;
            let (x, xa) = cx.input(&[n], -3.0, 3.0, None)?;
            let (y, ya) = cx.input(&[n], -3.0, 3.0, None)?;
            let (a, b) = (1.5f32, -0.75f32);
            // y is read and written: its output is the input tensor itself.
            let want = cx.want(|| refr::axpby(a, &x, b, &y));
            let t = cx
                .inputs
                .pop()
                .ok_or_else(|| DeviceError::InvalidArgument("no y".into()))?;
            let (x2, y2) = (xa.clone(), ya.clone());
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![Output {
                    name: "y",
                    t,
                    want,
                    accumulate: false,
                    scale: 0.0,
                    init: None,
                }],
                launch: Box::new(move |l, c| {
                    k::axpby::launch_with(
                        l,
                        c,
                        &k::axpby::Args {
                            a,
                            x: &x2,
                            b,
                            y: &y2,
                        },
                    )
                }),
                bytes: 3 * n * e,
            }
        }
        "convert" => {
            let n = r;
            let (x, xa) = cx.input(&[n], -3.0, 3.0, Some(Storage::F32))?;
            let want = cx.want(|| round(cx.dtype, &x));
            let (out, ya) = cx.output("y", &[n], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, c| {
                    k::convert::launch_with(l, c, &k::convert::Args { x: &xa, y: &ya })
                }),
                bytes: n * (4 + e),
            }
        }
        "relu" | "gelu" => {
            let n = r;
            let (x, xa) = cx.input(&[n], -3.0, 3.0, None)?;
            let gelu = kernel == "gelu";
            let want = cx.want(|| if gelu { refr::gelu(&x) } else { refr::relu(&x) });
            let (out, ya) = cx.output("y", &[n], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, c| {
                    if gelu {
                        k::gelu::launch_with(l, c, &k::gelu::Args { x: &xa, y: &ya })
                    } else {
                        k::relu::launch_with(l, c, &k::relu::Args { x: &xa, y: &ya })
                    }
                }),
                bytes: 2 * n * e,
            }
        }
        "relu_bwd" | "gelu_bwd" => {
            let n = r;
            let (x, xa) = cx.input(&[n], -3.0, 3.0, None)?;
            let (dy, dya) = cx.input(&[n], -3.0, 3.0, None)?;
            let gelu = kernel == "gelu_bwd";
            let want = cx.want(|| {
                if gelu {
                    refr::gelu_bwd(&x, &dy)
                } else {
                    refr::relu_bwd(&x, &dy)
                }
            });
            let (out, dxa) = cx.output("dx", &[n], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, c| {
                    if gelu {
                        k::gelu_bwd::launch_with(
                            l,
                            c,
                            &k::gelu_bwd::Args {
                                x: &xa,
                                dy: &dya,
                                dx: &dxa,
                            },
                        )
                    } else {
                        k::relu_bwd::launch_with(
                            l,
                            c,
                            &k::relu_bwd::Args {
                                y: &xa,
                                dy: &dya,
                                dx: &dxa,
                            },
                        )
                    }
                }),
                bytes: 3 * n * e,
            }
        }
        "softmax" => {
            let (x, xa) = cx.input(&[r, c], -8.0, 8.0, None)?;
            let want = cx.want(|| refr::softmax(&x, r, c));
            let (out, ya) = cx.output("y", &[r, c], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, c| {
                    k::softmax::launch_with(l, c, &k::softmax::Args { x: &xa, y: &ya })
                }),
                bytes: 2 * r * c * e,
            }
        }
        "layernorm_fwd" => {
            let (x, xa) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let (w, wa) = cx.input(&[c], 0.5, 1.5, None)?;
            let (b, ba) = cx.input(&[c], -1.0, 1.0, None)?;
            let eps = 1e-5f32;
            let (y, m, s) = if cx.with_ref {
                refr::layernorm_fwd(&x, r, c, &w, &b, eps)
            } else {
                (vec![], vec![], vec![])
            };
            let (oy, ya) = cx.output("y", &[r, c], None, y, false)?;
            // The mean of random data can cancel to ~0: judge its error against each row's
            // standard deviation (1 / rstd), the scale that matters for `y`.
            let row_std: f64 = s
                .iter()
                .map(|v| 1.0 / (*v as f64 * *v as f64))
                .sum::<f64>()
                .sqrt();
            let (mut om, ma) = cx.output("mean", &[r], f32s, m, false)?;
            om.scale = row_std;
            let (os, sa) = cx.output("rstd", &[r], f32s, s, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![oy, om, os],
                launch: Box::new(move |l, c| {
                    k::layernorm_fwd::launch_with(
                        l,
                        c,
                        &k::layernorm_fwd::Args {
                            x: &xa,
                            w: &wa,
                            b: &ba,
                            y: &ya,
                            mean: &ma,
                            rstd: &sa,
                            eps,
                        },
                    )
                }),
                bytes: 2 * r * c * e + 8 * r,
            }
        }
        "layernorm_bwd_dx" => {
            let (x, xa) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let (w, wa) = cx.input(&[c], 0.5, 1.5, None)?;
            let (dy, dya) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let (m, ma) = cx.input(&[r], -0.5, 0.5, f32s)?;
            let (s, sa) = cx.input(&[r], 0.5, 2.0, f32s)?;
            let want = cx.want(|| refr::layernorm_bwd_dx(&x, r, c, &w, &dy, &m, &s));
            let (out, dxa) = cx.output("dx", &[r, c], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, c| {
                    k::layernorm_bwd_dx::launch_with(
                        l,
                        c,
                        &k::layernorm_bwd_dx::Args {
                            x: &xa,
                            w: &wa,
                            dy: &dya,
                            mean: &ma,
                            rstd: &sa,
                            beta: 0.0,
                            dx: &dxa,
                        },
                    )
                }),
                bytes: 3 * r * c * e + 8 * r,
            }
        }
        "layernorm_bwd_params" => {
            let (x, xa) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let (dy, dya) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let (m, ma) = cx.input(&[r], -0.5, 0.5, f32s)?;
            let (s, sa) = cx.input(&[r], 0.5, 2.0, f32s)?;
            let (dw, db) = if cx.with_ref {
                refr::layernorm_bwd_params(&x, r, c, &dy, &m, &s)
            } else {
                (vec![], vec![])
            };
            let (ow, dwa) = cx.output("dw", &[c], f32s, dw, true)?;
            let (ob, dba) = cx.output("db", &[c], f32s, db, true)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![ow, ob],
                launch: Box::new(move |l, c| {
                    k::layernorm_bwd_params::launch_with(
                        l,
                        c,
                        &k::layernorm_bwd_params::Args {
                            x: &xa,
                            dy: &dya,
                            mean: &ma,
                            rstd: &sa,
                            dw: &dwa,
                            db: &dba,
                        },
                    )
                }),
                bytes: 2 * r * c * e + 8 * r,
            }
        }
        "bias_residual" => {
            let (x, xa) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let (b, ba) = cx.input(&[c], -1.0, 1.0, None)?;
            let (res, ra) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let want = cx.want(|| refr::bias_residual(&x, r, c, &b, &res));
            let (out, ya) = cx.output("y", &[r, c], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, c| {
                    k::bias_residual::launch_with(
                        l,
                        c,
                        &k::bias_residual::Args {
                            x: &xa,
                            bias: &ba,
                            res: &ra,
                            y: &ya,
                        },
                    )
                }),
                bytes: 3 * r * c * e,
            }
        }
        "colsum" => {
            let (x, xa) = cx.input(&[r, c], -3.0, 3.0, None)?;
            let want = cx.want(|| refr::colsum(&x, r, c));
            let (out, oa) = cx.output("out", &[c], f32s, want, true)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, c| {
                    k::colsum::launch_with(l, c, &k::colsum::Args { x: &xa, out: &oa })
                }),
                bytes: r * c * e,
            }
        }
        other => return train::prepare(cx, other, dims),
    };
    Ok(p)
}

fn dtype_name(s: Storage) -> &'static str {
    s.name()
}

fn shape_text(kernel: &str, dims: (usize, usize)) -> String {
    if let Some(s) = train::shape_text(kernel, dims) {
        s
    } else if ELEMENTWISE.contains(&kernel) {
        format!("[{}]", dims.0)
    } else {
        format!("[{}, {}]", dims.0, dims.1)
    }
}

/// Shapes for correctness: edges, non-multiples of the tiles, rows longer than a block.
fn check_shapes(kernel: &str) -> Vec<(usize, usize)> {
    if let Some(shapes) = train::check_shapes(kernel) {
        shapes
    } else if ELEMENTWISE.contains(&kernel) {
        vec![(1, 0), (1000, 0), (1_000_003, 0), (4_194_304, 0)]
    } else if matches!(kernel, "softmax" | "layernorm_fwd" | "layernorm_bwd_dx") {
        vec![(1, 1), (37, 1000), (64, 4096), (5, 10007)]
    } else {
        vec![(1, 1), (1000, 1000), (333, 4100), (4096, 1024)]
    }
}

/// Runs every kernel, dtype and check shape once, aligned and (for the largest shape)
/// misaligned, and compares with the CPU reference.
pub fn check_all(dev: &CudaDevice, only: Option<&str>) -> Result<Vec<CheckRow>, DeviceError> {
    let rec = Recording {
        dev,
        last: RefCell::new(String::new()),
    };
    let mut rows = vec![];
    for kernel in KERNELS {
        if only.map(|o| o != kernel).unwrap_or(false) {
            continue;
        }
        for dtype in dtypes(kernel) {
            let shapes = check_shapes(kernel);
            let mut runs: Vec<((usize, usize), bool)> =
                shapes.iter().map(|s| (*s, false)).collect();
            runs.push((shapes[2], true));
            for (seed, (dims, misalign)) in runs.into_iter().enumerate() {
                let mut cx = Ctx {
                    dev,
                    dtype,
                    rng: Rng::new(seed as u64 + 7),
                    with_ref: true,
                    misalign,
                    inputs: vec![],
                };
                let mut p = prepare(&mut cx, kernel, dims)?;
                // Every compiled tile configuration (axpby, whose output is also an input, has one).
                for consts in const_combinations(kernel) {
                    for o in &mut p.outputs {
                        if o.accumulate {
                            o.t.fill_zero()?;
                        } else if let Some(init) = &o.init {
                            o.t.write_f32(init)?;
                        } else if o.name != "y" || kernel != "axpby" {
                            o.t.poison()?;
                        }
                    }
                    (p.launch)(&rec, &consts)?;
                    dev.synchronize()?;
                    for o in &p.outputs {
                        let mut got = o.t.to_f32_vec()?;
                        if misalign {
                            got.remove(0);
                        }
                        let d = refr::compare_scaled(&got, &o.want, o.scale);
                        let tol = refr::tolerance(o.t.dtype());
                        rows.push(CheckRow {
                            kernel,
                            dtype: dtype_name(dtype),
                            shape: format!(
                                "{}{}",
                                shape_text(kernel, dims),
                                if misalign { " +1 elem" } else { "" }
                            ),
                            variant: rec.last.borrow().clone(),
                            output: o.name,
                            rel_l2: d.rel_l2,
                            max_abs: d.max_abs,
                            tolerance: tol,
                            non_finite: d.non_finite,
                            pass: d.within(tol),
                        });
                    }
                }
            }
        }
    }
    Ok(rows)
}

/// The element types a kernel is checked in: bf16, f16 and f32, or f32 alone for a kernel
/// without a type parameter (`sum_squares`).
pub fn dtypes(kernel: &str) -> Vec<Storage> {
    let typed = lexp_kernels::find(kernel)
        .and_then(|k| k.variants.first())
        .is_none_or(|v| v.param("T").is_some());
    if typed {
        vec![Storage::BF16, Storage::F16, Storage::F32]
    } else {
        vec![Storage::F32]
    }
}

/// Every tile configuration the kernel was compiled with (see `KernelInfo::configurations`).
fn const_combinations(kernel: &str) -> Vec<Vec<(&'static str, usize)>> {
    lexp_kernels::find(kernel)
        .map(|k| k.configurations())
        .unwrap_or_else(|| vec![vec![]])
}

/// Shapes for bandwidth: a few hundred MB per tensor in bf16.
fn bench_shape(kernel: &str) -> (usize, usize) {
    if let Some(dims) = train::bench_shape(kernel) {
        dims
    } else if ELEMENTWISE.contains(&kernel) {
        (128 << 20, 0)
    } else {
        (32768, 4096)
    }
}

/// Times every kernel (warm-up 5, median of `iters`) and the copy bandwidth.
pub fn bench_all(
    dev: &CudaDevice,
    dtypes: &[Storage],
    iters: usize,
    only: Option<&str>,
) -> Result<(f64, Vec<BenchRow>), DeviceError> {
    let copy = crate::copy_bandwidth(dev, 1 << 30)?;
    let rec = Recording {
        dev,
        last: RefCell::new(String::new()),
    };
    let mut rows = vec![];
    for kernel in KERNELS {
        if only.map(|o| o != kernel).unwrap_or(false) {
            continue;
        }
        for &dtype in dtypes {
            let dims = bench_shape(kernel);
            let mut cx = Ctx {
                dev,
                dtype,
                rng: Rng::new(99),
                with_ref: false,
                misalign: false,
                inputs: vec![],
            };
            let p = prepare(&mut cx, kernel, dims)?;
            for consts in const_combinations(kernel) {
                let t = time_ms(dev, 5, iters, || (p.launch)(&rec, &consts))?;
                let ms = t.median();
                let gbps = p.bytes as f64 / (ms * 1e-3) / 1e9;
                rows.push(BenchRow {
                    kernel,
                    dtype: dtype_name(dtype),
                    shape: shape_text(kernel, dims),
                    variant: rec.last.borrow().clone(),
                    bytes: p.bytes,
                    median_ms: ms,
                    gbps,
                    of_copy: gbps / copy,
                });
            }
        }
    }
    Ok((copy, rows))
}
