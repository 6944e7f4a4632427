//! `lexp bench matmul`: tensor-core kernels checked against the CPU reference, then timed
//! against cuBLAS in the same run.

use anyhow::{bail, Context, Result};
use lexp_runtime::matmul_check::{self as mc, Layout};
use lexp_runtime::CudaDevice;

pub fn run(
    dev: &CudaDevice,
    iters: usize,
    check: bool,
    json: Option<std::path::PathBuf>,
) -> Result<()> {
    let (major, minor) = dev.compute_capability();
    eprintln!("device: {} (sm_{major}{minor})", dev.name());
    let mut failed = 0;
    let mut checks = vec![];
    if check {
        checks = mc::check_gemm(dev)?;
        println!(
            "{:<14} {:<5} {:<22} {:<34} {:<5} {:>10} {:>10} {:>8} ok",
            "kernel", "dtype", "shape", "config", "out", "rel_l2", "max_abs", "tol"
        );
        for r in &checks {
            println!(
                "{:<14} {:<5} {:<22} {:<34} {:<5} {:>10.2e} {:>10.2e} {:>8.0e} {}",
                r.kernel,
                r.dtype,
                r.shape,
                r.config,
                r.output,
                r.rel_l2,
                r.max_abs,
                r.tolerance,
                if r.pass { "ok" } else { "FAIL" }
            );
            failed += (!r.pass) as usize;
        }
        println!("{} passed, {} failed", checks.len() - failed, failed);
    }
    let mut benches = vec![];
    for layout in Layout::ALL {
        for (m, n, k) in [(4096, 4096, 4096), (16384, 8192, 2048)] {
            benches.extend(mc::bench_gemm(dev, layout, m, n, k, iters)?);
        }
    }
    println!("{:<10} {:>20} {:<34} {:>10} {:>8}", "kernel", "MxNxK", "config", "ms", "TFLOP/s");
    for b in &benches {
        println!(
            "{:<10} {:>20} {:<34} {:>10.4} {:>8.1}",
            b.kernel,
            format!("{}x{}x{}", b.m, b.n, b.k),
            b.config,
            b.ms,
            b.tflops
        );
    }
    if let Some(p) = json {
        let c: Vec<String> = checks
            .iter()
            .map(|r| {
                format!(
                    "{{\"kernel\":\"{}\",\"dtype\":\"{}\",\"shape\":\"{}\",\"config\":\"{}\",\"output\":\"{}\",\"rel_l2\":{:e},\"max_abs\":{:e},\"tolerance\":{:e},\"pass\":{}}}",
                    r.kernel, r.dtype, r.shape, r.config, r.output, r.rel_l2, r.max_abs, r.tolerance, r.pass
                )
            })
            .collect();
        let b: Vec<String> = benches
            .iter()
            .map(|r| {
                format!(
                    "{{\"kernel\":\"{}\",\"m\":{},\"n\":{},\"k\":{},\"config\":\"{}\",\"ms\":{:.6},\"tflops\":{:.2}}}",
                    r.kernel, r.m, r.n, r.k, r.config, r.ms, r.tflops
                )
            })
            .collect();
        std::fs::write(
            &p,
            format!(
                "{{\"device\":\"{}\",\"iters\":{iters},\"checks\":[\n{}\n],\"gemm\":[\n{}\n]}}\n",
                dev.name(),
                c.join(",\n"),
                b.join(",\n")
            ),
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    if failed > 0 {
        bail!("{failed} checks failed");
    }
    Ok(())
}
