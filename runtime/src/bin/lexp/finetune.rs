//! `lexp finetune` and `lexp eval`: LoRA fine-tuning of an OPT checkpoint on JSONL data (or
//! plain text cut into windows), and the loss of a model (+ adapter) on a data file.

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lexp_runtime::checkpoint::{OptConfig, OptModel, PositionExtension};
use lexp_runtime::data::{load_jsonl, text_windows, JsonlOptions, Tokenizer};
use lexp_runtime::dist::launch::{self, LaunchSpec};
use lexp_runtime::dist::{self, DataParallel, NcclComm, RendezvousConfig, TcpComm, World};
use lexp_runtime::gpu::GpuEngine;
use lexp_runtime::peft;
use lexp_runtime::train::metrics::Record;
use lexp_runtime::train::{
    self, embedded, AttentionExposureConfig, Engine, ExposureConfig, ExposureMode, Observer,
    RunInfo, TrainConfig, TrainError,
};
use lexp_runtime::CudaDevice;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where the step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The GPU if one is usable, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The GPU; fail if there is none.
    Cuda,
}

/// `--exposure`: which activation sparsity a run exploits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExposureChoice {
    /// Dense training.
    None,
    /// Sparse MLPs: per-layer block predictors, mass-target selection, dense probes with an
    /// auto-exposure guard (on the GPU: blocks of 64 or 128, the predictors on the device).
    Mlp,
    /// Block-sparse attention: per-head key-block predictors, local window and sinks kept,
    /// mass-target selection, dense probes with the guard (CPU engine only for now).
    Attention,
}

