//! [`Engine`]: what the training loop needs from a device — the loss and LoRA gradients of a
//! packed micro-batch, and the loss alone for evaluation. [`CpuEngine`] runs the reference
//! model of [`crate::model`]; a GPU engine implements the same trait, so the loop, its
//! checkpoints and its metrics are shared.

use crate::checkpoint::OptModel;
use crate::data::PackedBatch;
use crate::model::{self, DropoutRng, Result, StepOutput};
use crate::peft::LoraParams;

/// A device that runs training steps of one model.
pub trait Engine {
    /// Human-readable name (`cpu (16 threads)`, `NVIDIA H200`), for messages.
    fn name(&self) -> String;

    /// The model (config and host weights) this engine runs.
    fn model(&self) -> &OptModel;

    /// Loss of `batch` under `lora` and the host-side LoRA gradients of
    /// `grad_scale · loss_sum`, laid out like `lora` ([`model::LoraGrads`]). `rng` switches
    /// dropout on. `lora` may differ from the previous call (the optimizer updated it).
    fn loss_and_grads(
        &mut self,
        lora: &LoraParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> Result<StepOutput>;

    /// Sum of the per-target losses of `batch` and their number (no dropout, no gradients).
    fn eval_loss(&mut self, lora: Option<&LoraParams>, batch: &PackedBatch)
        -> Result<(f64, usize)>;
}

/// The CPU reference backend ([`crate::cpu`] ops, f32).
pub struct CpuEngine {
    model: OptModel,
}

impl CpuEngine {
    /// An engine for `model`.
    pub fn new(model: OptModel) -> CpuEngine {
        CpuEngine { model }
    }
}

impl Engine for CpuEngine {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn model(&self) -> &OptModel {
        &self.model
    }

    fn loss_and_grads(
        &mut self,
        lora: &LoraParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> Result<StepOutput> {
        model::loss_and_grads(&self.model, lora, batch, grad_scale, rng)
    }

    fn eval_loss(
        &mut self,
        lora: Option<&LoraParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        model::eval_loss(&self.model, lora, batch)
    }
}
