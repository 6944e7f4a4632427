//! The data-parallel optimizer step on the host optimizer path, and [`DataParallel`], the
//! engine wrapper through which the trainer runs it (it calls
//! [`Engine::data_parallel_step`], which the GPU engine overrides to reduce its gradients on
//! the device).
//!
//! Every rank builds the same global step; each computes the loss and LoRA gradients of its
//! micro-batches ([`super::shard`]) with the gradient scale `1 / n`, `n` the targets of the
//! WHOLE step (known locally), so that the all-reduced sum is the gradient of the step's mean
//! loss. The loss sums are all-reduced with it; then every rank runs the same clipping and
//! AdamW on the same numbers, so the adapters stay identical without a broadcast.

use super::shard::rank_micro_batches;
use super::Communicator;
use crate::checkpoint::OptModel;
use crate::data::PackedBatch;
use crate::model::{DropoutRng, ModelError, Result, StepOutput};
use crate::optim::AdamW;
use crate::peft::PeftParams;
use crate::train::{apply_step, Engine, OptimStep, StepOutcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One data-parallel optimizer step of `comm`'s rank: the loss and gradients of this rank's
/// micro-batches of `step` on `engine`, the sum all-reduce of the flat gradients and of
/// `[loss_sum, extra…]` (on return `extra` holds its sum over the ranks: flags ride along
/// with no extra round trip), clipping and AdamW. With one rank this is
/// [`crate::train::host_optimizer_step`], bit for bit. A non-finite loss or gradient norm
/// skips the update on every rank alike.
pub fn data_parallel_step<E: Engine + ?Sized>(
    engine: &mut E,
    comm: &mut dyn Communicator,
    lora: &mut PeftParams,
    adamw: &mut AdamW,
    step: &OptimStep<'_>,
    extra: &mut [f64],
) -> Result<StepOutcome> {
    let n = step.targets()?;
    let scale = 1.0 / n as f32;
    let sizes: Vec<usize> = lora.tensors().iter().map(|(_, m)| m.data.len()).collect();
    let mut flat = vec![0f32; sizes.iter().sum()];
    let mut loss_sum = 0.0f64;
    for j in rank_micro_batches(step.batches.len(), comm.rank(), comm.world_size()) {
        let rng = step.dropout.and_then(|d| d.get(j).copied());
        let out = engine.loss_and_grads(lora, &step.batches[j], scale, rng)?;
        loss_sum += out.loss_sum;
        add_flat(&mut flat, &sizes, &out)?;
    }
    comm.all_reduce_sum(&mut flat).map_err(collective)?;
    let loss = reduce_loss_sum(comm, loss_sum, extra)? / n as f64;

    let mut grads: Vec<&mut [f32]> = Vec::with_capacity(sizes.len());
    let mut rest = flat.as_mut_slice();
    for &s in &sizes {
        let (g, r) = rest.split_at_mut(s);
        grads.push(g);
        rest = r;
    }
    Ok(apply_step(lora, adamw, &mut grads, loss, n, step))
}

/// A collective's failure as the model's error.
pub(crate) fn collective(e: super::DistError) -> ModelError {
    ModelError::Collective(e.to_string())
}

/// The sum over the ranks of this rank's `loss_sum`, with `extra` (flags, counts) summed in the
/// same all-reduce: on return `extra` holds its sums. Every data-parallel step ends with it.
pub(crate) fn reduce_loss_sum(
    comm: &mut dyn Communicator,
    loss_sum: f64,
    extra: &mut [f64],
) -> Result<f64> {
    let mut sums = Vec::with_capacity(1 + extra.len());
    sums.push(loss_sum);
    sums.extend_from_slice(extra);
    comm.all_reduce_sum_f64(&mut sums).map_err(collective)?;
    extra.copy_from_slice(&sums[1..]);
    Ok(sums[0])
}

/// Adds the gradients of `out` (in the adapter's canonical order) into `flat`.
fn add_flat(flat: &mut [f32], sizes: &[usize], out: &StepOutput) -> Result<()> {
    let parts = out.grads.flat();
    if parts.len() != sizes.len() || parts.iter().zip(sizes).any(|(p, &s)| p.len() != s) {
        return Err(ModelError::Adapter(format!(
            "the engine returned {} gradient tensors for an adapter of {}",
            parts.len(),
            sizes.len()
        )));
    }
    let mut off = 0;
    for p in parts {
        for (a, &b) in flat[off..off + p.len()].iter_mut().zip(p) {
            *a += b;
        }
        off += p.len();
    }
    Ok(())
}

/// An [`Engine`] that trains data-parallel: [`Engine::optimizer_step`] runs
/// [`data_parallel_step`] over the wrapped engine and a [`Communicator`]; an evaluation is
/// shared the same way (batch `j` on rank `j mod world_size`, the sums all-reduced, so every
/// rank sees the same mean). MLP exposure is not forwarded: its probes and counters are per
/// process, so a data-parallel run trains dense.
///
/// A stop request (SIGINT/SIGTERM on any rank) must stop every rank after the same step:
/// the local request rides along with the loss sums of each step, and
/// [`stop_agreed`](Self::stop_agreed) is set on every rank after the same step.
pub struct DataParallel {
    inner: Box<dyn Engine>,
    comm: Box<dyn Communicator>,
    local_stop: Arc<AtomicBool>,
    agreed_stop: Arc<AtomicBool>,
    warned_idle: bool,
    last_comm_ms: Option<f64>,
}

impl DataParallel {
    /// `inner` trained data-parallel over `comm`.
    pub fn new(inner: Box<dyn Engine>, comm: Box<dyn Communicator>) -> DataParallel {
        DataParallel {
            inner,
            comm,
            local_stop: Arc::new(AtomicBool::new(false)),
            agreed_stop: Arc::new(AtomicBool::new(false)),
            warned_idle: false,
            last_comm_ms: None,
        }
    }

    /// Takes stop requests of this process from `flag` (the CLI's signal flag).
    pub fn with_stop_request(mut self, flag: Arc<AtomicBool>) -> DataParallel {
        self.local_stop = flag;
        self
    }

    /// Set after the step in which some rank requested a stop: the same step on every rank
    /// (what the trainer's observer should answer to `should_stop`).
    pub fn stop_agreed(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.agreed_stop)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
}

impl Engine for DataParallel {
    fn name(&self) -> String {
        format!(
            "{}, data parallel: rank {} of {}",
            self.inner.name(),
            self.comm.rank(),
            self.comm.world_size()
        )
    }

    fn model(&self) -> &OptModel {
        self.inner.model()
    }

    fn loss_and_grads(
        &mut self,
        lora: &PeftParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> Result<StepOutput> {
        self.inner.loss_and_grads(lora, batch, grad_scale, rng)
    }

    fn eval_loss(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        self.inner.eval_loss(lora, batch)
    }

    fn optimizer_step(
        &mut self,
        lora: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
    ) -> Result<StepOutcome> {
        let world = self.comm.world_size();
        if step.batches.len() < world && !self.warned_idle {
            self.warned_idle = true;
            tracing::warn!(
                "a step has {} micro-batches for {world} workers: some workers compute nothing \
                 (lower --micro-batch-tokens or raise --batch to give each a share)",
                step.batches.len()
            );
        }
        let mut flags = [f64::from(u8::from(self.local_stop.load(Ordering::Relaxed)))];
        let out =
            self.inner
                .data_parallel_step(self.comm.as_mut(), lora, adamw, step, &mut flags)?;
        self.last_comm_ms = self.comm.take_comm_ms();
        if flags[0] > 0.0 {
            self.agreed_stop.store(true, Ordering::Relaxed);
        }
        Ok(out)
    }

    fn sync_optimizer(&mut self, adamw: &mut AdamW) -> Result<()> {
        self.inner.sync_optimizer(adamw)
    }

    /// The gradient all-reduce (timed by events on the device with NCCL) and the loss-sum
    /// reduction of the last step, when the communicator times them; it includes waiting for
    /// the slowest rank to arrive.
    fn last_comm_ms(&self) -> Option<f64> {
        self.last_comm_ms
    }

    fn eval_share(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world_size())
    }

    fn reduce_eval(&mut self, values: &mut [f64]) -> Result<()> {
        self.comm.all_reduce_sum_f64(values).map_err(collective)
    }

    fn eval_loss_dense(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        self.inner.eval_loss_dense(lora, batch)
    }
}
