//! [`OptConfig`]: the fields of an OPT `config.json` that the forward and the loader need
//! (RUNTIME.md §1.1), with Hugging Face's defaults and consistency checks.

use crate::checkpoint::error::{CheckpointError, Result};
use serde::Deserialize;
use std::path::Path;

/// The MLP activation (`activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `relu`: every OPT checkpoint.
    Relu,
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_new`: the tanh approximation (GPT-2's).
    GeluNew,
    /// `silu` (alias `swish`): `x·σ(x)`.
    Silu,
}

impl Activation {
    /// The activation named `name` in a config, as transformers' `ACT2FN` spells it.
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "relu" => Some(Activation::Relu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" => Some(Activation::GeluNew),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }
}

/// An OPT model's configuration. Absent fields take `transformers.OPTConfig`'s defaults (those of
/// facebook/opt-125m); unknown fields are ignored. Build it with [`OptConfig::from_file`] or
/// [`OptConfig::from_json`], which also [validate](OptConfig::validate) it.
#[derive(Debug, Clone, PartialEq)]
pub struct OptConfig {
    /// `V`: rows of `embed_tokens` and of the LM head (may exceed the tokenizer's size).
    pub vocab_size: usize,
    /// `H`: residual width (`hidden_size`, or `d_model` in old configs).
    pub hidden_size: usize,
    /// `L`: decoder layers.
    pub num_hidden_layers: usize,
    /// `F`: width of `fc1`'s output.
    pub ffn_dim: usize,
    /// `nh`: attention heads; divides `H`.
    pub num_attention_heads: usize,
    /// `P`: usable positions; `embed_positions` has `P + 2` rows.
    pub max_position_embeddings: usize,
    /// `E`: width of token embeddings and the LM head (`H` when absent); `E ≠ H` adds
    /// `project_in`/`project_out`.
    pub word_embed_proj_dim: usize,
    /// Pre-LN (`true`) or post-LN (`false`, opt-350m).
    pub do_layer_norm_before: bool,
    /// `_remove_final_layer_norm`: no decoder-level final LayerNorm even when pre-LN.
    pub remove_final_layer_norm: bool,
    /// Biases on q/k/v/out_proj, fc1 and fc2.
    pub enable_bias: bool,
    /// LayerNorms have γ/β; if false there are no LayerNorm tensors.
    pub layer_norm_elementwise_affine: bool,
    /// The MLP activation.
    pub activation: Activation,
    /// Dropout on the two residual branches in training.
    pub dropout: f32,
    /// Dropout on attention probabilities in training.
    pub attention_dropout: f32,
    /// Unused by transformers' OPT layer; kept for completeness.
    pub activation_dropout: f32,
    /// Probability of skipping a layer in training.
    pub layerdrop: f32,
    /// `<pad>` id (1 in OPT).
    pub pad_token_id: Option<u32>,
    /// BOS id (2 in OPT: `</s>`).
    pub bos_token_id: Option<u32>,
    /// EOS id (2 in OPT: `</s>`).
    pub eos_token_id: Option<u32>,
    /// The LM head is `embed_tokens.weight` (no `lm_head.weight` is read).
    pub tie_word_embeddings: bool,
    /// Storage dtype named by the config (`dtype`, or `torch_dtype` in older files), if any.
    pub dtype: Option<String>,
}

/// `config.json` as written, absent fields defaulted as transformers does.
#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: Option<usize>,
    d_model: Option<usize>,
    num_hidden_layers: usize,
    ffn_dim: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    word_embed_proj_dim: Option<usize>,
    do_layer_norm_before: bool,
    _remove_final_layer_norm: bool,
    enable_bias: bool,
    layer_norm_elementwise_affine: bool,
    activation_function: String,
    dropout: f32,
    attention_dropout: f32,
    activation_dropout: f32,
    layerdrop: f32,
    pad_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    tie_word_embeddings: bool,
    dtype: Option<String>,
    torch_dtype: Option<String>,
}

impl Default for RawConfig {
    /// `transformers.OPTConfig.__init__`'s defaults.
    fn default() -> Self {
        RawConfig {
            model_type: None,
            vocab_size: 50272,
            hidden_size: None,
            d_model: None,
            num_hidden_layers: 12,
            ffn_dim: 3072,
            num_attention_heads: 12,
            max_position_embeddings: 2048,
            word_embed_proj_dim: None,
            do_layer_norm_before: true,
            _remove_final_layer_norm: false,
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            activation_function: "relu".into(),
            dropout: 0.1,
            attention_dropout: 0.0,
            activation_dropout: 0.0,
            layerdrop: 0.0,
            pad_token_id: Some(1),
            bos_token_id: Some(2),
            eos_token_id: Some(2),
            tie_word_embeddings: true,
            dtype: None,
            torch_dtype: None,
        }
    }
}

impl OptConfig {
    /// OPT's LayerNorm epsilon: not in the config, PyTorch's default.
    pub const LAYER_NORM_EPS: f32 = 1e-5;

    /// The most decoder layers [`validate`](Self::validate) accepts (OPT-175B has 96). A
    /// larger count is a malformed file: listing its tensors alone would take unbounded time
    /// and memory before any checkpoint is looked at.
    pub const MAX_LAYERS: usize = 1 << 12;

    /// The most parameters [`validate`](Self::validate) accepts, 2^40 (about 1.1 T; OPT-175B
    /// has 0.175 T). A larger model is a malformed file, and the sizes derived from one
    /// (parameter and byte counts, memory plans) could overflow.
    pub const MAX_PARAMETERS: u64 = 1 << 40;

    /// Reads and validates `config.json` (a file, or a directory holding one).
    pub fn from_file(path: impl AsRef<Path>) -> Result<OptConfig> {
        let path = path.as_ref();
        let path = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|source| CheckpointError::Io {
            file: path.clone(),
            op: "read",
            source,
        })?;
        Self::from_json(&text, &path)
    }

    /// Parses and validates config JSON; `file` names it in errors.
    pub fn from_json(text: &str, file: &Path) -> Result<OptConfig> {
        let bad = |reason: String| CheckpointError::Config {
            file: file.into(),
            reason,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("invalid config: {e}")))?;
        if let Some(t) = raw.model_type.as_deref().filter(|t| *t != "opt") {
            return Err(bad(format!("model_type is `{t}`, not `opt`")));
        }
        let activation = Activation::from_name(&raw.activation_function).ok_or_else(|| {
            bad(format!(
                "activation_function `{}` is not supported (relu, gelu, gelu_new, silu)",
                raw.activation_function
            ))
        })?;
        let hidden_size = raw.hidden_size.or(raw.d_model).unwrap_or(768);
        let config = OptConfig {
            vocab_size: raw.vocab_size,
            hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            ffn_dim: raw.ffn_dim,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            word_embed_proj_dim: raw.word_embed_proj_dim.unwrap_or(hidden_size),
            do_layer_norm_before: raw.do_layer_norm_before,
            remove_final_layer_norm: raw._remove_final_layer_norm,
            enable_bias: raw.enable_bias,
            layer_norm_elementwise_affine: raw.layer_norm_elementwise_affine,
            activation,
            dropout: raw.dropout,
            attention_dropout: raw.attention_dropout,
            activation_dropout: raw.activation_dropout,
            layerdrop: raw.layerdrop,
            pad_token_id: raw.pad_token_id,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
            tie_word_embeddings: raw.tie_word_embeddings,
            dtype: raw.dtype.or(raw.torch_dtype),
        };
        config.validate().map_err(bad)?;
        Ok(config)
    }

    /// Checks the fields against each other; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("ffn_dim", self.ffn_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("word_embed_proj_dim", self.word_embed_proj_dim),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.num_hidden_layers > Self::MAX_LAYERS {
            return Err(format!(
                "num_hidden_layers {} is more than {} (a malformed config?)",
                self.num_hidden_layers,
                Self::MAX_LAYERS
            ));
        }
        match self.checked_num_parameters() {
            Some(n) if n <= Self::MAX_PARAMETERS => {}
            n => {
                return Err(format!(
                    "vocab_size {}, hidden_size {}, ffn_dim {}, max_position_embeddings {} and \
                     word_embed_proj_dim {} describe {} parameters, more than the limit of {} \
                     (a malformed config?)",
                    self.vocab_size,
                    self.hidden_size,
                    self.ffn_dim,
                    self.max_position_embeddings,
                    self.word_embed_proj_dim,
                    n.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string()),
                    Self::MAX_PARAMETERS
                ))
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, p) in [
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
            ("activation_dropout", self.activation_dropout),
            ("layerdrop", self.layerdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} {p} is not a probability in [0, 1)"));
            }
        }
        for (name, id) in [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                return Err(format!(
                    "{name} {id} is outside the vocabulary ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// [`num_parameters`](Self::num_parameters) in u64 with every step checked, computed
    /// from the sizes alone (no tensor list); `None` if it overflows.
    fn checked_num_parameters(&self) -> Option<u64> {
        let u = |x: usize| u64::try_from(x).ok();
        let (v, e, h, f) = (
            u(self.vocab_size)?,
            u(self.word_embed_proj_dim)?,
            u(self.hidden_size)?,
            u(self.ffn_dim)?,
        );
        let p = u(self.max_position_embeddings)?.checked_add(2)?;
        let bias = u64::from(self.enable_bias);
        let affine = u64::from(self.layer_norm_elementwise_affine);
        let linear = |out: u64, inp: u64| out.checked_mul(inp)?.checked_add(bias * out);
        let layer = [
            linear(h, h)?.checked_mul(4)?,
            linear(f, h)?,
            linear(h, f)?,
            h.checked_mul(4 * affine)?,
        ]
        .into_iter()
        .try_fold(0u64, u64::checked_add)?;
        let embeddings = v.checked_mul(e)?;
        let parts = [
            embeddings,
            p.checked_mul(h)?,
            if self.has_projections() {
                h.checked_mul(e)?.checked_mul(2)?
            } else {
                0
            },
            layer.checked_mul(u(self.num_hidden_layers)?)?,
            if self.has_final_layer_norm() {
                h.checked_mul(2 * affine)?
            } else {
                0
            },
            if self.tie_word_embeddings {
                0
            } else {
                embeddings
            },
        ];
        parts.into_iter().try_fold(0u64, u64::checked_add)
    }

    /// `hd = H / nh`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// Whether the model has `project_in`/`project_out` (`E ≠ H`).
    pub fn has_projections(&self) -> bool {
        self.word_embed_proj_dim != self.hidden_size
    }
    /// Whether the decoder applies a final LayerNorm (pre-LN and not removed).
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
    /// Rows of `embed_positions`: `P + 2` (fairseq's offset).
    pub fn position_rows(&self) -> usize {
        self.max_position_embeddings + 2
    }

    /// Every weight tensor the checkpoint must hold, as (name without prefix, shape); the
    /// prefix (`model.decoder.` or `decoder.`) goes before each name. `lm_head.weight` is not
    /// listed: it is `embed_tokens.weight` when tied, else the loader asks for it separately.
    pub fn decoder_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (v, e, h, f) = (
            self.vocab_size,
            self.word_embed_proj_dim,
            self.hidden_size,
            self.ffn_dim,
        );
        let mut out = vec![
            ("embed_tokens.weight".to_owned(), vec![v, e]),
            (
                "embed_positions.weight".to_owned(),
                vec![self.position_rows(), h],
            ),
        ];
        if self.has_projections() {
            out.push(("project_in.weight".into(), vec![h, e]));
            out.push(("project_out.weight".into(), vec![e, h]));
        }
        let affine = self.layer_norm_elementwise_affine;
        for i in 0..self.num_hidden_layers {
            let p = format!("layers.{i}.");
            let mut linear = |name: &str, out_dim: usize, in_dim: usize| {
                out.push((format!("{p}{name}.weight"), vec![out_dim, in_dim]));
                if self.enable_bias {
                    out.push((format!("{p}{name}.bias"), vec![out_dim]));
                }
            };
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                linear(&format!("self_attn.{proj}"), h, h);
            }
            linear("fc1", f, h);
            linear("fc2", h, f);
            if affine {
                for ln in ["self_attn_layer_norm", "final_layer_norm"] {
                    out.push((format!("{p}{ln}.weight"), vec![h]));
                    out.push((format!("{p}{ln}.bias"), vec![h]));
                }
            }
        }
        if self.has_final_layer_norm() && affine {
            out.push(("final_layer_norm.weight".into(), vec![h]));
            out.push(("final_layer_norm.bias".into(), vec![h]));
        }
        out
    }

    /// Parameters of the model (the LM head counted once when tied): RUNTIME.md §1.2's
    /// formula, generalised to the bias/affine/projection flags.
    pub fn num_parameters(&self) -> usize {
        let tensors: usize = self
            .decoder_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * self.word_embed_proj_dim
        };
        tensors + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<OptConfig> {
        OptConfig::from_json(json, Path::new("c/config.json"))
    }

    #[test]
    fn checked_parameter_count_matches_the_tensor_list() {
        let variants = [
            r#"{}"#,
            r#"{"vocab_size": 50, "hidden_size": 12, "ffn_dim": 20, "num_hidden_layers": 3,
                "num_attention_heads": 3, "max_position_embeddings": 7}"#,
            r#"{"vocab_size": 50, "hidden_size": 12, "ffn_dim": 20, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 7, "word_embed_proj_dim": 5,
                "do_layer_norm_before": false, "tie_word_embeddings": false}"#,
            r#"{"vocab_size": 9, "d_model": 4, "ffn_dim": 3, "num_hidden_layers": 5,
                "num_attention_heads": 1, "max_position_embeddings": 2, "enable_bias": false,
                "layer_norm_elementwise_affine": false, "_remove_final_layer_norm": true}"#,
        ];
        for json in variants {
            let c = config(json).unwrap();
            let listed: usize = c
                .decoder_tensors()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum::<usize>()
                + if c.tie_word_embeddings {
                    0
                } else {
                    c.vocab_size * c.word_embed_proj_dim
                };
            assert_eq!(c.num_parameters(), listed, "{json}");
            assert_eq!(c.checked_num_parameters(), Some(listed as u64), "{json}");
        }
    }

    /// Regression (fuzzing): sizes whose products overflow (`vocab_size` 2^63 − 1 panicked in
    /// `num_parameters`), `max_position_embeddings` at `usize::MAX` (`position_rows`
    /// overflowed) and a huge layer count (`decoder_tensors` would list 10^18 layers) are
    /// rejected by name, quickly.
    #[test]
    fn huge_sizes_are_rejected() {
        let cases = [
            (
                r#"{"vocab_size": 9223372036854775807, "hidden_size": 8,
                    "num_attention_heads": 2}"#,
                "vocab_size 9223372036854775807",
            ),
            (
                r#"{"max_position_embeddings": 18446744073709551615}"#,
                "more than 2^64",
            ),
            (
                r#"{"hidden_size": 4294967296, "num_attention_heads": 1}"#,
                "more than 2^64",
            ),
            (
                r#"{"ffn_dim": 1000000000000}"#,
                "more than the limit of 1099511627776",
            ),
            (
                r#"{"num_hidden_layers": 1000000000000000000}"#,
                "num_hidden_layers 1000000000000000000 is more than 4096",
            ),
        ];
        for (json, want) in cases {
            let t = std::time::Instant::now();
            let msg = config(json).unwrap_err().to_string();
            assert!(
                msg.starts_with("c/config.json: ") && msg.contains(want),
                "{json}: {msg}"
            );
            assert!(t.elapsed().as_secs_f64() < 1.0, "{json}");
        }
        // The largest OPT (175B) is well inside the limits.
        let big = config(
            r#"{"vocab_size": 50272, "hidden_size": 12288, "ffn_dim": 49152,
                "num_hidden_layers": 96, "num_attention_heads": 96}"#,
        )
        .unwrap();
        assert!((170e9..180e9).contains(&(big.num_parameters() as f64)));
    }
}
