//! AdamW on the device, so that a training step never sends the gradients to the host and the
//! adapter back: the GPU engine's [`Engine::optimizer_step`](crate::train::Engine::optimizer_step).
//!
//! The state of each trained method (LoRA, BitFit, Houlsby adapters) is kept in the flat
//! layout of that method's device gradient buffer ([`FlatLayout`]: LoRA's every module `A`
//! then `B`, BitFit's biases, the adapters' four tensors; 8-element aligned, the gaps stay
//! zero): an f32 master copy of the parameters, the moments `m` and `v`, and the partial sums
//! of squares of the gradient. Per step, after the micro-batches' gradients are summed in
//! place on the device:
//!
//! 1. `sum_squares` writes one partial per 16k gradients of each method; the host adds the
//!    partials in f64 and takes the square root: the norm `clip_grad_norm` reports over all
//!    trained tensors.
//! 2. The host decides, exactly as [`host_optimizer_step`](crate::train::host_optimizer_step)
//!    does, whether the step is applied (finite loss and norm) and the clipping coefficient
//!    (`max_norm / (norm + 1e-6)` when under 1, in f32).
//! 3. `adamw` updates master, `m` and `v` from the gradient times that coefficient; `convert`
//!    rounds the master into the bf16 parameters the next forward reads (LoRA's flat buffer,
//!    the adapters' tensors; BitFit's biases are uploaded into the weights at the next call);
//!    the master comes back to the host parameters (3 MB at OPT-1.3B with LoRA r=4 on q,v,
//!    51 MB with Houlsby adapters of 64).
//!
//! The moments stay on the device ([`AdamW::record_device_step`]) until
//! [`DeviceAdamW::download_moments`] hands them back for a checkpoint. Three small reads per
//! step (losses, partials, parameters) are the only synchronisations.

use super::lora::Slots;
use super::ops::{arg, convert, dev_err, R};
use crate::buffer::DeviceTensor;
use crate::device::CudaDevice;
use crate::model::ModelError;
use crate::optim::AdamW;
use crate::peft::LoraParams;
use cudarc::driver::PinnedHostSlice;
use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as k;
use lexp_kernels::AdamwStep;

/// `(offset, length)` in the flat buffers of each of `lora`'s tensors, in
/// [`LoraParams::tensors`] order (each module's `A`, then its `B`).
pub fn lora_spans(lora: &LoraParams, slots: &Slots) -> R<Vec<(usize, usize)>> {
    let mut spans = Vec::new();
    for (layer, target, m) in lora.modules() {
        let s = slots
            .get(layer)
            .and_then(|l| l[target.index()])
            .ok_or_else(|| {
                ModelError::Device(format!(
                    "internal: layer {layer} {target:?} has no slot on the device"
                ))
            })?;
        spans.push((s.a, m.a.data.len()));
        spans.push((s.b, m.b.data.len()));
    }
    Ok(spans)
}

/// Gathers per-tensor values into a flat buffer of `len` elements (zeros in the gaps).
pub fn to_flat(tensors: &[&[f32]], spans: &[(usize, usize)], len: usize) -> R<Vec<f32>> {
    if tensors.len() != spans.len() {
        return Err(ModelError::Device(format!(
            "internal: {} tensors for {} slots",
            tensors.len(),
            spans.len()
        )));
    }
    let mut flat = vec![0.0f32; len];
    for (t, &(off, n)) in tensors.iter().zip(spans) {
        let dst = flat
            .get_mut(off..off + n)
            .filter(|_| t.len() == n)
            .ok_or_else(|| ModelError::Device("internal: tensor does not fit its slot".into()))?;
        dst.copy_from_slice(t);
    }
    Ok(flat)
}

/// Splits a flat buffer back into per-tensor vectors.
pub fn from_flat(flat: &[f32], spans: &[(usize, usize)]) -> R<Vec<Vec<f32>>> {
    spans
        .iter()
        .map(|&(off, n)| {
            flat.get(off..off + n)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| ModelError::Device("internal: flat buffer too short".into()))
        })
        .collect()
}

/// `clip_grad_norm`'s coefficient for `norm` (1 when clipping is off or not needed), in f32
/// as torch computes it.
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    if !(norm.is_finite() && max_norm > 0.0 && max_norm.is_finite()) {
        return 1.0;
    }
    let coef = max_norm / (norm + 1e-6);
    coef.min(1.0)
}

fn launch_err(what: &'static str) -> impl FnOnce(LaunchError) -> ModelError {
    move |e| ModelError::Device(format!("{what}: {e}"))
}

