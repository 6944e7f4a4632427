//! The sparse MLP inside the GPU engine's step (DESIGN.md §7, MLP step 5).
//!
//! With block lists set, each layer's MLP runs the block-sparse operators of
//! `kernels/src/sparse_mlp.rs` instead of cuBLAS, over one list per layer (per 128-row group: the
//! kept neuron blocks):
//! - fc1 forward with bias + ReLU fused, `h` stored compactly (`sparse_fc1_fwd`);
//! - fc2 forward reducing over the kept blocks with the bias and the residual stream added in
//!   its epilogue (`sparse_fc2_fwd`); when a Houlsby adapter or residual dropout sits between
//!   them, the plain product (`sparse_red`), then bias, dropout and residual as in the dense
//!   layer;
//! - fc2's input gradient on the kept blocks, masked by the compact `h` (`sparse_fc2_dh`);
//! - fc1's input gradient reduced over the kept blocks (`sparse_fc1_dx`).
//!
//! This is exactly the CPU model with an [`MlpMask`](crate::model::MlpMask) that zeroes the other
//! blocks' activations, which is what the GPU test checks it against.
//!
//! Lists come from one of two sources ([`MlpSource`]): the predictors on the device
//! ([`super::predictor`]), which fill each layer's list inside the forward with nothing read
//! back, or [`SyntheticMlp`], random lists at a fixed density that stand in for a predictor
//! in measurements (everything they produce is labelled synthetic).
//! LoRA on fc1 or fc2 is refused with these lists, because the compact `h` has no place for a
//! branch on the full width. BitFit's fc1 bias gradient is summed over the kept blocks only
//! (`fc1_bias_grad`: the `sparse_colsum` kernel); a dropped block's gradient is zero.

use super::layer::Ctx;
use super::ops::{arg, arg_at, dev_err, R};
use super::predictor::MlpPredictors;
use super::weights::LayerWeights;
use crate::block_list::{random_host, BlockList};
use crate::model::{MlpMask, ModelError};
use crate::sparse_ops::{self, GROUP_ROWS};
use crate::{CudaDevice, DeviceTensor};
use lexp_compiler::dtype::Storage;

/// Random block lists at a fixed density in place of the predictor's, for measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyntheticMlp {
    /// Share of each row group's neuron blocks kept, in `(0, 1]`.
    pub density: f64,
    /// Neurons per block: 64 or 128, the compiled block sizes.
    pub block: usize,
    /// Seed of the lists. A layer's list depends on the seed, the layer and the token count.
    pub seed: u64,
}

impl SyntheticMlp {
    /// Checks the settings against an MLP of width `ffn`.
    pub fn check(&self, ffn: usize) -> R {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(ModelError::Unsupported(format!(
                "synthetic MLP density {} must be in (0, 1]",
                self.density
            )));
        }
        if !matches!(self.block, 64 | 128) || !ffn.is_multiple_of(self.block) {
            return Err(ModelError::Unsupported(format!(
                "synthetic MLP blocks of {} neurons: the sparse kernels take 64 or 128, \
                 dividing the MLP width {ffn}",
                self.block
            )));
        }
        Ok(())
    }
}

/// Where a sparse MLP's block lists come from.
pub enum MlpSource {
    /// Random lists (a synthetic predictor, for measurements).
    Synthetic(SyntheticMlp),
    /// The predictors on the device, run per layer inside the forward.
    Predicted(MlpPredictors),
}

impl MlpSource {
    /// The device predictors, if this source is one.
    pub fn predictors(&self) -> Option<&MlpPredictors> {
        match self {
            MlpSource::Predicted(p) => Some(p),
            MlpSource::Synthetic(_) => None,
        }
    }

    /// Whether `lists` can serve a batch of `t` tokens: synthetic lists are drawn for their
    /// token count; predicted ones are rewritten by every forward and depend only on the
    /// number of 128-token groups (so a new token count in the same groups allocates nothing).
    pub fn fits(&self, lists: &MlpLists, t: usize) -> bool {
        match self {
            MlpSource::Synthetic(_) => lists.t == t,
            MlpSource::Predicted(_) => {
                lists.host.is_none()
                    && lists.lists.first().map(BlockList::groups) == Some(t.div_ceil(GROUP_ROWS))
            }
        }
    }

    /// This source's lists for a batch of `t` tokens (`layers` layers of width `ffn`):
    /// drawn now (synthetic) or allocated for the forward to fill (predicted).
    pub fn lists(&self, dev: &CudaDevice, layers: usize, t: usize, ffn: usize) -> R<MlpLists> {
        match self {
            MlpSource::Synthetic(s) => MlpLists::synthetic(dev, s, layers, t, ffn),
            MlpSource::Predicted(p) => MlpLists::predicted(dev, p, t),
        }
    }
}

/// One batch's block lists, one per layer, on the device.
pub struct MlpLists {
    /// Tokens the lists were made for.
    pub t: usize,
    /// Neurons per block.
    pub block: usize,
    lists: Vec<BlockList>,
    /// The same lists on the host, `(counts, indices, max_blocks)` per layer, when the host
    /// made them (synthetic lists); predicted lists exist on the device only.
    host: Option<HostLists>,
}

