//! [`CpuError`]: what the CPU ops reject in their inputs (data that can come from user files:
//! token ids, targets, sequence boundaries), so callers can report it instead of panicking.

use thiserror::Error;

/// Why a CPU op refused its inputs. Each message names the offending position and value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CpuError {
    /// `cu_seqlens` has no entries; it needs at least `[0, T]`.
    #[error("cu_seqlens is empty; it needs at least [0, T]")]
    CuSeqlensEmpty,
    /// `cu_seqlens[0]` is not 0.
    #[error("cu_seqlens[0] is {first}, must be 0")]
    CuSeqlensStart {
        /// The first entry.
        first: i32,
    },
    /// `cu_seqlens` decreases somewhere.
    #[error("cu_seqlens decreases at index {index}: {prev} then {value}")]
    CuSeqlensDecreasing {
        /// Index of the entry smaller than its predecessor.
        index: usize,
        /// The predecessor.
        prev: i32,
        /// The entry.
        value: i32,
    },
    /// The last entry of `cu_seqlens` is not the number of tokens.
    #[error("cu_seqlens ends at {last}, but the batch has {tokens} tokens")]
    CuSeqlensEnd {
        /// The last entry.
        last: i32,
        /// The number of tokens `T` of the batch.
        tokens: usize,
    },
    /// A cross-entropy target outside `0..vocab` that is not the ignore index (-100).
    #[error(
        "target {value} at row {row} is out of range (vocab {vocab}; only -100 may be negative)"
    )]
    BadTarget {
        /// The row (token) index.
        row: usize,
        /// The target.
        value: i32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A row id past the end of a lookup table.
    #[error("id {id} at position {pos} is out of range for a table of {rows} rows")]
    IdOutOfRange {
        /// Position in the id list.
        pos: usize,
        /// The id.
        id: u32,
        /// Number of rows of the table.
        rows: usize,
    },
    /// A key-block mask that does not fit the attention it is applied to.
    #[error("attention key-block mask: {0}")]
    KeyBlocks(String),
    /// A buffer whose length does not match the dimensions given with it.
    #[error("{what}: expected {expected} elements, got {got}")]
    Shape {
        /// Which buffer (and the dimensions it should have).
        what: &'static str,
        /// The length the dimensions imply.
        expected: usize,
        /// The actual length.
        got: usize,
    },
}

/// Checks `got == expected` for the buffer `what`.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), CpuError> {
    if got == expected {
        Ok(())
    } else {
        Err(CpuError::Shape {
            what,
            expected,
            got,
        })
    }
}
