//! AdamW exactly as `torch.optim.AdamW` computes it (RUNTIME.md §2.10, pitfall 16), with its
//! state saved to and restored from a safetensors file for resumption.
//!
//! Per step `t = 1, 2, …` and element, all in f32, in torch's operation order:
//!
//! ```text
//! θ ← θ · (1 − lr·λ)                         (param.mul_, skipped when λ = 0)
//! m ← lerp(m, g, 1 − β1)                     (exp_avg.lerp_)
//! v ← v·β2 + ((1 − β2)·g)·g                  (exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2))
//! d ← √v / √bc2 + eps                        (eps after bias-correcting √v)
//! θ ← θ + ((−lr/bc1)·m) / d                  (param.addcdiv_(m, d, value = −lr/bc1))
//! ```
//!
//! The scalars (`1 − lr·λ`, `1 − β1`, `bc1 = 1 − β1^t`, `√bc2`, `lr/bc1`) are Python floats in
//! torch: they are computed here in f64 from the decimal values the f32 hyper-parameters
//! print as (what a user writes in Python), then rounded once to f32 as torch does when a
//! Python scalar meets an f32 tensor. `lerp` follows ATen's vectorised kernel: for a weight
//! `w < 0.5` it is `fma(w, g − m, m)`, else `fma(w − 1, g − m, g)`.

use super::error::{OptimError, Result};
use crate::checkpoint::{writer, Dtype, SafeTensors, WriteTensor};
use lexp_kernels::AdamwStep;
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// AdamW's hyper-parameters (`torch.optim.AdamW` names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Base learning rate; a schedule scales it and passes the result to [`AdamW::step`].
    pub lr: f32,
    /// `(β1, β2)`: decay rates of the first and second moments.
    pub betas: (f32, f32),
    /// Added to the bias-corrected `√v`.
    pub eps: f32,
    /// Decoupled weight decay `λ` (`θ ← θ·(1 − lr·λ)`).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// torch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// The checks torch's constructor makes: `lr ≥ 0`, `eps ≥ 0`, `β ∈ [0, 1)`, `λ ≥ 0`, all
    /// finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(OptimError::InvalidConfig { reason });
        for (name, x) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
            if !(x.is_finite() && x >= 0.0) {
                return bad(format!("{name} {x} must be finite and non-negative"));
            }
        }
        for (name, b) in [("beta1", self.betas.0), ("beta2", self.betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} {b} is not in [0, 1)"));
            }
        }
        Ok(())
    }
}

/// AdamW's state as plain data: the number of steps taken and the moments per parameter
/// tensor (same order and sizes as the parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWState {
    /// Steps taken so far (the next step is `step + 1`).
    pub step: u64,
    /// First moments `m`.
    pub m: Vec<Vec<f32>>,
    /// Second moments `v`.
    pub v: Vec<Vec<f32>>,
}

/// The AdamW optimizer over a fixed list of f32 parameter tensors.
///
/// An engine may run the update on its device ([`crate::train::Engine::optimizer_step`]): it
/// then keeps the moments there, counts the step here with
/// [`record_device_step`](Self::record_device_step), and hands the moments back with
/// [`set_moments`](Self::set_moments) when they are needed (checkpoints). While the host copy
/// is stale, [`save`](Self::save) and [`state`](Self::state) refuse and [`step`](Self::step)
/// panics, so a stale copy can never be written or updated.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters (`lr` is the base rate; each step is given its own).
    pub config: AdamWConfig,
    step: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// The moments above are stale: the current ones live on a device.
    moments_on_device: bool,
}

/// The f32 scalars of one step.
#[derive(Debug, Clone, Copy)]
struct StepScalars {
    /// `1 − lr·λ`, or `None` when `λ = 0` (torch skips the multiplication).
    decay: Option<f32>,
    /// `1 − β1`, the lerp weight.
    w1: f32,
    beta2: f32,
    /// `1 − β2`.
    w2: f32,
    /// `√(1 − β2^t)`.
    bc2_sqrt: f32,
    eps: f32,
    /// `−lr / (1 − β1^t)`.
    neg_step_size: f32,
}

/// The decimal `x` prints as, as an f64 (`0.9f32` → `0.9`, not `0.8999999761581421`).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

