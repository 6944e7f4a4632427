//! The MLP block predictor and selection on the device (DESIGN.md §7, MLP steps 3–4).
//!
//! The CPU trains the predictors ([`crate::exposure::predictor`]); this module runs them inside
//! the GPU step, per layer, right before the sparse fc1:
//! 1. `u = relu(x·W1 + b1)`, `x` the LN2 output `[t, H]` (cuBLAS, then `bias_relu`);
//! 2. `oᵀ = W2ᵀ·uᵀ`, block-major `[nb, t]` (cuBLAS writes the transpose directly), so that
//!    the selection kernel reads each group's tokens contiguously;
//! 3. `select_blocks` ([`crate::sparse_ops::select_blocks`]): per 128-token group, the blocks
//!    covering the layer's mass target of the predicted mass, at most `max_blocks`, written
//!    into the layer's block list on the device.
//!
//! Nothing is read back: the lists are valid by construction, and the sparse operators' grids
//! are sized by `max_blocks` (the budget), with programs past a group's count exiting early.
//! The step therefore has no synchronisation between prediction and use. The scratch (`u`
//! and `oᵀ`) lives in two workspace buffers that only the backward uses.
//!
//! Only the [`Target::LogMass`] predictors (the default) run here; the mass of token `r`,
//! block `b` is `scale · expm1(max(o[b, r], 0))`, as on the CPU.

use super::layer::Ctx;
use super::ops::{arg, bias_add, dev_err, mm, R};
use super::weights::ACT;
use crate::block_list::BlockList;
use crate::cublas::{Mat, MatLayout, MatMut};
use crate::exposure::predictor::{BlockPredictor, PredictorConfig, Target};
use crate::model::ModelError;
use crate::sparse_ops;
use crate::{CudaDevice, DeviceTensor};
use lexp_compiler::dtype::Storage;

/// One layer's predictor on the device.
struct LayerPredictor {
    /// `[H, r]`, the model's type.
    w1: DeviceTensor,
    /// `[r]`, the model's type (`bias_relu` adds it in place).
    b1: DeviceTensor,
    /// `[r, nb]`, the model's type.
    w2: DeviceTensor,
    /// `[nb]`, f32 (the selection kernel adds it to the outputs in f32).
    b2: DeviceTensor,
    /// The `LogMass` scale.
    scale: f32,
}

/// Every layer's predictor on the device, with the selection settings.
pub struct MlpPredictors {
    layers: Vec<LayerPredictor>,
    /// Neurons per block (64 or 128: the sparse kernels' block sizes).
    pub block: usize,
    /// Blocks per layer (`ffn / block`).
    pub num_blocks: usize,
    /// The grid bound: most blocks a group keeps (the budget).
    pub max_blocks: usize,
    rank: usize,
    /// Mass target of each layer, in `(0, 1]`.
    targets: Vec<f32>,
}

impl MlpPredictors {
    /// Copies `predictors` (one per layer, trained: their `LogMass` scale is set) to the
    /// device in the activations' type, for blocks of `block` neurons, mass targets `targets`
    /// (one per layer) and at most `max_blocks` blocks per group.
    pub fn new(
        dev: &CudaDevice,
        predictors: &[BlockPredictor],
        block: usize,
        targets: &[f64],
        max_blocks: usize,
    ) -> R<MlpPredictors> {
        let unsupported = |m: String| Err(ModelError::Unsupported(m));
        let Some(first) = predictors.first() else {
            return unsupported("MLP predictors: none given".into());
        };
        let (nb, rank) = (first.num_blocks, first.weights().rank);
        if !matches!(block, 64 | 128) {
            return unsupported(format!(
                "MLP blocks of {block} neurons: the GPU's sparse kernels take 64 or 128"
            ));
        }
        if nb > lexp_kernels::block_select::MAX_SELECT_BLOCKS {
            return unsupported(format!(
                "{nb} MLP blocks per layer: the GPU's selection takes at most {} (use blocks \
                 of 128)",
                lexp_kernels::block_select::MAX_SELECT_BLOCKS
            ));
        }
        if max_blocks == 0 || max_blocks > nb {
            return unsupported(format!("MLP block budget {max_blocks} is outside 1..={nb}"));
        }
        if targets.len() != predictors.len() {
            return unsupported(format!(
                "{} mass targets for {} layers",
                targets.len(),
                predictors.len()
            ));
        }
        let dtype = ACT;
        let mut layers = Vec::with_capacity(predictors.len());
        for (li, p) in predictors.iter().enumerate() {
            let w = p.weights();
            if p.config.target != Target::LogMass {
                return unsupported(format!(
                    "layer {li}'s predictor regresses shares; the GPU runs log-mass predictors"
                ));
            }
            if p.num_blocks != nb || w.rank != rank {
                return unsupported(format!(
                    "layer {li}'s predictor has {} blocks and rank {}, layer 0's {nb} and {rank}",
                    p.num_blocks, w.rank
                ));
            }
            if !(w.scale.is_finite() && w.scale > 0.0) {
                return unsupported(format!(
                    "layer {li}'s predictor is untrained (mass scale {})",
                    w.scale
                ));
            }
            let h = p.hidden;
            let up = |what: &str, data: &[f32], dims: &[usize], dt: Storage| {
                DeviceTensor::from_f32(dev, dt, dims, data)
                    .map_err(dev_err(format!("uploading layer {li}'s predictor {what}")))
            };
            layers.push(LayerPredictor {
                w1: up("w1", w.w1, &[h, rank], dtype)?,
                b1: up("b1", w.b1, &[rank], dtype)?,
                w2: up("w2", w.w2, &[rank, nb], dtype)?,
                b2: up("b2", w.b2, &[nb], Storage::F32)?,
                scale: w.scale,
            });
        }
        Ok(MlpPredictors {
            layers,
            block,
            num_blocks: nb,
            max_blocks,
            rank,
            targets: targets.iter().map(|&t| t as f32).collect(),
        })
    }

