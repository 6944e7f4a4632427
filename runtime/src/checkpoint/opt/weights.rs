//! [`OptWeights`]: an OPT checkpoint's tensors as f32 host matrices (RUNTIME.md §1.2).
//!
//! Loading first checks the checkpoint against the config as a whole (every tensor present with
//! its shape, nothing unexpected), then converts. Tensor names are accepted with the
//! `model.decoder.` prefix of `OPTForCausalLM` or the `decoder.` prefix of a bare `OPTModel`.

use super::config::OptConfig;
use crate::checkpoint::error::{CheckpointError, Result};
use crate::checkpoint::host::HostMatrix;
use crate::checkpoint::safetensors::SafetensorsError;
use crate::checkpoint::sharded::Checkpoint;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Name of the untied LM head (never prefixed).
pub const LM_HEAD: &str = "lm_head.weight";
/// Prefixes tried, in order, for decoder tensors.
pub const PREFIXES: [&str; 2] = ["model.decoder.", "decoder."];

/// A LayerNorm's affine parameters (`γ`, `β`), each of length `H`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    /// `γ` (`.weight`).
    pub weight: Vec<f32>,
    /// `β` (`.bias`).
    pub bias: Vec<f32>,
}

/// An `nn.Linear`: weight `[out, in]` (`Y = X·Wᵀ + b`) and an optional bias `[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: HostMatrix,
    /// `[out]`; `None` when the config has `enable_bias: false`.
    pub bias: Option<Vec<f32>>,
}

/// One decoder layer. LayerNorms are `None` when the config has
/// `layer_norm_elementwise_affine: false`.
#[derive(Debug, Clone, PartialEq)]
pub struct OptLayer {
    /// LayerNorm before (pre-LN) or after (post-LN) attention.
    pub self_attn_layer_norm: Option<LayerNorm>,
    /// Query projection `[H, H]`.
    pub q_proj: Linear,
    /// Key projection `[H, H]`.
    pub k_proj: Linear,
    /// Value projection `[H, H]`.
    pub v_proj: Linear,
    /// Attention output projection `[H, H]`.
    pub out_proj: Linear,
    /// The MLP's LayerNorm (`layers.i.final_layer_norm`).
    pub final_layer_norm: Option<LayerNorm>,
    /// `[F, H]`.
    pub fc1: Linear,
    /// `[H, F]`.
    pub fc2: Linear,
}

/// All weights of an OPT causal LM in f32, shapes as in the checkpoint (`[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct OptWeights {
    /// `[V, E]`; also the LM head when tied.
    pub embed_tokens: HostMatrix,
    /// `[P + 2, H]`.
    pub embed_positions: HostMatrix,
    /// `[H, E]`, bias-free; only when `E ≠ H`.
    pub project_in: Option<HostMatrix>,
    /// `[E, H]`, bias-free; only when `E ≠ H`.
    pub project_out: Option<HostMatrix>,
    /// The decoder layers, in order.
    pub layers: Vec<OptLayer>,
    /// The decoder's final LayerNorm (pre-LN models, unless removed or not affine).
    pub final_layer_norm: Option<LayerNorm>,
    /// `[V, E]` when untied; `None` when tied (use [`OptWeights::lm_head`]).
    pub lm_head: Option<HostMatrix>,
}

/// A loaded OPT model: its config and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct OptModel {
    /// From `config.json`.
    pub config: OptConfig,
    /// From the safetensors file(s).
    pub weights: OptWeights,
}

impl OptModel {
    /// Loads `dir`: `config.json` and the (possibly sharded) safetensors weights.
    pub fn load(dir: impl AsRef<Path>) -> Result<OptModel> {
        let dir = dir.as_ref();
        let config = OptConfig::from_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        let weights = OptWeights::load(&checkpoint, &config)?;
        Ok(OptModel { config, weights })
    }
}

