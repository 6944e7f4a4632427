//! Parameter-efficient fine-tuning methods: LoRA's parameters and initialisation, and the
//! Hugging Face PEFT adapter format (RUNTIME.md §2.6, §3).
//!
//! - [`lora`]: [`LoraTarget`], [`LoraConfig`], [`LoraParams`] (PEFT's default init, the flat
//!   tensor list the optimizer walks in canonical order).
//! - [`adapter`]: [`save_adapter`] / [`load_adapter`] for the `adapter_config.json` +
//!   `adapter_model.safetensors` directory peft 0.21 reads and writes.
//! - [`PeftError`]: every failure, naming the file and the tensor or key.

pub mod adapter;
mod error;
pub mod lora;

pub use adapter::{load_adapter, save_adapter, CONFIG_FILE, WEIGHTS_FILE};
pub use error::{PeftError, Result};
pub use lora::{tensor_key, LoraConfig, LoraFactor, LoraModule, LoraParams, LoraTarget};

#[cfg(test)]
mod adapter_tests;
