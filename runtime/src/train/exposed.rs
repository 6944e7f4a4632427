//! Setting up a run with exposure (`lexp finetune --exposure mlp|attention`, DESIGN.md §7):
//! load the model, give the exposer its chance to restructure it ([`expose_structure`], MLP
//! only), train the block predictors offline on dense forwards of the run's first training
//! batches, and hand back the CPU engine that trains with the sparse hook and probes with the
//! guard.

use super::config::{ExposureMode, TrainConfig};
use super::engine::{CpuEngine, CpuExposure};
use super::plan::StepPlan;
use super::trainer::load_data;
use super::TrainError;
use crate::checkpoint::OptModel;
use crate::data::PackedBatch;
use crate::exposure::attention::{corpus, sparse::SparseAttention};
use crate::exposure::permutation::{self, NeuronPermutation, PermutationError};
use crate::exposure::sparse_mlp::{self, SparseMlp};

/// The exposer's step (DESIGN.md §7, MLP step 2): with `permute` on, the co-activation neuron
/// permutation of each layer, measured on `batches`' dense forwards
/// ([`permutation::expose_model`]) and applied to `model` (function-preserving). Returns it
/// for the engine, which keeps adapters in the original order at its boundary.
pub fn expose_structure(
    model: &mut OptModel,
    config: &TrainConfig,
    batches: &[PackedBatch],
) -> Result<Option<NeuronPermutation>, TrainError> {
    let e = &config.exposure;
    if !e.permute {
        return Ok(None);
    }
    let perm_err = |err: PermutationError| TrainError::Config(format!("neuron permutation: {err}"));
    let t0 = std::time::Instant::now();
    let perm =
        permutation::expose_model(model, batches, e.mlp_block, config.seed).map_err(perm_err)?;
    perm.apply_to_model(model).map_err(perm_err)?;
    tracing::info!(
        "MLP neurons clustered by co-activation over {} batches in {:.1} s",
        batches.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Some(perm))
}

/// The micro-batches of the run's first optimizer steps (in training order), at most `n`:
/// the batches whose dense forwards label the offline predictor training.
pub fn predictor_batches(
    config: &TrainConfig,
    model: &OptModel,
    n: usize,
) -> Result<Vec<PackedBatch>, TrainError> {
    let data = load_data(config, model)?;
    let plan = StepPlan::new(
        (0..data.train.len()).collect(),
        config.seed,
        config.examples_per_step,
        config.micro_batch_tokens,
        config.epochs.max(1),
        0,
    );
    let mut out = Vec::with_capacity(n);
    for step in 0..plan.total_steps() {
        if out.len() >= n {
            break;
        }
        out.extend(plan.step_batches(&data.train, step)?);
    }
    out.truncate(n);
    Ok(out)
}

/// The CPU engine of `config`: plain with `--exposure none`; with `--exposure mlp` the model
/// goes through [`expose_structure`], the predictors are trained offline
/// ([`sparse_mlp::train_offline`], `progress(done, total)` after each dense forward and the
/// fit), and the engine trains sparse with the guard's probes; `--exposure attention` is
/// [`attention_engine`].
pub fn cpu_engine_exposed(
    config: &TrainConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CpuEngine, TrainError> {
    let mut model = config.load_model()?;
    let e = &config.exposure;
    if e.mode == ExposureMode::None {
        return Ok(CpuEngine::new(model));
    }
    e.validate().map_err(TrainError::Config)?;
    if e.mode == ExposureMode::Attention {
        return attention_engine(config, model, progress);
    }
    // The hook first: it checks the block and group sizes against the model by flag name.
    let hook = SparseMlp::new(&model.config, e.sparse_mlp(), config.seed)
        .map_err(|err| TrainError::Config(err.to_string()))?;
    let batches = predictor_batches(config, &model, e.predictor_batches.max(1))?;
    let permutation = expose_structure(&mut model, config, &batches)?;
    let t0 = std::time::Instant::now();
    let losses = sparse_mlp::train_offline(
        &model,
        &hook,
        &batches,
        e.predictor_steps,
        config.seed,
        progress,
    )?;
    tracing::info!(
        "predictors trained on {} dense batches in {:.1} s (final losses {losses:?})",
        batches.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(CpuEngine::with_exposure(
        model,
        CpuExposure {
            hook: Some(hook),
            attention: None,
            guard: e.guard(),
            permutation,
        },
    ))
}

/// The CPU engine with attention exposure: a [`SparseAttention`] hook for `model`, its key-block
/// predictors trained offline ([`corpus::train_offline`]) on dense forwards of the run's first
/// `predictor_batches` micro-batches (`progress(done, total)` after each and the fit), dense
/// MLPs, the guard's probes. The model is not restructured (attention exposure keeps the
/// weights as they are).
pub fn attention_engine(
    config: &TrainConfig,
    model: OptModel,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CpuEngine, TrainError> {
    let e = &config.exposure;
    let c = &model.config;
    let hook = SparseAttention::new(
        c.num_hidden_layers,
        c.num_attention_heads,
        c.head_dim(),
        e.attention.sparse_attention(),
        config.seed,
    )
    .map_err(|err| TrainError::Config(err.to_string()))?;
    let batches = predictor_batches(config, &model, e.predictor_batches.max(1))?;
    let total = batches.len() + 1;
    let mut done = 0;
    let t0 = std::time::Instant::now();
    let losses = corpus::train_offline(
        &model,
        &hook,
        &batches,
        e.predictor_steps,
        config.seed,
        &mut || {
            done += 1;
            progress(done, total);
        },
    )
    .map_err(|err| match err {
        corpus::CorpusError::Model(m) => TrainError::Forward(m),
        corpus::CorpusError::Data(d) => TrainError::Data(d),
        other => TrainError::Config(format!("attention predictors: {other}")),
    })?;
    progress(total, total);
    tracing::info!(
        "attention predictors trained on {} dense batches in {:.1} s (final losses {losses:?})",
        batches.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(CpuEngine::with_exposure(
        model,
        CpuExposure {
            hook: None,
            attention: Some(hook),
            guard: e.guard(),
            permutation: None,
        },
    ))
}
