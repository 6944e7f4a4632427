//! Emulators of the warp-level hardware the tensor-core lowering targets, for tests without a
//! GPU (COMPILER.md §9.1): shared-memory banks ([`banks`]), `ldmatrix` ([`ldmatrix`]) and
//! `mma.sync.m16n8k16` ([`mma`]), each written from the PTX ISA text, the mma-to-dot register
//! shortcut ([`mma_to_dot`]), and the bookkeeping of the multi-stage `cp.async` main loop
//! ([`pipeline`]).

pub mod banks;
pub mod ldmatrix;
pub mod mma;
pub mod mma_to_dot;
pub mod pipeline;
