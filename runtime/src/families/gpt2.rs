//! GPT-2 (RUNTIME.md §6.1): [`Gpt2Config`] from `config.json`, [`Gpt2Model`] from the
//! safetensors files, and its f32 forward over a packed batch on the CPU backend.
//!
//! The block is pre-LN: `x += c_proj(attn(ln_1(x)))`, `x += mlp.c_proj(act(mlp.c_fc(ln_2(x))))`,
//! then `ln_f` and the LM head (tied to `wte` unless the config unties it). Positions index
//! `wpe` directly (no offset, unlike OPT). Every projection is a `Conv1D`, whose weight is
//! stored `[in, out]` (`Y = X·W + b`), kept so here ([`Conv1d`]); `c_attn` fuses q, k and v
//! along its output columns.

use super::common::{
    activate_inplace, causal_attention, check_batch, check_sizes, config_error, read_config,
    Tensors,
};
use super::error::Result;
use crate::checkpoint::opt::{Activation, LayerNorm};
use crate::checkpoint::{Checkpoint, CheckpointError, HostMatrix};
use crate::cpu::activation::add_inplace;
use crate::cpu::{gather_rows, layernorm_fwd, logits, matmul};
use crate::data::PackedBatch;
use serde::Deserialize;
use std::path::Path;

/// A GPT-2 configuration. Absent fields take `transformers.GPT2Config`'s defaults (gpt2
/// small); unknown fields are ignored. Build it with [`Gpt2Config::from_file`] or
/// [`Gpt2Config::from_json`], which reject what the forward does not implement.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// `V`: rows of `wte` (and of the LM head).
    pub vocab_size: usize,
    /// Rows of the learned position table `wpe`: the longest sequence.
    pub n_positions: usize,
    /// `H`: residual width.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Attention heads; divides `H`.
    pub n_head: usize,
    /// MLP width (`n_inner`; `null` or absent means `4·H`).
    pub n_inner: usize,
    /// The MLP activation: [`Activation::GeluNew`] (tanh form, GPT-2's) or
    /// [`Activation::Gelu`] (exact).
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f32,
    /// Divide attention scores by `√hd`.
    pub scale_attn_weights: bool,
    /// Also divide the scores of block `i` by `i + 1`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// HF's `reorder_and_upcast_attn`: computes the scores in f32 with the scale applied
    /// inside the product. In f32 this is the same math as the default path, so it is
    /// accepted and has no effect here.
    pub reorder_and_upcast_attn: bool,
    /// The LM head is `wte` (no `lm_head.weight` is read).
    pub tie_word_embeddings: bool,
}

/// `config.json` as written, absent fields defaulted as transformers does.
#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    activation_function: String,
    layer_norm_epsilon: f64,
    scale_attn_weights: bool,
    scale_attn_by_inverse_layer_idx: bool,
    reorder_and_upcast_attn: bool,
    add_cross_attention: bool,
    tie_word_embeddings: bool,
}

impl Default for RawConfig {
    /// `transformers.GPT2Config`'s defaults.
    fn default() -> Self {
        RawConfig {
            model_type: None,
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            add_cross_attention: false,
            tie_word_embeddings: true,
        }
    }
}

impl Gpt2Config {
    /// Reads and validates `config.json` (a file, or a directory holding one).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Gpt2Config, CheckpointError> {
        let (file, text) = read_config(path.as_ref())?;
        Self::from_json(&text, &file)
    }

    /// Parses and validates config JSON; `file` names it in errors, which also name the field.
    pub fn from_json(text: &str, file: &Path) -> Result<Gpt2Config, CheckpointError> {
        let bad = |reason: String| config_error(file, reason);
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("invalid config: {e}")))?;
        if let Some(t) = raw.model_type.as_deref().filter(|t| *t != "gpt2") {
            return Err(bad(format!("model_type is `{t}`, not `gpt2`")));
        }
        let activation = match raw.activation_function.as_str() {
            "gelu_new" => Activation::GeluNew,
            "gelu" => Activation::Gelu,
            other => {
                return Err(bad(format!(
                    "activation_function `{other}` is not supported for GPT-2 (gelu_new, gelu)"
                )))
            }
        };
        if raw.add_cross_attention {
            return Err(bad(
                "add_cross_attention is true: encoder-decoder GPT-2 is not supported".into(),
            ));
        }
        let eps = raw.layer_norm_epsilon;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(bad(format!(
                "layer_norm_epsilon {eps} is not a non-negative number"
            )));
        }
        let config = Gpt2Config {
            vocab_size: raw.vocab_size,
            n_positions: raw.n_positions,
            n_embd: raw.n_embd,
            n_layer: raw.n_layer,
            n_head: raw.n_head,
            n_inner: raw.n_inner.unwrap_or(raw.n_embd.saturating_mul(4)),
            activation,
            layer_norm_epsilon: eps as f32,
            scale_attn_weights: raw.scale_attn_weights,
            scale_attn_by_inverse_layer_idx: raw.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn: raw.reorder_and_upcast_attn,
            tie_word_embeddings: raw.tie_word_embeddings,
        };
        check_sizes(
            &[
                ("vocab_size", config.vocab_size),
                ("n_positions", config.n_positions),
                ("n_embd", config.n_embd),
                ("n_layer", config.n_layer),
                ("n_head", config.n_head),
                ("n_inner", config.n_inner),
            ],
            config.n_layer,
        )
        .map_err(bad)?;
        if !config.n_embd.is_multiple_of(config.n_head) {
            return Err(bad(format!(
                "n_embd {} is not divisible by n_head {}",
                config.n_embd, config.n_head
            )));
        }
        Ok(config)
    }

    /// `hd = H / n_head`.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The factor block `layer` multiplies its attention scores by: `1/√hd` if
    /// `scale_attn_weights`, times `1/(layer + 1)` if `scale_attn_by_inverse_layer_idx`.
    pub fn attention_scale(&self, layer: usize) -> f32 {
        let mut s = 1.0f64;
        if self.scale_attn_weights {
            s /= (self.head_dim() as f64).sqrt();
        }
        if self.scale_attn_by_inverse_layer_idx {
            s /= (layer + 1) as f64;
        }
        s as f32
    }
}

