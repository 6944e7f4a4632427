//! BitFit (RUNTIME.md §2.8): only bias vectors are trained — every Linear bias of each decoder
//! layer (`q, k, v, out_proj, fc1, fc2`) and, by default, every LayerNorm β (the two of each
//! layer and the decoder's final one).
//!
//! The trained values are held whole (initialised from the base model's biases), so the
//! forward uses them in place of the base biases and a merged checkpoint is a plain copy.
//! Gradients: `db = Σ_rows dY` of the owning Linear, `dβ = Σ_rows dY` of the LayerNorm.
//!
//! Export ([`save_bitfit`]): RUNTIME.md §3.6's documented layout, `bitfit_model.safetensors`
//! (F32, the biases under their Hugging Face names, shape `[n]`) and `bitfit_config.json`
//! (`peft_type "BITFIT"`, `layer_norms`, `base_model_name_or_path`, `format "lexp"`).
//! `lexp merge` folds it into a Hugging Face checkpoint.

use super::error::{PeftError, Result};
use super::files;
use super::lora::LoraTarget;
use crate::checkpoint::opt::{LayerNorm, OptLayer};
use crate::checkpoint::{HostMatrix, OptModel};
use serde_json::{Map, Value};
use std::path::Path;

/// BitFit's weights file inside an adapter directory.
pub const BITFIT_WEIGHTS_FILE: &str = "bitfit_model.safetensors";
/// BitFit's config file inside an adapter directory.
pub const BITFIT_CONFIG_FILE: &str = "bitfit_config.json";
/// `peft_type` of [`BITFIT_CONFIG_FILE`].
pub const BITFIT_TYPE: &str = "BITFIT";
/// The decoder's final LayerNorm β.
pub const FINAL_LN_BIAS: &str = "model.decoder.final_layer_norm.bias";

/// A bias of a decoder layer that BitFit can train, in canonical order ([`BiasSite::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BiasSite {
    /// The bias of one of the six projections.
    Linear(LoraTarget),
    /// β of `self_attn_layer_norm`.
    AttnLayerNorm,
    /// β of the layer's `final_layer_norm` (the MLP's LayerNorm).
    MlpLayerNorm,
}

impl BiasSite {
    /// Every site, in canonical order: the six projections, then the two LayerNorms.
    pub const ALL: [BiasSite; 8] = [
        BiasSite::Linear(LoraTarget::Q),
        BiasSite::Linear(LoraTarget::K),
        BiasSite::Linear(LoraTarget::V),
        BiasSite::Linear(LoraTarget::Out),
        BiasSite::Linear(LoraTarget::Fc1),
        BiasSite::Linear(LoraTarget::Fc2),
        BiasSite::AttnLayerNorm,
        BiasSite::MlpLayerNorm,
    ];

    /// Position in [`BiasSite::ALL`] (0..8).
    pub fn index(self) -> usize {
        match self {
            BiasSite::Linear(t) => t.index(),
            BiasSite::AttnLayerNorm => 6,
            BiasSite::MlpLayerNorm => 7,
        }
    }

    /// The bias's Hugging Face tensor name in decoder layer `layer`.
    pub fn key(self, layer: usize) -> String {
        match self {
            BiasSite::Linear(t) => format!("{}.bias", t.module_path(layer)),
            BiasSite::AttnLayerNorm => {
                format!("model.decoder.layers.{layer}.self_attn_layer_norm.bias")
            }
            BiasSite::MlpLayerNorm => format!("model.decoder.layers.{layer}.final_layer_norm.bias"),
        }
    }

    /// The base model's value of this bias in `layer`, if the model has it.
    pub fn base(self, layer: &OptLayer) -> Option<&[f32]> {
        fn ln(l: &Option<LayerNorm>) -> Option<&[f32]> {
            l.as_ref().map(|l| l.bias.as_slice())
        }
        match self {
            BiasSite::Linear(t) => {
                let lin = match t {
                    LoraTarget::Q => &layer.q_proj,
                    LoraTarget::K => &layer.k_proj,
                    LoraTarget::V => &layer.v_proj,
                    LoraTarget::Out => &layer.out_proj,
                    LoraTarget::Fc1 => &layer.fc1,
                    LoraTarget::Fc2 => &layer.fc2,
                };
                lin.bias.as_deref()
            }
            BiasSite::AttnLayerNorm => ln(&layer.self_attn_layer_norm),
            BiasSite::MlpLayerNorm => ln(&layer.final_layer_norm),
        }
    }
}

/// Which biases BitFit trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitFitConfig {
    /// Train the LayerNorm βs as well as the Linear biases (BitFit's default).
    pub layer_norms: bool,
}

impl Default for BitFitConfig {
    fn default() -> Self {
        BitFitConfig { layer_norms: true }
    }
}

/// The trained biases: per decoder layer, one entry per [`BiasSite::ALL`] (`None`: not
/// trained), and the decoder's final LayerNorm β. Each is a `[1, n]` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct BitFitParams {
    /// Which biases are trained.
    pub config: BitFitConfig,
    /// Per layer, per site in [`BiasSite::ALL`] order.
    pub layers: Vec<[Option<HostMatrix>; 8]>,
    /// The decoder's final LayerNorm β, when trained.
    pub final_ln: Option<HostMatrix>,
}