/// One flat f32 buffer of the optimizer's state: a master copy of the parameters it mirrors,
/// the moments `m` and `v`, and the gradient-norm partials, laid out like one adapter
/// method's gradient buffer.
struct FlatState {
    master: DeviceTensor,
    m: DeviceTensor,
    v: DeviceTensor,
    partials: DeviceTensor,
    layout: FlatLayout,
    /// Page-locked host memory the updated master copy is read into every step (51 MB for
    /// OPT-1.3B's adapters: a pageable copy plus decoding cost ~30 ms), made at the first read.
    pinned: Option<PinnedHostSlice<u8>>,
}

/// Where the host tensors of one adapter method lie in its flat device buffers: `len`
/// elements, and `(offset, length)` per tensor in the method's `tensors()` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatLayout {
    /// Elements of the buffers.
    pub len: usize,
    /// Each tensor's `(offset, length)`.
    pub spans: Vec<(usize, usize)>,
}

impl FlatState {
    fn new(dev: &CudaDevice, layout: FlatLayout) -> R<FlatState> {
        let f32s = |what: &'static str, n: usize| {
            DeviceTensor::zeros(dev, Storage::F32, &[n.max(1)]).map_err(dev_err(what))
        };
        let len = layout.len;
        Ok(FlatState {
            master: f32s("allocating the adapter's f32 master copy", len)?,
            m: f32s("allocating AdamW's first moments", len)?,
            v: f32s("allocating AdamW's second moments", len)?,
            partials: f32s(
                "allocating the gradient-norm partials",
                len.div_ceil(k::SUM_SQUARES_CHUNK),
            )?,
            layout,
            pinned: None,
        })
    }

    /// Uploads the master copy from `params` and the moments `m`, `v` (one vector per tensor).
    fn load(&mut self, params: &[&[f32]], m: &[Vec<f32>], v: &[Vec<f32>]) -> R {
        let (spans, len) = (&self.layout.spans, self.layout.len);
        let flat = |x: &[Vec<f32>]| {
            let refs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
            to_flat(&refs, spans, len)
        };
        let master = to_flat(params, spans, len)?;
        self.master
            .write_f32(&pad(master))
            .map_err(dev_err("uploading the adapter's f32 master copy"))?;
        self.m
            .write_f32(&pad(flat(m)?))
            .map_err(dev_err("uploading AdamW's first moments"))?;
        self.v
            .write_f32(&pad(flat(v)?))
            .map_err(dev_err("uploading AdamW's second moments"))
    }

    /// Σ grads² over the first `len` elements of `grads`: device partial sums, added on the
    /// host in f64 (one synchronisation).
    fn sum_squares(&self, dev: &CudaDevice, grads: &DeviceTensor) -> R<f64> {
        let len = self.layout.len;
        let parts = len.div_ceil(k::SUM_SQUARES_CHUNK);
        if parts == 0 {
            return Ok(0.0);
        }
        k::sum_squares::launch(
            dev,
            &k::sum_squares::Args {
                x: &arg(grads, &[len])?,
                out: &arg(&self.partials, &[parts])?,
            },
        )
        .map_err(launch_err("gradient norm"))?;
        let partials = self
            .partials
            .to_f32_vec()
            .map_err(dev_err("reading the gradient norm"))?;
        Ok(partials.iter().take(parts).map(|&x| f64::from(x)).sum())
    }

    /// One AdamW update of the master copy and the moments from `grads` (scalars `s`).
    fn update(&mut self, dev: &CudaDevice, grads: &DeviceTensor, s: &AdamwStep) -> R {
        let n = self.layout.len;
        if n == 0 {
            return Ok(());
        }
        k::adamw::launch(
            dev,
            &k::adamw::Args {
                param: &arg(&self.master, &[n])?,
                grad: &arg(grads, &[n])?,
                grad_scale: s.grad_scale,
                m: &arg(&self.m, &[n])?,
                v: &arg(&self.v, &[n])?,
                lr: s.lr,
                beta1: s.beta1,
                beta2: s.beta2,
                eps: s.eps,
                weight_decay: s.weight_decay,
                bias_correction1: s.bias_correction1,
                bias_correction2_sqrt: s.bias_correction2_sqrt,
            },
        )
        .map_err(launch_err("AdamW"))
    }

    /// Copies the master copy into `out` (one slice per tensor, in layout order) through the
    /// page-locked buffer (one synchronisation).
    fn read_master_into(&mut self, dev: &CudaDevice, out: &mut [&mut [f32]]) -> R {
        let spans = &self.layout.spans;
        if out.len() != spans.len() || out.iter().zip(spans).any(|(o, s)| o.len() != s.1) {
            return Err(ModelError::Device(
                "internal: host tensors do not match the optimizer's layout".into(),
            ));
        }
        let bytes = self.layout.len * 4;
        if bytes == 0 {
            return Ok(());
        }
        let err = dev_err("reading the updated parameters");
        if self.pinned.as_ref().is_none_or(|p| p.len() < bytes) {
            // SAFETY: the buffer is written by the copy below before it is read.
            let p = unsafe { dev.context().alloc_pinned_with_flags::<u8>(bytes, 0) };
            self.pinned = Some(p.map_err(dev_err("allocating page-locked host memory"))?);
        }
        let pinned = self
            .pinned
            .as_mut()
            .ok_or_else(|| ModelError::Device("internal: no page-locked buffer".into()))?;
        let stream = dev.stream();
        stream
            .memcpy_dtoh(&self.master.slice().slice(..bytes), pinned)
            .map_err(err)?;
        // The device runs with cudarc's event tracking off (`CudaDevice::new`), so the pinned
        // slice records no event and `as_slice` would not wait: synchronise explicitly.
        stream
            .synchronize()
            .map_err(dev_err("reading the updated parameters"))?;
        let host = pinned
            .as_slice()
            .map_err(dev_err("reading the updated parameters"))?;
        for (o, &(off, n)) in out.iter_mut().zip(spans) {
            let src = host.get(off * 4..(off + n) * 4).ok_or_else(|| {
                ModelError::Device("internal: a tensor lies past the optimizer's buffer".into())
            })?;
            for (d, c) in o.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    /// Per-tensor values of `t` (master, `m` or `v`).
    fn read(&self, t: &DeviceTensor, what: &'static str) -> R<Vec<Vec<f32>>> {
        let flat = t.to_f32_vec().map_err(dev_err(what))?;
        from_flat(&flat, &self.layout.spans)
    }
}

/// One adapter method's device buffers as the optimizer sees them: the gradients it reads
/// and, where the method keeps one, the flat bf16 parameter buffer (same layout) it writes
/// after the update. Methods whose parameters live elsewhere (BitFit's biases in the
/// weights, Houlsby's per-tensor buffers) take the updated master copy themselves
/// ([`DeviceAdamW::master`]).
pub struct PartBuffers<'a> {
    /// The f32 gradient buffer, laid out like the part's [`FlatLayout`].
    pub grads: &'a DeviceTensor,
    /// The bf16 parameter buffer with the same layout, if the method has one.
    pub params: Option<&'a DeviceTensor>,
}