/// Options of `lexp finetune`.
#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    /// Hugging Face OPT checkpoint directory (config.json, safetensors, tokenizer.json).
    /// Default: the bundled opt-tiny model with the bundled E2E slice.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training JSONL file (repeat for several): prompt/completion, Alpaca, text or
    /// pre-tokenized context/completion lines.
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Evaluation JSONL file (default: hold out --eval-fraction of the training prompts). With
    /// --text-windows: a plain-text file, cut into windows the same way.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Share of training prompts held out when there is no --eval-data (with --text-windows:
    /// the last share of the windows, in file order).
    #[arg(long, default_value_t = 0.1)]
    eval_fraction: f64,
    /// Treat --data (and --eval-data) as plain text (documents separated by blank lines), cut
    /// into windows of this many tokens, every token a target: language-model fine-tuning.
    /// Without --eval-data the last --eval-fraction of the windows are held out. Sets the
    /// longest sequence; more than the model's positions needs --max-positions.
    #[arg(long)]
    text_windows: Option<usize>,
    /// Evaluate on at most this many eval examples (0: all).
    #[arg(long, default_value_t = 0)]
    eval_max_examples: usize,
    /// Output directory (default: lexp-runs/run-<unix time>).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Continue the run in --output from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// PEFT methods to train, comma-separated: lora, bitfit (bias vectors), houlsby
    /// (bottleneck adapters after attention and MLP). All run on the GPU (BitFit and Houlsby
    /// with AdamW on the host); GELU adapters on the CPU engine only.
    #[arg(long, value_delimiter = ',', default_value = "lora")]
    peft: Vec<String>,
    /// --peft bitfit: train the Linear biases only (default: the LayerNorm βs too).
    #[arg(long)]
    bitfit_linear_only: bool,
    /// --peft houlsby: bottleneck width of each adapter.
    #[arg(long, default_value_t = 64)]
    adapter_bottleneck: usize,
    /// --peft houlsby: the adapters' nonlinearity, relu or gelu (tanh approximation).
    #[arg(long, default_value = "relu")]
    adapter_activation: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    /// LoRA alpha (scale alpha/r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Residual dropout of the model (default: the checkpoint's `dropout`; official OPT
    /// configs say 0.1, which the GPU engine does not implement yet: pass 0 to train there).
    #[arg(long)]
    model_dropout: Option<f32>,
    /// Adapted projections, comma-separated: q_proj,k_proj,v_proj,out_proj,fc1,fc2.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_targets: Vec<String>,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Most tokens per packed micro-batch.
    #[arg(long, default_value_t = 4096)]
    micro_batch_tokens: usize,
    /// Longest sequence kept (longer ones are truncated with a warning). Default: 1024 (capped
    /// at the model's positions), or --max-positions when given. More than the model's
    /// positions needs --max-positions.
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[command(flatten)]
    positions: PositionArgs,
    /// Epochs (default 2).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Stop after this many optimizer steps (0: all epochs).
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-4)]
    lr: f32,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Schedule after warm-up: linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Gradient clipping norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Evaluate every this many steps (0: at the start and the end only).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Skip steps whose loss or gradients are not finite; stop after this many in a row.
    #[arg(long, default_value_t = 5)]
    max_bad_steps: usize,
    /// Checkpoint every this many steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Seed of data order, LoRA init and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// GPU: run each micro-batch's forward and backward as a CUDA graph where its shape
    /// repeats (fixed-length `--text-windows` batches; packed prompts differ every step and run
    /// as usual). Captured at a shape's second use; not with dropout, BitFit or Houlsby. Same
    /// results, fewer launches.
    #[arg(long)]
    cuda_graph: bool,
    /// Activation sparsity to exploit: none, mlp (GPU with --mlp-block 64 or 128, else CPU) or
    /// attention (CPU engine only for now).
    #[arg(long, value_enum, default_value = "none")]
    exposure: ExposureChoice,
    /// --exposure mlp: neurons per block (must divide the MLP width).
    #[arg(long, default_value_t = 32)]
    mlp_block: usize,
    /// --exposure mlp: token rows per group (blocks are chosen per group).
    #[arg(long, default_value_t = 128)]
    mlp_group: usize,
    /// --exposure mlp: initial share of each group's predicted activation mass to keep.
    #[arg(long, default_value_t = 0.99)]
    mlp_target: f64,
    /// --exposure mlp: largest share of a layer's blocks a group may keep.
    #[arg(long, default_value_t = 1.0)]
    mlp_budget: f64,
    /// --exposure mlp: rank of the per-layer block predictors.
    #[arg(long, default_value_t = 64)]
    mlp_rank: usize,
    /// --exposure attention: initial share of each (query block, head) row's predicted
    /// attention mass to keep, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    attn_target: f64,
    /// --exposure attention: key blocks before the diagonal always kept (local window).
    #[arg(long, default_value_t = 1)]
    attn_window: usize,
    /// --exposure attention: first key blocks of each sequence always kept (sinks).
    #[arg(long, default_value_t = 1)]
    attn_sinks: usize,
    /// --exposure attention: largest share of a row's causal key blocks kept beyond the window
    /// and sinks, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    attn_budget: f64,
    /// --exposure attention: rank of the per-head key-block scorers.
    #[arg(long, default_value_t = 16)]
    attn_rank: usize,
    /// --exposure attention: query rows and keys per block (the GPU kernels' tile is 128).
    #[arg(long, default_value_t = 128)]
    attn_block: usize,
    /// --exposure mlp|attention: steps between the guard's dense probes (0: none).
    #[arg(long, default_value_t = 20)]
    probe_every: usize,
    /// --exposure mlp|attention: relative loss gap (sparse vs dense) the guard holds.
    #[arg(long, default_value_t = 0.005)]
    gap_budget: f64,
    /// --exposure mlp|attention: training micro-batches run dense to label the predictors'
    /// offline training.
    #[arg(long, default_value_t = 32)]
    predictor_batches: usize,
    /// --exposure mlp|attention: Adam steps of each predictor's offline training.
    #[arg(long, default_value_t = 1000)]
    predictor_steps: usize,
    /// --exposure mlp: keep the checkpoint's neuron order (skip the exposer's co-activation
    /// permutation).
    #[arg(long)]
    no_permute: bool,
    /// Data-parallel training in N worker processes on this machine (CPU engine): lexp starts
    /// N copies of itself with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT); each computes its share of every step's micro-batches, the
    /// gradients are summed across workers, rank 0 writes every file. The same binary also
    /// runs under torchrun or any launcher that sets those variables.
    #[arg(long, conflicts_with = "gpus")]
    workers: Option<usize>,
    /// Data-parallel training on N GPUs of this machine (one worker each, CUDA_VISIBLE_DEVICES
    /// set per worker): gradients are summed over NCCL (libnccl.so on LD_LIBRARY_PATH), on the
    /// host optimizer path (the engine's gradients read back each micro-batch).
    #[arg(long)]
    gpus: Option<usize>,
}

/// `--max-positions` / `--position-extension`: longer contexts than the checkpoint learned.
#[derive(clap::Args, Debug)]
pub struct PositionArgs {
    /// Extend the checkpoint's learned position table to this many positions before training
    /// or evaluating, so that sequences longer than the checkpoint's `max_position_embeddings`
    /// fit (e.g. 4096-16384 for OPT's 2048). The PEFT adapter is unaffected.
    #[arg(long)]
    max_positions: Option<usize>,
    /// How --max-positions fills the new table: `interpolate` (position p reads the learned
    /// table at p·(P−1)/(N−1), linearly interpolated between its two neighbours).
    #[arg(long, default_value = "interpolate")]
    position_extension: PositionExtension,
}

