//! `lexp bench scaling`: data-parallel scaling from `lexp bench step` JSON files of the same
//! workloads on 1, 2, … GPUs (`--gpus N`, one file per count, all from one session): tokens/s,
//! speedup and efficiency against the one-GPU file, and the share of the step spent in the
//! gradient all-reduce; a table, JSON and a PNG.

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Options of `lexp bench scaling`.
#[derive(clap::Args, Debug)]
pub struct ScalingArgs {
    /// `lexp bench step --json` files, comma-separated: exactly one without `--gpus` (the
    /// one-GPU baseline) and one per GPU count.
    #[arg(long, value_delimiter = ',', required = true)]
    runs: Vec<PathBuf>,
    /// Write the scaling table as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw tokens/s and efficiency against the GPU count here (PNG).
    #[arg(long)]
    png: Option<PathBuf>,
}

/// One workload at one GPU count.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// GPUs (ranks).
    pub gpus: usize,
    /// Per-GPU micro-batch, `BxS`.
    pub per_gpu: String,
    /// Median step time.
    pub step_ms: f64,
    /// Tokens of the whole step over its median time.
    pub tokens_per_s: f64,
    /// `tokens_per_s` over the one-GPU file's.
    pub speedup: f64,
    /// `speedup / gpus`.
    pub efficiency: f64,
    /// Median time per step in collectives (`None` on one GPU).
    pub comm_ms: Option<f64>,
    /// `comm_ms / step_ms`.
    pub comm_share: Option<f64>,
}

/// A run file's GPU count and its workloads `(per-GPU name, median ms, tokens/s, comm ms)`.
type Run = (usize, Vec<(String, f64, f64, Option<f64>)>);

fn read_run(path: &Path) -> Result<Run> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let j: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let bad = |what: &str| anyhow!("{}: not a `lexp bench step` file ({what})", path.display());
    let gpus = j["device"]["gpus"].as_u64().unwrap_or(1) as usize;
    let workloads = j["workloads"]
        .as_array()
        .ok_or_else(|| bad("no workloads"))?;
    let mut out = Vec::new();
    for w in workloads {
        let world = w["world_size"].as_u64().unwrap_or(1) as usize;
        if world != gpus {
            bail!(
                "{}: a workload of {world} ranks in a file of {gpus} GPUs",
                path.display()
            );
        }
        let batch = w["batch"].as_u64().ok_or_else(|| bad("workload batch"))? as usize;
        let seq = w["seq"].as_u64().ok_or_else(|| bad("workload seq"))?;
        let ms = w["step"]["median_ms"]
            .as_f64()
            .ok_or_else(|| bad("median_ms"))?;
        let tps = w["tokens_per_s"]
            .as_f64()
            .ok_or_else(|| bad("tokens_per_s"))?;
        let comm = w["comm"]["median_ms"].as_f64();
        out.push((format!("{}x{seq}", batch / world.max(1)), ms, tps, comm));
    }
    Ok((gpus, out))
}

/// The scaling points of `runs` against the one-GPU run among them.
pub fn scaling(runs: &[Run]) -> Result<Vec<Point>> {
    let base: Vec<&Run> = runs.iter().filter(|r| r.0 == 1).collect();
    let [one] = base[..] else {
        bail!("need exactly one one-GPU run, got {}", base.len());
    };
    let mut points = Vec::new();
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by_key(|r| r.0);
    for (gpus, workloads) in sorted {
        for (name, ms, tps, comm) in workloads {
            let Some((_, _, tps1, _)) = one.1.iter().find(|w| &w.0 == name) else {
                bail!("the one-GPU run has no {name} workload to compare the {gpus}-GPU one with");
            };
            let speedup = tps / tps1;
            points.push(Point {
                gpus: *gpus,
                per_gpu: name.clone(),
                step_ms: *ms,
                tokens_per_s: *tps,
                speedup,
                efficiency: speedup / *gpus as f64,
                comm_ms: *comm,
                comm_share: comm.map(|c| c / ms),
            });
        }
    }
    Ok(points)
}

