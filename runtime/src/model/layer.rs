//! One OPT decoder layer, forward and backward (RUNTIME.md §1.3, §2.9), pre-LN or post-LN,
//! with OPT's residual dropout and the PEFT methods' trainable parts: LoRA branches on any of
//! its six projections, BitFit's trained biases (the six Linear biases and the two LayerNorm
//! βs) and Houlsby adapters on the attention and MLP outputs.
//!
//! Base weights are frozen: the backward returns the layer's input gradient and the
//! gradients of the trainable parts only.

use super::attention_hook::{AttentionHook, AttentionInput, AttentionMask};
use super::dropout::{self, MaskSource, Site};
use super::houlsby_branch::{self, HoulsbyGrads, HoulsbySaved};
use super::lora_branch::{self, BranchGrads, BranchSaved};
use super::mlp_hook::MlpHook;
use super::{ModelError, Result};
use crate::checkpoint::opt::{LayerNorm, Linear, OptLayer};
use crate::checkpoint::OptConfig;
use crate::cpu::activation::{add_inplace, column_sums, relu, relu_bwd_inplace, scale_inplace};
use crate::cpu::attention::{attention_bwd_masked, attention_fwd_masked, AttentionSaved};
use crate::cpu::matmul::{linear, matmul};
use crate::cpu::norm::{layernorm_bwd, layernorm_fwd, LayerNormSaved};
use crate::peft::{AdapterActivation, AdapterSite, BiasSite, HoulsbyModule, LoraModule};
use crate::peft::{LoraTarget, PeftParams};

/// The LoRA branches of one layer, indexed like [`LoraTarget::ALL`].
pub type LayerBranches<'a> = [Option<&'a LoraModule>; 6];

/// The trainable parts of one layer: LoRA branches with their scale `s = α/r` and dropout
/// probability, BitFit's trained biases, Houlsby adapters.
#[derive(Clone, Copy)]
pub struct LayerAdapters<'a> {
    /// Branch per target (`None`: not adapted).
    pub branches: LayerBranches<'a>,
    /// LoRA scaling.
    pub scale: f32,
    /// LoRA dropout probability (applied in training only).
    pub dropout: f32,
    /// BitFit's trained bias per [`BiasSite::ALL`] (`None`: the base bias, frozen).
    pub biases: [Option<&'a [f32]>; 8],
    /// Houlsby adapters per [`AdapterSite::ALL`] and their activation (`None`: no adapters).
    pub houlsby: Option<(&'a [HoulsbyModule; 2], AdapterActivation)>,
}

impl<'a> LayerAdapters<'a> {
    /// No trainable parts.
    pub const NONE: LayerAdapters<'static> = LayerAdapters {
        branches: [None; 6],
        scale: 0.0,
        dropout: 0.0,
        biases: [None; 8],
        houlsby: None,
    };

    /// The trainable parts of `layer` in `params` (or none).
    pub fn of(params: Option<&'a PeftParams>, layer: usize) -> LayerAdapters<'a> {
        let Some(p) = params else {
            return LayerAdapters::NONE;
        };
        let mut out = LayerAdapters::NONE;
        if let Some(l) = &p.lora {
            for (i, t) in LoraTarget::ALL.into_iter().enumerate() {
                out.branches[i] = l.get(layer, t);
            }
            out.scale = l.config.scaling();
            out.dropout = l.config.dropout;
        }
        if let Some(b) = &p.bitfit {
            out.biases = BiasSite::ALL.map(|site| b.bias(layer, site));
        }
        if let Some(h) = &p.houlsby {
            out.houlsby = h.layers.get(layer).map(|m| (m, h.config.activation));
        }
        out
    }

    /// The Houlsby adapter at `site`, if any.
    fn adapter(&self, site: AdapterSite) -> Option<(&'a HoulsbyModule, AdapterActivation)> {
        self.houlsby.map(|(m, f)| (&m[site.index()], f))
    }
}

/// What one layer's forward keeps for its backward.
#[derive(Debug)]
pub struct LayerSaved {
    /// Input of the attention LayerNorm: the layer input (pre-LN) or `x + attn` (post-LN).
    ln1_in: Vec<f32>,
    ln1: LayerNormSaved,
    /// Input of the q/k/v projections: `LN1(x)` (pre-LN) or `x` (post-LN).
    attn_in: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    attn: AttentionSaved,
    /// The kept key blocks the attention ran with (`None`: dense), for its backward.
    attn_mask: Option<AttentionMask>,
    /// Input of the MLP LayerNorm: `x + attn` (pre-LN) or `x1 + mlp` (post-LN).
    ln2_in: Vec<f32>,
    ln2: LayerNormSaved,
    /// Input of `fc1`: `LN2(x + attn)` (pre-LN) or `LN1(x + attn)` (post-LN).
    ffn_in: Vec<f32>,
    /// ReLU output (its zero pattern is the ReLU mask).
    act: Vec<f32>,
    res_mask_attn: Option<Vec<f32>>,
    res_mask_mlp: Option<Vec<f32>>,
    branches: [Option<BranchSaved>; 6],
    /// Houlsby adapters' saved state per [`AdapterSite::ALL`].
    houlsby: [Option<HoulsbySaved>; 2],
}

/// Gradients of one layer's trainable parts (each `Some` exactly where the part is trained).
#[derive(Debug, Default)]
pub struct LayerGrads {
    /// LoRA branches, indexed like [`LoraTarget::ALL`].
    pub lora: [Option<BranchGrads>; 6],
    /// BitFit biases, indexed like [`BiasSite::ALL`].
    pub biases: [Option<Vec<f32>>; 8],
    /// Houlsby adapters, indexed like [`AdapterSite::ALL`].
    pub houlsby: [Option<HoulsbyGrads>; 2],
}

/// The exposure hooks of a forward pass, bundled so that adding one does not grow every
/// signature: MLP exposure ([`MlpHook`]: kept neuron blocks) and attention exposure
/// ([`AttentionHook`]: kept key blocks). `Exposure::NONE` runs the model dense and unobserved.
#[derive(Clone, Copy, Default)]
pub struct Exposure<'a> {
    /// Observes each layer's MLP activations and may keep only some neuron blocks.
    pub mlp: Option<&'a dyn MlpHook>,
    /// Observes each layer's scaled queries and keys and may keep only some key blocks.
    pub attention: Option<&'a dyn AttentionHook>,
}

