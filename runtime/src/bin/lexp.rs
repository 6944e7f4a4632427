//! The `lexp` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lexp_compiler::dtype::Storage;
use lexp_runtime::kernel_check;
use lexp_runtime::CudaDevice;
use std::io::Write;

#[path = "lexp/bench_attention.rs"]
mod bench_attention;
#[path = "lexp/bench_mlp.rs"]
mod bench_mlp;
#[path = "lexp/bench_profile.rs"]
mod bench_profile;
#[path = "lexp/bench_scaling.rs"]
mod bench_scaling;
#[path = "lexp/bench_step.rs"]
mod bench_step;
#[path = "lexp/finetune.rs"]
mod finetune;
#[path = "lexp/matmul.rs"]
mod matmul;
#[path = "lexp/merge.rs"]
mod merge;
#[path = "lexp/profile.rs"]
mod profile;

#[derive(Parser)]
#[command(
    name = "lexp",
    version,
    about = "Long Exposure: sparse parameter-efficient fine-tuning on NVIDIA GPUs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Parameter-efficient fine-tuning (LoRA, BitFit, Houlsby adapters) of a Hugging Face OPT
    /// checkpoint on JSONL data. With no arguments: LoRA on the bundled opt-tiny model and the
    /// bundled E2E slice.
    Finetune(finetune::FinetuneArgs),
    /// Loss and perplexity of a model (+ a trained adapter directory) on a JSONL file.
    Eval(finetune::EvalArgs),
    /// Fold a trained adapter (LoRA and/or BitFit) into its base checkpoint: a plain Hugging
    /// Face checkpoint transformers loads without PEFT.
    Merge(merge::MergeArgs),
    /// MLP activation sparsity of an OPT model at block granularities, in natural neuron order
    /// and after the co-activation clustering (JSON + plots). With no arguments: opt-mini on
    /// `../shared/data/corpus/valid.txt`.
    Profile(profile::ProfileArgs),
    /// List the DSL kernels, or dump one variant's IR stages or PTX.
    Kernels {
        /// Kernel to show (omit to list all).
        name: Option<String>,
        /// Variant symbol (default: the first, bf16 aligned).
        #[arg(long)]
        variant: Option<String>,
        /// What to dump: parsed, canonical, layouts, smem, ptx.
        #[arg(long, default_value = "canonical")]
        stage: String,
        /// PTX target for `--stage ptx`: sm_80 or sm_90.
        #[arg(long, default_value = "sm_90")]
        arch: String,
    },
    /// Run every kernel against the CPU reference (random data, poisoned outputs): on the GPU
    /// if one is present, else in the interpreter on the CPU.
    Check {
        /// Only this kernel.
        #[arg(long)]
        kernel: Option<String>,
        /// Use the interpreter even if a GPU is present.
        #[arg(long)]
        cpu: bool,
        /// Write the table as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Tensor-core kernels: correctness against the CPU reference, then speed against cuBLAS
    /// measured in the same run (dense GEMM, block-sparse GEMM vs density, fused LoRA).
    Matmul {
        /// Timed iterations (median reported).
        #[arg(long, default_value_t = 50)]
        iters: usize,
        /// Skip the correctness checks.
        #[arg(long)]
        no_check: bool,
        /// Only these parts, comma-separated: gemm, sparse, lora (default: all).
        #[arg(long, default_value = "gemm,sparse,lora")]
        only: String,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Achieved bandwidth of every kernel against a device-to-device copy in the same run.
    Kernels {
        /// Element types, comma-separated.
        #[arg(long, default_value = "bf16")]
        dtypes: String,
        /// Timed iterations (median reported).
        #[arg(long, default_value_t = 50)]
        iters: usize,
        /// Only this kernel.
        #[arg(long)]
        kernel: Option<String>,
        /// Write the table as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// The dense LoRA training step (loss and gradients, clipping, AdamW) of an OPT preset or
    /// checkpoint: median step time, tokens/s, TFLOP/s, memory; compared with the PyTorch +
    /// PEFT baseline JSON (`bench/torch_baseline.py`) when given.
    Step(bench_step::StepArgs),
    /// Dense flash attention alone (forward, forward + backward) at long sequences, in the
    /// engine's tile configurations; compared with PyTorch SDPA's times from
    /// `bench/attention_baseline.py` when given.
    Attention(bench_attention::AttentionArgs),
    /// The sparse MLP's four products (fc1/fc2 forward, both input gradients) over random
    /// block lists at several densities, against the same four dense cuBLAS GEMMs in the same
    /// run (OPT-1.3B shapes by default); JSON and a plot with `--json`.
    Mlp(bench_mlp::MlpArgs),
    /// Data-parallel scaling from `lexp bench step` JSON files of one session (one GPU, and
    /// `--gpus N`): speedup, efficiency and the all-reduce's share per GPU count; table, JSON,
    /// PNG.
    Scaling(bench_scaling::ScalingArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Library warnings and errors on stderr; RUST_LOG=debug (etc.) shows more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match cli.cmd {
        Cmd::Finetune(args) => finetune::finetune(args),
        Cmd::Eval(args) => finetune::eval(args),
        Cmd::Merge(args) => merge::run(args),
        Cmd::Profile(args) => profile::run(args),
        Cmd::Kernels { name: None, .. } => list_kernels(),
        Cmd::Kernels {
            name: Some(n),
            variant,
            stage,
            arch,
        } => show_kernel(&n, variant.as_deref(), &stage, &arch),
        Cmd::Check { kernel, json, cpu } => check(kernel.as_deref(), json, cpu),
        Cmd::Bench {
            what:
                BenchCmd::Kernels {
                    dtypes,
                    iters,
                    kernel,
                    json,
                },
        } => bench(&dtypes, iters, kernel.as_deref(), json),
        Cmd::Bench {
            what:
                BenchCmd::Matmul {
                    iters,
                    no_check,
                    only,
                    json,
                },
        } => matmul::run(&device()?, iters, !no_check, &only, json),
        Cmd::Bench {
            what: BenchCmd::Step(args),
        } => bench_step::run(args),
        Cmd::Bench {
            what: BenchCmd::Attention(args),
        } => bench_attention::run(args),
        Cmd::Bench {
            what: BenchCmd::Mlp(args),
        } => bench_mlp::run(args),
        Cmd::Bench {
            what: BenchCmd::Scaling(args),
        } => bench_scaling::run(args),
    }
}

fn list_kernels() -> Result<()> {
    println!("{:<22} {:>8}  what", "kernel", "variants");
    for k in lexp_kernels::ALL {
        println!("{:<22} {:>8}  {}", k.name, k.variants.len(), k.doc);
    }
    println!("\n`lexp kernels NAME --stage parsed|canonical|layouts|smem|ptx [--variant SYMBOL] [--arch sm_80|sm_90]` dumps one.");
    Ok(())
}

fn show_kernel(name: &str, variant: Option<&str>, stage: &str, arch: &str) -> Result<()> {
    let Some(k) = lexp_kernels::find(name) else {
        let names: Vec<&str> = lexp_kernels::ALL.iter().map(|k| k.name).collect();
        bail!("no kernel `{name}`; kernels: {}", names.join(", "));
    };
    let v = match variant {
        Some(s) => k.variants.iter().find(|v| v.symbol == s).with_context(|| {
            let syms: Vec<&str> = k.variants.iter().map(|v| v.symbol).collect();
            format!(
                "kernel `{name}` has no variant `{s}`; variants: {}",
                syms.join(", ")
            )
        })?,
        None => k.variants.first().context("kernel without variants")?,
    };
    let out = match stage {
        "ptx" => match arch {
            "sm_80" => v.ptx_sm80.to_string(),
            "sm_90" => v.ptx_sm90.to_string(),
            other => bail!("unknown arch `{other}` (sm_80 or sm_90)"),
        },
        "parsed" | "canonical" | "layouts" | "smem" => {
            let k = lexp_compiler::ir::parser::parse(v.ir).map_err(|e| anyhow::anyhow!("{}: {e}", v.symbol))?;
            let c = lexp_compiler::passes::compile(k, &lexp_compiler::target::SM90).map_err(|e| anyhow::anyhow!("{}: {e}", v.symbol))?;
            c.stages.iter().find(|(n, _)| *n == stage).map(|(_, s)| s.clone()).unwrap_or_default()
        }
        other => bail!("unknown stage `{other}`: parsed, canonical, layouts, smem or ptx (LLVM IR is in the snapshots under tests/)"),
    };
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// `v` as a JSON number, or `null` when it is NaN or infinite (a failed check's distance is
/// often NaN, which JSON cannot hold).
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:e}")
    } else {
        "null".into()
    }
}

fn device() -> Result<CudaDevice> {
    CudaDevice::new(0).context("no usable CUDA GPU (the kernel checks and benchmarks need one)")
}

fn check(kernel: Option<&str>, json: Option<std::path::PathBuf>, cpu: bool) -> Result<()> {
    let gpu = if cpu {
        None
    } else {
        CudaDevice::new(0)
            .map_err(|e| eprintln!("no usable GPU ({e}); checking in the interpreter on the CPU"))
            .ok()
    };
    let (device, rows) = match &gpu {
        Some(dev) => {
            let (major, minor) = dev.compute_capability();
            eprintln!("device: {} (sm_{major}{minor})", dev.name());
            let mut rows = kernel_check::check_all(dev, kernel)?;
            // The tensor-core kernels (GEMM, block-sparse, LoRA) have their own checker.
            let tc = |k: &str| kernel.is_none_or(|only| only == k || (only == "matmul"));
            let mut mat = vec![];
            if tc("gemm_nn") || tc("gemm_nt") || tc("gemm_tn") {
                mat.extend(lexp_runtime::matmul_check::check_gemm(dev)?);
            }
            if tc("sparse_out") || tc("sparse_red") || tc("sparse_both") {
                mat.extend(lexp_runtime::matmul_check::check_sparse(dev)?);
            }
            if tc("sparse_fc1_fwd")
                || tc("sparse_fc2_fwd")
                || tc("sparse_fc2_dh")
                || tc("sparse_fc1_dx")
                || tc("sparse_colsum")
            {
                mat.extend(lexp_runtime::matmul_check::check_sparse_mlp(dev)?);
            }
            if tc("select_blocks") {
                mat.extend(lexp_runtime::matmul_check::check_select(dev)?);
            }
            if tc("lora_fwd") || tc("lora_bwd_dx") || tc("lora_grad") {
                mat.extend(lexp_runtime::matmul_check::check_lora(dev)?);
            }
            if [
                "lora_down",
                "lora_expand",
                "transpose_b",
                "lora_fold",
                "lora_wgrad",
                "lora_wgrad_pair",
            ]
            .into_iter()
            .any(tc)
            {
                mat.extend(lexp_runtime::matmul_check::check_lora_branch(dev)?);
            }
            rows.extend(mat.into_iter().map(|m| kernel_check::CheckRow {
                kernel: m.kernel,
                dtype: m.dtype,
                shape: m.shape,
                variant: m.config,
                output: m.output,
                rel_l2: m.rel_l2,
                max_abs: m.max_abs,
                tolerance: m.tolerance,
                non_finite: m.non_finite,
                pass: m.pass,
            }));
            (dev.name().to_string(), rows)
        }
        None => {
            let mut rows = lexp_runtime::host_check::check_all_host(kernel)?;
            // The tensor-core kernels and `select_blocks`, one small shape each.
            match kernel {
                None | Some("matmul") => {
                    rows.extend(lexp_runtime::host_matmul_check::check_matmul_host()?)
                }
                Some(only) => rows.extend(
                    lexp_runtime::host_matmul_check::check_matmul_host()?
                        .into_iter()
                        .filter(|r| r.kernel == only),
                ),
            }
            ("cpu (interpreter)".to_string(), rows)
        }
    };
    if let (Some(only), true) = (kernel, rows.is_empty()) {
        if lexp_kernels::find(only).is_none() && only != "matmul" {
            let names: Vec<&str> = lexp_kernels::ALL.iter().map(|k| k.name).collect();
            bail!("no kernel `{only}`; kernels: {}", names.join(", "));
        }
        bail!(
            "`lexp check` has no check of kernel `{only}` on this path; it is checked by the \
             interpreter property tests (`cargo test -p lexp-kernels`) and on the GPU by the \
             GPU tests (`LEXP_GPU_TESTS=1 cargo test -p lexp-runtime --test gpu_flash`, \
             `gpu_engine`)"
        );
    }
    println!(
        "{:<22} {:<5} {:<22} {:<40} {:<5} {:>10} {:>10} {:>8} ok",
        "kernel", "dtype", "shape", "variant", "out", "rel_l2", "max_abs", "tol"
    );
    let mut failed = 0;
    for r in &rows {
        println!(
            "{:<22} {:<5} {:<22} {:<40} {:<5} {:>10.2e} {:>10.2e} {:>8.0e} {}",
            r.kernel,
            r.dtype,
            r.shape,
            r.variant,
            r.output,
            r.rel_l2,
            r.max_abs,
            r.tolerance,
            if r.pass { "ok" } else { "FAIL" }
        );
        failed += (!r.pass) as usize;
    }
    if let Some(p) = json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"kernel\":\"{}\",\"dtype\":\"{}\",\"shape\":\"{}\",\"variant\":\"{}\",\"output\":\"{}\",\"rel_l2\":{},\"max_abs\":{},\"tolerance\":{:e},\"pass\":{}}}",
                    r.kernel, r.dtype, r.shape, r.variant, r.output, json_num(r.rel_l2), json_num(r.max_abs), r.tolerance, r.pass
                )
            })
            .collect();
        std::fs::write(
            &p,
            format!(
                "{{\"device\":\"{}\",\"checks\":[\n{}\n]}}\n",
                device,
                items.join(",\n")
            ),
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{} passed, {} failed", rows.len() - failed, failed);
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}