impl OptWeights {
    /// Checks `checkpoint` against `config` (every tensor present with the right shape and
    /// a loadable dtype, no unexpected tensor) and converts it to f32. With tied embeddings an
    /// `lm_head.weight` in the file is ignored, as transformers does; untied, it is required.
    pub fn load(checkpoint: &Checkpoint, config: &OptConfig) -> Result<OptWeights> {
        let prefix = PREFIXES
            .into_iter()
            .find(|p| checkpoint.contains(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| CheckpointError::MissingTensor {
                file: checkpoint.source().into(),
                tensor: format!("{}embed_tokens.weight", PREFIXES[0]),
            })?;
        let mut expected: Vec<(String, Vec<usize>)> = config
            .decoder_tensors()
            .into_iter()
            .map(|(name, shape)| (format!("{prefix}{name}"), shape))
            .collect();
        let mut allowed: HashSet<String> = expected.iter().map(|(n, _)| n.clone()).collect();
        if config.tie_word_embeddings {
            if checkpoint.contains(LM_HEAD) {
                tracing::debug!(file = %checkpoint.source().display(), "tied embeddings: ignoring {LM_HEAD}");
            }
            allowed.insert(LM_HEAD.into());
        } else {
            expected.push((
                LM_HEAD.into(),
                vec![config.vocab_size, config.word_embed_proj_dim],
            ));
            allowed.insert(LM_HEAD.into());
        }

        // Whole-checkpoint checks before converting anything.
        if let Some(name) = checkpoint
            .names()
            .into_iter()
            .find(|n| !allowed.contains(*n))
        {
            let file = checkpoint
                .tensor(name)
                .map_or_else(|| checkpoint.source().into(), |t| t.file().into());
            return Err(CheckpointError::UnexpectedTensor {
                file,
                tensor: name.into(),
            });
        }
        let mut values = HashMap::with_capacity(expected.len());
        for (name, shape) in &expected {
            let t = checkpoint
                .tensor(name)
                .ok_or_else(|| CheckpointError::MissingTensor {
                    file: checkpoint.source().into(),
                    tensor: name.clone(),
                })?;
            if t.shape() != shape.as_slice() {
                return Err(CheckpointError::ShapeMismatch {
                    file: t.file().into(),
                    tensor: name.clone(),
                    expected: shape.clone(),
                    found: t.shape().to_vec(),
                });
            }
            if !t.dtype().is_float_loadable() {
                return Err(SafetensorsError::UnsupportedDtype {
                    file: t.file().into(),
                    tensor: name.clone(),
                    dtype: t.dtype(),
                }
                .into());
            }
        }
        for (name, _) in &expected {
            if let Some(t) = checkpoint.tensor(name) {
                values.insert(name.clone(), t.to_f32()?);
            }
        }

        let mut take = Take {
            values,
            source: checkpoint.source(),
        };
        let (h, e) = (config.hidden_size, config.word_embed_proj_dim);
        let p = |name: &str| format!("{prefix}{name}");
        let embed_tokens = take.matrix(&p("embed_tokens.weight"), config.vocab_size, e)?;
        let embed_positions =
            take.matrix(&p("embed_positions.weight"), config.position_rows(), h)?;
        let (project_in, project_out) = if config.has_projections() {
            (
                Some(take.matrix(&p("project_in.weight"), h, e)?),
                Some(take.matrix(&p("project_out.weight"), e, h)?),
            )
        } else {
            (None, None)
        };
        let affine = config.layer_norm_elementwise_affine;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = |name: &str| p(&format!("layers.{i}.{name}"));
            let f = config.ffn_dim;
            let bias = config.enable_bias;
            layers.push(OptLayer {
                self_attn_layer_norm: take.layer_norm(&l("self_attn_layer_norm"), affine)?,
                q_proj: take.linear(&l("self_attn.q_proj"), h, h, bias)?,
                k_proj: take.linear(&l("self_attn.k_proj"), h, h, bias)?,
                v_proj: take.linear(&l("self_attn.v_proj"), h, h, bias)?,
                out_proj: take.linear(&l("self_attn.out_proj"), h, h, bias)?,
                final_layer_norm: take.layer_norm(&l("final_layer_norm"), affine)?,
                fc1: take.linear(&l("fc1"), f, h, bias)?,
                fc2: take.linear(&l("fc2"), h, f, bias)?,
            });
        }
        let final_layer_norm = take.layer_norm(
            &p("final_layer_norm"),
            affine && config.has_final_layer_norm(),
        )?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take.matrix(LM_HEAD, config.vocab_size, e)?)
        };
        let weights = OptWeights {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head,
        };
        tracing::debug!(
            file = %checkpoint.source().display(),
            parameters = weights.num_parameters(),
            "OPT weights loaded"
        );
        Ok(weights)
    }

    /// The LM head `[V, E]`: `lm_head` when untied, else `embed_tokens`.
    pub fn lm_head(&self) -> &HostMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Number of f32 values held (a tied head counted once); equals
    /// [`OptConfig::num_parameters`] for weights loaded with that config.
    pub fn num_parameters(&self) -> usize {
        let m = |m: &HostMatrix| m.data.len();
        let om = |o: &Option<HostMatrix>| o.as_ref().map_or(0, m);
        let ln = |l: &Option<LayerNorm>| l.as_ref().map_or(0, |l| l.weight.len() + l.bias.len());
        let lin = |l: &Linear| m(&l.weight) + l.bias.as_ref().map_or(0, Vec::len);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                ln(&l.self_attn_layer_norm)
                    + ln(&l.final_layer_norm)
                    + [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2]
                        .into_iter()
                        .map(lin)
                        .sum::<usize>()
            })
            .sum();
        m(&self.embed_tokens)
            + m(&self.embed_positions)
            + om(&self.project_in)
            + om(&self.project_out)
            + layers
            + ln(&self.final_layer_norm)
            + om(&self.lm_head)
    }
}

/// Hands out converted tensors by name; every name asked for was checked to be present with
/// its shape, so a miss here is reported as a missing tensor rather than a panic.
struct Take<'a> {
    values: HashMap<String, Vec<f32>>,
    source: &'a Path,
}

impl Take<'_> {
    fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        self.values
            .remove(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                file: self.source.into(),
                tensor: name.into(),
            })
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<HostMatrix> {
        let data = self.vector(name)?;
        let found = vec![data.len()];
        HostMatrix::new(rows, cols, data).ok_or_else(|| CheckpointError::ShapeMismatch {
            file: self.source.into(),
            tensor: name.into(),
            expected: vec![rows, cols],
            found,
        })
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: self.matrix(&format!("{name}.weight"), out, inp)?,
            bias: if bias {
                Some(self.vector(&format!("{name}.bias"))?)
            } else {
                None
            },
        })
    }

    fn layer_norm(&mut self, name: &str, present: bool) -> Result<Option<LayerNorm>> {
        if !present {
            return Ok(None);
        }
        Ok(Some(LayerNorm {
            weight: self.vector(&format!("{name}.weight"))?,
            bias: self.vector(&format!("{name}.bias"))?,
        }))
    }
}
