//! [`SparseAttention`]: the [`AttentionHook`] that runs attention exposure on the CPU model —
//! per layer a [`LayerPredictor`] scores key blocks from pooled queries and keys,
//! [`selection::select`] keeps the local window, the sinks and the predicted blocks up to the
//! layer's mass target, and [`AttentionHook::observe`] measures the recall against the exact
//! maps and collects labels for (re)training the predictors.
//!
//! The exact maps cost about as much as the dense attention itself, so `observe` computes them
//! only when they are used: in [`Mode::Measure`] (probes, evaluation) and while collecting
//! labels. Training steps ([`Mode::Sparse`]) count only the kept work.

use super::maps::{block_maps, RowLayout};
use super::predictor::{AttnLabels, LayerPredictor, PredictorConfig};
use super::selection::{self, SelectionParams};
use crate::data::SplitMix64;
use crate::exposure::sparse_mlp::{lock, take, LayerCounters, Mode};
use crate::model::attention_hook::{GPU_K_BLOCK, GPU_Q_BLOCK};
use crate::model::{AttentionHook, AttentionInput, AttentionMask};
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard, RwLock};
use thiserror::Error;

/// Settings of attention exposure that a user can get wrong.
#[derive(Debug, Error)]
#[error("attention exposure: {0}")]
pub struct SparseAttentionError(pub String);

/// Settings of a [`SparseAttention`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseAttentionConfig {
    /// Query rows per block.
    pub q_block: usize,
    /// Keys per block.
    pub k_block: usize,
    /// Local window, sinks, initial mass target of every layer, budget.
    pub selection: SelectionParams,
    /// The predictors.
    pub predictor: PredictorConfig,
    /// Sequences kept per layer and head while collecting labels.
    pub label_cap: usize,
}

impl Default for SparseAttentionConfig {
    fn default() -> Self {
        SparseAttentionConfig {
            q_block: GPU_Q_BLOCK,
            k_block: GPU_K_BLOCK,
            selection: SelectionParams::default(),
            predictor: PredictorConfig::default(),
            label_cap: 4096,
        }
    }
}

/// The predictor + selection hook (see the module docs).
pub struct SparseAttention {
    config: SparseAttentionConfig,
    heads: usize,
    predictors: Vec<RwLock<LayerPredictor>>,
    targets: Mutex<Vec<f64>>,
    mode: Mutex<Mode>,
    train: Mutex<Vec<LayerCounters>>,
    window: Mutex<Vec<LayerCounters>>,
    measured: Mutex<Vec<LayerCounters>>,
    labels: Mutex<Option<Vec<AttnLabels>>>,
    seed: u64,
}

