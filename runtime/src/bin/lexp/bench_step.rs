//! `lexp bench step`: the dense LoRA training step (the engine's loss and gradients, gradient
//! clipping, host AdamW: one `lexp finetune` optimizer step) timed on an OPT preset or a
//! checkpoint, with its achieved TFLOP/s and device memory, a printed table, JSON, and a bar
//! chart that includes the PyTorch baseline (`bench/torch_baseline.py`) when given.

use super::bench_profile;
use super::finetune::DeviceChoice;
use anyhow::{anyhow, bail, Context, Result};
use lexp_runtime::checkpoint::{OptConfig, OptModel, OptWeights};
use lexp_runtime::data::{epoch_order, load_jsonl, pack, Example, JsonlOptions, PackedBatch};
use lexp_runtime::dist::{self, launch, DataParallel, NcclComm, RendezvousConfig, World};
use lexp_runtime::gpu::attention::AttentionImpl;
use lexp_runtime::gpu::sparse_attention::SyntheticAttention;
use lexp_runtime::gpu::sparse_mlp::SyntheticMlp;
use lexp_runtime::gpu::{GpuEngine, MlpPredictors};
use lexp_runtime::peft::{BitFitConfig, HoulsbyConfig, LoraConfig, LoraTarget, PeftConfig};
use lexp_runtime::step_bench::{self as sb, BaselineRun, Comparison, StepSettings, WorkloadResult};
use lexp_runtime::train::{CpuEngine, Engine};
use lexp_runtime::CudaDevice;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seeds of rank `m`'s micro-batch: `seed + 1 + workload + m·DP_SEED_STRIDE`.
const DP_SEED_STRIDE: u64 = 7919;

/// Options of `lexp bench step`.
#[derive(clap::Args, Debug)]
pub struct StepArgs {
    /// opt-125m, opt-350m, opt-1.3b, opt-2.7b (published shapes, random weights), or a
    /// Hugging Face OPT checkpoint directory (its weights unless --random-weights).
    #[arg(long, default_value = "opt-1.3b")]
    model: String,
    /// Random weights (N(0, 0.02²)) for a checkpoint directory too (its config only).
    #[arg(long)]
    random_weights: bool,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence, one workload each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    seq: Vec<usize>,
    /// Packed token budget instead of --batch: each workload packs max(1, N / seq) sequences.
    #[arg(long)]
    tokens: Option<usize>,
    /// Real data instead of random tokens: a pre-tokenized JSONL file (`{"context": [ids],
    /// "completion": [ids]}` per line, e.g. ../shared/data/e2e-paper/valid_opt.jsonl) whose
    /// examples, shuffled by --seed, are packed whole into the workload's budget of --batch x
    /// --seq tokens (or --tokens), each its own sequence, loss on the completion. The
    /// workload is named `BxS packed`; its `batch` is the examples packed.
    #[arg(long)]
    data: Option<PathBuf>,
    /// PEFT methods, comma-separated: lora, bitfit, houlsby (as `lexp finetune --peft`).
    #[arg(long, value_delimiter = ',', default_value = "lora")]
    peft: Vec<String>,
    /// --peft houlsby: the adapters' bottleneck (ReLU adapters).
    #[arg(long, default_value_t = 64)]
    adapter_bottleneck: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    lora_r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 8.0)]
    lora_alpha: f32,
    /// Adapted projections, comma-separated: q_proj,k_proj,v_proj,out_proj,fc1,fc2.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_targets: Vec<String>,
    /// Untimed steps before each workload's timed ones.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed steps per workload (median, min and max reported).
    #[arg(long, default_value_t = 25)]
    iters: usize,
    /// Where to run: the GPU engine, the CPU engine, or the GPU when it can run the model.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Seed of the random weights, batches and LoRA init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw a bar chart of the step times here (PNG).
    #[arg(long)]
    png: Option<PathBuf>,
    /// A `bench/torch_baseline.py` JSON measured on the same machine: compared per workload.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Write the comparison with --baseline as JSON here.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// The git commit of this build, recorded in the JSON (default: $LEXP_GIT_COMMIT at build
    /// time, if it was set).
    #[arg(long)]
    commit: Option<String>,
    /// Profile one extra step of each workload (GPU): every kernel's time, share and TFLOP/s,
    /// printed, as JSON here and as a chart next to it (same name, .png).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// GPU attention: flash (DSL kernels, head dimensions 64 and 128) or materialised (cuBLAS
    /// scores, any head dimension); default: flash where it applies.
    #[arg(long)]
    attention: Option<AttentionImpl>,
    /// Learned positions of a preset (random weights only; default the published 2048): a
    /// longer table lets `--seq` go past 2048 (`bench/torch_baseline.py --max-positions` builds
    /// the same model).
    #[arg(long)]
    max_positions: Option<usize>,
    /// Run AdamW on the host (gradients downloaded, the adapter uploaded every step), as
    /// before the engine ran it on the device: an A/B switch for the optimizer path.
    #[arg(long)]
    host_optimizer: bool,
    /// Run every layer's MLP on the block-sparse kernels over RANDOM block lists keeping this
    /// share of each 128-token group's neuron blocks: a synthetic predictor (labelled so in
    /// the output) that measures the sparse operators inside the step. GPU only; LoRA on q,
    /// k, v or out_proj only.
    #[arg(long)]
    synthetic_mlp_density: Option<f64>,
    /// Neurons per block for `--synthetic-mlp-density` (64 or 128).
    #[arg(long, default_value_t = 128)]
    synthetic_mlp_block: usize,
    /// With `--synthetic-mlp-density D`: instead of random lists made once, run predictors of
    /// this rank with RANDOM weights on the device in every step (predictor GEMMs and the
    /// `select_blocks` kernel inside the step), each 128-token group keeping D of its blocks.
    /// Measures what prediction and selection cost; the choices mean nothing.
    #[arg(long, requires = "synthetic_mlp_density")]
    mlp_predictor_rank: Option<usize>,
    /// Run every layer's attention on the block-sparse kernels over RANDOM masks keeping this
    /// share of the causal 128 x 128 blocks (diagonal and first block always): a synthetic
    /// predictor (labelled so in the output) that measures block-sparse attention inside the
    /// step. GPU only, flash attention.
    #[arg(long)]
    synthetic_attn_density: Option<f64>,
    /// Run each step's forward and backward as a CUDA graph: captured at the first step (a
    /// capture fails on any host synchronisation inside it), launched in one call at every
    /// later one. GPU only; LoRA (or no adapters) without dropout, no block-sparse attention.
    #[arg(long)]
    cuda_graph: bool,
    /// Data parallel over this many GPUs: one worker process per GPU (NCCL), each step one
    /// micro-batch of --batch x --seq per GPU, gradients all-reduced on the devices. The
    /// figures are the whole step's, with the all-reduce's time per step; rank 0 writes the
    /// outputs. Time the same command without it for the one-GPU baseline. Under torchrun
    /// (RANK, WORLD_SIZE, ... set) the world is the launcher's.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
}

