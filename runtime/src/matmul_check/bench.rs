//! Speed of the tensor-core kernels against cuBLAS (and the PEFT sequence of cuBLAS calls),
//! measured in the same run; tile choices by the autotuner.

use super::*;
use crate::block_list::{self, BlockList};
use crate::cublas::{
    lora_backward_baseline, lora_forward_baseline, Blas, LoraGrads, LoraShape, LoraWeights,
    LoraWorkspace,
};
use crate::sparse_ops;
use crate::time_ms;

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

/// The autotuner's choice among `cands` for `key` (from its cache, else timing `launch`: 3
/// warm-ups, median of 10).
fn tuned<E: Into<DeviceError>>(
    dev: &CudaDevice,
    tuner: &crate::autotune::Autotuner,
    key: &str,
    cands: &[Vec<(&'static str, usize)>],
    launch: impl Fn(&[(&str, usize)]) -> Result<(), E>,
) -> Result<Vec<(&'static str, usize)>, DeviceError> {
    tuner
        .choose(key, cands, |c| -> Result<f64, DeviceError> {
            Ok(time_ms(dev, 3, 10, || launch(c))?.median())
        })
        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))
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
        let sparse_err =
            |e: crate::sparse_ops::SparseOpError| DeviceError::InvalidArgument(e.to_string());
        let c1 = tuned(
            dev,
            &tuner,
            &crate::autotune::key(&name, "sparse_out", "bf16", &[m, d, ffn, bs]),
            &cands("sparse_out"),
            |c| {
                sparse_ops::sparse_out(dev, &x.as_arg(), &w1.as_arg(), &full, &hf.as_arg(), bs, c)
                    .map_err(sparse_err)
            },
        )?;
        let c2 = tuned(
            dev,
            &tuner,
            &crate::autotune::key(&name, "sparse_red", "bf16", &[m, ffn, d, bs]),
            &cands("sparse_red"),
            |c| {
                sparse_ops::sparse_red(dev, &hf.as_arg(), &w2.as_arg(), &full, &y.as_arg(), bs, c)
                    .map_err(sparse_err)
            },
        )?;
        tracing::info!(?c1, ?c2, bs, "sparse tile choice");
        // The same tile in the other program order (`G` 1 <-> 8), timed beside it: what the
        // swizzle is worth at each density, in the same process.
        let c1_order: Vec<(&'static str, usize)> = c1
            .iter()
            .map(|&(n, v)| {
                if n == "G" {
                    (n, if v == 1 { 8 } else { 1 })
                } else {
                    (n, v)
                }
            })
            .collect();
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
            let t1_order = time_ms(dev, 5, iters, || {
                sparse_ops::sparse_out(
                    dev,
                    &x.as_arg(),
                    &w1.as_arg(),
                    &bl,
                    &h.as_arg(),
                    bs,
                    &c1_order,
                )
                .map_err(|e| DeviceError::InvalidArgument(e.to_string()))
            })?;
            out.push(SparseBench {
                mode: "sparse_out, other G",
                config: config_text(&c1_order),
                m,
                k: d,
                n: ffn,
                bs,
                density: max as f64 / nb as f64,
                ms: t1_order.median(),
                cublas_dense_ms: dense_fc1,
            });
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
    let y = DeviceTensor::zeros(dev, bf, &[m, d])?;
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
        tuned(
            dev,
            &tuner,
            &crate::autotune::key(&name, kernel, "bf16", dims),
            &cands,
            f,
        )
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
    let peft = time_peft(dev, blas, iters, (&x, &w, &a, &b, &dy), s)?;
    let (pf, pb) = (peft.forward_ms, peft.backward_ms);
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

/// PEFT's LoRA layer on cuBLAS (`lora_forward_baseline`, `lora_backward_baseline`), timed
/// (warm-up 5, median of `iters`), with the last pass's results.
pub(super) struct PeftRun {
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// `y`, `dx` (`[m, d]`), `dA` (`[r, d]`), `dB` (`[d, r]`), in the inputs' type.
    pub y: DeviceTensor,
    pub dx: DeviceTensor,
    pub da: DeviceTensor,
    pub db: DeviceTensor,
}

/// Times PEFT's sequence on `x [m, d]`, `w [d, d]`, `a [r, d]`, `b [d, r]`, `dy [m, d]` at
/// scale `s` (see [`PeftRun`]).
pub(super) fn time_peft(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
    (x, w, a, b, dy): (
        &DeviceTensor,
        &DeviceTensor,
        &DeviceTensor,
        &DeviceTensor,
        &DeviceTensor,
    ),
    s: f32,
) -> Result<PeftRun, DeviceError> {
    let (m, d, r, dt) = (x.dims()[0], x.dims()[1], a.dims()[0], x.dtype());
    let shape = LoraShape {
        m,
        in_features: d,
        out_features: d,
        rank: r,
    };
    let mut ws = LoraWorkspace::new(dev, dt, shape)?;
    let weights = LoraWeights {
        w,
        lora_a: a,
        lora_b: b,
        scale: s,
    };
    let mut y = DeviceTensor::zeros(dev, dt, &[m, d])?;
    let forward_ms = time_ms(dev, 5, iters, || {
        lora_forward_baseline(dev, blas, &mut ws, &weights, x, &mut y)
    })?
    .median();
    let (mut dx, mut da, mut db) = (
        DeviceTensor::zeros(dev, dt, &[m, d])?,
        DeviceTensor::zeros(dev, dt, &[r, d])?,
        DeviceTensor::zeros(dev, dt, &[d, r])?,
    );
    let backward_ms = time_ms(dev, 5, iters, || {
        lora_backward_baseline(
            dev,
            blas,
            &mut ws,
            &weights,
            x,
            dy,
            LoraGrads {
                dx: &mut dx,
                d_lora_a: &mut da,
                d_lora_b: &mut db,
            },
        )
    })?
    .median();
    Ok(PeftRun {
        forward_ms,
        backward_ms,
        y,
        dx,
        da,
        db,
    })
}