impl SparseAttention {
    /// A hook for `layers` layers of `heads` heads of width `head_dim`, fresh predictors.
    ///
    /// # Errors
    /// A zero block size, rank or head count, or a target or budget outside `(0, 1]`.
    pub fn new(
        layers: usize,
        heads: usize,
        head_dim: usize,
        config: SparseAttentionConfig,
        seed: u64,
    ) -> Result<SparseAttention, SparseAttentionError> {
        let s = &config.selection;
        if config.q_block == 0 || config.k_block == 0 {
            return Err(SparseAttentionError("block sizes must be positive".into()));
        }
        if heads == 0 || head_dim == 0 || config.predictor.rank == 0 {
            return Err(SparseAttentionError(
                "heads, head width and predictor rank must be positive".into(),
            ));
        }
        if !(s.target > 0.0 && s.target <= 1.0 && s.max_density > 0.0 && s.max_density <= 1.0) {
            return Err(SparseAttentionError(format!(
                "target {} and budget {} must be in (0, 1]",
                s.target, s.max_density
            )));
        }
        let predictors = (0..layers)
            .map(|l| {
                RwLock::new(LayerPredictor::new(
                    heads,
                    head_dim,
                    config.predictor,
                    seed ^ (l as u64 + 1).wrapping_mul(0x9E37_79B9),
                ))
            })
            .collect();
        let zero = vec![LayerCounters::default(); layers];
        Ok(SparseAttention {
            config,
            heads,
            predictors,
            targets: Mutex::new(vec![s.target; layers]),
            mode: Mutex::new(Mode::Sparse),
            train: Mutex::new(zero.clone()),
            window: Mutex::new(zero.clone()),
            measured: Mutex::new(zero),
            labels: Mutex::new(None),
            seed,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SparseAttentionConfig {
        &self.config
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.predictors.len()
    }

    /// Each layer's current mass target.
    pub fn targets(&self) -> Vec<f64> {
        lock(&self.targets).clone()
    }

    /// Sets the layers' mass targets (the guard's controller does).
    pub fn set_targets(&self, targets: &[f64]) {
        let mut t = lock(&self.targets);
        for (a, &b) in t.iter_mut().zip(targets) {
            *a = b;
        }
    }

    /// Switches what `select` does.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.mode) = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *lock(&self.mode)
    }

    /// Starts collecting labels (pooled queries, keys and exact maps) from every observed layer.
    pub fn start_collecting(&self) {
        *lock(&self.labels) = Some(
            (0..self.layers())
                .map(|l| AttnLabels::new(self.heads, self.config.label_cap, self.seed ^ l as u64))
                .collect(),
        );
    }

    /// Stops collecting and returns the labels per layer (empty if not collecting).
    pub fn take_labels(&self) -> Vec<AttnLabels> {
        lock(&self.labels).take().unwrap_or_default()
    }

    /// `steps` Adam steps of each layer's predictor on its labels; the final losses per layer.
    pub fn fit(&self, labels: &[AttnLabels], steps: usize, seed: u64) -> Vec<f32> {
        labels
            .iter()
            .zip(&self.predictors)
            .enumerate()
            .map(|(l, (set, p))| {
                let mut rng = SplitMix64::for_stream(seed, l as u64);
                p.write()
                    .unwrap_or_else(|e| e.into_inner())
                    .fit(set, steps, &mut rng)
            })
            .collect()
    }

    /// Counters of the [`Mode::Sparse`] selections since the last call, then resets them.
    pub fn take_window(&self) -> Vec<LayerCounters> {
        take(&self.window)
    }

    /// Counters of the [`Mode::Measure`] selections since the last call, then resets them.
    pub fn take_measured(&self) -> Vec<LayerCounters> {
        take(&self.measured)
    }

    /// Counters of all selections made in [`Mode::Sparse`] (the training steps).
    pub fn train_totals(&self) -> Vec<LayerCounters> {
        lock(&self.train).clone()
    }

    fn counter_sets(&self, mode: Mode) -> Vec<MutexGuard<'_, Vec<LayerCounters>>> {
        match mode {
            Mode::Sparse => vec![lock(&self.window), lock(&self.train)],
            Mode::Measure => vec![lock(&self.measured)],
            Mode::Dense => Vec::new(),
        }
    }

    /// The predicted block masses of `layer` for `input` (laid out as its maps).
    pub fn predicted(&self, layer: usize, input: &AttentionInput<'_>) -> Vec<f32> {
        self.predictors[layer]
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .predict(input, self.config.q_block, self.config.k_block)
    }

    /// The mask `select` would make for `layer` at mass target `target` (for measurements).
    pub fn mask_at(&self, layer: usize, input: &AttentionInput<'_>, target: f64) -> AttentionMask {
        let layout = RowLayout::new(
            input.cu_seqlens,
            input.heads,
            self.config.q_block,
            self.config.k_block,
        );
        let params = SelectionParams {
            target,
            ..self.config.selection
        };
        selection::select(&layout, &self.predicted(layer, input), &params)
    }
}

impl AttentionHook for SparseAttention {
    fn select(&self, layer: usize, input: AttentionInput<'_>) -> Option<AttentionMask> {
        let mode = self.mode();
        if mode == Mode::Dense || layer >= self.layers() || input.heads != self.heads {
            return None;
        }
        let target = lock(&self.targets)[layer];
        let mask = self.mask_at(layer, &input, target);
        let (kept, total) = (mask.keys.len() as f64, mask.causal_blocks() as f64);
        for mut s in self.counter_sets(mode) {
            s[layer].kept_work += kept;
            s[layer].total_work += total;
        }
        Some(mask)
    }

