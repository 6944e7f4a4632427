//! One pre-LN OPT decoder layer on the GPU, forward and backward, mirroring
//! [`crate::model::layer`] (RUNTIME.md §1.3, §2.3, §2.9).
//!
//! Attention over the packed sequences is [`super::attention`] (flash or materialised).
//!
//! Dropout ([`super::dropout`]), in training only: the attention block's and `fc2`'s outputs
//! (bias included) are dropped before their residual adds, and each adapted branch's input
//! before its `A` GEMM; the backward masks the same gradients with the saved masks.
//!
//! Fused epilogues ([`crate::cublaslt`], in the `fused` submodule; off with
//! `LEXP_NO_LT_EPILOGUES=1`, read once per process by `ops::lt_epilogues`): the q/k/v GEMM
//! adds its bias; out_proj and fc2 add bias and residual (`C` = the residual stream, beta 1)
//! when no residual dropout applies at their site (else the GEMM is plain and the bias,
//! dropout and residual follow as before); fc1 adds its bias and applies the ReLU (the
//! backward keeps the `relu_bwd` kernel: a DRELU epilogue was measured slower, see `fused`).
//! LoRA branches
//! add their `s·u·Bᵀ` to the fused output afterwards (a sum: same result), except fc1's, which
//! must precede the ReLU: its branch writes the output first and the fused GEMM adds onto it
//! (beta 1). Each fused GEMM falls back to the unfused ops if cuBLASLt has no algorithm for it.

use super::attention::{self, AttentionImpl};
use super::bitfit::BitFitGrads;
use super::dropout::DropCtx;
use super::houlsby::{self, LayerBackward, LayerForward};
use super::lora::{rank_pad, Adapters};
use super::lora_fold::LayerFold;
use super::ops::{
    add, bias_add, bias_residual, copy_rows, dense, dense_mut, layernorm, layernorm_bwd,
    lt_epilogues, mm, mm_fused, mm_lt, mul_inplace, relu_bwd, R,
};
use super::predictor::MlpPredictors;
use super::sparse_attention::AttnLists;
use super::sparse_mlp::{self, MlpLists};
use super::weights::LayerWeights;
use super::workspace::{Dims, LayerActs, Scratch};
use crate::buffer::DeviceTensor;
use crate::cublas::{Blas, Mat, MatLayout, MatMut};
use crate::cublaslt::Epilogue;
use crate::device::CudaDevice;
use crate::model::dropout::Site;
use crate::model::ModelError;
use crate::peft::{BiasSite, LoraTarget};
use fused::{fc1_forward, residual_block};

mod fused;

/// One packed sequence of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First token.
    pub start: usize,
    /// Tokens.
    pub len: usize,
    /// Element offset of its `[nh, L, L]` probabilities in [`LayerActs::p`].
    pub probs: usize,
}

/// The sequences of `cu_seqlens` with their probability offsets (8-element aligned), and
/// the elements all of them need. `cu_seqlens` must start at 0 and increase strictly.
pub fn segments(cu_seqlens: &[i32], nh: usize) -> R<(Vec<Segment>, usize)> {
    let mut segs = Vec::with_capacity(cu_seqlens.len().saturating_sub(1));
    let mut off = 0usize;
    if cu_seqlens.first() != Some(&0) {
        return Err(ModelError::Batch(format!(
            "cu_seqlens must start at 0, got {:?}",
            cu_seqlens.first()
        )));
    }
    for w in cu_seqlens.windows(2) {
        if w[1] <= w[0] {
            return Err(ModelError::Batch(format!(
                "cu_seqlens must increase strictly, got {} then {}",
                w[0], w[1]
            )));
        }
        let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        segs.push(Segment {
            start,
            len,
            probs: off,
        });
        off += (nh * len * len).div_ceil(8) * 8;
    }
    Ok((segs, off))
}

