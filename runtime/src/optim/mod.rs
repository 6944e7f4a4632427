//! The optimizer of trainable parameters: AdamW exactly as `torch.optim.AdamW`, learning-rate
//! schedules and gradient clipping (RUNTIME.md §2.10).
//!
//! A training step is: gradients → [`clip_grad_norm`] → `lr = schedule.lr_at(k)` →
//! [`AdamW::step`]. [`AdamW::save`] / [`AdamW::load`] keep the moments and step count in a
//! safetensors file for resumption.

pub mod adamw;
pub mod clip;
mod error;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use clip::clip_grad_norm;
pub use error::{OptimError, Result};
pub use schedule::{LrSchedule, Schedule};
