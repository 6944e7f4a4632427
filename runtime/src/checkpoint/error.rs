//! Errors of checkpoint reading and writing: [`SafetensorsError`] for one safetensors file,
//! [`CheckpointError`] for indexes, configs and model weights (wrapping the former).

use super::dtype::Dtype;
use super::safetensors::MAX_HEADER_LEN;
use std::path::PathBuf;
use thiserror::Error;

/// Why a safetensors file was rejected (or could not be written). Each message starts with the
/// file's path and, for a problem with one tensor, names it.
#[derive(Debug, Error)]
pub enum SafetensorsError {
    /// The file could not be opened, read, mapped or written.
    #[error("{}: cannot {op}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// What was being done (`"open"`, `"memory-map"`, `"rename into place"`).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the 8-byte header length.
    #[error("{}: file is {len} bytes, shorter than the 8-byte header length", file.display())]
    TooShort {
        /// The file.
        file: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The header length exceeds [`MAX_HEADER_LEN`].
    #[error("{}: header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes", file.display())]
    HeaderTooLarge {
        /// The file.
        file: PathBuf,
        /// The header length the file claims.
        header_len: u64,
    },
    /// `8 + header length` is past the end of the file.
    #[error("{}: header length {header_len} runs past the end of the file ({file_len} bytes)", file.display())]
    HeaderPastEnd {
        /// The file.
        file: PathBuf,
        /// The header length the file claims.
        header_len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header is not UTF-8, not JSON, not an object, or its `__metadata__` is malformed.
    #[error("{}: invalid header: {reason}", file.display())]
    Header {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor entry is malformed: duplicate name, missing or extra keys, bad shape or offsets.
    #[error("{}: tensor `{tensor}`: {reason}", file.display())]
    Entry {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's dtype is not one of the format's names.
    #[error("{}: tensor `{tensor}`: unknown dtype `{dtype}`", file.display())]
    UnknownDtype {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// A tensor's byte range does not match its dtype and shape.
    #[error(
        "{}: tensor `{tensor}`: dtype {dtype} and shape {shape:?} need {expected} bytes, \
         but data_offsets [{begin}, {end}] hold {}", file.display(), end - begin
    )]
    SizeMismatch {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the dtype and shape need.
        expected: u64,
        /// Start of its byte range.
        begin: u64,
        /// End of its byte range.
        end: u64,
    },
    /// A tensor's byte range ends past the data section.
    #[error(
        "{}: tensor `{tensor}`: data_offsets [{begin}, {end}] exceed the file's data section \
         ({data_len} bytes)", file.display()
    )]
    OutOfBounds {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Start of its byte range.
        begin: u64,
        /// End of its byte range.
        end: u64,
        /// Length of the data section (file length − 8 − header length).
        data_len: u64,
    },
    /// Tensors, sorted by offset, leave a gap or overlap.
    #[error(
        "{}: tensor `{tensor}`: data_offsets [{begin}, {end}] {} {}: tensors must be contiguous, \
         without gaps or overlaps", file.display(),
        if *begin < *expected { "overlap" } else { "leave a gap after" },
        previous.as_ref().map_or_else(|| "the start of the data section".to_owned(),
                                      |p| format!("tensor `{p}` (which ends at {expected})"))
    )]
    NotContiguous {
        /// The file.
        file: PathBuf,
        /// The tensor that starts at the wrong place.
        tensor: String,
        /// Start of its byte range.
        begin: u64,
        /// End of its byte range.
        end: u64,
        /// The tensor before it in offset order (`None`: it is the first).
        previous: Option<String>,
        /// Where it should start.
        expected: u64,
    },
    /// The tensors do not cover the data section to its end.
    #[error(
        "{}: {} trailing bytes after {}: tensors must cover the data section ({data_len} bytes) \
         exactly", file.display(), data_len - covered,
        last.as_ref().map_or_else(|| "the header (no tensors)".to_owned(), |t| format!("tensor `{t}`"))
    )]
    TrailingBytes {
        /// The file.
        file: PathBuf,
        /// The last tensor in offset order, if any.
        last: Option<String>,
        /// Bytes covered by tensors.
        covered: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// A tensor's dtype cannot be converted to f32.
    #[error("{}: tensor `{tensor}`: dtype {dtype} cannot be loaded as f32 (F32, F16 and BF16 can)", file.display())]
    UnsupportedDtype {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// A tensor asked for by name is not in the file.
    #[error("{}: no tensor `{tensor}`", file.display())]
    MissingTensor {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
}

/// Result of checkpoint loading.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Why a checkpoint could not be loaded. Every message starts with the file it is about and
/// names the tensor where there is one.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A safetensors file is invalid or unreadable.
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    /// A JSON file (config, index) could not be read.
    #[error("{}: cannot {op}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A directory has neither `model.safetensors.index.json` nor `model.safetensors`.
    #[error("{}: no model.safetensors.index.json or model.safetensors", dir.display())]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// `model.safetensors.index.json` is malformed.
    #[error("{}: {reason}", file.display())]
    Index {
        /// The index file.
        file: PathBuf,
        /// What is wrong (naming the tensor where there is one).
        reason: String,
    },
    /// The index maps a tensor to a shard file that does not exist.
    #[error("{}: tensor `{tensor}` is mapped to shard `{shard}`, which does not exist", index.display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard's file name.
        shard: String,
        /// The first tensor mapped to it.
        tensor: String,
    },
    /// The index maps a tensor to a shard that does not contain it.
    #[error("{}: tensor `{tensor}` is not in the file, but {} maps it here", shard.display(), index.display())]
    NotInShard {
        /// The shard file.
        shard: PathBuf,
        /// The tensor.
        tensor: String,
        /// The index file.
        index: PathBuf,
    },
    /// A shard holds a tensor that the index does not map to it.
    #[error(
        "{}: tensor `{tensor}` is in the file, but {} {}", shard.display(), index.display(),
        mapped_to.as_ref().map_or_else(|| "does not list it".to_owned(), |s| format!("maps it to `{s}`"))
    )]
    Unmapped {
        /// The shard file.
        shard: PathBuf,
        /// The tensor.
        tensor: String,
        /// The index file.
        index: PathBuf,
        /// The shard the index maps it to, if any.
        mapped_to: Option<String>,
    },
    /// `config.json` is malformed or inconsistent.
    #[error("{}: {reason}", file.display())]
    Config {
        /// The config file.
        file: PathBuf,
        /// What is wrong (naming the field).
        reason: String,
    },
    /// A tensor the config requires is not in the checkpoint.
    #[error("{}: missing tensor `{tensor}`, required by the config", file.display())]
    MissingTensor {
        /// The checkpoint (index or single file).
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor is not part of the architecture the config describes.
    #[error(
        "{}: tensor `{tensor}` is not a weight of this model (typo, or a config that does not \
         match the checkpoint?)", file.display()
    )]
    UnexpectedTensor {
        /// The file holding it.
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// The position table cannot be extended as asked
    /// ([`OptModel::extend_positions`](super::OptModel::extend_positions)).
    #[error("position table: {0}")]
    Positions(#[from] super::opt::PositionError),
    /// A tensor's shape disagrees with the config.
    #[error(
        "{}: tensor `{tensor}`: shape {found:?} does not match the config (expected {expected:?})",
        file.display()
    )]
    ShapeMismatch {
        /// The file holding it.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
}