impl PositionArgs {
    /// Checks the flags against the checkpoint in `model_dir` and returns the longest sequence
    /// a run keeps: `asked` (the value of `flag`) or, without it, `--max-positions` when given,
    /// else `default` capped at the learned positions. A length above the positions the model
    /// will have is an error naming `--max-positions`; so is a `--max-positions` below the
    /// learned ones (the table only grows).
    fn sequence_limit(
        &self,
        model_dir: &Path,
        flag: &str,
        asked: Option<usize>,
        default: usize,
    ) -> Result<usize> {
        let file = model_dir.join("config.json");
        let learned = OptConfig::from_file(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .max_position_embeddings;
        if let Some(n) = self.max_positions {
            if n < learned {
                bail!(
                    "--max-positions {n} is below the model's {learned} learned positions: the \
                     position table only grows"
                );
            }
        }
        let len = match (asked, self.max_positions) {
            (Some(len), _) => len,
            (None, Some(n)) => n,
            (None, None) => default.min(learned),
        };
        match self.max_positions {
            None if len > learned => bail!(
                "{flag} {len} is longer than the model's {learned} learned positions \
                 (max_position_embeddings): pass --max-positions {len} (or more) to extend the \
                 position table by interpolation, or lower {flag}"
            ),
            Some(n) if len > n => bail!(
                "{flag} {len} is longer than --max-positions {n}: raise --max-positions to at \
                 least {len}"
            ),
            _ => Ok(len),
        }
    }
}

/// The engine a run uses, after looking at the machine and the model.
///
/// `cpu`: the CPU engine. `cuda`: the GPU engine, or an error saying why not (no GPU, a model
/// the GPU path does not implement, cuBLAS missing, too little memory). `auto`: the GPU
/// engine when it can run the model, else the CPU engine with a message saying why.
fn make_engine(
    choice: DeviceChoice,
    config: &TrainConfig,
    ordinal: usize,
) -> Result<(&'static str, Box<dyn Engine>)> {
    let load = || {
        config
            .load_model()
            .with_context(|| format!("loading the model {}", config.model_dir.display()))
    };
    let cpu = |model: OptModel| -> (&'static str, Box<dyn Engine>) {
        ("cpu", Box::new(train::CpuEngine::new(model)))
    };
    let exposure = match config.exposure.mode {
        ExposureMode::None => None,
        ExposureMode::Mlp => Some(("mlp", "MLP")),
        ExposureMode::Attention => Some(("attention", "attention")),
    };
    if config.exposure.mode == ExposureMode::Mlp && choice != DeviceChoice::Cpu {
        if let Some(engine) = exposed_gpu_engine(choice, config, ordinal)? {
            return Ok(("cuda", engine));
        }
        return Ok(("cpu", Box::new(exposed_cpu_engine(config)?)));
    }
    if let Some((flag, what)) = exposure {
        if choice == DeviceChoice::Cuda {
            bail!(
                "--exposure {flag} runs on the CPU engine only for now (the GPU's block-sparse \
                 {what} operators are not connected to training yet): use --device cpu"
            );
        }
        if choice == DeviceChoice::Auto {
            eprintln!(
                "--exposure {flag}: training on the CPU engine (the GPU engine has no sparse \
                 {what} training yet)"
            );
        }
        return Ok(("cpu", Box::new(exposed_cpu_engine(config)?)));
    }
    let peft = config.peft_config().map_err(|e| anyhow!("{e}"))?;
    let gelu = peft
        .houlsby
        .as_ref()
        .is_some_and(|h| h.activation != lexp_runtime::peft::AdapterActivation::Relu);
    if gelu && choice != DeviceChoice::Cpu {
        if choice == DeviceChoice::Cuda {
            bail!(
                "--adapter-activation gelu: the GPU engine runs ReLU Houlsby adapters; GELU ones \
                 train on the CPU engine: use --device cpu"
            );
        }
        eprintln!("--adapter-activation gelu: training on the CPU engine (the GPU engine runs ReLU adapters)");
        return Ok(cpu(load()?));
    }
    // What keeps the GPU engine from this run: the model's shape, or dropout without cuRAND
    // (loaded at run time; the GPU engine draws its dropout masks with it).
    let gpu_blocker = |model: &OptModel| -> Option<String> {
        if let Err(e) = lexp_runtime::gpu::weights::check_supported(model) {
            return Some(e.to_string());
        }
        if config.uses_dropout(&model.config) {
            return lexp_runtime::gpu::rng::curand_available()
                .err()
                .map(|e| e.to_string());
        }
        None
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu(load()?)),
        DeviceChoice::Cuda => {
            let dev = CudaDevice::new(ordinal).context("--device cuda: no usable CUDA GPU")?;
            let name = dev.name().to_string();
            let model = load()?;
            if let Some(why) = gpu_blocker(&model) {
                bail!("--device cuda: found {name}, but {why}");
            }
            let engine = GpuEngine::new(model, dev)
                .map_err(|e| anyhow!("--device cuda: found {name}, but {e}"))?;
            Ok(("cuda", Box::new(engine)))
        }
        DeviceChoice::Auto => {
            let dev = match CudaDevice::new(ordinal) {
                Ok(dev) => dev,
                Err(e) => {
                    eprintln!("no usable GPU ({e}); training on the CPU");
                    return Ok(cpu(load()?));
                }
            };
            let name = dev.name().to_string();
            let model = load()?;
            if let Some(why) = gpu_blocker(&model) {
                eprintln!("found {name}, but {why}; training on the CPU");
                return Ok(cpu(model));
            }
            match GpuEngine::new(model, dev) {
                Ok(engine) => Ok(("cuda", Box::new(engine))),
                Err(e) => {
                    eprintln!("found {name}, but {e}; training on the CPU");
                    Ok(cpu(load()?))
                }
            }
        }
    }
}

