//! The dense PEFT training-step benchmark behind `lexp bench step` (LoRA, BitFit, Houlsby
//! adapters, or any mix): model presets for the
//! published OPT shapes, random packed batches, the step's arithmetic (FLOP count), the timed
//! step loop (exactly what `lexp finetune` does per optimizer step:
//! [`Engine::optimizer_step`] — the engine's loss and LoRA gradients, gradient clipping, AdamW,
//! on the device when the engine runs it there), the comparison with a PyTorch baseline
//! (`bench/torch_baseline.py`'s JSON) and a bar chart of the step times.
//!
//! # FLOP count ([`step_flops`])
//!
//! Per step on `T` tokens packed from sequences of lengths `L_s` (`T = Σ L_s`), for a model of
//! `n` layers, width `H`, MLP width `F`, embedding width `E`, vocabulary `V`:
//!
//! - frozen linear forward: `2·T·n·(4H² + 2HF)` (q, k, v, out_proj, fc1, fc2), plus
//!   `2·T·2·E·H` for `project_in`/`project_out` when `E ≠ H`;
//! - LM head forward: `2·T·E·V` (every position, as transformers computes it);
//! - attention forward, **causal half counted**: `n · Σ_s 2·H·L_s(L_s + 1)`, i.e. for each
//!   of the `L(L+1)/2` unmasked query–key pairs and every head, `2·hd` FLOPs for `QKᵀ` and
//!   `2·hd` for `P·V` (an engine computing the full square does up to twice this);
//! - backward: input gradients only (the frozen weights get no weight gradients), which
//!   cost what the forward GEMMs cost: linear + head as above, and attention twice its
//!   forward (`dP = dO·Vᵀ`, `dV = Pᵀ·dO`, `dQ = dS·K`, `dK = dSᵀ·Q`);
//! - LoRA on a projection `in → out` of rank `r`: forward `2·T·r·(in + out)`, backward twice
//!   that (`dB`, `d(xAᵀ)`, `dA`, `dx`), so `6·T·r·(in + out)` per adapted module and layer;
//! - a Houlsby adapter of bottleneck `m`: forward `2·2·T·H·m` (down, up), backward twice that
//!   (`dW_u`, `dr`, `dW_d`, `dh`), so `12·T·H·m` per adapter, two per layer;
//! - BitFit's bias gradients (column sums) are elementwise work.
//!
//! Elementwise work (LayerNorm, softmax, activation, loss, AdamW) is not counted. Achieved
//! TFLOP/s is this count over the median step time.

use crate::checkpoint::OptConfig;
use crate::data::{PackedBatch, SplitMix64, IGNORE_INDEX};
use crate::model::ModelError;
use crate::optim::{AdamW, AdamWConfig};
use crate::peft::{PeftConfig, PeftParams};
use crate::train::{host_optimizer_step, Engine, OptimStep};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum StepBenchError {
    /// The engine failed a step.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A step produced a non-finite loss or gradient norm.
    #[error("step {step} of {workload}: non-finite loss {loss} or gradient norm {norm}")]
    NonFinite {
        /// The workload's name.
        workload: String,
        /// 1-based step.
        step: usize,
        /// Mean loss of the step.
        loss: f64,
        /// Gradient norm before clipping.
        norm: f32,
    },
    /// A bad setting (no iterations, an empty batch).
    #[error("{0}")]
    Config(String),
    /// The baseline JSON could not be read.
    #[error("baseline {path}: {reason}")]
    Baseline {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The model presets `lexp bench step --model` accepts.
pub const PRESETS: [&str; 4] = ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b"];

/// The published configuration of an OPT preset (RUNTIME.md §1.1: vocabulary 50272, 2048
/// positions, ReLU, biases, tied head; opt-350m post-LN with `E = 512`), with dropout 0 (the
/// benchmark, like the PyTorch baseline, trains without dropout). `None` for other names.
pub fn preset_config(name: &str) -> Option<OptConfig> {
    let (h, layers, heads, ffn, e, pre) = match name {
        "opt-125m" => (768, 12, 12, 3072, 768, true),
        "opt-350m" => (1024, 24, 16, 4096, 512, false),
        "opt-1.3b" => (2048, 24, 32, 8192, 2048, true),
        "opt-2.7b" => (2560, 32, 32, 10240, 2560, true),
        _ => return None,
    };
    let json = format!(
        r#"{{"model_type":"opt","vocab_size":50272,"hidden_size":{h},"ffn_dim":{ffn},
           "num_hidden_layers":{layers},"num_attention_heads":{heads},
           "max_position_embeddings":2048,"word_embed_proj_dim":{e},
           "do_layer_norm_before":{pre},"activation_function":"relu","dropout":0.0,
           "attention_dropout":0.0,"enable_bias":true}}"#
    );
    OptConfig::from_json(&json, Path::new(name)).ok()
}

