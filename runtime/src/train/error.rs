//! Errors of a fine-tuning run, each naming the file, setting or step at fault.

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::model::ModelError;
use crate::optim::OptimError;
use crate::peft::PeftError;
use std::path::PathBuf;
use thiserror::Error;

/// Why a run stopped.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A setting is invalid.
    #[error("invalid settings: {0}")]
    Config(String),
    /// The model checkpoint could not be loaded.
    #[error(transparent)]
    Model(#[from] CheckpointError),
    /// The data could not be loaded or packed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model rejected a batch.
    #[error(transparent)]
    Forward(#[from] ModelError),
    /// An adapter could not be read or written.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// The optimizer state could not be read or written.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// A file of the output directory could not be written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Writing a checkpoint failed (the previous checkpoint is intact).
    #[error("checkpoint not written (the previous one is intact): {0}")]
    Checkpoint(String),
    /// The output directory holds a different run, or its checkpoint does not fit.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// The run was asked to stop (SIGINT/SIGTERM) and stopped cleanly after a step.
    #[error("interrupted after step {step}; checkpoint {} (continue with --resume)", .checkpoint.display())]
    Interrupted {
        /// Steps done.
        step: usize,
        /// The checkpoint holding them.
        checkpoint: PathBuf,
    },
    /// The loss or the gradients were not finite in `in_a_row` steps in a row (each skipped),
    /// reaching [`super::TrainConfig::max_bad_steps`].
    #[error("step {step}: loss {loss} / gradient norm {grad_norm} is not finite, {in_a_row} skipped steps in a row (limit --max-bad-steps); stopping (the last checkpoint is intact)")]
    NonFinite {
        /// 1-based step (the last of the bad run).
        step: usize,
        /// Consecutive skipped steps, this one included.
        in_a_row: usize,
        /// Its loss.
        loss: f64,
        /// Its gradient norm.
        grad_norm: f32,
    },
}
