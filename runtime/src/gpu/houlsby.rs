//! Houlsby adapters on the GPU (RUNTIME.md §2.7), ReLU bottleneck: bf16 copies of the
//! host's f32 adapters (uploaded at every call, like LoRA's), the activations the backward
//! needs (the adapter's input `h` and `g = relu(h·W_dᵀ + b_d)`, per layer and site), and an
//! f32 gradient buffer laid out like [`HoulsbyParams::tensors`]:
//!
//! ```text
//! forward:  g = relu(h·W_dᵀ + b_d) (saved, with h);  h += g·W_uᵀ   (b_u: the caller's bias)
//! backward: dW_u += dᵀ·g;  db_u += 1ᵀ·d;  dr = (d·W_u) ⊙ [g > 0]
//!           dW_d += drᵀ·h;  db_d += 1ᵀ·dr;  d += dr·W_d            (d becomes dh in place)
//! ```
//!
//! The device optimizer ([`super::optimizer`]) keeps the adapters' state in the gradient
//! buffer's layout ([`DeviceHoulsby::flat_layout`]) and rounds its updated master copy into
//! the bf16 parameters on the device ([`DeviceHoulsby::take_master`]), so a training step
//! uploads nothing. GELU adapters run on the CPU engine.

use super::ops::{
    bias_add, column_sums, convert_from, copy_rows, dense, dense_mut, dev_err, mm, relu_bwd, R,
};
use super::optimizer::FlatLayout;
use super::weights::ACT;
use crate::buffer::DeviceTensor;
use crate::cublas::{Blas, MatLayout, MatMut};
use crate::device::CudaDevice;
use crate::model::houlsby_branch::HoulsbyGrads as HostGrads;
use crate::model::{ModelError, PeftGrads};
use crate::peft::{AdapterActivation, HoulsbyModule, HoulsbyParams};
use lexp_compiler::dtype::Storage;

/// One adapter's parameters on the device, bf16.
pub struct AdapterDev {
    down: DeviceTensor,
    down_bias: DeviceTensor,
    up: DeviceTensor,
    /// `b_u`, `[H]`: added by the caller with the residual.
    pub up_bias: DeviceTensor,
}

/// What one adapter's forward saves: its input `h [T, H]` and `g [T, m]`.
pub struct SavedAdapter {
    h: DeviceTensor,
    g: DeviceTensor,
}

/// Offsets of one adapter's gradients in the flat buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slots {
    down: usize,
    down_bias: usize,
    up: usize,
    up_bias: usize,
}

/// Houlsby adapters' device state.
pub struct DeviceHoulsby {
    params: Vec<[AdapterDev; 2]>,
    saved: Vec<[SavedAdapter; 2]>,
    slots: Vec<[Slots; 2]>,
    /// The gradients, f32.
    pub grads: DeviceTensor,
    ones: DeviceTensor,
    dr: DeviceTensor,
    /// Elements of the gradient buffer.
    len: usize,
    /// Tokens the saved activations hold.
    tokens: usize,
    m: usize,
    h: usize,
}

/// One layer's adapters for the forward: parameters and where to save.
pub struct LayerForward<'a> {
    params: &'a [AdapterDev; 2],
    saved: &'a mut [SavedAdapter; 2],
}

/// One layer's adapters for the backward: parameters and what the forward saved.
#[derive(Clone, Copy)]
pub struct LayerBackward<'a> {
    params: &'a [AdapterDev; 2],
    saved: &'a [SavedAdapter; 2],
}

/// Everything's parameters and saved activations, read-only (the backward's side).
pub struct Read<'a> {
    params: &'a [[AdapterDev; 2]],
    saved: &'a [[SavedAdapter; 2]],
}

/// The gradient buffer and scratch the backward writes.
pub struct Grads<'a> {
    slots: &'a [[Slots; 2]],
    grads: &'a mut DeviceTensor,
    ones: &'a DeviceTensor,
    dr: &'a mut DeviceTensor,
    m: usize,
    h: usize,
}

fn alloc(dev: &CudaDevice, dtype: Storage, n: usize, what: &str) -> R<DeviceTensor> {
    DeviceTensor::zeros(dev, dtype, &[n.max(1)]).map_err(dev_err(format!("allocating {what}")))
}