/// AdamW's state on the device (see the [module docs](self)): one flat state per trained
/// adapter method (LoRA, BitFit, Houlsby, in [`PeftParams::tensors`](crate::peft::PeftParams::tensors)
/// order), sharing one step count, one gradient norm and one clipping coefficient.
pub struct DeviceAdamW {
    parts: Vec<FlatState>,
    /// [`AdamW::step_count`] the device moments belong to.
    step: u64,
}

impl DeviceAdamW {
    /// Buffers for the methods laid out as `layouts`.
    pub fn new(dev: &CudaDevice, layouts: Vec<FlatLayout>) -> R<DeviceAdamW> {
        Ok(DeviceAdamW {
            parts: layouts
                .into_iter()
                .map(|l| FlatState::new(dev, l))
                .collect::<R<_>>()?,
            step: 0,
        })
    }

    /// True when this state was built for `layouts`.
    pub fn fits(&self, layouts: &[FlatLayout]) -> bool {
        self.parts.len() == layouts.len()
            && self.parts.iter().zip(layouts).all(|(p, l)| p.layout == *l)
    }

    /// Makes the device state current: uploads the master copy from `params` (every trained
    /// tensor, in canonical order) and the moments from `adamw` when the host holds them,
    /// else checks that the device's moments are the ones `adamw` counts.
    pub fn load(&mut self, params: &[&[f32]], adamw: &AdamW) -> R {
        match adamw.moments() {
            Some((m, v)) => {
                let total: usize = self.parts.iter().map(|p| p.layout.spans.len()).sum();
                if params.len() != total || m.len() != total || v.len() != total {
                    return Err(ModelError::Device(format!(
                        "internal: {} tensors ({} moments) for {total} device slots",
                        params.len(),
                        m.len()
                    )));
                }
                let mut at = 0;
                for p in &mut self.parts {
                    let n = p.layout.spans.len();
                    p.load(&params[at..at + n], &m[at..at + n], &v[at..at + n])?;
                    at += n;
                }
                self.step = adamw.step_count();
                Ok(())
            }
            None if self.step == adamw.step_count() => Ok(()),
            None => Err(ModelError::Device(format!(
                "internal: AdamW is at step {} but the device holds the moments of step {}",
                adamw.step_count(),
                self.step
            ))),
        }
    }

    /// The gradient norm over every part's gradient buffer (`grads`, one per part): device
    /// partial sums, added on the host in f64.
    pub fn grad_norm(&self, dev: &CudaDevice, grads: &[&DeviceTensor]) -> R<f32> {
        self.check_parts(grads.len())?;
        let mut sum = 0.0;
        for (p, g) in self.parts.iter().zip(grads) {
            sum += p.sum_squares(dev, g)?;
        }
        Ok(sum.sqrt() as f32)
    }