/// MLP exposure on the GPU ([`train::exposed_gpu::GpuExposedEngine`]): the predictors trained
/// on the CPU as for the CPU engine, then run on the device inside every step. `None` (with a
/// message saying why) when `--device auto` finds no usable GPU or settings the GPU's sparse
/// MLP does not take; `--device cuda` fails instead, naming the flag to change.
fn exposed_gpu_engine(
    choice: DeviceChoice,
    config: &TrainConfig,
    ordinal: usize,
) -> Result<Option<Box<dyn Engine>>> {
    let x = &config.exposure;
    let why = if !matches!(x.mlp_block, 64 | 128) {
        Some(format!(
            "the GPU's sparse MLP takes blocks of 64 or 128 neurons (--mlp-block {} given; \
             pass --mlp-block 128)",
            x.mlp_block
        ))
    } else if x.mlp_group != 128 {
        Some(format!(
            "the GPU's sparse MLP groups 128 tokens (--mlp-group {} given; pass --mlp-group 128)",
            x.mlp_group
        ))
    } else {
        None
    };
    let dev = match (why, CudaDevice::new(ordinal)) {
        (None, Ok(dev)) => dev,
        (Some(why), _) if choice == DeviceChoice::Cuda => {
            bail!("--exposure mlp --device cuda: {why}")
        }
        (None, Err(e)) if choice == DeviceChoice::Cuda => {
            return Err(anyhow!(e).context("--device cuda: no usable CUDA GPU"))
        }
        (Some(why), _) => {
            eprintln!("--exposure mlp: training on the CPU engine: {why}");
            return Ok(None);
        }
        (None, Err(e)) => {
            eprintln!("--exposure mlp: no usable GPU ({e}); training on the CPU engine");
            return Ok(None);
        }
    };
    let name = dev.name().to_string();
    let cpu = exposed_cpu_engine(config)?;
    let engine = train::exposed_gpu::GpuExposedEngine::new(cpu, dev)
        .map_err(|e| anyhow!("--exposure mlp on {name}: {e}"))?;
    eprintln!(
        "MLP exposure on {name}: predictors and block selection run on the device in every step"
    );
    Ok(Some(Box::new(engine)))
}

/// The CPU engine with MLP or attention exposure: model, [`train::exposed::expose_structure`]
/// (MLP), the predictors trained offline on dense forwards (with a progress bar), the sparse
/// hook.
fn exposed_cpu_engine(config: &TrainConfig) -> Result<train::CpuEngine> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "predictors: {bar:30.cyan/blue} {pos}/{len} (dense forwards, then the fit)  [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let engine = train::exposed::cpu_engine_exposed(config, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| "training the exposure's block predictors")?;
    bar.finish_and_clear();
    let x = &config.exposure;
    if x.mode == ExposureMode::Attention {
        let a = &x.attention;
        eprintln!(
            "attention exposure: predictors (rank {}) trained on {} dense batches in {:.1} s; \
             blocks of {}x{}, window {}, sinks {}, mass target {}, budget {}, probes every {} \
             steps, gap budget {}",
            a.rank,
            x.predictor_batches,
            t0.elapsed().as_secs_f64(),
            a.q_block,
            a.k_block,
            a.window,
            a.sinks,
            a.target,
            a.budget,
            x.probe_every,
            x.gap_budget
        );
        return Ok(engine);
    }
    eprintln!(
        "MLP exposure: {}predictors (rank {}) trained on {} dense batches in {:.1} s; blocks of \
         {}, groups of {}, mass target {}, probes every {} steps, gap budget {}",
        if config.exposure.permute {
            "neurons clustered by co-activation, "
        } else {
            ""
        },
        config.exposure.mlp_rank,
        config.exposure.predictor_batches,
        t0.elapsed().as_secs_f64(),
        config.exposure.mlp_block,
        config.exposure.mlp_group,
        config.exposure.mlp_target,
        config.exposure.probe_every,
        config.exposure.gap_budget
    );
    Ok(engine)
}

