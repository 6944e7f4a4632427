//! [`Engine`]: what the training loop needs from a device — the loss and PEFT gradients of a
//! packed micro-batch, and the loss alone for evaluation. [`CpuEngine`] runs the reference
//! model of [`crate::model`]; a GPU engine implements the same trait, so the loop, its
//! checkpoints and its metrics are shared.

use crate::checkpoint::OptModel;
use crate::data::PackedBatch;
use crate::exposure::attention::{self as attn, sparse::SparseAttention};
use crate::exposure::guard::{self, GuardConfig, ProbeReport};
use crate::exposure::permutation::NeuronPermutation;
use crate::exposure::sparse_mlp::{LayerCounters, Mode, SparseMlp};
use crate::model::{self, DropoutRng, ModelError, Result, StepOutput};
use crate::optim::{clip_grad_norm, AdamW};
use crate::peft::{LoraTarget, PeftParams};
use std::borrow::Cow;
use std::path::Path;

/// The inputs of one optimizer step: its micro-batches, their dropout, the learning rate and
/// the clipping limit.
#[derive(Clone, Copy, Debug)]
pub struct OptimStep<'a> {
    /// The micro-batches whose gradients are summed (each weighted by `1 / all targets`).
    pub batches: &'a [PackedBatch],
    /// Dropout: one seed per micro-batch (`None`: no dropout).
    pub dropout: Option<&'a [DropoutRng]>,
    /// Learning rate of this step (after the schedule).
    pub lr: f32,
    /// Global-norm clipping limit (`torch.nn.utils.clip_grad_norm_`; not positive: off).
    pub max_grad_norm: f32,
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Mean loss over the step's targets.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Loss targets of the step.
    pub targets: usize,
    /// Whether AdamW updated the adapter (`false`: non-finite loss or gradients, skipped).
    pub applied: bool,
}

impl OptimStep<'_> {
    /// Loss targets over all micro-batches; an error when there are none (the mean loss and
    /// the gradient scale `1 / targets` would be undefined).
    pub fn targets(&self) -> Result<usize> {
        if let Some(d) = self.dropout.filter(|d| d.len() != self.batches.len()) {
            return Err(ModelError::Batch(format!(
                "{} dropout seeds for {} micro-batches",
                d.len(),
                self.batches.len()
            )));
        }
        let n: usize = self.batches.iter().map(PackedBatch::num_targets).sum();
        if n == 0 {
            return Err(ModelError::Batch(
                "the optimizer step has no loss targets".into(),
            ));
        }
        Ok(n)
    }
}

/// One optimizer step on the host: `loss_and_grads` per micro-batch (gradients summed on the
/// host), [`clip_grad_norm`], [`AdamW::step`]. A step whose loss or gradient norm is not
/// finite is skipped: neither `lora` nor `adamw` changes. This is [`Engine::optimizer_step`]'s
/// default and the reference a device implementation must agree with.
pub fn host_optimizer_step<E: Engine + ?Sized>(
    engine: &mut E,
    lora: &mut PeftParams,
    adamw: &mut AdamW,
    step: &OptimStep<'_>,
) -> Result<StepOutcome> {
    let n = step.targets()?;
    let scale = 1.0 / n as f32;
    let mut total: Option<model::PeftGrads> = None;
    let mut loss_sum = 0.0;
    for (micro, b) in step.batches.iter().enumerate() {
        let rng = step.dropout.and_then(|d| d.get(micro).copied());
        let out = engine.loss_and_grads(lora, b, scale, rng)?;
        loss_sum += out.loss_sum;
        match &mut total {
            Some(t) => t.accumulate(&out.grads),
            None => total = Some(out.grads),
        }
    }
    let mut grads = total.ok_or_else(|| ModelError::Batch("the step has no batches".into()))?;
    let mut flat = grads.flat_mut();
    Ok(apply_step(
        lora,
        adamw,
        &mut flat,
        loss_sum / n as f64,
        n,
        step,
    ))
}

/// The end of a host optimizer step, given the step's summed gradients `grads` (in the
/// adapter's canonical order), its mean loss and its target count: [`clip_grad_norm`], then
/// [`AdamW::step`] on `lora` unless the loss or the gradient norm is not finite (the step is
/// then skipped). Shared by [`host_optimizer_step`] and the data-parallel step.
pub fn apply_step(
    lora: &mut PeftParams,
    adamw: &mut AdamW,
    grads: &mut [&mut [f32]],
    loss: f64,
    targets: usize,
    step: &OptimStep<'_>,
) -> StepOutcome {
    let grad_norm = clip_grad_norm(grads, step.max_grad_norm);
    let outcome = StepOutcome {
        loss,
        grad_norm,
        targets,
        applied: loss.is_finite() && grad_norm.is_finite(),
    };
    if outcome.applied {
        let grads_ro: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        let mut params: Vec<&mut [f32]> = lora
            .tensors_mut()
            .into_iter()
            .map(|(_, m)| m.data.as_mut_slice())
            .collect();
        adamw.step(&mut params, &grads_ro, step.lr);
    }
    outcome
}

