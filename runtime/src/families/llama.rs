//! LLaMA-style models (RUNTIME.md §6.2): [`LlamaConfig`] from `config.json`, [`LlamaModel`]
//! from the safetensors files, and its f32 forward over a packed batch on the CPU backend.
//!
//! Layer: `x += o_proj(attn(rope(q), rope(k), v))` on `input_layernorm(x)`, then
//! `x += down_proj(act(gate_proj(b)) ⊙ up_proj(b))` on `b = post_attention_layernorm(x)`;
//! final `norm` and the LM head. Norms are RMSNorm ([`rms_norm`]), positions enter only
//! through HF's half-rotation RoPE ([`rope_inv_freq`], [`apply_rope`]), key/value heads may be
//! fewer than query heads (GQA, each serving `heads / kv_heads` consecutive query heads).

use super::common::{
    activate_inplace, causal_attention, check_batch, check_sizes, config_error, read_config,
    Tensors,
};
use super::error::Result;
use crate::checkpoint::opt::{Activation, Linear};
use crate::checkpoint::{Checkpoint, CheckpointError, HostMatrix};
use crate::cpu::activation::add_inplace;
use crate::cpu::{gather_rows, linear, logits};
use crate::data::PackedBatch;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// A LLaMA-style configuration. Absent fields take `transformers.LlamaConfig`'s defaults;
/// unknown fields are ignored. Build it with [`LlamaConfig::from_file`] or
/// [`LlamaConfig::from_json`], which reject what the forward does not implement (scaled RoPE
/// variants, partial rotary, other activations).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `V`: rows of `embed_tokens` and of the LM head.
    pub vocab_size: usize,
    /// `H`: residual width.
    pub hidden_size: usize,
    /// `I`: width of `gate_proj` / `up_proj`.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads `nh`.
    pub num_attention_heads: usize,
    /// Key/value heads `nkv` (GQA; equal to `nh` when absent); divides `nh`.
    pub num_key_value_heads: usize,
    /// `hd`: `head_dim` if given, else `H / nh` (as transformers); even (RoPE rotates halves).
    pub head_dim: usize,
    /// The MLP's gate activation: [`Activation::Silu`] or [`Activation::Relu`].
    pub activation: Activation,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base θ: `rope_parameters.rope_theta` (transformers v5), else the top-level
    /// `rope_theta`, else 10000.
    pub rope_theta: f64,
    /// Biases on q/k/v/o_proj.
    pub attention_bias: bool,
    /// Biases on gate/up/down_proj.
    pub mlp_bias: bool,
    /// The LM head is `embed_tokens.weight` (no `lm_head.weight` is read).
    pub tie_word_embeddings: bool,
    /// The context length the model was trained for. Informational: default RoPE is
    /// computed for any position, as transformers does, so longer sequences are not refused.
    pub max_position_embeddings: usize,
}

/// `config.json` as written, absent fields defaulted as transformers does.
#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: String,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    partial_rotary_factor: Option<f64>,
    attention_bias: bool,
    mlp_bias: bool,
    tie_word_embeddings: bool,
    max_position_embeddings: usize,
}

impl Default for RawConfig {
    /// `transformers.LlamaConfig`'s defaults.
    fn default() -> Self {
        RawConfig {
            model_type: None,
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            partial_rotary_factor: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            max_position_embeddings: 2048,
        }
    }
}