impl AdamW {
    /// An optimizer for tensors of `sizes` elements, moments zero, no step taken.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> AdamW {
        AdamW {
            config,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            moments_on_device: false,
        }
    }

    /// True while the current moments live on a device (see the type's docs).
    pub fn moments_on_device(&self) -> bool {
        self.moments_on_device
    }

    /// The moments `(m, v)` per tensor, for an engine that uploads them; `None` while they
    /// live on a device.
    pub fn moments(&self) -> Option<(&[Vec<f32>], &[Vec<f32>])> {
        (!self.moments_on_device).then_some((&self.m, &self.v))
    }

    /// The scalars of the next step (`t = step_count() + 1`) for the device `adamw` kernel,
    /// without clipping: `1 − β1^t` and `√(1 − β2^t)` computed in f64 as [`step`](Self::step)
    /// does, then rounded to f32. The kernel forms `1 − lr·λ` and `lr / bc1` in f32, which can
    /// differ from the host's f64-then-rounded scalars in the last bit.
    pub fn kernel_scalars(&self, lr: f32) -> AdamwStep {
        let (b1, b2) = (decimal(self.config.betas.0), decimal(self.config.betas.1));
        let t = (self.step + 1) as f64;
        AdamwStep {
            lr,
            beta1: self.config.betas.0,
            beta2: self.config.betas.1,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            bias_correction1: (1.0 - b1.powf(t)) as f32,
            bias_correction2_sqrt: (1.0 - b2.powf(t)).powf(0.5) as f32,
            grad_scale: 1.0,
        }
    }

    /// Counts a step an engine applied on its device; from now on the host moments are
    /// stale until [`set_moments`](Self::set_moments).
    pub fn record_device_step(&mut self) {
        self.step += 1;
        self.moments_on_device = true;
    }

    /// Replaces the moments with the device's current ones (same tensor count and sizes).
    pub fn set_moments(&mut self, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) -> Result<()> {
        let sizes = self.sizes();
        let fits = |x: &[Vec<f32>]| {
            x.len() == sizes.len() && x.iter().zip(&sizes).all(|(t, &n)| t.len() == n)
        };
        if !fits(&m) || !fits(&v) {
            return Err(OptimError::State {
                reason: format!(
                    "device moments do not match the {} parameter tensors of sizes {sizes:?}",
                    sizes.len()
                ),
            });
        }
        (self.m, self.v, self.moments_on_device) = (m, v, false);
        Ok(())
    }

    fn require_host_moments(&self, what: &str) -> Result<()> {
        if self.moments_on_device {
            return Err(OptimError::State {
                reason: format!(
                    "cannot {what}: the optimizer's moments live on the device and were not \
                     synchronised back (Engine::sync_optimizer)"
                ),
            });
        }
        Ok(())
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sizes of the parameter tensors this optimizer was built for.
    pub fn sizes(&self) -> Vec<usize> {
        self.m.iter().map(Vec::len).collect()
    }

    fn scalars(&self, lr: f32) -> StepScalars {
        let lr = decimal(lr);
        let (b1, b2) = (decimal(self.config.betas.0), decimal(self.config.betas.1));
        let wd = decimal(self.config.weight_decay);
        let t = self.step as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        StepScalars {
            decay: (wd != 0.0).then_some((1.0 - lr * wd) as f32),
            w1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            w2: (1.0 - b2) as f32,
            // Python's `bias_correction2 ** 0.5`.
            bc2_sqrt: bc2.powf(0.5) as f32,
            eps: decimal(self.config.eps) as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        }
    }

    /// One optimizer step with learning rate `lr` on every tensor: `params[i]` is updated in
    /// place from `grads[i]`. Tensors are processed in parallel; each element's arithmetic is
    /// sequential, so the result does not depend on the thread count.
    ///
    /// Panics if the tensor count or a tensor's size differs from [`new`](Self::new)'s
    /// `sizes` (a programming error, not a data error).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f32) {
        assert!(
            !self.moments_on_device,
            "AdamW::step on stale host moments (they live on the device)"
        );
        assert_eq!(params.len(), self.m.len(), "AdamW: parameter tensor count");
        assert_eq!(grads.len(), self.m.len(), "AdamW: gradient tensor count");
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            assert_eq!(p.len(), self.m[i].len(), "AdamW: size of parameter {i}");
            assert_eq!(g.len(), self.m[i].len(), "AdamW: size of gradient {i}");
        }
        self.step += 1;
        let s = self.scalars(lr);
        params
            .par_iter_mut()
            .zip(grads.par_iter())
            .zip(self.m.par_iter_mut().zip(self.v.par_iter_mut()))
            .for_each(|((p, g), (m, v))| update(p, g, m, v, &s));
    }

    /// The state (step count and moments), for checkpoints; refused while the moments live
    /// on a device.
    pub fn state(&self) -> Result<AdamWState> {
        self.require_host_moments("read the optimizer state")?;
        Ok(AdamWState {
            step: self.step,
            m: self.m.clone(),
            v: self.v.clone(),
        })
    }

    /// An optimizer resuming from `state`; its moments must have exactly `sizes`.
    pub fn from_state(config: AdamWConfig, state: AdamWState, sizes: &[usize]) -> Result<AdamW> {
        let bad = |reason: String| Err(OptimError::State { reason });
        if state.m.len() != sizes.len() || state.v.len() != sizes.len() {
            return bad(format!(
                "{} parameter tensors, but the state has {} first and {} second moments",
                sizes.len(),
                state.m.len(),
                state.v.len()
            ));
        }
        for (i, &n) in sizes.iter().enumerate() {
            if state.m[i].len() != n || state.v[i].len() != n {
                return bad(format!(
                    "parameter {i} has {n} elements, its moments {} and {}",
                    state.m[i].len(),
                    state.v[i].len()
                ));
            }
        }
        Ok(AdamW {
            config,
            step: state.step,
            m: state.m,
            v: state.v,
            moments_on_device: false,
        })
    }

    /// Writes the state to `path` atomically: F32 tensors `m.<name>` and `v.<name>` (shape
    /// `[size]`) for the parameter tensors called `names` (in order), and `__metadata__` with
    /// `step`, `lr`, `beta1`, `beta2`, `eps` and `weight_decay` as decimal strings (plus
    /// `"format": "pt"`).
    pub fn save(&self, path: &Path, names: &[String]) -> Result<()> {
        self.require_host_moments("save the optimizer state")?;
        if names.len() != self.m.len() {
            return Err(OptimError::State {
                reason: format!(
                    "{} names for {} parameter tensors",
                    names.len(),
                    self.m.len()
                ),
            });
        }
        let f32_tensor = |name: String, data: &[f32]| WriteTensor {
            name,
            dtype: Dtype::F32,
            shape: vec![data.len()],
            bytes: Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        let tensors: Vec<WriteTensor<'_>> = names
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                [
                    f32_tensor(format!("m.{n}"), &self.m[i]),
                    f32_tensor(format!("v.{n}"), &self.v[i]),
                ]
            })
            .collect();
        let c = &self.config;
        let metadata: BTreeMap<String, String> = [
            ("step", self.step.to_string()),
            ("lr", c.lr.to_string()),
            ("beta1", c.betas.0.to_string()),
            ("beta2", c.betas.1.to_string()),
            ("eps", c.eps.to_string()),
            ("weight_decay", c.weight_decay.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        writer::write(path, &tensors, &metadata)?;
        tracing::debug!(file = %path.display(), step = self.step, "AdamW state saved");
        Ok(())
    }

    /// Reads a state written by [`save`](Self::save) for the parameter tensors `names` of
    /// `sizes` elements. The hyper-parameters come from the metadata. Every `m.`/`v.` tensor
    /// must be present with shape `[size]`, and no other tensor may be.
    pub fn load(path: &Path, names: &[String], sizes: &[usize]) -> Result<AdamW> {
        if names.len() != sizes.len() {
            return Err(OptimError::State {
                reason: format!("{} names for {} sizes", names.len(), sizes.len()),
            });
        }
        let st = SafeTensors::open(path)?;
        let meta = |key: &str| -> Result<&str> {
            st.metadata()
                .get(key)
                .map(String::as_str)
                .ok_or_else(|| OptimError::Metadata {
                    file: path.to_path_buf(),
                    key: key.to_owned(),
                    reason: "absent".into(),
                })
        };
        let parse_err = |key: &str, value: &str| OptimError::Metadata {
            file: path.to_path_buf(),
            key: key.to_owned(),
            reason: format!("cannot parse `{value}`"),
        };
        let float = |key: &str| -> Result<f32> {
            let s = meta(key)?;
            s.parse().map_err(|_| parse_err(key, s))
        };
        let step_text = meta("step")?;
        let step: u64 = step_text
            .parse()
            .map_err(|_| parse_err("step", step_text))?;
        let config = AdamWConfig {
            lr: float("lr")?,
            betas: (float("beta1")?, float("beta2")?),
            eps: float("eps")?,
            weight_decay: float("weight_decay")?,
        };

        let mut expected = HashSet::new();
        let mut read = |tensor: String, size: usize| -> Result<Vec<f32>> {
            let view = st
                .tensor(&tensor)
                .ok_or_else(|| OptimError::MissingTensor {
                    file: path.to_path_buf(),
                    tensor: tensor.clone(),
                })?;
            if view.shape() != [size] {
                return Err(OptimError::ShapeMismatch {
                    file: path.to_path_buf(),
                    tensor,
                    expected: size,
                    found: view.shape().to_vec(),
                });
            }
            let data = view.to_f32()?;
            expected.insert(tensor);
            Ok(data)
        };
        let mut m = Vec::with_capacity(names.len());
        let mut v = Vec::with_capacity(names.len());
        for (name, &size) in names.iter().zip(sizes) {
            m.push(read(format!("m.{name}"), size)?);
            v.push(read(format!("v.{name}"), size)?);
        }
        if let Some(extra) = st.names().find(|n| !expected.contains(*n)) {
            return Err(OptimError::UnexpectedTensor {
                file: path.to_path_buf(),
                tensor: extra.to_owned(),
            });
        }
        tracing::debug!(file = %path.display(), step, "AdamW state loaded");
        AdamW::from_state(config, AdamWState { step, m, v }, sizes)
    }
}

/// One step on one tensor (see the module doc for the formulas).
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    let small = s.w1 < 0.5;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        if let Some(decay) = s.decay {
            *p *= decay;
        }
        *m = if small {
            s.w1.mul_add(g - *m, *m)
        } else {
            (s.w1 - 1.0).mul_add(g - *m, g)
        };
        *v = *v * s.beta2 + s.w2 * g * g;
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        *p += s.neg_step_size * *m / denom;
    }
}

#[cfg(test)]
#[path = "adamw_tests.rs"]
mod tests;
