//! lexp's tile compiler.
//!
//! Kernels written with `#[kernel]` become [`ir::Kernel`]s (SSA over statically shaped tiles),
//! go through the passes of [`passes`] (canonicalise, layouts, shared-memory plan) and are
//! lowered to LLVM IR and PTX by `codegen` (feature `llvm`). [`interp`] runs the same IR on
//! host buffers with the GPU's numerics. [`launch`] is the contract between generated
//! launchers and a device runtime; [`target`] holds every fact about the GPU targets.

pub mod dtype;
pub mod interp;
pub mod ir;
pub mod launch;
pub mod layout;
pub mod passes;
pub mod sim;
pub mod target;

#[cfg(feature = "llvm")]
pub mod codegen;

/// Version of the compiler and a hash of its sources: part of every PTX cache key, so that any
/// change to the compiler regenerates every kernel.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "+",
    env!("LEXP_COMPILER_SOURCE_HASH")
);