/// Block lists made on the host: `(counts, indices, max_blocks)` per layer.
type HostLists = Vec<(Vec<i32>, Vec<i32>, usize)>;

impl MlpLists {
    /// Random lists for `t` tokens, `layers` layers of width `ffn`.
    pub fn synthetic(
        dev: &CudaDevice,
        s: &SyntheticMlp,
        layers: usize,
        t: usize,
        ffn: usize,
    ) -> R<MlpLists> {
        s.check(ffn)?;
        let (groups, nb) = (t.div_ceil(GROUP_ROWS), ffn / s.block);
        let mut lists = Vec::with_capacity(layers);
        let mut host = Vec::with_capacity(layers);
        for li in 0..layers {
            let seed = s.seed ^ ((li as u64) << 32) ^ t as u64;
            let (c, i, max) = random_host(groups, nb, s.density, seed);
            let list = BlockList::from_host(dev, &c, &i, max, nb)
                .map_err(dev_err(format!("synthetic block list of layer {li}")))?;
            lists.push(list);
            host.push((c, i, max));
        }
        Ok(MlpLists {
            t,
            block: s.block,
            lists,
            host: Some(host),
        })
    }

    /// Lists for `t` tokens that `p` fills on the device in each forward (allocated here,
    /// outside the step; every group starts with no block until the forward writes it).
    pub fn predicted(dev: &CudaDevice, p: &MlpPredictors, t: usize) -> R<MlpLists> {
        let groups = t.div_ceil(GROUP_ROWS);
        let lists = (0..p.layers())
            .map(|li| {
                let what = || format!("predicted block list of layer {li}");
                let counts =
                    DeviceTensor::zeros(dev, Storage::I32, &[groups]).map_err(dev_err(what()))?;
                let indices = DeviceTensor::zeros(dev, Storage::I32, &[groups, p.max_blocks])
                    .map_err(dev_err(what()))?;
                BlockList::from_device(counts, indices, p.num_blocks).map_err(dev_err(what()))
            })
            .collect::<R<Vec<_>>>()?;
        Ok(MlpLists {
            t,
            block: p.block,
            lists,
            host: None,
        })
    }

    /// Layer `li`'s list.
    pub fn layer(&self, li: usize) -> &BlockList {
        &self.lists[li]
    }

    /// Width of layer `li`'s compact activations (`max_blocks · block`).
    pub fn width(&self, li: usize) -> usize {
        self.lists[li].max_blocks() * self.block
    }

    /// Layer `li`'s list as the CPU model's mask (for tests and reports). Predicted lists
    /// are read back from the device (this waits for the queued work); such a list is
    /// validated on the way, so a kernel bug shows as an error here.
    pub fn mask(&self, dev: &CudaDevice, li: usize, ffn: usize) -> R<MlpMask> {
        let list = &self.lists[li];
        let (counts, indices, max) = match &self.host {
            Some(h) => h[li].clone(),
            None => {
                let (c, i) = list.validate_device(dev).map_err(dev_err(format!(
                    "reading back the block list of layer {li}"
                )))?;
                (c, i, list.max_blocks())
            }
        };
        let mut m = MlpMask::dense(self.t, ffn, GROUP_ROWS, self.block);
        m.keep.iter_mut().for_each(|k| *k = false);
        for (g, &c) in counts.iter().enumerate() {
            for &b in &indices[g * max..g * max + c as usize] {
                m.keep[g * m.num_blocks + b as usize] = true;
            }
        }
        Ok(m)
    }

    /// Share of (group, block) pairs kept over all layers.
    pub fn density(&self) -> f64 {
        let (mut kept, mut all) = (0usize, 0usize);
        for l in &self.lists {
            kept += l.groups() * l.max_blocks();
            all += l.groups() * l.num_blocks();
        }
        kept as f64 / all.max(1) as f64
    }
}