    /// Predictors with *random* weights (`layers` layers, `hidden -> rank -> num_blocks`), for
    /// measuring what prediction and selection cost inside the step: that does not depend on
    /// the values. Mass target 1: a group keeps blocks until all its predicted mass is
    /// covered, so it normally fills its `max_blocks`. Their choices mean nothing.
    pub fn random(
        dev: &CudaDevice,
        (layers, hidden): (usize, usize),
        rank: usize,
        (block, num_blocks): (usize, usize),
        max_blocks: usize,
        seed: u64,
    ) -> R<MlpPredictors> {
        let config = PredictorConfig {
            rank,
            ..PredictorConfig::default()
        };
        let predictors: Vec<BlockPredictor> = (0..layers)
            .map(|l| {
                BlockPredictor::new(hidden, num_blocks, config, seed ^ (l as u64 + 1))
                    .with_scale(1.0)
            })
            .collect();
        MlpPredictors::new(dev, &predictors, block, &vec![1.0; layers], max_blocks)
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The predictors' bottleneck rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Each layer's mass target.
    pub fn targets(&self) -> &[f32] {
        &self.targets
    }

    /// Sets each layer's mass target (the guard's auto-exposure moves them).
    pub fn set_targets(&mut self, targets: &[f64]) -> R {
        if targets.len() != self.layers.len() || targets.iter().any(|&t| !(t > 0.0 && t <= 1.0)) {
            return Err(ModelError::Unsupported(format!(
                "MLP mass targets {targets:?}: one per layer ({}), each in (0, 1]",
                self.layers.len()
            )));
        }
        self.targets = targets.iter().map(|&t| t as f32).collect();
        Ok(())
    }

    /// Runs layer `li`'s predictor on `x` (the LN2 output `[t, H]`) and fills `list` with the
    /// kept blocks of every group. `u` holds `relu(x·W1 + b1)` (`[t, r]`) and `o` the outputs
    /// `oᵀ` (`[nb, t]`), both in the model's type: forward-free scratch (the workspace's
    /// `tmp2` and `dact`, which only the backward uses).
    pub(super) fn select(
        &self,
        cx: &Ctx,
        li: usize,
        x: &DeviceTensor,
        (u, o): (&mut DeviceTensor, &mut DeviceTensor),
        list: &BlockList,
    ) -> R {
        let (t, h, r, nb) = (cx.t, cx.d.h, self.rank, self.num_blocks);
        let p = &self.layers[li];
        if u.numel() < t * r || o.numel() < nb * t {
            return Err(ModelError::Device(format!(
                "internal: predictor scratch of {} and {} elements for [{t}, {r}] and [{nb}, {t}]",
                u.numel(),
                o.numel()
            )));
        }
        mm(
            cx.blas,
            Mat::new(x, MatLayout::dense(t, h)),
            Mat::new(&p.w1, MatLayout::dense(h, r)),
            MatMut::new(u, MatLayout::dense(t, r)),
            false,
            false,
            1.0,
            0.0,
        )?;
        bias_add(cx.dev, u, &p.b1, t, r, true)?;
        // oᵀ = W2ᵀ · uᵀ: cuBLAS writes the block-major layout directly.
        mm(
            cx.blas,
            Mat::new(&p.w2, MatLayout::dense(r, nb)),
            Mat::new(u, MatLayout::dense(t, r)),
            MatMut::new(o, MatLayout::dense(nb, t)),
            true,
            true,
            1.0,
            0.0,
        )?;
        sparse_ops::select_blocks(
            cx.dev,
            &arg(o, &[nb, t])?,
            &p.b2.as_arg(),
            (p.scale, self.targets[li]),
            list,
        )
        .map_err(|e| ModelError::Device(format!("MLP block selection of layer {li}: {e}")))
    }
}