impl<'a> Exposure<'a> {
    /// No hooks: dense and unobserved.
    pub const NONE: Exposure<'static> = Exposure {
        mlp: None,
        attention: None,
    };

    /// MLP exposure only.
    pub fn of_mlp(hook: &'a dyn MlpHook) -> Self {
        Exposure {
            mlp: Some(hook),
            attention: None,
        }
    }

    /// Attention exposure only.
    pub fn of_attention(hook: &'a dyn AttentionHook) -> Self {
        Exposure {
            mlp: None,
            attention: Some(hook),
        }
    }
}

/// Shapes and switches of a layer computation.
#[derive(Clone, Copy)]
pub struct LayerCtx<'a> {
    /// The model config.
    pub config: &'a OptConfig,
    /// The packed batch's sequence offsets.
    pub cu_seqlens: &'a [i32],
    /// Tokens in the batch.
    pub rows: usize,
    /// Where dropout masks come from (`None`: evaluation).
    pub rng: Option<&'a dyn MaskSource>,
    /// Exposure hooks (MLP and attention); [`Exposure::NONE`] in the backward, which reads
    /// the masks the forward saved.
    pub exposure: Exposure<'a>,
}

/// A LayerNorm's `(γ, β)`, β replaced by `trained` (BitFit) when given.
fn ln_params<'a>(
    ln: &'a Option<LayerNorm>,
    trained: Option<&'a [f32]>,
) -> (Option<&'a [f32]>, Option<&'a [f32]>) {
    match ln {
        Some(l) => (Some(&l.weight), Some(trained.unwrap_or(&l.bias))),
        None => (None, None),
    }
}

/// `x·Wᵀ + b` plus the LoRA branch of `target`, if adapted; `b` is BitFit's trained bias when
/// there is one.
fn project(
    ctx: &LayerCtx,
    layer: usize,
    lin: &Linear,
    target: LoraTarget,
    adapters: &LayerAdapters,
    x: &[f32],
    saved: &mut [Option<BranchSaved>; 6],
) -> Vec<f32> {
    let (out_f, in_f) = (lin.weight.rows, lin.weight.cols);
    let i = target.index();
    let bias = adapters.biases[i].or(lin.bias.as_deref());
    let mut y = linear(x, ctx.rows, &lin.weight.data, out_f, in_f, bias);
    if let Some(module) = adapters.branches[i] {
        let mask = match ctx.rng {
            Some(rng) if adapters.dropout > 0.0 => {
                Some(rng.mask(layer, Site::Lora(i), x.len(), adapters.dropout))
            }
            _ => None,
        };
        saved[i] = Some(lora_branch::forward(
            module,
            adapters.scale,
            x,
            ctx.rows,
            mask,
            &mut y,
        ));
    }
    y
}