/// What every layer of one call shares.
pub struct Ctx<'a> {
    /// The device (kernel launches).
    pub dev: &'a CudaDevice,
    /// cuBLAS on the device's stream.
    pub blas: &'a Blas,
    /// The model's extents.
    pub d: Dims,
    /// Tokens in the batch.
    pub t: usize,
    /// Its packed sequences.
    pub segs: &'a [Segment],
    /// The adapters, if any.
    pub lora: Option<Adapters<'a>>,
    /// Dropout (training with `p > 0` only).
    pub drop: Option<DropCtx<'a>>,
    /// The attention implementation (its buffers are in the workspace).
    pub attention: AttentionImpl,
    /// Block lists of a sparse MLP ([`super::sparse_mlp`]); `None`: dense.
    pub mlp: Option<&'a MlpLists>,
    /// The predictors that fill `mlp` in the forward ([`super::predictor`]); `None`: the
    /// lists are already made (synthetic).
    pub predictors: Option<&'a MlpPredictors>,
    /// Block lists of block-sparse attention ([`super::sparse_attention`]); `None`: dense.
    pub attn: Option<&'a AttnLists>,
}

const QKV: [LoraTarget; 3] = [LoraTarget::Q, LoraTarget::K, LoraTarget::V];

/// Where the backward adds the trainable parameters' gradients.
pub struct Grads<'a> {
    /// LoRA's flat f32 gradient buffer (with adapters).
    pub lora: Option<&'a mut DeviceTensor>,
    /// BitFit's bias gradients (with BitFit).
    pub bitfit: Option<BitFitGrads<'a>>,
    /// Houlsby adapters' gradients (with adapters).
    pub houlsby: Option<houlsby::Grads<'a>>,
}

impl Grads<'_> {
    /// Adds `Σ_rows dy` (`dy` a `[t, n]` view) to BitFit's gradient of `site` in layer `li`,
    /// when BitFit trains it.
    fn bias(&mut self, blas: &Blas, li: usize, site: BiasSite, dy: Mat<'_>, t: usize) -> R {
        match &mut self.bitfit {
            Some(b) => b.column_sums(blas, li, site, dy, t),
            None => Ok(()),
        }
    }
}

