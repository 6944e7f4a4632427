//! Attention exposure on a text corpus: the dense model runs over windows of a plain-text file
//! ([`text_windows`]: documents joined, each starting with `</s>`), and the hooks of this module
//! see every layer's queries and keys. Two runs:
//! - [`profile`]: the [`AttentionProfiler`] over the first `windows` windows (`lexp profile
//!   --attention`);
//! - [`predictor_quality`]: predictors trained on the first windows, measured on later, disjoint
//!   windows (per layer recall of the exact attention mass and density at several mass
//!   targets, beside the per-row oracle's density at the same recall), and [`loss_gap`]: the
//!   held-out language-model loss of the sparse forward against the dense one.

use super::maps::{block_maps, BlockMaps};
use super::predictor::{AttnLabels, PredictorConfig};
use super::profiler::{AttentionProfiler, ProfileSettings};
use super::selection::{self, SelectionParams};
use super::sparse::{SparseAttention, SparseAttentionConfig, SparseAttentionError};
use crate::checkpoint::{CheckpointError, OptModel};
use crate::data::{pack, text_windows, DataError, Example, PackedBatch, Tokenizer};
use crate::exposure::sparse_mlp::Mode;
use crate::model::opt::head_loss;
use crate::model::{
    forward_exposed, AttentionHook, AttentionInput, AttentionMask, Exposure, ModelError,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Errors of a corpus run.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// The corpus has fewer full windows than asked for.
    #[error("{path} has {have} windows of {seq} tokens, {want} were asked for", path = .path.display())]
    TooFewWindows {
        /// The corpus.
        path: PathBuf,
        /// Full windows in it.
        have: usize,
        /// Windows asked for.
        want: usize,
        /// Tokens per window.
        seq: usize,
    },
    /// The corpus could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Tokenizer or packing.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Loading the model.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The forward pass.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The hook's settings.
    #[error(transparent)]
    Settings(#[from] SparseAttentionError),
}

/// The model and the text cut into windows of `seq` tokens.
pub fn load(
    model_dir: &Path,
    data: &Path,
    seq: usize,
) -> Result<(OptModel, Vec<Example>), CorpusError> {
    let model = OptModel::load(model_dir)?;
    let tok = Tokenizer::from_file(model_dir.join("tokenizer.json"))?;
    let text = std::fs::read_to_string(data).map_err(|source| CorpusError::Io {
        path: data.to_path_buf(),
        source,
    })?;
    Ok((model, text_windows(&tok, &text, seq)?))
}

/// Batches of `per_batch` windows for windows `range` (checked against what the corpus has).
pub fn batches(
    windows: &[Example],
    range: std::ops::Range<usize>,
    per_batch: usize,
    seq: usize,
    data: &Path,
) -> Result<Vec<PackedBatch>, CorpusError> {
    if windows.len() < range.end {
        return Err(CorpusError::TooFewWindows {
            path: data.to_path_buf(),
            have: windows.len(),
            want: range.end,
            seq,
        });
    }
    let order: Vec<usize> = range.collect();
    Ok(pack(windows, &order, per_batch.max(1) * seq)?)
}

/// Runs `hook` over `batches` (dense forwards, no adapter, no dropout), `progress` after each.
pub fn run_dense(
    model: &OptModel,
    hook: &dyn AttentionHook,
    batches: &[PackedBatch],
    progress: &mut dyn FnMut(),
) -> Result<(), CorpusError> {
    let exposure = Exposure {
        mlp: None,
        attention: Some(hook),
    };
    for b in batches {
        forward_exposed(model, None, b, None, exposure, false)?;
        progress();
    }
    Ok(())
}

/// Labels for `hook`'s predictors from dense forwards of `batches` (no adapter, no dropout):
/// pooled queries and keys and the exact maps, per layer. Leaves `hook` in its mode.
pub fn collect_labels(
    model: &OptModel,
    hook: &SparseAttention,
    batches: &[PackedBatch],
    progress: &mut dyn FnMut(),
) -> Result<Vec<AttnLabels>, CorpusError> {
    let before = hook.mode();
    hook.set_mode(Mode::Dense);
    hook.start_collecting();
    let run = run_dense(model, hook, batches, progress);
    let labels = hook.take_labels();
    hook.set_mode(before);
    run.map(|_| labels)
}

/// The offline training of a run with attention exposure (as the MLP's
/// `sparse_mlp::train_offline`): labels from dense forwards of `batches`, then `steps` Adam
/// steps of every layer's predictor; the final losses per layer.
pub fn train_offline(
    model: &OptModel,
    hook: &SparseAttention,
    batches: &[PackedBatch],
    steps: usize,
    seed: u64,
    progress: &mut dyn FnMut(),
) -> Result<Vec<f32>, CorpusError> {
    let labels = collect_labels(model, hook, batches, progress)?;
    Ok(hook.fit(&labels, steps, seed))
}

/// The attention profile of `batches`.
pub fn profile(
    model: &OptModel,
    batches: &[PackedBatch],
    settings: ProfileSettings,
    progress: &mut dyn FnMut(),
) -> Result<AttentionProfiler, CorpusError> {
    let c = &model.config;
    let p = AttentionProfiler::new(c.num_hidden_layers, c.num_attention_heads, settings);
    run_dense(model, &p, batches, progress)?;
    Ok(p)
}

/// Per layer, for each evaluation batch: the exact maps and each predictor's predicted masses.
struct EvalHook<'a> {
    predictors: &'a [&'a SparseAttention],
    q_block: usize,
    k_block: usize,
    /// `[layer]`: (maps, predicted per predictor) per batch.
    seen: Vec<Mutex<Vec<(BlockMaps, Vec<Vec<f32>>)>>>,
}

