//! Inverted dropout with masks drawn from a counter-based stream, so that a step's masks are
//! a pure function of `(seed, step, site)`: reproducible across runs and after a resume.

use crate::data::SplitMix64;

/// Where a dropout mask is applied; part of the stream id so that every site draws
/// independent bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    fn code(self) -> u64 {
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
