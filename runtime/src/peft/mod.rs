//! Parameter-efficient fine-tuning methods: LoRA, BitFit and Houlsby adapters, their
//! parameters and initialisation, and their files (RUNTIME.md §2.6–2.8, §3).
//!
//! - [`params`]: [`PeftParams`] / [`PeftConfig`], every trainable tensor of a run whatever the
//!   methods (the flat list the optimizer walks in canonical order), saved to and loaded from
//!   one directory.
//! - [`lora`]: [`LoraTarget`], [`LoraConfig`], [`LoraParams`] (PEFT's default init).
//! - [`adapter`]: [`save_adapter`] / [`load_adapter`] for the `adapter_config.json` +
//!   `adapter_model.safetensors` directory peft 0.21 reads and writes (LoRA).
//! - [`bitfit`]: [`BitFitParams`], the trained biases, and their export.
//! - [`houlsby`]: [`HoulsbyParams`], the bottleneck adapters, and their export.
//! - [`merge`]: folds LoRA and BitFit into a Hugging Face checkpoint (`lexp merge`).
//! - [`PeftError`]: every failure, naming the file and the tensor or key.

pub mod adapter;
pub mod bitfit;
mod error;
mod files;
pub mod houlsby;
pub mod lora;
pub mod merge;
pub mod params;

pub use adapter::{load_adapter, save_adapter, CONFIG_FILE, WEIGHTS_FILE};
pub use bitfit::{BiasSite, BitFitConfig, BitFitParams};
pub use error::{PeftError, Result};
pub use houlsby::{AdapterActivation, AdapterSite, HoulsbyConfig, HoulsbyModule, HoulsbyParams};
pub use lora::{tensor_key, LoraConfig, LoraFactor, LoraModule, LoraParams, LoraTarget};
pub use params::{PeftConfig, PeftParams};

#[cfg(test)]
mod adapter_tests;