/// A device that runs training steps of one model.
pub trait Engine {
    /// Human-readable name (`cpu (16 threads)`, `NVIDIA H200`), for messages.
    fn name(&self) -> String;

    /// The model (config and host weights) this engine runs.
    fn model(&self) -> &OptModel;

    /// Loss of `batch` under `lora` (any PEFT methods) and the host-side gradients of
    /// `grad_scale · loss_sum`, laid out like `lora` ([`model::PeftGrads`]). `rng` switches
    /// dropout on. `lora` may differ from the previous call (the optimizer updated it).
    fn loss_and_grads(
        &mut self,
        lora: &PeftParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> Result<StepOutput>;

    /// Sum of the per-target losses of `batch` and their number (no dropout, no gradients).
    fn eval_loss(&mut self, lora: Option<&PeftParams>, batch: &PackedBatch)
        -> Result<(f64, usize)>;

    /// One optimizer step: the gradients of the mean loss over `step`'s micro-batches,
    /// clipping, AdamW on `lora` — the step `lexp finetune` and `lexp bench step` take.
    /// A non-finite loss or gradient norm skips the update. On return `lora` holds the
    /// updated adapter; an engine that runs AdamW on its device may keep the moments there
    /// ([`AdamW::record_device_step`]) until [`sync_optimizer`](Self::sync_optimizer); while
    /// it does, the device's LoRA and adapter values are the current ones and changes made to
    /// them in `lora` on the host are not seen (the trainer never makes any). The default runs [`host_optimizer_step`].
    fn optimizer_step(
        &mut self,
        lora: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
    ) -> Result<StepOutcome> {
        host_optimizer_step(self, lora, adamw, step)
    }

    /// This rank's part of a data-parallel optimizer step over `comm`: the gradients of this
    /// rank's micro-batches of `step` ([`crate::dist::shard`]), their sum over the ranks, then
    /// the same clipping and AdamW on every rank; `extra` is summed over the ranks alongside
    /// the loss (flags riding along). The default is the host path,
    /// [`crate::dist::data_parallel_step`]; an engine whose gradients live on a device reduces
    /// them there when `comm` has [`crate::dist::DeviceCollectives`].
    fn data_parallel_step(
        &mut self,
        comm: &mut dyn crate::dist::Communicator,
        lora: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
        extra: &mut [f64],
    ) -> Result<StepOutcome> {
        crate::dist::data_parallel_step(self, comm, lora, adamw, step, extra)
    }

    /// Milliseconds the last optimizer step spent in collectives (a data-parallel engine whose
    /// communicator times them); `None` otherwise.
    fn last_comm_ms(&self) -> Option<f64> {
        None
    }

    /// The share of an evaluation's batches this engine computes, `(index, of)`: batch `j` is
    /// its when `j mod of == index` (a data-parallel rank: its rank and the world size); all
    /// of them, `(0, 1)`, by default. [`reduce_eval`](Self::reduce_eval) sums the shares.
    fn eval_share(&self) -> (usize, usize) {
        (0, 1)
    }

    /// Sums `values` (an evaluation's loss sum and target count) over the engines that share
    /// the evaluation ([`eval_share`](Self::eval_share)); the identity by default.
    fn reduce_eval(&mut self, values: &mut [f64]) -> Result<()> {
        let _ = values;
        Ok(())
    }

    /// Hands AdamW's moments back to `adamw` when this engine keeps them on its device (before
    /// a checkpoint); nothing to do otherwise.
    fn sync_optimizer(&mut self, adamw: &mut AdamW) -> Result<()> {
        let _ = adamw;
        Ok(())
    }

    /// Runs micro-batches as CUDA graphs where their shapes repeat (the GPU engine,
    /// [`crate::gpu::GpuEngine::set_cuda_graphs`]); returns whether this engine can. Results
    /// do not change, only how the work is launched. No by default.
    fn use_cuda_graphs(&mut self, on: bool) -> bool {
        let _ = on;
        false
    }

    /// Writes this engine's own training state that a resume needs into the checkpoint
    /// directory `dir` (MLP exposure: the predictors and mass targets,
    /// [`crate::exposure::state`]); nothing by default.
    fn save_state(&self, dir: &Path) -> Result<()> {
        let _ = dir;
        Ok(())
    }

    /// Restores what [`save_state`](Self::save_state) wrote in `dir` (a resume); nothing by
    /// default.
    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let _ = dir;
        Ok(())
    }

