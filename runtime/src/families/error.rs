//! [`FamilyError`]: why a GPT-2 or LLaMA-style model could not be loaded or run.

use crate::checkpoint::CheckpointError;
use crate::cpu::CpuError;
use thiserror::Error;

/// What went wrong loading or running a [`Gpt2Model`](super::Gpt2Model) or
/// [`LlamaModel`](super::LlamaModel). Loading errors are [`CheckpointError`]s, whose messages
/// start with the file and name the tensor or config field; forward errors name the token.
#[derive(Debug, Error)]
pub enum FamilyError {
    /// `config.json` or the safetensors files are unreadable, malformed, or do not fit each
    /// other (missing, unexpected or misshapen tensor; unsupported config value).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A token id is not a row of the embedding table.
    #[error("token {position} of the batch has id {id}, but the vocabulary has {vocab} entries")]
    TokenOutOfRange {
        /// Index of the token in the packed batch.
        position: usize,
        /// The offending id.
        id: u32,
        /// `vocab_size` of the model.
        vocab: usize,
    },
    /// A position is beyond a learned position table (GPT-2's `wpe`).
    #[error(
        "token {position} of the batch is at position {pos} of its sequence, but the model has \
         {max} positions (n_positions); truncate sequences to {max} tokens"
    )]
    PositionOutOfRange {
        /// Index of the token in the packed batch.
        position: usize,
        /// Its position.
        pos: usize,
        /// Rows of the position table.
        max: usize,
    },
    /// The batch's arrays disagree with each other.
    #[error("malformed batch: {0}")]
    Batch(String),
    /// A CPU op rejected its inputs (e.g. `cu_seqlens` not `[0, …, T]` non-decreasing).
    #[error(transparent)]
    Cpu(#[from] CpuError),
}

/// Result of this module.
pub type Result<T, E = FamilyError> = std::result::Result<T, E>;
