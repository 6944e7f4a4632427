//! `lexp profile` as a library (DESIGN.md §7, MLP steps 1–2): how much block sparsity a ReLU
//! OPT model exposes on a text corpus, in natural neuron order and after the co-activation
//! clustering.
//!
//! The protocol is the fixtures' `recipe/explore_sparsity.py`: the text is cut into windows
//! ([`text_windows`]: documents joined, each starting with `</s>`), the first `windows` are run
//! dense in batches of `batch_windows`; the first half of the windows fits the permutation
//! (co-activation Gram per layer, one balanced clustering per block size), the second half is
//! measured under both orders ([`super::stats`] has the definitions, repeated in the report).

use super::cluster::{self, ClusterError};
use super::coactivation::Coactivation;
use super::permutation::{cluster_grams, GramHook, NeuronPermutation, PermutationError};
use super::stats::{zero_fraction, BlockAccumulator, BlockStats, StatsError, TILE_ROWS};
use crate::checkpoint::{write_atomic, CheckpointError, OptModel, SafetensorsError};
use crate::data::{pack, text_windows, DataError, PackedBatch, Tokenizer};
use crate::model::{forward_exposed, Exposure, MlpHook, MlpMask, ModelError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// The `format` field of `profile.json`.
pub const FORMAT: &str = "lexp-profile/1";

/// Errors of a profile run.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Options that cannot work.
    #[error("invalid profile options: {0}")]
    Invalid(String),
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
    /// Writing the report.
    #[error(transparent)]
    Write(#[from] SafetensorsError),
    /// The forward pass.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The statistics.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// The clustering.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The permutation.
    #[error(transparent)]
    Permutation(#[from] PermutationError),
}

/// What to profile and how.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Hugging Face OPT checkpoint folder (with `tokenizer.json`).
    pub model_dir: PathBuf,
    /// Plain-text corpus (documents separated by blank lines).
    pub data: PathBuf,
    /// Windows used; the first half fits the permutation, the second is measured.
    pub windows: usize,
    /// Tokens per window.
    pub seq: usize,
    /// Windows per forward batch (the batch of the batch-union statistic).
    pub batch_windows: usize,
    /// Block sizes (neurons); one clustering each.
    pub blocks: Vec<usize>,
    /// Seed of the clustering's initial centroids.
    pub seed: u64,
    /// k-means iterations.
    pub iters: usize,
}

impl ProfileOptions {
    /// The recipe's protocol: 64 windows of 512 tokens in batches of 8, blocks 32, 64 and 128,
    /// 15 iterations, seed 0.
    pub fn new(model_dir: PathBuf, data: PathBuf) -> ProfileOptions {
        ProfileOptions {
            model_dir,
            data,
            windows: 64,
            seq: 512,
            batch_windows: 8,
            blocks: vec![32, 64, 128],
            seed: 0,
            iters: cluster::DEFAULT_ITERS,
        }
    }
}

/// Progress of a run, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub enum ProfileEvent {
    /// Forward batches to run.
    Start {
        /// Total forward batches (fit and report halves).
        batches: usize,
    },
    /// One more forward batch done.
    Batch,
    /// Clustering the fit half's co-activation, at this block size.
    Clustering {
        /// Neurons per block.
        block: usize,
    },
}

/// One block size of one layer: the statistics in natural and in clustered order.
#[derive(Clone, Debug, Serialize)]
pub struct BlockProfile {
    /// Neurons per block.
    pub block: usize,
    /// Natural neuron order.
    pub natural: BlockStats,
    /// After the co-activation clustering fitted on the first half.
    pub clustered: BlockStats,
}

/// One layer's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct LayerProfile {
    /// Decoder layer.
    pub layer: usize,
    /// Share of zero ReLU outputs over the measured tokens.
    pub zero_fraction: f64,
    /// Per block size.
    pub blocks: Vec<BlockProfile>,
}

/// Everything `profile.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileReport {
    /// [`FORMAT`].
    pub format: &'static str,
    /// Model folder, layers, hidden size, neurons per layer.
    pub model: serde_json::Value,
    /// Corpus, windows and token counts.
    pub data: serde_json::Value,
    /// Block sizes, tile heights, seed, iterations.
    pub settings: serde_json::Value,
    /// What every number means.
    pub definitions: BTreeMap<&'static str, &'static str>,
    /// Per layer.
    pub layers: Vec<LayerProfile>,
    /// Wall time: forwards, clustering, total.
    pub seconds: BTreeMap<&'static str, f64>,
}

