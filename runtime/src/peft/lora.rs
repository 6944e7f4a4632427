//! LoRA's parameters on OPT (RUNTIME.md §2.6): which projections carry an adapter
//! ([`LoraTarget`]), the hyper-parameters ([`LoraConfig`]), and the trainable matrices
//! ([`LoraParams`]) with PEFT's default initialisation.
//!
//! A module adapts a frozen `nn.Linear(in, out)` (weight `W [out, in]`) with `A [r, in]` and
//! `B [out, r]`: `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`, `s = α/r` (or `α/√r` with rsLoRA).

use super::error::PeftError;
use crate::checkpoint::{HostMatrix, OptConfig};
use crate::data::SplitMix64;

/// A projection of an OPT decoder layer that LoRA can adapt. The declaration order is the
/// canonical order ([`LoraTarget::ALL`]) used everywhere modules are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    /// `self_attn.q_proj` (`H → H`).
    Q,
    /// `self_attn.k_proj` (`H → H`).
    K,
    /// `self_attn.v_proj` (`H → H`).
    V,
    /// `self_attn.out_proj` (`H → H`).
    Out,
    /// `fc1` (`H → F`).
    Fc1,
    /// `fc2` (`F → H`).
    Fc2,
}

impl LoraTarget {
    /// Every target, in canonical order.
    pub const ALL: [LoraTarget; 6] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::Out,
        LoraTarget::Fc1,
        LoraTarget::Fc2,
    ];

    /// The module's short name, as PEFT's `target_modules` lists it (`q_proj`, …, `fc2`).
    pub fn peft_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::Out => "out_proj",
            LoraTarget::Fc1 => "fc1",
            LoraTarget::Fc2 => "fc2",
        }
    }

    /// The target whose short name is `name` (`"q_proj"` → `Q`), if any.
    pub fn from_name(name: &str) -> Option<LoraTarget> {
        Self::ALL.into_iter().find(|t| t.peft_name() == name)
    }

    /// Position in [`LoraTarget::ALL`] (0..6).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module's full path in the HF model of decoder layer `layer`, e.g.
    /// `model.decoder.layers.3.self_attn.q_proj` or `model.decoder.layers.3.fc1`.
    pub fn module_path(self, layer: usize) -> String {
        match self {
            LoraTarget::Fc1 | LoraTarget::Fc2 => {
                format!("model.decoder.layers.{layer}.{}", self.peft_name())
            }
            _ => format!(
                "model.decoder.layers.{layer}.self_attn.{}",
                self.peft_name()
            ),
        }
    }

    /// `(in, out)` features of the adapted Linear: `H → H` for the attention projections,
    /// `H → F` for `fc1`, `F → H` for `fc2`.
    pub fn dims(self, config: &OptConfig) -> (usize, usize) {
        let (h, f) = (config.hidden_size, config.ffn_dim);
        match self {
            LoraTarget::Fc1 => (h, f),
            LoraTarget::Fc2 => (f, h),
            _ => (h, h),
        }
    }
}

/// One of a module's two LoRA matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraFactor {
    /// `lora_A`, `[r, in]`.
    A,
    /// `lora_B`, `[out, r]`.
    B,
}

/// The key of a LoRA matrix in `adapter_model.safetensors` (RUNTIME.md §3.3):
/// `base_model.model.model.decoder.layers.{layer}.self_attn.q_proj.lora_A.weight` etc.
pub fn tensor_key(layer: usize, target: LoraTarget, factor: LoraFactor) -> String {
    let f = match factor {
        LoraFactor::A => "lora_A",
        LoraFactor::B => "lora_B",
    };
    format!("base_model.model.{}.{f}.weight", target.module_path(layer))
}