/// RoPE's base θ from `rope_parameters` / `rope_scaling` / `rope_theta`; only the default
/// (unscaled, full-rotary) RoPE is accepted. The error names the field.
fn rope_theta(raw: &RawConfig) -> Result<f64, String> {
    let rope_type = |obj: &serde_json::Map<String, Value>, field: &str| -> Result<(), String> {
        match obj.get("rope_type").or_else(|| obj.get("type")) {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(t)) if t == "default" => Ok(()),
            Some(Value::String(t)) => Err(format!(
                "{field}.rope_type `{t}` is not supported (only the default RoPE is implemented)"
            )),
            Some(other) => Err(format!("{field}.rope_type must be a string, found {other}")),
        }
    };
    let partial = |v: Option<f64>, field: &str| match v {
        Some(f) if f != 1.0 => Err(format!(
            "{field} {f} is not supported (RoPE over the whole head only)"
        )),
        _ => Ok(()),
    };
    partial(raw.partial_rotary_factor, "partial_rotary_factor")?;
    match &raw.rope_scaling {
        None | Some(Value::Null) => {}
        Some(Value::Object(obj)) => rope_type(obj, "rope_scaling")?,
        Some(other) => {
            return Err(format!(
                "rope_scaling must be an object or null, found {other}"
            ))
        }
    }
    let mut theta = raw.rope_theta;
    match &raw.rope_parameters {
        None | Some(Value::Null) => {}
        Some(Value::Object(obj)) => {
            rope_type(obj, "rope_parameters")?;
            partial(
                obj.get("partial_rotary_factor").and_then(Value::as_f64),
                "rope_parameters.partial_rotary_factor",
            )?;
            match obj.get("rope_theta") {
                None | Some(Value::Null) => {}
                Some(v) => {
                    theta = Some(v.as_f64().ok_or_else(|| {
                        format!("rope_parameters.rope_theta must be a number, found {v}")
                    })?)
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "rope_parameters must be an object or null, found {other}"
            ))
        }
    }
    let theta = theta.unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(format!("rope_theta {theta} is not a positive number"));
    }
    Ok(theta)
}

impl LlamaConfig {
    /// Reads and validates `config.json` (a file, or a directory holding one).
    pub fn from_file(path: impl AsRef<Path>) -> Result<LlamaConfig, CheckpointError> {
        let (file, text) = read_config(path.as_ref())?;
        Self::from_json(&text, &file)
    }

    /// Parses and validates config JSON; `file` names it in errors, which also name the field.
    pub fn from_json(text: &str, file: &Path) -> Result<LlamaConfig, CheckpointError> {
        let bad = |reason: String| config_error(file, reason);
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("invalid config: {e}")))?;
        if let Some(t) = raw.model_type.as_deref().filter(|t| *t != "llama") {
            return Err(bad(format!("model_type is `{t}`, not `llama`")));
        }
        let activation = match raw.hidden_act.as_str() {
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            other => {
                return Err(bad(format!(
                    "hidden_act `{other}` is not supported (silu, relu)"
                )))
            }
        };
        let theta = rope_theta(&raw).map_err(bad)?;
        let eps = raw.rms_norm_eps;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(bad(format!(
                "rms_norm_eps {eps} is not a non-negative number"
            )));
        }
        let nh = raw.num_attention_heads;
        let config = LlamaConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: nh,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(nh),
            head_dim: raw
                .head_dim
                .unwrap_or_else(|| raw.hidden_size.checked_div(nh).unwrap_or(0)),
            activation,
            rms_norm_eps: eps as f32,
            rope_theta: theta,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            tie_word_embeddings: raw.tie_word_embeddings,
            max_position_embeddings: raw.max_position_embeddings,
        };
        check_sizes(
            &[
                ("vocab_size", config.vocab_size),
                ("hidden_size", config.hidden_size),
                ("intermediate_size", config.intermediate_size),
                ("num_hidden_layers", config.num_hidden_layers),
                ("num_attention_heads", nh),
                ("num_key_value_heads", config.num_key_value_heads),
                ("head_dim", config.head_dim),
            ],
            config.num_hidden_layers,
        )
        .map_err(bad)?;
        if !nh.is_multiple_of(config.num_key_value_heads) {
            return Err(bad(format!(
                "num_attention_heads {nh} is not a multiple of num_key_value_heads {}",
                config.num_key_value_heads
            )));
        }
        if !config.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} is odd; RoPE rotates two halves",
                config.head_dim
            )));
        }
        Ok(config)
    }
}

/// One decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaLayer {
    /// RMSNorm weight `[H]` before attention.
    pub input_layernorm: Vec<f32>,
    /// `[nh·hd, H]`.
    pub q_proj: Linear,
    /// `[nkv·hd, H]`.
    pub k_proj: Linear,
    /// `[nkv·hd, H]`.
    pub v_proj: Linear,
    /// `[H, nh·hd]`.
    pub o_proj: Linear,
    /// RMSNorm weight `[H]` before the MLP.
    pub post_attention_layernorm: Vec<f32>,
    /// `[I, H]`.
    pub gate_proj: Linear,
    /// `[I, H]`.
    pub up_proj: Linear,
    /// `[H, I]`.
    pub down_proj: Linear,
}

