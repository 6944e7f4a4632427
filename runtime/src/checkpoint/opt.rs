//! OPT checkpoints: [`OptConfig`] from `config.json` (RUNTIME.md §1.1) and [`OptWeights`] from
//! the safetensors files (§1.2); [`OptModel::load`] does both for a directory.

mod config;
mod random;
mod weights;

pub use config::{Activation, OptConfig};
pub use weights::{LayerNorm, Linear, OptLayer, OptModel, OptWeights, LM_HEAD, PREFIXES};
