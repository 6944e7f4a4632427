//! [`PeftParams`]: every trainable tensor of a run, whatever the PEFT methods — LoRA
//! ([`LoraParams`]), BitFit ([`BitFitParams`]) and Houlsby adapters ([`HoulsbyParams`]), each
//! optional, at least one present. The optimizer, the gradient clipping and the checkpoints
//! walk [`PeftParams::tensors`], one flat list in a fixed order: LoRA's tensors, then BitFit's,
//! then the adapters'.
//!
//! On disk ([`PeftParams::save`]) the methods share one directory, each with its own files:
//! LoRA in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), BitFit and
//! Houlsby in the layouts of RUNTIME.md §3.6.

use super::adapter::{load_adapter, save_adapter, CONFIG_FILE};
use super::bitfit::{load_bitfit, save_bitfit, BitFitConfig, BitFitParams, BITFIT_CONFIG_FILE};
use super::error::{PeftError, Result};
use super::houlsby::{
    load_houlsby, save_houlsby, HoulsbyConfig, HoulsbyParams, HOULSBY_CONFIG_FILE,
};
use super::lora::{LoraConfig, LoraParams};
use crate::checkpoint::{HostMatrix, OptModel};
use std::path::Path;

/// The PEFT methods of a run and their hyper-parameters (`None`: method not used).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeftConfig {
    /// LoRA.
    pub lora: Option<LoraConfig>,
    /// BitFit.
    pub bitfit: Option<BitFitConfig>,
    /// Houlsby adapters.
    pub houlsby: Option<HoulsbyConfig>,
}

impl PeftConfig {
    /// LoRA alone.
    pub fn lora(config: LoraConfig) -> PeftConfig {
        PeftConfig {
            lora: Some(config),
            ..Default::default()
        }
    }

    /// Validates each method's settings; an error when no method is chosen.
    pub fn validate(&self) -> Result<()> {
        if self.lora.is_none() && self.bitfit.is_none() && self.houlsby.is_none() {
            return Err(PeftError::InvalidConfig {
                reason: "no PEFT method chosen (LoRA, BitFit or Houlsby adapters)".into(),
            });
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if let Some(h) = &self.houlsby {
            h.validate()?;
        }
        Ok(())
    }

    /// The methods' names, joined with `+` (`lora`, `bitfit+houlsby`, …), for messages.
    pub fn describe(&self) -> String {
        let mut names = vec![];
        if self.lora.is_some() {
            names.push("lora");
        }
        if self.bitfit.is_some() {
            names.push("bitfit");
        }
        if self.houlsby.is_some() {
            names.push("houlsby");
        }
        names.join("+")
    }
}

/// Every trainable tensor of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftParams {
    /// LoRA matrices.
    pub lora: Option<LoraParams>,
    /// BitFit biases.
    pub bitfit: Option<BitFitParams>,
    /// Houlsby adapters.
    pub houlsby: Option<HoulsbyParams>,
}

impl From<LoraParams> for PeftParams {
    /// LoRA alone.
    fn from(lora: LoraParams) -> Self {
        PeftParams {
            lora: Some(lora),
            bitfit: None,
            houlsby: None,
        }
    }
}

impl PeftParams {
    /// Each method's initialisation ([`LoraParams::init`], [`BitFitParams::init`],
    /// [`HoulsbyParams::init`]); `config` is validated first.
    pub fn init(config: &PeftConfig, model: &OptModel, seed: u64) -> Result<PeftParams> {
        config.validate()?;
        Ok(PeftParams {
            lora: config
                .lora
                .as_ref()
                .map(|c| LoraParams::init(c, &model.config, seed)),
            bitfit: config
                .bitfit
                .as_ref()
                .map(|c| BitFitParams::init(c, model))
                .transpose()?,
            houlsby: config
                .houlsby
                .as_ref()
                .map(|c| HoulsbyParams::init(c, &model.config, seed)),
        })
    }

    /// The methods and hyper-parameters these parameters were made with.
    pub fn config(&self) -> PeftConfig {
        PeftConfig {
            lora: self.lora.as_ref().map(|l| l.config.clone()),
            bitfit: self.bitfit.as_ref().map(|b| b.config.clone()),
            houlsby: self.houlsby.as_ref().map(|h| h.config.clone()),
        }
    }

    /// Whether only LoRA is trained (what the GPU engine runs).
    pub fn is_lora_only(&self) -> bool {
        self.lora.is_some() && self.bitfit.is_none() && self.houlsby.is_none()
    }

    /// Every trainable tensor with its name, in the canonical order of the module doc.
    pub fn tensors(&self) -> Vec<(String, &HostMatrix)> {
        let mut out = vec![];
        if let Some(l) = &self.lora {
            out.extend(l.tensors());
        }
        if let Some(b) = &self.bitfit {
            out.extend(b.tensors());
        }
        if let Some(h) = &self.houlsby {
            out.extend(h.tensors());
        }
        out
    }

    /// [`tensors`](Self::tensors), mutably (same names, same order).
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut HostMatrix)> {
        let mut out = vec![];
        if let Some(l) = &mut self.lora {
            out.extend(l.tensors_mut());
        }
        if let Some(b) = &mut self.bitfit {
            out.extend(b.tensors_mut());
        }
        if let Some(h) = &mut self.houlsby {
            out.extend(h.tensors_mut());
        }
        out
    }

    /// Number of trainable values.
    pub fn num_parameters(&self) -> usize {
        self.tensors().iter().map(|(_, m)| m.data.len()).sum()
    }

    /// Writes each method's files into `dir` (created if needed).
    pub fn save(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        if let Some(l) = &self.lora {
            save_adapter(dir, l, base_model_name_or_path)?;
        }
        if let Some(b) = &self.bitfit {
            save_bitfit(dir, b, base_model_name_or_path)?;
        }
        if let Some(h) = &self.houlsby {
            save_houlsby(dir, h, base_model_name_or_path)?;
        }
        Ok(())
    }

    /// Reads every method whose config file is in `dir`; an error when there is none.
    pub fn load(dir: &Path, model: &OptModel) -> Result<PeftParams> {
        let has = |f: &str| dir.join(f).is_file();
        let params = PeftParams {
            lora: has(CONFIG_FILE)
                .then(|| load_adapter(dir, &model.config))
                .transpose()?,
            bitfit: has(BITFIT_CONFIG_FILE)
                .then(|| load_bitfit(dir, model))
                .transpose()?,
            houlsby: has(HOULSBY_CONFIG_FILE)
                .then(|| load_houlsby(dir, &model.config))
                .transpose()?,
        };
        if params.lora.is_none() && params.bitfit.is_none() && params.houlsby.is_none() {
            return Err(PeftError::MissingFile {
                file: dir.join(CONFIG_FILE),
                hint: format!(
                    "; nor {BITFIT_CONFIG_FILE} nor {HOULSBY_CONFIG_FILE}: the directory holds no adapter"
                ),
            });
        }
        Ok(params)
    }
}
