//! The fine-tuning loop: load model and data, plan the steps, train with AdamW, evaluate,
//! checkpoint, and resume a killed run exactly where its last checkpoint left it.

use super::config::TrainConfig;
use super::engine::{Engine, OptimStep, StepOutcome};
use super::metrics::{MetricsLog, Record, SpikeDetector};
use super::plan::StepPlan;
use super::state::{self, TrainerState};
use super::TrainError;
use crate::checkpoint::OptModel;
use crate::data::{
    load_jsonl, pack, split_eval_grouped, text_windows, EvalSize, Example, JsonlOptions,
    PackedBatch, SplitMix64, Tokenizer,
};
use crate::model::DropoutRng;
use crate::optim::{AdamW, LrSchedule};
use crate::peft::PeftParams;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// File names in the output directory.
pub const RUN_CONFIG: &str = "run_config.json";
/// The metrics log.
pub const METRICS: &str = "metrics.jsonl";
/// The loss-curve plot.
pub const LOSS_PNG: &str = "loss_curve.png";
/// Checkpoints live here.
pub const CHECKPOINTS: &str = "checkpoints";
/// The final adapter ([`PeftParams::save`]: LoRA in PEFT format, BitFit and Houlsby files).
pub const ADAPTER: &str = "adapter";
/// The run summary.
pub const SUMMARY: &str = "summary.json";

/// What the loop reports as it goes (the CLI draws a progress bar from it).
pub trait Observer {
    /// The run is about to train `total_steps` (starting after `done_steps`).
    fn start(&mut self, _info: &RunInfo) {}
    /// An optimizer step finished.
    fn step(&mut self, _record: &Record, _done: usize, _total: usize, _tokens_per_s: f64) {}
    /// An evaluation finished.
    fn eval(&mut self, _record: &Record) {}
    /// A dense probe of MLP exposure finished ([`Record::Probe`]).
    fn probe(&mut self, _record: &Record) {}
    /// A checkpoint was written.
    fn checkpoint(&mut self, _dir: &Path) {}
    /// Asked after every step: `true` stops the run there (after a checkpoint), e.g. on
    /// SIGINT/SIGTERM. [`run`] then returns [`TrainError::Interrupted`].
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// Facts about a run, for its start message.
#[derive(Clone, Debug)]
pub struct RunInfo {
    /// Training examples.
    pub train_examples: usize,
    /// Eval examples.
    pub eval_examples: usize,
    /// Trainable parameters.
    pub trainable: usize,
    /// Steps in the run.
    pub total_steps: usize,
    /// Steps already done (resume).
    pub done_steps: usize,
    /// Where the run resumed from, if it did.
    pub resumed_from: Option<PathBuf>,
}

/// The outcome of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    /// Eval loss before the first step (or at the resumed step), if measured.
    pub eval_loss_start: Option<f64>,
    /// Eval loss after the last step (with exposure: sparse, as the run trains).
    pub eval_loss_end: f64,
    /// With exposure: the eval loss after the last step with every MLP and attention dense.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss_end_dense: Option<f64>,
    /// With MLP exposure: what the training steps kept and skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposure: Option<ExposureSummary>,
    /// With attention exposure: the key blocks the training steps computed and the probes'
    /// recall and gaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionSummary>,
    /// Eval targets.
    pub eval_targets: usize,
    /// Steps done in all.
    pub steps: usize,
    /// Tokens trained on in this process.
    pub tokens: u64,
    /// Seconds of training in this process (evaluation excluded).
    pub train_seconds: f64,
    /// The final adapter.
    pub adapter_dir: PathBuf,
}

/// One layer in an [`ExposureSummary`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerExposure {
    /// Kept share of the `fc1`/`fc2` work over the training steps.
    pub density: f64,
    /// Kept share of the activation mass over the training steps.
    pub recall: f64,
    /// The mass target at the end.
    pub target: f64,
}

