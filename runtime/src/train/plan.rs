//! The order of work: which examples each optimizer step trains on, packed into micro-batches.
//!
//! A step is `examples_per_step` consecutive examples of its epoch's shuffled order (the last
//! step of an epoch may hold fewer), packed into as few micro-batches of at most
//! `micro_batch_tokens` tokens as the packer makes. The plan is a pure function of the
//! training set, the seed and the settings, so a resumed run replays exactly the steps an
//! uninterrupted run would have taken.

use crate::data::{epoch_order, pack, Example, PackedBatch, Result};

/// The fixed schedule of optimizer steps over a training set.
#[derive(Clone, Debug)]
pub struct StepPlan {
    train: Vec<usize>,
    seed: u64,
    examples_per_step: usize,
    micro_batch_tokens: usize,
    steps_per_epoch: usize,
    total_steps: usize,
}

/// Where a step falls in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPos {
    /// 0-based epoch.
    pub epoch: usize,
    /// 0-based step within the epoch.
    pub step_in_epoch: usize,
}

impl StepPlan {
    /// The plan for `train` (indices of training examples), `epochs` passes, stopping early
    /// at `max_steps` if non-zero.
    pub fn new(
        train: Vec<usize>,
        seed: u64,
        examples_per_step: usize,
        micro_batch_tokens: usize,
        epochs: usize,
        max_steps: usize,
    ) -> StepPlan {
        let steps_per_epoch = train.len().div_ceil(examples_per_step.max(1));
        let mut total_steps = steps_per_epoch * epochs;
        if max_steps > 0 && (epochs == 0 || max_steps < total_steps) {
            total_steps = max_steps;
        }
        StepPlan {
            train,
            seed,
            examples_per_step: examples_per_step.max(1),
            micro_batch_tokens,
            steps_per_epoch,
            total_steps,
        }
    }

    /// Optimizer steps in the run.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    /// Training examples.
    pub fn num_examples(&self) -> usize {
        self.train.len()
    }

    /// Epoch and in-epoch index of global step `step`.
    pub fn position(&self, step: usize) -> StepPos {
        let per = self.steps_per_epoch.max(1);
        StepPos {
            epoch: step / per,
            step_in_epoch: step % per,
        }
    }

    /// The example indices of global step `step`.
    pub fn step_examples(&self, step: usize) -> Vec<usize> {
        let pos = self.position(step);
        let order = epoch_order(&self.train, self.seed, pos.epoch as u64);
        let start = pos.step_in_epoch * self.examples_per_step;
        let end = (start + self.examples_per_step).min(order.len());
        order
            .get(start..end)
            .map(<[usize]>::to_vec)
            .unwrap_or_default()
    }

    /// The micro-batches of global step `step`.
    pub fn step_batches(&self, examples: &[Example], step: usize) -> Result<Vec<PackedBatch>> {
        pack(examples, &self.step_examples(step), self.micro_batch_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_cover_each_epoch_once_in_a_new_order() {
        let plan = StepPlan::new((0..37).collect(), 5, 8, 4096, 2, 0);
        assert_eq!(plan.steps_per_epoch(), 5);
        assert_eq!(plan.total_steps(), 10);
        let epoch = |e: usize| -> Vec<usize> {
            (e * 5..e * 5 + 5)
                .flat_map(|s| plan.step_examples(s))
                .collect()
        };
        let (e0, e1) = (epoch(0), epoch(1));
        assert_eq!(plan.step_examples(4).len(), 5);
        for e in [&e0, &e1] {
            let mut sorted = e.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..37).collect::<Vec<_>>());
        }
        assert_ne!(e0, e1);
        assert_eq!(
            plan.position(7),
            StepPos {
                epoch: 1,
                step_in_epoch: 2
            }
        );
    }

    #[test]
    fn max_steps_cuts_the_run() {
        assert_eq!(
            StepPlan::new((0..37).collect(), 5, 8, 4096, 2, 3).total_steps(),
            3
        );
        assert_eq!(
            StepPlan::new((0..37).collect(), 5, 8, 4096, 0, 12).total_steps(),
            12
        );
    }
}
