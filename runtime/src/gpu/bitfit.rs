//! BitFit on the GPU (RUNTIME.md §2.8): the trained biases replace the base ones in the
//! device weights ([`upload_biases`], before every call: they are small and change every
//! step), and the backward adds each bias gradient `Σ_rows dY` into an f32 buffer laid out
//! like [`BitFitParams::tensors`] ([`BitFitGrads::column_sums`]: one GEMM `1ᵀ·dY` with a
//! vector of ones, accumulating with beta 1 like LoRA's `dA`, `dB`).
//!
//! The device optimizer ([`super::optimizer`]) keeps BitFit's state in the gradient buffer's
//! layout ([`BiasSlots::flat_layout`]); the updated biases come back to the host and are
//! uploaded into the weights at the next call (half a million values at OPT-1.3B).

use super::ops::{column_sums, dev_err, R};
use super::optimizer::FlatLayout;
use super::weights::{DeviceWeights, ACT};
use crate::buffer::DeviceTensor;
use crate::checkpoint::OptModel;
use crate::cublas::{Blas, Mat};
use crate::device::CudaDevice;
use crate::model::PeftGrads;
use crate::peft::{BiasSite, BitFitParams, LoraTarget};
use lexp_compiler::dtype::Storage;

/// Offsets (elements) of each trained bias in the gradient buffer: per layer per
/// [`BiasSite::ALL`], then the final LayerNorm β.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BiasSlots {
    /// Per layer, per site: `(offset, length)` when trained.
    pub layers: Vec<[Option<(usize, usize)>; 8]>,
    /// The final LayerNorm β: `(offset, length)` when trained.
    pub final_ln: Option<(usize, usize)>,
    /// Elements of the buffer.
    pub len: usize,
}

impl BiasSlots {
    /// The layout of `b`'s tensors in canonical order, each start 8-element aligned.
    pub fn of(b: &BitFitParams) -> BiasSlots {
        let mut off = 0;
        let mut take = |n: usize| {
            let at = off;
            off += n.div_ceil(8) * 8;
            (at, n)
        };
        let layers = b
            .layers
            .iter()
            .map(|l| l.each_ref().map(|m| m.as_ref().map(|m| take(m.data.len()))))
            .collect();
        let final_ln = b.final_ln.as_ref().map(|m| take(m.data.len()));
        BiasSlots {
            layers,
            final_ln,
            len: off,
        }
    }
}

impl BiasSlots {
    /// The layout the device optimizer keeps BitFit's state in: the gradient buffer's, in
    /// [`BitFitParams::tensors`] order.
    pub fn flat_layout(&self) -> FlatLayout {
        let spans = self
            .layers
            .iter()
            .flat_map(|l| l.iter().flatten().copied())
            .chain(self.final_ln)
            .collect();
        FlatLayout {
            len: self.len,
            spans,
        }
    }
}

/// BitFit's device state: the gradient buffer and a vector of ones for the column sums.
pub struct DeviceBitFit {
    /// Where each bias's gradient lies.
    pub slots: BiasSlots,
    /// The gradients, f32.
    pub grads: DeviceTensor,
    /// `ones.numel()` ones (bf16), at least the batch's tokens.
    ones: DeviceTensor,
}

/// What the layer code needs to add bias gradients.
pub struct BitFitGrads<'a> {
    slots: &'a BiasSlots,
    ones: &'a DeviceTensor,
    grads: &'a mut DeviceTensor,
}

impl DeviceBitFit {
    /// Buffers for `b` and batches of up to `tokens` tokens.
    pub fn new(dev: &CudaDevice, b: &BitFitParams, tokens: usize) -> R<DeviceBitFit> {
        let slots = BiasSlots::of(b);
        Ok(DeviceBitFit {
            grads: DeviceTensor::zeros(dev, Storage::F32, &[slots.len.max(1)])
                .map_err(dev_err("allocating BitFit gradients"))?,
            ones: ones(dev, tokens)?,
            slots,
        })
    }

    /// True when `b` has this layout and `tokens` fit the vector of ones.
    pub fn fits(&self, b: &BitFitParams, tokens: usize) -> bool {
        BiasSlots::of(b) == self.slots && self.ones.numel() >= tokens
    }

    /// The view the backward writes through.
    pub fn view(&mut self) -> BitFitGrads<'_> {
        BitFitGrads {
            slots: &self.slots,
            ones: &self.ones,
            grads: &mut self.grads,
        }
    }

    /// Copies the downloaded gradient buffer `flat` into `out`'s bias entries.
    pub fn grads_into(&self, flat: &[f32], out: &mut PeftGrads) {
        let cut = |(off, n): (usize, usize)| flat[off..off + n].to_vec();
        for (l, slots) in out.layers.iter_mut().zip(&self.slots.layers) {
            for (g, s) in l.biases.iter_mut().zip(slots) {
                *g = s.map(cut);
            }
        }
        out.final_ln_bias = self.slots.final_ln.map(cut);
    }
}

