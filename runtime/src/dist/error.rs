//! Errors of data-parallel setup and communication, each naming the variable, rank or
//! operation at fault (and how long it waited), so that no failure is a silent hang.

use std::time::Duration;
use thiserror::Error;

/// What went wrong in a data-parallel run.
#[derive(Debug, Error)]
pub enum DistError {
    /// A torchrun variable is missing while others are set.
    #[error("{var} is not set ({why})")]
    MissingVar {
        /// The variable.
        var: &'static str,
        /// Why it is needed.
        why: String,
    },
    /// A torchrun variable has a value that cannot be used.
    #[error("{var}={value:?} is invalid: {reason}")]
    BadVar {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Rank 0 could not listen on MASTER_ADDR:MASTER_PORT.
    #[error("rank 0 cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A peer did not answer, closed its connection, or sent something unexpected.
    #[error("rank {rank}: {what} with rank {peer} failed after {:.1} s: {detail}", .elapsed.as_secs_f64())]
    Peer {
        /// This process's rank.
        rank: usize,
        /// The other side.
        peer: usize,
        /// The operation (`rendezvous`, `all-reduce #3`, ...).
        what: String,
        /// Time spent in the operation before it failed.
        elapsed: Duration,
        /// What happened (timeout, connection closed, protocol mismatch).
        detail: String,
    },
    /// Ranks did not join the rendezvous before its deadline.
    #[error("rank 0: rendezvous timed out after {:.1} s: rank(s) {missing:?} of {world_size} never connected", .elapsed.as_secs_f64())]
    Missing {
        /// Ranks that never connected.
        missing: Vec<usize>,
        /// The world size.
        world_size: usize,
        /// Time waited.
        elapsed: Duration,
    },
    /// Ranks disagree about a collective's arguments (a bug: every rank must call the same
    /// collectives with the same lengths in the same order).
    #[error("rank {rank}: collective mismatch with rank {peer}: {detail}")]
    Mismatch {
        /// This process's rank.
        rank: usize,
        /// The other side.
        peer: usize,
        /// What differs.
        detail: String,
    },
    /// Starting or supervising worker processes failed.
    #[error("launcher: {0}")]
    Launch(String),
}
