//! The CPU backend: every op of a training step in plain Rust (rayon + the `gemm` crate), in
//! f32. It is the fallback that makes `lexp finetune` run on any machine, and the reference
//! every GPU op is tested against.
//!
//! All tensors are row-major `&[f32]` / `Vec<f32>` with explicit dimensions.
//!
//! - [`matmul`](mod@matmul): [`matmul()`] (`out = α·op(a)·op(b) + β·out` through `gemm`),
//!   [`linear`], [`col_sum`] (RUNTIME.md §2.1).
//! - [`norm`]: LayerNorm forward, input backward and parameter gradients (§1.3, §2.2).
//! - [`attention`]: varlen causal multi-head self-attention over a packed batch, forward and
//!   backward in the flash form (§2.3), dense causal or restricted to kept key blocks.
//! - [`key_blocks`]: [`KeyBlocks`], the block mask the attention takes (a borrowed view, so
//!   that `cpu` does not depend on the model's `AttentionMask`, which lends its arrays as one).
//! - [`loss`]: the tied LM head fused with cross-entropy in token chunks (§2.5), and full
//!   [`logits`] for small batches.
//! - [`activation`]: ReLU and element-wise helpers (§2.4).
//! - private: `fastmath` (a vectorisable `exp` and softmax row reductions) and `shared`
//!   (per-thread scratch buffers, outputs written by parallel tasks in disjoint pieces).
//! - [`embedding`]: row gathers from lookup tables.
//!
//! Ops whose inputs can come from user data (token ids, targets, `cu_seqlens`) return
//! [`CpuError`]; the pure linear-algebra ops, whose callers are internal, assert their slice
//! lengths and panic on a mismatch (a bug in the caller).

pub mod activation;
pub mod attention;
pub mod embedding;
mod error;
mod fastmath;
pub mod key_blocks;
pub mod loss;
pub mod matmul;
pub mod norm;
mod shared;

pub use activation::{add_bias_inplace, add_inplace, relu, relu_bwd_inplace, scale_inplace};
pub use attention::{
    attention_bwd, attention_bwd_masked, attention_fwd, attention_fwd_masked, AttentionSaved,
};
pub use embedding::gather_rows;
pub use error::CpuError;
pub use key_blocks::KeyBlocks;
pub use loss::{lm_head_xent, logits, XentOut};
pub use matmul::{col_sum, linear, matmul};
pub use norm::{layernorm_bwd, layernorm_fwd, layernorm_param_grads, LayerNormSaved};

/// Slices at least this long are processed with rayon by the element-wise ops; shorter ones
/// serially (thread hand-off would cost more than the work).
pub(crate) const PAR_MIN_LEN: usize = 1 << 15;

#[cfg(test)]
mod tests;