/// What MLP exposure did over a run's training steps.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExposureSummary {
    /// Per layer.
    pub layers: Vec<LayerExposure>,
    /// `1 −` the mean density of the layers' `fc1`/`fc2` products.
    pub mlp_work_skipped: f64,
    /// Dense probes run.
    pub probes: usize,
    /// Relative loss gap of the last probe.
    pub last_gap: Option<f64>,
    /// Mean relative loss gap over the probes.
    pub mean_gap: Option<f64>,
    /// Largest relative loss gap of a probe.
    pub max_gap: Option<f64>,
}

/// The exposure summary of a run from the engine's totals and the logged probes.
fn exposure_summary(engine: &dyn Engine, records: &[Record]) -> Option<ExposureSummary> {
    let (totals, targets) = engine.exposure_totals()?;
    let layers: Vec<LayerExposure> = totals
        .iter()
        .zip(&targets)
        .map(|(c, &target)| LayerExposure {
            density: c.density(),
            recall: c.recall(),
            target,
        })
        .collect();
    let mean_density = layers.iter().map(|l| l.density).sum::<f64>() / layers.len().max(1) as f64;
    let gaps: Vec<f64> = records
        .iter()
        .filter_map(|r| match r {
            Record::Probe(p) => Some(p.gap),
            _ => None,
        })
        .collect();
    Some(ExposureSummary {
        layers,
        mlp_work_skipped: 1.0 - mean_density,
        probes: gaps.len(),
        last_gap: gaps.last().copied(),
        mean_gap: (!gaps.is_empty()).then(|| gaps.iter().sum::<f64>() / gaps.len() as f64),
        max_gap: gaps.iter().copied().reduce(f64::max),
    })
}

/// One layer in an [`AttentionSummary`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerAttention {
    /// Computed share of the causal key blocks over the training steps.
    pub density: f64,
    /// Mean over the dense probes of the kept share of the exact attention mass (`None`
    /// without probes: training steps do not measure it).
    pub recall: Option<f64>,
    /// The mass target at the end.
    pub target: f64,
}

/// What attention exposure did over a run's training steps.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttentionSummary {
    /// Per layer.
    pub layers: Vec<LayerAttention>,
    /// Mean over the layers of the computed share of causal key blocks.
    pub density: f64,
    /// Mean over the layers and probes of the attention-mass recall (`None` without probes).
    pub recall: Option<f64>,
    /// Dense probes run.
    pub probes: usize,
    /// Relative loss gap (sparse vs dense, same batch) of the last probe.
    pub last_gap: Option<f64>,
    /// Mean relative loss gap over the probes.
    pub mean_gap: Option<f64>,
    /// Largest relative loss gap of a probe.
    pub max_gap: Option<f64>,
}

/// The attention summary of a run from the engine's totals and the logged probes (with
/// attention exposure alone, every probe is an attention probe).
fn attention_summary(engine: &dyn Engine, records: &[Record]) -> Option<AttentionSummary> {
    let (totals, targets) = engine.attention_totals()?;
    let probes: Vec<&crate::exposure::guard::ProbeReport> = records
        .iter()
        .filter_map(|r| match r {
            Record::Probe(p) => Some(p),
            _ => None,
        })
        .collect();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let layers: Vec<LayerAttention> = totals
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(l, (c, &target))| {
            let r: Vec<f64> = probes
                .iter()
                .filter_map(|p| p.layers.get(l).map(|x| x.recall))
                .collect();
            LayerAttention {
                density: c.density(),
                recall: mean(&r),
                target,
            }
        })
        .collect();
    let densities: Vec<f64> = layers.iter().map(|l| l.density).collect();
    let recalls: Vec<f64> = layers.iter().filter_map(|l| l.recall).collect();
    let gaps: Vec<f64> = probes.iter().map(|p| p.gap).collect();
    Some(AttentionSummary {
        density: mean(&densities).unwrap_or(1.0),
        recall: mean(&recalls),
        layers,
        probes: probes.len(),
        last_gap: gaps.last().copied(),
        mean_gap: mean(&gaps),
        max_gap: gaps.iter().copied().reduce(f64::max),
    })
}

