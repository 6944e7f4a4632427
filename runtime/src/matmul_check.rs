//! GPU checks and benchmarks of the tensor-core kernels (dense GEMMs, block-sparse GEMMs,
//! fused LoRA) against the CPU references of `lexp_kernels::reference_matmul` and against
//! cuBLAS timed in the same run.
//!
//! Correctness: random inputs in [-1, 1] (never zeros), outputs poisoned with NaN before each
//! launch (or pre-filled with a sentinel where the kernel must leave elements untouched),
//! shapes that are not tile multiples, every compiled configuration.

use crate::block_list::{self, BlockList};
use crate::cublas::{
    lora_backward_baseline, lora_forward_baseline, Blas, LoraGrads, LoraShape, LoraWeights,
    LoraWorkspace,
};
use crate::kernel_check::Rng;
use crate::sparse_ops;
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

/// Dense GEMM checks: every layout, bf16 and f16, shapes with edges.
pub fn check_gemm(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let shapes = [
        (8, 8, 16),
        (200, 136, 72),
        (328, 264, 520),
        (1024, 512, 256),
    ];
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

/// A device tensor filled with `v` everywhere (the sentinel of outputs a kernel must leave
/// partly untouched).
fn filled(
    dev: &CudaDevice,
    dtype: Storage,
    dims: &[usize],
    v: f32,
) -> Result<(DeviceTensor, Vec<f32>), DeviceError> {
    let host = vec![v; dims.iter().product()];
    Ok((DeviceTensor::from_f32(dev, dtype, dims, &host)?, host))
}

/// A random block list with one empty group (the early-exit path) and the rest at `density`.
fn list(
    dev: &CudaDevice,
    groups: usize,
    num_blocks: usize,
    density: f64,
    seed: u64,
) -> Result<(BlockList, Vec<i32>, Vec<i32>, usize), DeviceError> {
    let (mut counts, idx, max) = block_list::random_host(groups, num_blocks, density, seed);
    // Pad to one more slot than used, so the bound is not the count; group 1 keeps nothing.
    let max2 = max + 1;
    let mut padded = vec![-1i32; groups * max2];
    for g in 0..groups {
        padded[g * max2..g * max2 + max].copy_from_slice(&idx[g * max..g * max + max]);
    }
    if groups > 1 {
        counts[1] = 0;
    }
    let bl = BlockList::from_host(dev, &counts, &padded, max2, num_blocks)
        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
    Ok((bl, counts, padded, max2))
}

/// Block-sparse GEMM checks: the three modes, both block sizes, edge row counts.
pub fn check_sparse(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let bm = sparse_ops::GROUP_ROWS;
    for dtype in [Storage::BF16, Storage::F16] {
        for bs in [64usize, 128] {
            for (seed, &(m, kk, nb)) in [(300usize, 264usize, 5usize), (512, 128, 8)]
                .iter()
                .enumerate()
            {
                for warps in [4usize, 8] {
                    let cfg = vec![("W", warps)];
                    let mut rng = Rng::new(seed as u64 + 31);
                    let groups = m.div_ceil(bm);
                    let f = nb * bs;
                    let (bl, counts, idx, max) = list(dev, groups, nb, 0.6, seed as u64)?;
                    // sparse_out: x [m, kk] · w [f, kk]ᵀ.
                    let (x, hx) = random(dev, &mut rng, dtype, &[m, kk])?;
                    let (w, hw) = random(dev, &mut rng, dtype, &[f, kk])?;
                    let (h, init) = filled(dev, dtype, &[m, max * bs], 7.0)?;
                    let has = |kernel: &str| has_config(kernel, &[("W", warps), ("BS", bs)]);
                    let shape = format!("{m}x{kk} -> {nb}x{bs}");
                    if has("sparse_out") {
                        sparse_ops::sparse_out(
                            dev,
                            &x.as_arg(),
                            &w.as_arg(),
                            &bl,
                            &h.as_arg(),
                            bs,
                            &cfg,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
                        dev.synchronize()?;
                        let want =
                            rm::sparse_out(&hx, &hw, m, kk, f, &counts, &idx, max, bm, bs, &init);
                        record(
                            &mut rows,
                            "sparse_out",
                            dtype,
                            shape.clone(),
                            format!("BS={bs},W={warps}"),
                            "h",
                            &h.to_f32_vec()?,
                            &want,
                        );
                    }
                    // sparse_red: h [m, max*bs] (compact, random) · w2 [n, f]ᵀ.
                    let n = 136;
                    let (hc, hh) = random(dev, &mut rng, dtype, &[m, max * bs])?;
                    let (w2, hw2) = random(dev, &mut rng, dtype, &[n, f])?;
                    let mut y = DeviceTensor::poisoned(dev, dtype, &[m, n])?;
                    y.poison()?;
                    if has("sparse_red") {
                        sparse_ops::sparse_red(
                            dev,
                            &hc.as_arg(),
                            &w2.as_arg(),
                            &bl,
                            &y.as_arg(),
                            bs,
                            &cfg,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
                        dev.synchronize()?;
                        let want = rm::sparse_red(&hh, &hw2, m, n, f, &counts, &idx, max, bm, bs);
                        record(
                            &mut rows,
                            "sparse_red",
                            dtype,
                            shape.clone(),
                            format!("BS={bs},W={warps}"),
                            "y",
                            &y.to_f32_vec()?,
                            &want,
                        );
                    }
                    // sparse_both: out list over w's rows, in list = bl over its columns.
                    let nbo = 3;
                    let (blo, co, io, maxo) = list(dev, groups, nbo, 0.7, seed as u64 + 100)?;
                    let (wb, hwb) = random(dev, &mut rng, dtype, &[nbo * bs, f])?;
                    let (o, init_o) = filled(dev, dtype, &[m, maxo * bs], 7.0)?;
                    if has("sparse_both") {
                        sparse_ops::sparse_both(
                            dev,
                            &hc.as_arg(),
                            &wb.as_arg(),
                            &blo,
                            &bl,
                            &o.as_arg(),
                            bs,
                            &cfg,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
                        dev.synchronize()?;
                        let want = rm::sparse_both(
                            &hh,
                            &hwb,
                            m,
                            nbo * bs,
                            f,
                            &co,
                            &io,
                            maxo,
                            &counts,
                            &idx,
                            max,
                            bm,
                            bs,
                            &init_o,
                        );
                        record(
                            &mut rows,
                            "sparse_both",
                            dtype,
                            shape.clone(),
                            format!("BS={bs},W={warps}"),
                            "out",
                            &o.to_f32_vec()?,
                            &want,
                        );
                    }
                }
            }
        }
    }
    Ok(rows)
}

/// Fused LoRA checks (forward, backward to the input, weight gradients).
pub fn check_lora(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let r = 16;
    let s = 2.0f32;
    for dtype in [Storage::BF16, Storage::F16] {
        let round = |v: f64| round_to(dtype.dtype(), v as f32);
        for (seed, &(m, kk, n)) in [(200usize, 136usize, 264usize), (1024, 512, 256)]
            .iter()
            .enumerate()
        {
            for warps in [4usize, 8] {
                let tile = [("W", warps)];
                let tname = format!("W={warps}");
                let mut rng = Rng::new(seed as u64 + 77);
                let shape = format!("{m}x{kk} -> {n}, r {r}");
                let (x, hx) = random(dev, &mut rng, dtype, &[m, kk])?;
                let (w, hw) = random(dev, &mut rng, dtype, &[n, kk])?;
                let (bias, hbias) = random(dev, &mut rng, dtype, &[n])?;
                let (a, ha) = random(dev, &mut rng, dtype, &[r, kk])?;
                let (b, hb) = random(dev, &mut rng, dtype, &[n, r])?;
                let y = DeviceTensor::poisoned(dev, dtype, &[m, n])?;
                let xa = DeviceTensor::poisoned(dev, dtype, &[m, r])?;
                if !has_config("lora_fwd", &tile) || !has_config("lora_bwd_dx", &tile) {
                    continue;
                }
                k::lora_fwd::launch_with(
                    dev,
                    &tile,
                    &k::lora_fwd::Args {
                        x: &x.as_arg(),
                        w: &w.as_arg(),
                        bias: &bias.as_arg(),
                        a: &a.as_arg(),
                        b: &b.as_arg(),
                        s,
                        y: &y.as_arg(),
                        xa: &xa.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let (wy, wxa) =
                    rm::lora_fwd(&hx, &hw, Some(&hbias), &ha, &hb, s, m, kk, n, r, round);
                let got_xa = xa.to_f32_vec()?;
                record(
                    &mut rows,
                    "lora_fwd",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "xa",
                    &got_xa,
                    &wxa,
                );
                record(
                    &mut rows,
                    "lora_fwd",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "y",
                    &y.to_f32_vec()?,
                    &wy,
                );
                // Backward to the input.
                let (dy, hdy) = random(dev, &mut rng, dtype, &[m, n])?;
                let dx = DeviceTensor::poisoned(dev, dtype, &[m, kk])?;
                let u = DeviceTensor::poisoned(dev, dtype, &[m, r])?;
                k::lora_bwd_dx::launch_with(
                    dev,
                    &tile,
                    &k::lora_bwd_dx::Args {
                        dy: &dy.as_arg(),
                        w: &w.as_arg(),
                        a: &a.as_arg(),
                        b: &b.as_arg(),
                        s,
                        dx: &dx.as_arg(),
                        u: &u.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let (wdx, wu) = rm::lora_bwd_dx(&hdy, &hw, &ha, &hb, s, m, kk, n, r, round);
                let got_u = u.to_f32_vec()?;
                record(
                    &mut rows,
                    "lora_bwd_dx",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "u",
                    &got_u,
                    &wu,
                );
                record(
                    &mut rows,
                    "lora_bwd_dx",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "dx",
                    &dx.to_f32_vec()?,
                    &wdx,
                );
                // Weight gradients from the kernel's own u and xa.
                let mut da = DeviceTensor::zeros(dev, Storage::F32, &[r, kk])?;
                let mut db = DeviceTensor::zeros(dev, Storage::F32, &[n, r])?;
                for cfg in configs("lora_grad")
                    .into_iter()
                    .filter(|c| cfg_value(c, "W") == warps)
                {
                    da.fill_zero()?;
                    db.fill_zero()?;
                    let (bp, bq) = (cfg_value(&cfg, "BP"), cfg_value(&cfg, "BQ"));
                    // dA = uᵀ x: P = r; dB = dyᵀ xa: Q = r. Each config runs where it fits.
                    if bp == 16 {
                        k::lora_grad::launch_with(
                            dev,
                            &cfg,
                            &k::lora_grad::Args {
                                a: &u.as_arg(),
                                b: &x.as_arg(),
                                c: &da.as_arg(),
                            },
                        )?;
                        dev.synchronize()?;
                        let want = rm::lora_grad_a(&got_u, &hx, m, kk, r);
                        record(
                            &mut rows,
                            "lora_grad",
                            dtype,
                            shape.clone(),
                            config_text(&cfg),
                            "dA",
                            &da.to_f32_vec()?,
                            &want,
                        );
                    }
                    if bq == 16 {
                        k::lora_grad::launch_with(
                            dev,
                            &cfg,
                            &k::lora_grad::Args {
                                a: &dy.as_arg(),
                                b: &xa.as_arg(),
                                c: &db.as_arg(),
                            },
                        )?;
                        dev.synchronize()?;
                        let want = rm::lora_grad_b(&hdy, &got_xa, m, n, r);
                        record(
                            &mut rows,
                            "lora_grad",
                            dtype,
                            shape.clone(),
                            config_text(&cfg),
                            "dB",
                            &db.to_f32_vec()?,
                            &want,
                        );
                    }
                }
            }
        }
    }
    Ok(rows)
}

fn cfg_value(cfg: &[(&str, usize)], name: &str) -> usize {
    cfg.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

/// One sparse timing next to the dense cuBLAS product it replaces.
#[derive(Clone, Debug)]
pub struct SparseBench {
    pub mode: &'static str,
    /// The autotuner's tile choice.
    pub config: String,
    /// `(tokens, reduction, output)` of the dense product.
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub bs: usize,
    pub density: f64,
    pub ms: f64,
    pub cublas_dense_ms: f64,
}

/// Median ms of a cuBLAS GEMM `c[m, n] = a[m, k] · b[n, k]ᵀ` (the `x · Wᵀ` form).
pub fn cublas_nt_ms(
    dev: &CudaDevice,
    blas: &Blas,
    m: usize,
    n: usize,
    kk: usize,
    iters: usize,
) -> Result<f64, DeviceError> {
    let mut rng = Rng::new(3);
    let (a, _) = random(dev, &mut rng, Storage::BF16, &[m, kk])?;
    let (b, _) = random(dev, &mut rng, Storage::BF16, &[n, kk])?;
    let mut c = DeviceTensor::zeros(dev, Storage::BF16, &[m, n])?;
    Ok(time_ms(dev, 10, iters, || {
        blas.gemm(&a, &b, &mut c, false, true, 1.0, 0.0)
    })?
    .median())
}

/// Median ms of cuBLAS for a dense layout (`gemm` with the matching transposes).
pub fn cublas_ms(
    dev: &CudaDevice,
    blas: &Blas,
    layout: Layout,
    m: usize,
    n: usize,
    kk: usize,
    iters: usize,
) -> Result<f64, DeviceError> {
    let mut rng = Rng::new(3);
    let (da, db) = layout.dims(m, n, kk);
    let (a, _) = random(dev, &mut rng, Storage::BF16, &da)?;
    let (b, _) = random(dev, &mut rng, Storage::BF16, &db)?;
    let mut c = DeviceTensor::zeros(dev, Storage::BF16, &[m, n])?;
    let (ta, tb) = layout.trans();
    Ok(time_ms(dev, 10, iters, || {
        blas.gemm(&a, &b, &mut c, ta, tb, 1.0, 0.0)
    })?
    .median())
}

/// The OPT-1.3B MLP (16384 tokens, d 2048, ffn 8192) as block-sparse GEMMs at several
/// densities, per 128-token group, blocks of 64 and 128 neurons; dense cuBLAS of the same
/// products in the same run.
pub fn bench_sparse(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
) -> Result<Vec<SparseBench>, DeviceError> {
    let (m, d, ffn) = (16384usize, 2048usize, 8192usize);
    let dense_fc1 = cublas_nt_ms(dev, blas, m, ffn, d, iters)?;
    let dense_fc2 = cublas_nt_ms(dev, blas, m, d, ffn, iters)?;
    let mut rng = Rng::new(8);
    let (x, _) = random(dev, &mut rng, Storage::BF16, &[m, d])?;
    let (w1, _) = random(dev, &mut rng, Storage::BF16, &[ffn, d])?;
    let (w2, _) = random(dev, &mut rng, Storage::BF16, &[d, ffn])?;
    let y = DeviceTensor::zeros(dev, Storage::BF16, &[m, d])?;
    let groups = m / sparse_ops::GROUP_ROWS;
    let mut out = vec![];
    for bs in [64usize, 128] {
        let nb = ffn / bs;
        // Tile choice per (mode, block size), by the autotuner at full density.
        let (counts, idx, max) = block_list::random_host(groups, nb, 1.0, 42);
        let full = BlockList::from_host(dev, &counts, &idx, max, nb)
            .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
        let hf = DeviceTensor::zeros(dev, Storage::BF16, &[m, max * bs])?;
        let cands = |kernel: &str| -> Vec<Vec<(&'static str, usize)>> {
            configs(kernel)
                .into_iter()
                .filter(|c| cfg_value(c, "BS") == bs)
                .collect()
        };
        let tuner = crate::autotune::Autotuner::new();
        let name = dev.name().to_string();
        let c1 = tuner
            .choose(
                &crate::autotune::key(&name, "sparse_out", "bf16", &[m, d, ffn, bs]),
                &cands("sparse_out"),
                |c| -> Result<f64, DeviceError> {
                    Ok(time_ms(dev, 3, 10, || {
                        sparse_ops::sparse_out(
                            dev,
                            &x.as_arg(),
                            &w1.as_arg(),
                            &full,
                            &hf.as_arg(),
                            bs,
                            c,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))
                    })?
                    .median())
                },
            )
            .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
        let c2 = tuner
            .choose(
                &crate::autotune::key(&name, "sparse_red", "bf16", &[m, ffn, d, bs]),
                &cands("sparse_red"),
                |c| -> Result<f64, DeviceError> {
                    Ok(time_ms(dev, 3, 10, || {
                        sparse_ops::sparse_red(
                            dev,
                            &hf.as_arg(),
                            &w2.as_arg(),
                            &full,
                            &y.as_arg(),
                            bs,
                            c,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))
                    })?
                    .median())
                },
            )
            .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
        tracing::info!(?c1, ?c2, bs, "sparse tile choice");
        for density in [0.125, 0.25, 0.5, 0.75, 1.0] {
            let (counts, idx, max) = block_list::random_host(groups, nb, density, 42);
            let bl = BlockList::from_host(dev, &counts, &idx, max, nb)
                .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
            let h = DeviceTensor::zeros(dev, Storage::BF16, &[m, max * bs])?;
            let t1 = time_ms(dev, 5, iters, || {
                sparse_ops::sparse_out(dev, &x.as_arg(), &w1.as_arg(), &bl, &h.as_arg(), bs, &c1)
                    .map_err(|e| DeviceError::InvalidArgument(e.to_string()))
            })?;
            let t2 = time_ms(dev, 5, iters, || {
                sparse_ops::sparse_red(dev, &h.as_arg(), &w2.as_arg(), &bl, &y.as_arg(), bs, &c2)
                    .map_err(|e| DeviceError::InvalidArgument(e.to_string()))
            })?;
            out.push(SparseBench {
                mode: "sparse_out",
                config: config_text(&c1),
                m,
                k: d,
                n: ffn,
                bs,
                density: max as f64 / nb as f64,
                ms: t1.median(),
                cublas_dense_ms: dense_fc1,
            });
            out.push(SparseBench {
                mode: "sparse_red",
                config: config_text(&c2),
                m,
                k: ffn,
                n: d,
                bs,
                density: max as f64 / nb as f64,
                ms: t2.median(),
                cublas_dense_ms: dense_fc2,
            });
        }
    }
    Ok(out)
}

/// Fused LoRA against the PEFT-style cuBLAS sequence, same run.
#[derive(Clone, Debug)]
pub struct LoraBench {
    pub pass: &'static str,
    pub m: usize,
    pub d: usize,
    pub r: usize,
    pub fused_ms: f64,
    pub peft_ms: f64,
}

/// LoRA rank 16 on a 2048 x 2048 layer over 2048, 4096 and 16384 tokens: forward and backward.
pub fn bench_lora(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
) -> Result<Vec<LoraBench>, DeviceError> {
    let mut out = vec![];
    // 2048 and 4096 tokens are the training batches of DESIGN.md (4 x 512, 4 x 1024); 16384
    // the sparse-MLP benchmark's.
    for m in [2048usize, 4096, 16384] {
        out.extend(bench_lora_at(dev, blas, iters, m)?);
    }
    Ok(out)
}

/// [`bench_lora`] for `m` tokens.
fn bench_lora_at(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
    m: usize,
) -> Result<Vec<LoraBench>, DeviceError> {
    let (d, r) = (2048usize, 16usize);
    let bf = Storage::BF16;
    let mut rng = Rng::new(21);
    let (x, _) = random(dev, &mut rng, bf, &[m, d])?;
    let (w, _) = random(dev, &mut rng, bf, &[d, d])?;
    let (bias, _) = random(dev, &mut rng, bf, &[d])?;
    let (a, _) = random(dev, &mut rng, bf, &[r, d])?;
    let (b, _) = random(dev, &mut rng, bf, &[d, r])?;
    let (dy, _) = random(dev, &mut rng, bf, &[m, d])?;
    let s = 2.0f32;
    let mut y = DeviceTensor::zeros(dev, bf, &[m, d])?;
    let xa = DeviceTensor::zeros(dev, bf, &[m, r])?;
    let dx = DeviceTensor::zeros(dev, bf, &[m, d])?;
    let u = DeviceTensor::zeros(dev, bf, &[m, r])?;
    let mut da = DeviceTensor::zeros(dev, Storage::F32, &[r, d])?;
    let mut db = DeviceTensor::zeros(dev, Storage::F32, &[d, r])?;
    let tuner = crate::autotune::Autotuner::new();
    let name = dev.name().to_string();
    let pick = |kernel: &str,
                dims: &[usize],
                keep: &dyn Fn(&[(&str, usize)]) -> bool,
                f: &dyn Fn(&[(&str, usize)]) -> Result<(), LaunchError>|
     -> Result<Vec<(&'static str, usize)>, DeviceError> {
        let cands: Vec<_> = configs(kernel).into_iter().filter(|c| keep(c)).collect();
        tuner
            .choose(
                &crate::autotune::key(&name, kernel, "bf16", dims),
                &cands,
                |c| -> Result<f64, DeviceError> { Ok(time_ms(dev, 3, 10, || f(c))?.median()) },
            )
            .map_err(|e| DeviceError::InvalidArgument(e.to_string()))
    };
    let fwd_args = k::lora_fwd::Args {
        x: &x.as_arg(),
        w: &w.as_arg(),
        bias: &bias.as_arg(),
        a: &a.as_arg(),
        b: &b.as_arg(),
        s,
        y: &y.as_arg(),
        xa: &xa.as_arg(),
    };
    let fwd_cfg = pick("lora_fwd", &[m, d, d, r], &|_| true, &|c| {
        k::lora_fwd::launch_with(dev, c, &fwd_args)
    })?;
    let fwd = time_ms(dev, 5, iters, || {
        k::lora_fwd::launch_with(dev, &fwd_cfg, &fwd_args)
    })?
    .median();
    let dx_args = k::lora_bwd_dx::Args {
        dy: &dy.as_arg(),
        w: &w.as_arg(),
        a: &a.as_arg(),
        b: &b.as_arg(),
        s,
        dx: &dx.as_arg(),
        u: &u.as_arg(),
    };
    let dx_cfg = pick("lora_bwd_dx", &[m, d, d, r], &|_| true, &|c| {
        k::lora_bwd_dx::launch_with(dev, c, &dx_args)
    })?;
    let da_args = k::lora_grad::Args {
        a: &u.as_arg(),
        b: &x.as_arg(),
        c: &da.as_arg(),
    };
    let db_args = k::lora_grad::Args {
        a: &dy.as_arg(),
        b: &xa.as_arg(),
        c: &db.as_arg(),
    };
    let da_cfg = pick(
        "lora_grad",
        &[m, r, d],
        &|c| cfg_value(c, "BP") == 16,
        &|c| k::lora_grad::launch_with(dev, c, &da_args),
    )?;
    let db_cfg = pick(
        "lora_grad",
        &[m, d, r],
        &|c| cfg_value(c, "BQ") == 16,
        &|c| k::lora_grad::launch_with(dev, c, &db_args),
    )?;
    let grad = |da: &mut DeviceTensor, db: &mut DeviceTensor| -> Result<(), DeviceError> {
        k::lora_bwd_dx::launch_with(dev, &dx_cfg, &dx_args)?;
        da.fill_zero()?;
        db.fill_zero()?;
        k::lora_grad::launch_with(dev, &da_cfg, &da_args)?;
        k::lora_grad::launch_with(dev, &db_cfg, &db_args)?;
        Ok(())
    };
    let bwd = time_ms(dev, 5, iters, || grad(&mut da, &mut db))?.median();
    tracing::info!(?fwd_cfg, ?dx_cfg, ?da_cfg, ?db_cfg, "LoRA tile choice");
    let shape = LoraShape {
        m,
        in_features: d,
        out_features: d,
        rank: r,
    };
    let mut ws = LoraWorkspace::new(dev, bf, shape)?;
    let weights = LoraWeights {
        w: &w,
        lora_a: &a,
        lora_b: &b,
        scale: s,
    };
    let pf = time_ms(dev, 5, iters, || {
        lora_forward_baseline(dev, blas, &mut ws, &weights, &x, &mut y)
    })?
    .median();
    let (mut gdx, mut gda, mut gdb) = (
        DeviceTensor::zeros(dev, bf, &[m, d])?,
        DeviceTensor::zeros(dev, bf, &[r, d])?,
        DeviceTensor::zeros(dev, bf, &[d, r])?,
    );
    let pb = time_ms(dev, 5, iters, || {
        lora_backward_baseline(
            dev,
            blas,
            &mut ws,
            &weights,
            &x,
            &dy,
            LoraGrads {
                dx: &mut gdx,
                d_lora_a: &mut gda,
                d_lora_b: &mut gdb,
            },
        )
    })?
    .median();
    Ok(vec![
        LoraBench {
            pass: "forward",
            m,
            d,
            r,
            fused_ms: fwd,
            peft_ms: pf,
        },
        LoraBench {
            pass: "backward",
            m,
            d,
            r,
            fused_ms: bwd,
            peft_ms: pb,
        },
    ])
}
