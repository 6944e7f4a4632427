//! GPU checks and benchmarks of the tensor-core kernels (dense GEMMs, block-sparse GEMMs, the
//! sparse MLP operators, fused LoRA) against the CPU references of
//! `lexp_kernels::reference_matmul` and `reference_sparse_mlp` ([`checks`], [`checks_mlp`])
//! and against cuBLAS timed in the same run ([`bench`]).
//!
//! Correctness: random inputs in [-1, 1] (never zeros), outputs poisoned with NaN before each
//! launch (or pre-filled with a sentinel where the kernel must leave elements untouched),
//! shapes that are not tile multiples, every compiled configuration.

mod bench;
mod bench_branch;
mod bench_fold;
mod checks;
mod checks_lora_branch;
mod checks_mlp;
mod checks_select;

pub use bench::{
    bench_gemm, bench_lora, bench_sparse, cublas_ms, cublas_nt_ms, GemmBench, LoraBench,
    SparseBench,
};
pub use bench_branch::{bench_lora_branch, BranchBench};
pub use bench_fold::{bench_lora_fold, FoldBench};
pub use checks::{check_gemm, check_lora, check_sparse};
pub use checks_lora_branch::check_lora_branch;
pub use checks_mlp::check_sparse_mlp;
pub use checks_select::check_select;

use crate::kernel_check::Rng;
use crate::{CudaDevice, DeviceError, DeviceTensor};
use lexp_compiler::dtype::{round_to, Storage};
use lexp_compiler::launch::{LaunchError, Launcher, TensorArg};
use lexp_kernels as k;
use lexp_kernels::reference as refr;

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
    v.into_iter().map(|x| round_to(dtype.dtype(), x)).collect()
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

/// Whether `kernel` has a compiled configuration with all of `consts`.
pub(crate) fn has_config(kernel: &str, consts: &[(&str, usize)]) -> bool {
    configs(kernel)
        .iter()
        .any(|c| consts.iter().all(|(n, v)| cfg_value(c, n) == *v))
}

/// Whether `kernel` was compiled for element type `dtype`.
pub(crate) fn has_dtype(kernel: &str, dtype: Storage) -> bool {
    lexp_kernels::find(kernel).is_some_and(|k| {
        k.variants
            .iter()
            .any(|v| v.param("T") == Some(dtype.name()))
    })
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

fn cfg_value(cfg: &[(&str, usize)], name: &str) -> usize {
    cfg.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}