/// The engine of the run, kept concrete for the GPU's memory figures (one value per run, so
/// its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Eng {
    Cpu(CpuEngine),
    Gpu(GpuEngine),
    /// A data-parallel rank: the GPU engine behind NCCL, and a handle on its device for the
    /// memory figures.
    Dp(DataParallel, CudaDevice),
}

impl Eng {
    fn engine(&mut self) -> &mut dyn Engine {
        match self {
            Eng::Cpu(e) => e,
            Eng::Gpu(e) => e,
            Eng::Dp(e, _) => e,
        }
    }

    fn device(&self) -> Option<&CudaDevice> {
        match self {
            Eng::Cpu(_) => None,
            Eng::Gpu(g) => Some(g.device()),
            Eng::Dp(_, d) => Some(d),
        }
    }
}

/// The model's config, and whether it comes from a checkpoint directory.
fn model_config(args: &StepArgs) -> Result<(OptConfig, Option<PathBuf>)> {
    let dir = Path::new(&args.model);
    if dir.join("config.json").exists() {
        if args.max_positions.is_some() {
            bail!("--max-positions applies to the random-weight presets, not to a checkpoint");
        }
        let config = OptConfig::from_file(dir.join("config.json"))
            .with_context(|| format!("reading {}/config.json", dir.display()))?;
        Ok((config, Some(dir.to_path_buf())))
    } else if let Some(mut config) = sb::preset_config(&args.model) {
        if let Some(p) = args.max_positions {
            if p == 0 {
                bail!("--max-positions must be positive");
            }
            config.max_position_embeddings = p;
        }
        Ok((config, None))
    } else {
        bail!(
            "--model {}: not a preset ({}) nor a directory with a config.json",
            args.model,
            sb::PRESETS.join(", ")
        )
    }
}

/// What the GPU engine cannot run in `c`, found from the config alone (before gigabytes of
/// weights are built); [`lexp_runtime::gpu::weights::check_supported`] checks the rest.
fn gpu_config_blocker(c: &OptConfig, name: &str) -> Option<String> {
    let why = if !c.do_layer_norm_before {
        "it is post-LN (do_layer_norm_before = false), which the GPU engine does not implement"
            .to_string()
    } else if c.has_projections() {
        format!(
            "it has project_in/project_out (word_embed_proj_dim {} != hidden_size {}), which \
             the GPU engine does not implement",
            c.word_embed_proj_dim, c.hidden_size
        )
    } else {
        return None;
    };
    Some(format!("the GPU engine cannot run {name}: {why}"))
}