/// LoRA hyper-parameters, as PEFT's `LoraConfig` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (> 0).
    pub r: usize,
    /// `lora_alpha`: the scaling numerator.
    pub alpha: f32,
    /// `lora_dropout`: dropout probability on the LoRA branch's input, in `[0, 1)`.
    pub dropout: f32,
    /// Adapted projections (every decoder layer gets the same set).
    pub targets: Vec<LoraTarget>,
    /// rsLoRA: scale by `α/√r` instead of `α/r`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    /// `r = 8`, `α = 16`, no dropout, `[q_proj, v_proj]` (PEFT's default targets for OPT).
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Q, LoraTarget::V],
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The LoRA scale `s`: `α/r`, or `α/√r` with rsLoRA.
    pub fn scaling(&self) -> f32 {
        let r = self.r as f32;
        if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }

    /// Rejects `r = 0`, a non-finite `α`, a dropout outside `[0, 1)`, and an empty or
    /// repeated target list.
    pub fn validate(&self) -> Result<(), PeftError> {
        let bad = |reason: String| Err(PeftError::InvalidConfig { reason });
        if self.r == 0 {
            return bad("LoRA rank r must be positive".into());
        }
        if !self.alpha.is_finite() {
            return bad(format!("lora_alpha {} is not finite", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "lora_dropout {} is not a probability in [0, 1)",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return bad("no LoRA target modules".into());
        }
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(t) {
                return bad(format!(
                    "LoRA target module `{}` is listed twice",
                    t.peft_name()
                ));
            }
        }
        Ok(())
    }

    /// The targets deduplicated and in canonical order.
    fn canonical_targets(&self) -> Vec<LoraTarget> {
        LoraTarget::ALL
            .into_iter()
            .filter(|t| self.targets.contains(t))
            .collect()
    }
}

/// One adapted module's trainable matrices.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// `lora_A`, `[r, in]`.
    pub a: HostMatrix,
    /// `lora_B`, `[out, r]`.
    pub b: HostMatrix,
}

/// Every LoRA matrix of a model: `layers[i]` lists layer `i`'s modules in canonical target
/// order, one per entry of `config.targets`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraParams {
    /// The hyper-parameters; `targets` is kept deduplicated and in canonical order.
    pub config: LoraConfig,
    /// Per decoder layer, `(target, module)` in [`LoraTarget::ALL`] order.
    pub layers: Vec<Vec<(LoraTarget, LoraModule)>>,
}

impl LoraParams {
    /// PEFT's default initialisation (`init_lora_weights = true`): `B = 0` and
    /// `A ~ U(−1/√in, +1/√in)` (what `kaiming_uniform_(a = √5)` draws).
    ///
    /// Stream numbering: the `A` of target `t` in layer `i` is drawn, row-major, from
    /// `SplitMix64::for_stream(seed, 6·i + t.index())`, one `next_u64` per element. A module's
    /// values therefore depend only on `(seed, layer, target)`, not on which other targets are
    /// chosen. Each draw maps the top 53 bits to `u ∈ [0, 1)` and the value to
    /// `(2u − 1)/√in`, computed in f64 and rounded to f32.
    ///
    /// `config` should have passed [`LoraConfig::validate`]; its targets are deduplicated and
    /// sorted into canonical order here.
    pub fn init(config: &LoraConfig, model: &OptConfig, seed: u64) -> LoraParams {
        let mut config = config.clone();
        config.targets = config.canonical_targets();
        let r = config.r;
        let layers = (0..model.num_hidden_layers)
            .map(|layer| {
                config
                    .targets
                    .iter()
                    .map(|&target| {
                        let (fan_in, fan_out) = target.dims(model);
                        let stream = (layer * LoraTarget::ALL.len() + target.index()) as u64;
                        let mut rng = SplitMix64::for_stream(seed, stream);
                        let bound = 1.0 / (fan_in as f64).sqrt();
                        let a = (0..r * fan_in)
                            .map(|_| {
                                let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                                ((2.0 * u - 1.0) * bound) as f32
                            })
                            .collect();
                        let module = LoraModule {
                            a: HostMatrix {
                                rows: r,
                                cols: fan_in,
                                data: a,
                            },
                            b: HostMatrix::zeros(fan_out, r),
                        };
                        (target, module)
                    })
                    .collect()
            })
            .collect();
        LoraParams { config, layers }
    }

