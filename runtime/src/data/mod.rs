//! Training data: tokenizer, JSONL examples, packing, shuffling and the eval split.
//!
//! The pipeline follows `RUNTIME.md` §5:
//!
//! 1. [`Tokenizer`] loads a Hugging Face `tokenizer.json` and encodes exactly as HF does
//!    (for OPT the post-processor prepends `</s>`, id 2, as the BOS).
//! 2. [`load_jsonl`] reads a JSONL file (`prompt`/`completion`, Alpaca, plain `text`, or
//!    pre-tokenized `context`/`completion` id lists) into [`Example`]s: token ids plus a
//!    completion-only loss mask. Malformed lines are errors that name `file:line`.
//! 3. [`split_eval`] / [`split_eval_grouped`] hold out a deterministic eval split, and
//!    [`epoch_order`] shuffles the training indices per epoch with a seed ([`SplitMix64`], so
//!    the order is reproducible across platforms and crate versions).
//! 4. [`pack`] concatenates examples into token-budgeted [`PackedBatch`]es with `cu_seqlens`,
//!    per-sequence positions and shifted targets, ready for varlen attention and the fused loss.
//!
//! 5. [`text_windows`] cuts plain text into fixed evaluation windows (the fixtures' valid loss).
//!
//! Everything here is plain host code: no GPU, no CUDA.

mod jsonl;
mod packing;
mod split;
mod tokenizer;
mod windows;

use std::path::PathBuf;

pub use jsonl::{
    load_jsonl, parse_jsonl, Dataset, Example, JsonlOptions, LoadStats, Overflow, Shape,
    SpecialTokenText, ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT,
};
pub use packing::{pack, packing_efficiency, PackedBatch, IGNORE_INDEX};
pub use split::{epoch_order, split_eval, split_eval_grouped, EvalSize, Split, SplitMix64};
pub use tokenizer::Tokenizer;
pub use windows::text_windows;

/// Errors of the data pipeline. Messages are meant for the person who wrote the data file:
/// line errors read `path:line: what is wrong`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// `tokenizer.json` could not be read or parsed.
    #[error("cannot load tokenizer {}: {message}", .path.display())]
    TokenizerLoad {
        /// The file that was asked for.
        path: PathBuf,
        /// What the `tokenizers` crate (or our checks) said.
        message: String,
    },
    /// The tokenizer failed on some text (rare: byte-level BPE encodes any string).
    #[error("tokenizer {}: {message}", .path.display())]
    Tokenize {
        /// The tokenizer's file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A data file could not be opened or read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The data file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// One line of a JSONL file is malformed or unusable.
    #[error("{}:{line}: {message}", .path.display())]
    Line {
        /// The data file, as given by the caller.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// An example does not fit the packing token budget.
    #[error("example {index} has {len} tokens, more than the token budget of {budget}")]
    ExampleTooLong {
        /// Index into the example slice.
        index: usize,
        /// Its length in tokens.
        len: usize,
        /// The budget.
        budget: usize,
    },
    /// An example with no tokens was given to the packer.
    #[error("example {index} has no tokens")]
    EmptyExample {
        /// Index into the example slice.
        index: usize,
    },
    /// An index in a packing order does not name an example.
    #[error("index {index} is out of range for {len} examples")]
    IndexOutOfRange {
        /// The offending index.
        index: usize,
        /// Number of examples.
        len: usize,
    },
    /// A token id does not fit the `i32` targets the loss kernels take.
    #[error("token id {id} of example {index} does not fit in i32")]
    TokenIdTooLarge {
        /// The id.
        id: u32,
        /// Index into the example slice.
        index: usize,
    },
    /// A packing budget of zero or beyond `i32::MAX` (cu_seqlens are int32).
    #[error("invalid token budget {0}: must be between 1 and {max}", max = i32::MAX)]
    InvalidBudget(usize),
    /// An eval split that cannot be made (bad fraction, or nothing left to train on).
    #[error("invalid eval split: {0}")]
    InvalidSplit(String),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, DataError>;