/// `lexp bench scaling`.
pub fn run(args: ScalingArgs) -> Result<()> {
    let runs: Vec<Run> = args
        .runs
        .iter()
        .map(|p| read_run(p))
        .collect::<Result<_>>()?;
    let points = scaling(&runs)?;
    println!(
        "| GPUs | per GPU | step ms | tokens/s | speedup | efficiency | all-reduce ms (share) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for p in &points {
        let comm = match (p.comm_ms, p.comm_share) {
            (Some(c), Some(s)) => format!("{c:.3} ({:.2}%)", 100.0 * s),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.3}x | {:.1}% | {comm} |",
            p.gpus,
            p.per_gpu,
            p.step_ms,
            p.tokens_per_s,
            p.speedup,
            100.0 * p.efficiency
        );
    }
    if let Some(path) = &args.json {
        let j = serde_json::json!({
            "what": "data-parallel scaling: tokens/s of the whole step (all ranks) over the one-GPU run's; efficiency = speedup / GPUs; all-reduce = median time per step in collectives (device events around the NCCL gradient all-reduce, including the wait for the slowest rank, plus the loss-sum reduction)",
            "runs": args.runs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "points": points,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.png {
        plot(&points, path).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn plot(points: &[Point], path: &Path) -> Result<(), String> {
    lexp_runtime::train::plot::register_font();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let max_gpus = points.iter().map(|p| p.gpus).max().unwrap_or(1) as f64;
    let y_max = points.iter().map(|p| p.speedup).fold(max_gpus, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "data-parallel speedup (tokens/s over one GPU)",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5..max_gpus + 0.5, 0.0..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("GPUs")
        .y_desc("speedup")
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(
            [(1.0, 1.0), (max_gpus, max_gpus)],
            BLACK.mix(0.3).stroke_width(1),
        ))
        .map_err(e)?
        .label("ideal")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.mix(0.3)));
    let mut names: Vec<&str> = Vec::new();
    for p in points {
        if !names.contains(&p.per_gpu.as_str()) {
            names.push(&p.per_gpu);
        }
    }
    for (k, name) in names.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let series: Vec<(f64, f64, f64)> = points
            .iter()
            .filter(|p| p.per_gpu == *name)
            .map(|p| (p.gpus as f64, p.speedup, p.efficiency))
            .collect();
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|&(g, s, _)| (g, s)),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(format!("{name} per GPU"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], color));
        chart
            .draw_series(series.iter().filter(|p| p.0 > 1.0).map(|&(g, s, eff)| {
                Text::new(
                    format!("{name}: {s:.2}x ({:.0}%)", 100.0 * eff),
                    (g - 0.45, s + y_max * (0.03 + 0.04 * k as f64)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speedup_and_efficiency_against_the_one_gpu_run() {
        let runs: Vec<Run> = vec![
            (2, vec![("4x1024".into(), 55.0, 148_945.0, Some(0.5))]),
            (1, vec![("4x1024".into(), 52.0, 78_769.0, None)]),
        ];
        let p = scaling(&runs).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].gpus, p[1].gpus), (1, 2));
        assert!((p[0].speedup - 1.0).abs() < 1e-12);
        assert!((p[1].speedup - 148_945.0 / 78_769.0).abs() < 1e-9);
        assert!((p[1].efficiency - p[1].speedup / 2.0).abs() < 1e-12);
        assert!((p[1].comm_share.unwrap() - 0.5 / 55.0).abs() < 1e-12);
        assert!(scaling(&runs[..1]).is_err(), "no one-GPU run");
        let other = vec![runs[1].clone(), (2, vec![("4x512".into(), 1.0, 1.0, None)])];
        assert!(scaling(&other).is_err(), "workload missing on one GPU");
    }
}