/// A GPT-2 `Conv1D`: `Y = X·W + b` with `W` stored **`[in, out]`** (the transpose of an
/// `nn.Linear`), as in the checkpoint and as PEFT's `fan_in_fan_out` expects.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv1d {
    /// `[in, out]`.
    pub weight: HostMatrix,
    /// `[out]`.
    pub bias: Vec<f32>,
}

impl Conv1d {
    /// `x [rows, in]·W + b` → `[rows, out]`.
    ///
    /// # Panics
    /// If `x` is not `[rows, in]` (callers are internal).
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (inp, out) = (self.weight.rows, self.weight.cols);
        let mut y = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            y.extend_from_slice(&self.bias);
        }
        matmul(
            &mut y,
            x,
            &self.weight.data,
            rows,
            inp,
            out,
            false,
            false,
            1.0,
            1.0,
        );
        y
    }
}

/// One GPT-2 block.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Layer {
    /// LayerNorm before attention.
    pub ln_1: LayerNorm,
    /// Fused q/k/v projection `[H, 3H]`: output columns `[0,H)` q, `[H,2H)` k, `[2H,3H)` v.
    pub c_attn: Conv1d,
    /// Attention output projection `[H, H]` (`attn.c_proj`).
    pub attn_proj: Conv1d,
    /// LayerNorm before the MLP.
    pub ln_2: LayerNorm,
    /// `[H, n_inner]`.
    pub c_fc: Conv1d,
    /// `[n_inner, H]` (`mlp.c_proj`).
    pub mlp_proj: Conv1d,
}

/// A GPT-2 causal LM in f32: config and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Model {
    /// From `config.json`.
    pub config: Gpt2Config,
    /// Token embeddings `[V, H]`; also the LM head when tied.
    pub wte: HostMatrix,
    /// Position embeddings `[n_positions, H]`.
    pub wpe: HostMatrix,
    /// The blocks, in order.
    pub layers: Vec<Gpt2Layer>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
    /// `[V, H]` when untied; `None` when tied (see [`Gpt2Model::lm_head`]).
    pub lm_head: Option<HostMatrix>,
}

/// Prefixes tried for the transformer's tensors: `GPT2LMHeadModel` files, then hub files of a
/// bare `GPT2Model`.
const PREFIXES: [&str; 2] = ["transformer.", ""];
/// The untied LM head (never prefixed).
const LM_HEAD: &str = "lm_head.weight";

impl Gpt2Model {
    /// Loads `dir`: `config.json` and the (possibly sharded) safetensors weights.
    pub fn load(dir: impl AsRef<Path>) -> Result<Gpt2Model> {
        let dir = dir.as_ref();
        let config = Gpt2Config::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Ok(Self::from_checkpoint(&checkpoint, config)?)
    }

