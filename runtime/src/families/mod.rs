//! Model families beyond OPT, forward only (RUNTIME.md §6): GPT-2 and LLaMA-style causal LMs
//! loaded from Hugging Face checkpoint directories and run in f32 on the CPU backend over a
//! packed batch, for parity with transformers (`tests/families.rs`, references from
//! `bench/parity/families_reference.py`).
//!
//! - [`gpt2`]: [`Gpt2Config`], [`Gpt2Model`] (`Conv1D` weights kept `[in, out]`, fused
//!   `c_attn`, learned positions, tied or untied head).
//! - [`llama`]: [`LlamaConfig`], [`LlamaModel`] (RMSNorm, half-rotation RoPE, GQA, gated
//!   MLP), and the building blocks [`rms_norm`], [`rope_inv_freq`], [`apply_rope`].
//! - shared (`common`): the checked tensor loader, batch validation, causal attention with
//!   grouped key/value heads ([`repeat_kv`]) on top of [`crate::cpu::attention_fwd`], and the
//!   activations ([`gelu_erf`], [`silu`]; `gelu_new` is [`crate::cpu::activation::gelu_tanh`]).
//!
//! Config and weight loading reuse the OPT side's pieces: [`Checkpoint`](crate::checkpoint::Checkpoint)
//! (single or sharded safetensors, validated), [`HostMatrix`](crate::checkpoint::HostMatrix),
//! [`LayerNorm`](crate::checkpoint::opt::LayerNorm) / [`Linear`](crate::checkpoint::opt::Linear)
//! and [`CheckpointError`](crate::checkpoint::CheckpointError), so errors read the same: file
//! first, then the tensor or config field. The forward takes a
//! [`PackedBatch`](crate::data::PackedBatch) (`input_ids`, per-sequence `position_ids`,
//! `cu_seqlens`; targets are not used) and returns logits `[T, V]`.
//!
//! Not here: training (backward, PEFT) for these families, tokenizers, scaled RoPE variants
//! (linear, dynamic, llama3, yarn), and bf16 or GPU paths.

mod common;
mod error;
pub mod gpt2;
pub mod llama;

pub use common::{erf, gelu_erf, repeat_kv, silu};
pub use error::{FamilyError, Result};
pub use gpt2::{Conv1d, Gpt2Config, Gpt2Layer, Gpt2Model};
pub use llama::{apply_rope, rms_norm, rope_inv_freq, LlamaConfig, LlamaLayer, LlamaModel};

#[cfg(test)]
mod tests;
