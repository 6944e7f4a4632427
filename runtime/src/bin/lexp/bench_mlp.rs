//! `lexp bench mlp`: the four products of a sparse ReLU MLP's LoRA step against the same four
//! dense cuBLAS GEMMs, measured in the same run (DESIGN.md §7 MLP step 5, §8):
//!
//! | product | sparse (DSL kernel) | dense cuBLAS |
//! |---|---|---|
//! | fc1 forward | `sparse_fc1_fwd` (bias + ReLU fused, compact `h`) | `x·W1ᵀ` `[T, F]` |
//! | fc2 forward | `sparse_red` | `h·W2ᵀ` `[T, H]` |
//! | fc2 input gradient | `sparse_fc2_dh` (ReLU mask fused, compact `dh`) | `dy·W2` `[T, F]` |
//! | fc1 input gradient | `sparse_fc1_dx` | `dh·W1` `[T, H]` |
//!
//! Default shapes are OPT-1.3B's MLP over 16384 tokens (H 2048, F 8192), row groups of 128
//! tokens, blocks of 64 and 128 neurons, random block lists (every group keeps the same number
//! of uniformly chosen blocks) at densities 12.5–100%. Each time is the median of CUDA-event
//! timed launches after warm-up; tile configurations are the autotuner's choice per kernel,
//! block size and density. The acceptance: the four sparse products at 25% / 50%
//! density take at most 0.35x / 0.65x the four dense GEMMs.

use anyhow::{anyhow, bail, Context, Result};
use lexp_compiler::dtype::Storage;
use lexp_runtime::autotune::{self, Autotuner};
use lexp_runtime::block_list::{self, BlockList};
use lexp_runtime::cublas::Blas;
use lexp_runtime::sparse_ops::{self, GROUP_ROWS};
use lexp_runtime::timing::time_graph_ms;
use lexp_runtime::{time_ms, CudaDevice, DeviceError, DeviceTensor};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The products, in step order.
const PRODUCTS: [&str; 4] = ["fc1_fwd", "fc2_fwd", "fc2_dx", "fc1_dx"];
/// The sparse kernel of each product.
const KERNELS: [&str; 4] = [
    "sparse_fc1_fwd",
    "sparse_red",
    "sparse_fc2_dh",
    "sparse_fc1_dx",
];
/// The acceptance: `(density, largest sum ratio)`.
const TARGETS: [(f64, f64); 2] = [(0.25, 0.35), (0.5, 0.65)];

/// Arguments of `lexp bench mlp`.
#[derive(clap::Args)]
pub struct MlpArgs {
    /// Tokens (a multiple of 128 keeps every row group full).
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Model width H.
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// MLP width F (a multiple of every block size).
    #[arg(long, default_value_t = 8192)]
    ffn: usize,
    /// Neuron block sizes, comma-separated (compiled: 64, 128).
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    block: Vec<usize>,
    /// Fractions of blocks each row group keeps, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.125,0.25,0.5,0.75,1.0")]
    density: Vec<f64>,
    /// Untimed launches first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Timed launches per product (median reported; at least 30).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Seed of the random data and block lists.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the results as JSON here, and the plot next to it (`.png`).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One (block size, density) measurement.
struct Row {
    bs: usize,
    density: f64,
    kept: usize,
    /// Median ms per product, in [`PRODUCTS`] order.
    ms: [f64; 4],
    /// The tile configuration of each product.
    configs: [String; 4],
    /// The four launched back to back, median ms.
    chain_ms: f64,
    /// Median ms per product replayed from a CUDA graph ([`GRAPH_REPS`] launches per replay).
    graph_ms: [f64; 4],
    /// Host ms spent queuing one launch of each product (mean), in the event-timed runs.
    host_ms: [f64; 4],
}

impl Row {
    fn sum(&self) -> f64 {
        self.ms.iter().sum()
    }

