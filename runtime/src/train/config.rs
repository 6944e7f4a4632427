//! What a fine-tuning run is: model, data, adapter, optimizer and schedule settings.
//!
//! The config is written to the output directory when a run starts; a resume compares the
//! [`TrainConfig::trajectory`] of the saved and the requested config and refuses to continue
//! a different run.

use crate::optim::{AdamWConfig, Schedule};
use crate::peft::{AdapterActivation, BitFitConfig, HoulsbyConfig, LoraConfig, PeftConfig};
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
    /// PEFT methods trained together: any of `lora`, `bitfit`, `houlsby` (default `lora`; also
    /// for run configs written before the choice existed).
    #[serde(default = "default_peft_methods")]
    pub peft: Vec<String>,
    /// BitFit: train the LayerNorm βs as well as the Linear biases.
    #[serde(default = "default_true")]
    pub bitfit_layer_norms: bool,
    /// Houlsby adapters: bottleneck width.
    #[serde(default = "default_adapter_bottleneck")]
    pub adapter_bottleneck: usize,
    /// Houlsby adapters: nonlinearity, `relu` or `gelu`.
    #[serde(default = "default_adapter_activation")]
    pub adapter_activation: String,
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
    /// Extends the checkpoint's learned position table to this many positions when the model
    /// is loaded (`None`: as learned), for sequences longer than it
    /// ([`OptModel::extend_positions`](crate::checkpoint::OptModel::extend_positions)).
    #[serde(default)]
    pub max_positions: Option<usize>,
    /// How the position table is extended (with `max_positions`).
    #[serde(default)]
    pub position_extension: crate::checkpoint::PositionExtension,
    /// Exposure (`none` by default; also for run configs written before it).
    #[serde(default)]
    pub exposure: ExposureConfig,
    /// Plain-text data: the training (and eval) files are text, documents separated by blank
    /// lines, cut into windows of this many tokens, every token a target
    /// ([`crate::data::text_windows`]); without an eval file the last `eval_fraction` of the
    /// windows (in file order) are held out. `None`: JSONL (also for older run configs).
    #[serde(default)]
    pub text_windows: Option<usize>,
}

/// Which exposure a run uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExposureMode {
    /// Dense training.
    #[default]
    None,
    /// Sparse MLPs: predictor, selection and guard (DESIGN.md §7, MLP).
    Mlp,
    /// Block-sparse attention: per-head key-block predictors, local window and sinks, mass
    /// target selection and guard (DESIGN.md §7, attention).
    Attention,
}

/// Settings of attention exposure (`lexp finetune --exposure attention`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttentionExposureConfig {
    /// Initial share of each (query block, head) row's predicted attention mass to keep.
    pub target: f64,
    /// Key blocks before the diagonal always kept (the local window).
    pub window: usize,
    /// First key blocks of each sequence always kept (attention sinks).
    pub sinks: usize,
    /// Largest share of a row's causal blocks kept beyond the forced ones.
    pub budget: f64,
    /// Rank of the per-head block scorers.
    pub rank: usize,
    /// Query rows per block.
    pub q_block: usize,
    /// Keys per block.
    pub k_block: usize,
}

impl Default for AttentionExposureConfig {
    fn default() -> Self {
        AttentionExposureConfig {
            target: 0.9,
            window: 1,
            sinks: 1,
            budget: 1.0,
            rank: 16,
            q_block: crate::model::attention_hook::GPU_Q_BLOCK,
            k_block: crate::model::attention_hook::GPU_K_BLOCK,
        }
    }
}

impl AttentionExposureConfig {
    /// The hook's settings.
    pub fn sparse_attention(&self) -> crate::exposure::attention::sparse::SparseAttentionConfig {
        use crate::exposure::attention::{predictor::PredictorConfig, selection::SelectionParams};
        crate::exposure::attention::sparse::SparseAttentionConfig {
            q_block: self.q_block,
            k_block: self.k_block,
            selection: SelectionParams {
                window: self.window,
                sinks: self.sinks,
                target: self.target,
                max_density: self.budget,
            },
            predictor: PredictorConfig {
                rank: self.rank,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Checks the numbers a user can get wrong, naming the flags.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.target > 0.0 && self.target <= 1.0) {
            return Err(format!("--attn-target {} is not in (0, 1]", self.target));
        }
        if !(self.budget > 0.0 && self.budget <= 1.0) {
            return Err(format!("--attn-budget {} is not in (0, 1]", self.budget));
        }
        if self.rank == 0 {
            return Err("--attn-rank must be at least 1".into());
        }
        if self.q_block == 0 || self.k_block == 0 {
            return Err("--attn-block (query and key block sizes) must be at least 1".into());
        }
        Ok(())
    }
}

/// Settings of exposure (`lexp finetune --exposure mlp|attention`): the MLP's, the
/// attention's, and the guard and offline predictor training both share.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExposureConfig {
    /// `none`, `mlp` or `attention`.
    pub mode: ExposureMode,
    /// Neurons per block.
    pub mlp_block: usize,
    /// Rows per token group.
    pub mlp_group: usize,
    /// Initial mass target per layer.
    pub mlp_target: f64,
    /// Largest share of blocks a group keeps.
    pub mlp_budget: f64,
    /// Predictor rank.
    pub mlp_rank: usize,
    /// Steps between the guard's dense probes (0: none).
    pub probe_every: usize,
    /// Relative loss gap the guard holds the sparse forward to.
    pub gap_budget: f64,
    /// Training micro-batches whose dense forwards label the offline predictor training.
    pub predictor_batches: usize,
    /// Adam steps of the offline predictor training, per layer.
    pub predictor_steps: usize,
    /// Reorder each layer's MLP neurons by co-activation clustering first (the exposer's
    /// function-preserving permutation, DESIGN.md §7 step 2), so that co-active neurons share
    /// blocks. Adapters and exports stay in the checkpoint's neuron order.
    #[serde(default = "permute_default")]
    pub permute: bool,
    /// Attention exposure's settings (used with [`ExposureMode::Attention`]; defaults for run
    /// configs written before it).
    #[serde(default)]
    pub attention: AttentionExposureConfig,
}

