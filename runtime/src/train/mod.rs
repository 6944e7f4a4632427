//! The fine-tuning loop: batches, optimizer steps, periodic eval, metrics, checkpoints and
//! resumption.
//!
//! - [`config`]: the settings of a run ([`TrainConfig`]).
//! - [`plan`]: which examples each optimizer step trains on.
//! - [`trainer`]: the loop itself ([`run`]).
//! - [`state`]: atomic, checksummed checkpoints and resumption.
//! - [`metrics`] and [`plot`]: `metrics.jsonl` and the loss-curve PNG.
//! - [`engine`]: the device a run uses (the CPU reference, or the GPU).
//! - [`exposed`]: setting up a run with MLP exposure (predictors trained before it starts).
//! - [`embedded`]: the bundled default model and data.

pub mod config;
pub mod embedded;
pub mod engine;
mod error;
pub mod exposed;
pub mod exposed_gpu;
pub mod metrics;
pub mod plan;
pub mod plot;
pub mod state;
pub mod trainer;

pub use config::{AttentionExposureConfig, ExposureConfig, ExposureMode, TrainConfig};
pub use engine::{
    apply_step, host_optimizer_step, CpuEngine, CpuExposure, Engine, OptimStep, StepOutcome,
};
pub use error::TrainError;
pub use trainer::{
    evaluate, evaluate_with, run, run_as, AttentionSummary, ExposureSummary, LayerAttention,
    LayerExposure, Observer, RunInfo, RunSummary, Silent,
};