fn ones(dev: &CudaDevice, n: usize) -> R<DeviceTensor> {
    let n = n.max(1);
    DeviceTensor::from_f32(dev, ACT, &[n], &vec![1.0; n]).map_err(dev_err("allocating ones"))
}

impl BitFitGrads<'_> {
    /// Adds `Σ_rows dy` (`dy` a `[t, n]` view) to the gradient of `site` in layer `li`, if
    /// trained.
    pub fn column_sums(
        &mut self,
        blas: &Blas,
        li: usize,
        site: BiasSite,
        dy: Mat<'_>,
        t: usize,
    ) -> R {
        let Some((off, n)) = self.slots.layers.get(li).and_then(|l| l[site.index()]) else {
            return Ok(());
        };
        self.add(blas, off, n, dy, t)
    }

    /// Where layer `li`'s bias at `site` lies in the gradient buffer, and the buffer, when
    /// that bias is trained (for gradients not summed by a GEMM, e.g. the sparse MLP's fc1).
    pub fn slot(&self, li: usize, site: BiasSite) -> Option<(&DeviceTensor, usize, usize)> {
        let (off, n) = self.slots.layers.get(li).and_then(|l| l[site.index()])?;
        Some((&*self.grads, off, n))
    }

    /// [`column_sums`](Self::column_sums) for the final LayerNorm β.
    pub fn final_ln(&mut self, blas: &Blas, dy: Mat<'_>, t: usize) -> R {
        match self.slots.final_ln {
            Some((off, n)) => self.add(blas, off, n, dy, t),
            None => Ok(()),
        }
    }

    fn add(&mut self, blas: &Blas, off: usize, n: usize, dy: Mat<'_>, t: usize) -> R {
        column_sums(blas, self.ones, dy, self.grads, (off, n), t)
    }
}

/// Writes the biases the forward uses into `weights`: BitFit's trained values where `b`
/// trains them, the base model's elsewhere (a model without a bias or LayerNorm gets zeros
/// and ones, as [`DeviceWeights::upload`] does).
pub fn upload_biases(weights: &mut DeviceWeights, model: &OptModel, b: Option<&BitFitParams>) -> R {
    let trained = |li: usize, site: BiasSite| b.and_then(|b| b.bias(li, site));
    let err = |what: String| dev_err(format!("uploading {what}"));
    for (li, (dw, l)) in weights
        .layers
        .iter_mut()
        .zip(&model.weights.layers)
        .enumerate()
    {
        let bias = |site: BiasSite, out_f: usize| -> Vec<f32> {
            trained(li, site)
                .or(site.base(l))
                .map_or_else(|| vec![0.0; out_f], <[f32]>::to_vec)
        };
        let (h, f) = (model.config.hidden_size, model.config.ffn_dim);
        let mut qkv = Vec::with_capacity(3 * h);
        for t in [LoraTarget::Q, LoraTarget::K, LoraTarget::V] {
            qkv.extend(bias(BiasSite::Linear(t), h));
        }
        let name = |what: &str| format!("layer {li} {what}");
        dw.bqkv.write_f32(&qkv).map_err(err(name("q/k/v bias")))?;
        let out = bias(BiasSite::Linear(LoraTarget::Out), h);
        dw.bo.write_f32(&out).map_err(err(name("out_proj bias")))?;
        let fc1 = bias(BiasSite::Linear(LoraTarget::Fc1), f);
        dw.b1.write_f32(&fc1).map_err(err(name("fc1 bias")))?;
        let fc2 = bias(BiasSite::Linear(LoraTarget::Fc2), h);
        dw.b2.write_f32(&fc2).map_err(err(name("fc2 bias")))?;
        let ln1 = bias(BiasSite::AttnLayerNorm, h);
        dw.ln1.1.write_f32(&ln1).map_err(err(name("LayerNorm β")))?;
        let ln2 = bias(BiasSite::MlpLayerNorm, h);
        dw.ln2.1.write_f32(&ln2).map_err(err(name("LayerNorm β")))?;
    }
    if let (Some(dln), Some(ln)) = (&mut weights.final_ln, &model.weights.final_layer_norm) {
        let trained = b
            .and_then(|b| b.final_ln.as_ref())
            .map(|m| m.data.as_slice());
        let beta: &[f32] = trained.unwrap_or(&ln.bias);
        dln.1
            .write_f32(beta)
            .map_err(err("final LayerNorm β".into()))?;
    }
    Ok(())
}
