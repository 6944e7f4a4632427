//! The attention guard (DESIGN.md §7, attention step 5): as for the MLP, every K steps a dense
//! probe compares the sparse and the dense loss of the same batch, measures per layer the
//! attention-mass recall and the kept density, moves each layer's mass target with the MLP
//! guard's controller (`exposure::guard::control`, through the same [`probe_with`]: same
//! [`GuardConfig`], same report types), and refreshes
//! the predictors from the dense pass's labels.
//!
//! The probe does not run the model itself: `batch_loss` runs one forward of the probe batch
//! through the hook in its current mode (dense or measured) and returns the mean loss, so the
//! same logic serves the CPU model and any other engine that calls the hook.

use super::predictor::AttnLabels;
use super::sparse::SparseAttention;
use crate::exposure::guard::{probe_with, GuardConfig, Guarded, ProbeReport};
use crate::exposure::sparse_mlp::{LayerCounters, Mode};

/// The dense probe after `step` steps ([`probe_with`]): a dense pass (collecting labels when
/// the config refreshes), a measured sparse pass, the controller's move, the refresh. Leaves
/// `hook` in [`Mode::Sparse`](crate::exposure::sparse_mlp::Mode).
///
/// # Errors
/// The first error of `batch_loss` (targets and predictors are then left unchanged).
pub fn probe<E>(
    cfg: &GuardConfig,
    hook: &SparseAttention,
    step: usize,
    batch_loss: impl FnMut(&SparseAttention) -> Result<f64, E>,
) -> Result<ProbeReport, E> {
    probe_with(cfg, hook, step, batch_loss)
}

impl Guarded for SparseAttention {
    type Labels = AttnLabels;
    fn layers(&self) -> usize {
        SparseAttention::layers(self)
    }
    fn set_mode(&self, mode: Mode) {
        SparseAttention::set_mode(self, mode)
    }
    fn take_window(&self) -> Vec<LayerCounters> {
        SparseAttention::take_window(self)
    }
    fn take_measured(&self) -> Vec<LayerCounters> {
        SparseAttention::take_measured(self)
    }
    fn start_collecting(&self) {
        SparseAttention::start_collecting(self)
    }
    fn take_labels(&self) -> Vec<AttnLabels> {
        SparseAttention::take_labels(self)
    }
    fn targets(&self) -> Vec<f64> {
        SparseAttention::targets(self)
    }
    fn set_targets(&self, targets: &[f64]) {
        SparseAttention::set_targets(self, targets)
    }
    fn fit(&self, labels: &[AttnLabels], steps: usize, seed: u64) -> Vec<f32> {
        SparseAttention::fit(self, labels, steps, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;
    use crate::exposure::attention::maps::block_maps;
    use crate::exposure::attention::selection::SelectionParams;
    use crate::exposure::attention::sparse::SparseAttentionConfig;
    use crate::exposure::guard::Action;
    use crate::model::{AttentionHook, AttentionInput};

    #[test]
    fn a_probe_measures_recall_moves_targets_and_refreshes() {
        let (heads, d, t, layers) = (2, 8, 256, 2);
        let cu = [0i32, 256];
        let mut rng = SplitMix64::new(8);
        let q: Vec<f32> = (0..t * heads * d)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect();
        let k: Vec<f32> = q.iter().map(|v| v * 0.8 + 0.1).collect();
        let input = AttentionInput {
            q: &q,
            k: &k,
            cu_seqlens: &cu,
            heads,
            head_dim: d,
        };
        let config = SparseAttentionConfig {
            q_block: 32,
            k_block: 32,
            selection: SelectionParams {
                target: 0.5,
                window: 0,
                ..Default::default()
            },
            ..Default::default()
        };
        let hook = SparseAttention::new(layers, heads, d, config, 1).unwrap();
        // A stand-in forward: every layer selects and observes; the "loss" grows with the mass
        // the masks drop (1 when dense).
        let forward = |h: &SparseAttention| -> Result<f64, String> {
            let mut lost = 0.0;
            for l in 0..layers {
                let mask = h.select(l, input);
                h.observe(l, input, mask.as_ref());
                if let Some(m) = mask {
                    lost += 1.0 - block_maps(&input, 32, 32).recall(&m);
                }
            }
            Ok(1.0 + lost)
        };
        let cfg = GuardConfig {
            refresh_steps: 5,
            ..Default::default()
        };
        let report = probe(&cfg, &hook, 7, forward).unwrap();
        assert_eq!(hook.mode(), Mode::Sparse);
        assert_eq!(report.dense_loss, 1.0);
        let lost: f64 = report.layers.iter().map(|l| 1.0 - l.recall).sum();
        assert!((report.sparse_loss - 1.0 - lost).abs() < 1e-9);
        assert!(report.gap > cfg.gap_budget, "a target of 0.5 drops mass");
        assert_eq!(report.action, Action::Tighten);
        for (l, lp) in report.layers.iter().enumerate() {
            assert!(lp.recall < 1.0 && lp.density < 1.0);
            assert_eq!(lp.target, 0.5);
            assert!(lp.new_target > 0.5 && hook.targets()[l] == lp.new_target);
        }
        assert_eq!(report.refresh_loss.len(), layers);
        assert!(report.refresh_loss.iter().all(|v| v.is_finite()));
        // An error in the dense pass leaves the targets alone.
        let targets = hook.targets();
        assert!(probe(&cfg, &hook, 8, |_| Err::<f64, _>("no")).is_err());
        assert_eq!(hook.targets(), targets);
    }
}
