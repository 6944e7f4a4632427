//! Errors of the training model: bad batches, shapes that do not fit the model, and CPU-op
//! failures, each naming what is wrong.

use super::attention_hook::MaskError;
use crate::cpu::CpuError;
use thiserror::Error;

/// What went wrong running the model.
#[derive(Debug, Error)]
pub enum ModelError {
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
    /// A position is beyond the model's learned position table.
    #[error(
        "token {position} of the batch is at position {pos} of its sequence, but the model has \
         {max} positions (max_position_embeddings); truncate sequences to {max} tokens, or \
         extend the position table (`lexp finetune --max-positions`)"
    )]
    PositionOutOfRange {
        /// Index of the token in the packed batch.
        position: usize,
        /// Its position within its sequence.
        pos: usize,
        /// `max_position_embeddings`.
        max: usize,
    },
    /// The batch's arrays disagree with each other.
    #[error("malformed batch: {0}")]
    Batch(String),
    /// An adapter does not fit the model it is applied to.
    #[error("adapter does not fit the model: {0}")]
    Adapter(String),
    /// The model uses something this runtime does not implement.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// An attention hook returned a mask that does not fit the batch.
    #[error("attention exposure of layer {layer} returned an unusable mask: {source}")]
    AttentionMask {
        /// The layer whose hook returned it.
        layer: usize,
        /// What is wrong with the mask.
        source: MaskError,
    },
    /// The GPU failed (a driver, cuBLAS or kernel-launch error), or is out of memory.
    #[error("GPU: {0}")]
    Device(String),
    /// A collective of data-parallel training failed (a peer died, hung or disagreed); the
    /// message names the rank and the time waited ([`crate::dist::DistError`]).
    #[error("data-parallel training: {0}")]
    Collective(String),
    /// A CPU op rejected its inputs.
    #[error(transparent)]
    Cpu(#[from] CpuError),
}

/// Result of model operations.
pub type Result<T> = std::result::Result<T, ModelError>;