impl Ctx<'_> {
    /// Element offset of `target`'s saved `u` in [`LayerActs::u`].
    fn u_off(&self, target: LoraTarget) -> usize {
        target.index() * self.t * self.lora.map_or(0, |a| rank_pad(a.r))
    }

    /// The q/k/v column block `i` (0, 1, 2) of a `[T, 3H]` buffer.
    fn qkv_block(&self, i: usize) -> MatLayout {
        let h = self.d.h;
        MatLayout::at(i * h, self.t, h, 3 * h)
    }

    /// Row stride of the backward's `dqkv` in layer `li`: `3H`, or wider with the LoRA fold
    /// (its `du` columns follow the heads, [`LayerFold::dqkv_ld`]).
    pub(super) fn dqkv_ld(&self, li: usize) -> usize {
        self.qkv_fold(li).map_or(3 * self.d.h, |f| f.dqkv_ld())
    }

    /// The q/k/v column block `i` of the backward's `dqkv` in layer `li`.
    fn dqkv_block(&self, li: usize, i: usize) -> MatLayout {
        let h = self.d.h;
        MatLayout::at(i * h, self.t, h, self.dqkv_ld(li))
    }

    /// Head `h` layouts of the sequence `seg` inside a `[T, width]` buffer at column `col`,
    /// batched over heads.
    pub(super) fn heads(&self, seg: &Segment, col: usize, width: usize) -> MatLayout {
        MatLayout::at(seg.start * width + col, seg.len, self.d.hd, width).batched(self.d.hd)
    }

    /// Layer `li`'s q/k/v LoRA fold ([`super::lora_fold`]) in this call: when the adapters
    /// have one for the layer and no q/k/v branch drops its input.
    fn qkv_fold(&self, li: usize) -> Option<LayerFold> {
        let f = self.lora?.fold?.layer(li)?;
        QKV.iter()
            .all(|t| self.lora_mask(*t).is_none())
            .then_some(f)
    }

    /// Element offset of `target`'s LoRA input mask in [`LayerActs::mask`], if dropped.
    fn lora_mask(&self, target: LoraTarget) -> Option<usize> {
        let col = self.drop?.layout.lora[target.index()]?;
        Some(col * self.t)
    }

    /// The output `y [T, H]` of a residual branch plus its `bias`, dropped at `site` (`col`
    /// its mask column) when residual dropout is on, added to `res` into `out`.
    #[allow(clippy::too_many_arguments)]
    fn residual(
        &self,
        li: usize,
        site: (Site, Option<usize>),
        (y, bias): (&DeviceTensor, &DeviceTensor),
        res: &DeviceTensor,
        out: &mut DeviceTensor,
        mask: &DeviceTensor,
        rand: &mut DeviceTensor,
    ) -> R {
        let (t, h, dev) = (self.t, self.d.h, self.dev);
        match (self.drop, site.1) {
            (Some(dc), Some(col)) => {
                bias_add(dev, y, bias, t, h, false)?;
                let p = dc.layout.p_res;
                dc.apply(dev, li, (site.0, col, p), y, (t, h), mask, rand)?;
                copy_rows(dev, res, 0, out, 0, t, h)?;
                add(dev, y, out, t * h)
            }
            _ => bias_residual(dev, y, bias, res, out, t, h),
        }
    }

    /// The gradient of a residual branch's sub-block output (before its Houlsby adapter):
    /// [`residual_grad`](Self::residual_grad), then, when the layer has adapters, the
    /// adapter's backward at `site` (0 attention, 1 MLP) in place in `tmp`.
    #[allow(clippy::too_many_arguments)]
    fn adapter_grad<'b>(
        &self,
        li: usize,
        (site, col): (usize, Option<usize>),
        g: &'b DeviceTensor,
        acts: &LayerActs,
        tmp: &'b mut DeviceTensor,
        grads: &mut Grads<'_>,
        adapters: Option<LayerBackward<'_>>,
    ) -> R<&'b DeviceTensor> {
        let (Some(layer), Some(hg)) = (adapters, grads.houlsby.as_mut()) else {
            return self.residual_grad(col, g, &acts.mask, tmp);
        };
        let (t, h) = (self.t, self.d.h);
        copy_rows(self.dev, g, 0, tmp, 0, t, h)?;
        if let Some(col) = col.filter(|_| self.drop.is_some()) {
            mul_inplace(self.dev, tmp, &acts.mask, col * t, t, h)?;
        }
        hg.backward(self.dev, self.blas, (li, site), layer, tmp, t)?;
        Ok(tmp)
    }

    /// True when the residual add at mask column `col` fuses into its GEMM: epilogues on and
    /// no residual dropout there.
    fn fused_residual(&self, col: Option<usize>) -> bool {
        lt_epilogues() && !(self.drop.is_some() && col.is_some())
    }

    /// `g ⊙ mask` of the residual site at mask column `col` into `tmp` (when dropped), else
    /// `g`: the gradient of the branch before the residual add.
    fn residual_grad<'b>(
        &self,
        col: Option<usize>,
        g: &'b DeviceTensor,
        mask: &DeviceTensor,
        tmp: &'b mut DeviceTensor,
    ) -> R<&'b DeviceTensor> {
        let (t, h) = (self.t, self.d.h);
        match col.filter(|_| self.drop.is_some()) {
            Some(col) => {
                copy_rows(self.dev, g, 0, tmp, 0, t, h)?;
                mul_inplace(self.dev, tmp, mask, col * t, t, h)?;
                Ok(tmp)
            }
            None => Ok(g),
        }
    }
}

