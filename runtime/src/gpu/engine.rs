//! [`GpuEngine`]: the training model of [`crate::model`] on one CUDA GPU, behind the
//! [`Engine`] trait the training loop drives.
//!
//! One call (`loss_and_grads` or `eval_loss`) uploads the batch (ids, positions, the targets
//! of the rows that have one) and the LoRA parameters, queues the whole forward, loss and
//! backward on the device's stream, and ends with one download of the per-row losses and the
//! f32 LoRA gradients: no host synchronisation in between. The training loop's
//! `optimizer_step` keeps the gradients on the device instead: micro-batches add into one
//! buffer and AdamW runs there ([`super::optimizer`]); per micro-batch only its losses are
//! read back.
//!
//! The LM head works on the rows with a target only (gathered by contiguous runs, which a
//! completion-only batch has one of per sequence), `LOSS_CHUNK` rows at a time: f32 logits
//! `h·Eᵀ`, the cross-entropy kernel turns them into `dz` in place, `dz` is rounded to bf16
//! (cuBLAS takes both inputs of one type, and an f32 copy of `E` would cost more memory and
//! a slower f32 GEMM), and `dh = dz·E` is scattered back into the rows' gradient.

use super::attention::{self, flash_kernels_for, AttentionImpl, BlockPlan};
use super::bitfit::{self, DeviceBitFit};
use super::dropout::{DropCtx, MaskLayout};
use super::graph::{GraphKey, StepGraph};
use super::houlsby::DeviceHoulsby;
use super::layer::{self, segments, Ctx, Grads, Segment};
use super::lora::DeviceLora;
use super::ops::{
    arg, arg_at, copy_rows, dense, dense_mut, dev_err, download_f32, embedding, layernorm,
    layernorm_bwd, mm, upload_prefix, xent, R,
};
use super::optimizer::{self, DeviceAdamW, FlatLayout, PartBuffers};
use super::predictor::MlpPredictors;
use super::rng::GpuRng;
use super::sparse_attention::{AttnLists, SyntheticAttention};
use super::sparse_mlp::{MlpLists, MlpSource, SyntheticMlp};
use super::weights::{self, DeviceWeights};
use super::workspace::{Caps, Dims, Workspace, LOSS_CHUNK};
use crate::buffer::DeviceTensor;
use crate::checkpoint::OptModel;
use crate::cublas::{Blas, Mat, MatLayout, MatMut};
use crate::data::{PackedBatch, IGNORE_INDEX};
use crate::device::CudaDevice;
use crate::dist::shard::rank_micro_batches;
use crate::dist::step::{collective, reduce_loss_sum};
use crate::dist::Communicator;
use crate::model::opt::{check_adapters, check_batch, check_lora};
use crate::model::{DropoutRng, ModelError, PeftGrads, RecordedMasks, Result, StepOutput};
use crate::optim::AdamW;
use crate::peft::{BitFitParams, HoulsbyParams, LoraParams, LoraTarget, PeftParams};
use crate::train::{Engine, OptimStep, StepOutcome};
use lexp_compiler::launch::Launcher;

/// Captured micro-batch graphs kept at once ([`GpuEngine::set_cuda_graphs`]).
const MAX_GRAPHS: usize = 4;

/// Token capacities grow in steps of this many tokens (fewer re-allocations as batch sizes
/// vary).
const TOKEN_STEP: usize = 256;

/// The OPT + LoRA training model on one GPU (see the [module docs](super)).
pub struct GpuEngine {
    model: OptModel,
    dev: CudaDevice,
    blas: Blas,
    weights: DeviceWeights,
    dims: Dims,
    ws: Option<Workspace>,
    lora: Option<DeviceLora>,
    /// BitFit's gradient buffers, once a call trained biases.
    bitfit: Option<DeviceBitFit>,
    /// Whether `weights` hold BitFit's trained biases (else the base model's).
    trained_biases: bool,
    /// Houlsby adapters' device state, once a call had adapters.
    houlsby: Option<DeviceHoulsby>,
    /// Whether the current call runs the Houlsby adapters.
    houlsby_on: bool,
    /// cuRAND, created at the first step with dropout.
    rng: Option<GpuRng>,
    /// Tokens and mask layout of the last step that drew dropout masks (for
    /// [`GpuEngine::last_masks`]).
    last_drop: Option<(usize, MaskLayout)>,
    /// The attention implementation.
    attention: AttentionImpl,
    /// AdamW's state, once [`Engine::optimizer_step`] ran.
    adam: Option<DeviceAdamW>,
    /// Whether the device's LoRA and adapter parameters are the optimizer's last update
    /// (nothing uploaded since), so that the next device step need not upload them.
    params_from_optimizer: bool,
    /// Where the sparse MLP's block lists come from (`None`: dense MLP).
    mlp_source: Option<MlpSource>,
    /// The lists of the last batch shape, from `mlp_source`.
    mlp_lists: Option<MlpLists>,
    /// Random block-sparse attention masks in place of an attention predictor.
    synthetic_attention: Option<SyntheticAttention>,
    /// The lists of the last batch's sequences, made from `synthetic_attention`.
    attn_lists: Option<AttnLists>,
    /// Whether micro-batches run as CUDA graphs ([`GpuEngine::set_cuda_graphs`]).
    cuda_graphs: bool,
    /// The captured micro-batches, the most recently launched last (at most [`MAX_GRAPHS`]:
    /// a training step and an evaluation alternate without recapturing).
    graphs: Vec<StepGraph>,
    /// The keys of the last calls that could have been graphs and ran directly (at most
    /// [`MAX_GRAPHS`]; a key seen again is captured, also when micro-batches of two layouts
    /// alternate).
    graph_seen: Vec<GraphKey>,
    /// Graphs captured so far.
    graph_captures: u64,
}

/// A batch checked and uploaded.
struct Prepared {
    t: usize,
    segs: Vec<Segment>,
    /// Contiguous runs `(first row, rows)` of rows with a target.
    runs: Vec<(usize, usize)>,
    /// Rows with a target.
    n: usize,
}