/// `batch` sequences of `seq` uniformly random tokens below `vocab`, packed back to back:
/// `cu_seqlens` every `seq`, positions `0..seq` per sequence, every position's target the
/// next token of its sequence except each sequence's last (ignored), as `labels = input_ids`
/// gives in transformers (`batch·(seq − 1)` targets).
pub fn random_batch(batch: usize, seq: usize, vocab: usize, seed: u64) -> PackedBatch {
    let mut rng = SplitMix64::new(seed);
    let mut b = PackedBatch {
        cu_seqlens: vec![0],
        ..PackedBatch::default()
    };
    for s in 0..batch {
        let ids: Vec<u32> = (0..seq).map(|_| rng.below(vocab as u64) as u32).collect();
        for (t, &id) in ids.iter().enumerate() {
            b.input_ids.push(id);
            b.position_ids.push(t as u32);
            b.targets
                .push(ids.get(t + 1).map_or(IGNORE_INDEX, |&n| n as i32));
        }
        b.cu_seqlens.push(b.input_ids.len() as i32);
        b.examples.push(s);
    }
    b
}

/// The arithmetic of one training step, in FLOPs (see the [module docs](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepFlops {
    /// Frozen linear layers' forward (incl. `project_in/out`).
    pub linear_forward: f64,
    /// LM head forward.
    pub head_forward: f64,
    /// Attention score and value products, causal half.
    pub attention_forward: f64,
    /// Input-gradient GEMMs of the backward (frozen layers, head, attention).
    pub backward: f64,
    /// LoRA branches, forward and backward.
    pub lora: f64,
    /// Houlsby adapters, forward and backward.
    pub houlsby: f64,
    /// The sum.
    pub total: f64,
}

/// The FLOP count of one step of `config` with the PEFT methods `peft` on sequences of
/// lengths `seqs`.
pub fn step_flops(config: &OptConfig, peft: &PeftConfig, seqs: &[usize]) -> StepFlops {
    let t: f64 = seqs.iter().sum::<usize>() as f64;
    let (h, f, e, v, n) = (
        config.hidden_size as f64,
        config.ffn_dim as f64,
        config.word_embed_proj_dim as f64,
        config.vocab_size as f64,
        config.num_hidden_layers as f64,
    );
    let mut linear_forward = 2.0 * t * n * (4.0 * h * h + 2.0 * h * f);
    if config.has_projections() {
        linear_forward += 2.0 * t * 2.0 * e * h;
    }
    let head_forward = 2.0 * t * e * v;
    let pairs: f64 = seqs.iter().map(|&l| (l * (l + 1)) as f64).sum();
    let attention_forward = n * 2.0 * h * pairs;
    let backward = linear_forward + head_forward + 2.0 * attention_forward;
    let per_layer: f64 = peft.lora.as_ref().map_or(0.0, |lora| {
        lora.targets
            .iter()
            .map(|tg| {
                let (i, o) = tg.dims(config);
                6.0 * t * lora.r as f64 * (i + o) as f64
            })
            .sum()
    });
    let lora = n * per_layer;
    let houlsby = peft
        .houlsby
        .as_ref()
        .map_or(0.0, |a| n * 2.0 * 12.0 * t * h * a.bottleneck as f64);
    StepFlops {
        linear_forward,
        head_forward,
        attention_forward,
        backward,
        lora,
        houlsby,
        total: linear_forward + head_forward + attention_forward + backward + lora + houlsby,
    }
}

