//! Inverted dropout with masks drawn from a counter-based stream, so that a step's masks are
//! a pure function of `(seed, step, site)`: reproducible across runs and after a resume.

use crate::data::SplitMix64;
use std::collections::HashMap;

/// Where a dropout mask is applied; part of the stream id so that every site draws
/// independent bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// The attention block's output, before the residual add (OPT `dropout`).
    AttnResidual,
    /// `fc2`'s output, before the residual add (OPT `dropout`).
    MlpResidual,
    /// The input of a LoRA branch (`lora_dropout`); the index is the target's position in
    /// [`LoraTarget::ALL`](crate::peft::LoraTarget::ALL).
    Lora(usize),
}

impl Site {
    /// The site's number in the stream id (`0`, `1`, then `2 +` the LoRA target index).
    pub fn code(self) -> u64 {
        match self {
            Site::AttnResidual => 0,
            Site::MlpResidual => 1,
            Site::Lora(t) => 2 + t as u64,
        }
    }
}

/// The dropout randomness of one forward pass: masks are drawn per `(layer, site)` from
/// the stream `seed`. `None` in a [`Mode`](super::Mode) means evaluation (no dropout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutRng {
    /// Seed of this forward pass (the trainer derives it from the run seed, the optimizer
    /// step and the micro-batch).
    pub seed: u64,
}

/// Where the CPU model takes its dropout masks from: [`DropoutRng`] in training, or
/// [`RecordedMasks`] to replay the masks another engine drew (tests comparing the GPU engine
/// with the CPU one under dropout).
pub trait MaskSource: Sync {
    /// The mask of `len` values (`0` dropped, `1/(1−p)` kept, or the recorded values) for
    /// `site` of `layer`, dropout probability `p`.
    fn mask(&self, layer: usize, site: Site, len: usize, p: f32) -> Vec<f32>;
}

impl MaskSource for DropoutRng {
    fn mask(&self, layer: usize, site: Site, len: usize, p: f32) -> Vec<f32> {
        DropoutRng::mask(self, layer, site, len, p)
    }
}

/// Masks recorded per `(layer, site)`, replayed as they are: a diagnostic for comparing
/// engines that draw different random numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecordedMasks {
    /// The mask of each `(layer, site)`.
    pub masks: HashMap<(usize, Site), Vec<f32>>,
}

impl RecordedMasks {
    /// Records the masks `source` gives for `sites` (each `(layer, site, len, p)`).
    pub fn record(source: &dyn MaskSource, sites: &[(usize, Site, usize, f32)]) -> RecordedMasks {
        let masks = sites
            .iter()
            .map(|&(l, s, len, p)| ((l, s), source.mask(l, s, len, p)))
            .collect();
        RecordedMasks { masks }
    }

    /// Fraction of the recorded entries that are 0 (dropped), and the entry count.
    pub fn dropped_fraction(&self) -> (f64, usize) {
        let n: usize = self.masks.values().map(Vec::len).sum();
        let z = self.masks.values().flatten().filter(|&&m| m == 0.0).count();
        (z as f64 / n.max(1) as f64, n)
    }
}

impl MaskSource for RecordedMasks {
    /// The recorded mask; a site that was not recorded, or was recorded with another length,
    /// yields NaN everywhere so that the mismatch shows in every result it touches.
    fn mask(&self, layer: usize, site: Site, len: usize, _p: f32) -> Vec<f32> {
        match self.masks.get(&(layer, site)) {
            Some(m) if m.len() == len => m.clone(),
            _ => vec![f32::NAN; len],
        }
    }
}

impl DropoutRng {
    /// A mask of `len` values, each `0` (dropped, probability `p`) or `1/(1−p)` (kept).
    /// `p` must be in `(0, 1)`.
    pub fn mask(&self, layer: usize, site: Site, len: usize, p: f32) -> Vec<f32> {
        let stream = (layer as u64) << 8 | site.code();
        let mut rng = SplitMix64::for_stream(self.seed, stream);
        let keep = 1.0 / (1.0 - p);
        // Compare 24 random bits against p: exact enough for any p a user gives.
        let threshold = (f64::from(p) * f64::from(1u32 << 24)) as u64;
        (0..len)
            .map(|_| {
                if (rng.next_u64() >> 40) < threshold {
                    0.0
                } else {
                    keep
                }
            })
            .collect()
    }
}