/// Contiguous runs of rows whose target is not ignored.
fn target_runs(targets: &[i32]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, &y) in targets.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        match runs.last_mut() {
            Some((s, n)) if *s + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

fn i32_bytes(v: impl Iterator<Item = i32>) -> Vec<u8> {
    v.flat_map(i32::to_le_bytes).collect()
}

impl GpuEngine {
    /// Uploads `model`'s frozen weights to `device` in bf16.
    ///
    /// Refuses with [`ModelError::Unsupported`] what the GPU path does not implement
    /// (post-LN, `project_in`/`project_out`, non-ReLU, a GPU before compute capability 8.0);
    /// reports a missing cuBLAS or too little memory as [`ModelError::Device`] with the
    /// numbers.
    pub fn new(model: OptModel, device: CudaDevice) -> Result<GpuEngine> {
        weights::check_supported(&model)?;
        if device.arch().is_none() {
            let (major, minor) = device.compute_capability();
            return Err(ModelError::Unsupported(format!(
                "{} has compute capability {major}.{minor}; the GPU engine needs 8.0 or newer",
                device.name()
            )));
        }
        let blas = Blas::new(&device).map_err(dev_err("cuBLAS"))?;
        let need = weights::device_bytes(&model);
        let (free, total) = device.mem_info().map_err(dev_err("querying GPU memory"))?;
        if need > free {
            return Err(ModelError::Device(format!(
                "out of GPU memory: the model's weights need {} MiB in bf16, but only {} MiB \
                 of {} MiB are free on {}",
                need >> 20,
                free >> 20,
                total >> 20,
                device.name()
            )));
        }
        let weights = DeviceWeights::upload(&device, &model)?;
        let dims = Dims::of(&model.config);
        tracing::info!(
            device = device.name(),
            weights_mib = need >> 20,
            "GPU engine ready"
        );
        Ok(GpuEngine {
            model,
            dev: device,
            blas,
            weights,
            dims,
            ws: None,
            lora: None,
            bitfit: None,
            trained_biases: false,
            houlsby: None,
            houlsby_on: false,
            rng: None,
            last_drop: None,
            attention: AttentionImpl::default_for(dims.hd),
            adam: None,
            params_from_optimizer: false,
            mlp_source: None,
            mlp_lists: None,
            synthetic_attention: None,
            attn_lists: None,
            cuda_graphs: false,
            graphs: Vec::new(),
            graph_seen: Vec::new(),
            graph_captures: 0,
        })
    }

    /// Runs attention with `imp` instead of the default for this model (flash where its
    /// kernels take the head dimension); refuses an implementation that cannot run it.
    pub fn set_attention(&mut self, imp: AttentionImpl) -> Result<()> {
        let imp = imp.check(self.dims.hd)?;
        if imp != self.attention {
            self.ws = None;
            self.graphs.clear();
            self.attention = imp;
        }
        Ok(())
    }

    /// Runs every layer's MLP on the block-sparse kernels over *random* block lists at
    /// `s.density` (`None`: the dense MLP): a synthetic predictor for measuring the sparse
    /// operators inside the step ([`super::sparse_mlp`]). Its losses are not a model's.
    pub fn set_synthetic_mlp(&mut self, s: Option<SyntheticMlp>) -> Result<()> {
        if let Some(s) = &s {
            s.check(self.dims.f)?;
        }
        self.mlp_source = s.map(MlpSource::Synthetic);
        self.mlp_lists = None;
        self.graphs.clear();
        Ok(())
    }

    /// Runs every layer's MLP on the block-sparse kernels over the blocks that `p`, the
    /// predictors on the device, select in each forward ([`super::predictor`]); `None`: the
    /// dense MLP. Replaces synthetic lists.
    pub fn set_mlp_predictors(&mut self, p: Option<MlpPredictors>) -> Result<()> {
        if let Some(p) = &p {
            let d = &self.dims;
            if p.layers() != d.layers || p.num_blocks * p.block != d.f || p.rank() > d.h {
                return Err(ModelError::Unsupported(format!(
                    "MLP predictors for {} layers of {} blocks of {} (rank {}); the model has {} \
                     layers of width {} and hidden size {}",
                    p.layers(),
                    p.num_blocks,
                    p.block,
                    p.rank(),
                    d.layers,
                    d.f,
                    d.h
                )));
            }
        }
        self.mlp_source = p.map(MlpSource::Predicted);
        self.mlp_lists = None;
        self.graphs.clear();
        Ok(())
    }

    /// Takes the device predictors out (the MLP runs dense until they are set again with
    /// [`Self::set_mlp_predictors`]; nothing is re-uploaded).
    pub fn take_mlp_predictors(&mut self) -> Option<MlpPredictors> {
        match self.mlp_source.take() {
            Some(MlpSource::Predicted(p)) => {
                self.mlp_lists = None;
                self.graphs.clear();
                Some(p)
            }
            other => {
                self.mlp_source = other;
                None
            }
        }
    }

    /// The device predictors, to move their mass targets (the guard's auto-exposure).
    pub fn mlp_predictors_mut(&mut self) -> Option<&mut MlpPredictors> {
        // The targets are arguments of the captured launches.
        self.graphs.clear();
        match &mut self.mlp_source {
            Some(MlpSource::Predicted(p)) => Some(p),
            _ => None,
        }
    }

    /// Runs every layer's attention on the block-sparse kernels over *random* masks at
    /// `s.density` of the causal blocks (`None`: dense): a synthetic predictor for measuring
    /// block-sparse attention inside the step ([`super::sparse_attention`]). Its losses are not
    /// a model's. Needs the flash implementation.
    pub fn set_synthetic_attention(&mut self, s: Option<SyntheticAttention>) -> Result<()> {
        if let Some(s) = &s {
            s.check(self.dims.hd)?;
            if self.attention != AttentionImpl::Flash {
                return Err(ModelError::Unsupported(
                    "block-sparse attention runs on the flash kernels (--attention flash)".into(),
                ));
            }
        }
        self.synthetic_attention = s;
        self.attn_lists = None;
        self.graphs.clear();
        Ok(())
    }

    /// Runs each micro-batch's forward and backward as a CUDA graph ([`super::graph`]): a
    /// shape runs directly the first time, is captured the second time, and is launched in one
    /// call whenever it repeats (e.g. `lexp bench step`, which steps on one batch). Only for
    /// LoRA (or no adapters) without dropout; other calls run as before.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
        self.graphs.clear();
    }

    /// `(graphs captured, launches of the most recently launched graph)`.
    pub fn graph_stats(&self) -> (u64, u64) {
        (
            self.graph_captures,
            self.graphs.last().map_or(0, |g| g.launches),
        )
    }

    /// What the captured graph of this call would depend on, or `None` when this call cannot
    /// run as a graph (graphs off, dropout, BitFit or Houlsby adapters, block-sparse attention
    /// lists, the profiler on).
    fn graph_key(
        &self,
        p: &Prepared,
        lora: Option<&LoraParams>,
        grad_scale: Option<f32>,
        dropout: bool,
    ) -> Option<GraphKey> {
        if !self.cuda_graphs
            || dropout
            || self.trained_biases
            || self.houlsby_on
            || self.attn_lists.is_some()
            || self.dev.profiler().is_on()
        {
            return None;
        }
        let ws = self.ws.as_ref()?;
        let mut buffers = vec![
            ws.layers.first()?.x.device_ptr(),
            ws.scratch.tmp.device_ptr(),
            ws.head.loss.device_ptr(),
            ws.scratch.blocks.fwd.device_ptr(),
        ];
        if let (Some(d), Some(_)) = (&self.lora, lora) {
            buffers.extend(d.buffer_ptrs());
        }
        if let Some(m) = &self.mlp_lists {
            buffers.extend((0..self.dims.layers).map(|l| m.layer(l).counts().device_ptr()));
        }
        let settings = match &self.mlp_source {
            Some(MlpSource::Predicted(pr)) => format!("{:?}", pr.targets()),
            _ => String::new(),
        };
        Some(GraphKey {
            t: p.t,
            segs: p.segs.clone(),
            runs: p.runs.clone(),
            grad_scale: grad_scale.map(f32::to_bits),
            lora: lora.map(|l| (l.config.r, format!("{:?}", l.config))),
            buffers,
            caps: format!("{:?}", ws.caps),
            settings,
        })
    }

    /// [`Self::enqueue`] as a CUDA graph when this call can be one (captured now unless the
    /// last graph has the same key), else directly; then the loss sum.
    fn run(
        &mut self,
        p: &Prepared,
        lora: Option<&LoraParams>,
        grad_scale: Option<f32>,
        drop: Option<(u64, MaskLayout)>,
    ) -> R<f64> {
        let with_lora = lora.is_some();
        let key = self.graph_key(p, lora, grad_scale, drop.is_some());
        // A shape runs directly the first time it is seen, so that whatever is set up lazily
        // on first use (cuBLAS's workspace, say) is allocated outside any graph: an allocation
        // made while capturing would stay with the graph and fail its next launch.
        let key = match key {
            Some(k) if self.graphs.iter().any(|g| g.key == k) => Some(k),
            Some(k) if self.graph_seen.contains(&k) => {
                self.graph_seen.retain(|s| *s != k);
                Some(k)
            }
            Some(k) => {
                if self.graph_seen.len() >= MAX_GRAPHS {
                    self.graph_seen.remove(0);
                }
                self.graph_seen.push(k);
                None
            }
            None => None,
        };
        match key {
            Some(key) => {
                let mut g = match self.graphs.iter().position(|g| g.key == key) {
                    Some(i) => self.graphs.remove(i),
                    None => {
                        let stream = self.dev.stream().clone();
                        let g = StepGraph::capture(&stream, key, || {
                            self.enqueue(p, with_lora, grad_scale, None)
                        })?;
                        self.graph_captures += 1;
                        if self.graphs.len() >= MAX_GRAPHS {
                            self.graphs.remove(0);
                        }
                        g
                    }
                };
                let launched = g.launch();
                self.graphs.push(g);
                launched?;
            }
            None => self.enqueue(p, with_lora, grad_scale, drop)?,
        }
        let mut losses = Vec::new();
        download_f32(&self.dev, &self.ws_ref()?.head.loss, p.n, &mut losses)?;
        Ok(losses.iter().map(|&l| l as f64).sum())
    }

    fn ws_ref(&self) -> R<&Workspace> {
        self.ws
            .as_ref()
            .ok_or_else(|| ModelError::Device("internal: no workspace".into()))
    }

    /// The block-sparse attention lists of the last step, if it had them.
    pub fn attn_lists(&self) -> Option<&AttnLists> {
        self.attn_lists.as_ref()
    }

    /// The block lists of the last step's sparse MLP, if it had one.
    pub fn mlp_lists(&self) -> Option<&MlpLists> {
        self.mlp_lists.as_ref()
    }

    /// The attention implementation in use.
    pub fn attention(&self) -> AttentionImpl {
        self.attention
    }

    /// The device the engine runs on.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Device bytes of the activation workspace allocated so far (0 before the first batch).
    pub fn workspace_bytes(&self) -> usize {
        self.ws.as_ref().map_or(0, |w| w.caps.bytes(&self.dims))
    }

    /// The dropout masks of the last training step, per `(layer, site)` as the CPU model
    /// draws them (f32 values of the saved bf16 masks, `[T, w]` row-major).
    ///
    /// A diagnostic for tests: replaying them on the CPU engine
    /// ([`crate::model::loss_and_grads_with_masks`]) gives the CPU's result for the GPU's
    /// random draws. Empty when the last step had no dropout; downloads every layer's masks.
    pub fn last_masks(&self) -> Result<RecordedMasks> {
        let mut out = RecordedMasks::default();
        let (Some((t, layout)), Some(ws)) = (self.last_drop, self.ws.as_ref()) else {
            return Ok(out);
        };
        for (li, acts) in ws.layers.iter().enumerate() {
            let all = acts
                .mask
                .to_f32_vec()
                .map_err(dev_err("downloading dropout masks"))?;
            for (site, col, w) in layout.sites(&self.dims) {
                let m = all
                    .get(col * t..(col + w) * t)
                    .ok_or_else(|| ModelError::Device("internal: mask buffer too small".into()))?;
                out.masks.insert((li, site), m.to_vec());
            }
        }
        Ok(out)
    }

    /// Checks `batch`, sizes the workspace (with room for the masks of `drop`), uploads the
    /// batch and (with `upload_lora`) the adapters.
    fn prepare(
        &mut self,
        lora: Option<&LoraParams>,
        batch: &PackedBatch,
        drop: Option<&MaskLayout>,
        upload_lora: bool,
    ) -> R<Prepared> {
        let c = &self.model.config;
        check_batch(c, batch)?;
        if let Some(l) = lora {
            check_lora(c, l)?;
        }
        let t = batch.num_tokens();
        if let Some(src) = &self.mlp_source {
            let sparse_adapted = lora.is_some_and(|l| {
                l.config
                    .targets
                    .iter()
                    .any(|t| matches!(t, LoraTarget::Fc1 | LoraTarget::Fc2))
            });
            if sparse_adapted {
                return Err(ModelError::Unsupported(
                    "LoRA on fc1/fc2 with a sparse MLP: the GPU's compact activations have no \
                     full-width branch; adapt q, k, v or out_proj"
                        .into(),
                ));
            }
            match self.mlp_lists.as_mut() {
                Some(m) if src.fits(m, t) => m.t = t,
                _ => {
                    let d = &self.dims;
                    self.mlp_lists = Some(src.lists(&self.dev, d.layers, t, d.f)?);
                }
            }
        }
        if let Some(s) = self.synthetic_attention {
            if self.attention != AttentionImpl::Flash {
                return Err(ModelError::Unsupported(
                    "block-sparse attention runs on the flash kernels".into(),
                ));
            }
            if self
                .attn_lists
                .as_ref()
                .is_none_or(|a| a.cu_seqlens != batch.cu_seqlens)
            {
                let d = &self.dims;
                self.attn_lists = Some(AttnLists::synthetic(
                    &self.dev,
                    &s,
                    d.layers,
                    &batch.cu_seqlens,
                    (d.nh, d.hd),
                )?);
            }
        }
        let (segs, probs) = segments(&batch.cu_seqlens, self.dims.nh)?;
        let flash_cfg = match self.attention {
            // The configuration of the device's architecture and the batch's longest
            // sequence: the layers' launches take the same one (`attention::config`).
            AttentionImpl::Flash => Some(
                flash_kernels_for(self.dims.hd)
                    .ok_or_else(|| {
                        ModelError::Unsupported(format!(
                            "no flash attention for head dimension {}",
                            self.dims.hd
                        ))
                    })?
                    .on(Launcher::arch(&self.dev))
                    .for_longest(attention::longest(&segs)),
            ),
            AttentionImpl::Materialised => None,
        };
        let flash = flash_cfg.is_some();
        let plan = match flash_cfg {
            Some(cfg) => BlockPlan::of(&segs, cfg)?,
            None => BlockPlan::default(),
        };
        let need = Caps {
            tokens: t,
            probs: if flash { 0 } else { probs },
            max_len: if flash {
                0
            } else {
                segs.iter().map(|s| s.len).max().unwrap_or(0)
            },
            blocks: plan.rows(),
            rank: lora.map_or(0, |l| l.config.r),
            mask_cols: drop.map_or(0, |d| d.cols),
        };
        if !self.ws.as_ref().is_some_and(|w| w.caps.covers(&need)) {
            let old = self.ws.take().map(|w| w.caps);
            // The freed buffers return to the driver's pool; a synchronisation hands them
            // back, so that the free-memory check below sees them.
            self.dev
                .synchronize()
                .map_err(dev_err("releasing the old workspace"))?;
            let mut caps = old.map_or(need, |o| o.max(&need));
            caps.tokens = caps.tokens.div_ceil(TOKEN_STEP) * TOKEN_STEP;
            self.ws = Some(Workspace::new(&self.dev, &self.dims, caps)?);
        }
        if let Some(l) = lora {
            self.ensure_lora(l, upload_lora)?;
        }
        let runs = target_runs(&batch.targets);
        let n = runs.iter().map(|r| r.1).sum();
        let ws = match self.ws.as_mut() {
            Some(ws) => ws,
            None => return Err(ModelError::Device("internal: no workspace".into())),
        };
        if flash {
            ws.scratch.blocks.upload(&self.dev, &plan)?;
        }
        let head = &mut ws.head;
        let ids = i32_bytes(batch.input_ids.iter().map(|&i| i as i32));
        upload_prefix(&self.dev, &mut head.ids, &ids)?;
        let pos = i32_bytes(batch.position_ids.iter().map(|&p| p as i32));
        upload_prefix(&self.dev, &mut head.pos_ids, &pos)?;
        let targets = i32_bytes(batch.targets.iter().copied().filter(|&y| y != IGNORE_INDEX));
        upload_prefix(&self.dev, &mut head.targets, &targets)?;
        Ok(Prepared { t, segs, runs, n })
    }

    /// Device copies of `lora`'s adapters, allocated when missing or of another layout (and
    /// then uploaded), else uploaded only with `upload`.
    fn ensure_lora(&mut self, lora: &LoraParams, upload: bool) -> R<&mut DeviceLora> {
        match &mut self.lora {
            Some(d) if d.fits(lora) => {
                if upload {
                    d.upload(lora)?;
                    self.params_from_optimizer = false;
                }
            }
            slot => {
                *slot = Some(DeviceLora::new(&self.dev, lora, self.dims.layers)?);
                self.params_from_optimizer = false;
            }
        }
        self.lora
            .as_mut()
            .ok_or_else(|| ModelError::Device("internal: no LoRA on the device".into()))
    }

    /// Zeroes the device's LoRA gradients (`with_lora`) and BitFit's (when the weights hold
    /// trained biases): the backward adds into them.
    fn zero_grads(&mut self, with_lora: bool) -> R {
        if with_lora {
            match &mut self.lora {
                Some(d) => d
                    .grads
                    .fill_zero()
                    .map_err(dev_err("zeroing LoRA gradients"))?,
                None => return Err(ModelError::Device("internal: no LoRA on the device".into())),
            }
        }
        if let (Some(b), true) = (&mut self.bitfit, self.trained_biases) {
            b.grads
                .fill_zero()
                .map_err(dev_err("zeroing BitFit gradients"))?;
        }
        if let (Some(a), true) = (&mut self.houlsby, self.houlsby_on) {
            a.grads
                .fill_zero()
                .map_err(dev_err("zeroing adapter gradients"))?;
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch, adding `grad_scale ·` its LoRA gradients to
    /// the device's gradient buffer; returns the sum of its per-target losses and their count.
    fn micro_step(
        &mut self,
        lora: Option<&LoraParams>,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
        upload_lora: bool,
    ) -> R<(f64, usize)> {
        // Dropout only in training (`rng`) and where some site has p > 0.
        let layout = match rng {
            Some(_) => MaskLayout::new(&self.dims, self.model.config.dropout, lora),
            None => None,
        };
        if layout.is_some() && self.rng.is_none() {
            self.rng = Some(GpuRng::new(&self.dev)?);
        }
        self.last_drop = None;
        let p = self.prepare(lora, batch, layout.as_ref(), upload_lora)?;
        if p.n == 0 {
            return Ok((0.0, 0));
        }
        let drop = rng.zip(layout).map(|(r, l)| (r.seed, l));
        let loss_sum = self.run(&p, lora, Some(grad_scale), drop)?;
        self.last_drop = layout.map(|l| (p.t, l));
        Ok((loss_sum, p.n))
    }

    /// Queues the forward, loss and (with `grad_scale`) backward of a prepared batch, the LoRA
    /// gradients (`with_lora`) and BitFit's (when [`Self::trained_biases`]) added to the
    /// device's gradient buffers, the per-target losses in the workspace. Reads nothing back.
    fn enqueue(
        &mut self,
        p: &Prepared,
        with_lora: bool,
        grad_scale: Option<f32>,
        drop: Option<(u64, MaskLayout)>,
    ) -> R {
        let GpuEngine {
            dev,
            blas,
            weights,
            dims,
            ws,
            lora,
            bitfit,
            trained_biases,
            houlsby,
            houlsby_on,
            rng,
            attention,
            mlp_lists,
            mlp_source,
            attn_lists,
            ..
        } = self;
        let drop = match (drop, rng.as_ref()) {
            (Some((seed, layout)), Some(rng)) => Some(DropCtx { rng, seed, layout }),
            (Some(_), None) => {
                return Err(ModelError::Device(
                    "internal: dropout without cuRAND".into(),
                ))
            }
            (None, _) => None,
        };
        let ws = ws
            .as_mut()
            .ok_or_else(|| ModelError::Device("internal: no workspace".into()))?;
        let (t, h) = (p.t, dims.h);
        let (adapters, lora_grads) = match lora.as_mut().filter(|_| with_lora) {
            Some(l) => {
                l.transpose_b(dev)?;
                l.write_fold(dev, &weights.layers)?;
                let (a, g) = l.split();
                (Some(a), Some(g))
            }
            None => (None, None),
        };
        let mut grads = Grads {
            lora: lora_grads,
            bitfit: bitfit
                .as_mut()
                .filter(|_| *trained_biases)
                .map(DeviceBitFit::view),
            houlsby: None,
        };
        let trains = grads.lora.is_some() || grads.bitfit.is_some() || *houlsby_on;
        let cx = Ctx {
            dev,
            blas,
            d: *dims,
            t,
            segs: &p.segs,
            lora: adapters,
            drop,
            attention: *attention,
            mlp: mlp_lists.as_ref(),
            predictors: mlp_source.as_ref().and_then(MlpSource::predictors),
            attn: attn_lists.as_ref(),
        };

        // Embeddings, then the layers; each layer's output is the next one's saved input.
        let x0 = arg(&ws.layers[0].x, &[t, h])?;
        embedding(
            dev,
            &weights.tok.as_arg(),
            &weights.pos.as_arg(),
            &arg(&ws.head.ids, &[t])?,
            &arg(&ws.head.pos_ids, &[t])?,
            &x0,
        )?;
        let layers = ws.layers.len();
        for li in 0..layers {
            let (cur, rest) = ws.layers.split_at_mut(li + 1);
            let out = match rest.first_mut() {
                Some(next) => &mut next.x,
                None => &mut ws.head.x_out,
            };
            layer::forward(
                &cx,
                li,
                &weights.layers[li],
                &mut cur[li],
                &mut ws.scratch,
                out,
                houlsby
                    .as_mut()
                    .filter(|_| *houlsby_on)
                    .and_then(|d| d.layer(li)),
            )?;
        }

        // Final LayerNorm and the LM head on the rows with a target.
        let hb = &mut ws.head;
        if let Some(ln) = &weights.final_ln {
            layernorm(
                dev,
                &hb.x_out,
                (&ln.0, &ln.1),
                (&hb.hf, h),
                &hb.meanf,
                &hb.rstdf,
                t,
                h,
            )?;
        }
        let src = if weights.final_ln.is_some() {
            &hb.hf
        } else {
            &hb.x_out
        };
        let mut row = 0;
        for &(r0, len) in &p.runs {
            copy_rows(dev, src, r0, &mut hb.hsel, row, len, h)?;
            row += len;
        }
        let (e, v) = (weights.head(), dims.v);
        for c0 in (0..p.n).step_by(LOSS_CHUNK) {
            let c = LOSS_CHUNK.min(p.n - c0);
            let rows = MatLayout::at(c0 * h, c, h, h);
            mm(
                blas,
                Mat::new(&hb.hsel, rows),
                dense(e, v, h),
                dense_mut(&mut hb.z, c, v),
                false,
                true,
                1.0,
                0.0,
            )?;
            xent(
                dev,
                &arg(&hb.z, &[c, v])?,
                &arg_at(&hb.targets, c0, &[c])?,
                &arg_at(&hb.loss, c0, &[c])?,
                grad_scale.unwrap_or(0.0),
                &arg(&hb.dz, &[c, v])?,
            )?;
            if grad_scale.is_some() {
                let out = MatMut::new(&mut hb.dhsel, rows);
                mm(
                    blas,
                    dense(&hb.dz, c, v),
                    dense(e, v, h),
                    out,
                    false,
                    false,
                    1.0,
                    0.0,
                )?;
            }
        }

        if grad_scale.is_some() && trains {
            // d(hidden) of the rows with a target, zero elsewhere; through the final LN.
            let dh = if weights.final_ln.is_some() {
                &mut ws.scratch.tmp2
            } else {
                &mut hb.g
            };
            dh.fill_zero()
                .map_err(dev_err("zeroing the head gradient"))?;
            let mut row = 0;
            for &(r0, len) in &p.runs {
                copy_rows(dev, &hb.dhsel, row, dh, r0, len, h)?;
                row += len;
            }
            if let Some(ln) = &weights.final_ln {
                let dy = &ws.scratch.tmp2;
                if let Some(b) = &mut grads.bitfit {
                    b.final_ln(blas, dense(dy, t, h), t)?;
                }
                layernorm_bwd(
                    dev,
                    &hb.x_out,
                    &ln.0,
                    dy,
                    &hb.meanf,
                    &hb.rstdf,
                    (&hb.g, 0.0),
                    t,
                    h,
                )?;
            }
            let (adapters, adapter_grads) = match houlsby.as_mut().filter(|_| *houlsby_on) {
                Some(d) => {
                    let (r, g) = d.split();
                    (Some(r), Some(g))
                }
                None => (None, None),
            };
            grads.houlsby = adapter_grads;
            for li in (0..layers).rev() {
                let w = &weights.layers[li];
                layer::backward(
                    &cx,
                    li,
                    w,
                    &ws.layers[li],
                    &mut ws.scratch,
                    &ws.head.g,
                    &mut grads,
                    adapters.as_ref().and_then(|a| a.layer(li)),
                )?;
            }
        }
        Ok(())
    }
}

/// The parts of `params`, each optional: LoRA, BitFit, Houlsby adapters.
type Parts<'a> = (
    Option<&'a LoraParams>,
    Option<&'a BitFitParams>,
    Option<&'a HoulsbyParams>,
);

/// The parts of `params` (GELU Houlsby adapters are refused when they are uploaded).
fn gpu_parts(params: &PeftParams) -> Parts<'_> {
    (
        params.lora.as_ref(),
        params.bitfit.as_ref(),
        params.houlsby.as_ref(),
    )
}