/// Median, minimum and maximum of timings in milliseconds (the median of an even count is
/// the upper middle value, as the earlier benchmarks reported it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Median.
    pub median_ms: f64,
    /// Fastest.
    pub min_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

/// Summarises `times_ms` (`None` when empty).
pub fn summarize(times_ms: &[f64]) -> Option<Summary> {
    let mut s = times_ms.to_vec();
    s.sort_by(f64::total_cmp);
    Some(Summary {
        median_ms: *s.get(s.len() / 2)?,
        min_ms: s[0],
        max_ms: s[s.len() - 1],
    })
}

/// Optimizer settings of the benchmark's steps: `lexp finetune`'s defaults (lr 5e-4, no
/// weight decay, clipping at norm 1).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepSettings {
    /// Learning rate of every step.
    pub lr: f32,
    /// Gradient clipping norm.
    pub max_grad_norm: f32,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub iters: usize,
    /// Take each step with [`host_optimizer_step`] (gradients to the host, AdamW there)
    /// instead of the engine's own [`Engine::optimizer_step`]: an A/B switch.
    pub host_optimizer: bool,
}

impl Default for StepSettings {
    fn default() -> Self {
        StepSettings {
            lr: 5e-4,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            warmup: 5,
            iters: 25,
            host_optimizer: false,
        }
    }
}

/// One measured workload.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadResult {
    /// `BxS` (sequences × tokens per sequence).
    pub name: String,
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Positions with a target.
    pub targets: usize,
    /// Step time statistics over the timed steps.
    pub step: Summary,
    /// Every timed step, in order (ms).
    pub times_ms: Vec<f64>,
    /// `tokens / median`.
    pub tokens_per_s: f64,
    /// The step's arithmetic.
    pub flops: StepFlops,
    /// `flops.total / median`, in TFLOP/s.
    pub tflops: f64,
    /// Mean loss of the first and of the last step.
    pub loss_first: f64,
    /// Mean loss of the last step.
    pub loss_last: f64,
    /// Gradient norm (before clipping) of the last step.
    pub grad_norm_last: f32,
    /// Device memory in use after the steps (total − free, MiB; GPU only).
    pub device_used_mib: Option<f64>,
    /// The engine's activation workspace (MiB; GPU only).
    pub workspace_mib: Option<f64>,
    /// Ranks that computed the step (1: one device; the micro-batches, tokens and TFLOP/s
    /// above are the whole step's, over every rank).
    pub world_size: usize,
    /// Time per step in collectives (data parallel: the gradient all-reduce and the loss sums;
    /// [`Engine::last_comm_ms`]), over the timed steps, when the engine reports it.
    pub comm: Option<Summary>,
}

/// Runs `settings.warmup + settings.iters` optimizer steps of the PEFT methods `peft`
/// (initialised from `seed`, fresh AdamW) on `batch` with `engine`, each step as `lexp finetune` does it:
/// [`Engine::optimizer_step`] (mean loss over the batch's targets, no dropout, clipping,
/// AdamW). A step is timed whole, from the call to its return with the updated adapter on the
/// host; it ends synchronised because the engine reads back the loss, the gradient norm and
/// the adapter. Memory fields are left `None` (the caller knows the device).
pub fn time_steps(
    engine: &mut dyn Engine,
    peft: &PeftConfig,
    batch: &PackedBatch,
    settings: &StepSettings,
    seed: u64,
) -> Result<WorkloadResult, StepBenchError> {
    time_global_steps(engine, peft, std::slice::from_ref(batch), 1, settings, seed)
}