fn bench(
    dtypes: &str,
    iters: usize,
    kernel: Option<&str>,
    json: Option<std::path::PathBuf>,
) -> Result<()> {
    let dtypes: Vec<Storage> = dtypes
        .split(',')
        .map(|d| Storage::from_name(d.trim()).with_context(|| format!("unknown dtype `{d}`")))
        .collect::<Result<_>>()?;
    let dev = device()?;
    let (copy, rows) = kernel_check::bench_all(&dev, &dtypes, iters, kernel)?;
    println!(
        "device: {}; device-to-device copy: {:.0} GB/s (read + write)",
        dev.name(),
        copy
    );
    println!(
        "{:<22} {:<5} {:<16} {:>10} {:>10} {:>9}",
        "kernel", "dtype", "shape", "median ms", "GB/s", "of copy"
    );
    for r in &rows {
        println!(
            "{:<22} {:<5} {:<16} {:>10.4} {:>10.0} {:>8.1}%",
            r.kernel,
            r.dtype,
            r.shape,
            r.median_ms,
            r.gbps,
            100.0 * r.of_copy
        );
    }
    if let Some(p) = json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"kernel\":\"{}\",\"dtype\":\"{}\",\"shape\":\"{}\",\"variant\":\"{}\",\"bytes\":{},\"median_ms\":{:.6},\"gbps\":{:.1},\"of_copy\":{:.4}}}",
                    r.kernel, r.dtype, r.shape, r.variant, r.bytes, r.median_ms, r.gbps, r.of_copy
                )
            })
            .collect();
        std::fs::write(&p, format!("{{\"device\":\"{}\",\"copy_gbps\":{:.1},\"iters\":{iters},\"kernels\":[\n{}\n]}}\n", dev.name(), copy, items.join(",\n")))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::json_num;

    /// A failed check's NaN distance must not make the `--json` output unparsable.
    #[test]
    fn non_finite_numbers_are_written_as_json_null() {
        assert_eq!(json_num(f64::NAN), "null");
        assert_eq!(json_num(f64::INFINITY), "null");
        assert_eq!(json_num(1.5e-3), "1.5e-3");
        assert_eq!(json_num(0.0), "0e0");
    }
}