/// A finished run: the report and the permutation fitted for each block size.
pub struct ProfileOutput {
    /// The numbers.
    pub report: ProfileReport,
    /// `(block, permutation)` for each block size, in the order asked.
    pub permutations: Vec<(usize, NeuronPermutation)>,
}

fn definitions() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("protocol", "windows of `seq` tokens from the corpus (documents joined in file order, each tokenized with </s> first); the first half of the windows fits the permutation, every statistic is measured on the second half; dense f32 forwards"),
        ("zero_fraction", "share of (token, neuron) ReLU outputs that are exactly zero"),
        ("any", "share of (token, block) pairs with any activation > 0"),
        ("m99", "per token: block masses (sums of activations) sorted descending, the number of blocks whose running sum first reaches 99% of the token's total, as a share of the blocks; mean over tokens (a zero-mass token needs 0)"),
        ("m999", "as m99 for 99.9%"),
        ("tiles", "[t, share]: share of (t consecutive tokens of one forward batch) x block tiles with any activation > 0"),
        ("batch_union", "per forward batch of `batch_windows` windows: share of blocks with any activation > 0 in any token of the batch; mean over batches"),
        ("natural", "neurons in the checkpoint's order"),
        ("clustered", "neurons reordered by balanced k-means (clusters of exactly `block` neurons, greedy capacity-limited assignment, cosine similarity of binary activity vectors) on the fit half's co-activation Gram matrix"),
    ])
}

/// Accumulators of the measured half, per layer.
struct LayerAcc {
    zeros: f64,
    values: f64,
    natural: Vec<BlockAccumulator>,
    clustered: Vec<BlockAccumulator>,
}

/// The hook of the measured half.
struct StatsHook {
    layers: Vec<Mutex<LayerAcc>>,
    error: Mutex<Option<StatsError>>,
}