impl DeviceHoulsby {
    /// Device state for `p` and batches of up to `tokens` tokens; an error for GELU adapters.
    pub fn new(dev: &CudaDevice, p: &HoulsbyParams, tokens: usize) -> R<DeviceHoulsby> {
        if p.config.activation != AdapterActivation::Relu {
            return Err(ModelError::Unsupported(format!(
                "{} Houlsby adapters on the GPU engine (ReLU only); run them on the CPU engine",
                p.config.activation.name()
            )));
        }
        let (m, h) = (
            p.config.bottleneck,
            p.layers.first().map_or(0, |l| l[0].down.cols),
        );
        let mut off = 0;
        let mut take = |n: usize| {
            let at = off;
            off += n.div_ceil(8) * 8;
            at
        };
        let slots: Vec<[Slots; 2]> = p
            .layers
            .iter()
            .map(|_| {
                [0, 1].map(|_| Slots {
                    down: take(m * h),
                    down_bias: take(m),
                    up: take(h * m),
                    up_bias: take(h),
                })
            })
            .collect();
        let len = off;
        let adapter = |_: usize| -> R<AdapterDev> {
            Ok(AdapterDev {
                down: alloc(dev, ACT, m * h, "adapter W_d")?,
                down_bias: alloc(dev, ACT, m, "adapter b_d")?,
                up: alloc(dev, ACT, h * m, "adapter W_u")?,
                up_bias: alloc(dev, ACT, h, "adapter b_u")?,
            })
        };
        let saved = |_: usize| -> R<SavedAdapter> {
            Ok(SavedAdapter {
                h: alloc(dev, ACT, tokens * h, "adapter inputs")?,
                g: alloc(dev, ACT, tokens * m, "adapter activations")?,
            })
        };
        let mut d = DeviceHoulsby {
            params: p
                .layers
                .iter()
                .map(|_| Ok([adapter(0)?, adapter(1)?]))
                .collect::<R<_>>()?,
            saved: p
                .layers
                .iter()
                .map(|_| Ok([saved(0)?, saved(1)?]))
                .collect::<R<_>>()?,
            slots,
            grads: alloc(dev, Storage::F32, len, "adapter gradients")?,
            ones: DeviceTensor::from_f32(dev, ACT, &[tokens.max(1)], &vec![1.0; tokens.max(1)])
                .map_err(dev_err("allocating ones"))?,
            dr: alloc(dev, ACT, tokens * m, "adapter scratch")?,
            len,
            tokens,
            m,
            h,
        };
        d.upload(p)?;
        Ok(d)
    }

    /// True when `p` has this shape and batches of `tokens` tokens fit.
    pub fn fits(&self, p: &HoulsbyParams, tokens: usize) -> bool {
        p.layers.len() == self.params.len()
            && p.config.bottleneck == self.m
            && p.config.activation == AdapterActivation::Relu
            && p.layers.first().map_or(0, |l| l[0].down.cols) == self.h
            && tokens <= self.tokens
    }

    /// Uploads `p`'s current values (bf16).
    pub fn upload(&mut self, p: &HoulsbyParams) -> R {
        let what = "uploading Houlsby adapters";
        for (dl, hl) in self.params.iter_mut().zip(&p.layers) {
            for (d, m) in dl.iter_mut().zip(hl) {
                let HoulsbyModule {
                    down,
                    down_bias,
                    up,
                    up_bias,
                } = m;
                d.down.write_f32(&down.data).map_err(dev_err(what))?;
                d.down_bias
                    .write_f32(&down_bias.data)
                    .map_err(dev_err(what))?;
                d.up.write_f32(&up.data).map_err(dev_err(what))?;
                d.up_bias.write_f32(&up_bias.data).map_err(dev_err(what))?;
            }
        }
        Ok(())
    }

    /// The layout the device optimizer keeps the adapters' state in: the gradient buffer's,
    /// in [`HoulsbyParams::tensors`] order.
    pub fn flat_layout(&self) -> FlatLayout {
        let (m, h) = (self.m, self.h);
        let spans = self
            .slots
            .iter()
            .flatten()
            .flat_map(|s| {
                [
                    (s.down, m * h),
                    (s.down_bias, m),
                    (s.up, h * m),
                    (s.up_bias, h),
                ]
            })
            .collect();
        FlatLayout {
            len: self.len,
            spans,
        }
    }

    /// Rounds the optimizer's updated f32 master copy `master` (laid out like
    /// [`flat_layout`](Self::flat_layout)) into the adapters' bf16 parameters.
    pub fn take_master(&self, dev: &CudaDevice, master: &DeviceTensor) -> R {
        let (m, h) = (self.m, self.h);
        for (dl, sl) in self.params.iter().zip(&self.slots) {
            for (d, s) in dl.iter().zip(sl) {
                convert_from(dev, (master, s.down), &d.down, m * h)?;
                convert_from(dev, (master, s.down_bias), &d.down_bias, m)?;
                convert_from(dev, (master, s.up), &d.up, h * m)?;
                convert_from(dev, (master, s.up_bias), &d.up_bias, h)?;
            }
        }
        Ok(())
    }

    /// Layer `li`'s adapters for the forward.
    pub fn layer(&mut self, li: usize) -> Option<LayerForward<'_>> {
        Some(LayerForward {
            params: self.params.get(li)?,
            saved: self.saved.get_mut(li)?,
        })
    }

    /// The backward's two sides.
    pub fn split(&mut self) -> (Read<'_>, Grads<'_>) {
        (
            Read {
                params: &self.params,
                saved: &self.saved,
            },
            Grads {
                slots: &self.slots,
                grads: &mut self.grads,
                ones: &self.ones,
                dr: &mut self.dr,
                m: self.m,
                h: self.h,
            },
        )
    }

    /// Copies the downloaded gradient buffer `flat` into `out`'s adapter entries.
    pub fn grads_into(&self, flat: &[f32], out: &mut PeftGrads) {
        let (m, h) = (self.m, self.h);
        let cut = |off: usize, n: usize| flat[off..off + n].to_vec();
        for (l, slots) in out.layers.iter_mut().zip(&self.slots) {
            for (g, s) in l.houlsby.iter_mut().zip(slots) {
                *g = Some(HostGrads {
                    down: cut(s.down, m * h),
                    down_bias: cut(s.down_bias, m),
                    up: cut(s.up, h * m),
                    up_bias: cut(s.up_bias, h),
                });
            }
        }
    }
}

