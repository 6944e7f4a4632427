//! LoRA on the GPU: bf16 device copies of the host's f32 adapter matrices (uploaded at every
//! call: they are small and the optimizer changes them every step), an f32 buffer for their
//! gradients, and the branch GEMMs (RUNTIME.md §2.6):
//!
//! ```text
//! forward:  u = x·Aᵀ (saved);  y += s·u·Bᵀ
//! backward: dB = s·dyᵀ·u;  du = s·dy·B;  dA = duᵀ·x;  dx += du·A
//! ```
//!
//! With LoRA dropout the forward's `x` is the dropped input `x ⊙ mask`, and the backward
//! ([`Adapters::backward_masked`]) uses it for `dA` and masks the branch's input gradient.
//!
//! `dA` and `dB` accumulate in an f32 buffer, downloaded once per call into a [`PeftGrads`]
//! laid out like the [`LoraParams`].
//!
//! Every product of the branch is skinny (one side is the rank), so its time is the bytes it
//! moves. They run on the DSL's bandwidth-bound kernels (`lexp_kernels::lora_branch`):
//! `lora_down` (`u`, `du`), `lora_expand` (`s·u·Bᵀ`, `du·A`) and the deterministic split-K
//! `lora_wgrad` (`dA`, `dB`), when the rank is at most [`MAX_KERNEL_RANK`] and the features
//! are multiples of 8. They read `B` as `Bᵀ`, which [`DeviceLora::transpose_b`] writes once
//! per call. `u` and `du` are stored with [`rank_pad`] columns. Otherwise, and with
//! `LEXP_LORA_CUBLAS=1`, the branch is cuBLAS GEMMs, as is the backward of a branch with
//! LoRA dropout. The q/k/v branches mostly run neither way: [`super::lora_fold`] folds them
//! into the fused projection's GEMM (see its module doc for when it does not apply).

use super::lora_fold::QkvFold;
use super::ops::{
    add, copy_rows, dev_err, lora_down, lora_expand, lora_kernels, lora_wgrad, mm, mul_inplace,
    transpose_b, R,
};
use super::weights::{LayerWeights, ACT};
use crate::buffer::DeviceTensor;
use crate::cublas::{Blas, Mat, MatLayout, MatMut};
use crate::device::CudaDevice;
use crate::model::lora_branch::BranchGrads;
use crate::model::PeftGrads;
use crate::peft::{LoraParams, LoraTarget};
use lexp_compiler::dtype::Storage;

/// Where one module's matrices lie in the flat parameter and gradient buffers (elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Offset of `A` (`[r, in]`).
    pub a: usize,
    /// Offset of `B` (`[out, r]`).
    pub b: usize,
    /// Input features of the adapted projection.
    pub in_f: usize,
    /// Output features.
    pub out_f: usize,
}

/// `v`, or one zero when it is empty (a device tensor has at least one element).
fn pad_one(mut v: Vec<i32>) -> Vec<i32> {
    if v.is_empty() {
        v.push(0);
    }
    v
}

/// Per decoder layer, the slot of each target in [`LoraTarget::ALL`] order.
pub type Slots = Vec<[Option<Slot>; 6]>;

