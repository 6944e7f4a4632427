//! GPU checks and benchmarks of the tensor-core kernels (dense GEMMs, block-sparse GEMMs,
//! fused LoRA) against the CPU references of `lexp_kernels::reference_matmul` and against
//! cuBLAS timed in the same run.
//!
//! Correctness: random inputs in [-1, 1] (never zeros), outputs poisoned with NaN before each
//! launch (or pre-filled with a sentinel where the kernel must leave elements untouched),
//! shapes that are not tile multiples, every compiled configuration.

use crate::kernel_check::Rng;
use crate::{time_ms, CudaDevice, DeviceError, DeviceTensor};
use lexp_compiler::dtype::{round_to, Storage};
use lexp_compiler::launch::{LaunchError, Launcher, TensorArg};
use lexp_kernels as k;
use lexp_kernels::reference as refr;
use lexp_kernels::reference_matmul as rm;

/// One correctness comparison.
#[derive(Clone, Debug)]
pub struct MatCheck {
    pub kernel: &'static str,
    pub dtype: &'static str,
    pub shape: String,
    pub config: String,
    pub output: &'static str,
    pub rel_l2: f64,
    pub max_abs: f64,
    pub tolerance: f64,
    pub non_finite: usize,
    pub pass: bool,
}

/// The three dense operand layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Nn,
    Nt,
    Tn,
}

impl Layout {
    pub const ALL: [Layout; 3] = [Layout::Nn, Layout::Nt, Layout::Tn];

    pub fn kernel(self) -> &'static str {
        match self {
            Layout::Nn => "gemm_nn",
            Layout::Nt => "gemm_nt",
            Layout::Tn => "gemm_tn",
        }
    }

    /// `(trans_a, trans_b)`.
    pub fn trans(self) -> (bool, bool) {
        match self {
            Layout::Nn => (false, false),
            Layout::Nt => (false, true),
            Layout::Tn => (true, false),
        }
    }

    /// Stored dims of `a` and `b` for `C[m, n] = op(A) op(B)` with reduction `kk`.
    pub fn dims(self, m: usize, n: usize, kk: usize) -> ([usize; 2], [usize; 2]) {
        let (ta, tb) = self.trans();
        (
            if ta { [kk, m] } else { [m, kk] },
            if tb { [n, kk] } else { [kk, n] },
        )
    }
}

pub(crate) fn rounded(dtype: Storage, v: Vec<f32>) -> Vec<f32> {
    v.into_iter()
        .map(|x| round_to(dtype.dtype(), x))
        .collect()
}

/// A random device tensor and its (rounded) host values.
pub(crate) fn random(
    dev: &CudaDevice,
    rng: &mut Rng,
    dtype: Storage,
    dims: &[usize],
) -> Result<(DeviceTensor, Vec<f32>), DeviceError> {
    let n = dims.iter().product();
    let host = rounded(dtype, rng.uniform(n, -1.0, 1.0));
    Ok((DeviceTensor::from_f32(dev, dtype, dims, &host)?, host))
}

/// Launches one dense GEMM.
pub fn launch_gemm(
    l: &dyn Launcher,
    layout: Layout,
    consts: &[(&str, usize)],
    a: &TensorArg,
    b: &TensorArg,
    c: &TensorArg,
) -> Result<(), LaunchError> {
    match layout {
        Layout::Nn => k::gemm_nn::launch_with(l, consts, &k::gemm_nn::Args { a, b, c }),
        Layout::Nt => k::gemm_nt::launch_with(l, consts, &k::gemm_nt::Args { a, b, c }),
        Layout::Tn => k::gemm_tn::launch_with(l, consts, &k::gemm_tn::Args { a, b, c }),
    }
}

fn configs(kernel: &str) -> Vec<Vec<(&'static str, usize)>> {
    lexp_kernels::find(kernel)
        .map(|k| k.configurations())
        .unwrap_or_else(|| vec![vec![]])
}