/// Progress bar and messages of a run.
///
/// When stderr is not a terminal (CI logs, redirected output) indicatif hides the bar and
/// drops its `println`s, so eval lines are printed directly and a plain progress line is
/// printed every ~10% of the steps instead.
struct Progress {
    bar: Option<ProgressBar>,
    last_eval: Option<f64>,
    first_eval: Option<f64>,
    /// Steps between plain progress lines when the bar is hidden.
    plain_every: usize,
    /// Set by SIGINT/SIGTERM ([`stop_on_signals`]).
    stop: Arc<AtomicBool>,
}

/// On the first SIGINT or SIGTERM, sets the returned flag (the run finishes its step, writes a
/// checkpoint and exits); a second one exits at once with status 130.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The conditional shutdown first: it fires only if the flag is already set.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))
            .context("installing a signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    Ok(stop)
}

impl Progress {
    /// Prints `line` above the bar, or plainly when the bar is hidden (or absent).
    fn println(&self, line: String) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

impl Observer for Progress {
    fn should_stop(&mut self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn start(&mut self, info: &RunInfo) {
        eprintln!(
            "training {} examples ({} held out for eval), {} trainable parameters, {} steps",
            info.train_examples, info.eval_examples, info.trainable, info.total_steps
        );
        if let Some(dir) = &info.resumed_from {
            eprintln!("resumed from {} (step {})", dir.display(), info.done_steps);
        }
        let bar = ProgressBar::new(info.total_steps as u64);
        bar.set_position(info.done_steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar = Some(bar);
        self.plain_every = info.total_steps.div_ceil(10).max(1);
    }

    fn step(&mut self, record: &Record, done: usize, total: usize, tokens_per_s: f64) {
        if let (Some(bar), Record::Train { loss, .. }) = (&self.bar, record) {
            let eval = self
                .last_eval
                .map(|e| format!("  eval {e:.4}"))
                .unwrap_or_default();
            let msg = format!("loss {loss:.4}{eval}  {tokens_per_s:.0} tok/s");
            if bar.is_hidden() {
                if done.is_multiple_of(self.plain_every) || done == total {
                    eprintln!("step {done}/{total}: {msg}");
                }
            } else {
                bar.set_message(msg);
                bar.set_position(done as u64);
            }
        }
    }

    fn eval(&mut self, record: &Record) {
        if let Record::Eval {
            step,
            loss,
            targets,
            dense_loss,
        } = record
        {
            self.first_eval.get_or_insert(*loss);
            self.last_eval = Some(*loss);
            let dense = dense_loss
                .map(|d| format!(" (sparse; dense {d:.4})"))
                .unwrap_or_default();
            self.println(format!(
                "eval after step {step}: loss {loss:.4}{dense} over {targets} target tokens"
            ));
        }
    }

    fn probe(&mut self, record: &Record) {
        if let Record::Probe(p) = record {
            let n = p.layers.len().max(1) as f64;
            let density = p.layers.iter().map(|l| l.density).sum::<f64>() / n;
            let recall = p
                .layers
                .iter()
                .map(|l| l.recall)
                .fold(f64::INFINITY, f64::min);
            self.println(format!(
                "probe at step {}: gap {:+.3}% (dense {:.4}, sparse {:.4}), mean density {:.3}, \
                 worst recall {:.4}, {:?}",
                p.step,
                100.0 * p.gap,
                p.dense_loss,
                p.sparse_loss,
                density,
                recall,
                p.action
            ));
        }
    }
}

/// `lexp finetune`.
pub fn finetune(args: FinetuneArgs) -> Result<()> {
    let default_run = args.model.is_none() && args.data.is_empty();
    let (model_dir, train_files, eval_file) = match (&args.model, args.data.is_empty()) {
        (None, true) => {
            let root = embedded::cache_root();
            let a = embedded::unpack(&root).with_context(|| {
                format!("cannot unpack the bundled model into {}", root.display())
            })?;
            eprintln!(
                "no model or data given: fine-tuning the bundled opt-tiny on the bundled E2E slice ({})",
                a.model_dir.parent().unwrap_or(&a.model_dir).display()
            );
            (a.model_dir, vec![a.train], Some(a.eval))
        }
        (Some(m), false) => (m.clone(), args.data.clone(), args.eval_data.clone()),
        (Some(_), true) => {
            bail!("--model given without --data: name the training JSONL with --data FILE")
        }
        (None, false) => bail!(
            "--data given without --model: name the OPT checkpoint directory with --model DIR"
        ),
    };
    let output = args.output.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from("lexp-runs").join(format!("run-{secs}"))
    });
    let max_seq_len = match args.text_windows {
        None => {
            args.positions
                .sequence_limit(&model_dir, "--max-seq-len", args.max_seq_len, 1024)?
        }
        Some(0) => bail!("--text-windows must be at least 1 token"),
        Some(_) if default_run => bail!(
            "--text-windows needs plain-text data: name the model with --model DIR and the \
             text with --data FILE"
        ),
        Some(w) => {
            let w = args
                .positions
                .sequence_limit(&model_dir, "--text-windows", Some(w), w)?;
            match args.max_seq_len {
                Some(m) if m < w => bail!(
                    "--max-seq-len {m} is shorter than --text-windows {w}: drop --max-seq-len \
                     (text windows set it)"
                ),
                _ => w,
            }
        }
    };
    let config = TrainConfig {
        model_dir,
        train_files,
        eval_file,
        eval_fraction: args.eval_fraction,
        eval_max_examples: args.eval_max_examples,
        peft: args.peft.clone(),
        bitfit_layer_norms: !args.bitfit_linear_only,
        adapter_bottleneck: args.adapter_bottleneck,
        adapter_activation: args.adapter_activation.clone(),
        lora_r: args.lora_r,
        lora_alpha: args.lora_alpha,
        lora_dropout: args.lora_dropout,
        lora_targets: args.lora_targets.clone(),
        examples_per_step: args.batch,
        micro_batch_tokens: args.micro_batch_tokens,
        max_seq_len,
        epochs: args.epochs,
        max_steps: args.max_steps,
        lr: args.lr,
        warmup_steps: args.warmup,
        schedule: args.schedule.clone(),
        weight_decay: args.weight_decay,
        betas: (0.9, 0.999),
        eps: 1e-8,
        max_grad_norm: args.max_grad_norm,
        eval_every: args.eval_every.unwrap_or(if default_run { 20 } else { 0 }),
        save_every: args.save_every,
        keep_checkpoints: args.keep_checkpoints,
        seed: args.seed,
        model_dropout: args.model_dropout,
        max_bad_steps: args.max_bad_steps,
        max_positions: args.positions.max_positions,
        position_extension: args.positions.position_extension,
        exposure: ExposureConfig {
            mode: match args.exposure {
                ExposureChoice::None => ExposureMode::None,
                ExposureChoice::Mlp => ExposureMode::Mlp,
                ExposureChoice::Attention => ExposureMode::Attention,
            },
            mlp_block: args.mlp_block,
            mlp_group: args.mlp_group,
            mlp_target: args.mlp_target,
            mlp_budget: args.mlp_budget,
            mlp_rank: args.mlp_rank,
            probe_every: args.probe_every,
            gap_budget: args.gap_budget,
            predictor_batches: args.predictor_batches,
            predictor_steps: args.predictor_steps,
            permute: !args.no_permute,
            attention: AttentionExposureConfig {
                target: args.attn_target,
                window: args.attn_window,
                sinks: args.attn_sinks,
                budget: args.attn_budget,
                rank: args.attn_rank,
                q_block: args.attn_block,
                k_block: args.attn_block,
            },
        },
        text_windows: args.text_windows,
    };
    config.exposure.validate().map_err(|e| anyhow!("{e}"))?;
    let world = World::from_env().context("reading the data-parallel environment")?;
    if let Some(n) = args.workers.or(args.gpus) {
        if world.is_distributed() {
            bail!(
                "--workers/--gpus given to a worker of a distributed run (RANK={} of \
                 WORLD_SIZE={}): pass them to the launcher only",
                world.rank,
                world.world_size
            );
        }
        if n == 0 {
            bail!("--workers/--gpus must be at least 1");
        }
        if n > 1 {
            return launch_workers(n, args.gpus.is_some(), args.output.is_none(), &output);
        }
    }
    let stop = stop_on_signals()?;
    let ordinal = match args.device {
        DeviceChoice::Cpu => 0,
        _ => world.gpu_ordinal(CudaDevice::count().unwrap_or(0)),
    };
    // A worker of a data-parallel run joins its group before loading anything, so that a
    // missing worker is reported at once.
    let comm = if world.is_distributed() {
        launch::exit_with_launcher();
        if config.exposure.mode != ExposureMode::None {
            bail!("--exposure {} does not run data-parallel yet (the guard's probes and counters are per process): train with one worker", format!("{:?}", args.exposure).to_lowercase());
        }
        // GPU workers (`--gpus`, or CUDA visible under an external launcher) talk NCCL: rank 0
        // puts the unique id in the rendezvous blob.
        let on_gpu =
            args.device != DeviceChoice::Cpu && lexp_runtime::CudaDevice::new(ordinal).is_ok();
        let blob = if on_gpu && world.rank == 0 {
            dist::nccl::unique_id_blob().context("creating the NCCL id")?
        } else {
            Vec::new()
        };
        let (group, blob) =
            dist::rendezvous::rendezvous(&world, None, &blob, &RendezvousConfig::from_env())
                .context("joining the data-parallel group")?;
        let comm: Box<dyn dist::Communicator> = if on_gpu {
            Box::new(NcclComm::new(group, &blob, ordinal).context("joining the NCCL communicator")?)
        } else {
            Box::new(TcpComm::new(group))
        };
        Some(comm)
    } else {
        None
    };
    let (backend, mut engine) = make_engine(args.device, &config, ordinal)?;
    if args.cuda_graph && !engine.use_cuda_graphs(true) {
        eprintln!("--cuda-graph: the {backend} engine launches no CUDA graphs; ignored");
    }
    let stop = match comm {
        Some(comm) => {
            let dp = DataParallel::new(engine, comm).with_stop_request(stop);
            let agreed = dp.stop_agreed();
            engine = Box::new(dp);
            agreed
        }
        None => stop,
    };
    eprintln!(
        "device: {backend} ({}); output: {}",
        engine.name(),
        output.display()
    );
    let mut progress = Progress {
        bar: None,
        last_eval: None,
        first_eval: None,
        plain_every: 1,
        stop,
    };
    let result = train::run_as(
        &config,
        &output,
        args.resume,
        engine.as_mut(),
        &mut progress,
        world.is_writer(),
    );
    if let Err(TrainError::Interrupted { step, checkpoint }) = &result {
        if let Some(bar) = &progress.bar {
            bar.abandon();
        }
        eprintln!(
            "stopped by a signal after step {step}; checkpoint {}\ncontinue with the same \
             command and --resume --output {}",
            checkpoint.display(),
            output.display()
        );
        std::process::exit(130);
    }
    let summary = result.with_context(|| format!("fine-tuning run in {}", output.display()))?;
    if let Some(bar) = &progress.bar {
        bar.finish();
    }
    match summary.eval_loss_start {
        Some(start) => eprintln!(
            "eval loss {start:.4} -> {:.4} after {} steps ({:.1} s of training, {:.0} tokens/s)",
            summary.eval_loss_end,
            summary.steps,
            summary.train_seconds,
            summary.tokens as f64 / summary.train_seconds.max(1e-9)
        ),
        None => eprintln!(
            "eval loss {:.4} after {} steps",
            summary.eval_loss_end, summary.steps
        ),
    }
    if let Some(dense) = summary.eval_loss_end_dense {
        let gap = (summary.eval_loss_end - dense) / dense;
        eprintln!(
            "final eval: sparse {:.4}, dense {dense:.4} (relative gap {:+.3}%)",
            summary.eval_loss_end,
            100.0 * gap
        );
    }
    if let Some(x) = &summary.exposure {
        let per_layer: Vec<String> = x
            .layers
            .iter()
            .map(|l| format!("{:.3}/{:.4}/{:.4}", l.density, l.recall, l.target))
            .collect();
        eprintln!(
            "MLP exposure over the training steps: work skipped {:.1}% ({} probes, mean gap {}); \
             per layer density/recall/final target: {}",
            100.0 * x.mlp_work_skipped,
            x.probes,
            x.mean_gap
                .map(|g| format!("{:+.3}%", 100.0 * g))
                .unwrap_or_else(|| "-".into()),
            per_layer.join(" ")
        );
    }
    if let Some(a) = &summary.attention {
        let pct = |v: Option<f64>| {
            v.map(|g| format!("{:+.3}%", 100.0 * g))
                .unwrap_or_else(|| "-".into())
        };
        let per_layer: Vec<String> = a
            .layers
            .iter()
            .map(|l| {
                let r = l.recall.map_or("-".into(), |r| format!("{r:.4}"));
                format!("{:.3}/{r}/{:.4}", l.density, l.target)
            })
            .collect();
        eprintln!(
            "attention exposure over the training steps: {:.1}% of the causal key blocks \
             computed, probe recall {} ({} probes, mean gap {}, last gap {}); per layer \
             density/recall/final target: {}",
            100.0 * a.density,
            a.recall.map_or("-".into(), |r| format!("{r:.4}")),
            a.probes,
            pct(a.mean_gap),
            pct(a.last_gap),
            per_layer.join(" ")
        );
    }
    eprintln!(
        "adapter (LoRA in PEFT format, BitFit/Houlsby in lexp's layout): {}\nmetrics: {}\nloss curve: {}",
        summary.adapter_dir.display(),
        output.join(train::trainer::METRICS).display(),
        output.join(train::trainer::LOSS_PNG).display()
    );
    Ok(())
}

/// The launcher of `--workers N` / `--gpus N`: starts N copies of this executable with the
/// same arguments (minus the launcher flag; with `--output` fixed when it was defaulted, so
/// that every worker agrees), streams rank 0's output and fails naming the first worker that
/// failed. SIGTERM is forwarded to the workers (they stop after an agreed step); SIGINT from
/// a terminal reaches them directly (same process group), so the launcher only waits.
fn launch_workers(n: usize, gpus: bool, add_output: bool, output: &Path) -> Result<()> {
    let program = std::env::current_exe().context("cannot find the lexp executable")?;
    let all: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut worker_args = launch::strip_flags(&all, &["--workers", "--gpus"]);
    if add_output {
        worker_args.push("--output".into());
        worker_args.push(output.as_os_str().to_os_string());
    }
    let term = Arc::new(AtomicBool::new(false));
    let int = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&term))
        .context("installing a signal handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, int)
        .context("installing a signal handler")?;
    eprintln!(
        "launching {n} data-parallel workers{} (rank 0's output follows)",
        if gpus { ", one per GPU" } else { "" }
    );
    let spec = LaunchSpec {
        program,
        args: worker_args,
        workers: n,
        gpus,
        grace: std::time::Duration::from_secs(5),
    };
    match launch::launch(&spec, &term)? {
        Ok(()) => Ok(()),
        Err(failure) if failure.interrupted => {
            eprintln!("lexp finetune: all {n} workers stopped after the same step (see rank 0's message above)");
            std::process::exit(failure.code);
        }
        Err(failure) => {
            eprintln!("lexp finetune: {}", failure.message);
            std::process::exit(failure.code);
        }
    }
}