/// Rounds an element offset up to 8 elements (16-byte aligned bf16 starts).
fn align(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// The largest rank the branch kernels take (`lexp_kernels::lora_down`'s `R`); larger ranks
/// run on cuBLAS.
pub const MAX_KERNEL_RANK: usize = 16;

/// Columns of the saved `u` and of `du` for rank `r`: `r` rounded up to 8, so that their rows
/// are 16-byte aligned for the tensor-core kernels (the padding columns hold zeros).
pub fn rank_pad(r: usize) -> usize {
    align(r)
}

/// The flat layout of `lora`'s modules in the first `layers` layers (canonical order, `A`
/// then `B`, each 8-element aligned) and the total length.
pub fn layout(lora: &LoraParams, layers: usize) -> (Slots, usize) {
    let mut slots: Slots = vec![[None; 6]; layers];
    let mut off = 0;
    for (layer, target, m) in lora.modules() {
        if layer >= layers {
            continue;
        }
        let a = off;
        off += align(m.a.data.len());
        let b = off;
        off += align(m.b.data.len());
        slots[layer][target.index()] = Some(Slot {
            a,
            b,
            in_f: m.a.cols,
            out_f: m.b.rows,
        });
    }
    (slots, off)
}

/// The adapters of one call on the device, and their gradient buffer.
pub struct DeviceLora {
    /// Every `A` and `B`, bf16, at their slots.
    pub params: DeviceTensor,
    /// Their gradients, f32, at the same offsets.
    pub grads: DeviceTensor,
    /// Where each module lies.
    pub slots: Slots,
    /// Rank.
    pub r: usize,
    /// Scale `s` (`α/r` or `α/√r`).
    pub scale: f32,
    /// `Bᵀ [r, out]` of every module at its `B` slot (bf16; written by
    /// [`transpose_b`](Self::transpose_b)); `None` when the branch runs on cuBLAS.
    pub bt: Option<DeviceTensor>,
    /// Each module's `B` offset and row count (i32), for the one-launch transpose.
    b_slots: Option<(DeviceTensor, DeviceTensor)>,
    /// The q/k/v adapters folded into the projection's GEMM ([`super::lora_fold`]), when it
    /// applies (the branch kernels run, and the module doc's conditions hold).
    pub fold: Option<QkvFold>,
    len: usize,
}

/// The adapters as the layer code reads them.
#[derive(Clone, Copy)]
pub struct Adapters<'a> {
    /// See [`DeviceLora::params`].
    pub params: &'a DeviceTensor,
    /// See [`DeviceLora::slots`].
    pub slots: &'a [[Option<Slot>; 6]],
    /// Rank.
    pub r: usize,
    /// Scale.
    pub scale: f32,
    /// See [`DeviceLora::bt`].
    pub bt: Option<&'a DeviceTensor>,
    /// See [`DeviceLora::fold`].
    pub fold: Option<&'a QkvFold>,
}

impl DeviceLora {
    /// Allocates device copies for `lora` (first `layers` layers) and uploads it.
    pub fn new(dev: &CudaDevice, lora: &LoraParams, layers: usize) -> R<DeviceLora> {
        let (slots, len) = layout(lora, layers);
        let kernels = lora_kernels() && lora.config.r <= MAX_KERNEL_RANK;
        let bt = match kernels {
            true => Some(
                DeviceTensor::zeros(dev, ACT, &[len.max(1)])
                    .map_err(dev_err("allocating LoRA's transposed B"))?,
            ),
            false => None,
        };
        let b_slots = match bt {
            Some(_) => {
                let all: Vec<&Slot> = slots.iter().flatten().flatten().collect();
                let i32s = |f: &dyn Fn(&Slot) -> usize| -> R<DeviceTensor> {
                    let v = all.iter().map(|s| f(s) as i32).collect::<Vec<_>>();
                    DeviceTensor::from_i32(dev, &[v.len().max(1)], &pad_one(v))
                        .map_err(dev_err("uploading LoRA's B offsets"))
                };
                Some((i32s(&|s| s.b)?, i32s(&|s| s.out_f)?))
            }
            None => None,
        };
        let fold = match bt {
            Some(_) => QkvFold::new(dev, &slots, lora.config.r)?,
            None => None,
        };
        let mut d = DeviceLora {
            bt,
            b_slots,
            fold,
            params: DeviceTensor::zeros(dev, ACT, &[len.max(1)])
                .map_err(dev_err("allocating LoRA parameters"))?,
            grads: DeviceTensor::zeros(dev, Storage::F32, &[len.max(1)])
                .map_err(dev_err("allocating LoRA gradients"))?,
            slots,
            r: lora.config.r,
            scale: lora.config.scaling(),
            len,
        };
        d.upload(lora)?;
        Ok(d)
    }

    /// True when `lora` has this layout (same modules, shapes and rank).
    pub fn fits(&self, lora: &LoraParams) -> bool {
        let (slots, len) = layout(lora, self.slots.len());
        slots == self.slots && len == self.len && lora.config.r == self.r
    }

    /// Uploads `lora`'s current values (bf16) and scale; `lora` must [`fit`](Self::fits).
    pub fn upload(&mut self, lora: &LoraParams) -> R {
        let mut host = vec![0.0f32; self.len.max(1)];
        for (layer, target, m) in lora.modules() {
            if let Some(s) = self.slots.get(layer).and_then(|l| l[target.index()]) {
                host[s.a..s.a + m.a.data.len()].copy_from_slice(&m.a.data);
                host[s.b..s.b + m.b.data.len()].copy_from_slice(&m.b.data);
            }
        }
        self.scale = lora.config.scaling();
        self.params
            .write_f32(&host)
            .map_err(dev_err("uploading LoRA parameters"))
    }