/// Whether `kernel` was compiled for element type `dtype`.
pub(crate) fn has_dtype(kernel: &str, dtype: Storage) -> bool {
    lexp_kernels::find(kernel)
        .is_some_and(|k| k.variants.iter().any(|v| v.param("T") == Some(dtype.name())))
}

fn config_text(c: &[(&str, usize)]) -> String {
    c.iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Compares `got` with `want` and records the row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record(
    rows: &mut Vec<MatCheck>,
    kernel: &'static str,
    dtype: Storage,
    shape: String,
    config: String,
    output: &'static str,
    got: &[f32],
    want: &[f32],
) {
    let d = refr::compare(got, want);
    let tol = refr::tolerance(dtype);
    rows.push(MatCheck {
        kernel,
        dtype: dtype.name(),
        shape,
        config,
        output,
        rel_l2: d.rel_l2,
        max_abs: d.max_abs,
        tolerance: tol,
        non_finite: d.non_finite,
        pass: d.within(tol),
    });
}

/// Dense GEMM checks: every layout, bf16 and f16, shapes with edges.
pub fn check_gemm(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let shapes = [(1, 8, 16), (200, 136, 72), (333, 264, 520), (1024, 512, 256)];
    for layout in Layout::ALL {
        for dtype in [Storage::BF16, Storage::F16] {
            if !has_dtype(layout.kernel(), dtype) {
                continue;
            }
            for (seed, &(m, n, kk)) in shapes.iter().enumerate() {
                let mut rng = Rng::new(seed as u64 + 11);
                let (da, db) = layout.dims(m, n, kk);
                let (ta, ha) = random(dev, &mut rng, dtype, &da)?;
                let (tb, hb) = random(dev, &mut rng, dtype, &db)?;
                let mut tc = DeviceTensor::poisoned(dev, dtype, &[m, n])?;
                let (tra, trb) = layout.trans();
                let want = rm::matmul(&ha, &hb, m, kk, n, tra, trb);
                for cfg in configs(layout.kernel()) {
                    tc.poison()?;
                    launch_gemm(dev, layout, &cfg, &ta.as_arg(), &tb.as_arg(), &tc.as_arg())?;
                    dev.synchronize()?;
                    let got = tc.to_f32_vec()?;
                    record(
                        &mut rows,
                        layout.kernel(),
                        dtype,
                        format!("{m}x{n}x{kk}"),
                        config_text(&cfg),
                        "c",
                        &got,
                        &want,
                    );
                }
            }
        }
    }
    Ok(rows)
}

/// One timed dense GEMM.
#[derive(Clone, Debug)]
pub struct GemmBench {
    pub kernel: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub config: String,
    pub ms: f64,
    pub tflops: f64,
}

/// Times every configuration of a dense GEMM (warm-up 10, median of `iters`).
pub fn bench_gemm(
    dev: &CudaDevice,
    layout: Layout,
    m: usize,
    n: usize,
    kk: usize,
    iters: usize,
) -> Result<Vec<GemmBench>, DeviceError> {
    let mut rng = Rng::new(5);
    let (da, db) = layout.dims(m, n, kk);
    let (ta, _) = random(dev, &mut rng, Storage::BF16, &da)?;
    let (tb, _) = random(dev, &mut rng, Storage::BF16, &db)?;
    let tc = DeviceTensor::zeros(dev, Storage::BF16, &[m, n])?;
    let mut out = vec![];
    for cfg in configs(layout.kernel()) {
        let t = time_ms(dev, 10, iters, || {
            launch_gemm(dev, layout, &cfg, &ta.as_arg(), &tb.as_arg(), &tc.as_arg())
        })?;
        let ms = t.median();
        out.push(GemmBench {
            kernel: layout.kernel(),
            m,
            n,
            k: kk,
            config: config_text(&cfg),
            ms,
            tflops: 2.0 * (m * n * kk) as f64 / (ms * 1e-3) / 1e12,
        });
    }
    Ok(out)
}
