//! `lexp profile --attention`: per-head block-pooled attention maps of a model on a text file
//! (library: `lexp_runtime::exposure::attention`). Writes `attention-profile.json` and one
//! heat-map PNG per layer; with `--predictor`, also trains the block predictors on the first
//! windows and measures them on later ones (`attention-predictor.json` and `.txt`).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lexp_runtime::exposure::attention::corpus::{self, VariantReport};
use lexp_runtime::exposure::attention::predictor::PredictorConfig;
use lexp_runtime::exposure::attention::profiler::{class_name, ProfileSettings};
use lexp_runtime::exposure::attention::sparse::SparseAttentionConfig;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `lexp profile --attention` runs on.
pub struct AttentionRun {
    /// Checkpoint folder.
    pub model: PathBuf,
    /// Text file.
    pub data: PathBuf,
    /// Windows profiled (the first ones).
    pub windows: usize,
    /// Tokens per window.
    pub seq: usize,
    /// Windows per forward batch.
    pub batch: usize,
    /// Query and key block sizes.
    pub q_block: usize,
    /// Keys per block.
    pub k_block: usize,
    /// Output folder.
    pub out: PathBuf,
    /// Also train and measure the predictors: `(train windows, eval windows, Adam steps)`.
    pub predictor: Option<(usize, usize, usize)>,
    /// Seed of the predictors.
    pub seed: u64,
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30.cyan/blue}} {{pos}}/{{len}} {what}  [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

/// Runs it.
pub fn run(r: AttentionRun) -> Result<()> {
    let name = r
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let (model, windows) = corpus::load(&r.model, &r.data, r.seq)?;
    eprintln!(
        "attention profile of {} on {} ({} of {} windows of {} tokens)",
        r.model.display(),
        r.data.display(),
        r.windows,
        windows.len(),
        r.seq
    );
    std::fs::create_dir_all(&r.out).with_context(|| format!("creating {}", r.out.display()))?;
    let settings = ProfileSettings {
        q_block: r.q_block,
        k_block: r.k_block,
        ..Default::default()
    };
    let batches = corpus::batches(&windows, 0..r.windows, r.batch, r.seq, &r.data)?;
    let b = bar(batches.len(), "forward batches");
    let profiler = corpus::profile(&model, &batches, settings, &mut || b.inc(1))?;
    b.finish_and_clear();
    let layers = profiler.report();
    let json = serde_json::json!({
        "format": "lexp-attention-profile/1",
        "model": { "path": r.model.display().to_string(), "name": name,
                   "layers": model.config.num_hidden_layers, "heads": model.config.num_attention_heads,
                   "head_dim": model.config.head_dim() },
        "data": { "path": r.data.display().to_string(), "seq": r.seq, "windows": r.windows,
                  "first_window": 0, "batch_windows": r.batch },
        "settings": settings,
        "definitions": {
            "mass": "per (sequence, query block, head): the mean over the block's queries of the causal softmax probability on each key block (rows sum to 1); dense f32 forward, f64 softmax",
            "local_mass": "share of the mass on the diagonal key blocks and the `window` blocks before them",
            "sink_mass": "share of the mass on the sequence's first key block when it is not local",
            "density_for": "[share, density]: per row, the local window and sinks, then the heaviest other key blocks until `share` of the row's mass; kept blocks over causal blocks",
            "stride": "[period, share, lift] of the far mass's best residue class of distances (see exposure::attention::classes)",
            "class": "sink, local, strided or broad by the rules of exposure::attention::classes (thresholds in settings.rules)"
        },
        "layers": layers,
    });
    let path = r.out.join("attention-profile.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("| layer | head | class | local mass | sink mass | density 90% | density 95% | density 99% |");
    println!("|---|---|---|---|---|---|---|---|");
    for l in &layers {
        for h in &l.heads {
            let d = |i: usize| h.density_for.get(i).map_or(f64::NAN, |x| x[1]);
            println!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                l.layer,
                h.head,
                class_name(h.class),
                h.local_mass,
                h.sink_mass,
                d(0),
                d(1),
                d(2)
            );
        }
    }
    for l in 0..layers.len() {
        let png = r.out.join(format!("attention-layer{l}.png"));
        let title = format!(
            "{name} layer {l}: mean block-pooled attention (q {}, k {}), log10 mass -4..0",
            r.q_block, r.k_block
        );
        if let Err(e) = profiler.heatmap_png(l, &title, &png) {
            eprintln!("warning: {}: {e}", png.display());
        }
    }
    eprintln!("wrote {} and {} heat maps", path.display(), layers.len());
    if let Some((train_n, eval_n, steps)) = r.predictor {
        predictor(&r, &model, &windows, train_n, eval_n, steps)?;
    }
    Ok(())
}

fn predictor(
    r: &AttentionRun,
    model: &lexp_runtime::checkpoint::OptModel,
    windows: &[lexp_runtime::data::Example],
    train_n: usize,
    eval_n: usize,
    steps: usize,
) -> Result<()> {
    let eval_start = windows.len().saturating_sub(eval_n).max(train_n);
    let train = corpus::batches(windows, 0..train_n, r.batch, r.seq, &r.data)?;
    let eval = corpus::batches(
        windows,
        eval_start..eval_start + eval_n,
        r.batch,
        r.seq,
        &r.data,
    )?;
    let base = SparseAttentionConfig {
        q_block: r.q_block,
        k_block: r.k_block,
        ..Default::default()
    };
    let d = PredictorConfig::default();
    let variants = vec![
        ("rank16+bias".to_string(), d),
        ("rank8+bias".to_string(), PredictorConfig { rank: 8, ..d }),
        (
            "rank16-nobias".to_string(),
            PredictorConfig {
                distance_bias: false,
                ..d
            },
        ),
        ("rank16+bias, 0 steps".to_string(), d),
    ];
    let targets = [0.8, 0.85, 0.9, 0.95, 0.98];
    let goal = 0.95;
    let b = bar(
        train.len() + 1 + eval.len(),
        "predictor: train forwards, fit, eval forwards",
    );
    let t0 = std::time::Instant::now();
    // The untrained variant is a separate run with 0 steps.
    let (mut reports, hooks) = corpus::predictor_quality(
        model,
        &train,
        &eval,
        base,
        &variants[..3],
        steps,
        &targets,
        goal,
        r.seed,
        &mut || b.inc(1),
    )?;
    let (untrained, _) = corpus::predictor_quality(
        model,
        &train[..1],
        &eval,
        base,
        &variants[3..],
        0,
        &targets,
        goal,
        r.seed,
        &mut || {},
    )?;
    reports.extend(untrained);
    b.finish_and_clear();
    let loss_targets = [0.8, 0.85, 0.9, 0.95];
    let b = bar(
        loss_targets.len() + 1,
        "held-out loss: dense, then sparse per target",
    );
    let losses = corpus::loss_gap(model, &hooks[0], &eval, &loss_targets, &mut || b.inc(1))?;
    b.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let mut text = table(&reports, r, train_n, eval_start, eval_n, steps, goal);
    let _ = writeln!(
        text,
        "## held-out LM loss, {} predictors, every layer at one target (no adapter; sparse = masked forward)",
        variants[0].0
    );
    let _ = writeln!(
        text,
        "| target | loss | gap vs dense | recall per layer | density per layer |"
    );
    let _ = writeln!(text, "|---|---|---|---|---|");
    for p in &losses {
        let f = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            text,
            "| {} | {:.4} | {:+.3}% | {} | {} |",
            p.target.map_or("dense".to_string(), |t| format!("{t:.2}")),
            p.loss,
            100.0 * p.gap,
            f(&p.recall),
            f(&p.density)
        );
    }
    print!("{text}");
    std::fs::write(r.out.join("attention-predictor.txt"), &text)?;
    let json = serde_json::json!({
        "format": "lexp-attention-predictor/1",
        "model": r.model.display().to_string(),
        "data": r.data.display().to_string(),
        "seq": r.seq,
        "train_windows": [0, train_n],
        "eval_windows": [eval_start, eval_start + eval_n],
        "steps": steps,
        "selection": base.selection,
        "q_block": r.q_block,
        "k_block": r.k_block,
        "goal": goal,
        "seconds": secs,
        "variants": reports,
        "held_out_loss": losses,
    });
    std::fs::write(
        r.out.join("attention-predictor.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    Ok(())
}

fn table(
    reports: &[VariantReport],
    r: &AttentionRun,
    train_n: usize,
    eval_start: usize,
    eval_n: usize,
    steps: usize,
    goal: f64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Attention block predictor on {} / {}: windows of {} tokens, q blocks {}, k blocks {}.\n\
         Trained on windows 0..{train_n} ({steps} Adam steps), measured on windows {eval_start}..{} (disjoint, later in the file).\n\
         Selection: diagonal + 1 previous key block + 1 sink block always, then predicted blocks up to the target.\n\
         recall = kept share of the exact attention mass (query-weighted); density = kept / causal blocks;\n\
         oracle = density of the same selection on the exact masses with its target searched to the same recall.\n",
        r.model.display(),
        Path::new(&r.data).display(),
        r.seq,
        r.q_block,
        r.k_block,
        eval_start + eval_n
    );
    for v in reports {
        let _ = writeln!(s, "## {} (train KL per layer: {:?})", v.name, v.train_loss);
        let _ = writeln!(s, "| layer | target | recall | density | oracle density |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (l, pts) in v.layers.iter().enumerate() {
            for p in pts {
                let _ = writeln!(
                    s,
                    "| {l} | {:.2} | {:.4} | {:.3} | {:.3} |",
                    p.target, p.recall, p.density, p.oracle_density
                );
            }
        }
        let _ = writeln!(
            s,
            "\nsmallest target with held-out recall >= {goal} (chosen on the eval windows):"
        );
        let _ = writeln!(s, "| layer | target | recall | density | oracle density |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (l, p) in v.at_goal.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {l} | {:.3} | {:.4} | {:.3} | {:.3} |",
                p.target, p.recall, p.density, p.oracle_density
            );
        }
        let _ = writeln!(s);
    }
    s
}