impl GpuEngine {
    /// Makes the device weights hold the biases `b` trains (BitFit) or the base model's, and
    /// readies BitFit's gradient buffers for `tokens` tokens.
    fn sync_biases(&mut self, b: Option<&BitFitParams>, tokens: usize) -> R {
        match b {
            Some(b) => {
                if !self.bitfit.as_ref().is_some_and(|d| d.fits(b, tokens)) {
                    let cap = tokens.div_ceil(TOKEN_STEP) * TOKEN_STEP;
                    self.bitfit = Some(DeviceBitFit::new(&self.dev, b, cap)?);
                }
                bitfit::upload_biases(&mut self.weights, &self.model, Some(b))?;
                self.trained_biases = true;
            }
            None if self.trained_biases => {
                bitfit::upload_biases(&mut self.weights, &self.model, None)?;
                self.trained_biases = false;
            }
            None => {}
        }
        Ok(())
    }

    /// Makes the device hold Houlsby adapters `p` (sized for `tokens` tokens; `upload`: copy
    /// `p`'s values even when the device already holds adapters of its shape) and runs them
    /// in the next calls; `None` turns them off.
    fn sync_houlsby(&mut self, p: Option<&HoulsbyParams>, tokens: usize, upload: bool) -> R {
        self.houlsby_on = p.is_some();
        let Some(p) = p else { return Ok(()) };
        if upload {
            self.params_from_optimizer = false;
        }
        match &mut self.houlsby {
            Some(d) if d.fits(p, tokens) => match upload {
                true => d.upload(p),
                false => Ok(()),
            },
            slot => {
                self.params_from_optimizer = false;
                // Free the old buffers before allocating the new ones.
                *slot = None;
                let cap = tokens.div_ceil(TOKEN_STEP) * TOKEN_STEP;
                *slot = Some(DeviceHoulsby::new(&self.dev, p, cap)?);
                Ok(())
            }
        }
    }