    /// One AdamW update of every part from its gradients times `grad_scale`; rounds the
    /// master copies into the parts' bf16 parameter buffers where they have one, counts the
    /// step in `adamw`, and writes the updated values into `out` (one slice per host tensor,
    /// canonical order).
    pub fn apply(
        &mut self,
        dev: &CudaDevice,
        buffers: &[PartBuffers<'_>],
        grad_scale: f32,
        adamw: &mut AdamW,
        lr: f32,
        out: &mut [&mut [f32]],
    ) -> R {
        self.check_parts(buffers.len())?;
        let s = AdamwStep {
            grad_scale,
            ..adamw.kernel_scalars(lr)
        };
        for (p, b) in self.parts.iter_mut().zip(buffers) {
            p.update(dev, b.grads, &s)?;
            if let (Some(params), true) = (b.params, p.layout.len > 0) {
                convert(dev, &p.master, params, p.layout.len)?;
            }
        }
        adamw.record_device_step();
        self.step = adamw.step_count();
        let mut rest = out;
        for p in &mut self.parts {
            let n = p.layout.spans.len();
            if rest.len() < n {
                return Err(ModelError::Device(
                    "internal: fewer host tensors than optimizer slots".into(),
                ));
            }
            let (mine, others) = rest.split_at_mut(n);
            p.read_master_into(dev, mine)?;
            rest = others;
        }
        Ok(())
    }

    /// Part `i`'s f32 master copy (the updated parameters after [`apply`](Self::apply)).
    pub fn master(&self, i: usize) -> Option<&DeviceTensor> {
        self.parts.get(i).map(|p| &p.master)
    }

    /// Hands the device's moments back to `adamw` (for a checkpoint).
    pub fn download_moments(&self, adamw: &mut AdamW) -> R {
        if self.step != adamw.step_count() {
            return Err(ModelError::Device(format!(
                "internal: AdamW is at step {} but the device holds the moments of step {}",
                adamw.step_count(),
                self.step
            )));
        }
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for p in &self.parts {
            m.extend(p.read(&p.m, "reading AdamW's first moments")?);
            v.extend(p.read(&p.v, "reading AdamW's second moments")?);
        }
        adamw
            .set_moments(m, v)
            .map_err(|e| ModelError::Device(e.to_string()))
    }

    fn check_parts(&self, n: usize) -> R {
        if n == self.parts.len() {
            return Ok(());
        }
        Err(ModelError::Device(format!(
            "internal: {n} gradient buffers for {} optimizer parts",
            self.parts.len()
        )))
    }
}

/// A flat buffer of at least one element (the device buffers are never empty).
fn pad(mut v: Vec<f32>) -> Vec<f32> {
    if v.is_empty() {
        v.push(0.0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_round_trip_keeps_gaps_zero_and_refuses_misfits() {
        let spans = vec![(0, 3), (8, 2), (16, 5)];
        let a = [1.0f32, 2.0, 3.0];
        let b = [4.0f32, 5.0];
        let c = [6.0f32, 7.0, 8.0, 9.0, 10.0];
        let flat = to_flat(&[&a, &b, &c], &spans, 24).unwrap();
        assert_eq!(flat.len(), 24);
        assert_eq!(&flat[..3], &a);
        assert!(flat[3..8].iter().all(|&x| x == 0.0));
        assert_eq!(&flat[8..10], &b);
        assert_eq!(&flat[16..21], &c);
        assert_eq!(
            from_flat(&flat, &spans).unwrap(),
            vec![a.to_vec(), b.to_vec(), c.to_vec()]
        );
        assert!(to_flat(&[&a, &b], &spans, 24).is_err());
        assert!(to_flat(&[&a, &a, &c], &spans, 24).is_err());
        assert!(to_flat(&[&a, &b, &c], &spans, 20).is_err());
        assert!(from_flat(&flat[..20], &spans).is_err());
    }

    /// The coefficient is `clip_grad_norm`'s: scaling by it gives what the host clipping
    /// gives, bit for bit.
    #[test]
    fn clip_coefficient_matches_host_clipping() {
        for (g, max) in [
            (vec![3.0f32, 4.0, 12.0], 1.0f32),
            (vec![0.3, -0.4], 5.0),
            (vec![1e-3, 2e-3], 0.0),
            (vec![f32::NAN, 1.0], 1.0),
        ] {
            let mut host = g.clone();
            let norm = crate::optim::clip_grad_norm(&mut [&mut host], max);
            let coef = clip_coefficient(norm, max);
            let dev: Vec<f32> = g.iter().map(|x| x * coef).collect();
            for (h, d) in host.iter().zip(&dev) {
                assert!(
                    h.to_bits() == d.to_bits() || (h.is_nan() && d.is_nan()),
                    "{g:?}"
                );
            }
        }
    }
}
