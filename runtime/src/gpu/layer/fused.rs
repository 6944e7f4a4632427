//! The layer's GEMMs with fused cuBLASLt epilogues ([`crate::cublaslt`]): fc1 with bias and
//! ReLU, and the residual projections (out_proj, fc2) with bias and the residual add. Each
//! falls back to the unfused ops when cuBLASLt has no algorithm for it.
//!
//! fc1 does not save cuBLASLt's ReLU bit-mask for a DRELU epilogue in the backward: on the
//! H200 (cuBLAS 13.1) the DRELU GEMM of OPT-1.3B's fc2 input gradient ran at 355 TFLOP/s
//! (9.3 ms per 4 x 1024 step, against about 4 ms plain), far more than the `relu_bwd` kernel
//! it saves (`bench/results/2026-11-29-h200-step-lt-*`).

use super::{branch_forward, project_forward, Ctx};
use crate::buffer::DeviceTensor;
use crate::cublas::{Mat, MatLayout, MatMut};
use crate::cublaslt::Epilogue;
use crate::gpu::dropout::DropCtx;
use crate::gpu::houlsby::LayerForward;
use crate::gpu::lora::rank_pad;
use crate::gpu::ops::{bias_add, dense, dense_mut, lt_epilogues, mm, mm_fused, R};
use crate::gpu::weights::LayerWeights;
use crate::gpu::workspace::{LayerActs, Scratch};
use crate::model::dropout::Site;
use crate::peft::LoraTarget;

/// `act = relu(b·W1ᵀ + b1 [+ LoRA])`: with the epilogues on, the LoRA branch (if any) writes
/// `act` first and one fused GEMM adds the projection and bias and applies the ReLU; else (or
/// when cuBLASLt has no algorithm for it) GEMM, LoRA and the `bias_relu` kernel.
pub(super) fn fc1_forward(
    cx: &Ctx,
    li: usize,
    w: &LayerWeights,
    acts: &mut LayerActs,
    sc: &mut Scratch,
) -> R {
    let (t, h, f) = (cx.t, cx.d.h, cx.d.f);
    let fc1 = LoraTarget::Fc1;
    let (saved, scratch) = ((&mut acts.u, &acts.mask), (&mut sc.rand, &mut sc.xd));
    if !lt_epilogues() {
        let (x, y) = ((&acts.b, h), (&mut acts.act, f));
        project_forward(cx, li, fc1, &w.w1, x, y, saved, scratch)?;
        return bias_add(cx.dev, &acts.act, &w.b1, t, f, true);
    }
    let (x, y) = ((&acts.b, h), (&mut acts.act, f));
    let adapted = branch_forward_first(cx, li, fc1, x, y, saved, scratch)?;
    let beta = if adapted { 1.0 } else { 0.0 };
    let (x, w1) = (dense(&acts.b, t, h), dense(&w.w1, f, h));
    let relu = Epilogue::ReluBias(&w.b1);
    let act = dense_mut(&mut acts.act, t, f);
    if !mm_fused(cx.blas, x, w1, None, act, true, beta, relu)? {
        // The branch's output (if any) is in `act` already: add the projection onto it.
        mm(
            cx.blas,
            x,
            w1,
            dense_mut(&mut acts.act, t, f),
            false,
            true,
            1.0,
            beta,
        )?;
        bias_add(cx.dev, &acts.act, &w.b1, t, f, true)?;
    }
    Ok(())
}

/// A residual projection and its add: `out = res + (x·Wᵀ + bias) [+ LoRA]`, with residual
/// dropout at `site` when the step has it. Fused when [`Ctx::fused_residual`] allows it, no
/// Houlsby adapter sits there and cuBLASLt has an algorithm: one GEMM with the bias epilogue
/// and `C = res`, then the LoRA branch added to `out`; else the GEMM (+ LoRA) into `tmp` and
/// [`Ctx::residual`] (bias, dropout, add). With `adapter` (the layer's Houlsby adapters and
/// the site, 0 attention, 1 MLP), `tmp` gets its bias, then the adapter, whose `b_u` the
/// residual adds.
#[allow(clippy::too_many_arguments)]
pub(super) fn residual_block(
    cx: &Ctx,
    li: usize,
    (target, site): (LoraTarget, (Site, Option<usize>)),
    (w, bias): (&DeviceTensor, &DeviceTensor),
    (x, in_f): (&DeviceTensor, usize),
    res: &DeviceTensor,
    out: &mut DeviceTensor,
    (u, mask): (&mut DeviceTensor, &DeviceTensor),
    (rand, xd): (&mut DeviceTensor, &mut DeviceTensor),
    tmp: &mut DeviceTensor,
    adapter: Option<(&mut LayerForward<'_>, usize)>,
) -> R {
    let (t, h) = (cx.t, cx.d.h);
    if adapter.is_none()
        && cx.fused_residual(site.1)
        && mm_fused(
            cx.blas,
            dense(x, t, in_f),
            dense(w, h, in_f),
            Some(dense(res, t, h)),
            dense_mut(out, t, h),
            true,
            1.0,
            Epilogue::Bias(bias),
        )?
    {
        return branch_forward(cx, li, target, (x, in_f), (out, h), (u, mask), (rand, xd));
    }
    project_forward(
        cx,
        li,
        target,
        w,
        (x, in_f),
        (tmp, h),
        (u, mask),
        (rand, xd),
    )?;
    let bias = match adapter {
        // The adapter reads the sub-block's output with its bias; the residual adds `b_u`.
        Some((ad, i)) => {
            bias_add(cx.dev, tmp, bias, t, h, false)?;
            ad.forward(cx.dev, cx.blas, i, tmp, t)?
        }
        None => bias,
    };
    cx.residual(li, site, (tmp, bias), res, out, mask, rand)
}

/// [`branch_forward`] that overwrites `y` with the branch's `s·u·Bᵀ` instead of adding to it
/// (the GEMMs of [`Adapters::forward`](crate::gpu::lora::Adapters::forward) with beta 0 on the second), so that a fused GEMM can add
/// the projection onto it before its ReLU. Returns false, writing nothing, when `target` is
/// not adapted in layer `li`.
fn branch_forward_first(
    cx: &Ctx,
    li: usize,
    target: LoraTarget,
    (x, in_f): (&DeviceTensor, usize),
    (y, out_f): (&mut DeviceTensor, usize),
    (u, mask): (&mut DeviceTensor, &DeviceTensor),
    (rand, xd): (&mut DeviceTensor, &mut DeviceTensor),
) -> R<bool> {
    let Some(ad) = cx.lora else { return Ok(false) };
    let Some(s) = ad.slot(li, target) else {
        return Ok(false);
    };
    let (t, r) = (cx.t, ad.r);
    let drop = cx.drop.as_ref();
    let x = DropCtx::lora_input(drop, cx.dev, li, target, x, (t, in_f), mask, rand, xd)?;
    let ul = MatLayout::at(cx.u_off(target), t, r, rank_pad(r));
    let a = Mat::new(ad.params, MatLayout::at(s.a, r, s.in_f, s.in_f));
    let b = Mat::new(ad.params, MatLayout::at(s.b, s.out_f, r, r));
    mm(
        cx.blas,
        dense(x, t, in_f),
        a,
        MatMut::new(u, ul),
        false,
        true,
        1.0,
        0.0,
    )?;
    let yo = dense_mut(y, t, out_f);
    mm(cx.blas, Mat::new(u, ul), b, yo, false, true, ad.scale, 0.0)?;
    Ok(true)
}
