//! MLP exposure on the GPU engine (`lexp finetune --exposure mlp --device cuda`, DESIGN.md §7).
//!
//! The split of work:
//! - the **CPU** side is the exposed [`CpuEngine`] of [`super::exposed::cpu_engine_exposed`]:
//!   the exposer's neuron permutation, the predictors trained offline on dense forwards, and
//!   the guard's dense probes (every `probe_every` steps, on the f32 model with the current
//!   adapter: dense and sparse loss, per-layer recall, the mass targets' move, the predictors'
//!   refresh). Its hook holds the master copy of the predictors and targets;
//! - the **GPU** side is a [`GpuEngine`] on the same (permuted) model running every training
//!   step and evaluation sparse, with the predictors on the device
//!   ([`crate::gpu::MlpPredictors`]): prediction and selection run inside the forward and
//!   nothing is read back for them. After each probe the device copy is refreshed from the
//!   hook (weights and targets).
//!
//! What the run reports as MLP work kept is measured on the GPU's own lists: the lists of the
//! last training step before each probe or evaluation are read back (one synchronisation
//! then, not per step). The
//! recall next to it is the probes' (the CPU selection on the CPU's activations, which the GPU
//! test shows agrees with the device's on over 99% of decisions).
//!
//! The GPU runs blocks of 64 or 128 neurons in groups of 128 tokens, at most 64 blocks per
//! layer; LoRA on fc1/fc2 is refused with the sparse MLP, and BitFit with the permutation (fc1's
//! trained bias would be in the permuted order).

use super::engine::{CpuEngine, Engine, OptimStep, StepOutcome};
use crate::checkpoint::OptModel;
use crate::data::PackedBatch;
use crate::exposure::guard::ProbeReport;
use crate::exposure::selection::{budget_blocks, work_density};
use crate::exposure::sparse_mlp::{LayerCounters, SparseMlp};
use crate::gpu::{GpuEngine, MlpPredictors};
use crate::model::{DropoutRng, ModelError, Result, StepOutput};
use crate::optim::AdamW;
use crate::peft::PeftParams;
use crate::CudaDevice;

/// The GPU engine training with MLP exposure (see the module docs).
pub struct GpuExposedEngine {
    gpu: GpuEngine,
    cpu: CpuEngine,
    /// Neurons per block.
    block: usize,
    /// The grid bound: most blocks a group keeps.
    max_blocks: usize,
    /// Per layer: kept and all `(row, block)` work of the GPU lists sampled after training
    /// steps, and the probes' summed recall with their count.
    sampled: Vec<LayerCounters>,
    /// Whether the device's lists are a training step's not yet sampled.
    fresh: bool,
}

impl GpuExposedEngine {
    /// Wraps `cpu` (an exposed CPU engine with an MLP hook whose predictors are trained) and
    /// a GPU engine on `dev` running the same model.
    pub fn new(cpu: CpuEngine, dev: CudaDevice) -> Result<GpuExposedEngine> {
        let e = cpu
            .exposure()
            .ok_or_else(|| unsupported("the CPU engine runs no exposure"))?;
        if e.attention.is_some() {
            return Err(unsupported(
                "--exposure attention runs on the CPU engine only (use --device cpu)",
            ));
        }
        let hook = e.hook.as_ref().ok_or_else(|| unsupported("no MLP hook"))?;
        let c = hook.config();
        if c.group != crate::sparse_ops::GROUP_ROWS {
            return Err(unsupported(&format!(
                "--mlp-group {}: the GPU's sparse MLP groups {} tokens (use --mlp-group {})",
                c.group,
                crate::sparse_ops::GROUP_ROWS,
                crate::sparse_ops::GROUP_ROWS
            )));
        }
        let max_blocks = budget_blocks(hook.num_blocks(), c.budget);
        let layers = hook.layers();
        let gpu = GpuEngine::new(cpu.model().clone(), dev)?;
        let mut engine = GpuExposedEngine {
            gpu,
            block: c.block,
            max_blocks,
            cpu,
            sampled: vec![LayerCounters::default(); layers],
            fresh: false,
        };
        engine.upload()?;
        Ok(engine)
    }

    fn hook(&self) -> Result<&SparseMlp> {
        self.cpu
            .exposure()
            .and_then(|e| e.hook.as_ref())
            .ok_or_else(|| unsupported("no MLP hook"))
    }

    /// Copies the hook's predictors and mass targets to the device.
    fn upload(&mut self) -> Result<()> {
        let hook = self.hook()?;
        let p = MlpPredictors::new(
            self.gpu.device(),
            &hook.predictors(),
            self.block,
            &hook.targets(),
            self.max_blocks,
        )?;
        self.gpu.set_mlp_predictors(Some(p))
    }