    /// Whether this engine runs exposure (sparse MLPs or sparse attention, DESIGN.md §7); then
    /// the trainer probes every [`probe_every`](Self::probe_every) steps and evaluates dense as
    /// well.
    fn exposed(&self) -> bool {
        false
    }

    /// Steps between the guard's dense probes (0: none).
    fn probe_every(&self) -> usize {
        0
    }

    /// The guard's dense probe on `batch` after `step` steps ([`guard::probe`]); `None` when
    /// the engine runs no exposure.
    fn probe(
        &mut self,
        lora: &PeftParams,
        batch: &PackedBatch,
        step: usize,
    ) -> Result<Option<ProbeReport>> {
        let _ = (lora, batch, step);
        Ok(None)
    }

    /// [`eval_loss`](Self::eval_loss) with every MLP and attention dense (the same when not
    /// exposed).
    fn eval_loss_dense(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        self.eval_loss(lora, batch)
    }

    /// Per-layer totals of the training steps' MLP selections (`None` without MLP exposure)
    /// and the current mass targets.
    fn exposure_totals(&self) -> Option<(Vec<LayerCounters>, Vec<f64>)> {
        None
    }

    /// Per-layer totals of the training steps' attention selections (kept and causal key
    /// blocks; `None` without attention exposure) and the current mass targets.
    fn attention_totals(&self) -> Option<(Vec<LayerCounters>, Vec<f64>)> {
        None
    }
}

/// Exposure on the CPU engine: the hooks and the guard's settings.
pub struct CpuExposure {
    /// MLP exposure: predictors, selection and counters (`None`: dense MLPs).
    pub hook: Option<SparseMlp>,
    /// Attention exposure: key-block predictors, selection and counters (`None`: dense
    /// attention). With both hooks the guard probes the MLP's only.
    pub attention: Option<SparseAttention>,
    /// Probe cadence, gap budget and the controller's settings.
    pub guard: GuardConfig,
    /// The exposer's neuron permutation the engine's model carries (DESIGN.md §7 step 2), if
    /// any. Adapters and gradients cross the engine boundary in the checkpoint's original
    /// neuron order; the engine permutes fc1/fc2 adapters on the way in and their gradients
    /// on the way out, so the trainer, its checkpoints, AdamW's moments and every export
    /// never see the permuted order.
    pub permutation: Option<NeuronPermutation>,
}

impl CpuExposure {
    /// The hooks the model's forward passes see.
    fn hooks(&self) -> model::Exposure<'_> {
        model::Exposure {
            mlp: self.hook.as_ref().map(|h| h as &dyn model::MlpHook),
            attention: self
                .attention
                .as_ref()
                .map(|h| h as &dyn model::AttentionHook),
        }
    }

    /// Puts every hook in `mode`.
    fn set_mode(&self, mode: Mode) {
        if let Some(h) = &self.hook {
            h.set_mode(mode);
        }
        if let Some(h) = &self.attention {
            h.set_mode(mode);
        }
    }

    /// `params` in the model's (permuted) neuron order: a permuted copy when the permutation
    /// touches them (LoRA on fc1 or fc2), else `params` themselves. BitFit with a permutation
    /// is refused: fc1's trained bias would have to be permuted as well, which is not done.
    fn internal<'a>(&self, params: &'a PeftParams) -> Result<Cow<'a, PeftParams>> {
        let Some(p) = &self.permutation else {
            return Ok(Cow::Borrowed(params));
        };
        if params.bitfit.is_some() {
            return Err(ModelError::Unsupported(
                "BitFit with a neuron permutation (MLP exposure with permute on): fc1's \
                 trained bias is not permuted; turn the permutation off"
                    .into(),
            ));
        }
        match &params.lora {
            Some(lora) if touches(params) => {
                let mut l = lora.clone();
                p.apply_to_lora(&mut l)
                    .map_err(|e| ModelError::Batch(format!("neuron permutation: {e}")))?;
                Ok(Cow::Owned(PeftParams {
                    lora: Some(l),
                    ..params.clone()
                }))
            }
            _ => Ok(Cow::Borrowed(params)),
        }
    }
}

/// Whether `params` adapt a projection whose hidden side the neuron permutation reorders.
fn touches(params: &PeftParams) -> bool {
    params.lora.as_ref().is_some_and(|l| {
        l.config
            .targets
            .iter()
            .any(|t| matches!(t, LoraTarget::Fc1 | LoraTarget::Fc2))
    })
}

/// The CPU reference backend ([`crate::cpu`] ops, f32), optionally with MLP or attention
/// exposure.
pub struct CpuEngine {
    model: OptModel,
    exposure: Option<CpuExposure>,
}

impl CpuEngine {
    /// An engine for `model`.
    pub fn new(model: OptModel) -> CpuEngine {
        CpuEngine {
            model,
            exposure: None,
        }
    }

