//! Attention exposure (DESIGN.md §7, attention): which key blocks each (sequence, query block,
//! head) of a layer really needs, and the machinery to skip the rest.
//!
//! - [`maps`]: exact block-pooled attention maps (the exposer's measurement and ground truth);
//! - [`classes`]: head classes (local, sink, strided, broad) from the maps;
//! - [`profiler`]: a hook that accumulates maps over batches and writes the JSON report and
//!   heat maps of `lexp profile --attention`;
//! - [`predictor`]: per layer and head a low-rank scorer on block-pooled queries and keys;
//! - [`selection`]: local window and sinks always, predicted blocks up to a mass target;
//! - [`sparse`]: predictor + selection behind [`crate::model::AttentionHook`];
//! - [`corpus`]: the dense model over text windows: the profile and the predictor-quality run;
//! - [`guard`]: dense probes and the per-layer target controller (the MLP guard's
//!   [`crate::exposure::guard::control`]).

pub mod classes;
pub mod corpus;
pub mod guard;
pub mod maps;
pub mod predictor;
pub mod profiler;
pub mod selection;
pub mod sparse;
