//! [`PeftError`]: why a PEFT configuration is invalid, an adapter directory cannot be
//! written or read, or a merge cannot be made. Every message about a file starts with its path and names the tensor or
//! config key at fault.

use crate::checkpoint::{CheckpointError, SafetensorsError};
use std::path::PathBuf;
use thiserror::Error;

/// Result of PEFT operations.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

/// Errors of LoRA configuration and of PEFT adapter files.
#[derive(Debug, Error)]
pub enum PeftError {
    /// A PEFT configuration is invalid (LoRA: zero rank, bad dropout, bad targets; no method;
    /// BitFit on a model without biases; a zero adapter bottleneck).
    #[error("invalid PEFT configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The adapter cannot be folded into the base weights (Houlsby adapters).
    #[error("cannot merge: {reason}")]
    NotMergeable {
        /// Why.
        reason: String,
    },
    /// A merge's output directory already holds a checkpoint (nothing is overwritten).
    #[error("{}: already holds a checkpoint; choose a new or empty directory", dir.display())]
    OutputExists {
        /// The output directory.
        dir: PathBuf,
    },
    /// A checkpoint-level problem (wrapped as is).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// `adapter_model.safetensors` is invalid, unreadable or could not be written; or a
    /// tensor in it has a dtype that does not convert to f32.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// A file the adapter directory must hold is absent.
    #[error("{}: no such file{}", file.display(), hint)]
    MissingFile {
        /// The file that was looked for.
        file: PathBuf,
        /// Extra advice (may be empty), starting with `"; "`.
        hint: String,
    },
    /// A file or directory could not be read or created.
    #[error("{}: cannot {op}: {source}", file.display())]
    Io {
        /// The file or directory.
        file: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON, or a key has the wrong type or value.
    #[error("{}: {reason}", file.display())]
    Config {
        /// The config file.
        file: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// `adapter_config.json` is a PEFT method other than LoRA.
    #[error("{}: peft_type is `{peft_type}`, only `LORA` adapters can be loaded", file.display())]
    NotLora {
        /// The config file.
        file: PathBuf,
        /// The `peft_type` found.
        peft_type: String,
    },
    /// A valid PEFT feature that this runtime does not implement (yet).
    #[error("{}: `{key}`: {reason} is not supported", file.display())]
    Unsupported {
        /// The config file.
        file: PathBuf,
        /// The config key.
        key: String,
        /// What was asked for.
        reason: String,
    },
    /// A tensor of the adapter file is not a LoRA matrix of a targeted module of this model.
    #[error("{}: tensor `{tensor}` {reason}", file.display())]
    UnexpectedTensor {
        /// The safetensors file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A targeted module's `lora_A` or `lora_B` is absent from the adapter file.
    #[error("{}: missing tensor `{tensor}` (target module `{module}` is in adapter_config.json)", file.display())]
    MissingTensor {
        /// The safetensors file.
        file: PathBuf,
        /// The expected tensor.
        tensor: String,
        /// The targeted module's short name.
        module: &'static str,
    },
    /// A LoRA matrix's shape disagrees with `r` and the model's dimensions.
    #[error("{}: tensor `{tensor}`: shape {found:?}, expected {expected:?}", file.display())]
    ShapeMismatch {
        /// The safetensors file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape implied by `r` and the model.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
}