    /// An engine for `model` whose training steps run the MLPs and/or the attention sparse
    /// through `exposure`'s hooks (their predictors should be trained already:
    /// [`crate::exposure::sparse_mlp::train_offline`],
    /// [`crate::exposure::attention::corpus::train_offline`]).
    pub fn with_exposure(model: OptModel, exposure: CpuExposure) -> CpuEngine {
        exposure.set_mode(Mode::Sparse);
        CpuEngine {
            model,
            exposure: Some(exposure),
        }
    }

    /// The exposure, if any.
    pub fn exposure(&self) -> Option<&CpuExposure> {
        self.exposure.as_ref()
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
        lora: &PeftParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> Result<StepOutput> {
        let masks = rng.as_ref().map(|r| r as &dyn model::MaskSource);
        let Some(e) = &self.exposure else {
            return model::loss_and_grads(&self.model, lora, batch, grad_scale, rng);
        };
        let internal = e.internal(lora)?;
        let mut out = model::loss_and_grads_exposed(
            &self.model,
            &internal,
            batch,
            grad_scale,
            masks,
            e.hooks(),
        )?;
        if let (Some(p), true) = (&e.permutation, touches(lora)) {
            p.undo_grads(&mut out.grads)
                .map_err(|e| ModelError::Batch(format!("neuron permutation: {e}")))?;
        }
        Ok(out)
    }

    fn eval_loss(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        let Some(e) = &self.exposure else {
            return model::eval_loss(&self.model, lora, batch);
        };
        let internal = lora.map(|l| e.internal(l)).transpose()?;
        e.set_mode(Mode::Measure);
        let fwd = model::forward_exposed(
            &self.model,
            internal.as_deref(),
            batch,
            None,
            e.hooks(),
            false,
        );
        e.set_mode(Mode::Sparse);
        let out = model::opt::head_loss(&self.model, &fwd?, &batch.targets, None)?;
        Ok((out.loss_sum, out.count))
    }

    fn exposed(&self) -> bool {
        self.exposure.is_some()
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        match self.exposure.as_ref().and_then(|e| e.hook.as_ref()) {
            Some(hook) => {
                crate::exposure::state::save(&dir.join(crate::exposure::state::FILE), hook).map_err(
                    |e| ModelError::Unsupported(format!("saving MLP exposure's state: {e}")),
                )
            }
            None => Ok(()),
        }
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let Some(hook) = self.exposure.as_ref().and_then(|e| e.hook.as_ref()) else {
            return Ok(());
        };
        let path = dir.join(crate::exposure::state::FILE);
        if !path.exists() {
            // A checkpoint written before the state was saved: the predictors stay as trained
            // offline, the targets at their start (the resumed run is then not exact).
            tracing::warn!(
                "{} has no {}: MLP exposure restarts from the offline predictors",
                dir.display(),
                crate::exposure::state::FILE
            );
            return Ok(());
        }
        crate::exposure::state::load(&path, hook)
            .map_err(|e| ModelError::Unsupported(format!("restoring MLP exposure's state: {e}")))
    }

    fn probe_every(&self) -> usize {
        self.exposure.as_ref().map_or(0, |e| e.guard.probe_every)
    }

    fn probe(
        &mut self,
        lora: &PeftParams,
        batch: &PackedBatch,
        step: usize,
    ) -> Result<Option<ProbeReport>> {
        let Some(e) = &self.exposure else {
            return Ok(None);
        };
        let l = e.internal(lora)?;
        if let Some(hook) = &e.hook {
            return guard::probe(&e.guard, &self.model, Some(&l), batch, hook, step).map(Some);
        }
        let Some(hook) = &e.attention else {
            return Ok(None);
        };
        let model = &self.model;
        attn::guard::probe(&e.guard, hook, step, |h| {
            let hooks = model::Exposure {
                mlp: None,
                attention: Some(h),
            };
            let fwd = model::forward_exposed(model, Some(&l), batch, None, hooks, false)?;
            let out = model::opt::head_loss(model, &fwd, &batch.targets, None)?;
            Ok(out.loss_sum / out.count.max(1) as f64)
        })
        .map(Some)
    }

    fn eval_loss_dense(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        let internal = match (&self.exposure, lora) {
            (Some(e), Some(l)) => Some(e.internal(l)?),
            _ => lora.map(Cow::Borrowed),
        };
        model::eval_loss(&self.model, internal.as_deref(), batch)
    }

    fn exposure_totals(&self) -> Option<(Vec<LayerCounters>, Vec<f64>)> {
        let h = self.exposure.as_ref()?.hook.as_ref()?;
        Some((h.train_totals(), h.targets()))
    }

    fn attention_totals(&self) -> Option<(Vec<LayerCounters>, Vec<f64>)> {
        let h = self.exposure.as_ref()?.attention.as_ref()?;
        Some((h.train_totals(), h.targets()))
    }
}