/// Runs layer `li` on `acts.x`, writing its output to `out` and keeping what the backward
/// needs in `acts` (and in `adapters`, the layer's Houlsby adapters, if any).
pub fn forward(
    cx: &Ctx,
    li: usize,
    w: &LayerWeights,
    acts: &mut LayerActs,
    sc: &mut Scratch,
    out: &mut DeviceTensor,
    mut adapters: Option<LayerForward<'_>>,
) -> R {
    let (t, h, f) = (cx.t, cx.d.h, cx.d.f);
    let (dev, blas) = (cx.dev, cx.blas);
    // With the LoRA fold, LN1's output carries the q/k/v branches' `u` in columns past `H`
    // and the GEMM's K extends over them (`[a | u]·[W | s·B]ᵀ`).
    let fold = cx.qkv_fold(li);
    let ka = fold.map_or(h, |f| f.width());
    layernorm(
        dev,
        &acts.x,
        (&w.ln1.0, &w.ln1.1),
        (&acts.a, ka),
        &acts.mean1,
        &acts.rstd1,
        t,
        h,
    )?;
    // `qkv_fused`: the projection is in `qkv` with its bias. When its tiles fit one wave the
    // fold's forward is one `lora_fwd` launch (`super::fold_one_kernel`), else `lora_down` and
    // the GEMM (with the bias in cuBLASLt's epilogue where it can).
    let (a, wqkv) = (dense(&acts.a, t, ka), w.qkv(h, ka));
    let qkv_fused = match fold.filter(|f| f.one_kernel(t, dev.multiprocessors())) {
        Some(f) => {
            f.forward_one_kernel(dev, w, &acts.a, &acts.qkv, t)?;
            true
        }
        None => {
            if let Some(f) = fold {
                f.down(dev, w, &acts.a, t)?;
            }
            lt_epilogues()
                && mm_fused(
                    blas,
                    a,
                    wqkv,
                    None,
                    dense_mut(&mut acts.qkv, t, 3 * h),
                    true,
                    0.0,
                    Epilogue::Bias(&w.bqkv),
                )?
        }
    };
    if !qkv_fused {
        mm(
            blas,
            a,
            wqkv,
            dense_mut(&mut acts.qkv, t, 3 * h),
            false,
            true,
            1.0,
            0.0,
        )?;
    }
    if let Some(ad) = cx.lora.filter(|_| fold.is_none()) {
        for (i, target) in QKV.into_iter().enumerate() {
            if let Some(s) = ad.slot(li, target) {
                let y = MatMut::new(&mut acts.qkv, cx.qkv_block(i));
                let x = DropCtx::lora_input(
                    cx.drop.as_ref(),
                    dev,
                    li,
                    target,
                    &acts.a,
                    (t, h),
                    &acts.mask,
                    &mut sc.rand,
                    &mut sc.xd,
                )?;
                ad.forward(
                    (dev, blas),
                    &s,
                    t,
                    dense(x, t, h),
                    y,
                    &mut acts.u,
                    cx.u_off(target),
                )?;
            }
        }
    }
    if !qkv_fused {
        bias_add(dev, &acts.qkv, &w.bqkv, t, 3 * h, false)?;
    }
    attention::forward(cx, li, acts, sc)?;

    // out_proj, its bias and the residual: h1 = x + (o·Woᵀ + bo).
    let attn_col = cx.drop.and_then(|d| d.layout.attn);
    residual_block(
        cx,
        li,
        (LoraTarget::Out, (Site::AttnResidual, attn_col)),
        (&w.wo, &w.bo),
        (&acts.o, h),
        &acts.x,
        &mut acts.h1,
        (&mut acts.u, &acts.mask),
        (&mut sc.rand, &mut sc.xd),
        &mut sc.tmp,
        adapters.as_mut().map(|a| (a, 0)),
    )?;

    // MLP: out = h1 + relu(LN2(h1)·W1ᵀ + b1)·W2ᵀ + b2.
    layernorm(
        dev,
        &acts.h1,
        (&w.ln2.0, &w.ln2.1),
        (&acts.b, h),
        &acts.mean2,
        &acts.rstd2,
        t,
        h,
    )?;
    let mlp_col = cx.drop.and_then(|d| d.layout.mlp);
    if let Some(m) = cx.mlp {
        if let Some(p) = cx.predictors {
            // `tmp2` and `dact` are backward-only scratch: free here.
            p.select(cx, li, &acts.b, (&mut sc.tmp2, &mut sc.dact), m.layer(li))?;
        }
        sparse_mlp::fc1_forward(cx, li, m, w, &acts.b, &acts.act)?;
        if adapters.is_none() && mlp_col.is_none() {
            // Nothing between the product and the residual add: one kernel for both.
            return sparse_mlp::fc2_forward_residual(cx, li, m, w, &acts.act, &acts.h1, out);
        }
        sparse_mlp::fc2_forward(cx, li, m, w, &acts.act, &sc.tmp)?;
        let bias = match adapters.as_mut() {
            // As in `residual_block`: the adapter reads fc2's output with its bias.
            Some(ad) => {
                bias_add(dev, &sc.tmp, &w.b2, t, h, false)?;
                ad.forward(dev, blas, 1, &mut sc.tmp, t)?
            }
            None => &w.b2,
        };
        let site = (Site::MlpResidual, mlp_col);
        return cx.residual(
            li,
            site,
            (&sc.tmp, bias),
            &acts.h1,
            out,
            &acts.mask,
            &mut sc.rand,
        );
    }
    fc1_forward(cx, li, w, acts, sc)?;
    residual_block(
        cx,
        li,
        (LoraTarget::Fc2, (Site::MlpResidual, mlp_col)),
        (&w.w2, &w.b2),
        (&acts.act, f),
        &acts.h1,
        out,
        (&mut acts.u, &acts.mask),
        (&mut sc.rand, &mut sc.xd),
        &mut sc.tmp,
        adapters.as_mut().map(|a| (a, 1)),
    )
}