    /// Writes every module's `Bᵀ` into [`bt`](Self::bt) (one launch, on the stream, before
    /// the layers read them); nothing when the branch runs on cuBLAS or nothing is adapted.
    pub fn transpose_b(&self, dev: &CudaDevice) -> R {
        let (Some(bt), Some((offs, rows))) = (&self.bt, &self.b_slots) else {
            return Ok(());
        };
        if self.slots.iter().flatten().flatten().next().is_none() {
            return Ok(());
        }
        transpose_b(dev, &self.params, (offs, rows), self.r, bt)
    }

    /// Writes the q/k/v adapters into the room of each layer's q/k/v weight (the fold;
    /// nothing when it does not apply). Like [`transpose_b`](Self::transpose_b), once per call,
    /// after the parameters changed and before the layers run.
    pub fn write_fold(&self, dev: &CudaDevice, weights: &[LayerWeights]) -> R {
        match &self.fold {
            Some(f) => f.write(dev, &self.params, self.scale, weights),
            None => Ok(()),
        }
    }

    /// Device addresses of every buffer the branch's launches name (for a CUDA graph's key).
    pub fn buffer_ptrs(&self) -> Vec<u64> {
        let mut v = vec![self.params.device_ptr(), self.grads.device_ptr()];
        v.extend(self.bt.as_ref().map(DeviceTensor::device_ptr));
        if let Some((offs, rows)) = &self.b_slots {
            v.extend([offs.device_ptr(), rows.device_ptr()]);
        }
        v.extend(self.fold.iter().flat_map(QkvFold::buffer_ptrs));
        v
    }

    /// Elements of the flat buffers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no module is adapted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The adapters for the layer code, and the gradient buffer.
    pub fn split(&mut self) -> (Adapters<'_>, &mut DeviceTensor) {
        (
            Adapters {
                params: &self.params,
                slots: &self.slots,
                r: self.r,
                scale: self.scale,
                bt: self.bt.as_ref(),
                fold: self.fold.as_ref(),
            },
            &mut self.grads,
        )
    }

    /// The host gradients from the downloaded flat buffer `flat`.
    pub fn grads_from(&self, flat: &[f32]) -> PeftGrads {
        grads_from(&self.slots, self.r, flat)
    }
}

/// Splits a flat gradient buffer laid out by `slots` (rank `r`) into per-module gradients.
pub fn grads_from(slots: &[[Option<Slot>; 6]], r: usize, flat: &[f32]) -> PeftGrads {
    let layers = slots
        .iter()
        .map(|l| {
            let mut g: [Option<BranchGrads>; 6] = Default::default();
            for (i, s) in l.iter().enumerate() {
                if let Some(s) = s {
                    g[i] = Some(BranchGrads {
                        a: flat[s.a..s.a + r * s.in_f].to_vec(),
                        b: flat[s.b..s.b + s.out_f * r].to_vec(),
                    });
                }
            }
            g
        })
        .collect();
    PeftGrads::from_lora(layers)
}