/// The default of [`ExposureConfig::permute`] (also for run configs written before it).
pub fn permute_default() -> bool {
    true
}

impl Default for ExposureConfig {
    fn default() -> Self {
        ExposureConfig {
            mode: ExposureMode::None,
            mlp_block: 32,
            mlp_group: 128,
            mlp_target: 0.99,
            mlp_budget: 1.0,
            mlp_rank: 64,
            probe_every: 20,
            gap_budget: 0.005,
            predictor_batches: 32,
            predictor_steps: 1000,
            permute: true,
            attention: AttentionExposureConfig::default(),
        }
    }
}

impl ExposureConfig {
    /// The hook's settings.
    pub fn sparse_mlp(&self) -> crate::exposure::sparse_mlp::SparseMlpConfig {
        crate::exposure::sparse_mlp::SparseMlpConfig {
            block: self.mlp_block,
            group: self.mlp_group,
            target: self.mlp_target,
            budget: self.mlp_budget,
            predictor: crate::exposure::predictor::PredictorConfig {
                rank: self.mlp_rank,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The guard's settings (its bounds include the initial target of the run's mode).
    pub fn guard(&self) -> crate::exposure::guard::GuardConfig {
        let d = crate::exposure::guard::GuardConfig::default();
        let target = match self.mode {
            ExposureMode::Attention => self.attention.target,
            _ => self.mlp_target,
        };
        crate::exposure::guard::GuardConfig {
            probe_every: self.probe_every,
            gap_budget: self.gap_budget,
            min_target: d.min_target.min(target),
            max_target: d.max_target.max(target),
            ..d
        }
    }

    /// Checks the numbers a user can get wrong (the block size against the model is checked
    /// when the hook is made).
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == ExposureMode::None {
            return Ok(());
        }
        if !(self.gap_budget.is_finite() && self.gap_budget > 0.0) {
            return Err(format!("--gap-budget {} must be positive", self.gap_budget));
        }
        if self.mode == ExposureMode::Attention {
            return self.attention.validate();
        }
        if self.mlp_group == 0 || self.mlp_block == 0 {
            return Err("--mlp-group and --mlp-block must be at least 1".into());
        }
        if !(self.mlp_target > 0.0 && self.mlp_target <= 1.0) {
            return Err(format!("--mlp-target {} is not in (0, 1]", self.mlp_target));
        }
        if !(self.mlp_budget > 0.0 && self.mlp_budget <= 1.0) {
            return Err(format!("--mlp-budget {} is not in (0, 1]", self.mlp_budget));
        }
        if self.mlp_rank == 0 {
            return Err("--mlp-rank must be at least 1".into());
        }
        Ok(())
    }
}

/// The default of [`TrainConfig::peft`]: LoRA.
pub fn default_peft_methods() -> Vec<String> {
    vec!["lora".into()]
}

fn default_true() -> bool {
    true
}

fn default_adapter_bottleneck() -> usize {
    HoulsbyConfig::default().bottleneck
}

fn default_adapter_activation() -> String {
    HoulsbyConfig::default().activation.name().into()
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
            peft: default_peft_methods(),
            bitfit_layer_norms: true,
            adapter_bottleneck: default_adapter_bottleneck(),
            adapter_activation: default_adapter_activation(),
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
            max_positions: None,
            position_extension: Default::default(),
            exposure: ExposureConfig::default(),
            text_windows: None,
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

    /// The PEFT methods and their settings, checked: each name of [`TrainConfig::peft`] once,
    /// each method's settings valid.
    pub fn peft_config(&self) -> Result<PeftConfig, String> {
        let mut config = PeftConfig::default();
        for (i, name) in self.peft.iter().enumerate() {
            if self.peft[..i].contains(name) {
                return Err(format!("PEFT method {name:?} is listed twice"));
            }
            match name.as_str() {
                "lora" => config.lora = Some(self.lora()?),
                "bitfit" => {
                    config.bitfit = Some(BitFitConfig {
                        layer_norms: self.bitfit_layer_norms,
                    })
                }
                "houlsby" => {
                    let activation = AdapterActivation::from_name(&self.adapter_activation)
                        .ok_or_else(|| {
                            format!(
                                "unknown adapter activation {:?}: use relu or gelu",
                                self.adapter_activation
                            )
                        })?;
                    config.houlsby = Some(HoulsbyConfig {
                        bottleneck: self.adapter_bottleneck,
                        activation,
                    })
                }
                other => {
                    return Err(format!(
                        "unknown PEFT method {other:?}: use lora, bitfit or houlsby"
                    ))
                }
            }
        }
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

    /// Loads the model of this run, with [`TrainConfig::model_dropout`] applied and the position
    /// table extended to [`TrainConfig::max_positions`].
    pub fn load_model(
        &self,
    ) -> Result<crate::checkpoint::OptModel, crate::checkpoint::CheckpointError> {
        let mut model = crate::checkpoint::OptModel::load(&self.model_dir)?;
        if let Some(p) = self.model_dropout {
            model.config.dropout = p;
        }
        if let Some(n) = self.max_positions {
            model.extend_positions(n, self.position_extension)?;
        }
        Ok(model)
    }

    /// Whether a training step of this run draws dropout masks (residual or LoRA dropout).
    pub fn uses_dropout(&self, model: &crate::checkpoint::OptConfig) -> bool {
        let lora = self.peft.iter().any(|m| m == "lora");
        (lora && self.lora_dropout > 0.0) || self.model_dropout.unwrap_or(model.dropout) > 0.0
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
        self.peft_config()?;
        self.schedule_kind()?;
        if self.train_files.is_empty() {
            return Err("no training data file given".into());
        }
        if self.examples_per_step == 0 {
            return Err("examples per step must be at least 1".into());
        }
        if self.text_windows == Some(0) {
            return Err("text windows must hold at least 1 token".into());
        }
        if let Some(w) = self.text_windows.filter(|&w| w > self.max_seq_len) {
            return Err(format!(
                "text windows of {w} tokens are longer than the longest sequence kept ({})",
                self.max_seq_len
            ));
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
        self.exposure.validate()?;
        let bitfit = self.peft.iter().any(|m| m == "bitfit");
        if bitfit && self.exposure.mode == ExposureMode::Mlp && self.exposure.permute {
            return Err(
                "--peft bitfit with --exposure mlp needs --no-permute: fc1's trained bias is not \
                 carried through the neuron permutation"
                    .into(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A run config written before attention exposure and text windows (no `text_windows`, no
    /// `exposure.attention`) still loads, with both at their defaults; an attention run's config
    /// round-trips.
    #[test]
    fn older_run_configs_load_and_attention_settings_round_trip() {
        let mut old = serde_json::to_value(TrainConfig::default()).unwrap();
        let obj = old.as_object_mut().unwrap();
        obj.remove("text_windows").unwrap();
        obj["exposure"]
            .as_object_mut()
            .unwrap()
            .remove("attention")
            .unwrap();
        let loaded: TrainConfig = serde_json::from_value(old).unwrap();
        assert_eq!(loaded, TrainConfig::default());
        assert_eq!(loaded.text_windows, None);
        assert_eq!(loaded.exposure.attention.q_block, 128);

        let config = TrainConfig {
            train_files: vec!["corpus.txt".into()],
            text_windows: Some(1024),
            exposure: ExposureConfig {
                mode: ExposureMode::Attention,
                attention: AttentionExposureConfig {
                    target: 0.97,
                    window: 2,
                    sinks: 0,
                    budget: 0.5,
                    rank: 8,
                    q_block: 64,
                    k_block: 32,
                },
                ..ExposureConfig::default()
            },
            ..TrainConfig::default()
        };
        config.validate().unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"mode\":\"attention\""), "{json}");
        assert_eq!(serde_json::from_str::<TrainConfig>(&json).unwrap(), config);
        let hook = config.exposure.attention.sparse_attention();
        assert_eq!(
            (hook.q_block, hook.k_block, hook.predictor.rank),
            (64, 32, 8)
        );
        assert_eq!((hook.selection.window, hook.selection.sinks), (2, 0));
        assert_eq!(
            (hook.selection.target, hook.selection.max_density),
            (0.97, 0.5)
        );
        // The guard's bounds hold the attention target, not the MLP's.
        let guard = config.exposure.guard();
        assert!(guard.max_target >= 0.97 && guard.min_target <= 0.97);
        let mut low = config.clone();
        low.exposure.attention.target = 0.5;
        assert_eq!(low.exposure.guard().min_target, 0.5);
        low.exposure.attention.target = 0.0;
        assert!(low.validate().unwrap_err().contains("--attn-target"));
        let mut long = config;
        long.text_windows = Some(long.max_seq_len + 1);
        assert!(long.validate().unwrap_err().contains("text windows"));
    }
}