/// A LLaMA-style causal LM in f32: config and weights (`nn.Linear` layout `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaModel {
    /// From `config.json`.
    pub config: LlamaConfig,
    /// `[V, H]`; also the LM head when tied.
    pub embed_tokens: HostMatrix,
    /// The layers, in order.
    pub layers: Vec<LlamaLayer>,
    /// Final RMSNorm weight `[H]`.
    pub norm: Vec<f32>,
    /// `[V, H]` when untied; `None` when tied (see [`LlamaModel::lm_head`]).
    pub lm_head: Option<HostMatrix>,
}

/// Prefixes tried for the decoder's tensors: `LlamaForCausalLM` files, then a bare
/// `LlamaModel`'s.
const PREFIXES: [&str; 2] = ["model.", ""];
/// The untied LM head (never prefixed).
const LM_HEAD: &str = "lm_head.weight";

impl LlamaModel {
    /// Loads `dir`: `config.json` and the (possibly sharded) safetensors weights.
    pub fn load(dir: impl AsRef<Path>) -> Result<LlamaModel> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Ok(Self::from_checkpoint(&checkpoint, config)?)
    }

    /// Takes the weights `config` describes out of `checkpoint`: every tensor present with
    /// its shape and a loadable dtype, names with or without `model.`, `lm_head.weight`
    /// required when untied and ignored when tied, the `rotary_emb.inv_freq` buffers of
    /// older files ignored, anything else an error naming the file and tensor.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        config: LlamaConfig,
    ) -> Result<LlamaModel, CheckpointError> {
        let mut t = Tensors::new(checkpoint, &PREFIXES, "embed_tokens.weight")?;
        let c = &config;
        let (v, h, i_dim) = (c.vocab_size, c.hidden_size, c.intermediate_size);
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let embed_tokens = t.matrix("embed_tokens.weight", v, h)?;
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = |name: &str| format!("layers.{i}.{name}");
            let (ab, mb) = (c.attention_bias, c.mlp_bias);
            layers.push(LlamaLayer {
                input_layernorm: t.vector(&p("input_layernorm.weight"), h)?,
                q_proj: t.linear(&p("self_attn.q_proj"), q_out, h, ab)?,
                k_proj: t.linear(&p("self_attn.k_proj"), kv_out, h, ab)?,
                v_proj: t.linear(&p("self_attn.v_proj"), kv_out, h, ab)?,
                o_proj: t.linear(&p("self_attn.o_proj"), h, q_out, ab)?,
                post_attention_layernorm: t.vector(&p("post_attention_layernorm.weight"), h)?,
                gate_proj: t.linear(&p("mlp.gate_proj"), i_dim, h, mb)?,
                up_proj: t.linear(&p("mlp.up_proj"), i_dim, h, mb)?,
                down_proj: t.linear(&p("mlp.down_proj"), h, i_dim, mb)?,
            });
        }
        let norm = t.vector("norm.weight", h)?;
        let lm_head = if c.tie_word_embeddings {
            t.skip(LM_HEAD);
            None
        } else {
            Some(t.full_matrix(LM_HEAD, v, h)?)
        };
        t.finish(|name| name.ends_with(".self_attn.rotary_emb.inv_freq"))?;
        Ok(LlamaModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The LM head `[V, H]`: `lm_head` when untied, else `embed_tokens`.
    pub fn lm_head(&self) -> &HostMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The final hidden states `[T, H]` (after `norm`) of a packed batch: RoPE positions from
    /// `position_ids`, attention causal within each `cu_seqlens` sequence only.
    ///
    /// # Errors
    /// [`FamilyError`](super::FamilyError) for a batch that does not fit the model.
    pub fn hidden(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let c = &self.config;
        let t = check_batch(batch, c.vocab_size, None)?;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps;
        let inv_freq = rope_inv_freq(hd, c.rope_theta);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let lin = |x: &[f32], l: &Linear| {
            linear(
                x,
                t,
                &l.weight.data,
                l.weight.rows,
                l.weight.cols,
                l.bias.as_deref(),
            )
        };
        let mut x = gather_rows(&self.embed_tokens.data, h, &batch.input_ids)?;
        for l in &self.layers {
            let a = rms_norm(&x, t, h, &l.input_layernorm, eps);
            let mut q = lin(&a, &l.q_proj);
            let mut k = lin(&a, &l.k_proj);
            let v = lin(&a, &l.v_proj);
            apply_rope(&mut q, nh, hd, &batch.position_ids, &inv_freq);
            apply_rope(&mut k, nkv, hd, &batch.position_ids, &inv_freq);
            let o = causal_attention(&mut q, k, v, &batch.cu_seqlens, nh, nkv, hd, scale)?;
            add_inplace(&mut x, &lin(&o, &l.o_proj));
            let b = rms_norm(&x, t, h, &l.post_attention_layernorm, eps);
            let mut gate = lin(&b, &l.gate_proj);
            activate_inplace(&mut gate, c.activation);
            let up = lin(&b, &l.up_proj);
            gate.iter_mut().zip(&up).for_each(|(g, u)| *g *= u);
            add_inplace(&mut x, &lin(&gate, &l.down_proj));
        }
        Ok(rms_norm(&x, t, h, &self.norm, eps))
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

/// RMSNorm over rows of `x [rows, cols]`, as `LlamaRMSNorm` in f32:
/// `x̂ = x / √(mean(x²) + eps)`, then `x̂ ⊙ weight` (no bias, no mean subtraction; the mean
/// accumulated in f64).
///
/// # Panics
/// If `x` is not `[rows, cols]` or `weight` not `[cols]`.
pub fn rms_norm(x: &[f32], rows: usize, cols: usize, weight: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), rows * cols, "rms_norm: x is not [{rows}, {cols}]");
    assert_eq!(weight.len(), cols, "rms_norm: weight is not [{cols}]");
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols.max(1)) {
        let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (ms as f32 + eps).sqrt();
        y.extend(row.iter().zip(weight).map(|(&v, &w)| w * (v * rstd)));
    }
    y
}