/// Training and eval examples of a run.
pub struct RunData {
    /// Training examples (all files, in order).
    pub train: Vec<Example>,
    /// Eval examples.
    pub eval: Vec<Example>,
}

/// The `window`-token windows of the plain-text file `path` ([`text_windows`]).
fn load_text(tok: &Tokenizer, path: &Path, window: usize) -> Result<Vec<Example>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Ok(text_windows(tok, &text, window)?)
}

/// [`load_data`] for plain text ([`TrainConfig::text_windows`]): windows of every training
/// file in order; the eval file's windows, or else the last `eval_fraction` of the training
/// windows (a contiguous tail, so held-out text never overlaps a training window).
fn load_text_data(
    config: &TrainConfig,
    model: &OptModel,
    tok: &Tokenizer,
    window: usize,
) -> Result<RunData, TrainError> {
    let positions = model.config.max_position_embeddings;
    if window > positions {
        return Err(TrainError::Config(format!(
            "text windows of {window} tokens are longer than the model's {positions} positions"
        )));
    }
    let mut train = Vec::new();
    for f in &config.train_files {
        train.extend(load_text(tok, f, window)?);
    }
    let eval = match &config.eval_file {
        Some(f) => load_text(tok, f, window)?,
        None => {
            let held = (train.len() as f64 * config.eval_fraction).round() as usize;
            let held = if config.eval_fraction > 0.0 && train.len() > 1 {
                held.clamp(1, train.len() - 1)
            } else {
                0
            };
            train.split_off(train.len() - held)
        }
    };
    Ok(RunData { train, eval })
}

/// Loads the data of `config` with the model's tokenizer: JSONL, or plain text cut into
/// windows with [`TrainConfig::text_windows`].
pub fn load_data(config: &TrainConfig, model: &OptModel) -> Result<RunData, TrainError> {
    let tok = Tokenizer::from_file(config.model_dir.join("tokenizer.json"))?;
    if let Some(window) = config.text_windows {
        let mut data = load_text_data(config, model, &tok, window)?;
        if config.eval_max_examples > 0 {
            data.eval.truncate(config.eval_max_examples);
        }
        if data.train.is_empty() {
            return Err(TrainError::Config(format!(
                "the training text has no full window of {window} tokens"
            )));
        }
        return Ok(data);
    }
    let options = JsonlOptions {
        max_len: config.max_seq_len.min(model.config.max_position_embeddings),
        vocab_size: Some(model.config.vocab_size),
        ..JsonlOptions::default()
    };
    let mut train = Vec::new();
    for f in &config.train_files {
        let ds = load_jsonl(f, Some(&tok), &options)?;
        if ds.stats.truncated > 0 {
            tracing::warn!(
                "{}: {} sequences longer than {} tokens were truncated",
                f.display(),
                ds.stats.truncated,
                options.max_len
            );
        }
        train.extend(ds.examples);
    }
    let mut eval = match &config.eval_file {
        Some(f) => load_jsonl(f, Some(&tok), &options)?.examples,
        None => {
            let groups: Vec<u64> = train.iter().map(|e| e.group).collect();
            let split = split_eval_grouped(
                &groups,
                EvalSize::Fraction(config.eval_fraction),
                config.seed,
            )?;
            let pick = |idx: &[usize]| idx.iter().map(|&i| train[i].clone()).collect::<Vec<_>>();
            let (t, e) = (pick(&split.train), pick(&split.eval));
            train = t;
            e
        }
    };
    if config.eval_max_examples > 0 {
        eval.truncate(config.eval_max_examples);
    }
    if train.is_empty() {
        return Err(TrainError::Config(
            "the training data has no examples".into(),
        ));
    }
    Ok(RunData { train, eval })
}

