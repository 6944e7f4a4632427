//! The whole OPT causal LM on the CPU backend: embeddings, decoder layers, final LayerNorm and
//! the LM head fused with the loss; forward, backward to the trainable PEFT parameters, and
//! evaluation.

use super::dropout::{DropoutRng, MaskSource};
use super::layer::{self, Exposure, LayerAdapters, LayerCtx, LayerGrads, LayerSaved};
use super::{ModelError, Result};
use crate::checkpoint::opt::{Activation, LayerNorm};
use crate::checkpoint::{OptConfig, OptModel};
use crate::cpu::activation::{add_inplace, column_sums};
use crate::cpu::embedding::gather_rows;
use crate::cpu::loss::{self, lm_head_xent, XentOut};
use crate::cpu::matmul::{linear, matmul};
use crate::cpu::norm::{layernorm_bwd, layernorm_fwd, LayerNormSaved};
use crate::data::{PackedBatch, IGNORE_INDEX};
use crate::peft::{BiasSite, LoraTarget, PeftParams};

/// Rows of the LM head processed at once by the fused loss.
const LOSS_CHUNK: usize = 256;

/// A forward pass's output: the hidden states fed to the LM head (`[rows, E]`) and, when the
/// backward will follow, everything it needs.
pub struct Forward {
    /// Final hidden states, `[rows, E]`.
    pub hidden: Vec<f32>,
    /// Tokens in the batch.
    pub rows: usize,
    saved: Option<Saved>,
}

struct Saved {
    cu_seqlens: Vec<i32>,
    layers: Vec<LayerSaved>,
    /// Input and statistics of the decoder's final LayerNorm, if it has one.
    final_ln: Option<(Vec<f32>, LayerNormSaved)>,
    /// Input of `project_out`, if the model has one.
    project_out_in: Option<Vec<f32>>,
}

/// Gradients of every trainable parameter, laid out like the [`PeftParams`] they belong to.
#[derive(Debug, Default)]
pub struct PeftGrads {
    /// Per layer: LoRA, BitFit and Houlsby gradients.
    pub layers: Vec<LayerGrads>,
    /// BitFit's gradient of the decoder's final LayerNorm β, when trained.
    pub final_ln_bias: Option<Vec<f32>>,
}

impl PeftGrads {
    /// LoRA gradients only (per layer, per target in [`LoraTarget::ALL`] order).
    pub fn from_lora(lora: Vec<[Option<super::lora_branch::BranchGrads>; 6]>) -> PeftGrads {
        PeftGrads {
            layers: lora
                .into_iter()
                .map(|lora| LayerGrads {
                    lora,
                    ..Default::default()
                })
                .collect(),
            final_ln_bias: None,
        }
    }

    /// The gradients in the canonical parameter order of [`PeftParams::tensors`], as the
    /// optimizer takes them: LoRA (layer ascending, target in [`LoraTarget::ALL`] order, `A`
    /// then `B`), BitFit (layer ascending, site order, then the final LayerNorm β), Houlsby
    /// (layer ascending, attention then MLP, `down`, its bias, `up`, its bias).
    pub fn flat(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = vec![];
        for l in &self.layers {
            for g in l.lora.iter().flatten() {
                out.extend([g.a.as_slice(), g.b.as_slice()]);
            }
        }
        for l in &self.layers {
            out.extend(l.biases.iter().flatten().map(Vec::as_slice));
        }
        out.extend(self.final_ln_bias.as_deref());
        for l in &self.layers {
            for g in l.houlsby.iter().flatten() {
                out.extend([
                    g.down.as_slice(),
                    g.down_bias.as_slice(),
                    g.up.as_slice(),
                    g.up_bias.as_slice(),
                ]);
            }
        }
        out
    }