    fn graph_sum(&self) -> f64 {
        self.graph_ms.iter().sum()
    }
}

/// Launches per CUDA graph in the graph-replayed timings.
const GRAPH_REPS: usize = 10;

fn dev_err(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::InvalidArgument(e.to_string())
}

fn config_text(c: &[(&str, usize)]) -> String {
    let parts: Vec<String> = c.iter().map(|(n, v)| format!("{n}={v}")).collect();
    parts.join(",")
}

/// A device tensor of uniform values in [-1, 1] (bf16).
fn random(dev: &CudaDevice, dims: &[usize], seed: u64) -> Result<DeviceTensor> {
    let mut rng = lexp_runtime::data::SplitMix64::new(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    Ok(DeviceTensor::from_f32(dev, Storage::BF16, dims, &v)?)
}

fn check_args(a: &MlpArgs) -> Result<()> {
    if a.iters < 30 {
        bail!("--iters must be at least 30 (got {})", a.iters);
    }
    if a.tokens == 0
        || a.hidden == 0
        || a.ffn == 0
        || !a.hidden.is_multiple_of(8)
        || !a.ffn.is_multiple_of(8)
    {
        bail!("--tokens must be positive and --hidden, --ffn positive multiples of 8");
    }
    if let Some(bs) = a
        .block
        .iter()
        .find(|&&b| b == 0 || !a.ffn.is_multiple_of(b))
    {
        bail!("--block {bs} does not divide --ffn {}", a.ffn);
    }
    if let Some(d) = a.density.iter().find(|d| !(**d > 0.0 && **d <= 1.0)) {
        bail!("--density {d} is not in (0, 1]");
    }
    Ok(())
}

/// Runs the benchmark (see the [module docs](self)).
pub fn run(args: MlpArgs) -> Result<()> {
    check_args(&args)?;
    let dev = CudaDevice::new(0)
        .map_err(|e| anyhow!("lexp bench mlp needs a CUDA GPU, and none is usable here: {e}"))?;
    let blas = Blas::new(&dev).context("cuBLAS (the dense baseline) is not available")?;
    let (t, hd, f) = (args.tokens, args.hidden, args.ffn);
    let (major, minor) = dev.compute_capability();
    eprintln!(
        "device: {} (sm_{major}{minor}; kernels as {}); {t} tokens, H {hd}, F {f}",
        dev.name(),
        dev.module_code()
    );
    let x = random(&dev, &[t, hd], args.seed)?;
    let w1 = random(&dev, &[f, hd], args.seed + 1)?;
    let b1 = random(&dev, &[f], args.seed + 2)?;
    let w2 = random(&dev, &[hd, f], args.seed + 3)?;
    let dy = random(&dev, &[t, hd], args.seed + 4)?;
    let mut y = DeviceTensor::zeros(&dev, Storage::BF16, &[t, hd])?;
    let mut dx = DeviceTensor::zeros(&dev, Storage::BF16, &[t, hd])?;
    let (dense, dense_graph) =
        dense_ms(&dev, &blas, &args, (&x, &w1, &w2, &dy), (&mut y, &mut dx))?;
    let dense_sum: f64 = dense.iter().sum();
    println!(
        "dense cuBLAS: fc1 fwd {:.4} ms, fc2 fwd {:.4}, fc2 dX {:.4}, fc1 dX {:.4}; sum {dense_sum:.4} ms",
        dense[0], dense[1], dense[2], dense[3]
    );
    let tuner = Autotuner::new();
    let groups = t.div_ceil(GROUP_ROWS);
    let steps = args.block.len() * args.density.len();
    let bar = indicatif::ProgressBar::new(steps as u64);
    let mut rows = vec![];
    for &bs in &args.block {
        let nb = f / bs;
        for &density in &args.density {
            bar.set_message(format!("blocks of {bs}, density {density}"));
            let (counts, idx, kept) =
                block_list::random_host(groups, nb, density, args.seed ^ ((bs as u64) << 8));
            let list = BlockList::from_host(&dev, &counts, &idx, kept, nb)?;
            let h = DeviceTensor::zeros(&dev, Storage::BF16, &[t, kept * bs])?;
            let dh = DeviceTensor::zeros(&dev, Storage::BF16, &[t, kept * bs])?;
            let (xa, w1a, b1a, w2a, dya) = (
                x.as_arg(),
                w1.as_arg(),
                b1.as_arg(),
                w2.as_arg(),
                dy.as_arg(),
            );
            let (ha, dha, ya, dxa) = (h.as_arg(), dh.as_arg(), y.as_arg(), dx.as_arg());
            let l = &list;
            let launch = |p: usize, c: &[(&str, usize)]| -> Result<(), DeviceError> {
                match p {
                    0 => sparse_ops::sparse_fc1_fwd(&dev, &xa, &w1a, &b1a, l, &ha, bs, c),
                    1 => sparse_ops::sparse_red(&dev, &ha, &w2a, l, &ya, bs, c),
                    2 => sparse_ops::sparse_fc2_dh(&dev, &dya, &w2a, &ha, l, &dha, bs, c),
                    _ => sparse_ops::sparse_fc1_dx(&dev, &dha, &w1a, l, &dxa, bs, c),
                }
                .map_err(dev_err)
            };
            let (mut ms, mut graph_ms, mut host_ms) = ([0.0; 4], [0.0; 4], [0.0; 4]);
            let mut chosen: Vec<Vec<(&'static str, usize)>> = vec![];
            for p in 0..4 {
                let cands: Vec<_> = lexp_kernels::find(KERNELS[p])
                    .map(|k| k.configurations())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| c.iter().any(|(n, v)| *n == "BS" && *v == bs))
                    .collect();
                let key = format!(
                    "{}|kept{kept}",
                    autotune::key(dev.name(), KERNELS[p], "bf16", &[t, hd, f, bs])
                );
                let cfg = tuner
                    .choose(&key, &cands, |c| -> Result<f64, DeviceError> {
                        Ok(time_ms(&dev, 3, 10, || launch(p, c))?.median())
                    })
                    .map_err(|e| anyhow!("{e}"))?;
                let t = time_ms(&dev, args.warmup, args.iters, || launch(p, &cfg))?;
                ms[p] = t.median();
                host_ms[p] = t.host_ms;
                graph_ms[p] = time_graph_ms(&dev, args.warmup, args.iters, GRAPH_REPS, || {
                    launch(p, &cfg)
                })?
                .median();
                chosen.push(cfg);
            }
            let chain_ms = time_ms(&dev, args.warmup, args.iters, || {
                (0..4).try_for_each(|p| launch(p, &chosen[p]))
            })?
            .median();
            rows.push(Row {
                bs,
                density: kept as f64 / nb as f64,
                kept,
                ms,
                configs: [0, 1, 2, 3].map(|p| config_text(&chosen[p])),
                chain_ms,
                graph_ms,
                host_ms,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let failed = report(&rows, &dense, &dense_graph);
    if let Some(p) = &args.json {
        write_json(p, &dev, &blas, &args, (&dense, &dense_graph), &rows)?;
        let png = p.with_extension("png");
        plot(&rows, dense_sum, &png).map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
        eprintln!("wrote {} and {}", p.display(), png.display());
    }
    if failed > 0 {
        eprintln!("{failed} acceptance targets missed (see the table)");
    }
    Ok(())
}

/// Median ms of the four dense cuBLAS GEMMs, in [`PRODUCTS`] order: event-timed launches, and
/// replayed from CUDA graphs.
fn dense_ms(
    dev: &CudaDevice,
    blas: &Blas,
    a: &MlpArgs,
    (x, w1, w2, dy): (&DeviceTensor, &DeviceTensor, &DeviceTensor, &DeviceTensor),
    (y, dx): (&mut DeviceTensor, &mut DeviceTensor),
) -> Result<([f64; 4], [f64; 4])> {
    let (t, f) = (a.tokens, a.ffn);
    let mut h = DeviceTensor::zeros(dev, Storage::BF16, &[t, f])?;
    let mut dh = DeviceTensor::zeros(dev, Storage::BF16, &[t, f])?;
    let (w, n) = (a.warmup, a.iters);
    let mut events = [0.0; 4];
    let mut graphs = [0.0; 4];
    for p in 0..4 {
        let mut gemm = || match p {
            0 => blas.gemm(x, w1, &mut h, false, true, 1.0, 0.0),
            1 => blas.gemm(&h, w2, y, false, true, 1.0, 0.0),
            2 => blas.gemm(dy, w2, &mut dh, false, false, 1.0, 0.0),
            _ => blas.gemm(&dh, w1, dx, false, false, 1.0, 0.0),
        };
        events[p] = time_ms(dev, w, n, &mut gemm)?.median();
        graphs[p] = time_graph_ms(dev, w, n, GRAPH_REPS, &mut gemm)?.median();
    }
    Ok((events, graphs))
}

/// The acceptance target at `density` (within half a percent), if any.
fn target(density: f64) -> Option<f64> {
    TARGETS
        .iter()
        .find(|(d, _)| (d - density).abs() < 0.005)
        .map(|t| t.1)
}

/// Prints the tables (event-timed launches, then graph replays, with the host's queuing time
/// per launch); returns the number of missed acceptance targets (of the event-timed table).
fn report(rows: &[Row], dense: &[f64; 4], dense_graph: &[f64; 4]) -> usize {
    let dense_sum: f64 = dense.iter().sum();
    println!(
        "\n{:>4} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}  target",
        "BS",
        "density",
        "fc1 fwd",
        "fc2 fwd",
        "fc2 dX",
        "fc1 dX",
        "sum ms",
        "chain ms",
        "r fc1",
        "r fc2",
        "r dX2",
        "r dX1",
        "r sum"
    );
    let mut failed = 0;
    for r in rows {
        let ratio = r.sum() / dense_sum;
        let verdict = match target(r.density) {
            Some(tg) if ratio <= tg => format!("<= {tg:.2}: met"),
            Some(tg) => {
                failed += 1;
                format!("<= {tg:.2}: MISSED")
            }
            None => "-".into(),
        };
        println!(
            "{:>4} {:>8.3} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>6.3}x {:>6.3}x {:>6.3}x {:>6.3}x {:>6.3}x  {verdict}",
            r.bs,
            r.density,
            r.ms[0],
            r.ms[1],
            r.ms[2],
            r.ms[3],
            r.sum(),
            r.chain_ms,
            r.ms[0] / dense[0],
            r.ms[1] / dense[1],
            r.ms[2] / dense[2],
            r.ms[3] / dense[3],
            ratio
        );
    }
    let graph_sum: f64 = dense_graph.iter().sum();
    println!(
        "\nreplayed from CUDA graphs ({GRAPH_REPS} launches each): dense cuBLAS {:.4} / {:.4} / {:.4} / {:.4}, sum {graph_sum:.4} ms",
        dense_graph[0], dense_graph[1], dense_graph[2], dense_graph[3]
    );
    println!(
        "{:>4} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}   host ms per event-timed launch",
        "BS", "density", "fc1 fwd", "fc2 fwd", "fc2 dX", "fc1 dX", "sum ms", "r sum"
    );
    for r in rows {
        println!(
            "{:>4} {:>8.3} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>6.3}x   {:.3} / {:.3} / {:.3} / {:.3}",
            r.bs,
            r.density,
            r.graph_ms[0],
            r.graph_ms[1],
            r.graph_ms[2],
            r.graph_ms[3],
            r.graph_sum(),
            r.graph_sum() / graph_sum,
            r.host_ms[0],
            r.host_ms[1],
            r.host_ms[2],
            r.host_ms[3],
        );
    }
    failed
}

/// The NVIDIA driver version string from `nvidia-smi`, if it runs.
fn nvidia_driver() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=driver_version", "--format=csv,noheader"])
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    s.lines().next().map(|l| l.trim().to_string())
}

/// The CUDA driver API version (e.g. 13000).
fn cuda_driver_api() -> Option<i32> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: called after a CUDA context exists (the driver library is loaded); writes one int.
    let r = unsafe { lexp_runtime::cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == lexp_runtime::cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
}

fn write_json(
    path: &Path,
    dev: &CudaDevice,
    blas: &Blas,
    a: &MlpArgs,
    (dense, dense_graph): (&[f64; 4], &[f64; 4]),
    rows: &[Row],
) -> Result<()> {
    let dense_sum: f64 = dense.iter().sum();
    let dense_graph_sum: f64 = dense_graph.iter().sum();
    let (major, minor) = dev.compute_capability();
    let runs: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let per: serde_json::Map<String, serde_json::Value> = (0..4)
                .map(|p| {
                    (
                        PRODUCTS[p].to_string(),
                        serde_json::json!({
                            "kernel": KERNELS[p], "config": r.configs[p], "ms": r.ms[p],
                            "dense_ms": dense[p], "ratio": r.ms[p] / dense[p],
                            "host_ms_per_launch": r.host_ms[p], "graph_ms": r.graph_ms[p],
                            "dense_graph_ms": dense_graph[p],
                        }),
                    )
                })
                .collect();
            let ratio = r.sum() / dense_sum;
            serde_json::json!({
                "block": r.bs, "density": r.density, "kept_blocks_per_group": r.kept,
                "products": per, "sum_ms": r.sum(), "chain_ms": r.chain_ms,
                "graph_sum_ms": r.graph_sum(), "graph_sum_ratio": r.graph_sum() / dense_graph_sum,
                "sum_ratio": ratio, "target": target(r.density),
                "target_met": target(r.density).map(|t| ratio <= t),
            })
        })
        .collect();
    let j = serde_json::json!({
        "what": "lexp bench mlp: the four products of a sparse ReLU MLP (fc1 fwd with bias+ReLU, fc2 fwd, fc2 input gradient masked by the ReLU, fc1 input gradient) over random per-group block lists, against the same four dense cuBLAS GEMMs (x·W1ᵀ, h·W2ᵀ, dy·W2, dh·W1) in the same run; bf16; medians of CUDA-event-timed launches after warm-up; autotuned tile configurations per kernel, block size and density; sum_ratio = sparse sum / dense sum (targets: <= 0.35 at 25%, <= 0.65 at 50%); chain_ms = the four sparse launches back to back",
        "device": {
            "name": dev.name(), "compute_capability": format!("{major}.{minor}"),
            "nvidia_driver": nvidia_driver(), "cuda_driver_api": cuda_driver_api(),
            "cublas": blas.version(), "kernel_code": dev.module_code(),
        },
        "lexp_version": env!("CARGO_PKG_VERSION"),
        "date": lexp_runtime::step_bench::today(),
        "shape": {"tokens": a.tokens, "hidden": a.hidden, "ffn": a.ffn, "group_rows": GROUP_ROWS},
        "warmup": a.warmup, "iters": a.iters, "seed": a.seed,
        "dense_cublas_ms": (0..4).map(|p| (PRODUCTS[p].to_string(), serde_json::json!(dense[p]))).collect::<serde_json::Map<_, _>>(),
        "dense_cublas_sum_ms": dense_sum,
        "dense_cublas_graph_sum_ms": dense_graph_sum,
        "runs": runs,
    });
    std::fs::write(path, serde_json::to_string_pretty(&j)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Time vs density: the four sparse products' sum per block size (solid) and each product
/// (thin), the dense cuBLAS sum (a horizontal line) and the acceptance targets (crosses).
fn plot(rows: &[Row], dense_sum: f64, path: &Path) -> Result<(), String> {
    lexp_runtime::train::plot::register_font();
    let y_max = rows
        .iter()
        .map(Row::sum)
        .fold(dense_sum, f64::max)
        .max(1e-3)
        * 1.1;
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Sparse MLP (4 products) vs dense cuBLAS, same run",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..1.05, 0.0..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("density (fraction of neuron blocks kept per 128-token group)")
        .y_desc("time (ms)")
        .draw()
        .map_err(e)?;
    let dense_line = [(0.0, dense_sum), (1.05, dense_sum)];
    chart
        .draw_series(LineSeries::new(dense_line, BLACK.stroke_width(2)))
        .map_err(e)?
        .label(format!("dense cuBLAS, 4 GEMMs ({dense_sum:.3} ms)"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    let colours = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.bs).collect();
    sizes.dedup();
    for (i, &bs) in sizes.iter().enumerate() {
        let c = colours[i % colours.len()];
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.bs == bs)
            .map(|r| (r.density, r.sum()))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
            .map_err(e)?
            .label(format!(
                "sparse, blocks of {bs}: sum of 4 (thin: each product)"
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(e)?;
        for p in 0..4 {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.bs == bs)
                .map(|r| (r.density, r.ms[p]))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.mix(0.45).stroke_width(1)))
                .map_err(e)?;
        }
    }
    let targets: Vec<(f64, f64)> = TARGETS.iter().map(|&(d, r)| (d, r * dense_sum)).collect();
    chart
        .draw_series(
            targets
                .iter()
                .map(|&p| Cross::new(p, 8, GREEN.stroke_width(3))),
        )
        .map_err(e)?
        .label("acceptance: 0.35x at 25%, 0.65x at 50%")
        .legend(|(x, y)| Cross::new((x + 10, y), 6, GREEN.stroke_width(3)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: MlpArgs,
    }

    fn args(extra: &[&str]) -> MlpArgs {
        let mut v = vec!["mlp"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().a
    }

    #[test]
    fn arguments_are_checked_before_any_gpu_work() {
        let d = args(&[]);
        assert_eq!((d.tokens, d.hidden, d.ffn), (16384, 2048, 8192));
        assert_eq!(d.block, vec![64, 128]);
        assert_eq!(d.density, vec![0.125, 0.25, 0.5, 0.75, 1.0]);
        check_args(&d).unwrap();
        for bad in [
            &["--iters", "29"][..],
            &["--density", "0"],
            &["--density", "1.5"],
            &["--block", "96"],
            &["--hidden", "100"],
            &["--tokens", "0"],
        ] {
            assert!(check_args(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn targets_apply_at_25_and_50_percent_only() {
        assert_eq!(target(0.25), Some(0.35));
        assert_eq!(target(0.5), Some(0.65));
        assert_eq!(target(0.125), None);
        assert_eq!(target(1.0), None);
    }

    #[test]
    fn report_counts_missed_targets_and_the_plot_is_a_png() {
        let dense = [0.7, 0.7, 0.7, 0.7];
        let row = |bs: usize, density: f64, each: f64| Row {
            bs,
            density,
            kept: 1,
            ms: [each; 4],
            configs: Default::default(),
            chain_ms: 4.0 * each,
            graph_ms: [each; 4],
            host_ms: [0.01; 4],
        };
        // 25%: 0.30x (met); 50%: 0.70x (missed); 100%: no target.
        let rows = vec![
            row(64, 0.25, 0.21),
            row(64, 0.5, 0.49),
            row(64, 1.0, 1.0),
            row(128, 0.25, 0.3),
        ];
        // The verdicts are the event-timed table's; the graph-replayed one only reports.
        assert_eq!(report(&rows, &dense, &[0.8; 4]), 2);
        let dir = std::env::temp_dir().join(format!("lexp-bench-mlp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("plot.png");
        plot(&rows, 2.8, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