/// Adds `dy·W` and the LoRA branch's input gradient to `dx`, and records the branch's
/// parameter gradients and, under BitFit, the bias gradient `Σ_rows dy`.
#[allow(clippy::too_many_arguments)]
fn project_bwd(
    ctx: &LayerCtx,
    lin: &Linear,
    target: LoraTarget,
    adapters: &LayerAdapters,
    x: &[f32],
    saved: &[Option<BranchSaved>; 6],
    dy: &[f32],
    dx: &mut [f32],
    grads: &mut LayerGrads,
) {
    let (out_f, in_f) = (lin.weight.rows, lin.weight.cols);
    matmul(
        dx,
        dy,
        &lin.weight.data,
        ctx.rows,
        out_f,
        in_f,
        false,
        false,
        1.0,
        1.0,
    );
    let i = target.index();
    if adapters.biases[i].is_some() {
        grads.biases[i] = Some(column_sums(dy, ctx.rows, out_f));
    }
    if let (Some(module), Some(s)) = (adapters.branches[i], &saved[i]) {
        grads.lora[i] = Some(lora_branch::backward(
            module,
            adapters.scale,
            x,
            ctx.rows,
            s,
            dy,
            dx,
        ));
    }
}

fn residual_mask(ctx: &LayerCtx, layer: usize, site: Site, len: usize) -> Option<Vec<f32>> {
    let p = ctx.config.dropout;
    match ctx.rng {
        Some(rng) if p > 0.0 => Some(rng.mask(layer, site, len, p)),
        _ => None,
    }
}

/// Attention exposure of layer `index`: the hook [`select`](AttentionHook::select)s kept key
/// blocks from the scaled queries `q` and keys `k`, the mask is checked against the batch, and
/// the hook [`observe`](AttentionHook::observe)s them with it. Returns the mask (`None`: no hook,
/// or the hook keeps the layer dense).
fn attention_exposure(
    ctx: &LayerCtx,
    index: usize,
    q: &[f32],
    k: &[f32],
) -> Result<Option<AttentionMask>> {
    let Some(hook) = ctx.exposure.attention else {
        return Ok(None);
    };
    let input = AttentionInput {
        q,
        k,
        cu_seqlens: ctx.cu_seqlens,
        heads: ctx.config.num_attention_heads,
        head_dim: ctx.config.head_dim(),
    };
    let mask = hook.select(index, input);
    if let Some(m) = &mask {
        m.validate(ctx.cu_seqlens, input.heads)
            .map_err(|source| ModelError::AttentionMask {
                layer: index,
                source,
            })?;
    }
    hook.observe(index, input, mask.as_ref());
    Ok(mask)
}