impl AttentionHook for EvalHook<'_> {
    fn observe(&self, layer: usize, input: AttentionInput<'_>, _: Option<&AttentionMask>) {
        let Some(slot) = self.seen.get(layer) else {
            return;
        };
        let maps = block_maps(&input, self.q_block, self.k_block);
        let preds = self
            .predictors
            .iter()
            .map(|p| p.predicted(layer, &input))
            .collect();
        slot.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((maps, preds));
    }
}

/// One (predictor, layer, target) measurement.
#[derive(Clone, Debug, Serialize)]
pub struct QualityPoint {
    /// Mass target of the selection.
    pub target: f64,
    /// Kept share of the exact attention mass (query-weighted).
    pub recall: f64,
    /// Kept blocks over causal blocks.
    pub density: f64,
    /// The per-row oracle's density at the same recall (its target searched to match).
    pub oracle_density: f64,
}

/// Recall and density of the selection on `scores` (one per batch) against `maps`.
fn measure(maps: &[&BlockMaps], scores: &[&[f32]], params: &SelectionParams) -> (f64, f64, usize) {
    let (mut kept, mut total, mut blocks, mut causal) = (0.0, 0.0, 0usize, 0usize);
    for (m, s) in maps.iter().zip(scores) {
        let mask = selection::select(&m.layout, s, params);
        let (k, t) = m.mass_kept(&mask);
        kept += k;
        total += t;
        blocks += mask.keys.len();
        causal += mask.causal_blocks();
    }
    let recall = if total > 0.0 { kept / total } else { 1.0 };
    let density = if causal > 0 {
        blocks as f64 / causal as f64
    } else {
        1.0
    };
    (recall, density, blocks)
}

