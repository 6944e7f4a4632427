//! The OPT causal LM as a training model: forward, hand-written backward with frozen base
//! weights, LoRA adapters on a subset of the projections (RUNTIME.md §1.3, §2).
//!
//! - [`opt`]: the whole model (embeddings, layers, final LayerNorm, fused LM-head loss).
//! - [`layer`]: one decoder layer, pre-LN or post-LN, forward and backward.
//! - [`lora_branch`]: the LoRA branch of one projection.
//! - [`mlp_hook`]: where MLP exposure observes activations and keeps only some neuron blocks.
//! - [`attention_hook`]: where attention exposure observes queries and keys and keeps only some
//!   key blocks per (sequence, query block, head).
//! - [`Exposure`] (in [`layer`]): both hooks, passed together to [`forward_exposed`] and
//!   [`loss_and_grads_exposed`]; the backward reuses the masks the forward chose.
//! - [`dropout`]: residual and LoRA dropout masks, reproducible per `(seed, layer, site)`.
//!
//! Everything runs on the CPU backend ([`crate::cpu`]) in f32: the reference the GPU path is
//! tested against, and the fallback when there is no GPU.

pub mod attention_hook;
pub mod dropout;
mod error;
pub mod houlsby_branch;
pub mod layer;
pub mod lora_branch;
pub mod mlp_hook;
pub mod opt;

pub use attention_hook::{AttentionHook, AttentionInput, AttentionMask};
pub use dropout::{DropoutRng, MaskSource, RecordedMasks};
pub use error::{ModelError, Result};
pub use layer::Exposure;
pub use mlp_hook::{MlpHook, MlpMask};
pub use opt::{
    backward, eval_loss, forward, forward_exposed, forward_with_masks, logits, loss_and_grads,
    loss_and_grads_exposed, loss_and_grads_with_masks, Forward, PeftGrads, StepOutput,
};