/// FNV-1a over every example's ids and mask: a resume refuses different data.
fn data_fingerprint(data: &RunData) -> String {
    let mut bytes = Vec::new();
    for (tag, set) in [(0u8, &data.train), (1u8, &data.eval)] {
        bytes.push(tag);
        for e in set {
            for (&id, &m) in e.ids.iter().zip(&e.loss_mask) {
                bytes.extend_from_slice(&id.to_le_bytes());
                bytes.push(u8::from(m));
            }
            bytes.push(0xff);
        }
    }
    format!("{:016x}", state::fnv1a64(&bytes))
}

/// Mean loss of `examples` (packed in file order) under `lora`, on `engine`.
pub fn evaluate(
    engine: &mut dyn Engine,
    lora: Option<&PeftParams>,
    examples: &[Example],
    token_budget: usize,
) -> Result<(f64, usize), TrainError> {
    evaluate_with(engine, lora, examples, token_budget, false)
}

/// [`evaluate`] with every MLP dense ([`Engine::eval_loss_dense`]) when `dense`. A
/// data-parallel engine evaluates its share of the batches ([`Engine::eval_share`]) and the
/// sums are reduced ([`Engine::reduce_eval`]), so every rank returns the same mean.
pub fn evaluate_with(
    engine: &mut dyn Engine,
    lora: Option<&PeftParams>,
    examples: &[Example],
    token_budget: usize,
    dense: bool,
) -> Result<(f64, usize), TrainError> {
    let order: Vec<usize> = (0..examples.len()).collect();
    let batches = pack(examples, &order, token_budget)?;
    let (mut sum, mut count) = (0.0, 0usize);
    let (index, of) = engine.eval_share();
    for (j, b) in batches.iter().enumerate() {
        if j % of.max(1) != index {
            continue;
        }
        let (s, c) = if dense {
            engine.eval_loss_dense(lora, b)?
        } else {
            engine.eval_loss(lora, b)?
        };
        sum += s;
        count += c;
    }
    if of > 1 {
        let mut totals = [sum, count as f64];
        engine.reduce_eval(&mut totals)?;
        (sum, count) = (totals[0], totals[1] as usize);
    }
    if count == 0 {
        return Err(TrainError::Config(
            "the eval data has no loss targets".into(),
        ));
    }
    Ok((sum / count as f64, count))
}

/// Dropout seed of micro-batch `micro` of step `step`.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    SplitMix64::for_stream(seed ^ 0x0d70_0a7e, (step as u64) << 16 | micro as u64).next_u64()
}

/// One optimizer step over `batches` ([`Engine::optimizer_step`]: gradients of the mean loss
/// of the step, clipping, AdamW). A step whose loss or gradient norm is not finite is skipped:
/// neither the adapter nor the optimizer state changes (the caller counts it and decides
/// whether to stop).
fn train_step(
    config: &TrainConfig,
    engine: &mut dyn Engine,
    lora: &mut PeftParams,
    adamw: &mut AdamW,
    batches: &[PackedBatch],
    step: usize,
    lr: f32,
) -> Result<StepOutcome, TrainError> {
    if batches.iter().map(PackedBatch::num_targets).sum::<usize>() == 0 {
        return Err(TrainError::Config(format!(
            "step {} has no loss targets",
            step + 1
        )));
    }
    let lora_dropout = lora.lora.as_ref().is_some_and(|l| l.config.dropout > 0.0);
    let dropout = lora_dropout || engine.model().config.dropout > 0.0;
    let seeds: Vec<DropoutRng> = (0..batches.len())
        .map(|micro| DropoutRng {
            seed: dropout_seed(config.seed, step, micro),
        })
        .collect();
    let inputs = OptimStep {
        batches,
        dropout: dropout.then_some(seeds.as_slice()),
        lr,
        max_grad_norm: config.max_grad_norm,
    };
    Ok(engine.optimizer_step(lora, adamw, &inputs)?)
}