/// Options of `lexp eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// OPT checkpoint directory (default: the bundled opt-tiny).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter directory: LoRA in PEFT format (adapter_config.json + adapter_model.safetensors),
    /// and/or lexp's BitFit (bitfit_*) and Houlsby (houlsby_*) files, as `lexp finetune` writes.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL data file (default with the bundled model: the bundled E2E eval slice).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Evaluate the first N examples only (0: all).
    #[arg(long, default_value_t = 0)]
    max_examples: usize,
    /// Also write the evaluated examples, tokenized, to this JSONL file (`{"input_ids",
    /// "labels"}` per line, labels -100 where not scored, unshifted as transformers takes
    /// them), so that another framework can compute the same loss.
    #[arg(long)]
    export_tokens: Option<PathBuf>,
    /// Most tokens per packed batch.
    #[arg(long, default_value_t = 4096)]
    micro_batch_tokens: usize,
    /// Longest sequence kept. Default: 1024 (capped at the model's positions), or
    /// --max-positions when given. More than the model's positions needs --max-positions.
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Treat --data as plain text (documents separated by blank lines) cut into windows of this
    /// many tokens, every token a target: language-model loss, as the fixtures' valid loss.
    /// More than the model's positions needs --max-positions.
    #[arg(long)]
    text_windows: Option<usize>,
    #[command(flatten)]
    positions: PositionArgs,
}

