//! The whole OPT causal LM on the CPU backend: embeddings, decoder layers, final LayerNorm and
//! the LM head fused with the loss; forward, backward to the LoRA parameters, and evaluation.

use super::dropout::{DropoutRng, MaskSource};
use super::layer::{self, Exposure, LayerAdapters, LayerCtx, LayerGrads, LayerSaved};
use super::{ModelError, Result};
use crate::checkpoint::opt::{Activation, LayerNorm};
use crate::checkpoint::{OptConfig, OptModel};
use crate::cpu::activation::add_inplace;
use crate::cpu::embedding::gather_rows;
use crate::cpu::loss::{self, lm_head_xent, XentOut};
use crate::cpu::matmul::{linear, matmul};
use crate::cpu::norm::{layernorm_bwd, layernorm_fwd, LayerNormSaved};
use crate::data::{PackedBatch, IGNORE_INDEX};
use crate::peft::{LoraParams, LoraTarget};

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

/// Gradients of every LoRA parameter, laid out like the [`LoraParams`] they belong to.
#[derive(Debug)]
pub struct LoraGrads {
    /// Per layer, per target in [`LoraTarget::ALL`] order.
    pub layers: Vec<LayerGrads>,
}

impl LoraGrads {
    /// The gradients in the canonical parameter order of [`LoraParams`] (layer ascending,
    /// target in [`LoraTarget::ALL`] order, `A` then `B`), as the optimizer takes them.
    pub fn flat(&self) -> Vec<&[f32]> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .flat_map(|g| [g.a.as_slice(), g.b.as_slice()])
            .collect()
    }

    /// Mutable form of [`LoraGrads::flat`] (for clipping).
    pub fn flat_mut(&mut self) -> Vec<&mut [f32]> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.iter_mut().flatten())
            .flat_map(|g| [g.a.as_mut_slice(), g.b.as_mut_slice()])
            .collect()
    }

    /// Adds `other` (gradients of another micro-batch of the same step) into `self`.
    pub fn accumulate(&mut self, other: &LoraGrads) {
        for (a, b) in self.flat_mut().into_iter().zip(other.flat()) {
            add_inplace(a, b);
        }
    }

    /// The gradient of `A` and `B` of `(layer, target)`, if adapted.
    pub fn get(&self, layer: usize, target: LoraTarget) -> Option<(&[f32], &[f32])> {
        let g = self.layers.get(layer)?[target.index()].as_ref()?;
        Some((&g.a, &g.b))
    }
}

/// Loss of a batch and, in training, the gradients of the adapters.
pub struct StepOutput {
    /// Sum of the per-target cross-entropies (nats).
    pub loss_sum: f64,
    /// Number of targets summed.
    pub count: usize,
    /// Adapter gradients of `grad_scale · loss_sum`.
    pub grads: LoraGrads,
}

/// Checks that `lora` fits `config`: every module's shapes match its projection.
pub fn check_adapters(config: &OptConfig, lora: &LoraParams) -> Result<()> {
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

fn ln_params(ln: &Option<LayerNorm>) -> (Option<&[f32]>, Option<&[f32]>) {
    match ln {
        Some(l) => (Some(&l.weight), Some(&l.bias)),
        None => (None, None),
    }
}

/// Runs the model on `batch`. `rng` switches dropout on (training); `keep` keeps what the
/// backward needs.
pub fn forward(
    model: &OptModel,
    lora: Option<&LoraParams>,
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
    lora: Option<&LoraParams>,
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
    lora: Option<&LoraParams>,
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
        let (g, b) = ln_params(&w.final_layer_norm);
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
/// forward pass run with `keep`, returning the LoRA gradients.
pub fn backward(
    model: &OptModel,
    lora: Option<&LoraParams>,
    fwd: Forward,
    d_hidden: Vec<f32>,
) -> Result<LoraGrads> {
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
    if let Some((x_in, s)) = &saved.final_ln {
        let (g, _) = ln_params(&w.final_layer_norm);
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
    Ok(LoraGrads { layers: grads })
}

/// Loss of `batch` and the adapter gradients of `grad_scale · loss_sum` (the trainer passes
/// `1/N`, `N` the targets of the whole optimizer step, RUNTIME.md §2.5).
pub fn loss_and_grads(
    model: &OptModel,
    lora: &LoraParams,
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
    lora: &LoraParams,
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
    lora: &LoraParams,
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
    lora: Option<&LoraParams>,
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
    lora: Option<&LoraParams>,
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
