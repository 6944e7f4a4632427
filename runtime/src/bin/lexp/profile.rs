//! `lexp profile`: how much block sparsity a ReLU OPT model exposes, before and after the
//! co-activation neuron permutation (library: `lexp_runtime::exposure::profiler`). Writes
//! `profile.json`, one PNG per block size, prints a table like the fixture README's.
//! `--attention` profiles attention instead ([`attention`]).

#[path = "profile/attention.rs"]
mod attention;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lexp_runtime::exposure::profiler::{
    profile, write_report, LayerProfile, ProfileEvent, ProfileOptions, ProfileReport,
};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Arguments of `lexp profile`.
#[derive(Args)]
pub struct ProfileArgs {
    /// OPT checkpoint folder (default: `../shared/fixtures/opt-mini`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Plain-text corpus (default: `../shared/data/corpus/valid.txt`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Windows used: the first half fits the permutation, the second half is measured
    /// (default 64; with `--attention`: the first windows profiled, default 16).
    #[arg(long)]
    windows: Option<usize>,
    /// Tokens per window (default 512; with `--attention` 1024).
    #[arg(long)]
    seq: Option<usize>,
    /// Windows per forward batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Neuron block sizes, comma-separated (one clustering each).
    #[arg(long, default_value = "32,64,128")]
    blocks: String,
    /// Seed of the clustering.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (default: `runs/profile-<model folder name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Save the permutation fitted for the first block size here (JSON).
    #[arg(long)]
    save_permutation: Option<PathBuf>,
    /// Profile attention (per-head block-pooled maps, head classes, heat maps) instead of the MLP.
    #[arg(long)]
    attention: bool,
    /// Query rows per block (`--attention`).
    #[arg(long, default_value_t = lexp_runtime::model::attention_hook::GPU_Q_BLOCK)]
    q_block: usize,
    /// Keys per block (`--attention`).
    #[arg(long, default_value_t = lexp_runtime::model::attention_hook::GPU_K_BLOCK)]
    k_block: usize,
    /// With `--attention`: also train the block predictors on the first `--train-windows`
    /// windows and measure them on the last `--eval-windows` windows of the file.
    #[arg(long)]
    predictor: bool,
    /// Windows the predictors train on (from the start of the file).
    #[arg(long, default_value_t = 48)]
    train_windows: usize,
    /// Windows the predictors are measured on (the end of the file, after the training ones).
    #[arg(long, default_value_t = 32)]
    eval_windows: usize,
    /// Adam steps of the predictors.
    #[arg(long, default_value_t = 300)]
    steps: usize,
}

/// `../shared` (fixtures and data): `$LEXP_SHARED_DIR`, else `../shared` from the working
/// directory, else beside the checkout this binary was built from.
fn shared_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LEXP_SHARED_DIR") {
        return PathBuf::from(d);
    }
    let here = PathBuf::from("../shared");
    if here.is_dir() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// Runs `lexp profile`.
pub fn run(args: ProfileArgs) -> Result<()> {
    let shared = shared_dir();
    let model = args
        .model
        .unwrap_or_else(|| shared.join("fixtures/opt-mini"));
    let data = args
        .data
        .unwrap_or_else(|| shared.join("data/corpus/valid.txt"));
    let blocks: Vec<usize> = args
        .blocks
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .with_context(|| format!("block size `{b}`"))
        })
        .collect::<Result<_>>()?;
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    if args.attention {
        return attention::run(attention::AttentionRun {
            out: args
                .out
                .unwrap_or_else(|| PathBuf::from(format!("runs/profile-attention-{name}"))),
            model,
            data,
            windows: args.windows.unwrap_or(16),
            seq: args.seq.unwrap_or(1024),
            batch: args.batch,
            q_block: args.q_block,
            k_block: args.k_block,
            predictor: args.predictor.then_some((
                args.train_windows,
                args.eval_windows,
                args.steps,
            )),
            seed: args.seed,
        });
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("runs/profile-{name}")));
    let mut opts = ProfileOptions::new(model, data);
    opts.windows = args.windows.unwrap_or(64);
    opts.seq = args.seq.unwrap_or(512);
    opts.batch_windows = args.batch;
    opts.blocks = blocks;
    opts.seed = args.seed;

    eprintln!(
        "profiling {} on {} ({} windows of {} tokens)",
        opts.model_dir.display(),
        opts.data.display(),
        opts.windows,
        opts.seq
    );
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} forward batches  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let output = profile(&opts, &mut |e| match e {
        ProfileEvent::Start { batches } => bar.set_length(batches as u64),
        ProfileEvent::Batch => bar.inc(1),
        ProfileEvent::Clustering { block } => {
            bar.set_message(format!("clustering (blocks of {block})"))
        }
    })?;
    bar.finish_and_clear();
    let report = &output.report;

    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("profile.json");
    write_report(report, &json)?;
    print_table(report);
    for b in &opts.blocks {
        let png = out.join(format!("sparsity-b{b}.png"));
        if let Err(e) = plot_block(&report.layers, *b, &name, &png) {
            eprintln!("warning: {}: {e}", png.display());
        }
    }
    if let (Some(path), Some((block, perm))) = (&args.save_permutation, output.permutations.first())
    {
        perm.save(path)?;
        eprintln!(
            "permutation (blocks of {block}) saved to {}",
            path.display()
        );
    }
    eprintln!(
        "wrote {} and the plots; {:.1} s (forwards {:.1} s, clustering {:.1} s)",
        json.display(),
        report.seconds["total"],
        report.seconds["forward"],
        report.seconds["cluster"]
    );
    Ok(())
}