/// One frozen projection `W [out_f, in_f]` without its bias: `y = x·Wᵀ`, plus the LoRA
/// branch of `target` when it is adapted in layer `li` ([`branch_forward`]).
fn project_forward(
    cx: &Ctx,
    li: usize,
    target: LoraTarget,
    w: &DeviceTensor,
    (x, in_f): (&DeviceTensor, usize),
    (y, out_f): (&mut DeviceTensor, usize),
    saved: (&mut DeviceTensor, &DeviceTensor),
    scratch: (&mut DeviceTensor, &mut DeviceTensor),
) -> R {
    let t = cx.t;
    mm(
        cx.blas,
        dense(x, t, in_f),
        dense(w, out_f, in_f),
        dense_mut(y, t, out_f),
        false,
        true,
        1.0,
        0.0,
    )?;
    branch_forward(cx, li, target, (x, in_f), (y, out_f), saved, scratch)
}

/// The LoRA branch of `target` (if adapted) on input `x [T, in_f]` into `y [T, out_f]`,
/// saving `u` (and, with LoRA dropout, the input's mask in `mask`, using the `rand` and `xd`
/// scratch).
fn branch_forward(
    cx: &Ctx,
    li: usize,
    target: LoraTarget,
    (x, in_f): (&DeviceTensor, usize),
    (y, out_f): (&mut DeviceTensor, usize),
    (u, mask): (&mut DeviceTensor, &DeviceTensor),
    (rand, xd): (&mut DeviceTensor, &mut DeviceTensor),
) -> R {
    let Some(ad) = cx.lora else { return Ok(()) };
    let Some(s) = ad.slot(li, target) else {
        return Ok(());
    };
    let t = cx.t;
    let drop = cx.drop.as_ref();
    let x = DropCtx::lora_input(drop, cx.dev, li, target, x, (t, in_f), mask, rand, xd)?;
    ad.forward(
        (cx.dev, cx.blas),
        &s,
        t,
        dense(x, t, in_f),
        dense_mut(y, t, out_f),
        u,
        cx.u_off(target),
    )
}