/// [`time_steps`] for a step of several micro-batches `batches` (all of the same shape),
/// computed by `world_size` data-parallel ranks when `engine` is one
/// ([`crate::dist::DataParallel`], each rank running this same loop): the figures are the
/// whole step's.
pub fn time_global_steps(
    engine: &mut dyn Engine,
    peft: &PeftConfig,
    batches: &[PackedBatch],
    world_size: usize,
    settings: &StepSettings,
    seed: u64,
) -> Result<WorkloadResult, StepBenchError> {
    let Some(batch) = batches.first() else {
        return Err(StepBenchError::Config("a step needs a micro-batch".into()));
    };
    let seq = batch.max_seqlen();
    let nseq: usize = batches.iter().map(PackedBatch::num_sequences).sum();
    let name = if batches.len() == 1 {
        format!("{nseq}x{seq}")
    } else {
        format!("{}x({}x{seq})", batches.len(), batch.num_sequences())
    };
    let n: usize = batches.iter().map(PackedBatch::num_targets).sum();
    if settings.iters == 0 || n == 0 {
        return Err(StepBenchError::Config(format!(
            "{name}: need at least one timed step and one target (iters {}, targets {n})",
            settings.iters
        )));
    }
    let config = engine.model().config.clone();
    let mut lora = PeftParams::init(peft, engine.model(), seed)
        .map_err(|e| StepBenchError::Config(e.to_string()))?;
    let sizes: Vec<usize> = lora.tensors().iter().map(|(_, m)| m.data.len()).collect();
    let mut adamw = AdamW::new(
        AdamWConfig {
            lr: settings.lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: settings.weight_decay,
        },
        &sizes,
    );
    let (mut times, mut first, mut last, mut norm_last) = (Vec::new(), f64::NAN, 0.0, 0.0);
    let mut comm_ms = Vec::new();
    let step = OptimStep {
        batches,
        dropout: None,
        lr: settings.lr,
        max_grad_norm: settings.max_grad_norm,
    };
    for i in 0..settings.warmup + settings.iters {
        let t0 = Instant::now();
        let out = if settings.host_optimizer {
            host_optimizer_step(engine, &mut lora, &mut adamw, &step)?
        } else {
            engine.optimizer_step(&mut lora, &mut adamw, &step)?
        };
        let (loss, norm) = (out.loss, out.grad_norm);
        if !out.applied {
            return Err(StepBenchError::NonFinite {
                workload: name,
                step: i + 1,
                loss,
                norm,
            });
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            first = loss;
        }
        if i >= settings.warmup {
            times.push(ms);
            comm_ms.extend(engine.last_comm_ms());
        }
        (last, norm_last) = (loss, norm);
    }
    let step = summarize(&times).ok_or_else(|| StepBenchError::Config("no timed step".into()))?;
    let seqs: Vec<usize> = batches
        .iter()
        .flat_map(|b| b.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize))
        .collect();
    let tokens: usize = batches.iter().map(PackedBatch::num_tokens).sum();
    let comm = (comm_ms.len() == times.len())
        .then(|| summarize(&comm_ms))
        .flatten();
    let flops = step_flops(&config, peft, &seqs);
    let secs = step.median_ms / 1e3;
    Ok(WorkloadResult {
        name,
        batch: nseq,
        seq,
        tokens,
        targets: n,
        step,
        times_ms: times,
        tokens_per_s: tokens as f64 / secs,
        tflops: flops.total / secs / 1e12,
        flops,
        loss_first: first,
        loss_last: last,
        grad_norm_last: norm_last,
        device_used_mib: None,
        workspace_mib: None,
        world_size,
        comm,
    })
}

/// One PyTorch baseline measurement read from `bench/torch_baseline.py`'s JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BaselineRun {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Attention implementation (`sdpa`, `eager`).
    pub attn: String,
    /// Median step time.
    pub median_step_ms: f64,
}

