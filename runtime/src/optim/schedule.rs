//! Learning-rate schedules with linear warm-up, in Hugging Face's convention (RUNTIME.md
//! §2.10).
//!
//! `step` is the 0-based index of the optimizer step about to run: the first step uses
//! `lr_at(0)`. This is what HF's `LambdaLR` gives (its lambda is evaluated at the number of
//! steps taken so far), so with warm-up the very first step has learning rate 0, as in HF.
//! With `w` warm-up steps and `T` total steps, the factor `λ(k)` is
//!
//! - warm-up, `k < w`: `k / w`;
//! - then, with `p = (k − w) / max(1, T − w)` (and `p = 1` from `k = T` on):
//!   constant `1`, linear `1 − p` (HF's `max(0, (T − k)/(T − w))`), cosine `½(1 + cos(π·p))`,
//!   each mapped into `[min_lr_ratio, 1]` as `r + (1 − r)·f` (HF's `cosine_with_min_lr`).
//!
//! HF's cosine would rise again past `T`; here it stays at its minimum. `lr = base_lr · λ(k)`,
//! computed in f64.

/// The shape of the decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// No decay.
    Constant,
    /// Linear decay to `min_lr_ratio · base_lr` at `total_steps`.
    Linear,
    /// Half-cosine decay to `min_lr_ratio · base_lr` at `total_steps`.
    Cosine,
}

/// A learning-rate schedule: warm-up then [`Schedule`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The peak learning rate (reached at the end of warm-up).
    pub base_lr: f32,
    /// Linear warm-up steps from 0 (0: none).
    pub warmup_steps: u64,
    /// Steps of the whole run (warm-up included); the decay ends here.
    pub total_steps: u64,
    /// The decay after warm-up.
    pub kind: Schedule,
    /// The final learning rate as a fraction of `base_lr` (0: decay to zero, as HF).
    pub min_lr_ratio: f32,
}

impl LrSchedule {
    /// A constant learning rate without warm-up.
    pub fn constant(lr: f32) -> LrSchedule {
        LrSchedule {
            base_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            kind: Schedule::Constant,
            min_lr_ratio: 0.0,
        }
    }

    /// The multiplier `λ(step)` of `base_lr` (see the module doc).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        // From `total_steps` on the decay is over (also when warm-up fills the whole run).
        let progress = if step >= self.total_steps {
            1.0
        } else {
            ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0)
        };
        let f = match self.kind {
            Schedule::Constant => return 1.0,
            Schedule::Linear => 1.0 - progress,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        let r = f64::from(self.min_lr_ratio).clamp(0.0, 1.0);
        r + (1.0 - r) * f
    }

    /// The learning rate of optimizer step `step` (0-based index of the step about to run).
    pub fn lr_at(&self, step: u64) -> f32 {
        (f64::from(self.base_lr) * self.factor(step)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: Schedule, min: f32) -> LrSchedule {
        LrSchedule {
            base_lr: 2e-4,
            warmup_steps: 10,
            total_steps: 110,
            kind,
            min_lr_ratio: min,
        }
    }

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() <= 1e-7 * b.abs().max(1e-12)
    }

    #[test]
    fn warmup_is_hf_lambda() {
        for kind in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
            let s = sched(kind, 0.1);
            // Start, middle, last warm-up step, first post-warm-up step (the peak).
            assert_eq!(s.lr_at(0), 0.0);
            assert!(close(s.lr_at(5), 1e-4), "{kind:?}");
            assert!(close(s.lr_at(9), 1.8e-4), "{kind:?}");
            assert!(close(s.lr_at(10), 2e-4), "{kind:?}");
        }
    }

    #[test]
    fn decays_by_hand_computed_values() {
        let lin = sched(Schedule::Linear, 0.0);
        // HF: (total − k)/(total − warmup) = (110 − 35)/100 = 0.75.
        assert!(close(lin.lr_at(35), 1.5e-4));
        assert!(close(lin.lr_at(60), 1e-4));
        assert_eq!(lin.lr_at(110), 0.0);
        assert_eq!(lin.lr_at(500), 0.0);

        let cos = sched(Schedule::Cosine, 0.0);
        // progress 0.25: ½(1 + cos(π/4)) = 0.853553390593…
        assert!(close(cos.lr_at(35), 2e-4 * 0.853_553_390_593_273_8));
        assert!(close(cos.lr_at(60), 1e-4));
        assert!(cos.lr_at(110) < 1e-20);
        assert!(cos.lr_at(200) < 1e-20, "stays at the minimum past total");

        // min_lr_ratio 0.1: λ = 0.1 + 0.9·f.
        let lin = sched(Schedule::Linear, 0.1);
        assert!(close(lin.lr_at(60), 2e-4 * (0.1 + 0.9 * 0.5)));
        assert!(close(lin.lr_at(110), 2e-5));
        let cos = sched(Schedule::Cosine, 0.1);
        assert!(close(
            cos.lr_at(35),
            2e-4 * (0.1 + 0.9 * 0.853_553_390_593_273_8)
        ));
        assert!(close(cos.lr_at(1000), 2e-5));

        let c = sched(Schedule::Constant, 0.1);
        assert_eq!(c.lr_at(60), 2e-4);
        assert_eq!(LrSchedule::constant(3e-4).lr_at(0), 3e-4);
        // Monotone non-increasing after warm-up.
        for kind in [Schedule::Linear, Schedule::Cosine] {
            let s = sched(kind, 0.0);
            assert!((10..120).all(|k| s.lr_at(k + 1) <= s.lr_at(k)), "{kind:?}");
        }
    }

    #[test]
    fn degenerate_lengths() {
        // Warm-up only (total ≤ warm-up): after it, linear is 0 as in HF.
        let s = LrSchedule {
            total_steps: 10,
            ..sched(Schedule::Linear, 0.0)
        };
        assert!(close(s.lr_at(9), 1.8e-4));
        assert_eq!(s.lr_at(10), 0.0);
        // No warm-up: step 0 runs at the full rate.
        let s = LrSchedule {
            warmup_steps: 0,
            ..sched(Schedule::Linear, 0.0)
        };
        assert_eq!(s.lr_at(0), 2e-4);
        assert!(close(s.lr_at(55), 1e-4));
    }
}