/// `lexp eval`: mean loss (and perplexity) over the loss targets of a data file.
pub fn eval(args: EvalArgs) -> Result<()> {
    let (model_dir, data) = match (&args.model, &args.data) {
        (Some(m), Some(d)) => (m.clone(), d.clone()),
        (None, d) => {
            let a = embedded::unpack(&embedded::cache_root())
                .context("cannot unpack the bundled model")?;
            (a.model_dir, d.clone().unwrap_or(a.eval))
        }
        (Some(_), None) => {
            bail!("--model given without --data: name the JSONL file with --data FILE")
        }
    };
    let pos = &args.positions;
    let max_seq_len = pos.sequence_limit(&model_dir, "--max-seq-len", args.max_seq_len, 1024)?;
    if let Some(w) = args.text_windows {
        pos.sequence_limit(&model_dir, "--text-windows", Some(w), w)?;
    }
    let mut model = OptModel::load(&model_dir)
        .with_context(|| format!("loading the model {}", model_dir.display()))?;
    if let Some(n) = pos.max_positions {
        model.extend_positions(n, pos.position_extension)?;
    }
    let tok = Tokenizer::from_file(model_dir.join("tokenizer.json"))?;
    let options = JsonlOptions {
        max_len: max_seq_len.min(model.config.max_position_embeddings),
        vocab_size: Some(model.config.vocab_size),
        ..JsonlOptions::default()
    };
    let examples = match args.text_windows {
        Some(w) => {
            let text = std::fs::read_to_string(&data)
                .with_context(|| format!("cannot read {}", data.display()))?;
            let w = w.min(model.config.max_position_embeddings);
            text_windows(&tok, &text, w)?
        }
        None => load_jsonl(&data, Some(&tok), &options)?.examples,
    };
    let mut examples = examples;
    if args.max_examples > 0 {
        examples.truncate(args.max_examples);
    }
    if let Some(path) = &args.export_tokens {
        let mut text = String::new();
        for e in &examples {
            let line = serde_json::json!({ "input_ids": e.ids, "labels": e.labels() });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let lora = match &args.adapter {
        Some(dir) => Some(peft::PeftParams::load(dir, &model)?),
        None => None,
    };
    let (loss, targets) = train::evaluate(
        &mut train::CpuEngine::new(model),
        lora.as_ref(),
        &examples,
        args.micro_batch_tokens.max(args.text_windows.unwrap_or(0)),
    )?;
    println!(
        "{}: {} examples, {targets} target tokens: loss {loss:.4}, perplexity {:.2}",
        display(&data),
        examples.len(),
        loss.exp()
    );
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
