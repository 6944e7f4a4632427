//! The LoRA fold (`crate::gpu::lora_fold`) as a fused LoRA layer, against PEFT's cuBLAS
//! sequence in the same run: the shape of [`bench_lora`](super::bench_lora) (rank 16, a
//! 2048 x 2048 layer, no bias), forward and backward, with the engine's kernels and GEMMs.
//!
//! The fold keeps `A` and `s·B` in 64 spare rows and columns of the stored weight, `W' [d + 64,
//! d + 64]`, and `u = x·Aᵀ` (`du = s·dY·B`) in 64 spare columns beside the layer's input (its
//! output gradient), so that one GEMM with `K = d + 64` does the base product and the LoRA
//! expand:
//! - forward: `u = x·Aᵀ` (`lora_down`), `y = [x | u]·W'[:d, :]ᵀ` (cuBLASLt);
//! - backward: `du = s·dY·B` (`lora_down` on `Bᵀ`), `dx = [dY | du]·W'[:, :d]` (cuBLASLt),
//!   `dB = s·dYᵀ·u` and `dA = duᵀ·x` (two `lora_wgrad` passes and one
//!   `lora_wgrad_reduce_many`).
//!
//! Writing `A` and `s·B` into `W'` (`lora_fold`) happens once per optimizer step, not per
//! pass; it is not in these times (about 3.6 µs per module in the OPT-1.3B step's profile,
//! `bench/results/2026-12-01-h200-sparse-fc2-fwd/call99`). Here `W'` is built on the host. Each
//! row also reports how far the fold's results are from the baseline's (relative L2 of `y`;
//! the largest of `dx`, `dA`, `dB`).

use super::*;
use crate::cublas::{Blas, Mat, MatLayout};
use crate::gpu::ops::{lora_down, lora_wgrad_pass, lora_wgrad_reduce_many, mm_lt};
use crate::gpu::ops::{LORA_WGRAD_CHUNKS, R};
use crate::time_ms;

/// Spare rows and columns of the folded weight (the engine's `QKV_ROOM`).
const ROOM: usize = 64;
/// Columns of one `u` window (`lora_down`'s and `lora_wgrad`'s width at rank <= 16).
const WIN: usize = 16;

/// The fold against PEFT's sequence, one pass.
#[derive(Clone, Debug)]
pub struct FoldBench {
    pub pass: &'static str,
    pub m: usize,
    pub d: usize,
    pub r: usize,
    pub fold_ms: f64,
    pub peft_ms: f64,
    /// Relative L2 distance of the fold's results from the baseline's.
    pub rel: f64,
}

/// [`FoldBench`] rows at 2048, 4096 and 16384 tokens (those of `bench_lora`).
pub fn bench_lora_fold(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
) -> Result<Vec<FoldBench>, DeviceError> {
    let mut out = vec![];
    for m in [2048usize, 4096, 16384] {
        out.extend(fold_at(dev, blas, iters, m)?);
    }
    Ok(out)
}