    /// The module of `target` in `layer`, if that layer exists and the target is adapted.
    pub fn get(&self, layer: usize, target: LoraTarget) -> Option<&LoraModule> {
        self.layers
            .get(layer)?
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, m)| m)
    }

    /// Mutable access to the module of `target` in `layer`.
    pub fn get_mut(&mut self, layer: usize, target: LoraTarget) -> Option<&mut LoraModule> {
        self.layers
            .get_mut(layer)?
            .iter_mut()
            .find(|(t, _)| *t == target)
            .map(|(_, m)| m)
    }

    /// Every module as `(layer, target, module)`, in canonical order (layer ascending, then
    /// target in [`LoraTarget::ALL`] order).
    pub fn modules(&self) -> impl Iterator<Item = (usize, LoraTarget, &LoraModule)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.iter().map(move |(t, m)| (i, *t, m)))
    }

    /// Trainable parameters: `Σ r·(in + out)` over the modules.
    pub fn num_parameters(&self) -> usize {
        self.modules()
            .map(|(_, _, m)| m.a.data.len() + m.b.data.len())
            .sum()
    }

    /// Every matrix with its PEFT key ([`tensor_key`]), in canonical order, `A` before `B` of
    /// each module: the flat parameter list the optimizer and the checkpoint use.
    pub fn tensors(&self) -> Vec<(String, &HostMatrix)> {
        self.modules()
            .flat_map(|(i, t, m)| {
                [
                    (tensor_key(i, t, LoraFactor::A), &m.a),
                    (tensor_key(i, t, LoraFactor::B), &m.b),
                ]
            })
            .collect()
    }

    /// [`tensors`](Self::tensors), mutably (same names, same order).
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut HostMatrix)> {
        self.layers
            .iter_mut()
            .enumerate()
            .flat_map(|(i, l)| {
                l.iter_mut().flat_map(move |(t, m)| {
                    [
                        (tensor_key(i, *t, LoraFactor::A), &mut m.a),
                        (tensor_key(i, *t, LoraFactor::B), &mut m.b),
                    ]
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// opt-tiny's shape (H 192, F 768, 4 layers).
    fn tiny() -> OptConfig {
        OptConfig::from_json(
            r#"{"model_type":"opt","vocab_size":8192,"hidden_size":192,"ffn_dim":768,
                "num_hidden_layers":4,"num_attention_heads":3,"max_position_embeddings":256}"#,
            Path::new("tiny/config.json"),
        )
        .unwrap()
    }

    #[test]
    fn target_names_paths_and_dims() {
        let m = tiny();
        let names: Vec<_> = LoraTarget::ALL.iter().map(|t| t.peft_name()).collect();
        assert_eq!(
            names,
            ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
        );
        for t in LoraTarget::ALL {
            assert_eq!(LoraTarget::from_name(t.peft_name()), Some(t));
        }
        assert_eq!(LoraTarget::from_name("c_attn"), None);
        assert_eq!(
            LoraTarget::Out.module_path(3),
            "model.decoder.layers.3.self_attn.out_proj"
        );
        assert_eq!(LoraTarget::Fc2.module_path(0), "model.decoder.layers.0.fc2");
        assert_eq!(LoraTarget::K.dims(&m), (192, 192));
        assert_eq!(LoraTarget::Fc1.dims(&m), (192, 768));
        assert_eq!(LoraTarget::Fc2.dims(&m), (768, 192));
        assert_eq!(
            tensor_key(1, LoraTarget::V, LoraFactor::B),
            "base_model.model.model.decoder.layers.1.self_attn.v_proj.lora_B.weight"
        );
    }

    #[test]
    fn scaling_and_validation() {
        let mut c = LoraConfig::default();
        assert_eq!((c.r, c.alpha, c.dropout), (8, 16.0, 0.0));
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert!((c.scaling() - 16.0 / 8f32.sqrt()).abs() < 1e-6);
        assert!(c.validate().is_ok());
        let bad = |f: &dyn Fn(&mut LoraConfig), what: &str| {
            let mut c = LoraConfig::default();
            f(&mut c);
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.contains(what), "{msg}");
        };
        bad(&|c| c.r = 0, "rank");
        bad(&|c| c.dropout = 1.0, "lora_dropout");
        bad(&|c| c.dropout = -0.1, "lora_dropout");
        bad(&|c| c.targets.clear(), "no LoRA target");
        bad(
            &|c| c.targets.push(LoraTarget::Q),
            "`q_proj` is listed twice",
        );
        bad(&|c| c.alpha = f32::NAN, "lora_alpha");
    }

    #[test]
    fn init_bounds_zero_b_and_determinism() {
        let m = tiny();
        let c = LoraConfig {
            r: 4,
            targets: vec![LoraTarget::Fc2, LoraTarget::Q, LoraTarget::Fc1],
            ..LoraConfig::default()
        };
        let p = LoraParams::init(&c, &m, 7);
        assert_eq!(
            p.config.targets,
            [LoraTarget::Q, LoraTarget::Fc1, LoraTarget::Fc2]
        );
        assert_eq!(p.layers.len(), 4);
        for (_, t, module) in p.modules() {
            let (fan_in, fan_out) = t.dims(&m);
            assert_eq!(module.a.shape(), [4, fan_in]);
            assert_eq!(module.b.shape(), [fan_out, 4]);
            assert!(module.b.data.iter().all(|&x| x == 0.0));
            let bound = 1.0 / (fan_in as f32).sqrt();
            let max = module.a.data.iter().fold(0f32, |m, x| m.max(x.abs()));
            // Within the bound, and filling it (max of ≥ 768 uniforms is near the bound).
            assert!(
                max <= bound && max > 0.95 * bound,
                "{t:?}: {max} vs {bound}"
            );
            let mean = module.a.data.iter().sum::<f32>() / module.a.data.len() as f32;
            assert!(mean.abs() < 0.1 * bound, "{t:?}: mean {mean}");
        }
        // Same seed → same parameters; another seed → different; modules differ from each other.
        assert_eq!(p, LoraParams::init(&c, &m, 7));
        let q = LoraParams::init(&c, &m, 8);
        assert_ne!(
            p.get(0, LoraTarget::Q).unwrap().a,
            q.get(0, LoraTarget::Q).unwrap().a
        );
        assert_ne!(
            p.get(0, LoraTarget::Q).unwrap().a.data[..16],
            p.get(1, LoraTarget::Q).unwrap().a.data[..16]
        );
        // A module's init does not depend on the other targets.
        let only_q = LoraParams::init(
            &LoraConfig {
                targets: vec![LoraTarget::Q],
                ..c.clone()
            },
            &m,
            7,
        );
        assert_eq!(only_q.get(2, LoraTarget::Q), p.get(2, LoraTarget::Q));
    }

    #[test]
    fn access_counts_and_canonical_order() {
        let m = tiny();
        let c = LoraConfig {
            r: 2,
            targets: vec![LoraTarget::V, LoraTarget::Q],
            ..LoraConfig::default()
        };
        let mut p = LoraParams::init(&c, &m, 1);
        assert!(p.get(0, LoraTarget::K).is_none());
        assert!(p.get(4, LoraTarget::Q).is_none());
        assert_eq!(p.num_parameters(), 4 * 2 * 2 * (192 + 192));
        let names: Vec<String> = p.tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 16);
        assert_eq!(
            names[..4],
            [
                tensor_key(0, LoraTarget::Q, LoraFactor::A),
                tensor_key(0, LoraTarget::Q, LoraFactor::B),
                tensor_key(0, LoraTarget::V, LoraFactor::A),
                tensor_key(0, LoraTarget::V, LoraFactor::B),
            ]
        );
        assert_eq!(names[15], tensor_key(3, LoraTarget::V, LoraFactor::B));
        let mut_names: Vec<String> = p.tensors_mut().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, mut_names);
        // Writes through tensors_mut land in the module get() sees.
        p.tensors_mut()[5].1.data[3] = 42.0; // layer 1, Q, B
        assert_eq!(p.get(1, LoraTarget::Q).unwrap().b.data[3], 42.0);
        p.get_mut(3, LoraTarget::V).unwrap().a.data[0] = -1.0;
        assert_eq!(p.tensors()[14].1.data[0], -1.0);
    }
}
