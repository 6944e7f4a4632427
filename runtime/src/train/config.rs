//! What a fine-tuning run is: model, data, adapter, optimizer and schedule settings.
//!
//! The config is written to the output directory when a run starts; a resume compares the
//! [`TrainConfig::trajectory`] of the saved and the requested config and refuses to continue
//! a different run.

use crate::optim::{AdamWConfig, Schedule};
use crate::peft::LoraConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that determines a fine-tuning run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Hugging Face OPT checkpoint directory.
    pub model_dir: PathBuf,
    /// Training JSONL file(s).
    pub train_files: Vec<PathBuf>,
    /// Evaluation JSONL file; if absent, `eval_fraction` of the training prompts are held out.
    pub eval_file: Option<PathBuf>,
    /// Share of training prompt groups held out when there is no eval file.
    pub eval_fraction: f64,
    /// Cap on eval examples (the first ones of the eval set, in file order), 0 = all.
    pub eval_max_examples: usize,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f32,
    /// LoRA dropout.
    pub lora_dropout: f32,
    /// Adapted projections (PEFT short names).
    pub lora_targets: Vec<String>,
    /// Examples per optimizer step.
    pub examples_per_step: usize,
    /// Most tokens in one packed micro-batch (an optimizer step may hold several).
    pub micro_batch_tokens: usize,
    /// Longest sequence kept (longer ones are truncated with a warning).
    pub max_seq_len: usize,
    /// Epochs over the training set.
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run all epochs).
    pub max_steps: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Schedule after warm-up: `linear`, `cosine` or `constant`.
    pub schedule: String,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// AdamW β1, β2.
    pub betas: (f32, f32),
    /// AdamW ε.
    pub eps: f32,
    /// Gradient clipping norm (0: off).
    pub max_grad_norm: f32,
    /// Evaluate every this many steps (0: only at the start and the end).
    pub eval_every: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Seed of data order, LoRA init and dropout.
    pub seed: u64,
    /// Overrides the checkpoint's residual `dropout` (official OPT configs say 0.1); `None`
    /// keeps the config's value.
    #[serde(default)]
    pub model_dropout: Option<f32>,
    /// Steps with a non-finite loss or gradient norm are skipped (no update); this many in a
    /// row stop the run with [`super::TrainError::NonFinite`] (1: stop at the first).
    #[serde(default = "default_max_bad_steps")]
    pub max_bad_steps: usize,
}

/// The default of [`TrainConfig::max_bad_steps`] (also for run configs written before it).
pub fn default_max_bad_steps() -> usize {
    5
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model_dir: PathBuf::new(),
            train_files: Vec::new(),
            eval_file: None,
            eval_fraction: 0.1,
            eval_max_examples: 0,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_targets: vec!["q_proj".into(), "v_proj".into()],
            examples_per_step: 16,
            micro_batch_tokens: 4096,
            max_seq_len: 1024,
            epochs: 1,
            max_steps: 0,
            lr: 5e-4,
            warmup_steps: 0,
            schedule: "linear".into(),
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            max_grad_norm: 1.0,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            seed: 0,
            model_dropout: None,
            max_bad_steps: default_max_bad_steps(),
        }
    }
}

impl TrainConfig {
    /// The LoRA settings, checked.
    pub fn lora(&self) -> Result<LoraConfig, String> {
        let mut targets = Vec::new();
        for name in &self.lora_targets {
            targets.push(crate::peft::LoraTarget::from_name(name).ok_or_else(|| {
                format!(
                    "unknown LoRA target {name:?}: use q_proj, k_proj, v_proj, out_proj, fc1, fc2"
                )
            })?);
        }
        let config = LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            use_rslora: false,
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The AdamW settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// Loads the model of this run, with [`TrainConfig::model_dropout`] applied.
    pub fn load_model(
        &self,
    ) -> Result<crate::checkpoint::OptModel, crate::checkpoint::CheckpointError> {
        let mut model = crate::checkpoint::OptModel::load(&self.model_dir)?;
        if let Some(p) = self.model_dropout {
            model.config.dropout = p;
        }
        Ok(model)
    }

    /// Whether a training step of this run draws dropout masks (residual or LoRA dropout).
    pub fn uses_dropout(&self, model: &crate::checkpoint::OptConfig) -> bool {
        self.lora_dropout > 0.0 || self.model_dropout.unwrap_or(model.dropout) > 0.0
    }

    /// The schedule kind.
    pub fn schedule_kind(&self) -> Result<Schedule, String> {
        match self.schedule.as_str() {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            other => Err(format!(
                "unknown schedule {other:?}: use linear, cosine or constant"
            )),
        }
    }

    /// Checks the numbers a user can get wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.lora()?;
        self.schedule_kind()?;
        if self.train_files.is_empty() {
            return Err("no training data file given".into());
        }
        if self.examples_per_step == 0 {
            return Err("examples per step must be at least 1".into());
        }
        if self.micro_batch_tokens < self.max_seq_len {
            return Err(format!(
                "the micro-batch token budget ({}) must hold the longest sequence ({} tokens)",
                self.micro_batch_tokens, self.max_seq_len
            ));
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return Err("nothing to do: 0 epochs and no step limit".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("learning rate {} must be positive", self.lr));
        }
        if let Some(p) = self.model_dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("model dropout {p} is not in [0, 1)"));
            }
        }
        if self.max_bad_steps == 0 {
            return Err("max bad steps must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(format!(
                "eval fraction {} is not in [0, 1)",
                self.eval_fraction
            ));
        }
        Ok(())
    }

    /// The config with the fields that do not change the trajectory of a run cleared
    /// (evaluation and checkpoint cadence, the bad-step limit, which only decides when a
    /// diverging run gives up): two runs with equal trajectories produce the same
    /// adapter, so one can resume the other.
    pub fn trajectory(&self) -> TrainConfig {
        TrainConfig {
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 0,
            max_bad_steps: 0,
            ..self.clone()
        }
    }
}