/// The model and how its weights were made.
fn load_model(
    args: &StepArgs,
    config: OptConfig,
    dir: Option<&Path>,
) -> Result<(OptModel, String)> {
    let mut model = match dir {
        Some(dir) if !args.random_weights => {
            let m = OptModel::load(dir).with_context(|| format!("loading {}", dir.display()))?;
            (m, format!("checkpoint {}", dir.display()))
        }
        _ => {
            let weights = OptWeights::random(&config, args.seed, 0.02);
            let what = match dir {
                Some(d) => format!(
                    "random N(0, 0.02²), seed {}, config of {}",
                    args.seed,
                    d.display()
                ),
                None => format!("random N(0, 0.02²), seed {}", args.seed),
            };
            (OptModel { config, weights }, what)
        }
    };
    // Like the PyTorch baseline, the benchmark trains without dropout.
    model.0.config.dropout = 0.0;
    Ok(model)
}

fn make_engine(choice: DeviceChoice, model: OptModel, name: &str, ordinal: usize) -> Result<Eng> {
    let gpu_blocker = |m: &OptModel| {
        lexp_runtime::gpu::weights::check_supported(m)
            .err()
            .map(|e| format!("the GPU engine cannot run {name}: {e}"))
    };
    match choice {
        DeviceChoice::Cpu => Ok(Eng::Cpu(CpuEngine::new(model))),
        DeviceChoice::Cuda => {
            if let Some(why) = gpu_blocker(&model) {
                bail!("--device cuda: {why}");
            }
            let dev = CudaDevice::new(ordinal).context("--device cuda: no usable CUDA GPU")?;
            let gpu = GpuEngine::new(model, dev).map_err(|e| anyhow!("--device cuda: {e}"))?;
            Ok(Eng::Gpu(gpu))
        }
        DeviceChoice::Auto => {
            if let Some(why) = gpu_blocker(&model) {
                eprintln!("{why}; timing the CPU engine");
                return Ok(Eng::Cpu(CpuEngine::new(model)));
            }
            match CudaDevice::new(ordinal) {
                Err(e) => {
                    eprintln!("no usable GPU ({e}); timing the CPU engine");
                    Ok(Eng::Cpu(CpuEngine::new(model)))
                }
                Ok(dev) => {
                    // GpuEngine::new consumes the model; keep a copy for the CPU fallback
                    // only when the weights are small.
                    let small = model.config.num_parameters() < 50_000_000;
                    let backup = small.then(|| model.clone());
                    match GpuEngine::new(model, dev) {
                        Ok(g) => Ok(Eng::Gpu(g)),
                        Err(e) => match backup {
                            Some(m) => {
                                eprintln!("GPU engine: {e}; timing the CPU engine");
                                Ok(Eng::Cpu(CpuEngine::new(m)))
                            }
                            None => bail!("GPU engine: {e} (pass --device cpu to time the CPU)"),
                        },
                    }
                }
            }
        }
    }
}

/// The methods of `--peft` (LoRA's settings from `lora`, BitFit on every bias, ReLU Houlsby
/// adapters of `--adapter-bottleneck`).
fn peft_config(args: &StepArgs, lora: &LoraConfig) -> Result<PeftConfig> {
    let mut c = PeftConfig::default();
    for m in &args.peft {
        match m.trim() {
            "lora" => c.lora = Some(lora.clone()),
            "bitfit" => c.bitfit = Some(BitFitConfig::default()),
            "houlsby" => {
                c.houlsby = Some(HoulsbyConfig {
                    bottleneck: args.adapter_bottleneck,
                    ..HoulsbyConfig::default()
                })
            }
            other => bail!("unknown PEFT method `{other}` (lora, bitfit, houlsby)"),
        }
    }
    c.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(c)
}

