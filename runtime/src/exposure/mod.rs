//! MLP exposure (DESIGN.md §7, MLP): how lexp turns the "shadowy" activation sparsity of ReLU
//! models into skipped work.
//!
//! The paper's three ideas, each in its own module:
//! - the **exposer** profiles activations ([`stats`], [`coactivation`]) and *makes* structure
//!   with a function-preserving neuron permutation ([`cluster`], [`permutation`]);
//! - the **predictor** ([`predictor`]) scores (token, neuron block) pairs from `fc1`'s input,
//!   and [`selection`] turns scores into kept blocks per row group;
//! - the **guard** ([`guard`]) compares sparse and dense on probe batches and moves each
//!   layer's mass target (auto-exposure).
//!
//! [`sparse_mlp`] puts predictor and selection behind [`crate::model::MlpHook`], which is how
//! the model sees all of this.
//!
//! [`attention`] does the same for attention: block-pooled maps, head classes, a low-rank block
//! predictor, selection and guard.

pub mod attention;
pub mod cluster;
pub mod coactivation;
pub mod guard;
pub mod permutation;
pub mod predictor;
pub mod profiler;
pub mod selection;
pub mod sparse_mlp;
pub mod state;
pub mod stats;
