//! The LoRA fold (`crate::gpu::lora_fold`) as a fused LoRA layer, against PEFT's cuBLAS
//! sequence in the same run: the shape of [`bench_lora`](super::bench_lora) (rank 16, a
//! 2048 x 2048 layer, no bias), forward and backward, with the engine's kernels and GEMMs.
//!
//! The fold keeps `A` and `s·B` in 64 spare rows and columns of the stored weight, `W' [d + 64,
//! d + 64]`, and `u = x·Aᵀ` (`du = s·dY·B`) in 64 spare columns beside the layer's input (its
//! output gradient), so that one GEMM with `K = d + 64` does the base product and the LoRA
//! expand:
//! - forward: `u = x·Aᵀ` (`lora_down`), `y = [x | u]·W'[:d, :]ᵀ` (cuBLASLt);
//! - backward, in the engine's order: `du = s·dY·B` (`lora_down` on `Bᵀ`), `dB = s·dYᵀ·u`
//!   and `dA = duᵀ·x` (both `lora_wgrad` passes in one `lora_wgrad_pair` launch, as the
//!   engine pairs them, and one `lora_wgrad_reduce_many` that writes the gradients, as PEFT's
//!   autograd writes them), then `dx = [dY | du]·W'[:, :d]` (cuBLASLt).
//!
//! The row `fwd-1k` is the same forward in one `lora_fwd` launch over views of the folded
//! weight (`crate::gpu::fold_one_kernel`, what the engine runs when its tiles fit one wave,
//! here at 2048 tokens); its distance is the larger of `y`'s from the baseline's and `u`'s
//! from `lora_down`'s.
//!
//! The rows `bwd-prev` (the sequence before: the GEMM first, two `lora_wgrad` launches, the
//! gradients zeroed and the reduce adding into them; the engine adds a step's micro-batches
//! into gradients it zeroes once per step for all layers) and `bwd-gemm1` (the new launches,
//! the GEMM first) time the steps of the change in the same run, with today's reduce kernel.
//!
//! Writing `A` and `s·B` into `W'` (`lora_fold`) happens once per optimizer step, not per
//! pass; it is not in these times (about 3.6 µs per module in the OPT-1.3B step's profile,
//! `bench/results/2026-12-01-h200-sparse-fc2-fwd/call99`). Here `W'` is built on the host. Each
//! row also reports how far the fold's results are from the baseline's (relative L2 of `y`;
//! the largest of `dx`, `dA`, `dB`).

use super::*;
use crate::cublas::{Blas, Mat, MatLayout};
use crate::gpu::fold_one_kernel::{one_kernel_forward, FoldedViews, ONE_KERNEL_COLS};
use crate::gpu::ops::GradWrite;
use crate::gpu::ops::{lora_down, lora_wgrad_pair, lora_wgrad_pass, lora_wgrad_reduce_many, mm_lt};
use crate::gpu::ops::{LORA_WGRAD_CHUNKS, R};
use crate::time_ms;

/// Spare rows and columns of the folded weight (the engine's `QKV_ROOM`).
const ROOM: usize = 64;
/// Columns of one `u` window (`lora_down`'s and `lora_wgrad`'s width at rank <= 16).
const WIN: usize = 16;

/// The orders the backward is timed in (rows `bwd-prev`, `bwd-gemm1`, `backward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backward {
    /// As before the paired passes: `du`, the input gradient's GEMM, two `lora_wgrad`
    /// launches, the gradients zeroed and the reduce adding into them.
    Previous,
    /// `du`, the GEMM, both passes in one launch, the reduce writing the gradients.
    GemmFirst,
    /// As the engine runs a layer (`gpu/layer.rs`): `du`, the paired passes and the reduce
    /// (while `dY` is still in L2 from `du`'s pass over it), then the GEMM.
    Engine,
}

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