/// `x ⊙ mask`, in place.
pub fn apply(x: &mut [f32], mask: &[f32]) {
    debug_assert_eq!(x.len(), mask.len());
    x.iter_mut().zip(mask).for_each(|(x, m)| *x *= m);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{OptConfig, OptModel, OptWeights};
    use crate::data::PackedBatch;
    use crate::model::opt::{loss_and_grads, loss_and_grads_with_masks};
    use crate::peft::{LoraConfig, LoraParams, LoraTarget, PeftParams};
    use std::path::Path;

    /// A small random model with residual dropout 0.1, LoRA (dropout 0.2, `B ≠ 0`) on all six
    /// projections, and a packed batch of two sequences.
    fn setup() -> (OptModel, PeftParams, PackedBatch) {
        let mut c = OptConfig::from_json(
            r#"{"model_type":"opt","vocab_size":50,"hidden_size":16,"ffn_dim":40,
                "num_hidden_layers":2,"num_attention_heads":2,"max_position_embeddings":32}"#,
            Path::new("t/config.json"),
        )
        .unwrap();
        c.dropout = 0.1;
        let model = OptModel {
            weights: OptWeights::random(&c, 3, 0.2),
            config: c,
        };
        let cfg = LoraConfig {
            r: 2,
            dropout: 0.2,
            targets: LoraTarget::ALL.to_vec(),
            ..LoraConfig::default()
        };
        let mut lora = LoraParams::init(&cfg, &model.config, 5);
        let mut rng = SplitMix64::new(4);
        for (_, m) in lora.tensors_mut() {
            for v in &mut m.data {
                *v = (rng.below(1000) as f32 / 1000.0 - 0.5) * 0.4;
            }
        }
        let mut r = SplitMix64::new(8);
        let t = 12;
        let batch = PackedBatch {
            input_ids: (0..t).map(|_| r.below(50) as u32).collect(),
            position_ids: (0..7).chain(0..5).collect(),
            targets: (0..t)
                .map(|i| if i % 4 == 0 { -100 } else { r.below(50) as i32 })
                .collect(),
            cu_seqlens: vec![0, 7, 12],
            examples: vec![0, 1],
        };
        (model, lora.into(), batch)
    }

    /// Every dropout site of `model` for `rows` tokens, as the CPU model draws them.
    fn sites(model: &OptModel, lora: &PeftParams, rows: usize) -> Vec<(usize, Site, usize, f32)> {
        let c = &model.config;
        let mut v = Vec::new();
        for l in 0..c.num_hidden_layers {
            v.push((l, Site::AttnResidual, rows * c.hidden_size, c.dropout));
            v.push((l, Site::MlpResidual, rows * c.hidden_size, c.dropout));
            for (i, t) in LoraTarget::ALL.into_iter().enumerate() {
                let w = if t == LoraTarget::Fc2 {
                    c.ffn_dim
                } else {
                    c.hidden_size
                };
                let p = lora.lora.as_ref().map_or(0.0, |l| l.config.dropout);
                v.push((l, Site::Lora(i), rows * w, p));
            }
        }
        v
    }

    #[test]
    fn recorded_masks_replay_the_rng_exactly() {
        let (model, lora, b) = setup();
        let rng = DropoutRng { seed: 9 };
        let rec = RecordedMasks::record(&rng, &sites(&model, &lora, b.num_tokens()));
        let (frac, n) = rec.dropped_fraction();
        assert!(n > 2000 && frac > 0.05 && frac < 0.3, "{frac} of {n}");
        let want = loss_and_grads(&model, &lora, &b, 0.1, Some(rng)).unwrap();
        let got = loss_and_grads_with_masks(&model, &lora, &b, 0.1, Some(&rec)).unwrap();
        assert_eq!(got.loss_sum, want.loss_sum);
        assert_eq!(got.grads.flat(), want.grads.flat());
        // The masks matter: another seed's, or none, change the result.
        let other = RecordedMasks::record(
            &DropoutRng { seed: 10 },
            &sites(&model, &lora, b.num_tokens()),
        );
        let o = loss_and_grads_with_masks(&model, &lora, &b, 0.1, Some(&other)).unwrap();
        assert_ne!(o.loss_sum, want.loss_sum);
        let none = loss_and_grads(&model, &lora, &b, 0.1, None).unwrap();
        assert_ne!(none.loss_sum, want.loss_sum);
        // A site missing from the recording poisons the result instead of passing silently.
        let mut partial = rec.clone();
        partial.masks.remove(&(1, Site::Lora(5)));
        let p = loss_and_grads_with_masks(&model, &lora, &b, 0.1, Some(&partial)).unwrap();
        assert!(p.grads.flat().iter().any(|g| g.iter().any(|v| v.is_nan())));
    }

    #[test]
    fn masks_are_deterministic_scaled_and_drop_about_p() {
        let rng = DropoutRng { seed: 7 };
        let a = rng.mask(3, Site::Lora(2), 20_000, 0.25);
        assert_eq!(a, rng.mask(3, Site::Lora(2), 20_000, 0.25));
        assert_ne!(a, rng.mask(3, Site::Lora(0), 20_000, 0.25));
        assert_ne!(a, rng.mask(4, Site::Lora(2), 20_000, 0.25));
        let dropped = a.iter().filter(|&&m| m == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(a.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-6));
    }
}