/// The oracle's density at `recall`: the smallest per-row target whose recall reaches it
/// (bisection on the target).
fn oracle_density(maps: &[&BlockMaps], recall: f64, base: &SelectionParams) -> f64 {
    let scores: Vec<&[f32]> = maps.iter().map(|m| m.mass.as_slice()).collect();
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        let p = SelectionParams {
            target: mid,
            ..*base
        };
        if measure(maps, &scores, &p).0 >= recall {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    measure(
        maps,
        &scores,
        &SelectionParams {
            target: hi,
            ..*base
        },
    )
    .1
}

/// One predictor variant's results.
#[derive(Clone, Debug, Serialize)]
pub struct VariantReport {
    /// Name (e.g. `rank16+bias`).
    pub name: String,
    /// Its settings.
    pub predictor: PredictorConfig,
    /// Final training loss (mean KL) per layer.
    pub train_loss: Vec<f32>,
    /// `[layer][target]`.
    pub layers: Vec<Vec<QualityPoint>>,
    /// Per layer: the smallest target (of a fine grid) whose held-out recall is ≥ `goal`, with
    /// its recall and density (chosen on the evaluation windows: an optimistic figure).
    pub at_goal: Vec<QualityPoint>,
}

/// Runs the predictor-quality measurement: train every variant on `train` (one dense pass
/// collects the labels), evaluate on `eval` at `targets`, and search the target reaching
/// `goal`.
#[allow(clippy::too_many_arguments)]
pub fn predictor_quality(
    model: &OptModel,
    train: &[PackedBatch],
    eval: &[PackedBatch],
    base: SparseAttentionConfig,
    variants: &[(String, PredictorConfig)],
    steps: usize,
    targets: &[f64],
    goal: f64,
    seed: u64,
    progress: &mut dyn FnMut(),
) -> Result<(Vec<VariantReport>, Vec<SparseAttention>), CorpusError> {
    let c = &model.config;
    let (nl, nh, hd) = (c.num_hidden_layers, c.num_attention_heads, c.head_dim());
    let hooks: Vec<SparseAttention> = variants
        .iter()
        .map(|(_, p)| {
            SparseAttention::new(
                nl,
                nh,
                hd,
                SparseAttentionConfig {
                    predictor: *p,
                    ..base
                },
                seed,
            )
        })
        .collect::<Result<_, _>>()?;
    let labels = collect_labels(model, &hooks[0], train, progress)?;
    let losses: Vec<Vec<f32>> = hooks.iter().map(|h| h.fit(&labels, steps, seed)).collect();
    progress();
    let refs: Vec<&SparseAttention> = hooks.iter().collect();
    let refs = refs.as_slice();
    let eval_hook = EvalHook {
        predictors: refs,
        q_block: base.q_block,
        k_block: base.k_block,
        seen: (0..nl).map(|_| Mutex::new(Vec::new())).collect(),
    };
    run_dense(model, &eval_hook, eval, progress)?;
    let seen: Vec<Vec<(BlockMaps, Vec<Vec<f32>>)>> = eval_hook
        .seen
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let grid: Vec<f64> = (0..=200).map(|i| 0.5 + 0.5 * i as f64 / 200.0).collect();
    let mut out = Vec::new();
    for (v, (name, pc)) in variants.iter().enumerate() {
        let mut layers = Vec::new();
        let mut at_goal = Vec::new();
        for per in seen.iter() {
            let maps: Vec<&BlockMaps> = per.iter().map(|x| &x.0).collect();
            let scores: Vec<&[f32]> = per.iter().map(|x| x.1[v].as_slice()).collect();
            let point = |target: f64| {
                let params = SelectionParams {
                    target,
                    ..base.selection
                };
                let (recall, density, _) = measure(&maps, &scores, &params);
                QualityPoint {
                    target,
                    recall,
                    density,
                    oracle_density: oracle_density(&maps, recall, &base.selection),
                }
            };
            layers.push(targets.iter().map(|&t| point(t)).collect());
            let t = grid
                .iter()
                .copied()
                .find(|&t| {
                    let params = SelectionParams {
                        target: t,
                        ..base.selection
                    };
                    measure(&maps, &scores, &params).0 >= goal
                })
                .unwrap_or(1.0);
            at_goal.push(point(t));
        }
        out.push(VariantReport {
            name: name.clone(),
            predictor: *pc,
            train_loss: losses[v].clone(),
            layers,
            at_goal,
        });
    }
    Ok((out, hooks))
}

/// Held-out language-model loss with attention exposure at one mass target.
#[derive(Clone, Debug, Serialize)]
pub struct LossPoint {
    /// Mass target of every layer (`None`: dense).
    pub target: Option<f64>,
    /// Mean loss per target token.
    pub loss: f64,
    /// `(loss − dense) / dense`.
    pub gap: f64,
    /// Per layer: attention-mass recall of the masks the forward used.
    pub recall: Vec<f64>,
    /// Per layer: kept / causal blocks.
    pub density: Vec<f64>,
}

/// Mean loss of `batches` with `hook` in its current mode (no adapter, no dropout).
fn mean_loss(
    model: &OptModel,
    hook: &SparseAttention,
    batches: &[PackedBatch],
) -> Result<f64, CorpusError> {
    let exposure = Exposure {
        mlp: None,
        attention: Some(hook),
    };
    let (mut sum, mut count) = (0.0f64, 0usize);
    for b in batches {
        let fwd = forward_exposed(model, None, b, None, exposure, false)?;
        let out = head_loss(model, &fwd, &b.targets, None)?;
        sum += out.loss_sum;
        count += out.count;
    }
    Ok(sum / count.max(1) as f64)
}

/// The dense loss of `batches` and, for each target, the loss of the sparse forward (every
/// layer at that target, masks from `hook`'s predictors) with the recall and density it had.
/// Leaves `hook` in [`Mode::Sparse`] with its targets as before.
pub fn loss_gap(
    model: &OptModel,
    hook: &SparseAttention,
    batches: &[PackedBatch],
    targets: &[f64],
    progress: &mut dyn FnMut(),
) -> Result<Vec<LossPoint>, CorpusError> {
    let before = hook.targets();
    hook.set_mode(Mode::Dense);
    let dense = mean_loss(model, hook, batches);
    progress();
    let mut out = Vec::new();
    if let Ok(d) = dense {
        out.push(LossPoint {
            target: None,
            loss: d,
            gap: 0.0,
            recall: vec![1.0; hook.layers()],
            density: vec![1.0; hook.layers()],
        });
        hook.set_mode(Mode::Measure);
        for &t in targets {
            hook.set_targets(&vec![t; hook.layers()]);
            hook.take_measured();
            let loss = match mean_loss(model, hook, batches) {
                Ok(l) => l,
                Err(e) => {
                    hook.set_mode(Mode::Sparse);
                    hook.set_targets(&before);
                    return Err(e);
                }
            };
            let m = hook.take_measured();
            out.push(LossPoint {
                target: Some(t),
                loss,
                gap: (loss - d) / d.abs().max(1e-12),
                recall: m.iter().map(|c| c.recall()).collect(),
                density: m.iter().map(|c| c.density()).collect(),
            });
            progress();
        }
    }
    hook.set_mode(Mode::Sparse);
    hook.set_targets(&before);
    dense?;
    Ok(out)
}