/// Reads the runs of a baseline JSON: each run's `batch_size`, `seq_len`, `attn` and
/// `median_step_ms`; older files (`"batch": "4x512"`, one implementation named at the top
/// as `attn_implementation`) are read too.
pub fn read_baseline(path: &Path) -> Result<Vec<BaselineRun>, StepBenchError> {
    let bad = |reason: String| StepBenchError::Baseline {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    parse_baseline(&text).map_err(bad)
}

/// [`read_baseline`] on the file's text.
pub fn parse_baseline(text: &str) -> Result<Vec<BaselineRun>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let top_attn = v["attn_implementation"].as_str().unwrap_or("sdpa");
    let runs = v["runs"].as_array().ok_or("no `runs` array")?;
    runs.iter()
        .enumerate()
        .map(|(i, r)| {
            let (batch, seq) = match (r["batch_size"].as_u64(), r["seq_len"].as_u64()) {
                (Some(b), Some(s)) => (b as usize, s as usize),
                _ => {
                    let s = r["batch"].as_str().unwrap_or("");
                    let (b, l) = s
                        .split_once('x')
                        .ok_or(format!("run {i}: no batch_size/seq_len nor `BxS` batch"))?;
                    let p = |x: &str| x.parse::<usize>().map_err(|e| format!("run {i}: {e}"));
                    (p(b)?, p(l)?)
                }
            };
            let median_step_ms = r["median_step_ms"]
                .as_f64()
                .ok_or(format!("run {i}: no median_step_ms"))?;
            Ok(BaselineRun {
                batch,
                seq,
                attn: r["attn"].as_str().unwrap_or(top_attn).to_string(),
                median_step_ms,
            })
        })
        .collect()
}

/// lexp against the baseline on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// `BxS`.
    pub workload: String,
    /// lexp's median step.
    pub lexp_ms: f64,
    /// PyTorch + PEFT with SDPA attention, if measured.
    pub torch_sdpa_ms: Option<f64>,
    /// PyTorch + PEFT with eager attention, if measured.
    pub torch_eager_ms: Option<f64>,
    /// `torch_sdpa_ms / lexp_ms` (above 1: lexp is faster).
    pub speedup_vs_sdpa: Option<f64>,
    /// `torch_eager_ms / lexp_ms`.
    pub speedup_vs_eager: Option<f64>,
}

/// Pairs every workload with the baseline runs of the same batch and sequence length.
pub fn compare(results: &[WorkloadResult], baseline: &[BaselineRun]) -> Vec<Comparison> {
    results
        .iter()
        .map(|r| {
            let find = |attn: &str| {
                baseline
                    .iter()
                    .find(|b| b.batch == r.batch && b.seq == r.seq && b.attn == attn)
                    .map(|b| b.median_step_ms)
            };
            let (sdpa, eager) = (find("sdpa"), find("eager"));
            let lexp_ms = r.step.median_ms;
            Comparison {
                workload: r.name.clone(),
                lexp_ms,
                torch_sdpa_ms: sdpa,
                torch_eager_ms: eager,
                speedup_vs_sdpa: sdpa.map(|t| t / lexp_ms),
                speedup_vs_eager: eager.map(|t| t / lexp_ms),
            }
        })
        .collect()
}