/// Backward of layer `li`: `g` holds the gradient of the layer's output and is turned, in
/// place, into the gradient of its input; the adapters' and biases' gradients go to `grads`
/// (`adapters`: the layer's Houlsby adapters and what their forward saved, if any).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    cx: &Ctx,
    li: usize,
    w: &LayerWeights,
    acts: &LayerActs,
    sc: &mut Scratch,
    g: &DeviceTensor,
    grads: &mut Grads<'_>,
    adapters: Option<LayerBackward<'_>>,
) -> R {
    let (t, h, f) = (cx.t, cx.d.h, cx.d.f);
    let (dev, blas) = (cx.dev, cx.blas);
    let linear = BiasSite::Linear;

    // MLP input gradients, d(LN2 out) into tmp.
    let mlp_col = cx.drop.and_then(|d| d.layout.mlp);
    let gm = cx.adapter_grad(li, (1, mlp_col), g, acts, &mut sc.tmp2, grads, adapters)?;
    grads.bias(blas, li, linear(LoraTarget::Fc2), dense(gm, t, h), t)?;
    if let Some(m) = cx.mlp {
        // Sparse: both input gradients on the kept blocks, d(LN2 out) into tmp; fc1's bias
        // gradient over the kept blocks.
        sparse_mlp::backward(cx, li, m, w, gm, &acts.act, &sc.dact, &sc.tmp)?;
        if let Some(slot) = grads
            .bitfit
            .as_ref()
            .and_then(|b| b.slot(li, linear(LoraTarget::Fc1)))
        {
            sparse_mlp::fc1_bias_grad(cx, li, m, &sc.dact, slot)?;
        }
    } else {
        // fc2: dact = (g ⊙ mask)·W2 (+ LoRA), then the ReLU mask.
        project_backward(
            cx,
            li,
            LoraTarget::Fc2,
            &w.w2,
            (&acts.act, f),
            (gm, h),
            acts,
            (&mut sc.du, &mut sc.xd, &sc.wpart),
            grads,
            &mut sc.dact,
        )?;
        relu_bwd(dev, &acts.act, &sc.dact, t * f)?;
        grads.bias(blas, li, linear(LoraTarget::Fc1), dense(&sc.dact, t, f), t)?;
        // fc1: d(LN2 out) = dact·W1 (+ LoRA).
        project_backward(
            cx,
            li,
            LoraTarget::Fc1,
            &w.w1,
            (&acts.b, h),
            (&sc.dact, f),
            acts,
            (&mut sc.du, &mut sc.xd, &sc.wpart),
            grads,
            &mut sc.tmp,
        )?;
    }
    // g += LN2_backward(...): g is now d(h1).
    grads.bias(blas, li, BiasSite::MlpLayerNorm, dense(&sc.tmp, t, h), t)?;
    layernorm_bwd(
        dev,
        &acts.h1,
        &w.ln2.0,
        &sc.tmp,
        &acts.mean2,
        &acts.rstd2,
        (g, 1.0),
        t,
        h,
    )?;

    // out_proj: dO = (g ⊙ mask)·Wo (+ LoRA), into tmp.
    let attn_col = cx.drop.and_then(|d| d.layout.attn);
    let gm = cx.adapter_grad(li, (0, attn_col), g, acts, &mut sc.tmp2, grads, adapters)?;
    grads.bias(blas, li, linear(LoraTarget::Out), dense(gm, t, h), t)?;
    project_backward(
        cx,
        li,
        LoraTarget::Out,
        &w.wo,
        (&acts.o, h),
        (gm, h),
        acts,
        (&mut sc.du, &mut sc.xd, &sc.wpart),
        grads,
        &mut sc.tmp,
    )?;
    attention::backward(cx, li, acts, sc)?;
    for (i, target) in QKV.into_iter().enumerate() {
        let dy = Mat::new(&sc.dqkv, cx.dqkv_block(li, i));
        grads.bias(blas, li, linear(target), dy, t)?;
    }

    // q/k/v: d(LN1 out) = dqkv·Wqkv (+ LoRA), into tmp2. With the fold, each target's `du`
    // goes beside `dqkv` first and one GEMM sums `[dqkv | du]·[Wqkv ; A']`.
    let fold = cx.qkv_fold(li);
    if fold.is_none() {
        let dx = (&mut sc.tmp2, MatLayout::dense(t, h));
        mm_lt(blas, dense(&sc.dqkv, t, 3 * h), w.qkv(h, h), dx, false)?;
    }
    if let (Some(ad), Some(grads)) = (cx.lora, grads.lora.as_deref_mut()) {
        if let Some(f) = fold {
            let part = &sc.wpart;
            f.backward(dev, (&ad, li), (&acts.a, &sc.dqkv), t, part, grads)?;
        }
        for (i, target) in QKV.into_iter().enumerate().filter(|_| fold.is_none()) {
            if let Some(s) = ad.slot(li, target) {
                let dy = Mat::new(&sc.dqkv, cx.dqkv_block(li, i));
                let u = (&acts.u, cx.u_off(target));
                if let Some(m_off) = cx.lora_mask(target) {
                    ad.backward_masked(
                        (dev, blas),
                        &s,
                        t,
                        &acts.a,
                        (&acts.mask, m_off),
                        dy,
                        u,
                        &mut sc.du,
                        grads,
                        &mut sc.xd,
                        &sc.tmp2,
                    )?;
                    continue;
                }
                let dx = dense_mut(&mut sc.tmp2, t, h);
                ad.backward(
                    (dev, blas),
                    &s,
                    t,
                    dense(&acts.a, t, h),
                    dy,
                    u,
                    (&mut sc.du, &sc.wpart),
                    grads,
                    dx,
                )?;
            }
        }
    } else if fold.is_some() {
        // The GEMM below reads every target's `du`, which only the branch's backward writes.
        return Err(ModelError::Device(
            "internal: the LoRA fold's backward without LoRA gradients".into(),
        ));
    }
    if let Some(f) = fold {
        let dx = (&mut sc.tmp2, MatLayout::dense(t, h));
        mm_lt(blas, f.dqkv_du(&sc.dqkv, t), f.weight_rows(w), dx, false)?;
    }
    // g += LN1_backward(...): g is now d(x).
    grads.bias(blas, li, BiasSite::AttnLayerNorm, dense(&sc.tmp2, t, h), t)?;
    layernorm_bwd(
        dev,
        &acts.x,
        &w.ln1.0,
        &sc.tmp2,
        &acts.mean1,
        &acts.rstd1,
        (g, 1.0),
        t,
        h,
    )
}

