//! Speed of the LoRA branch kernels (`lexp_kernels::lora_branch`) against the cuBLAS calls
//! they replace, on the engine's shape (OPT-1.3B's q/v projection: 4096 tokens, 2048
//! features, rank 4), every compiled configuration, in the same run; `lora_down` also at the
//! fused-LoRA bench's 2048 tokens, rank 16. Each row also gives the bandwidth its bytes need
//! (the kernels are a pass over an activation).

use super::*;
use crate::cublas::{Blas, Mat, MatLayout, MatMut};
use crate::gpu::ops::mm;
use crate::time_ms;

/// One timed branch product.
#[derive(Clone, Debug)]
pub struct BranchBench {
    /// What it computes.
    pub op: &'static str,
    pub config: String,
    pub ms: f64,
    /// The cuBLAS call(s) the engine ran before, same run.
    pub cublas_ms: f64,
    /// Bytes moved over the time (GB/s).
    pub gbs: f64,
}

/// Times `lora_down`, `lora_expand` and `lora_wgrad` + `lora_wgrad_reduce` (every
/// configuration) and their cuBLAS equivalents (warm-up 5, median of `iters`).
pub fn bench_lora_branch(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
) -> Result<Vec<BranchBench>, DeviceError> {
    let (m, d, r) = (4096usize, 2048usize, 4usize);
    let rp = r.div_ceil(8) * 8;
    let bf = Storage::BF16;
    let mut rng = Rng::new(31);
    let (x, _) = random(dev, &mut rng, bf, &[m, d])?;
    let (a, _) = random(dev, &mut rng, bf, &[r, d])?;
    let (b, _) = random(dev, &mut rng, bf, &[d, r])?;
    let (bt, _) = random(dev, &mut rng, bf, &[r, d])?;
    let (mut y, _) = random(dev, &mut rng, bf, &[m, d])?;
    let mut u = DeviceTensor::zeros(dev, bf, &[m, rp])?;
    let mut g = DeviceTensor::zeros(dev, Storage::F32, &[d * r])?;
    let chunks = crate::gpu::ops::LORA_WGRAD_CHUNKS;
    let part = DeviceTensor::zeros(dev, Storage::F32, &[chunks * d * rp])?;
    let ul = MatLayout::at(0, m, r, rp);
    let err = |e: crate::model::ModelError| DeviceError::InvalidArgument(e.to_string());
    let act = (m * d * 2) as f64;
    let mut out = vec![];
    let mut push = |op, config: String, ms: f64, cublas_ms: f64, bytes: f64| {
        out.push(BranchBench {
            op,
            config,
            ms,
            cublas_ms,
            gbs: bytes / (ms * 1e-3) / 1e9,
        })
    };

    for (ms, base, cfg) in time_down(dev, blas, iters, (&x, &a, &mut u, ul))? {
        push("u = x·Aᵀ", cfg, ms, base, act);
    }
    // The fused-LoRA bench's down product (`bench_fold`: 2048 tokens, rank 16), where 32-row
    // programs fill half the GPU.
    let (m2, r2) = (2048usize, 16usize);
    let (x2, _) = random(dev, &mut rng, bf, &[m2, d])?;
    let (a2, _) = random(dev, &mut rng, bf, &[r2, d])?;
    let mut u2 = DeviceTensor::zeros(dev, bf, &[m2, r2])?;
    let ul2 = MatLayout::dense(m2, r2);
    for (ms, base, cfg) in time_down(dev, blas, iters, (&x2, &a2, &mut u2, ul2))? {
        let label = "u = x·Aᵀ (2048 tokens, rank 16)";
        push(label, cfg, ms, base, (m2 * d * 2) as f64);
    }

    let base = time_ms(dev, 5, iters, || {
        let yo = MatMut::new(&mut y, MatLayout::dense(m, d));
        mm(
            blas,
            Mat::new(&u, ul),
            dense(&b, d, r),
            yo,
            false,
            true,
            2.0,
            1.0,
        )
        .map_err(err)
    })?
    .median();
    for cfg in configs("lora_expand") {
        let args = k::lora_expand::Args {
            u: &u.as_arg(),
            w: &bt.as_arg(),
            s: 2.0,
            y: &y.as_arg(),
        };
        let ms = time_ms(dev, 5, iters, || {
            k::lora_expand::launch_with(dev, &cfg, &args)
        })?
        .median();
        push("y += s·u·Bᵀ", config_text(&cfg), ms, base, 2.0 * act);
    }

    let base = time_ms(dev, 5, iters, || {
        let go = MatMut::new(&mut g, MatLayout::dense(d, r));
        mm(
            blas,
            dense(&y, m, d),
            Mat::new(&u, ul),
            go,
            true,
            false,
            2.0,
            1.0,
        )
        .map_err(err)
    })?
    .median();
    for cfg in configs("lora_wgrad") {
        let args = k::lora_wgrad::Args {
            a: &u.as_arg(),
            b: &y.as_arg(),
            part: &part.offset_arg(0, &[chunks * d, rp])?,
        };
        let red = k::lora_wgrad_reduce::Args {
            part: &part.offset_arg(0, &[chunks, d * rp])?,
            q: d as i64,
            r: r as i64,
            rp: rp as i64,
            tr: 0,
            s: 2.0,
            g: &g.as_arg(),
        };
        let ms = time_ms(dev, 5, iters, || {
            k::lora_wgrad::launch_with(dev, &cfg, &args)?;
            k::lora_wgrad_reduce::launch(dev, &red)
        })?
        .median();
        push("dB += s·dyᵀ·u", config_text(&cfg), ms, base, act);
    }
    Ok(out)
}

fn dense(t: &DeviceTensor, rows: usize, cols: usize) -> Mat<'_> {
    Mat::new(t, MatLayout::dense(rows, cols))
}

/// `u = x·aᵀ` (`u` in layout `ul`) by `lora_down` in every configuration: per configuration
/// `(ms, cuBLAS ms, configuration)`, the cuBLAS GEMM timed once first.
fn time_down(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
    (x, a, u, ul): (&DeviceTensor, &DeviceTensor, &mut DeviceTensor, MatLayout),
) -> Result<Vec<(f64, f64, String)>, DeviceError> {
    let err = |e: crate::model::ModelError| DeviceError::InvalidArgument(e.to_string());
    let (m, d, r) = (x.dims()[0], x.dims()[1], a.dims()[0]);
    let base = time_ms(dev, 5, iters, || {
        let uo = MatMut::new(&mut *u, ul);
        mm(
            blas,
            dense(x, m, d),
            dense(a, r, d),
            uo,
            false,
            true,
            1.0,
            0.0,
        )
        .map_err(err)
    })?
    .median();
    let mut out = vec![];
    for cfg in configs("lora_down") {
        let args = k::lora_down::Args {
            x: &x.as_arg(),
            w: &a.as_arg(),
            s: 1.0,
            u: &u.as_arg(),
        };
        let ms = time_ms(dev, 5, iters, || {
            k::lora_down::launch_with(dev, &cfg, &args)
        })?
        .median();
        out.push((ms, base, config_text(&cfg)));
    }
    Ok(out)
}