/// Steps skipped for non-finite numbers: in all, and immediately before now (kept in
/// checkpoints, so that a resumed run stops where an uninterrupted one would).
#[derive(Clone, Copy, Debug, Default)]
struct BadSteps {
    total: usize,
    in_a_row: usize,
}

/// Names of the optimizer's tensors: the adapter's PEFT keys.
fn param_names(lora: &PeftParams) -> Vec<String> {
    lora.tensors().into_iter().map(|(k, _)| k).collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The settings in which `saved` and `requested` differ, as `name: saved X, requested Y`
/// (so that a refused resume says which flag to change back).
fn settings_diff(saved: &TrainConfig, requested: &TrainConfig) -> String {
    // Through text, so that f32 settings print as written (`0.0005`, not their f64 widening).
    let value = |c: &TrainConfig| {
        serde_json::to_string(c).and_then(|t| serde_json::from_str::<serde_json::Value>(&t))
    };
    let (a, b) = (value(saved), value(requested));
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
        return "the saved settings cannot be compared".into();
    };
    let diffs: Vec<String> = a
        .iter()
        .filter_map(|(k, va)| {
            let vb = b.get(k).unwrap_or(&serde_json::Value::Null);
            (va != vb).then(|| format!("{k}: saved {va}, requested {vb}"))
        })
        .collect();
    diffs.join("; ")
}

/// Loads the model of `config` and makes the CPU engine for it ([`run`] takes any engine).
pub fn cpu_engine(config: &TrainConfig) -> Result<super::CpuEngine, TrainError> {
    Ok(super::CpuEngine::new(config.load_model()?))
}

/// Runs (or, with `resume`, continues) the fine-tuning run `config` in `out_dir` on `engine`
/// (which holds the model of `config.model_dir`).
pub fn run(
    config: &TrainConfig,
    out_dir: &Path,
    resume: bool,
    engine: &mut dyn Engine,
    observer: &mut dyn Observer,
) -> Result<RunSummary, TrainError> {
    run_as(config, out_dir, resume, engine, observer, true)
}