/// The larger of two distances, NaN if either is: a poisoned element never written must show,
/// which `f64::max` would drop.
fn max_or_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
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
    let backward = |dx: &mut DeviceTensor, grads: &mut DeviceTensor, form: Backward| -> R {
        let dyd = at(&dyw, 0, d);
        lora_down(
            dev,
            dyd,
            Mat::new(&bt, MatLayout::dense(r, d)),
            s,
            (&dyw, MatLayout::at(d, m, WIN, dw)),
        )?;
        let dx_gemm = |dx: &mut DeviceTensor| {
            mm_lt(
                blas,
                at(&dyw, 0, dw),
                Mat::new(&wf, MatLayout::at(0, dw, d, dw)),
                (dx, MatLayout::dense(m, d)),
                false,
            )
        };
        if form != Backward::Engine {
            dx_gemm(dx)?;
        }
        let (db_pass, da_pass) = ((at(&xw, d, WIN), dyd), (at(&dyw, d, WIN), at(&xw, 0, d)));
        let write = if form == Backward::Previous {
            let block = LORA_WGRAD_CHUNKS * d * WIN;
            lora_wgrad_pass(dev, db_pass.0, db_pass.1, (&part, 0))?;
            lora_wgrad_pass(dev, da_pass.0, da_pass.1, (&part, block))?;
            grads
                .fill_zero()
                .map_err(crate::gpu::ops::dev_err("zeroing the gradients"))?;
            GradWrite::Accumulate
        } else {
            lora_wgrad_pair(dev, db_pass, da_pass, (&part, 0))?;
            GradWrite::Overwrite
        };
        let g = (&*grads, write);
        lora_wgrad_reduce_many(dev, (&part, 2), (d, r, WIN), &mods.as_arg(), s, g)?;
        if form == Backward::Engine {
            dx_gemm(dx)?;
        }
        Ok(())
    };
    let fold_f = time_ms(dev, 5, iters, || forward(&mut y).map_err(err))?.median();
    let u_down = xw.to_f32_vec()?;
    // The same forward in one `lora_fwd` launch over the folded weight (what the engine runs
    // when its tiles fit one wave), into its own poisoned `y` and over a poisoned `u`.
    let mut y1 = DeviceTensor::poisoned(dev, bf, &[m, d])?;
    let no_bias = DeviceTensor::zeros(dev, bf, &[d])?;
    let c = ONE_KERNEL_COLS;
    let views = FoldedViews {
        w: Mat::new(&wf, MatLayout::at(0, d, d, dw)),
        a: Mat::new(&wf, MatLayout::at(d * dw, c, d, dw)),
        sb: Mat::new(&wf, MatLayout::at(d, d, c, dw)),
    };
    // `x` with NaN where `u` goes.
    let mut hx1 = wide(&hx);
    for row in hx1.chunks_exact_mut(dw) {
        row[d..d + c].fill(f32::NAN);
    }
    let xw1 = DeviceTensor::from_f32(dev, bf, &[m, dw], &hx1)?;
    let u_cols = MatLayout::at(d, m, c, dw);
    let one = |y1: &mut DeviceTensor| -> R {
        let y = (&*y1, MatLayout::dense(m, d));
        let x = cols_of(&xw1, m, dw, 0, d);
        one_kernel_forward(dev, x, views, &no_bias, y, (&xw1, u_cols))
    };
    let one_f = time_ms(dev, 5, iters, || one(&mut y1).map_err(err))?.median();
    let u_one = xw1.to_f32_vec()?;
    let u_of = |v: &[f32]| -> Vec<f32> {
        (0..m)
            .flat_map(|i| v[i * dw + d..i * dw + d + c].to_vec())
            .collect()
    };
    let rel_u = rel_l2(&u_of(&u_one), &u_of(&u_down));
    // Every form's results are compared with PEFT's below, each from poisoned outputs.
    let mut times = vec![];
    let mut results = vec![];
    for form in [Backward::Previous, Backward::GemmFirst, Backward::Engine] {
        grads.poison()?;
        dx.poison()?;
        let ms = time_ms(dev, 5, iters, || {
            backward(&mut dx, &mut grads, form).map_err(err)
        })?
        .median();
        times.push(ms);
        results.push((dx.to_f32_vec()?, grads.to_f32_vec()?));
    }

    // PEFT's sequence in the same run, and its results to compare with.
    let peft = super::bench::time_peft(dev, blas, iters, (&x, &w, &a, &b, &dy), s)?;
    let (peft_f, peft_b) = (peft.forward_ms, peft.backward_ms);
    dev.synchronize()?;
    let want_y = peft.y.to_f32_vec()?;
    let rel_f = rel_l2(&y.to_f32_vec()?, &want_y);
    let rel_one = max_or_nan(rel_l2(&y1.to_f32_vec()?, &want_y), rel_u);
    let want = (
        peft.dx.to_f32_vec()?,
        peft.db.to_f32_vec()?,
        peft.da.to_f32_vec()?,
    );
    let rel_bwd = |dx: &[f32], g: &[f32]| {
        [
            rel_l2(dx, &want.0),
            rel_l2(&g[..d * r], &want.1),
            rel_l2(&g[d * r..], &want.2),
        ]
        .into_iter()
        .fold(0.0, max_or_nan)
    };
    let rel_b: Vec<f64> = results.iter().map(|(dx, g)| rel_bwd(dx, g)).collect();
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
        row("fwd-1k", one_f, peft_f, rel_one),
        row("backward", times[2], peft_b, rel_b[2]),
        row("bwd-gemm1", times[1], peft_b, rel_b[1]),
        row("bwd-prev", times[0], peft_b, rel_b[0]),
    ])
}
