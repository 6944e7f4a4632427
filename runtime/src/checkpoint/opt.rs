//! OPT checkpoints: [`OptConfig`] from `config.json` (RUNTIME.md §1.1) and [`OptWeights`] from
//! the safetensors files (§1.2); [`OptModel::load`] does both for a directory;
//! [`OptModel::extend_positions`] grows the learned position table for longer contexts.

mod config;
mod positions;
mod random;
mod weights;

pub use config::{Activation, OptConfig};
pub use positions::{interpolate_positions, PositionError, PositionExtension};
pub use weights::{LayerNorm, Linear, OptLayer, OptModel, OptWeights, LM_HEAD, PREFIXES};