/// Tile configurations of the four kernels for blocks of `bs`: the ones `lexp bench mlp`'s
/// autotuner picked on the H200 at 25% density (`bench/results/2026-11-29-h200-sparse-mlp.json`;
/// with TMA, `bench/results/2026-11-30-h200-tma/call64/mlp.json`); all compile for sm_80 and
/// sm_90 (`TMA = 1` copies with TMA on sm_90 only, and exists for 64-wide K steps).
fn tiles(bs: usize) -> [Vec<(&'static str, usize)>; 4] {
    let (bk_dh, s) = (if bs == 64 { 32 } else { 64 }, 4);
    let tma_dh = usize::from(bk_dh == 64);
    // fc2 forward and fc1's input gradient: reductions over the kept blocks, one tile shape.
    let reduce = vec![
        ("BM", 128),
        ("BN", 256),
        ("BK", 64),
        ("S", s),
        ("W", 8),
        ("TMA", 1),
    ];
    [
        vec![("BM", 128), ("BK", 64), ("S", s), ("W", 8), ("TMA", 1)],
        reduce.clone(),
        vec![
            ("BM", 128),
            ("BK", bk_dh),
            ("S", s),
            ("W", 8),
            ("TMA", tma_dh),
        ],
        reduce,
    ]
}

fn op_err(what: &'static str) -> impl FnOnce(sparse_ops::SparseOpError) -> ModelError {
    move |e| ModelError::Device(format!("sparse MLP {what}: {e}"))
}

/// fc1 forward on the kept blocks: `act[:, ..width] = relu(b·W1[kept]ᵀ + b1[kept])`, compact.
pub(super) fn fc1_forward(
    cx: &Ctx,
    li: usize,
    m: &MlpLists,
    w: &LayerWeights,
    b: &DeviceTensor,
    act: &DeviceTensor,
) -> R {
    let (t, h, f) = (cx.t, cx.d.h, cx.d.f);
    let tile = &tiles(m.block)[0];
    sparse_ops::sparse_fc1_fwd(
        cx.dev,
        &arg(b, &[t, h])?,
        &arg(&w.w1, &[f, h])?,
        &arg(&w.b1, &[f])?,
        m.layer(li),
        &arg(act, &[t, m.width(li)])?,
        m.block,
        tile,
    )
    .map_err(op_err("fc1 forward"))
}

/// fc2 forward over the kept blocks: `y = act·W2[:, kept]ᵀ` (no bias).
pub(super) fn fc2_forward(
    cx: &Ctx,
    li: usize,
    m: &MlpLists,
    w: &LayerWeights,
    act: &DeviceTensor,
    y: &DeviceTensor,
) -> R {
    let (t, h, f) = (cx.t, cx.d.h, cx.d.f);
    sparse_ops::sparse_red(
        cx.dev,
        &arg(act, &[t, m.width(li)])?,
        &arg(&w.w2, &[h, f])?,
        m.layer(li),
        &arg(y, &[t, h])?,
        m.block,
        &tiles(m.block)[1],
    )
    .map_err(op_err("fc2 forward"))
}

/// fc2 forward over the kept blocks with its bias and the residual stream, the MLP block's
/// output in one pass: `out = act·W2[:, kept]ᵀ + b2 + res` (what [`fc2_forward`] and the
/// layer's `bias_residual` compute in two).
pub(super) fn fc2_forward_residual(
    cx: &Ctx,
    li: usize,
    m: &MlpLists,
    w: &LayerWeights,
    act: &DeviceTensor,
    res: &DeviceTensor,
    out: &DeviceTensor,
) -> R {
    let (t, h, f) = (cx.t, cx.d.h, cx.d.f);
    sparse_ops::sparse_fc2_fwd(
        cx.dev,
        &arg(act, &[t, m.width(li)])?,
        &arg(&w.w2, &[h, f])?,
        &arg(&w.b2, &[h])?,
        &arg(res, &[t, h])?,
        m.layer(li),
        &arg(out, &[t, h])?,
        m.block,
        &tiles(m.block)[1],
    )
    .map_err(op_err("fc2 forward"))
}

/// The MLP's input gradients on the kept blocks: `dact = (g·W2[:, kept]) ⊙ [act > 0]`
/// (compact), then `dx = dact·W1[kept]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    cx: &Ctx,
    li: usize,
    m: &MlpLists,
    w: &LayerWeights,
    g: &DeviceTensor,
    act: &DeviceTensor,
    dact: &DeviceTensor,
    dx: &DeviceTensor,
) -> R {
    let (t, h, f) = (cx.t, cx.d.h, cx.d.f);
    let (width, ts) = (m.width(li), tiles(m.block));
    sparse_ops::sparse_fc2_dh(
        cx.dev,
        &arg(g, &[t, h])?,
        &arg(&w.w2, &[h, f])?,
        &arg(act, &[t, width])?,
        m.layer(li),
        &arg(dact, &[t, width])?,
        m.block,
        &ts[2],
    )
    .map_err(op_err("fc2 input gradient"))?;
    sparse_ops::sparse_fc1_dx(
        cx.dev,
        &arg(dact, &[t, width])?,
        &arg(&w.w1, &[f, h])?,
        m.layer(li),
        &arg(dx, &[t, h])?,
        m.block,
        &ts[3],
    )
    .map_err(op_err("fc1 input gradient"))
}

/// BitFit's fc1 bias gradient under the sparse MLP: `grads[off + n] += Σ_rows dact[:, n]`
/// over the kept blocks of each row group (`dact` compact, as [`backward`] leaves it; `f`
/// the MLP width).
pub(super) fn fc1_bias_grad(
    cx: &Ctx,
    li: usize,
    m: &MlpLists,
    dact: &DeviceTensor,
    (grads, off, f): (&DeviceTensor, usize, usize),
) -> R {
    sparse_ops::sparse_colsum(
        cx.dev,
        &arg(dact, &[cx.t, m.width(li)])?,
        m.layer(li),
        &arg_at(grads, off, &[f])?,
        m.block,
    )
    .map_err(op_err("fc1 bias gradient"))
}