    /// Takes the weights `config` describes out of `checkpoint`: every tensor present with
    /// its shape and a loadable dtype, names with or without `transformer.`, the causal-mask
    /// buffers `h.{i}.attn.bias` / `masked_bias` of older files ignored, `lm_head.weight`
    /// required when untied and ignored when tied (as transformers does), anything else an
    /// error naming the file and tensor.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        config: Gpt2Config,
    ) -> Result<Gpt2Model, CheckpointError> {
        let mut t = Tensors::new(checkpoint, &PREFIXES, "wte.weight")?;
        let (v, h, f) = (config.vocab_size, config.n_embd, config.n_inner);
        let wte = t.matrix("wte.weight", v, h)?;
        let wpe = t.matrix("wpe.weight", config.n_positions, h)?;
        let mut layers = Vec::new();
        for i in 0..config.n_layer {
            let mut conv =
                |name: &str, inp: usize, out: usize| -> Result<Conv1d, CheckpointError> {
                    Ok(Conv1d {
                        weight: t.matrix(&format!("h.{i}.{name}.weight"), inp, out)?,
                        bias: t.vector(&format!("h.{i}.{name}.bias"), out)?,
                    })
                };
            let c_attn = conv("attn.c_attn", h, 3 * h)?;
            let attn_proj = conv("attn.c_proj", h, h)?;
            let c_fc = conv("mlp.c_fc", h, f)?;
            let mlp_proj = conv("mlp.c_proj", f, h)?;
            layers.push(Gpt2Layer {
                ln_1: t.layer_norm(&format!("h.{i}.ln_1"), h)?,
                c_attn,
                attn_proj,
                ln_2: t.layer_norm(&format!("h.{i}.ln_2"), h)?,
                c_fc,
                mlp_proj,
            });
        }
        let ln_f = t.layer_norm("ln_f", h)?;
        let lm_head = if config.tie_word_embeddings {
            t.skip(LM_HEAD);
            None
        } else {
            Some(t.full_matrix(LM_HEAD, v, h)?)
        };
        let n_layer = config.n_layer;
        t.finish(|name| is_mask_buffer(name, n_layer))?;
        Ok(Gpt2Model {
            config,
            wte,
            wpe,
            layers,
            ln_f,
            lm_head,
        })
    }

    /// The LM head `[V, H]`: `lm_head` when untied, else `wte`.
    pub fn lm_head(&self) -> &HostMatrix {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// The final hidden states `[T, H]` (after `ln_f`) of a packed batch: positions from
    /// `position_ids`, attention causal within each `cu_seqlens` sequence only.
    ///
    /// # Errors
    /// [`FamilyError`](super::FamilyError) for a batch that does not fit the model (id
    /// outside the vocabulary, position beyond `n_positions`, inconsistent arrays).
    pub fn hidden(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let c = &self.config;
        let t = check_batch(batch, c.vocab_size, Some(c.n_positions))?;
        let (h, nh, hd) = (c.n_embd, c.n_head, c.head_dim());
        let eps = c.layer_norm_epsilon;
        let mut x = gather_rows(&self.wte.data, h, &batch.input_ids)?;
        add_inplace(
            &mut x,
            &gather_rows(&self.wpe.data, h, &batch.position_ids)?,
        );
        for (i, l) in self.layers.iter().enumerate() {
            let (a, _) = layernorm_fwd(&x, t, h, Some(&l.ln_1.weight), Some(&l.ln_1.bias), eps);
            let qkv = l.c_attn.forward(&a, t);
            let (mut q, mut k, mut v) = (
                Vec::with_capacity(t * h),
                Vec::with_capacity(t * h),
                Vec::with_capacity(t * h),
            );
            for row in qkv.chunks_exact(3 * h) {
                q.extend_from_slice(&row[..h]);
                k.extend_from_slice(&row[h..2 * h]);
                v.extend_from_slice(&row[2 * h..]);
            }
            let o = causal_attention(
                &mut q,
                k,
                v,
                &batch.cu_seqlens,
                nh,
                nh,
                hd,
                c.attention_scale(i),
            )?;
            add_inplace(&mut x, &l.attn_proj.forward(&o, t));
            let (b, _) = layernorm_fwd(&x, t, h, Some(&l.ln_2.weight), Some(&l.ln_2.bias), eps);
            let mut m = l.c_fc.forward(&b, t);
            activate_inplace(&mut m, c.activation);
            add_inplace(&mut x, &l.mlp_proj.forward(&m, t));
        }
        let (y, _) = layernorm_fwd(
            &x,
            t,
            h,
            Some(&self.ln_f.weight),
            Some(&self.ln_f.bias),
            eps,
        );
        Ok(y)
    }

    /// Logits `[T, V]` (f32, row-major) of a packed batch: [`hidden`](Self::hidden) times
    /// the LM head.
    ///
    /// # Errors
    /// As [`hidden`](Self::hidden).
    pub fn logits(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let y = self.hidden(batch)?;
        let head = self.lm_head();
        Ok(logits(
            &y,
            batch.num_tokens(),
            head.cols,
            &head.data,
            head.rows,
        ))
    }
}

/// Whether `name` is one of the causal-mask buffers (`[transformer.]h.{i}.attn.bias` or
/// `.masked_bias`) that older GPT-2 files hold and transformers ignores.
fn is_mask_buffer(name: &str, n_layer: usize) -> bool {
    let rest = name.strip_prefix("transformer.").unwrap_or(name);
    let Some(rest) = rest.strip_prefix("h.") else {
        return false;
    };
    let Some((index, tail)) = rest.split_once('.') else {
        return false;
    };
    index.parse::<usize>().is_ok_and(|i| i < n_layer)
        && (tail == "attn.bias" || tail == "attn.masked_bias")
}