/// Columns `col .. col + cols` of an `[m, dw]` buffer.
fn cols_of(t: &DeviceTensor, m: usize, dw: usize, col: usize, cols: usize) -> Mat<'_> {
    Mat::new(t, MatLayout::at(col, m, cols, dw))
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn fold_at(
    dev: &CudaDevice,
    blas: &Blas,
    iters: usize,
    m: usize,
) -> Result<Vec<FoldBench>, DeviceError> {
    let (d, r, s) = (2048usize, 16usize, 2.0f32);
    let (dw, bf) = (d + ROOM, Storage::BF16);
    let mut rng = Rng::new(23);
    let (x, hx) = random(dev, &mut rng, bf, &[m, d])?;
    let (w, hw) = random(dev, &mut rng, bf, &[d, d])?;
    let (a, ha) = random(dev, &mut rng, bf, &[r, d])?;
    let (b, hb) = random(dev, &mut rng, bf, &[d, r])?;
    let (dy, hdy) = random(dev, &mut rng, bf, &[m, d])?;
    // W' = [[W, s·B, 0], [A, 0, 0], [0, 0, 0]]; Bᵀ for du; x and dY in the first d columns of
    // their wider buffers.
    let mut hwf = vec![0.0f32; dw * dw];
    for i in 0..d {
        hwf[i * dw..i * dw + d].copy_from_slice(&hw[i * d..(i + 1) * d]);
        for k in 0..r {
            hwf[i * dw + d + k] = s * hb[i * r + k];
        }
    }
    for k in 0..r {
        hwf[(d + k) * dw..(d + k) * dw + d].copy_from_slice(&ha[k * d..(k + 1) * d]);
    }
    let hbt: Vec<f32> = (0..r * d).map(|i| hb[(i % d) * r + i / d]).collect();
    let wide = |h: &[f32]| -> Vec<f32> {
        let mut v = vec![0.0f32; m * dw];
        for i in 0..m {
            v[i * dw..i * dw + d].copy_from_slice(&h[i * d..(i + 1) * d]);
        }
        v
    };
    let wf = DeviceTensor::from_f32(dev, bf, &[dw, dw], &hwf)?;
    let bt = DeviceTensor::from_f32(dev, bf, &[r, d], &hbt)?;
    let xw = DeviceTensor::from_f32(dev, bf, &[m, dw], &wide(&hx))?;
    let dyw = DeviceTensor::from_f32(dev, bf, &[m, dw], &wide(&hdy))?;
    let mut y = DeviceTensor::poisoned(dev, bf, &[m, d])?;
    let mut dx = DeviceTensor::poisoned(dev, bf, &[m, d])?;
    let mut grads = DeviceTensor::zeros(dev, Storage::F32, &[2 * d * r])?;
    let part = DeviceTensor::zeros(dev, Storage::F32, &[2 * LORA_WGRAD_CHUNKS * d * WIN])?;
    // dB (block 0, scaled by s) at 0, [d, r]; dA (block 1, du already scaled) at d·r, [r, d].
    let mods = DeviceTensor::from_i32(dev, &[2, 5], &[0, 0, 0, 0, 1, 1, 0, 1, (d * r) as i32, 0])?;
    let at = |t, col, cols| cols_of(t, m, dw, col, cols);
    let err = |e: crate::model::ModelError| DeviceError::InvalidArgument(e.to_string());

    let forward = |y: &mut DeviceTensor| -> R {
        lora_down(
            dev,
            at(&xw, 0, d),
            Mat::new(&a, MatLayout::dense(r, d)),
            1.0,
            (&xw, MatLayout::at(d, m, WIN, dw)),
        )?;
        mm_lt(
            blas,
            at(&xw, 0, dw),
            Mat::new(&wf, MatLayout::at(0, d, dw, dw)),
            (y, MatLayout::dense(m, d)),
            true,
        )
    };
    let mut backward = |dx: &mut DeviceTensor| -> R {
        let dyd = at(&dyw, 0, d);
        lora_down(
            dev,
            dyd,
            Mat::new(&bt, MatLayout::dense(r, d)),
            s,
            (&dyw, MatLayout::at(d, m, WIN, dw)),
        )?;
        mm_lt(
            blas,
            at(&dyw, 0, dw),
            Mat::new(&wf, MatLayout::at(0, dw, d, dw)),
            (dx, MatLayout::dense(m, d)),
            false,
        )?;
        let block = LORA_WGRAD_CHUNKS * d * WIN;
        lora_wgrad_pass(dev, at(&xw, d, WIN), dyd, (&part, 0))?;
        lora_wgrad_pass(dev, at(&dyw, d, WIN), at(&xw, 0, d), (&part, block))?;
        grads
            .fill_zero()
            .map_err(crate::gpu::ops::dev_err("zeroing the gradients"))?;
        lora_wgrad_reduce_many(dev, (&part, 2), (d, r, WIN), &mods.as_arg(), s, &grads)
    };
    let fold_f = time_ms(dev, 5, iters, || forward(&mut y).map_err(err))?.median();
    let fold_b = time_ms(dev, 5, iters, || backward(&mut dx).map_err(err))?.median();

    // PEFT's sequence in the same run, and its results to compare with.
    let peft = super::bench::time_peft(dev, blas, iters, (&x, &w, &a, &b, &dy), s)?;
    let (peft_f, peft_b) = (peft.forward_ms, peft.backward_ms);
    dev.synchronize()?;
    let g = grads.to_f32_vec()?;
    let rel_f = rel_l2(&y.to_f32_vec()?, &peft.y.to_f32_vec()?);
    let rel_b = [
        rel_l2(&dx.to_f32_vec()?, &peft.dx.to_f32_vec()?),
        rel_l2(&g[..d * r], &peft.db.to_f32_vec()?),
        rel_l2(&g[d * r..], &peft.da.to_f32_vec()?),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    let row = |pass, fold_ms, peft_ms, rel| FoldBench {
        pass,
        m,
        d,
        r,
        fold_ms,
        peft_ms,
        rel,
    };
    Ok(vec![
        row("forward", fold_f, peft_f, rel_f),
        row("backward", fold_b, peft_b, rel_b),
    ])
}