fn pct(v: f64) -> String {
    format!("{:.0}%", 100.0 * v)
}

/// One table per block size, shaped like the fixture README's.
fn print_table(report: &ProfileReport) {
    let union = |l: &LayerProfile| {
        l.blocks
            .iter()
            .find(|b| b.block == 128)
            .map(|b| {
                format!(
                    "{} -> {}",
                    pct(b.natural.batch_union),
                    pct(b.clustered.batch_union)
                )
            })
            .unwrap_or_else(|| "-".into())
    };
    let Some(first) = report.layers.first() else {
        return;
    };
    for (k, bp) in first.blocks.iter().enumerate() {
        let b = bp.block;
        println!(
            "\nblocks of {b} neurons (natural -> clustered); measured on {} tokens",
            bp.natural.tokens
        );
        println!(
            "| layer | zero ReLU outputs | blocks active | blocks for 99% mass | blocks for 99.9% mass | 16-token tiles active | 64-token tiles active | batch union, 128-blocks |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for l in &report.layers {
            let s = &l.blocks[k];
            let tile = |st: &lexp_runtime::exposure::stats::BlockStats, i: usize| {
                st.tiles.get(i).map(|t| pct(t.1)).unwrap_or_default()
            };
            println!(
                "| {} | {} | {} -> {} | {} -> {} | {} -> {} | {} -> {} | {} -> {} | {} |",
                l.layer,
                pct(l.zero_fraction),
                pct(s.natural.any),
                pct(s.clustered.any),
                pct(s.natural.m99),
                pct(s.clustered.m99),
                pct(s.natural.m999),
                pct(s.clustered.m999),
                tile(&s.natural, 0),
                tile(&s.clustered, 0),
                tile(&s.natural, 1),
                tile(&s.clustered, 1),
                union(l)
            );
        }
    }
}

/// Per layer at one block size: active blocks, 99%-mass blocks and active 16-token tiles, in
/// natural (light) and clustered (dark) order.
fn plot_block(
    layers: &[LayerProfile],
    block: usize,
    name: &str,
    path: &Path,
) -> Result<(), String> {
    lexp_runtime::train::plot::register_font();
    let n = layers.len();
    let k = layers
        .first()
        .and_then(|l| l.blocks.iter().position(|b| b.block == block))
        .ok_or("no such block size")?;
    type Get = fn(&lexp_runtime::exposure::profiler::BlockProfile) -> (f64, f64);
    let series: [(&str, Get, RGBColor, RGBColor); 4] = [
        (
            "blocks active",
            |b| (b.natural.any, b.clustered.any),
            RGBColor(150, 180, 230),
            RGBColor(20, 60, 170),
        ),
        (
            "blocks for 99% mass",
            |b| (b.natural.m99, b.clustered.m99),
            RGBColor(240, 170, 150),
            RGBColor(190, 40, 20),
        ),
        (
            "blocks for 99.9% mass",
            |b| (b.natural.m999, b.clustered.m999),
            RGBColor(240, 210, 140),
            RGBColor(190, 130, 0),
        ),
        (
            "16-token tiles active",
            |b| {
                let t = |s: &lexp_runtime::exposure::stats::BlockStats| {
                    s.tiles.first().map_or(0.0, |t| t.1)
                };
                (t(&b.natural), t(&b.clustered))
            },
            RGBColor(160, 220, 160),
            RGBColor(20, 130, 40),
        ),
    ];
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: blocks of {block} neurons, natural (light) vs clustered (dark)"),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..1.3)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("layer")
        .x_labels(n.max(2))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("share")
        .y_label_formatter(&|y| {
            if *y <= 1.0 + 1e-9 {
                format!("{:.0}%", 100.0 * y)
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(e)?;
    let width = 0.8 / (2 * series.len()) as f64;
    for (s, (label, get, light, dark)) in series.iter().enumerate() {
        for (o, color) in [(0usize, *light), (1, *dark)] {
            let x0 = |l: usize| l as f64 - 0.4 + (2 * s + o) as f64 * width;
            let bars = layers.iter().enumerate().map(|(l, lp)| {
                let (nat, clu) = get(&lp.blocks[k]);
                let v = if o == 0 { nat } else { clu };
                Rectangle::new([(x0(l), 0.0), (x0(l) + width * 0.9, v)], color.filled())
            });
            let drawn = chart.draw_series(bars).map_err(e)?;
            if o == 1 {
                drawn.label(*label).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled())
                });
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