    /// Loss and gradients of one micro-batch under any of LoRA, BitFit and Houlsby adapters,
    /// read back to the host.
    fn peft_loss_and_grads(
        &mut self,
        params: &PeftParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> R<StepOutput> {
        let (lora, bitfit, houlsby) = gpu_parts(params);
        if let Some(l) = lora {
            check_lora(&self.model.config, l)?;
            self.ensure_lora(l, true)?;
        }
        check_adapters(&self.model.config, params)?;
        self.sync_biases(bitfit, batch.num_tokens())?;
        self.sync_houlsby(houlsby, batch.num_tokens(), true)?;
        self.zero_grads(lora.is_some())?;
        let (loss_sum, count) = self.micro_step(lora, batch, grad_scale, rng, false)?;
        let mut grads = match (&self.lora, lora) {
            (Some(d), Some(_)) => {
                let mut flat = Vec::new();
                download_f32(&self.dev, &d.grads, d.grads.numel(), &mut flat)?;
                d.grads_from(&flat)
            }
            _ => PeftGrads {
                layers: (0..self.dims.layers).map(|_| Default::default()).collect(),
                final_ln_bias: None,
            },
        };
        if let (Some(d), Some(_)) = (&self.bitfit, bitfit) {
            let mut flat = Vec::new();
            download_f32(&self.dev, &d.grads, d.grads.numel(), &mut flat)?;
            d.grads_into(&flat, &mut grads);
        }
        if let (Some(d), Some(_)) = (&self.houlsby, houlsby) {
            let mut flat = Vec::new();
            download_f32(&self.dev, &d.grads, d.grads.numel(), &mut flat)?;
            d.grads_into(&flat, &mut grads);
        }
        Ok(StepOutput {
            loss_sum,
            count,
            grads,
        })
    }

    /// One optimizer step with AdamW on the device, for every trained method (LoRA, BitFit,
    /// ReLU Houlsby adapters). Alone (`dp` is `None`) the engine computes every micro-batch
    /// of `step`; as a data-parallel rank only its share ([`rank_micro_batches`]), after
    /// which each gradient buffer is summed over the ranks on the device and `[loss sum,
    /// extra…]` on the host, so that every rank clips and applies the same update.
    fn device_step(
        &mut self,
        params: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
        dp: Option<(&mut dyn Communicator, &mut [f64])>,
    ) -> Result<StepOutcome> {
        let n = step.targets()?;
        let t0 = std::time::Instant::now();
        check_adapters(&self.model.config, params)?;
        let tokens = step.batches.iter().map(PackedBatch::num_tokens).max();
        let tokens = tokens.unwrap_or(0);
        // With the moments on the device and nothing uploaded since the last update, the
        // device holds the current parameters: nothing to upload.
        let host_holds_state = !adamw.moments_on_device();
        let upload = host_holds_state || !self.params_from_optimizer;
        let (lora, bitfit, houlsby) = gpu_parts(params);
        let mut layouts = Vec::new();
        if let Some(l) = lora {
            check_lora(&self.model.config, l)?;
            let d = self.ensure_lora(l, upload)?;
            layouts.push(FlatLayout {
                len: d.len(),
                spans: optimizer::lora_spans(l, &d.slots)?,
            });
        }
        self.sync_biases(bitfit, tokens)?;
        if let (Some(d), Some(_)) = (&self.bitfit, bitfit) {
            layouts.push(d.slots.flat_layout());
        }
        self.sync_houlsby(houlsby, tokens, upload)?;
        if let (Some(d), Some(_)) = (&self.houlsby, houlsby) {
            layouts.push(d.flat_layout());
        }
        if !self.adam.as_ref().is_some_and(|a| a.fits(&layouts)) {
            if !host_holds_state {
                return Err(ModelError::Device(
                    "internal: the adapters' layout changed while AdamW's moments were on the \
                     device"
                        .into(),
                ));
            }
            self.adam = Some(DeviceAdamW::new(&self.dev, layouts)?);
        }
        if let Some(a) = self.adam.as_mut() {
            // The host's values are only read when it holds the optimizer state.
            let values: Vec<&[f32]> = match host_holds_state {
                true => params
                    .tensors()
                    .into_iter()
                    .map(|(_, t)| t.data.as_slice())
                    .collect(),
                false => Vec::new(),
            };
            a.load(&values, adamw)?;
        }
        self.zero_grads(lora.is_some())?;
        let t_prep = t0.elapsed();
        let scale = 1.0 / n as f32;
        let mine = match &dp {
            Some((comm, _)) => {
                rank_micro_batches(step.batches.len(), comm.rank(), comm.world_size())
            }
            None => (0..step.batches.len()).collect(),
        };
        let mut loss_sum = 0.0;
        for micro in mine {
            let rng = step.dropout.and_then(|d| d.get(micro).copied());
            loss_sum += self
                .micro_step(lora, &step.batches[micro], scale, rng, false)?
                .0;
        }
        let (with_bitfit, with_houlsby) = (bitfit.is_some(), houlsby.is_some());
        if let Some((comm, extra)) = dp {
            let stream = self.dev.stream().clone();
            let coll = comm
                .device_collectives()
                .ok_or_else(|| ModelError::Collective("no device collectives".into()))?;
            for g in self.grad_buffers_mut(lora.is_some(), with_bitfit, with_houlsby)? {
                coll.all_reduce_sum_tensor(&stream, g).map_err(collective)?;
            }
            loss_sum = reduce_loss_sum(comm, loss_sum, extra)?;
        }
        let loss = loss_sum / n as f64;
        let buffers = part_buffers(
            self.lora.as_ref().filter(|_| lora.is_some()),
            self.bitfit.as_ref().filter(|_| with_bitfit),
            self.houlsby.as_ref().filter(|_| with_houlsby),
        );
        let adam = self
            .adam
            .as_mut()
            .ok_or_else(|| ModelError::Device("internal: no optimizer state".into()))?;
        let grads: Vec<&DeviceTensor> = buffers.iter().map(|b| b.grads).collect();
        let t_launch = t0.elapsed();
        let grad_norm = adam.grad_norm(&self.dev, &grads)?;
        let t_norm = t0.elapsed();
        let applied = loss.is_finite() && grad_norm.is_finite();
        if applied {
            let coef = optimizer::clip_coefficient(grad_norm, step.max_grad_norm);
            let mut host = params.tensors_mut();
            let mut out: Vec<&mut [f32]> = host
                .iter_mut()
                .map(|(_, t)| t.data.as_mut_slice())
                .collect();
            adam.apply(&self.dev, &buffers, coef, adamw, step.lr, &mut out)?;
            let t_apply = t0.elapsed();
            // The adapters are the last part; their bf16 parameters come from the master.
            if let (Some(d), true) = (self.houlsby.as_ref(), with_houlsby) {
                let last = buffers.len().checked_sub(1).and_then(|i| adam.master(i));
                let master = last.ok_or_else(|| {
                    ModelError::Device("internal: no optimizer state for the adapters".into())
                })?;
                d.take_master(&self.dev, master)?;
            }
            self.params_from_optimizer = true;
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            tracing::debug!(
                prep_ms = ms(t_prep),
                launched_ms = ms(t_launch),
                norm_ms = ms(t_norm),
                applied_ms = ms(t_apply),
                total_ms = ms(t0.elapsed()),
                "device step phases (cumulative)"
            );
        }
        Ok(StepOutcome {
            loss,
            grad_norm,
            targets: n,
            applied,
        })
    }

    /// The gradient buffers of the trained methods, in optimizer-part order.
    fn grad_buffers_mut(
        &mut self,
        lora: bool,
        bitfit: bool,
        houlsby: bool,
    ) -> R<Vec<&mut DeviceTensor>> {
        let missing = |what: &str| ModelError::Device(format!("internal: no {what} on the device"));
        let mut out = Vec::new();
        if lora {
            out.push(&mut self.lora.as_mut().ok_or_else(|| missing("LoRA"))?.grads);
        }
        if bitfit {
            out.push(&mut self.bitfit.as_mut().ok_or_else(|| missing("BitFit"))?.grads);
        }
        if houlsby {
            out.push(
                &mut self
                    .houlsby
                    .as_mut()
                    .ok_or_else(|| missing("adapter"))?
                    .grads,
            );
        }
        Ok(out)
    }
}

/// What the optimizer reads and writes of each trained method, in part order.
fn part_buffers<'a>(
    lora: Option<&'a DeviceLora>,
    bitfit: Option<&'a DeviceBitFit>,
    houlsby: Option<&'a DeviceHoulsby>,
) -> Vec<PartBuffers<'a>> {
    let mut out = Vec::new();
    if let Some(d) = lora {
        out.push(PartBuffers {
            grads: &d.grads,
            params: Some(&d.params),
        });
    }
    if let Some(d) = bitfit {
        out.push(PartBuffers {
            grads: &d.grads,
            params: None,
        });
    }
    if let Some(d) = houlsby {
        out.push(PartBuffers {
            grads: &d.grads,
            params: None,
        });
    }
    out
}