    fn observe(&self, layer: usize, input: AttentionInput<'_>, mask: Option<&AttentionMask>) {
        if layer >= self.layers() || input.heads != self.heads {
            return;
        }
        let mode = self.mode();
        let measure = mask.is_some() && mode == Mode::Measure;
        let mut labels = lock(&self.labels);
        if !measure && labels.is_none() {
            return;
        }
        let maps = block_maps(&input, self.config.q_block, self.config.k_block);
        if let (true, Some(m)) = (measure, mask) {
            let (kept, total) = maps.mass_kept(m);
            for mut s in self.counter_sets(mode) {
                s[layer].kept_mass += kept;
                s[layer].total_mass += total;
            }
        }
        if let Some(sets) = labels.as_mut() {
            sets[layer].push(&input, &maps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, scale: f32, rng: &mut SplitMix64) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn the_hook_selects_valid_masks_counts_work_and_recall_and_learns_from_labels() {
        let (heads, d, t) = (2, 16, 512);
        let cu = [0i32, 384, 512];
        let mut rng = SplitMix64::new(21);
        // Keys of blocks 2 and 5 (of 32) match every query: far blocks the predictor must find.
        let dir = random(d, 1.0, &mut rng);
        let mut q = random(t * heads * d, 0.5, &mut rng);
        let mut k = random(t * heads * d, 0.5, &mut rng);
        for i in 0..t {
            for h in 0..heads {
                let base = i * heads * d + h * d;
                for c in 0..d {
                    q[base + c] += 1.2 * dir[c];
                    if [2, 5].contains(&((i % 384) / 32)) {
                        k[base + c] += 1.2 * dir[c];
                    }
                }
            }
        }
        let input = AttentionInput {
            q: &q,
            k: &k,
            cu_seqlens: &cu,
            heads,
            head_dim: d,
        };
        let config = SparseAttentionConfig {
            q_block: 64,
            k_block: 32,
            selection: SelectionParams {
                target: 0.9,
                ..Default::default()
            },
            ..Default::default()
        };
        let hook = SparseAttention::new(3, heads, d, config, 5).unwrap();
        assert!(SparseAttention::new(
            3,
            heads,
            d,
            SparseAttentionConfig {
                q_block: 0,
                ..config
            },
            5
        )
        .is_err());
        hook.set_mode(Mode::Dense);
        assert!(hook.select(1, input).is_none());
        hook.start_collecting();
        hook.observe(1, input, None);
        let labels = hook.take_labels();
        assert_eq!(labels[1].len(), 2);
        assert!(labels[0].is_empty());

        let recall_at = |hook: &SparseAttention| {
            hook.set_mode(Mode::Measure);
            let mask = hook.select(1, input).unwrap();
            mask.validate(&cu, heads).unwrap();
            hook.observe(1, input, Some(&mask));
            let c = hook.take_measured()[1];
            let exact = block_maps(&input, 64, 32).recall(&mask);
            assert!((c.recall() - exact).abs() < 1e-9);
            assert!((c.density() - mask.density()).abs() < 1e-12);
            (c.recall(), c.density())
        };
        let before = recall_at(&hook);
        let loss = hook.fit(&labels, 200, 1);
        assert!(loss[1].is_finite());
        let after = recall_at(&hook);
        // Trained on this batch, the predictor reaches the target at no more density.
        assert!(
            after.0 >= 0.9 - 0.02 && after.0 > before.0 - 1e-9,
            "{before:?} -> {after:?}"
        );
        // Sparse mode counts work in the window and the totals, not recall.
        hook.set_mode(Mode::Sparse);
        let m = hook.select(1, input).unwrap();
        hook.observe(1, input, Some(&m));
        let w = hook.take_window()[1];
        assert_eq!(w.kept_work, m.keys.len() as f64);
        assert_eq!(w.total_mass, 0.0);
        assert_eq!(hook.train_totals()[1].kept_work, w.kept_work);
        // Targets move the density.
        hook.set_targets(&[0.5, 0.5, 0.5]);
        let lo = hook.select(1, input).unwrap().density();
        hook.set_targets(&[1.0, 1.0, 1.0]);
        let hi = hook.select(1, input).unwrap().density();
        assert!(lo < hi, "{lo} {hi}");
    }
}