/// The input gradient of one frozen projection `W [out_f, in_f]` for output gradient `dy`:
/// `dx = dy·W`, plus, when `target` is adapted in layer `li`, its LoRA branch's share of `dx`
/// and the gradients of its `A` and `B` ([`branch_backward`]).
#[allow(clippy::too_many_arguments)]
fn project_backward(
    cx: &Ctx,
    li: usize,
    target: LoraTarget,
    w: &DeviceTensor,
    (x, in_f): (&DeviceTensor, usize),
    (dy, out_f): (&DeviceTensor, usize),
    acts: &LayerActs,
    scratch: (&mut DeviceTensor, &mut DeviceTensor, &DeviceTensor),
    grads: &mut Grads<'_>,
    dx: &mut DeviceTensor,
) -> R {
    let t = cx.t;
    let dxl = (&mut *dx, MatLayout::dense(t, in_f));
    mm_lt(
        cx.blas,
        dense(dy, t, out_f),
        dense(w, out_f, in_f),
        dxl,
        false,
    )?;
    branch_backward(
        cx,
        li,
        target,
        (x, in_f),
        (dy, out_f),
        acts,
        scratch,
        grads,
        dx,
    )
}

/// The LoRA backward of `target` (if adapted) with input `(x, in_f)` and output gradient
/// `(dy, out_f)`, adding its input gradient to `dx [T, in_f]` (`xd` is scratch for LoRA
/// dropout).
#[allow(clippy::too_many_arguments)]
fn branch_backward(
    cx: &Ctx,
    li: usize,
    target: LoraTarget,
    (x, in_f): (&DeviceTensor, usize),
    (dy, out_f): (&DeviceTensor, usize),
    acts: &LayerActs,
    (du, xd, part): (&mut DeviceTensor, &mut DeviceTensor, &DeviceTensor),
    grads: &mut Grads<'_>,
    dx: &mut DeviceTensor,
) -> R {
    let (Some(ad), Some(grads)) = (cx.lora, grads.lora.as_deref_mut()) else {
        return Ok(());
    };
    let Some(s) = ad.slot(li, target) else {
        return Ok(());
    };
    let t = cx.t;
    let u = (&acts.u, cx.u_off(target));
    if let Some(m_off) = cx.lora_mask(target) {
        return ad.backward_masked(
            (cx.dev, cx.blas),
            &s,
            t,
            x,
            (&acts.mask, m_off),
            dense(dy, t, out_f),
            u,
            du,
            grads,
            xd,
            dx,
        );
    }
    ad.backward(
        (cx.dev, cx.blas),
        &s,
        t,
        dense(x, t, in_f),
        dense(dy, t, out_f),
        u,
        (du, part),
        grads,
        dense_mut(dx, t, in_f),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_cu_seqlens_with_aligned_probability_offsets() {
        let (segs, total) = segments(&[0, 3, 8, 9], 2).unwrap();
        assert_eq!(
            segs,
            vec![
                Segment {
                    start: 0,
                    len: 3,
                    probs: 0
                },
                Segment {
                    start: 3,
                    len: 5,
                    probs: 24
                },
                Segment {
                    start: 8,
                    len: 1,
                    probs: 80
                },
            ]
        );
        assert_eq!(total, 88);
        assert!(segments(&[1, 3], 2).is_err());
        assert!(segments(&[0, 3, 3], 2).is_err());
        assert!(segments(&[], 2).is_err());
    }
}