impl Engine for GpuEngine {
    fn use_cuda_graphs(&mut self, on: bool) -> bool {
        self.set_cuda_graphs(on);
        true
    }

    fn name(&self) -> String {
        self.dev.name().to_string()
    }

    fn model(&self) -> &OptModel {
        &self.model
    }

    fn loss_and_grads(
        &mut self,
        params: &PeftParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> Result<StepOutput> {
        self.peft_loss_and_grads(params, batch, grad_scale, rng)
    }

    /// The step with AdamW on the device ([`super::optimizer`]): the micro-batches' gradients
    /// are summed on the device, clipped and applied there; only the losses, the norm's
    /// partial sums and the updated parameters are read back.
    fn optimizer_step(
        &mut self,
        params: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
    ) -> Result<StepOutcome> {
        self.device_step(params, adamw, step, None)
    }

    /// With NCCL ([`crate::dist::DeviceCollectives`]) the data-parallel step stays on the
    /// device: this rank's micro-batches add into the gradient buffers, NCCL sums them over
    /// the ranks in place, and every rank clips and applies AdamW to the same sums. Other
    /// communicators take the host path.
    fn data_parallel_step(
        &mut self,
        comm: &mut dyn Communicator,
        params: &mut PeftParams,
        adamw: &mut AdamW,
        step: &OptimStep<'_>,
        extra: &mut [f64],
    ) -> Result<StepOutcome> {
        if comm.device_collectives().is_none() {
            return crate::dist::data_parallel_step(self, comm, params, adamw, step, extra);
        }
        self.device_step(params, adamw, step, Some((comm, extra)))
    }

    fn sync_optimizer(&mut self, adamw: &mut AdamW) -> Result<()> {
        if !adamw.moments_on_device() {
            return Ok(());
        }
        match &self.adam {
            Some(a) => a.download_moments(adamw),
            None => Err(ModelError::Device(
                "internal: AdamW's moments are on the device but it holds none".into(),
            )),
        }
    }

    fn eval_loss(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> Result<(f64, usize)> {
        let (lora, bitfit, houlsby) = match lora {
            Some(p) => {
                check_adapters(&self.model.config, p)?;
                gpu_parts(p)
            }
            None => (None, None, None),
        };
        self.sync_biases(bitfit, batch.num_tokens())?;
        self.sync_houlsby(houlsby, batch.num_tokens(), true)?;
        let p = self.prepare(lora, batch, None, true)?;
        if p.n == 0 {
            return Ok((0.0, 0));
        }
        let loss_sum = self.run(&p, lora, None, None)?;
        Ok((loss_sum, p.n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::OptConfig;

    #[test]
    fn target_runs_are_maximal_and_skip_ignored_rows() {
        let i = IGNORE_INDEX;
        assert_eq!(
            target_runs(&[i, 5, 6, i, 7, i, i, 1, 2, 3]),
            vec![(1, 2), (4, 1), (7, 3)]
        );
        assert_eq!(target_runs(&[i, i]), vec![]);
        assert_eq!(target_runs(&[4]), vec![(0, 1)]);
    }

    #[test]
    fn batch_checks_name_the_problem() {
        let c = OptConfig::from_json(
            r#"{"model_type":"opt","vocab_size":10,"hidden_size":8,"ffn_dim":16,
                "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":4}"#,
            std::path::Path::new("t/config.json"),
        )
        .unwrap();
        let ok = PackedBatch {
            input_ids: vec![1, 2, 3],
            position_ids: vec![0, 1, 0],
            targets: vec![2, IGNORE_INDEX, IGNORE_INDEX],
            cu_seqlens: vec![0, 2, 3],
            examples: vec![0, 1],
        };
        assert!(check_batch(&c, &ok).is_ok());
        let bad = PackedBatch {
            targets: vec![10, IGNORE_INDEX, IGNORE_INDEX],
            ..ok.clone()
        };
        assert!(check_batch(&c, &bad)
            .unwrap_err()
            .to_string()
            .contains("target 0 is 10"));
        let bad = PackedBatch {
            targets: vec![-3, IGNORE_INDEX, IGNORE_INDEX],
            ..ok.clone()
        };
        assert!(check_batch(&c, &bad).is_err());
        let bad = PackedBatch {
            cu_seqlens: vec![0, 2],
            ..ok.clone()
        };
        assert!(check_batch(&c, &bad)
            .unwrap_err()
            .to_string()
            .contains("cu_seqlens"));
        let bad = PackedBatch {
            position_ids: vec![0, 1, 4],
            ..ok.clone()
        };
        assert!(matches!(
            check_batch(&c, &bad),
            Err(ModelError::PositionOutOfRange { position: 2, .. })
        ));
        let bad = PackedBatch {
            input_ids: vec![1, 12, 3],
            ..ok
        };
        assert!(matches!(
            check_batch(&c, &bad),
            Err(ModelError::TokenOutOfRange { position: 1, .. })
        ));
    }
}
