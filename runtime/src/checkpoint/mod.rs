//! Model checkpoints on the host: safetensors files, Hugging Face checkpoint directories and
//! OPT models (RUNTIME.md §1.1, §1.2, §4).
//!
//! - [`safetensors`]: a validating reader ([`SafeTensors`], memory-mapped, zero-copy
//!   [`TensorView`]s, F32/F16/BF16 → f32) and [`writer`]: an atomic writer for adapter files.
//!   Implemented here rather than through the `safetensors` crate so that every rule of §4.3 is
//!   enforced (duplicate names, the leading `{`, exact entry keys) and every error names the
//!   file and the tensor.
//! - [`Checkpoint`]: a directory's `model.safetensors`, or the shards of
//!   `model.safetensors.index.json`, cross-checked against the index (§4.5).
//! - [`opt`]: [`OptConfig`] and [`OptWeights`] (f32 [`HostMatrix`]es, shapes checked against
//!   the config).
//!
//! Everything here is host-side and needs no GPU.

mod dtype;
mod error;
mod host;
mod json;
pub mod opt;
pub mod safetensors;
mod sharded;
pub mod writer;

pub use dtype::{encode_f32, Dtype};
pub use error::{CheckpointError, Result};
pub use host::HostMatrix;
pub use opt::{OptConfig, OptModel, OptWeights, PositionExtension};
pub use safetensors::{SafeTensors, SafetensorsError, TensorView, MAX_HEADER_LEN};
pub use sharded::{Checkpoint, INDEX_FILE, SINGLE_FILE};
pub use writer::{write_atomic, WriteTensor};

#[cfg(test)]
mod tests;
