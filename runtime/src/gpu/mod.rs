//! The OPT + PEFT (LoRA, BitFit, Houlsby adapters) training model on one CUDA GPU: [`GpuEngine`] implements
//! [`Engine`](crate::train::Engine), so the training loop, its checkpoints and metrics run
//! unchanged on the GPU.
//!
//! Precision (RUNTIME.md §2, DESIGN 6): frozen weights and activations in bf16, every GEMM on
//! cuBLAS with f32 accumulation, LayerNorm statistics, attention softmax and the loss in f32,
//! PEFT gradients produced in f32 and downloaded into a [`PeftGrads`](crate::model::PeftGrads).
//! The math mirrors [`crate::model::layer`] (pre-LN path):
//!
//! - [`weights`]: the frozen model uploaded once (q/k/v fused into one `[3H, H]` projection).
//! - [`workspace`]: activation and scratch buffers, sized for the largest batch seen.
//! - [`lora`]: the LoRA parameters' device copies, the gradient buffer, and the branch GEMMs.
//! - [`bitfit`]: BitFit's trained biases in the device weights and their gradients.
//! - [`houlsby`]: Houlsby adapters (ReLU): device copies, saved activations, gradients.
//! - [`layer`]: one decoder layer forward and backward.
//! - [`attention`]: causal attention over the packed sequences: flash attention in the DSL
//!   (head dimensions 64, 80 and 128, and those between in place), or materialised scores
//!   with cuBLAS (any head dimension).
//! - [`flash_launch`]: the flash-attention launches of either kernel family.
//! - [`flash_problem`]: one stand-alone flash-attention problem (tests and benchmarks).
//! - [`engine`]: the engine: batch checks, embeddings, the chunked LM head + cross-entropy,
//!   and the one download (loss and gradients) that ends each call.
//! - [`optimizer`]: AdamW on the device (the engine's `optimizer_step`): gradients summed,
//!   clipped and applied without leaving the GPU.
//! - [`dropout`], [`rng`]: dropout masks (cuRAND uniforms, the `dropout_mask` kernel), saved
//!   for the backward.
//!
//! What runs: pre-LN OPT (every size from 125m up; opt-350m is post-LN and is refused), ReLU,
//! with or without biases and the final LayerNorm, tied or untied head, LoRA on any of the six
//! projections, BitFit, ReLU Houlsby adapters (each with AdamW on the device, [`optimizer`],
//! and each with the sparse MLP, [`sparse_mlp`]), residual and LoRA dropout in training ([`dropout`], random numbers from cuRAND
//! through [`rng`]). Refused with [`ModelError::Unsupported`](crate::model::ModelError):
//! post-LN, `project_in`/`project_out`, other activations. The CPU engine covers those.

pub mod attention;
pub mod bitfit;
pub mod dropout;
pub mod engine;
pub mod flash_launch;
pub mod flash_problem;
pub mod fold_one_kernel;
pub mod graph;
pub mod houlsby;
pub mod layer;
pub mod lora;
pub mod lora_fold;
pub(crate) mod ops;
pub mod optimizer;
pub mod predictor;
pub mod rng;
pub mod sparse_attention;
pub mod sparse_mlp;
pub mod weights;
pub mod workspace;

pub use engine::GpuEngine;
pub use predictor::MlpPredictors;
