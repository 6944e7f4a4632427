//! [`SparseMlp`]: the [`MlpHook`] that runs MLP exposure on the CPU model — per layer a
//! [`BlockPredictor`] scores `fc1`'s input, [`selection::select`] keeps the blocks covering the
//! layer's mass target, and [`MlpHook::observe`] measures what that cost (activation-mass
//! recall against the dense activations) and collects labels for (re)training the predictors.
//!
//! The hook does not care whether the model's neurons were permuted by the exposer: it sees
//! whatever `fc1` produces, and block `b` is always neurons `b·block .. (b+1)·block`.

use super::predictor::{block_mass, BlockPredictor, LabelSet, PredictorConfig};
use super::selection::{self, SelectionParams};
use crate::checkpoint::{OptConfig, OptModel};
use crate::data::{PackedBatch, SplitMix64};
use crate::model::{self, MlpHook, MlpMask};
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard, RwLock};
use thiserror::Error;

/// Settings of MLP exposure that a user can get wrong.
#[derive(Debug, Error)]
pub enum SparseMlpError {
    /// The block size does not divide the MLP width.
    #[error("--mlp-block {block} does not divide the MLP width {ffn} (use a divisor, e.g. 32, 64 or 128)")]
    Block {
        /// The block size.
        block: usize,
        /// `ffn_dim`.
        ffn: usize,
    },
    /// Another setting is out of range.
    #[error("{0}")]
    Setting(String),
}

/// Settings of a [`SparseMlp`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseMlpConfig {
    /// Neurons per block.
    pub block: usize,
    /// Rows per group.
    pub group: usize,
    /// Initial mass target of every layer, in `(0, 1]`.
    pub target: f64,
    /// Largest share of blocks a group may keep, in `(0, 1]`.
    pub budget: f64,
    /// The predictors.
    pub predictor: PredictorConfig,
    /// Label rows kept per layer while collecting.
    pub label_cap: usize,
}

impl Default for SparseMlpConfig {
    fn default() -> Self {
        SparseMlpConfig {
            block: 32,
            group: 128,
            target: 0.99,
            budget: 1.0,
            predictor: PredictorConfig::default(),
            label_cap: 16384,
        }
    }
}

/// What [`MlpHook::select`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Select blocks; counted in the training totals ([`SparseMlp::train_totals`]) and the
    /// window ([`SparseMlp::take_window`]).
    Sparse,
    /// Select blocks; counted apart ([`SparseMlp::take_measured`]): probes, evaluation.
    Measure,
    /// Run dense (labels are still collected when collecting).
    Dense,
}

/// Work and mass counters of one layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerCounters {
    /// Kept (row, block) pairs.
    pub kept_work: f64,
    /// All (row, block) pairs.
    pub total_work: f64,
    /// Activation mass of the kept blocks (dense activations).
    pub kept_mass: f64,
    /// All activation mass.
    pub total_mass: f64,
}

impl LayerCounters {
    /// Kept share of the `fc1`/`fc2` work (1 when nothing was counted).
    pub fn density(&self) -> f64 {
        if self.total_work > 0.0 {
            self.kept_work / self.total_work
        } else {
            1.0
        }
    }

    /// Kept share of the activation mass (1 when nothing was counted).
    pub fn recall(&self) -> f64 {
        if self.total_mass > 0.0 {
            self.kept_mass / self.total_mass
        } else {
            1.0
        }
    }
}

/// The predictor + selection hook (see the module docs).
pub struct SparseMlp {
    config: SparseMlpConfig,
    hidden: usize,
    ffn: usize,
    predictors: Vec<RwLock<BlockPredictor>>,
    targets: Mutex<Vec<f64>>,
    mode: Mutex<Mode>,
    train: Mutex<Vec<LayerCounters>>,
    window: Mutex<Vec<LayerCounters>>,
    measured: Mutex<Vec<LayerCounters>>,
    labels: Mutex<Option<Vec<LabelSet>>>,
    seed: u64,
}