/// [`run`] as one rank of a data-parallel run ([`crate::dist::DataParallel`] engine): every
/// rank reads the same data and checkpoint and takes the same steps, but only the `writer`
/// (rank 0) writes files — run config, metrics, checkpoints, plot, adapter, summary. The
/// others keep the same records in memory and return the same summary.
pub fn run_as(
    config: &TrainConfig,
    out_dir: &Path,
    resume: bool,
    engine: &mut dyn Engine,
    observer: &mut dyn Observer,
    writer: bool,
) -> Result<RunSummary, TrainError> {
    config.validate().map_err(TrainError::Config)?;
    let peft_config = config.peft_config().map_err(TrainError::Config)?;
    let data = load_data(config, engine.model())?;
    let fingerprint = data_fingerprint(&data);
    let plan = StepPlan::new(
        (0..data.train.len()).collect(),
        config.seed,
        config.examples_per_step,
        config.micro_batch_tokens,
        config.epochs,
        config.max_steps,
    );
    let schedule = LrSchedule {
        base_lr: config.lr,
        warmup_steps: config.warmup_steps,
        total_steps: plan.total_steps() as u64,
        kind: config.schedule_kind().map_err(TrainError::Config)?,
        min_lr_ratio: 0.0,
    };

    // The output directory: a new run, or the continuation of the run it holds.
    // The checks are rank 0's (it fails and the launcher stops the others); a non-writer
    // would otherwise race with rank 0's own `run_config.json`.
    let config_path = out_dir.join(RUN_CONFIG);
    let ckpt_root = out_dir.join(CHECKPOINTS);
    if writer {
        std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    }
    if writer && config_path.exists() {
        let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        let saved: TrainConfig = serde_json::from_str(&text).map_err(|e| {
            TrainError::Resume(format!(
                "{} is not a run config: {e}",
                config_path.display()
            ))
        })?;
        if !resume {
            return Err(TrainError::Resume(format!(
                "{} already holds a run; pass --resume to continue it, or choose another output directory",
                out_dir.display()
            )));
        }
        if saved.trajectory() != config.trajectory() {
            return Err(TrainError::Resume(format!(
                "{} holds a run with different settings; resume it with the same settings \
                 ({})",
                out_dir.display(),
                settings_diff(&saved.trajectory(), &config.trajectory())
            )));
        }
    }
    if writer {
        let json =
            serde_json::to_vec_pretty(config).map_err(|e| TrainError::Config(e.to_string()))?;
        state::write_file_atomic(&config_path, &json).map_err(io_err(&config_path))?;
    }

    let names_for = |l: &PeftParams| param_names(l);
    let (mut lora, mut adamw, done, mut tokens_seen, mut bad, resumed_from) =
        match resume.then(|| state::latest_valid(&ckpt_root)).flatten() {
            Some((dir, st)) => {
                if st.data_fingerprint != fingerprint {
                    return Err(TrainError::Resume(format!(
                        "{} was written for different data (fingerprint {} vs {})",
                        dir.display(),
                        st.data_fingerprint,
                        fingerprint
                    )));
                }
                let lora = PeftParams::load(&dir, engine.model())?;
                if lora.config() != peft_config {
                    return Err(TrainError::Resume(format!(
                        "{} holds an adapter with other PEFT settings ({} vs {})",
                        dir.display(),
                        lora.config().describe(),
                        peft_config.describe()
                    )));
                }
                let names = names_for(&lora);
                let sizes: Vec<usize> = lora.tensors().iter().map(|(_, m)| m.data.len()).collect();
                let adamw = AdamW::load(&dir.join(state::OPTIMIZER_FILE), &names, &sizes)?;
                engine.load_state(&dir)?;
                let bad = BadSteps {
                    total: st.skipped_steps,
                    in_a_row: st.bad_in_a_row,
                };
                (lora, adamw, st.step, st.tokens_seen, bad, Some(dir))
            }
            None => {
                let lora = PeftParams::init(&peft_config, engine.model(), config.seed)?;
                let sizes: Vec<usize> = lora.tensors().iter().map(|(_, m)| m.data.len()).collect();
                let adamw = AdamW::new(config.adamw(), &sizes);
                (lora, adamw, 0, 0, BadSteps::default(), None)
            }
        };
    let done = done.min(plan.total_steps());
    observer.start(&RunInfo {
        train_examples: data.train.len(),
        eval_examples: data.eval.len(),
        trainable: lora.num_parameters(),
        total_steps: plan.total_steps(),
        done_steps: done,
        resumed_from: resumed_from.clone(),
    });
    let metrics_path = out_dir.join(METRICS);
    let mut metrics = if writer {
        MetricsLog::open(&metrics_path, done).map_err(io_err(&metrics_path))?
    } else {
        MetricsLog::read_only(&metrics_path, done)
    };
    let has_eval = !data.eval.is_empty();
    let eval_now = |engine: &mut dyn Engine,
                    lora: &PeftParams,
                    step: usize,
                    metrics: &mut MetricsLog,
                    obs: &mut dyn Observer|
     -> Result<Option<f64>, TrainError> {
        if !has_eval {
            return Ok(None);
        }
        let (loss, targets) = evaluate(engine, Some(lora), &data.eval, config.micro_batch_tokens)?;
        let dense_loss = if engine.exposed() {
            let budget = config.micro_batch_tokens;
            Some(evaluate_with(engine, Some(lora), &data.eval, budget, true)?.0)
        } else {
            None
        };
        let rec = Record::Eval {
            step,
            loss,
            targets,
            dense_loss,
        };
        obs.eval(&rec);
        metrics.push(rec).map_err(io_err(&metrics_path))?;
        Ok(Some(loss))
    };
    // The eval logged at the step a resume continues from (kept in the metrics) is not
    // repeated: a resumed finished run would otherwise log its final eval twice.
    let kept_eval = |step: usize| {
        metrics.records().iter().rev().find_map(|r| match r {
            Record::Eval { step: s, loss, .. } if *s == step => Some(*loss),
            _ => None,
        })
    };
    let (eval_start, kept_at_done) = if done == 0 {
        (eval_now(engine, &lora, 0, &mut metrics, observer)?, None)
    } else {
        (kept_eval(0), kept_eval(done))
    };

    let save = |engine: &dyn Engine,
                lora: &PeftParams,
                adamw: &AdamW,
                step: usize,
                tokens_seen: u64,
                bad: BadSteps|
     -> Result<PathBuf, TrainError> {
        if !writer {
            return Ok(state::checkpoint_dir(&ckpt_root, step));
        }
        let st = TrainerState {
            step,
            total_steps: plan.total_steps(),
            tokens_seen,
            data_fingerprint: fingerprint.clone(),
            lexp_version: env!("CARGO_PKG_VERSION").into(),
            skipped_steps: bad.total,
            bad_in_a_row: bad.in_a_row,
            files: Default::default(),
        };
        let base = config.model_dir.display().to_string();
        let dir = state::commit_checkpoint(&ckpt_root, st, |tmp| {
            lora.save(tmp, &base).map_err(|e| e.to_string())?;
            adamw
                .save(&tmp.join(state::OPTIMIZER_FILE), &param_names(lora))
                .map_err(|e| e.to_string())?;
            engine.save_state(tmp).map_err(|e| e.to_string())
        })
        .map_err(TrainError::Checkpoint)?;
        state::prune(&ckpt_root, config.keep_checkpoints);
        Ok(dir)
    };

    let mut last_eval = if done == 0 { eval_start } else { kept_at_done };
    let mut last_eval_step = if done == 0 || kept_at_done.is_some() {
        Some(done)
    } else {
        None
    };
    let mut last_saved = resumed_from.as_ref().map(|_| done);
    // Rebuilt from the kept metrics on a resume (it only decides what is reported).
    let mut spikes = SpikeDetector::from_records(metrics.records());
    let (mut tokens_here, mut train_seconds) = (0u64, 0.0f64);
    for step in done..plan.total_steps() {
        let batches = plan.step_batches(&data.train, step)?;
        let tokens: usize = batches.iter().map(PackedBatch::num_tokens).sum();
        let lr = schedule.lr_at(step as u64);
        // The guard's probe runs before the step, on a batch the adapter has not trained on
        // yet (right after the step, the sparse loss of the batch just fitted is biased low).
        let probe_every = engine.probe_every();
        let logged = |m: &MetricsLog| {
            m.records()
                .iter()
                .any(|r| matches!(r, Record::Probe(p) if p.step == step))
        };
        if probe_every > 0 && step % probe_every == 0 && !logged(&metrics) {
            if let Some(report) = engine.probe(&lora, &batches[0], step)? {
                let rec = Record::Probe(report);
                observer.probe(&rec);
                metrics.push(rec).map_err(io_err(&metrics_path))?;
            }
        }
        let t0 = Instant::now();
        let out = train_step(config, engine, &mut lora, &mut adamw, &batches, step, lr)?;
        let seconds = t0.elapsed().as_secs_f64();
        train_seconds += seconds;
        tokens_here += tokens as u64;
        let loss_spike = out.applied && spikes.observe(out.loss);
        if out.applied {
            tokens_seen += tokens as u64;
            bad.in_a_row = 0;
        } else {
            bad.total += 1;
            bad.in_a_row += 1;
            tracing::warn!(
                "step {}: loss {} / gradient norm {} is not finite; step skipped ({} in a row, \
                 {} in this run; the run stops at {} in a row)",
                step + 1,
                out.loss,
                out.grad_norm,
                bad.in_a_row,
                bad.total,
                config.max_bad_steps
            );
        }
        if loss_spike {
            tracing::warn!(
                "step {}: loss spike: {:.4} is over {} times the mean of the last {} losses",
                step + 1,
                out.loss,
                super::metrics::SPIKE_FACTOR,
                super::metrics::SPIKE_WINDOW
            );
        }
        let rec = Record::Train {
            step: step + 1,
            epoch: plan.position(step).epoch,
            loss: out.loss,
            lr,
            grad_norm: out.grad_norm,
            tokens,
            targets: out.targets,
            seconds,
            skipped: !out.applied,
            skipped_total: bad.total,
            loss_spike,
        };
        observer.step(
            &rec,
            step + 1,
            plan.total_steps(),
            tokens_here as f64 / train_seconds.max(1e-9),
        );
        metrics.push(rec).map_err(io_err(&metrics_path))?;
        let s = step + 1;
        if bad.in_a_row >= config.max_bad_steps {
            return Err(TrainError::NonFinite {
                step: s,
                in_a_row: bad.in_a_row,
                loss: out.loss,
                grad_norm: out.grad_norm,
            });
        }
        if config.eval_every > 0 && s % config.eval_every == 0 && s < plan.total_steps() {
            last_eval = eval_now(engine, &lora, s, &mut metrics, observer)?;
            last_eval_step = Some(s);
        }
        if config.save_every > 0 && s % config.save_every == 0 && s < plan.total_steps() {
            engine.sync_optimizer(&mut adamw)?;
            let dir = save(&*engine, &lora, &adamw, s, tokens_seen, bad)?;
            observer.checkpoint(&dir);
            last_saved = Some(s);
        }
        if s < plan.total_steps() && observer.should_stop() {
            let dir = match last_saved {
                Some(saved) if saved == s => state::checkpoint_dir(&ckpt_root, s),
                _ => {
                    engine.sync_optimizer(&mut adamw)?;
                    let dir = save(&*engine, &lora, &adamw, s, tokens_seen, bad)?;
                    observer.checkpoint(&dir);
                    dir
                }
            };
            return Err(TrainError::Interrupted {
                step: s,
                checkpoint: dir,
            });
        }
    }
    let total = plan.total_steps();
    if last_eval_step != Some(total) {
        last_eval = eval_now(engine, &lora, total, &mut metrics, observer)?;
    }
    if last_saved != Some(total) {
        engine.sync_optimizer(&mut adamw)?;
        let dir = save(&*engine, &lora, &adamw, total, tokens_seen, bad)?;
        observer.checkpoint(&dir);
    }
    let adapter_dir = out_dir.join(ADAPTER);
    let png = out_dir.join(LOSS_PNG);
    if writer {
        lora.save(&adapter_dir, &config.model_dir.display().to_string())?;
        if let Err(e) = super::plot::loss_curve(metrics.records(), "lexp finetune: loss", &png) {
            tracing::warn!("could not draw {}: {e}", png.display());
        }
    }
    let eval_loss_end_dense = metrics.records().iter().rev().find_map(|r| match r {
        Record::Eval {
            step, dense_loss, ..
        } if *step == total => *dense_loss,
        _ => None,
    });
    let summary = RunSummary {
        eval_loss_start: eval_start,
        eval_loss_end: last_eval.unwrap_or(f64::NAN),
        eval_loss_end_dense,
        exposure: exposure_summary(engine, metrics.records()),
        attention: attention_summary(engine, metrics.records()),
        eval_targets: metrics
            .records()
            .iter()
            .rev()
            .find_map(|r| match r {
                Record::Eval { targets, .. } => Some(*targets),
                _ => None,
            })
            .unwrap_or(0),
        steps: total,
        tokens: tokens_here,
        train_seconds,
        adapter_dir,
    };
    if writer {
        let summary_path = out_dir.join(SUMMARY);
        let json =
            serde_json::to_vec_pretty(&summary).map_err(|e| TrainError::Config(e.to_string()))?;
        state::write_file_atomic(&summary_path, &json).map_err(io_err(&summary_path))?;
    }
    Ok(summary)
}