fn lora_config(args: &StepArgs) -> Result<LoraConfig> {
    let targets = args
        .lora_targets
        .iter()
        .map(|t| {
            LoraTarget::from_name(t.trim()).with_context(|| {
                format!("unknown LoRA target `{t}` (q_proj,k_proj,v_proj,out_proj,fc1,fc2)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let c = LoraConfig {
        r: args.lora_r,
        alpha: args.lora_alpha,
        dropout: 0.0,
        targets,
        use_rslora: false,
    };
    c.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(c)
}

/// The CUDA driver API version (e.g. 13000), if the driver answers.
fn cuda_driver_version() -> Option<i32> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: called after a CUDA context exists (the driver library is loaded); writes one int.
    let r = unsafe { lexp_runtime::cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == lexp_runtime::cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
}

const MIB: f64 = (1u64 << 20) as f64;

/// Runs `lexp bench step`.
pub fn run(args: StepArgs) -> Result<()> {
    if args.iters == 0 || args.seq.is_empty() || args.seq.contains(&0) || args.batch == 0 {
        bail!("--iters, --batch and every --seq must be positive");
    }
    let world = World::from_env().context("reading the data-parallel environment")?;
    if args.gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    if args.gpus > 1 && !world.is_distributed() {
        return launch_workers(args.gpus);
    }
    if world.is_distributed() {
        if args.device == DeviceChoice::Cpu {
            bail!("a data-parallel bench runs on GPUs (NCCL): drop --device cpu");
        }
        if args.profile.is_some() || args.host_optimizer {
            bail!("--profile and --host-optimizer time one GPU: run them without --gpus");
        }
    }
    if args.compare.is_some() && args.baseline.is_none() {
        bail!("--compare needs --baseline");
    }
    let lora = lora_config(&args)?;
    let peft = peft_config(&args, &lora)?;
    let (config, dir) = model_config(&args)?;
    if let Some(&s) = args
        .seq
        .iter()
        .find(|&&s| s > config.max_position_embeddings)
    {
        bail!(
            "--seq {s} exceeds the model's {} positions",
            config.max_position_embeddings
        );
    }
    let mut device = args.device;
    if let Some(why) = gpu_config_blocker(&config, &args.model) {
        match device {
            DeviceChoice::Cuda => bail!("--device cuda: {why}"),
            DeviceChoice::Auto => {
                eprintln!("{why}; timing the CPU engine");
                device = DeviceChoice::Cpu;
            }
            DeviceChoice::Cpu => {}
        }
    }
    let t0 = Instant::now();
    let (model, weights_what) = load_model(&args, config, dir.as_deref())?;
    let build_s = t0.elapsed().as_secs_f64();
    let config = model.config.clone();
    if let Some(&s) = args
        .seq
        .iter()
        .find(|&&s| s > config.max_position_embeddings)
    {
        bail!(
            "--seq {s} exceeds the model's {} positions",
            config.max_position_embeddings
        );
    }
    let t0 = Instant::now();
    // A data-parallel rank joins its group (NCCL id from rank 0) before the engine is built.
    let (ordinal, comm) = if world.is_distributed() {
        launch::exit_with_launcher();
        let ordinal = world.gpu_ordinal(CudaDevice::count().unwrap_or(0));
        (ordinal, Some(join_nccl(&world, ordinal)?))
    } else {
        (0, None)
    };
    let mut eng = make_engine(device, model, &args.model, ordinal)?;
    if let (Eng::Gpu(g), Some(a)) = (&mut eng, args.attention) {
        g.set_attention(a)
            .map_err(|e| anyhow!("--attention: {e}"))?;
    }
    match (&mut eng, args.cuda_graph) {
        (Eng::Gpu(g), true) => g.set_cuda_graphs(true),
        (_, true) => bail!("--cuda-graph needs the GPU engine on one GPU"),
        _ => {}
    }
    let synthetic_mlp = args.synthetic_mlp_density.map(|density| SyntheticMlp {
        density,
        block: args.synthetic_mlp_block,
        seed: args.seed,
    });
    match (&mut eng, synthetic_mlp) {
        (Eng::Gpu(g), Some(s)) => match args.mlp_predictor_rank {
            None => g
                .set_synthetic_mlp(Some(s))
                .map_err(|e| anyhow!("--synthetic-mlp-density: {e}"))?,
            Some(rank) => {
                s.check(g.model().config.ffn_dim)
                    .map_err(|e| anyhow!("--synthetic-mlp-density: {e}"))?;
                let c = &g.model().config;
                let nb = c.ffn_dim / s.block;
                let max_blocks = ((s.density * nb as f64).round() as usize).clamp(1, nb);
                let p = MlpPredictors::random(
                    g.device(),
                    (c.num_hidden_layers, c.hidden_size),
                    rank,
                    (s.block, nb),
                    max_blocks,
                    s.seed,
                )
                .map_err(|e| anyhow!("--mlp-predictor-rank: {e}"))?;
                g.set_mlp_predictors(Some(p))
                    .map_err(|e| anyhow!("--mlp-predictor-rank: {e}"))?
            }
        },
        (Eng::Cpu(_), Some(_)) => bail!("--synthetic-mlp-density needs the GPU engine"),
        _ => {}
    }
    let synthetic_attn = args
        .synthetic_attn_density
        .map(|density| SyntheticAttention {
            density,
            seed: args.seed,
        });
    match (&mut eng, synthetic_attn) {
        (Eng::Gpu(g), Some(s)) => g
            .set_synthetic_attention(Some(s))
            .map_err(|e| anyhow!("--synthetic-attn-density: {e}"))?,
        (Eng::Cpu(_), Some(_)) => bail!("--synthetic-attn-density needs the GPU engine"),
        _ => {}
    }
    let attention = match &eng {
        Eng::Gpu(g) => Some(g.attention().name()),
        _ => None,
    };
    if let Some(comm) = comm {
        let Eng::Gpu(g) = eng else {
            bail!("a data-parallel bench needs the GPU engine (this rank got the CPU)");
        };
        let dev = CudaDevice::new(ordinal).context("opening the GPU for its memory figures")?;
        eng = Eng::Dp(DataParallel::new(Box::new(g), comm), dev);
    }
    let engine_s = t0.elapsed().as_secs_f64();
    let device_name = eng.engine().name();
    let (device_json, used_before) = match eng.device() {
        Some(dev) => {
            let (free, total) = dev.mem_info().context("querying GPU memory")?;
            let blas = lexp_runtime::cublas::Blas::new(dev)
                .ok()
                .map(|b| b.version());
            let (major, minor) = dev.compute_capability();
            let j = serde_json::json!({
                "kind": "cuda", "name": dev.name(), "compute_capability": format!("{major}.{minor}"),
                "cuda_driver_api": cuda_driver_version(), "cublas": blas,
                "kernel_code": dev.module_code(),
                "memory_mib": total as f64 / MIB, "attention": attention,
                "gpus": world.world_size, "nccl": comm_version(&world),
            });
            (j, Some((total - free) as f64 / MIB))
        }
        None => (
            serde_json::json!({"kind": "cpu", "name": device_name, "threads": rayon::current_num_threads()}),
            None,
        ),
    };
    let code = eng
        .device()
        .map_or(String::new(), |d| format!(" ({})", d.module_code()));
    eprintln!(
        "{}: {} parameters ({weights_what}; built in {build_s:.1} s), engine ready in {engine_s:.1} s on {device_name}{code}",
        args.model,
        config.num_parameters()
    );
    let settings = StepSettings {
        warmup: args.warmup,
        iters: args.iters,
        host_optimizer: args.host_optimizer,
        ..StepSettings::default()
    };
    let mut results: Vec<WorkloadResult> = Vec::new();
    let mut profiles = Vec::new();
    if args.profile.is_some() && !matches!(eng, Eng::Gpu(_)) {
        eprintln!("--profile: the CPU engine has no launch profiler; no profile is written");
    }
    let data = match &args.data {
        Some(path) => Some(load_data(path, &config)?),
        None => None,
    };
    for (i, &seq) in args.seq.iter().enumerate() {
        let nseq = args.tokens.map_or(args.batch, |n| (n / seq).max(1));
        // One micro-batch per rank; micro-batch 0 is the one-GPU workload's batch.
        let batches: Vec<_> = match &data {
            Some(d) => packed_batches(d, nseq * seq, world.world_size, args.seed)?,
            None => (0..world.world_size)
                .map(|m| {
                    let seed = args.seed + 1 + i as u64 + DP_SEED_STRIDE * m as u64;
                    sb::random_batch(nseq, seq, config.vocab_size, seed)
                })
                .collect(),
        };
        let batch = &batches[0];
        let mut r = sb::time_global_steps(
            eng.engine(),
            &peft,
            &batches,
            world.world_size,
            &settings,
            args.seed,
        )
        .with_context(|| format!("workload {nseq}x{seq}"))?;
        if data.is_some() {
            r.name = format!("{nseq}x{seq} packed");
            r.seq = seq;
        }
        if let Some(dev) = eng.device() {
            let (free, total) = dev.mem_info().context("querying GPU memory")?;
            r.device_used_mib = Some((total - free) as f64 / MIB);
        }
        if let Eng::Gpu(g) = &eng {
            r.workspace_mib = Some(g.workspace_bytes() as f64 / MIB);
        }
        eprintln!(
            "{}: median {:.2} ms ({:.0} tokens/s, {:.3} TFLOP/s){}",
            r.name,
            r.step.median_ms,
            r.tokens_per_s,
            r.tflops,
            r.comm.as_ref().map_or(String::new(), |c| format!(
                "; collectives {:.3} ms per step ({:.2}%)",
                c.median_ms,
                100.0 * c.median_ms / r.step.median_ms
            ))
        );
        if let (true, Eng::Gpu(g)) = (args.cuda_graph, &eng) {
            let (captures, launches) = g.graph_stats();
            eprintln!(
                "{}: CUDA graphs captured so far {captures}; the current one launched {launches} times",
                r.name
            );
            if launches == 0 {
                bail!(
                    "--cuda-graph: workload {} did not run as a CUDA graph",
                    r.name
                );
            }
        }
        if let (Some(_), Eng::Gpu(g)) = (&args.profile, &mut eng) {
            let p = bench_profile::profile_step(g, &peft, batch, args.seed)
                .with_context(|| format!("profiling workload {}", r.name))?;
            bench_profile::print_profile(&r.name, &p);
            profiles.push((r.name.clone(), p));
        }
        results.push(r);
    }
    let baseline: Vec<BaselineRun> = match &args.baseline {
        Some(p) => sb::read_baseline(p)?,
        None => Vec::new(),
    };
    let comparison = sb::compare(&results, &baseline);
    if !world.is_writer() {
        return Ok(()); // rank 0 reports the (identical) step for every rank
    }
    print_table(&results, args.baseline.is_some().then_some(&comparison[..]));

    let commit = args
        .commit
        .clone()
        .or_else(|| option_env!("LEXP_GIT_COMMIT").map(str::to_string));
    let lora_json = serde_json::json!({
        "methods": peft.describe(),
        "r": lora.r, "alpha": lora.alpha,
        "targets": lora.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "adapter_bottleneck": peft.houlsby.as_ref().map(|h| h.bottleneck),
    });
    let mlp_json = synthetic_mlp.map(|s| match args.mlp_predictor_rank {
        None => serde_json::json!({
            "mlp": "SYNTHETIC predictor: random block lists (not a model's), block-sparse MLP kernels",
            "density": s.density, "block": s.block, "group_rows": 128, "seed": s.seed,
        }),
        Some(rank) => serde_json::json!({
            "mlp": "device predictors with RANDOM weights run in every step (their cost is real, their choices mean nothing), block-sparse MLP kernels",
            "density": s.density, "block": s.block, "group_rows": 128, "seed": s.seed,
            "predictor_rank": rank,
        }),
    });
    let attn_json = synthetic_attn.map(|s| {
        let got = match &eng {
            Eng::Gpu(g) => g.attn_lists().map(|l| l.density()),
            Eng::Cpu(_) | Eng::Dp(..) => None,
        };
        serde_json::json!({
            "attention": "SYNTHETIC predictor: random block masks (not a model's), block-sparse flash attention kernels, 128x128 blocks, diagonal and first block always kept",
            "target_density": s.density, "density_last_batch": got, "seed": s.seed,
        })
    });
    let methods = match (&peft.lora, peft.describe()) {
        (Some(l), m) if m == "lora" => {
            format!("LoRA step (r={} on {})", l.r, args.lora_targets.join(","))
        }
        (_, m) => format!("{m} step"),
    };
    let title = format!(
        "{} {}{}{}, {}",
        args.model,
        methods,
        synthetic_mlp.map_or(String::new(), |s| format!(
            ", MLP at {:.0}% blocks ({})",
            100.0 * s.density,
            match args.mlp_predictor_rank {
                None => "synthetic lists".to_string(),
                Some(r) => format!("random rank-{r} predictors on the device"),
            }
        )),
        synthetic_attn.map_or(String::new(), |s| format!(
            ", attention at {:.0}% blocks (synthetic masks)",
            100.0 * s.density
        )),
        if world.is_distributed() {
            format!("{} x {}", world.world_size, device_name)
        } else {
            device_name.clone()
        }
    );
    if let Some(p) = &args.json {
        let j = serde_json::json!({
            "what": "lexp bench step: one LoRA optimizer step as lexp finetune runs it (Engine::optimizer_step: loss and LoRA gradients, gradient clipping, AdamW — on the device for the GPU engine unless settings.host_optimizer), whole steps timed (each ends synchronised: the loss, the gradient norm and the updated adapter are read back), warm-up excluded",
            "date": sb::today(),
            "lexp_version": env!("CARGO_PKG_VERSION"),
            "lexp_commit": commit,
            "device": device_json,
            "model": {
                "name": args.model, "weights": weights_what, "parameters": config.num_parameters(),
                "hidden": config.hidden_size, "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads, "ffn": config.ffn_dim,
                "vocab": config.vocab_size, "positions": config.max_position_embeddings,
                "pre_ln": config.do_layer_norm_before,
            },
            "lora": lora_json,
            "exposure": mlp_json,
            "attention_exposure": attn_json,
            "cuda_graph": args.cuda_graph,
            "settings": settings,
            "flop_formula": "forward 2T·n(4H²+2HF) + head 2T·E·V + causal attention n·Σ 2H·L(L+1); backward = input-gradient GEMMs (linear + head + 2× attention); LoRA 6T·r·(in+out) per module and layer; elementwise ops not counted",
            "host_build_s": build_s,
            "engine_setup_s": engine_s,
            "device_used_before_mib": used_before,
            "workloads": results,
            "baseline": args.baseline.as_ref().map(|p| p.display().to_string()),
            "comparison": if args.baseline.is_some() { serde_json::to_value(&comparison)? } else { serde_json::Value::Null },
        });
        write_json(p, &j)?;
    }
    if let Some(p) = &args.compare {
        let j = serde_json::json!({
            "date": sb::today(), "model": args.model, "lora": lora_json,
            "lexp_device": device_name, "lexp_commit": commit,
            "note": "speedup = torch median step / lexp median step (above 1: lexp is faster)",
            "workloads": comparison,
        });
        write_json(p, &j)?;
    }
    if let (Some(p), false) = (&args.profile, profiles.is_empty()) {
        let run = serde_json::json!({
            "date": sb::today(), "model": args.model, "lora": lora_json, "device": device_json,
            "lexp_commit": commit,
        });
        bench_profile::write_profiles(p, run, &profiles)?;
    }
    if let Some(p) = &args.png {
        plot(&results, &baseline, &title, p)
            .map_err(|e| anyhow!("drawing {}: {e}", p.display()))?;
    }
    Ok(())
}

/// `--gpus N`: starts N workers of this same command (without `--gpus`) with torchrun's
/// variables, one GPU each, and fails naming the first worker that failed.
fn launch_workers(n: usize) -> Result<()> {
    let program = std::env::current_exe().context("cannot find the lexp executable")?;
    let all: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let spec = launch::LaunchSpec {
        program,
        args: launch::strip_flags(&all, &["--gpus"]),
        workers: n,
        gpus: true,
        grace: std::time::Duration::from_secs(5),
    };
    eprintln!("launching {n} benchmark workers, one per GPU (rank 0's output follows)");
    let never = std::sync::atomic::AtomicBool::new(false);
    match launch::launch(&spec, &never)? {
        Ok(()) => Ok(()),
        Err(f) => bail!("lexp bench step --gpus {n}: {}", f.message),
    }
}

/// Joins the NCCL communicator of a data-parallel rank on GPU `ordinal` (rank 0 makes the id
/// and hands it over in the rendezvous).
fn join_nccl(world: &World, ordinal: usize) -> Result<Box<dyn dist::Communicator>> {
    let blob = if world.rank == 0 {
        dist::nccl::unique_id_blob().context("creating the NCCL id")?
    } else {
        Vec::new()
    };
    let (group, blob) =
        dist::rendezvous::rendezvous(world, None, &blob, &RendezvousConfig::from_env())
            .context("joining the data-parallel group")?;
    let comm = NcclComm::new(group, &blob, ordinal).context("joining the NCCL communicator")?;
    Ok(Box::new(comm))
}

/// NCCL's version (`2.28.9`) in a data-parallel run.
fn comm_version(world: &World) -> Option<String> {
    world.is_distributed().then(dist::nccl::version).flatten()
}

fn write_json(p: &Path, j: &serde_json::Value) -> Result<()> {
    std::fs::write(p, serde_json::to_string_pretty(j)? + "\n")
        .with_context(|| format!("writing {}", p.display()))
}

fn print_table(results: &[WorkloadResult], comparison: Option<&[Comparison]>) {
    println!(
        "{:<10} {:>7} {:>10} {:>9} {:>9} {:>10} {:>8} {:>15} {:>9} {:>9}",
        "workload",
        "tokens",
        "median ms",
        "min",
        "max",
        "tokens/s",
        "TFLOP/s",
        "loss",
        "used MiB",
        "ws MiB"
    );
    let mib = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
    for r in results {
        println!(
            "{:<10} {:>7} {:>10.2} {:>9.2} {:>9.2} {:>10.0} {:>8.3} {:>15} {:>9} {:>9}",
            r.name,
            r.tokens,
            r.step.median_ms,
            r.step.min_ms,
            r.step.max_ms,
            r.tokens_per_s,
            r.tflops,
            format!("{:.3}->{:.3}", r.loss_first, r.loss_last),
            mib(r.device_used_mib),
            mib(r.workspace_mib)
        );
    }
    if let Some(c) = comparison {
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        let ratio = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}x"));
        println!(
            "\n{:<10} {:>9} {:>10} {:>10} {:>9} {:>9}",
            "workload", "lexp ms", "torch sdpa", "torch eager", "vs sdpa", "vs eager"
        );
        for c in c {
            println!(
                "{:<10} {:>9.2} {:>10} {:>10} {:>9} {:>9}",
                c.workload,
                c.lexp_ms,
                ms(c.torch_sdpa_ms),
                ms(c.torch_eager_ms),
                ratio(c.speedup_vs_sdpa),
                ratio(c.speedup_vs_eager)
            );
        }
    }
}

/// Grouped bars of median step time per workload: lexp, and PyTorch + PEFT (SDPA, eager) when
/// the baseline has the workload; each bar labelled with its milliseconds.
fn plot(
    results: &[WorkloadResult],
    baseline: &[BaselineRun],
    title: &str,
    path: &Path,
) -> Result<(), String> {
    lexp_runtime::train::plot::register_font();
    let series: [(&str, RGBColor); 3] = [
        ("lexp", RGBColor(31, 119, 180)),
        ("torch+PEFT sdpa", RGBColor(255, 127, 14)),
        ("torch+PEFT eager", RGBColor(150, 150, 150)),
    ];
    // bars[w][s]: the median of series s on workload w.
    let bars: Vec<[Option<f64>; 3]> = results
        .iter()
        .map(|r| {
            let find = |attn: &str| {
                baseline
                    .iter()
                    .find(|b| b.batch == r.batch && b.seq == r.seq && b.attn == attn)
                    .map(|b| b.median_step_ms)
            };
            [Some(r.step.median_ms), find("sdpa"), find("eager")]
        })
        .collect();
    let present: Vec<usize> = (0..3)
        .filter(|&s| bars.iter().any(|b| b[s].is_some()))
        .collect();
    let y_max = bars
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b))
        .max(1e-3)
        * 1.2;
    let n = results.len().max(1) as f64;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..y_max)
        .map_err(e)?;
    let names: Vec<String> = results.iter().map(|r| r.name.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(results.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("workload (sequences x tokens)")
        .y_desc("median step time (ms)")
        .draw()
        .map_err(e)?;
    let width = 0.8 / present.len() as f64;
    for (k, &s) in present.iter().enumerate() {
        let (label, color) = series[s];
        let rects: Vec<(f64, f64)> = bars
            .iter()
            .enumerate()
            .filter_map(|(w, b)| b[s].map(|ms| (w as f64 - 0.4 + k as f64 * width, ms)))
            .collect();
        chart
            .draw_series(rects.iter().map(|&(x0, ms)| {
                Rectangle::new([(x0 + 0.01, 0.0), (x0 + width - 0.01, ms)], color.filled())
            }))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
        chart
            .draw_series(rects.iter().map(|&(x0, ms)| {
                Text::new(
                    format!("{ms:.1}"),
                    (x0 + 0.02, ms + y_max * 0.04),
                    ("sans-serif", 14),
                )
            }))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// `--data`: the pre-tokenized file's examples (ids checked against the model's vocabulary).
fn load_data(path: &Path, config: &OptConfig) -> Result<Vec<Example>> {
    let options = JsonlOptions {
        max_len: config.max_position_embeddings,
        vocab_size: Some(config.vocab_size),
        ..JsonlOptions::default()
    };
    let d =
        load_jsonl(path, None, &options).with_context(|| format!("--data {}", path.display()))?;
    if d.examples.is_empty() {
        bail!("--data {}: no examples", path.display());
    }
    Ok(d.examples)
}

/// `ranks` packed batches of whole examples (shuffled by `seed`), each filling at most
/// `budget` tokens: rank `m` takes the `m`-th.
fn packed_batches(
    examples: &[Example],
    budget: usize,
    ranks: usize,
    seed: u64,
) -> Result<Vec<PackedBatch>> {
    let all: Vec<usize> = (0..examples.len()).collect();
    let batches = pack(examples, &epoch_order(&all, seed, 0), budget)
        .with_context(|| format!("packing --data into {budget} tokens"))?;
    // The last batch of an epoch can be short: each rank takes one of the ones before it.
    if batches.len() <= ranks {
        bail!(
            "--data packs into {} batch(es) of at most {budget} tokens (the last one short); \
             {ranks} rank(s) need {ranks} full one(s): use more data or a smaller budget",
            batches.len()
        );
    }
    Ok(batches.into_iter().take(ranks).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OptConfig {
        OptConfig::from_json(
            r#"{"model_type":"opt","vocab_size":50,"hidden_size":8,"ffn_dim":16,
                "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":64}"#,
            Path::new("t/config.json"),
        )
        .unwrap()
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lexp-bench-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn data_is_packed_whole_into_the_budget_with_loss_on_the_completion() {
        let lines: String = (0..40)
            .map(|i| {
                format!(
                    "{{\"context\": [5, {}, 2], \"completion\": [7, 8, 9, 2]}}\n",
                    i % 40
                )
            })
            .collect();
        let examples = load_data(&write("ok.jsonl", &lines), &config()).unwrap();
        assert_eq!(examples.len(), 40);
        let batches = packed_batches(&examples, 64, 2, 3).unwrap();
        assert_eq!(batches.len(), 2);
        for b in &batches {
            // Nine whole 7-token examples fill 63 of the 64 tokens; positions restart.
            assert_eq!((b.num_sequences(), b.num_tokens()), (9, 63));
            assert_eq!(&b.position_ids[..8], &[0, 1, 2, 3, 4, 5, 6, 0]);
            // Targets on the completion only: 4 per example.
            assert_eq!(b.num_targets(), 9 * 4);
        }
        // Too little data for the ranks: refused with the numbers.
        let err = packed_batches(&examples[..9], 64, 1, 3).unwrap_err();
        assert!(
            format!("{err:#}").contains("1 rank(s) need 1 full one(s)"),
            "{err:#}"
        );
    }

    #[test]
    fn data_outside_the_vocabulary_names_file_and_line() {
        let path = write(
            "bad.jsonl",
            "{\"context\": [1], \"completion\": [2]}\n{\"context\": [60], \"completion\": [2]}\n",
        );
        let err = format!("{:#}", load_data(&path, &config()).unwrap_err());
        assert!(
            err.contains("bad.jsonl:2") && err.contains("token id 60"),
            "{err}"
        );
    }
}