/// RoPE's inverse frequencies, as transformers' default RoPE computes them in f32:
/// `inv_freq_j = 1 / θ^(2j/hd)` for `j < hd/2`.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| {
            let e = (2 * j) as f32 / head_dim as f32;
            1.0 / (theta as f32).powf(e)
        })
        .collect()
}

/// HF's half-rotation RoPE in place on `x [T, heads·hd]`: for token `t` at position
/// `p = positions[t]` and `j < hd/2`, with `φ = p·inv_freq_j` (f32 product, cos/sin rounded
/// to f32), each head's halves `(x₁, x₂)` become `(x₁·cos − x₂·sin, x₂·cos + x₁·sin)`, i.e.
/// `x·cos + rot(x)·sin` with `rot(x) = [−x₂, x₁]`. Position 0 is the identity.
///
/// # Panics
/// If `x` is not `[positions.len(), heads·hd]` or `inv_freq` not `[hd/2]`.
pub fn apply_rope(x: &mut [f32], heads: usize, hd: usize, positions: &[u32], inv_freq: &[f32]) {
    let half = hd / 2;
    assert_eq!(inv_freq.len(), half, "apply_rope: inv_freq is not [hd/2]");
    assert_eq!(
        x.len(),
        positions.len() * heads * hd,
        "apply_rope: x is not [T, heads·hd]"
    );
    let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);
    for (row, &p) in x.chunks_exact_mut((heads * hd).max(1)).zip(positions) {
        for j in 0..half {
            let phi = f64::from(p as f32 * inv_freq[j]);
            cos[j] = phi.cos() as f32;
            sin[j] = phi.sin() as f32;
        }
        for head in row.chunks_exact_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * cos[j] + -b * sin[j];
                x2[j] = b * cos[j] + a * sin[j];
            }
        }
    }
}