impl Read<'_> {
    /// Layer `li`'s adapters for the backward.
    pub fn layer(&self, li: usize) -> Option<LayerBackward<'_>> {
        Some(LayerBackward {
            params: self.params.get(li)?,
            saved: self.saved.get(li)?,
        })
    }
}

impl LayerForward<'_> {
    /// The adapter at `site` (0: attention, 1: MLP) on `y [t, H]` (the sub-block's output,
    /// bias included), in place but for `b_u`, which [`AdapterDev::up_bias`] gives the caller.
    pub fn forward(
        &mut self,
        dev: &CudaDevice,
        blas: &Blas,
        site: usize,
        y: &mut DeviceTensor,
        t: usize,
    ) -> R<&DeviceTensor> {
        let (p, s) = (&self.params[site], &mut self.saved[site]);
        let (m, h) = (p.down_bias.numel(), p.up_bias.numel());
        copy_rows(dev, y, 0, &mut s.h, 0, t, h)?;
        let (x, wd) = (dense(&s.h, t, h), dense(&p.down, m, h));
        mm(
            blas,
            x,
            wd,
            dense_mut(&mut s.g, t, m),
            false,
            true,
            1.0,
            0.0,
        )?;
        bias_add(dev, &s.g, &p.down_bias, t, m, true)?;
        let (g, wu) = (dense(&s.g, t, m), dense(&p.up, h, m));
        mm(blas, g, wu, dense_mut(y, t, h), false, true, 1.0, 1.0)?;
        Ok(&p.up_bias)
    }
}

impl Grads<'_> {
    /// The adapter at `site` (0 attention, 1 MLP) of layer `li`, backward: `d [t, H]` holds the gradient of the
    /// adapter's output and becomes the gradient of its input; the parameters' gradients are
    /// added to the buffer.
    pub fn backward(
        &mut self,
        dev: &CudaDevice,
        blas: &Blas,
        (li, site): (usize, usize),
        layer: LayerBackward<'_>,
        d: &mut DeviceTensor,
        t: usize,
    ) -> R {
        let (m, h) = (self.m, self.h);
        let (p, s) = (&layer.params[site], &layer.saved[site]);
        let sl = self.slots.get(li).map(|l| l[site]).ok_or_else(|| {
            ModelError::Device(format!("internal: no adapter slots for layer {li}"))
        })?;
        let (ones, grads) = (self.ones, &mut *self.grads);
        // dW_u += dᵀ·g; db_u += 1ᵀ·d.
        linear_grads(
            blas,
            (ones, &mut *grads),
            (sl.up, sl.up_bias),
            (&*d, h),
            (&s.g, m),
            t,
        )?;
        // dr = (d·W_u) ⊙ [g > 0].
        let dr = dense_mut(&mut *self.dr, t, m);
        mm(
            blas,
            dense(d, t, h),
            dense(&p.up, h, m),
            dr,
            false,
            false,
            1.0,
            0.0,
        )?;
        relu_bwd(dev, &s.g, &*self.dr, t * m)?;
        // dW_d += drᵀ·h; db_d += 1ᵀ·dr; d += dr·W_d.
        let dr = &*self.dr;
        linear_grads(
            blas,
            (ones, grads),
            (sl.down, sl.down_bias),
            (dr, m),
            (&s.h, h),
            t,
        )?;
        let dx = dense_mut(d, t, h);
        mm(
            blas,
            dense(dr, t, m),
            dense(&p.down, m, h),
            dx,
            false,
            false,
            1.0,
            1.0,
        )
    }
}

/// The gradients of a linear map `y = x·Wᵀ + b` (`W [out_f, in_f]`) for the output gradient
/// `dy [t, out_f]`, added at `(w_off, b_off)` of the f32 buffer `grads`: `dW += dyᵀ·x`,
/// `db += 1ᵀ·dy`.
fn linear_grads(
    blas: &Blas,
    (ones, grads): (&DeviceTensor, &mut DeviceTensor),
    (w_off, b_off): (usize, usize),
    (dy, out_f): (&DeviceTensor, usize),
    (x, in_f): (&DeviceTensor, usize),
    t: usize,
) -> R {
    let dw = MatMut::new(&mut *grads, MatLayout::at(w_off, out_f, in_f, in_f));
    mm(
        blas,
        dense(dy, t, out_f),
        dense(x, t, in_f),
        dw,
        true,
        false,
        1.0,
        1.0,
    )?;
    column_sums(blas, ones, dense(dy, t, out_f), grads, (b_off, out_f), t)
}
