//! `lexp bench step --profile OUT.json`: one extra step of each workload with the device's
//! launch profiler on ([`lexp_runtime::profile`]): every kernel and cuBLAS GEMM of the step
//! with its GPU time, share and (GEMMs) TFLOP/s, per kernel family and per kernel, the GPU's
//! idle share of the step's wall time; printed, written as JSON, and drawn as a bar chart
//! (`OUT.png`) of the families' time per workload.

use anyhow::{anyhow, Context, Result};
use lexp_runtime::gpu::GpuEngine;
use lexp_runtime::peft::PeftConfig;
use lexp_runtime::profile::{summarize, Profile};
use lexp_runtime::step_bench::{self as sb, StepSettings};
use plotters::prelude::*;
use std::path::Path;

/// Families shown in the chart (the rest are summed as "other").
const CHART_FAMILIES: usize = 9;

/// Runs one profiled step of `batch` on `gpu` (its workspace already sized by the timed
/// steps, so nothing is allocated) and summarises it.
pub fn profile_step(
    gpu: &mut GpuEngine,
    peft: &PeftConfig,
    batch: &lexp_runtime::data::PackedBatch,
    seed: u64,
) -> Result<Profile> {
    let prof = gpu.device().profiler().clone();
    let settings = StepSettings {
        warmup: 0,
        iters: 1,
        ..StepSettings::default()
    };
    prof.start();
    let r = sb::time_steps(gpu, peft, batch, &settings, seed);
    let timed = prof.stop().context("reading the profiler's events")?;
    let r = r?;
    let wall = r.times_ms.first().copied().unwrap_or(0.0);
    Ok(summarize(&timed, wall))
}

/// Prints the families and the ten largest kernels of `p`.
pub fn print_profile(name: &str, p: &Profile) {
    println!(
        "profile {name}: wall {:.2} ms, kernels {:.2} ms in {} launches, GPU idle {:.1}% of the wall time",
        p.wall_ms,
        p.kernel_ms,
        p.launches,
        100.0 * p.idle_share
    );
    println!(
        "  {:<46} {:>8} {:>10} {:>7} {:>8}",
        "kernel family / kernel", "launches", "total ms", "share", "TFLOP/s"
    );
    let row = |k: &lexp_runtime::profile::KernelStat| {
        println!(
            "  {:<46} {:>8} {:>10.3} {:>6.1}% {:>8}",
            k.name,
            k.launches,
            k.total_ms,
            100.0 * k.share,
            k.tflops.map_or("-".into(), |t| format!("{t:.0}"))
        )
    };
    p.groups.iter().for_each(row);
    println!("  -- the ten largest kernels --");
    p.kernels.iter().take(10).for_each(row);
}

/// Writes the profiles as JSON at `path` and their chart next to it (`.png`).
pub fn write_profiles(
    path: &Path,
    what: serde_json::Value,
    profiles: &[(String, Profile)],
) -> Result<()> {
    let j = serde_json::json!({
        "what": "one lexp bench step per workload with the launch profiler on (CUDA events around every DSL kernel and cuBLAS GEMM); times are GPU times per launch; idle_share is the wall time in which no recorded kernel ran (host AdamW, copies, the gradient download, launch gaps). The events add host work, so wall_ms is above the unprofiled step time.",
        "run": what,
        "workloads": profiles.iter().map(|(n, p)| serde_json::json!({"workload": n, "profile": p})).collect::<Vec<_>>(),
    });
    std::fs::write(path, serde_json::to_string_pretty(&j)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let png = path.with_extension("png");
    plot(profiles, &png).map_err(|e| anyhow!("drawing {}: {e}", png.display()))
}

/// Stacked horizontal bars: per workload, the GPU time of the largest kernel families, the
/// rest as "other", and the idle time.
fn plot(profiles: &[(String, Profile)], path: &Path) -> Result<(), String> {
    lexp_runtime::train::plot::register_font();
    // The families of the first workload, in its order, define the colours.
    let mut families: Vec<String> = profiles
        .first()
        .map(|(_, p)| {
            p.groups
                .iter()
                .take(CHART_FAMILIES)
                .map(|g| g.name.clone())
                .collect()
        })
        .unwrap_or_default();
    families.push("other".into());
    families.push("GPU idle".into());
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(127, 127, 127),
        RGBColor(220, 220, 220),
    ];
    let segments = |p: &Profile| -> Vec<f64> {
        let mut v: Vec<f64> = families[..families.len() - 2]
            .iter()
            .map(|f| {
                p.groups
                    .iter()
                    .find(|g| &g.name == f)
                    .map_or(0.0, |g| g.total_ms)
            })
            .collect();
        let known: f64 = v.iter().sum();
        v.push((p.kernel_ms - known).max(0.0));
        v.push((p.wall_ms - p.kernel_ms).max(0.0));
        v
    };
    let x_max = profiles
        .iter()
        .map(|(_, p)| p.wall_ms.max(p.kernel_ms))
        .fold(1e-3, f64::max)
        * 1.3;
    let n = profiles.len().max(1);
    let root = BitMapBackend::new(path, (1100, 180 + 70 * n as u32)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let names: Vec<String> = profiles.iter().map(|(n, _)| n.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "lexp step profile: GPU time per kernel family",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, -0.5..n as f64 - 0.5)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.round();
            // The first workload at the top.
            if (y - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[names.len() - 1 - i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc("ms (one step)")
        .draw()
        .map_err(e)?;
    for (k, fam) in families.iter().enumerate() {
        let color = palette[k.min(palette.len() - 1)];
        let bars: Vec<(f64, f64, f64)> = profiles
            .iter()
            .enumerate()
            .map(|(w, (_, p))| {
                let s = segments(p);
                let x0: f64 = s[..k].iter().sum();
                ((n - 1 - w) as f64, x0, x0 + s[k])
            })
            .collect();
        chart
            .draw_series(
                bars.iter().map(|&(y, x0, x1)| {
                    Rectangle::new([(x0, y - 0.3), (x1, y + 0.3)], color.filled())
                }),
            )
            .map_err(e)?
            .label(fam.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lexp_runtime::profile::Timed;

    #[test]
    fn profiles_are_written_as_json_and_a_chart() {
        let t = |name: &str, flops: f64, ms: f64| Timed {
            name: name.into(),
            flops,
            ms,
        };
        let a = summarize(
            &[
                t("cublas gemm 64x64x64 NT", 5e8, 2.0),
                t("flash_fwd_bf16_64_128_128_2_8_a16", 0.0, 1.0),
            ],
            4.0,
        );
        let b = summarize(&[t("layernorm_fwd_bf16_1024_a16", 0.0, 0.5)], 1.0);
        let dir = std::env::temp_dir().join(format!("lexp-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("profile.json");
        write_profiles(
            &path,
            serde_json::json!({"model": "test"}),
            &[("4x512".into(), a), ("4x1024".into(), b)],
        )
        .unwrap();
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let w = &j["workloads"][0]["profile"];
        assert_eq!(w["groups"][0]["name"], "cublas gemm");
        assert_eq!(w["launches"], 2);
        assert!((w["idle_share"].as_f64().unwrap() - 0.25).abs() < 1e-12);
        let png = std::fs::metadata(path.with_extension("png")).unwrap();
        assert!(png.len() > 5_000, "chart of {} bytes", png.len());
        std::fs::remove_dir_all(&dir).ok();
    }
}