fn row(v: &[f32]) -> HostMatrix {
    HostMatrix {
        rows: 1,
        cols: v.len(),
        data: v.to_vec(),
    }
}

impl BitFitParams {
    /// The base model's biases as the starting point. An error when the model has no Linear
    /// biases (`enable_bias: false`): BitFit would then have nothing to train that a merged
    /// checkpoint could hold.
    pub fn init(config: &BitFitConfig, model: &OptModel) -> Result<BitFitParams> {
        if !model.config.enable_bias {
            return Err(PeftError::InvalidConfig {
                reason: "BitFit trains Linear biases, but this model has none (enable_bias: false)"
                    .into(),
            });
        }
        let layers = model
            .weights
            .layers
            .iter()
            .map(|l| {
                BiasSite::ALL.map(|site| {
                    let wanted = config.layer_norms || matches!(site, BiasSite::Linear(_));
                    site.base(l).filter(|_| wanted).map(row)
                })
            })
            .collect();
        let final_ln = model
            .weights
            .final_layer_norm
            .as_ref()
            .filter(|_| config.layer_norms)
            .map(|l| row(&l.bias));
        Ok(BitFitParams {
            config: config.clone(),
            layers,
            final_ln,
        })
    }

    /// The trained value of `site` in `layer`, if trained.
    pub fn bias(&self, layer: usize, site: BiasSite) -> Option<&[f32]> {
        self.layers.get(layer)?[site.index()]
            .as_ref()
            .map(|m| m.data.as_slice())
    }

    /// Every trained bias with its Hugging Face name, in canonical order (layer ascending,
    /// site in [`BiasSite::ALL`] order, then the final LayerNorm β).
    pub fn tensors(&self) -> Vec<(String, &HostMatrix)> {
        let mut out: Vec<(String, &HostMatrix)> = vec![];
        for (i, l) in self.layers.iter().enumerate() {
            for site in BiasSite::ALL {
                if let Some(m) = &l[site.index()] {
                    out.push((site.key(i), m));
                }
            }
        }
        if let Some(m) = &self.final_ln {
            out.push((FINAL_LN_BIAS.into(), m));
        }
        out
    }

    /// [`tensors`](Self::tensors), mutably (same names, same order).
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut HostMatrix)> {
        let mut out: Vec<(String, &mut HostMatrix)> = vec![];
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (site, m) in BiasSite::ALL.into_iter().zip(l.iter_mut()) {
                if let Some(m) = m {
                    out.push((site.key(i), m));
                }
            }
        }
        if let Some(m) = &mut self.final_ln {
            out.push((FINAL_LN_BIAS.into(), m));
        }
        out
    }
}

/// Writes `params` to `dir` in the layout of the module doc.
pub fn save_bitfit(dir: &Path, params: &BitFitParams, base_model_name_or_path: &str) -> Result<()> {
    let tensors: Vec<(String, &HostMatrix, Vec<usize>)> = params
        .tensors()
        .into_iter()
        .map(|(n, m)| (n, m, vec![m.cols]))
        .collect();
    let mut config = Map::new();
    config.insert("peft_type".into(), Value::from(BITFIT_TYPE));
    config.insert("layer_norms".into(), Value::from(params.config.layer_norms));
    config.insert(
        "base_model_name_or_path".into(),
        Value::from(base_model_name_or_path),
    );
    files::write_dir(
        dir,
        BITFIT_WEIGHTS_FILE,
        &tensors,
        BITFIT_CONFIG_FILE,
        config,
    )?;
    tracing::info!(dir = %dir.display(), tensors = tensors.len(), "BitFit biases saved");
    Ok(())
}

/// Reads the BitFit biases in `dir` for `model`: every bias the config says is trained must
/// be there with the model's length, and nothing else.
pub fn load_bitfit(dir: &Path, model: &OptModel) -> Result<BitFitParams> {
    let (obj, st) = files::read_dir(dir, BITFIT_WEIGHTS_FILE, BITFIT_CONFIG_FILE, BITFIT_TYPE)?;
    let config_path = dir.join(BITFIT_CONFIG_FILE);
    let layer_norms = files::key(&obj, "layer_norms", &config_path)?
        .as_bool()
        .ok_or_else(|| PeftError::Config {
            file: config_path.clone(),
            reason: "`layer_norms` is not a boolean".into(),
        })?;
    let mut params = BitFitParams::init(&BitFitConfig { layer_norms }, model)?;
    let names: Vec<String> = params.tensors().into_iter().map(|(n, _)| n).collect();
    files::no_extra(&st, &names)?;
    for (name, m) in params.tensors_mut() {
        *m = files::take(&st, &name, &[m.cols], 1, m.cols)?;
    }
    tracing::info!(dir = %dir.display(), tensors = names.len(), "BitFit biases loaded");
    Ok(params)
}
