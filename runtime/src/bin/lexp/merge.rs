//! `lexp merge`: a trained adapter directory (LoRA in PEFT format and/or BitFit biases) folded
//! into its base OPT checkpoint ([`lexp_runtime::peft::merge`]).

use anyhow::{Context, Result};
use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::peft::{merge, PeftParams};
use std::path::PathBuf;

/// Options of `lexp merge`.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base Hugging Face OPT checkpoint directory the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// The adapter directory (`lexp finetune`'s `adapter/`, or a PEFT LoRA adapter).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory for the merged checkpoint (new or empty).
    #[arg(long, short)]
    output: PathBuf,
}

/// Loads the base and the adapter, merges, and says what changed.
pub fn run(args: MergeArgs) -> Result<()> {
    let model = OptModel::load(&args.model)
        .with_context(|| format!("loading the model {}", args.model.display()))?;
    let params = PeftParams::load(&args.adapter, &model)
        .with_context(|| format!("loading the adapter {}", args.adapter.display()))?;
    let report = merge::merge(&args.model, &model, &params, &args.output)
        .with_context(|| format!("merging into {}", args.output.display()))?;
    println!(
        "{}: {} tensors ({} weights with LoRA folded in, {} biases from BitFit); copied {}",
        args.output.display(),
        report.tensors,
        report.lora_weights,
        report.biases,
        report.copied_files.join(", ")
    );
    Ok(())
}