    /// Mutable form of [`PeftGrads::flat`] (same order; for clipping).
    pub fn flat_mut(&mut self) -> Vec<&mut [f32]> {
        let mut lora: Vec<&mut [f32]> = vec![];
        let mut bias: Vec<&mut [f32]> = vec![];
        let mut houlsby: Vec<&mut [f32]> = vec![];
        for l in &mut self.layers {
            for g in l.lora.iter_mut().flatten() {
                lora.extend([g.a.as_mut_slice(), g.b.as_mut_slice()]);
            }
            bias.extend(l.biases.iter_mut().flatten().map(Vec::as_mut_slice));
            for g in l.houlsby.iter_mut().flatten() {
                houlsby.extend([
                    g.down.as_mut_slice(),
                    g.down_bias.as_mut_slice(),
                    g.up.as_mut_slice(),
                    g.up_bias.as_mut_slice(),
                ]);
            }
        }
        bias.extend(self.final_ln_bias.as_deref_mut());
        lora.extend(bias);
        lora.extend(houlsby);
        lora
    }

    /// Adds `other` (gradients of another micro-batch of the same step) into `self`.
    pub fn accumulate(&mut self, other: &PeftGrads) {
        for (a, b) in self.flat_mut().into_iter().zip(other.flat()) {
            add_inplace(a, b);
        }
    }

    /// The gradient of LoRA's `A` and `B` of `(layer, target)`, if adapted.
    pub fn get(&self, layer: usize, target: LoraTarget) -> Option<(&[f32], &[f32])> {
        let g = self.layers.get(layer)?.lora[target.index()].as_ref()?;
        Some((&g.a, &g.b))
    }
}

/// Loss of a batch and, in training, the gradients of the adapters.
pub struct StepOutput {
    /// Sum of the per-target cross-entropies (nats).
    pub loss_sum: f64,
    /// Number of targets summed.
    pub count: usize,
    /// Gradients of the trainable parameters for `grad_scale · loss_sum`.
    pub grads: PeftGrads,
}

/// Checks that `params` fit `config`: every LoRA module's shapes match its projection, every
/// BitFit bias has its base bias's length, every Houlsby adapter the hidden size.
pub fn check_adapters(config: &OptConfig, params: &PeftParams) -> Result<()> {
    if let Some(b) = &params.bitfit {
        if b.layers.len() != config.num_hidden_layers {
            return Err(ModelError::Adapter(format!(
                "BitFit holds {} layers, the model {}",
                b.layers.len(),
                config.num_hidden_layers
            )));
        }
        for (i, l) in b.layers.iter().enumerate() {
            for site in BiasSite::ALL {
                let want = match site {
                    BiasSite::Linear(t) => t.dims(config).1,
                    _ => config.hidden_size,
                };
                if let Some(m) = l[site.index()].as_ref().filter(|m| m.shape() != [1, want]) {
                    return Err(ModelError::Adapter(format!(
                        "BitFit `{}` is {:?}, expected [1, {want}]",
                        site.key(i),
                        m.shape()
                    )));
                }
            }
        }
        if let Some(m) = b
            .final_ln
            .as_ref()
            .filter(|m| m.shape() != [1, config.hidden_size])
        {
            return Err(ModelError::Adapter(format!(
                "BitFit's final LayerNorm β is {:?}, expected [1, {}]",
                m.shape(),
                config.hidden_size
            )));
        }
    }
    if let Some(hp) = &params.houlsby {
        let (h, m) = (config.hidden_size, hp.config.bottleneck);
        let ok = hp.layers.len() == config.num_hidden_layers
            && hp.layers.iter().flatten().all(|a| {
                a.down.shape() == [m, h]
                    && a.down_bias.shape() == [1, m]
                    && a.up.shape() == [h, m]
                    && a.up_bias.shape() == [1, h]
            });
        if !ok {
            return Err(ModelError::Adapter(format!(
                "Houlsby adapters do not fit {} layers of width {h} with bottleneck {m}",
                config.num_hidden_layers
            )));
        }
    }
    match &params.lora {
        Some(lora) => check_lora(config, lora),
        None => Ok(()),
    }
}