/// Days since 1970-01-01 as a `YYYY-MM-DD` date (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`), for the date stamp of results.
pub fn iso_date(days_since_epoch: i64) -> String {
    let z = days_since_epoch + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Today's UTC date, `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    iso_date((secs / 86_400) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::{LoraConfig, LoraTarget};

    fn tiny() -> OptConfig {
        let json = r#"{"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 3,
                       "ffn_dim": 256, "num_attention_heads": 4, "max_position_embeddings": 128,
                       "dropout": 0.0}"#;
        OptConfig::from_json(json, Path::new("tiny.json")).unwrap()
    }

    /// Every GEMM of the step listed as `(m, n, k)`, `2mnk` each, and the causal attention
    /// pairs counted one by one: an independent count of [`step_flops`].
    #[test]
    fn flops_match_a_gemm_by_gemm_count() {
        let c = tiny();
        let lora = LoraConfig {
            r: 3,
            alpha: 6.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Q, LoraTarget::Fc2],
            use_rslora: false,
        };
        let seqs = [5usize, 9, 1];
        let t = 15u64;
        let (h, f, v, nh, hd, layers, r) = (64u64, 256u64, 300u64, 4u64, 16u64, 3u64, 3u64);
        let mut fwd = 0u64;
        let mut attn = 0u64;
        for _ in 0..layers {
            // q, k, v, out_proj: [t, h] x [h, h]; fc1 [t, h] x [h, f]; fc2 [t, f] x [f, h].
            for (m, n, k) in [
                (t, h, h),
                (t, h, h),
                (t, h, h),
                (t, h, h),
                (t, f, h),
                (t, h, f),
            ] {
                fwd += 2 * m * n * k;
            }
            for &l in &seqs {
                let mut pairs = 0u64;
                for q in 0..l {
                    for kk in 0..l {
                        if kk <= q {
                            pairs += 1;
                        }
                    }
                }
                // Per head: scores (2·hd per pair) and P·V (2·hd per pair).
                attn += nh * pairs * (2 * hd + 2 * hd);
            }
        }
        let head = 2 * t * v * h;
        let mut lora_flops = 0u64;
        for _ in 0..layers {
            for (i, o) in [(h, h), (f, h)] {
                // Forward: x·Aᵀ [t,i]x[i,r], then ·Bᵀ [t,r]x[r,o].
                let forward = 2 * t * i * r + 2 * t * r * o;
                // Backward: dB [o,t]x[t,r], d(xAᵀ) [t,o]x[o,r], dA [r,t]x[t,i], dx [t,r]x[r,i].
                let backward = 2 * o * t * r + 2 * t * o * r + 2 * r * t * i + 2 * t * r * i;
                lora_flops += forward + backward;
            }
        }
        let backward = fwd + head + 2 * attn;
        let want = fwd + head + attn + backward + lora_flops;
        let got = step_flops(&c, &PeftConfig::lora(lora), &seqs);
        assert_eq!(got.linear_forward, fwd as f64);
        assert_eq!(got.attention_forward, attn as f64);
        assert_eq!(got.head_forward, head as f64);
        assert_eq!(got.lora, lora_flops as f64);
        assert_eq!(got.backward, backward as f64);
        assert_eq!(got.total, want as f64);
    }

    #[test]
    fn presets_have_the_published_parameter_counts() {
        for (name, params, pre) in [
            ("opt-125m", 125_239_296usize, true),
            ("opt-1.3b", 1_315_758_080, true),
            ("opt-2.7b", 2_651_596_800, true),
        ] {
            let c = preset_config(name).unwrap();
            assert_eq!(c.num_parameters(), params, "{name}");
            assert_eq!(c.do_layer_norm_before, pre);
            assert_eq!(c.dropout, 0.0);
        }
        let c = preset_config("opt-350m").unwrap();
        assert!(!c.do_layer_norm_before && c.has_projections() && !c.has_final_layer_norm());
        assert_eq!(c.word_embed_proj_dim, 512);
        assert_eq!(preset_config("opt-2.7b").unwrap().head_dim(), 80);
        assert!(preset_config("opt-6.7b").is_none());
    }

    #[test]
    fn random_batch_layout() {
        let b = random_batch(3, 7, 50, 11);
        assert_eq!(b.cu_seqlens, vec![0, 7, 14, 21]);
        assert_eq!(b.num_tokens(), 21);
        assert_eq!(b.num_targets(), 3 * 6);
        for s in 0..3 {
            for t in 0..7 {
                let i = s * 7 + t;
                assert_eq!(b.position_ids[i], t as u32);
                assert!(b.input_ids[i] < 50);
                let want = if t == 6 {
                    IGNORE_INDEX
                } else {
                    b.input_ids[i + 1] as i32
                };
                assert_eq!(b.targets[i], want, "seq {s} pos {t}");
            }
        }
        // Random, seeded: not constant, reproducible, seed-dependent.
        assert!(b.input_ids.iter().any(|&x| x != b.input_ids[0]));
        assert_eq!(b, random_batch(3, 7, 50, 11));
        assert_ne!(b.input_ids, random_batch(3, 7, 50, 12).input_ids);
        crate::model::opt::check_batch(&tiny(), &random_batch(2, 9, 300, 1)).unwrap();
    }

    #[test]
    fn summary_baseline_and_comparison() {
        let s = summarize(&[5.0, 1.0, 3.0, 9.0]).unwrap();
        assert_eq!((s.median_ms, s.min_ms, s.max_ms), (5.0, 1.0, 9.0));
        assert!(summarize(&[]).is_none());
        let new = r#"{"runs": [
            {"batch_size": 4, "seq_len": 512, "attn": "sdpa", "median_step_ms": 80.0},
            {"batch_size": 4, "seq_len": 512, "attn": "eager", "median_step_ms": 90.0}]}"#;
        let runs = parse_baseline(new).unwrap();
        assert_eq!(runs[1].attn, "eager");
        let old = r#"{"attn_implementation": "sdpa", "runs": [
            {"batch": "4x1024", "median_step_ms": 91.0}]}"#;
        let old_runs = parse_baseline(old).unwrap();
        assert_eq!((old_runs[0].batch, old_runs[0].seq), (4, 1024));
        assert!(parse_baseline(r#"{"runs": [{"batch": "4"}]}"#).is_err());
        let mut w = WorkloadResult {
            name: "4x512".into(),
            batch: 4,
            seq: 512,
            tokens: 2048,
            targets: 2044,
            step: Summary {
                median_ms: 40.0,
                min_ms: 39.0,
                max_ms: 41.0,
            },
            times_ms: vec![40.0],
            tokens_per_s: 0.0,
            flops: StepFlops::default(),
            tflops: 0.0,
            loss_first: 0.0,
            loss_last: 0.0,
            grad_norm_last: 0.0,
            device_used_mib: None,
            workspace_mib: None,
            world_size: 1,
            comm: None,
        };
        let c = compare(std::slice::from_ref(&w), &runs);
        assert_eq!(c[0].speedup_vs_sdpa, Some(2.0));
        assert_eq!(c[0].speedup_vs_eager, Some(2.25));
        w.seq = 1024;
        let c = compare(&[w], &runs);
        assert_eq!((c[0].torch_sdpa_ms, c[0].speedup_vs_eager), (None, None));
    }

    #[test]
    fn dates() {
        assert_eq!(iso_date(0), "1970-01-01");
        assert_eq!(iso_date(11_016), "2000-02-29");
        assert_eq!(iso_date(20_786), "2026-11-29");
        assert_eq!(iso_date(-1), "1969-12-31");
    }

    /// The timed loop on the CPU engine: warm-up excluded, losses finite, the adapter trains.
    #[test]
    fn time_steps_on_a_tiny_random_model() {
        let c = tiny();
        let model = crate::checkpoint::OptModel {
            weights: crate::checkpoint::OptWeights::random(&c, 3, 0.02),
            config: c,
        };
        let mut engine = crate::train::CpuEngine::new(model);
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            ..LoraConfig::default()
        };
        let batch = random_batch(2, 16, 300, 5);
        let settings = StepSettings {
            warmup: 2,
            iters: 3,
            lr: 1e-2,
            ..StepSettings::default()
        };
        let lora = PeftConfig::lora(lora);
        let r = time_steps(&mut engine, &lora, &batch, &settings, 0).unwrap();
        assert_eq!((r.name.as_str(), r.tokens, r.targets), ("2x16", 32, 30));
        assert_eq!(r.times_ms.len(), 3);
        assert!(r.step.min_ms > 0.0 && r.step.min_ms <= r.step.median_ms);
        assert!(
            r.loss_first.is_finite() && r.loss_last < r.loss_first,
            "{r:?}"
        );
        assert!((r.tflops - r.flops.total / (r.step.median_ms / 1e3) / 1e12).abs() < 1e-12);
        let none = StepSettings {
            iters: 0,
            ..settings
        };
        assert!(time_steps(&mut engine, &lora, &batch, &none, 0).is_err());
    }
}