/// Runs layer `index` on `x` (`[rows, H]`), returning its output and what the backward needs.
pub fn forward(
    ctx: &LayerCtx,
    index: usize,
    w: &OptLayer,
    adapters: &LayerAdapters,
    x: Vec<f32>,
) -> Result<(Vec<f32>, LayerSaved)> {
    let c = ctx.config;
    let (rows, h) = (ctx.rows, c.hidden_size);
    let (nh, hd) = (c.num_attention_heads, c.head_dim());
    let eps = OptConfig::LAYER_NORM_EPS;
    let mut branches: [Option<BranchSaved>; 6] = Default::default();
    let mut houlsby: [Option<HoulsbySaved>; 2] = Default::default();
    let ln_attn = BiasSite::AttnLayerNorm.index();
    let ln_mlp = BiasSite::MlpLayerNorm.index();
    let (g1, b1) = ln_params(&w.self_attn_layer_norm, adapters.biases[ln_attn]);
    let (g2, b2) = ln_params(&w.final_layer_norm, adapters.biases[ln_mlp]);

    // Attention block.
    let (attn_in, ln1_pre) = if c.do_layer_norm_before {
        let (a, s) = layernorm_fwd(&x, rows, h, g1, b1, eps);
        (a, Some(s))
    } else {
        (x.clone(), None)
    };
    let mut q = project(
        ctx,
        index,
        &w.q_proj,
        LoraTarget::Q,
        adapters,
        &attn_in,
        &mut branches,
    );
    scale_inplace(&mut q, (hd as f32).powf(-0.5));
    let k = project(
        ctx,
        index,
        &w.k_proj,
        LoraTarget::K,
        adapters,
        &attn_in,
        &mut branches,
    );
    let v = project(
        ctx,
        index,
        &w.v_proj,
        LoraTarget::V,
        adapters,
        &attn_in,
        &mut branches,
    );
    let attn_mask = attention_exposure(ctx, index, &q, &k)?;
    let key_blocks = attn_mask.as_ref().map(AttentionMask::key_blocks);
    let (o, attn) = attention_fwd_masked(&q, &k, &v, ctx.cu_seqlens, nh, hd, key_blocks.as_ref())?;
    let mut ao = project(
        ctx,
        index,
        &w.out_proj,
        LoraTarget::Out,
        adapters,
        &o,
        &mut branches,
    );
    if let Some((m, f)) = adapters.adapter(AdapterSite::Attention) {
        houlsby[0] = Some(houlsby_branch::forward(m, f, &mut ao, rows));
    }
    let res_mask_attn = residual_mask(ctx, index, Site::AttnResidual, ao.len());
    if let Some(m) = &res_mask_attn {
        dropout::apply(&mut ao, m);
    }
    let mut h1 = x.clone();
    add_inplace(&mut h1, &ao);
    drop(ao);

    // MLP block.
    let (ln1_in, ln1, ffn_in, ln2_pre) = match ln1_pre {
        // Pre-LN: LN1 normalised the layer input; LN2 normalises `x + attn`.
        Some(ln1) => {
            let (b, s2) = layernorm_fwd(&h1, rows, h, g2, b2, eps);
            (x, ln1, b, Some(s2))
        }
        // Post-LN: LN1 normalises `x + attn`, and its output feeds the MLP.
        None => {
            drop(x);
            let (x1, s1) = layernorm_fwd(&h1, rows, h, g1, b1, eps);
            (h1.clone(), s1, x1, None)
        }
    };
    let z = project(
        ctx,
        index,
        &w.fc1,
        LoraTarget::Fc1,
        adapters,
        &ffn_in,
        &mut branches,
    );
    let mut act = relu(&z);
    drop(z);
    if let Some(hook) = ctx.exposure.mlp {
        // Exposure: the kept blocks' activations only, which is what the block-sparse
        // operators compute (module `mlp_hook`); the backward then follows from `act`.
        let mask = hook.select(index, &ffn_in, rows);
        hook.observe(index, &ffn_in, &act, rows, mask.as_ref());
        if let Some(m) = &mask {
            m.apply(&mut act, rows);
        }
    }
    let mut f = project(
        ctx,
        index,
        &w.fc2,
        LoraTarget::Fc2,
        adapters,
        &act,
        &mut branches,
    );
    if let Some((m, act_fn)) = adapters.adapter(AdapterSite::Mlp) {
        houlsby[1] = Some(houlsby_branch::forward(m, act_fn, &mut f, rows));
    }
    let res_mask_mlp = residual_mask(ctx, index, Site::MlpResidual, f.len());
    if let Some(m) = &res_mask_mlp {
        dropout::apply(&mut f, m);
    }
    let (y, ln2_in, ln2) = match ln2_pre {
        Some(ln2) => {
            let mut y = h1.clone();
            add_inplace(&mut y, &f);
            (y, h1, ln2)
        }
        None => {
            let mut h2 = ffn_in.clone();
            add_inplace(&mut h2, &f);
            let (y, s2) = layernorm_fwd(&h2, rows, h, g2, b2, eps);
            (y, h2, s2)
        }
    };
    let saved = LayerSaved {
        ln1_in,
        ln1,
        attn_in,
        q,
        k,
        v,
        o,
        attn,
        attn_mask,
        ln2_in,
        ln2,
        ffn_in,
        act,
        res_mask_attn,
        res_mask_mlp,
        branches,
        houlsby,
    };
    Ok((y, saved))
}