impl Adapters<'_> {
    /// The slot of `target` in `layer`, if adapted.
    pub fn slot(&self, layer: usize, target: LoraTarget) -> Option<Slot> {
        self.slots.get(layer).and_then(|l| l[target.index()])
    }

    fn a(&self, s: &Slot) -> Mat<'_> {
        Mat::new(self.params, MatLayout::at(s.a, self.r, s.in_f, s.in_f))
    }

    fn b(&self, s: &Slot) -> Mat<'_> {
        Mat::new(self.params, MatLayout::at(s.b, s.out_f, self.r, self.r))
    }

    /// `Bᵀ [r, out]` of `s` when the branch kernels run it: they do for ranks up to
    /// [`MAX_KERNEL_RANK`] and features that are multiples of 8 (16-byte rows).
    pub(super) fn bt(&self, s: &Slot) -> Option<Mat<'_>> {
        let bt = self
            .bt
            .filter(|_| s.in_f.is_multiple_of(8) && s.out_f.is_multiple_of(8))?;
        Some(Mat::new(bt, MatLayout::at(s.b, self.r, s.out_f, s.out_f)))
    }

    /// Where `rows` rows of a saved `u` (or of `du`) lie: `r` columns with a row stride of
    /// [`rank_pad`]`(r)`.
    fn u_layout(&self, off: usize, rows: usize) -> MatLayout {
        MatLayout::at(off, rows, self.r, rank_pad(self.r))
    }

    /// The same rows with their padding columns, as the branch kernels write and read them.
    fn u_padded(&self, off: usize, rows: usize) -> MatLayout {
        let rp = rank_pad(self.r);
        MatLayout::at(off, rows, rp, rp)
    }

    /// `y += s·(x·Aᵀ)·Bᵀ` for `rows` rows, saving `u = x·Aᵀ` at element `u_off` of `u`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        (dev, blas): (&CudaDevice, &Blas),
        s: &Slot,
        rows: usize,
        x: Mat<'_>,
        y: MatMut<'_>,
        u: &mut DeviceTensor,
        u_off: usize,
    ) -> R {
        if let Some(bt) = self.bt(s) {
            let up = self.u_padded(u_off, rows);
            lora_down(dev, x, self.a(s), 1.0, (u, up))?;
            return lora_expand(dev, Mat::new(u, up), bt, self.scale, y);
        }
        let ul = self.u_layout(u_off, rows);
        mm(
            blas,
            x,
            self.a(s),
            MatMut::new(u, ul),
            false,
            true,
            1.0,
            0.0,
        )?;
        mm(
            blas,
            Mat::new(u, ul),
            self.b(s),
            y,
            false,
            true,
            self.scale,
            1.0,
        )
    }

    /// `dB += s·dyᵀ·u` into `grads` and `du = s·dy·B` into the start of `du` (cuBLAS).
    #[allow(clippy::too_many_arguments)]
    fn grad_b_and_du(
        &self,
        blas: &Blas,
        s: &Slot,
        rows: usize,
        dy: Mat<'_>,
        (u, u_off): (&DeviceTensor, usize),
        du: &mut DeviceTensor,
        grads: &mut DeviceTensor,
    ) -> R {
        let r = self.r;
        let db = MatLayout::at(s.b, s.out_f, r, r);
        mm(
            blas,
            dy,
            Mat::new(u, self.u_layout(u_off, rows)),
            MatMut::new(grads, db),
            true,
            false,
            self.scale,
            1.0,
        )?;
        mm(
            blas,
            dy,
            self.b(s),
            MatMut::new(du, self.u_layout(0, rows)),
            false,
            false,
            self.scale,
            0.0,
        )
    }

    /// [`backward`](Self::backward) of a branch whose input was dropped with the mask at
    /// element `m_off` of `mask` (`[rows, in]`): `dA = duᵀ·(x ⊙ mask)` and
    /// `dx += (du·A) ⊙ mask`. `x` and `dx` are dense `[rows, in]` at the start of their
    /// buffers; `xd` (`[rows, in]` or larger) is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_masked(
        &self,
        (dev, blas): (&CudaDevice, &Blas),
        s: &Slot,
        rows: usize,
        x: &DeviceTensor,
        (mask, m_off): (&DeviceTensor, usize),
        dy: Mat<'_>,
        u: (&DeviceTensor, usize),
        du: &mut DeviceTensor,
        grads: &mut DeviceTensor,
        xd: &mut DeviceTensor,
        dx: &DeviceTensor,
    ) -> R {
        let (r, in_f) = (self.r, s.in_f);
        self.grad_b_and_du(blas, s, rows, dy, u, du, grads)?;
        let dul = self.u_layout(0, rows);
        // dA = duᵀ·(x ⊙ mask)  [r, in]
        copy_rows(dev, x, 0, xd, 0, rows, in_f)?;
        mul_inplace(dev, xd, mask, m_off, rows, in_f)?;
        let da = MatLayout::at(s.a, r, in_f, in_f);
        mm(
            blas,
            Mat::new(du, dul),
            Mat::new(xd, MatLayout::dense(rows, in_f)),
            MatMut::new(grads, da),
            true,
            false,
            1.0,
            1.0,
        )?;
        // dx += (du·A) ⊙ mask
        mm(
            blas,
            Mat::new(du, dul),
            self.a(s),
            MatMut::new(xd, MatLayout::dense(rows, in_f)),
            false,
            false,
            1.0,
            0.0,
        )?;
        mul_inplace(dev, xd, mask, m_off, rows, in_f)?;
        add(dev, xd, dx, rows * in_f)
    }

    /// The branch's backward for output gradient `dy`: adds `dA`, `dB` (f32) to `grads`
    /// and adds `du·A` to `dx`. `x` and `u` are what the forward saw and saved; `part` is the
    /// weight gradients' split-K scratch (f32, [`LORA_WGRAD_CHUNKS`](super::ops::LORA_WGRAD_CHUNKS)` · Q · rank_pad(r)` for
    /// the wider of the module's sides).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        (dev, blas): (&CudaDevice, &Blas),
        s: &Slot,
        rows: usize,
        x: Mat<'_>,
        dy: Mat<'_>,
        (u, u_off): (&DeviceTensor, usize),
        (du, part): (&mut DeviceTensor, &DeviceTensor),
        grads: &mut DeviceTensor,
        dx: MatMut<'_>,
    ) -> R {
        let r = self.r;
        if let Some(bt) = self.bt(s) {
            // dB += s·dyᵀ·u, du = s·dy·B, dA += duᵀ·x, dx += du·A.
            let up = Mat::new(u, self.u_padded(u_off, rows));
            lora_wgrad(dev, up, dy, part, r, self.scale, (grads, s.b, false))?;
            let dup = self.u_padded(0, rows);
            lora_down(dev, dy, bt, self.scale, (du, dup))?;
            lora_wgrad(dev, Mat::new(du, dup), x, part, r, 1.0, (grads, s.a, true))?;
            return lora_expand(dev, Mat::new(du, dup), self.a(s), 1.0, dx);
        }
        self.grad_b_and_du(blas, s, rows, dy, (u, u_off), du, grads)?;
        let dul = self.u_layout(0, rows);
        // dA = duᵀ·x  [r, in]
        let da = MatLayout::at(s.a, r, s.in_f, s.in_f);
        mm(
            blas,
            Mat::new(du, dul),
            x,
            MatMut::new(grads, da),
            true,
            false,
            1.0,
            1.0,
        )?;
        // dx += du·A
        mm(
            blas,
            Mat::new(du, dul),
            self.a(s),
            dx,
            false,
            false,
            1.0,
            1.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::OptConfig;
    use crate::peft::LoraConfig;
    use std::path::Path;

    #[test]
    fn layout_is_canonical_aligned_and_disjoint() {
        let c = OptConfig::from_json(
            r#"{"model_type":"opt","vocab_size":64,"hidden_size":20,"ffn_dim":36,
                "num_hidden_layers":3,"num_attention_heads":2,"max_position_embeddings":16}"#,
            Path::new("t/config.json"),
        )
        .unwrap();
        let cfg = LoraConfig {
            r: 3,
            targets: vec![LoraTarget::Fc2, LoraTarget::Q, LoraTarget::Fc1],
            ..LoraConfig::default()
        };
        let lora = LoraParams::init(&cfg, &c, 1);
        let (slots, len) = layout(&lora, 3);
        let mut spans = Vec::new();
        for (l, layer) in slots.iter().enumerate() {
            for t in LoraTarget::ALL {
                let s = layer[t.index()];
                assert_eq!(s.is_some(), lora.get(l, t).is_some(), "{l} {t:?}");
                if let Some(s) = s {
                    let (in_f, out_f) = t.dims(&c);
                    assert_eq!((s.in_f, s.out_f), (in_f, out_f));
                    assert_eq!((s.a % 8, s.b % 8), (0, 0));
                    spans.push((s.a, s.a + 3 * in_f));
                    spans.push((s.b, s.b + out_f * 3));
                }
            }
        }
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
        assert!(spans.last().unwrap().1 <= len);
        // The download splits the flat buffer back into each module's gradients.
        let flat: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let g = grads_from(&slots, 3, &flat);
        let (ga, gb) = g.get(1, LoraTarget::Fc1).unwrap();
        let s = slots[1][LoraTarget::Fc1.index()].unwrap();
        assert_eq!(ga[0], s.a as f32);
        assert_eq!(gb.len(), 36 * 3);
        assert_eq!(gb[0], s.b as f32);
        assert!(g.get(1, LoraTarget::K).is_none());
    }
}