    /// Refuses what the GPU cannot train with exposure correctly.
    fn check(&self, params: &PeftParams) -> Result<()> {
        let permuted = self.cpu.exposure().is_some_and(|e| e.permutation.is_some());
        if permuted && params.bitfit.is_some() {
            return Err(unsupported(
                "BitFit with a neuron permutation (MLP exposure with permute on): fc1's trained \
                 bias is not permuted; turn the permutation off",
            ));
        }
        Ok(())
    }

    /// Adds the GPU's lists to the sampled work counters when they are a training step's not
    /// yet sampled. Called before anything else runs a forward (a probe, an evaluation), so
    /// the sample is the last training step before each of them; it waits for the device.
    fn sample_lists(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.fresh) {
            return Ok(());
        }
        let f = self.gpu.model().config.ffn_dim;
        let Some(lists) = self.gpu.mlp_lists() else {
            return Ok(());
        };
        let rows = lists.t;
        for (l, c) in self.sampled.iter_mut().enumerate() {
            let mask = lists.mask(self.gpu.device(), l, f)?;
            c.kept_work += work_density(&mask, rows) * rows as f64;
            c.total_work += rows as f64;
        }
        Ok(())
    }
}

fn unsupported(what: &str) -> ModelError {
    ModelError::Unsupported(format!("MLP exposure on the GPU: {what}"))
}

impl Engine for GpuExposedEngine {
    fn name(&self) -> String {
        format!(
            "{} (MLP exposure, predictors on the device)",
            self.gpu.name()
        )
    }

    fn model(&self) -> &OptModel {
        self.gpu.model()
    }

    fn loss_and_grads(
        &mut self,
        lora: &PeftParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> Result<StepOutput> {
        self.check(lora)?;
        self.fresh = true;
        self.gpu.loss_and_grads(lora, batch, grad_scale, rng)
    }

    fn eval_loss(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        self.sample_lists()?;
        self.gpu.eval_loss(lora, batch)
    }

    fn optimizer_step(
        &mut self,
        lora: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
    ) -> Result<StepOutcome> {
        self.check(lora)?;
        self.fresh = true;
        self.gpu.optimizer_step(lora, adamw, step)
    }

    fn data_parallel_step(
        &mut self,
        comm: &mut dyn crate::dist::Communicator,
        lora: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
        extra: &mut [f64],
    ) -> Result<StepOutcome> {
        self.check(lora)?;
        self.fresh = true;
        self.gpu.data_parallel_step(comm, lora, adamw, step, extra)
    }

    fn last_comm_ms(&self) -> Option<f64> {
        self.gpu.last_comm_ms()
    }

    fn eval_share(&self) -> (usize, usize) {
        self.gpu.eval_share()
    }

    fn reduce_eval(&mut self, values: &mut [f64]) -> Result<()> {
        self.gpu.reduce_eval(values)
    }

    fn sync_optimizer(&mut self, adamw: &mut AdamW) -> Result<()> {
        self.gpu.sync_optimizer(adamw)
    }

    fn exposed(&self) -> bool {
        true
    }

    fn use_cuda_graphs(&mut self, on: bool) -> bool {
        self.gpu.set_cuda_graphs(on);
        true
    }

    fn save_state(&self, dir: &std::path::Path) -> Result<()> {
        self.cpu.save_state(dir)
    }

    fn load_state(&mut self, dir: &std::path::Path) -> Result<()> {
        self.cpu.load_state(dir)?;
        self.upload()
    }

    fn probe_every(&self) -> usize {
        self.cpu.probe_every()
    }

    fn probe(
        &mut self,
        lora: &PeftParams,
        batch: &PackedBatch,
        step: usize,
    ) -> Result<Option<ProbeReport>> {
        self.sample_lists()?;
        let report = self.cpu.probe(lora, batch, step)?;
        if let Some(r) = &report {
            for (c, l) in self.sampled.iter_mut().zip(&r.layers) {
                c.kept_mass += l.recall;
                c.total_mass += 1.0;
            }
        }
        // The guard moved the targets (and refreshed the predictors): the device follows.
        self.upload()?;
        Ok(report)
    }

    fn eval_loss_dense(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        self.sample_lists()?;
        let predictors = self.gpu.take_mlp_predictors();
        let out = self.gpu.eval_loss(lora, batch);
        self.gpu.set_mlp_predictors(predictors)?;
        out
    }

    fn exposure_totals(&self) -> Option<(Vec<LayerCounters>, Vec<f64>)> {
        let targets = self.hook().ok()?.targets();
        Some((self.sampled.clone(), targets))
    }
}