/// Backward of layer `index`: given `dy` (`[rows, H]`), returns the input gradient and the
/// gradients of the layer's LoRA branches.
pub fn backward(
    ctx: &LayerCtx,
    w: &OptLayer,
    adapters: &LayerAdapters,
    s: &LayerSaved,
    dy: Vec<f32>,
) -> Result<(Vec<f32>, LayerGrads)> {
    let c = ctx.config;
    let (rows, h, f) = (ctx.rows, c.hidden_size, c.ffn_dim);
    let (nh, hd) = (c.num_attention_heads, c.head_dim());
    let pre = c.do_layer_norm_before;
    let mut grads = LayerGrads::default();
    let (g1, _) = ln_params(&w.self_attn_layer_norm, None);
    let (g2, _) = ln_params(&w.final_layer_norm, None);
    let ln_attn = BiasSite::AttnLayerNorm.index();
    let ln_mlp = BiasSite::MlpLayerNorm.index();
    // BitFit's dβ of a LayerNorm: the column sums of the gradient of its output.
    let beta_grad = |site: usize, grads: &mut LayerGrads, dout: &[f32]| {
        if adapters.biases[site].is_some() {
            grads.biases[site] = Some(column_sums(dout, rows, h));
        }
    };

    // MLP block.
    let dh2 = if pre {
        dy
    } else {
        beta_grad(ln_mlp, &mut grads, &dy);
        layernorm_bwd(&dy, &s.ln2_in, &s.ln2, g2, rows, h)
    };
    let mut df = dh2.clone();
    if let Some(m) = &s.res_mask_mlp {
        dropout::apply(&mut df, m);
    }
    if let (Some((m, f)), Some(saved)) = (adapters.adapter(AdapterSite::Mlp), &s.houlsby[1]) {
        let (d, g) = houlsby_branch::backward(m, f, saved, &df, rows);
        df = d;
        grads.houlsby[1] = Some(g);
    }
    let mut dact = vec![0.0; rows * f];
    let fc2 = (&w.fc2, LoraTarget::Fc2);
    project_bwd(
        ctx,
        fc2.0,
        fc2.1,
        adapters,
        &s.act,
        &s.branches,
        &df,
        &mut dact,
        &mut grads,
    );
    drop(df);
    relu_bwd_inplace(&mut dact, &s.act);
    let mut dffn_in = vec![0.0; rows * h];
    let fc1 = (&w.fc1, LoraTarget::Fc1);
    project_bwd(
        ctx,
        fc1.0,
        fc1.1,
        adapters,
        &s.ffn_in,
        &s.branches,
        &dact,
        &mut dffn_in,
        &mut grads,
    );
    drop(dact);
    let dh1 = if pre {
        beta_grad(ln_mlp, &mut grads, &dffn_in);
        let mut dh1 = dh2;
        add_inplace(
            &mut dh1,
            &layernorm_bwd(&dffn_in, &s.ln2_in, &s.ln2, g2, rows, h),
        );
        dh1
    } else {
        let mut dx1 = dh2;
        add_inplace(&mut dx1, &dffn_in);
        beta_grad(ln_attn, &mut grads, &dx1);
        layernorm_bwd(&dx1, &s.ln1_in, &s.ln1, g1, rows, h)
    };

    // Attention block.
    let mut dao = dh1.clone();
    if let Some(m) = &s.res_mask_attn {
        dropout::apply(&mut dao, m);
    }
    if let (Some((m, f)), Some(saved)) = (adapters.adapter(AdapterSite::Attention), &s.houlsby[0]) {
        let (d, g) = houlsby_branch::backward(m, f, saved, &dao, rows);
        dao = d;
        grads.houlsby[0] = Some(g);
    }
    let mut d_o = vec![0.0; rows * h];
    let out = (&w.out_proj, LoraTarget::Out);
    project_bwd(
        ctx,
        out.0,
        out.1,
        adapters,
        &s.o,
        &s.branches,
        &dao,
        &mut d_o,
        &mut grads,
    );
    drop(dao);
    let key_blocks = s.attn_mask.as_ref().map(AttentionMask::key_blocks);
    let (mut dq, dk, dv) = attention_bwd_masked(
        &s.q,
        &s.k,
        &s.v,
        &s.o,
        &d_o,
        &s.attn,
        ctx.cu_seqlens,
        nh,
        hd,
        key_blocks.as_ref(),
    )?;
    scale_inplace(&mut dq, (hd as f32).powf(-0.5));
    let mut dattn_in = vec![0.0; rows * h];
    for (lin, t, d) in [
        (&w.q_proj, LoraTarget::Q, &dq),
        (&w.k_proj, LoraTarget::K, &dk),
        (&w.v_proj, LoraTarget::V, &dv),
    ] {
        project_bwd(
            ctx,
            lin,
            t,
            adapters,
            &s.attn_in,
            &s.branches,
            d,
            &mut dattn_in,
            &mut grads,
        );
    }
    let dx = if pre {
        beta_grad(ln_attn, &mut grads, &dattn_in);
        let mut dx = dh1;
        add_inplace(
            &mut dx,
            &layernorm_bwd(&dattn_in, &s.ln1_in, &s.ln1, g1, rows, h),
        );
        dx
    } else {
        let mut dx = dh1;
        add_inplace(&mut dx, &dattn_in);
        dx
    };
    Ok((dx, grads))
}
