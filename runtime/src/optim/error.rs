//! [`OptimError`]: why optimizer state could not be built, saved or restored.

use crate::checkpoint::SafetensorsError;
use std::path::PathBuf;
use thiserror::Error;

/// Result of optimizer state operations.
pub type Result<T, E = OptimError> = std::result::Result<T, E>;

/// Errors of optimizer state. File errors start with the file and name the tensor.
#[derive(Debug, Error)]
pub enum OptimError {
    /// A hyper-parameter is out of range.
    #[error("invalid optimizer configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, naming the field.
        reason: String,
    },
    /// The state file is invalid, unreadable or could not be written.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// In-memory state does not fit the parameters (counts or sizes differ).
    #[error("optimizer state does not match the parameters: {reason}")]
    State {
        /// What differs.
        reason: String,
    },
    /// The state file's `__metadata__` lacks a field or holds an unparsable value.
    #[error("{}: metadata `{key}`: {reason}", file.display())]
    Metadata {
        /// The state file.
        file: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A moment tensor of a parameter is absent from the state file.
    #[error("{}: missing tensor `{tensor}`", file.display())]
    MissingTensor {
        /// The state file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// The state file holds a tensor for no parameter being trained.
    #[error("{}: tensor `{tensor}` belongs to no trainable parameter (was the state saved for another configuration?)", file.display())]
    UnexpectedTensor {
        /// The state file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A moment tensor's shape differs from its parameter's size.
    #[error("{}: tensor `{tensor}`: shape {found:?}, expected [{expected}]", file.display())]
    ShapeMismatch {
        /// The state file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The parameter's element count.
        expected: usize,
        /// The shape in the file.
        found: Vec<usize>,
    },
}