/// Locks a mutex, recovering the data of a poisoned one (a panic elsewhere does not make the
/// counters unusable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The counters, then resets them.
pub(crate) fn take(m: &Mutex<Vec<LayerCounters>>) -> Vec<LayerCounters> {
    let mut w = lock(m);
    let out = w.clone();
    w.iter_mut().for_each(|c| *c = LayerCounters::default());
    out
}

impl SparseMlp {
    /// A hook for a model of shape `model` with fresh (untrained) predictors.
    pub fn new(
        model: &OptConfig,
        config: SparseMlpConfig,
        seed: u64,
    ) -> Result<SparseMlp, SparseMlpError> {
        let (hidden, ffn) = (model.hidden_size, model.ffn_dim);
        if config.block == 0 || ffn % config.block != 0 {
            return Err(SparseMlpError::Block {
                block: config.block,
                ffn,
            });
        }
        if config.group == 0 {
            return Err(SparseMlpError::Setting(
                "--mlp-group must be at least 1".into(),
            ));
        }
        if !(config.target > 0.0 && config.target <= 1.0) {
            return Err(SparseMlpError::Setting(format!(
                "--mlp-target {} is not in (0, 1]",
                config.target
            )));
        }
        if !(config.budget > 0.0 && config.budget <= 1.0) {
            return Err(SparseMlpError::Setting(format!(
                "--mlp-budget {} is not in (0, 1]",
                config.budget
            )));
        }
        if config.predictor.rank == 0 {
            return Err(SparseMlpError::Setting(
                "--mlp-rank must be at least 1".into(),
            ));
        }
        let nb = ffn / config.block;
        let layers = model.num_hidden_layers;
        let predictors = (0..layers)
            .map(|l| {
                RwLock::new(BlockPredictor::new(
                    hidden,
                    nb,
                    config.predictor,
                    seed ^ ((l as u64 + 1) * 0x9E37_79B9),
                ))
            })
            .collect();
        Ok(SparseMlp {
            config,
            hidden,
            ffn,
            predictors,
            targets: Mutex::new(vec![config.target; layers]),
            mode: Mutex::new(Mode::Sparse),
            train: Mutex::new(vec![LayerCounters::default(); layers]),
            window: Mutex::new(vec![LayerCounters::default(); layers]),
            measured: Mutex::new(vec![LayerCounters::default(); layers]),
            labels: Mutex::new(None),
            seed,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SparseMlpConfig {
        &self.config
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.predictors.len()
    }

    /// Blocks per row.
    pub fn num_blocks(&self) -> usize {
        self.ffn / self.config.block
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

    /// Starts collecting labels (`fc1` inputs and block masses) from every observed layer.
    pub fn start_collecting(&self) {
        let nb = self.num_blocks();
        *lock(&self.labels) = Some(
            (0..self.layers())
                .map(|l| {
                    LabelSet::new(self.hidden, nb, self.config.label_cap, self.seed ^ l as u64)
                })
                .collect(),
        );
    }

    /// Stops collecting and returns the labels per layer (empty if not collecting).
    pub fn take_labels(&self) -> Vec<LabelSet> {
        lock(&self.labels).take().unwrap_or_default()
    }

    /// `steps` Adam steps of each layer's predictor on its labels; the final losses per layer.
    pub fn fit(&self, labels: &[LabelSet], steps: usize, seed: u64) -> Vec<f32> {
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

    /// The counters a selection in `mode` adds to.
    fn counter_sets(&self, mode: Mode) -> Vec<MutexGuard<'_, Vec<LayerCounters>>> {
        match mode {
            Mode::Sparse => vec![lock(&self.window), lock(&self.train)],
            Mode::Measure => vec![lock(&self.measured)],
            Mode::Dense => Vec::new(),
        }
    }

    /// Counters of all selections made in [`Mode::Sparse`] (the training steps).
    pub fn train_totals(&self) -> Vec<LayerCounters> {
        lock(&self.train).clone()
    }

    /// Replaces every layer's predictor (a resumed run's, [`super::state`]).
    pub fn set_predictors(&self, predictors: Vec<BlockPredictor>) -> Result<(), SparseMlpError> {
        if predictors.len() != self.predictors.len() {
            return Err(SparseMlpError::Setting(format!(
                "{} predictors for {} layers",
                predictors.len(),
                self.predictors.len()
            )));
        }
        for (slot, p) in self.predictors.iter().zip(predictors) {
            *slot.write().unwrap_or_else(|e| e.into_inner()) = p;
        }
        Ok(())
    }

    /// A copy of every layer's predictor (e.g. for the GPU's
    /// [`crate::gpu::MlpPredictors`]).
    pub fn predictors(&self) -> Vec<BlockPredictor> {
        self.predictors
            .iter()
            .map(|p| p.read().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// The selection `select` would make for `layer` (exposed for measurements).
    pub fn selection(&self, layer: usize, ffn_in: &[f32], rows: usize) -> selection::Selection {
        let target = lock(&self.targets)[layer];
        let scores = self.predictors[layer]
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .scores(ffn_in, rows);
        let nb = self.num_blocks();
        selection::select(
            &scores,
            rows,
            nb,
            self.config.block,
            &SelectionParams {
                group: self.config.group,
                target,
                max_blocks: selection::budget_blocks(nb, self.config.budget),
            },
        )
    }
}

impl MlpHook for SparseMlp {
    fn select(&self, layer: usize, ffn_in: &[f32], rows: usize) -> Option<MlpMask> {
        let mode = self.mode();
        if mode == Mode::Dense || layer >= self.layers() {
            return None;
        }
        let mask = self.selection(layer, ffn_in, rows).mask;
        let kept = selection::work_density(&mask, rows) * (rows * mask.num_blocks) as f64;
        let total = (rows * mask.num_blocks) as f64;
        for mut s in self.counter_sets(mode) {
            s[layer].kept_work += kept;
            s[layer].total_work += total;
        }
        Some(mask)
    }

    fn observe(
        &self,
        layer: usize,
        ffn_in: &[f32],
        act: &[f32],
        rows: usize,
        mask: Option<&MlpMask>,
    ) {
        if layer >= self.layers() {
            return;
        }
        if let Some(m) = mask {
            let (kept, total) = selection::mass_recall(act, rows, m);
            for mut s in self.counter_sets(self.mode()) {
                s[layer].kept_mass += kept;
                s[layer].total_mass += total;
            }
        }
        let mut labels = lock(&self.labels);
        if let Some(sets) = labels.as_mut() {
            let mass = block_mass(act, rows, self.ffn, self.config.block);
            sets[layer].push(ffn_in, &mass, rows);
        }
    }
}

/// Collects labels from dense forwards (no adapter, no dropout) of `batches` and trains every
/// layer's predictor `steps` Adam steps on them; `progress(done, total)` is called after each
/// batch (`total` = batches + 1, the last unit being the fit). Returns the final losses.
pub fn train_offline(
    model: &OptModel,
    hook: &SparseMlp,
    batches: &[PackedBatch],
    steps: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> model::Result<Vec<f32>> {
    let before = hook.mode();
    hook.set_mode(Mode::Dense);
    hook.start_collecting();
    let total = batches.len() + 1;
    for (i, b) in batches.iter().enumerate() {
        let r = model::forward_exposed(model, None, b, None, model::Exposure::of_mlp(hook), false);
        if let Err(e) = r {
            hook.take_labels();
            hook.set_mode(before);
            return Err(e);
        }
        progress(i + 1, total);
    }
    let labels = hook.take_labels();
    hook.set_mode(before);
    let losses = hook.fit(&labels, steps, seed);
    progress(total, total);
    Ok(losses)
}