impl MlpHook for StatsHook {
    fn observe(&self, layer: usize, _: &[f32], act: &[f32], rows: usize, _: Option<&MlpMask>) {
        let Some(acc) = self.layers.get(layer) else {
            return;
        };
        let mut acc = acc.lock().unwrap_or_else(|e| e.into_inner());
        acc.zeros += zero_fraction(act) * act.len() as f64;
        acc.values += act.len() as f64;
        let acc = &mut *acc;
        for a in acc.natural.iter_mut().chain(acc.clustered.iter_mut()) {
            if let Err(e) = a.add(act, rows) {
                *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }
}

/// Reads the corpus and cuts it into the fit and report batches.
fn batches(
    opts: &ProfileOptions,
    tok: &Tokenizer,
) -> Result<(Vec<PackedBatch>, Vec<PackedBatch>), ProfileError> {
    let text = std::fs::read_to_string(&opts.data).map_err(|source| ProfileError::Io {
        path: opts.data.clone(),
        source,
    })?;
    let windows = text_windows(tok, &text, opts.seq)?;
    if windows.len() < opts.windows {
        return Err(ProfileError::TooFewWindows {
            path: opts.data.clone(),
            have: windows.len(),
            want: opts.windows,
            seq: opts.seq,
        });
    }
    let half = opts.windows / 2;
    let budget = opts.batch_windows * opts.seq;
    let fit: Vec<usize> = (0..half).collect();
    let report: Vec<usize> = (half..opts.windows).collect();
    Ok((
        pack(&windows, &fit, budget)?,
        pack(&windows, &report, budget)?,
    ))
}

/// Runs the profile; `progress` hears of every forward batch.
pub fn profile(
    opts: &ProfileOptions,
    progress: &mut dyn FnMut(ProfileEvent),
) -> Result<ProfileOutput, ProfileError> {
    let start = Instant::now();
    if opts.windows < 2 || opts.seq == 0 || opts.batch_windows == 0 || opts.blocks.is_empty() {
        return Err(ProfileError::Invalid(
            "need at least 2 windows, a positive window length and batch, and a block size".into(),
        ));
    }
    let model = OptModel::load(&opts.model_dir)?;
    let c = &model.config;
    let (nl, ffn) = (c.num_hidden_layers, c.ffn_dim);
    if let Some(&b) = opts
        .blocks
        .iter()
        .find(|&&b| b == 0 || !ffn.is_multiple_of(b))
    {
        return Err(ProfileError::Invalid(format!(
            "block size {b} does not divide ffn {ffn}"
        )));
    }
    let tok = Tokenizer::from_file(opts.model_dir.join("tokenizer.json"))?;
    let (fit, report) = batches(opts, &tok)?;
    progress(ProfileEvent::Start {
        batches: fit.len() + report.len(),
    });

    // Fit half: co-activation counts per layer.
    let t0 = Instant::now();
    let hook = GramHook::new(nl, ffn);
    for b in &fit {
        forward_exposed(&model, None, b, None, Exposure::of_mlp(&hook), false)?;
        progress(ProfileEvent::Batch);
    }
    let grams: Vec<Coactivation> = hook.into_grams();
    let mut forward_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut permutations = Vec::new();
    for &block in &opts.blocks {
        progress(ProfileEvent::Clustering { block });
        let p = cluster_grams(&grams, block, opts.iters, opts.seed)?;
        permutations.push((block, p));
    }
    let cluster_s = t1.elapsed().as_secs_f64();

    // Report half: statistics in both orders.
    let t2 = Instant::now();
    let mut layers = Vec::with_capacity(nl);
    for l in 0..nl {
        let mut natural = Vec::new();
        let mut clustered = Vec::new();
        for (block, p) in &permutations {
            natural.push(BlockAccumulator::new(ffn, *block, None, &TILE_ROWS)?);
            clustered.push(BlockAccumulator::new(
                ffn,
                *block,
                Some(&p.layers[l]),
                &TILE_ROWS,
            )?);
        }
        layers.push(Mutex::new(LayerAcc {
            zeros: 0.0,
            values: 0.0,
            natural,
            clustered,
        }));
    }
    let hook = StatsHook {
        layers,
        error: Mutex::new(None),
    };
    for b in &report {
        forward_exposed(&model, None, b, None, Exposure::of_mlp(&hook), false)?;
        if let Some(e) = hook.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e.into());
        }
        progress(ProfileEvent::Batch);
    }
    forward_s += t2.elapsed().as_secs_f64();
    let layers = hook
        .layers
        .into_iter()
        .enumerate()
        .map(|(layer, acc)| {
            let acc = acc.into_inner().unwrap_or_else(|e| e.into_inner());
            LayerProfile {
                layer,
                zero_fraction: if acc.values > 0.0 {
                    acc.zeros / acc.values
                } else {
                    0.0
                },
                blocks: acc
                    .natural
                    .iter()
                    .zip(&acc.clustered)
                    .map(|(n, k)| BlockProfile {
                        block: n.finish().block,
                        natural: n.finish(),
                        clustered: k.finish(),
                    })
                    .collect(),
            }
        })
        .collect();

    let tokens = |bs: &[PackedBatch]| bs.iter().map(|b| b.num_tokens()).sum::<usize>();
    let name = opts
        .model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report = ProfileReport {
        format: FORMAT,
        model: serde_json::json!({
            "path": opts.model_dir.display().to_string(),
            "name": name,
            "layers": nl,
            "hidden": c.hidden_size,
            "ffn": ffn,
        }),
        data: serde_json::json!({
            "path": opts.data.display().to_string(),
            "seq": opts.seq,
            "windows": opts.windows,
            "batch_windows": opts.batch_windows,
            "fit_windows": opts.windows / 2,
            "report_windows": opts.windows - opts.windows / 2,
            "fit_tokens": tokens(&fit),
            "report_tokens": tokens(&report),
            "fit_batches": fit.len(),
            "report_batches": report.len(),
        }),
        settings: serde_json::json!({
            "blocks": opts.blocks,
            "tile_rows": TILE_ROWS,
            "seed": opts.seed,
            "kmeans_iters": opts.iters,
            "precision": "f32 forward (fp16 checkpoint weights widened)",
        }),
        definitions: definitions(),
        layers,
        seconds: BTreeMap::from([
            ("forward", forward_s),
            ("cluster", cluster_s),
            ("total", start.elapsed().as_secs_f64()),
        ]),
    };
    Ok(ProfileOutput {
        report,
        permutations,
    })
}

/// Writes `report` as pretty JSON to `path`, atomically.
pub fn write_report(report: &ProfileReport, path: &Path) -> Result<(), ProfileError> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, report).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    })?;
    Ok(())
}