/// Checks that every LoRA module's shapes match its projection in `config`.
pub fn check_lora(config: &OptConfig, lora: &crate::peft::LoraParams) -> Result<()> {
    for layer in 0..config.num_hidden_layers {
        for t in LoraTarget::ALL {
            if let Some(m) = lora.get(layer, t) {
                let (in_f, out_f) = t.dims(config);
                let r = lora.config.r;
                if m.a.shape() != [r, in_f] || m.b.shape() != [out_f, r] {
                    return Err(ModelError::Adapter(format!(
                        "layer {layer} {}: A is {:?} and B {:?}, expected [{r}, {in_f}] and [{out_f}, {r}]",
                        t.peft_name(),
                        m.a.shape(),
                        m.b.shape()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Checks `batch` against the model `c` before any op runs: consistent lengths, `cu_seqlens`
/// ending at the token count, positions inside the position table, ids inside the vocabulary,
/// targets a token or [`IGNORE_INDEX`]. Both engines call it.
pub fn check_batch(c: &OptConfig, batch: &PackedBatch) -> Result<()> {
    let t = batch.num_tokens();
    if batch.position_ids.len() != t || batch.targets.len() != t {
        return Err(ModelError::Batch(format!(
            "{t} tokens but {} positions and {} targets",
            batch.position_ids.len(),
            batch.targets.len()
        )));
    }
    if t == 0 {
        return Err(ModelError::Batch("the batch has no tokens".into()));
    }
    if batch.cu_seqlens.last().map(|&e| e as i64) != Some(t as i64) {
        return Err(ModelError::Batch(format!(
            "cu_seqlens ends at {:?} but the batch has {t} tokens",
            batch.cu_seqlens.last()
        )));
    }
    if t > i32::MAX as usize {
        return Err(ModelError::Batch(format!("{t} tokens exceed i32 indexing")));
    }
    for (i, &p) in batch.position_ids.iter().enumerate() {
        if p as usize >= c.max_position_embeddings {
            return Err(ModelError::PositionOutOfRange {
                position: i,
                pos: p as usize,
                max: c.max_position_embeddings,
            });
        }
    }
    for (i, &id) in batch.input_ids.iter().enumerate() {
        if id as usize >= c.vocab_size {
            return Err(ModelError::TokenOutOfRange {
                position: i,
                id,
                vocab: c.vocab_size,
            });
        }
    }
    for (i, &y) in batch.targets.iter().enumerate() {
        if y != IGNORE_INDEX && (y < 0 || y as usize >= c.vocab_size) {
            return Err(ModelError::Batch(format!(
                "target {i} is {y}: not a token of the {}-entry vocabulary nor {IGNORE_INDEX}",
                c.vocab_size
            )));
        }
    }
    Ok(())
}

/// The final LayerNorm's `(γ, β)`, β replaced by BitFit's trained one when given.
fn ln_params<'a>(
    ln: &'a Option<LayerNorm>,
    trained: Option<&'a [f32]>,
) -> (Option<&'a [f32]>, Option<&'a [f32]>) {
    match ln {
        Some(l) => (Some(&l.weight), Some(trained.unwrap_or(&l.bias))),
        None => (None, None),
    }
}

/// BitFit's trained final LayerNorm β, if any.
fn final_beta(params: Option<&PeftParams>) -> Option<&[f32]> {
    params?
        .bitfit
        .as_ref()?
        .final_ln
        .as_ref()
        .map(|m| m.data.as_slice())
}

/// Runs the model on `batch`. `rng` switches dropout on (training); `keep` keeps what the
/// backward needs.
pub fn forward(
    model: &OptModel,
    lora: Option<&PeftParams>,
    batch: &PackedBatch,
    rng: Option<DropoutRng>,
    keep: bool,
) -> Result<Forward> {
    let masks = rng.as_ref().map(|r| r as &dyn MaskSource);
    forward_with_masks(model, lora, batch, masks, keep)
}

/// [`forward`] with dropout masks from any [`MaskSource`] (`None`: no dropout).
pub fn forward_with_masks(
    model: &OptModel,
    lora: Option<&PeftParams>,
    batch: &PackedBatch,
    rng: Option<&dyn MaskSource>,
    keep: bool,
) -> Result<Forward> {
    forward_exposed(model, lora, batch, rng, Exposure::NONE, keep)
}

/// [`forward_with_masks`] with exposure: `exposure.mlp` observes each layer's activations and
/// may restrict `fc1`'s output to kept neuron blocks ([`MlpHook`](super::MlpHook));
/// `exposure.attention` sees each layer's scaled queries and keys and may restrict the
/// attention to kept key blocks ([`AttentionHook`](super::AttentionHook)). A mask kept with
/// `keep` is what the backward uses.
///
/// # Errors
/// [`ModelError`] for a batch or adapter that does not fit the model, and
/// [`ModelError::AttentionMask`] (naming the layer) for an attention mask that does not fit
/// the batch.
pub fn forward_exposed(
    model: &OptModel,
    lora: Option<&PeftParams>,
    batch: &PackedBatch,
    rng: Option<&dyn MaskSource>,
    exposure: Exposure<'_>,
    keep: bool,
) -> Result<Forward> {
    let (c, w) = (&model.config, &model.weights);
    if c.activation != Activation::Relu {
        return Err(ModelError::Unsupported(format!(
            "activation {:?}: the OPT runtime implements ReLU",
            c.activation
        )));
    }
    if let Some(l) = lora {
        check_adapters(c, l)?;
    }
    check_batch(c, batch)?;
    let rows = batch.num_tokens();
    let (h, e) = (c.hidden_size, c.word_embed_proj_dim);

    // Embeddings: token rows (projected in when E ≠ H) plus position rows p + 2.
    let mut x = gather_rows(&w.embed_tokens.data, e, &batch.input_ids)?;
    if let Some(p_in) = &w.project_in {
        x = linear(&x, rows, &p_in.data, h, e, None);
    }
    let pos_ids: Vec<u32> = batch.position_ids.iter().map(|&p| p + 2).collect();
    add_inplace(&mut x, &gather_rows(&w.embed_positions.data, h, &pos_ids)?);

    let ctx = LayerCtx {
        config: c,
        cu_seqlens: &batch.cu_seqlens,
        rows,
        rng,
        exposure,
    };
    let mut layers = Vec::with_capacity(if keep { w.layers.len() } else { 0 });
    for (i, lw) in w.layers.iter().enumerate() {
        let adapters = LayerAdapters::of(lora, i);
        let (y, saved) = layer::forward(&ctx, i, lw, &adapters, x)?;
        x = y;
        if keep {
            layers.push(saved);
        }
    }
    let final_ln = if c.has_final_layer_norm() {
        let (g, b) = ln_params(&w.final_layer_norm, final_beta(lora));
        let (y, s) = layernorm_fwd(&x, rows, h, g, b, OptConfig::LAYER_NORM_EPS);
        Some((std::mem::replace(&mut x, y), s))
    } else {
        None
    };
    let project_out_in = match &w.project_out {
        Some(p_out) => {
            let y = linear(&x, rows, &p_out.data, e, h, None);
            Some(std::mem::replace(&mut x, y))
        }
        None => None,
    };
    let saved = keep.then(|| Saved {
        cu_seqlens: batch.cu_seqlens.clone(),
        layers,
        final_ln,
        project_out_in,
    });
    Ok(Forward {
        hidden: x,
        rows,
        saved,
    })
}

/// Backpropagates `d_hidden` (gradient of the final hidden states, `[rows, E]`) through a
/// forward pass run with `keep`, returning the gradients of the trainable parameters.
pub fn backward(
    model: &OptModel,
    lora: Option<&PeftParams>,
    fwd: Forward,
    d_hidden: Vec<f32>,
) -> Result<PeftGrads> {
    let (c, w) = (&model.config, &model.weights);
    let Forward { rows, saved, .. } = fwd;
    let saved =
        saved.ok_or_else(|| ModelError::Batch("backward of a forward run without keep".into()))?;
    let (h, e) = (c.hidden_size, c.word_embed_proj_dim);
    let mut dx = d_hidden;
    if let (Some(p_out), Some(_)) = (&w.project_out, &saved.project_out_in) {
        let mut d = vec![0.0; rows * h];
        matmul(&mut d, &dx, &p_out.data, rows, e, h, false, false, 1.0, 0.0);
        dx = d;
    }
    let mut final_ln_bias = None;
    if let Some((x_in, s)) = &saved.final_ln {
        if final_beta(lora).is_some() {
            final_ln_bias = Some(column_sums(&dx, rows, h));
        }
        let (g, _) = ln_params(&w.final_layer_norm, None);
        dx = layernorm_bwd(&dx, x_in, s, g, rows, h);
    }
    let ctx = LayerCtx {
        config: c,
        cu_seqlens: &saved.cu_seqlens,
        rows,
        rng: None,
        exposure: Exposure::NONE,
    };
    let mut grads: Vec<LayerGrads> = (0..w.layers.len()).map(|_| Default::default()).collect();
    for (i, s) in saved.layers.iter().enumerate().rev() {
        let adapters = LayerAdapters::of(lora, i);
        let (d, g) = layer::backward(&ctx, &w.layers[i], &adapters, s, dx)?;
        dx = d;
        grads[i] = g;
    }
    Ok(PeftGrads {
        layers: grads,
        final_ln_bias,
    })
}

/// Loss of `batch` and the adapter gradients of `grad_scale · loss_sum` (the trainer passes
/// `1/N`, `N` the targets of the whole optimizer step, RUNTIME.md §2.5).
pub fn loss_and_grads(
    model: &OptModel,
    lora: &PeftParams,
    batch: &PackedBatch,
    grad_scale: f32,
    rng: Option<DropoutRng>,
) -> Result<StepOutput> {
    let masks = rng.as_ref().map(|r| r as &dyn MaskSource);
    loss_and_grads_with_masks(model, lora, batch, grad_scale, masks)
}

/// [`loss_and_grads`] with dropout masks from any [`MaskSource`] (`None`: no dropout), e.g.
/// the [`RecordedMasks`](super::dropout::RecordedMasks) of another engine's step.
pub fn loss_and_grads_with_masks(
    model: &OptModel,
    lora: &PeftParams,
    batch: &PackedBatch,
    grad_scale: f32,
    rng: Option<&dyn MaskSource>,
) -> Result<StepOutput> {
    loss_and_grads_exposed(model, lora, batch, grad_scale, rng, Exposure::NONE)
}

/// [`loss_and_grads_with_masks`] with exposure ([`forward_exposed`]: MLP and attention hooks);
/// the backward is exact for the sparse forward (it reuses the masks the forward chose).
pub fn loss_and_grads_exposed(
    model: &OptModel,
    lora: &PeftParams,
    batch: &PackedBatch,
    grad_scale: f32,
    rng: Option<&dyn MaskSource>,
    exposure: Exposure<'_>,
) -> Result<StepOutput> {
    let fwd = forward_exposed(model, Some(lora), batch, rng, exposure, true)?;
    let out = head_loss(model, &fwd, &batch.targets, Some(grad_scale))?;
    let dh = out
        .dh
        .ok_or_else(|| ModelError::Batch("internal: the loss returned no gradient".into()))?;
    let grads = backward(model, Some(lora), fwd, dh)?;
    Ok(StepOutput {
        loss_sum: out.loss_sum,
        count: out.count,
        grads,
    })
}

/// Sum of the per-target losses of `batch` and their number, without dropout.
pub fn eval_loss(
    model: &OptModel,
    lora: Option<&PeftParams>,
    batch: &PackedBatch,
) -> Result<(f64, usize)> {
    let fwd = forward(model, lora, batch, None, false)?;
    let out = head_loss(model, &fwd, &batch.targets, None)?;
    Ok((out.loss_sum, out.count))
}

/// The LM head fused with the loss over `fwd`'s hidden states (and `dh` when `grad_scale`).
pub fn head_loss(
    model: &OptModel,
    fwd: &Forward,
    targets: &[i32],
    grad_scale: Option<f32>,
) -> Result<XentOut> {
    let head = model.weights.lm_head();
    Ok(lm_head_xent(
        &fwd.hidden,
        fwd.rows,
        head.cols,
        &head.data,
        head.rows,
        targets,
        grad_scale,
        LOSS_CHUNK,
    )?)
}

/// Full logits `[rows, V]` of `batch` (for parity tests and small evaluations).
pub fn logits(
    model: &OptModel,
    lora: Option<&PeftParams>,
    batch: &PackedBatch,
) -> Result<Vec<f32>> {
    let fwd = forward(model, lora, batch, None, false)?;
    let head = model.weights.lm_head();
    Ok(loss::logits(
        &fwd.hidden,
        fwd.rows,
        head.cols,
        &head.data,
        head.rows,
    ))
}
