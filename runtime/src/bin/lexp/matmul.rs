//! `lexp bench matmul`: tensor-core kernels checked against the CPU reference, then timed
//! against cuBLAS in the same run: dense GEMMs, block-sparse GEMMs vs density (OPT-1.3B MLP
//! shapes), fused LoRA vs the PEFT-style cuBLAS sequence.

use super::json_num;
use anyhow::{bail, Context, Result};
use lexp_runtime::cublas::Blas;
use lexp_runtime::matmul_check::{self as mc, Layout, MatCheck};
use lexp_runtime::CudaDevice;

fn print_checks(rows: &[MatCheck]) -> usize {
    println!(
        "{:<14} {:<5} {:<22} {:<34} {:<9} {:>10} {:>10} {:>8} ok",
        "kernel", "dtype", "shape", "config", "out", "rel_l2", "max_abs", "tol"
    );
    let mut failed = 0;
    for r in rows {
        println!(
            "{:<14} {:<5} {:<22} {:<34} {:<9} {:>10.2e} {:>10.2e} {:>8.0e} {}",
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
    println!("{} passed, {} failed", rows.len() - failed, failed);
    failed
}

pub fn run(
    dev: &CudaDevice,
    iters: usize,
    check: bool,
    only: &str,
    json: Option<std::path::PathBuf>,
) -> Result<()> {
    let parts: Vec<&str> = only.split(',').map(str::trim).collect();
    if let Some(bad) = parts
        .iter()
        .find(|p| !["gemm", "sparse", "lora", "branch"].contains(p))
    {
        bail!("unknown part `{bad}` in --only (gemm, sparse, lora, branch)");
    }
    let want = |p: &str| parts.contains(&p);
    let (major, minor) = dev.compute_capability();
    eprintln!("device: {} (sm_{major}{minor})", dev.name());
    let blas = Blas::new(dev).context("cuBLAS (the baseline) is not available")?;
    let mut checks = vec![];
    let mut failed = 0;
    if check {
        if want("gemm") {
            checks.extend(mc::check_gemm(dev)?);
        }
        if want("sparse") {
            checks.extend(mc::check_sparse(dev)?);
            checks.extend(mc::check_sparse_mlp(dev)?);
        }
        if want("lora") {
            checks.extend(mc::check_lora(dev)?);
        }
        if want("branch") {
            checks.extend(mc::check_lora_branch(dev)?);
        }
        failed = print_checks(&checks);
    }
    // Dense GEMMs: every compiled configuration, and cuBLAS.
    let mut gemm = vec![];
    println!(
        "\n{:<10} {:>18} {:<36} {:>9} {:>9} {:>8} {:>8}",
        "kernel", "MxNxK", "config", "ms", "cuBLAS", "TFLOP/s", "of cuBLAS"
    );
    for layout in Layout::ALL.into_iter().filter(|_| want("gemm")) {
        for (m, n, k) in [(4096, 4096, 4096), (16384, 8192, 2048)] {
            let base = mc::cublas_ms(dev, &blas, layout, m, n, k, iters)?;
            for b in mc::bench_gemm(dev, layout, m, n, k, iters)? {
                println!(
                    "{:<10} {:>18} {:<36} {:>9.4} {:>9.4} {:>8.1} {:>8.1}%",
                    b.kernel,
                    format!("{m}x{n}x{k}"),
                    b.config,
                    b.ms,
                    base,
                    b.tflops,
                    100.0 * base / b.ms
                );
                gemm.push((b, base));
            }
        }
    }
    // Block-sparse vs density.
    let sparse = if want("sparse") {
        mc::bench_sparse(dev, &blas, iters)?
    } else {
        vec![]
    };
    println!(
        "\n{:<19} {:>4} {:>8} {:>9} {:>12} {:>9}  {}",
        "mode", "BS", "density", "ms", "cuBLAS dense", "ratio", "config"
    );
    for s in &sparse {
        println!(
            "{:<19} {:>4} {:>8.3} {:>9.4} {:>12.4} {:>8.3}x  {}",
            s.mode,
            s.bs,
            s.density,
            s.ms,
            s.cublas_dense_ms,
            s.ms / s.cublas_dense_ms,
            s.config
        );
    }
    // Fused LoRA vs PEFT.
    let lora = if want("lora") {
        mc::bench_lora(dev, &blas, iters)?
    } else {
        vec![]
    };
    println!(
        "\n{:<9} {:>7} {:>10} {:>10} {:>8}",
        "LoRA", "tokens", "fused ms", "PEFT ms", "speedup"
    );
    for l in &lora {
        println!(
            "{:<9} {:>7} {:>10.4} {:>10.4} {:>7.2}x",
            l.pass,
            l.m,
            l.fused_ms,
            l.peft_ms,
            l.peft_ms / l.fused_ms
        );
    }
    // The LoRA fold (the engine's form of a LoRA layer) vs PEFT.
    let fold = if want("lora") {
        mc::bench_lora_fold(dev, &blas, iters)?
    } else {
        vec![]
    };
    if !fold.is_empty() {
        println!(
            "\n{:<10} {:>7} {:>10} {:>10} {:>8} {:>9}",
            "LoRA fold", "tokens", "fold ms", "PEFT ms", "speedup", "rel L2"
        );
    }
    for l in &fold {
        println!(
            "{:<10} {:>7} {:>10.4} {:>10.4} {:>7.2}x {:>9.1e}",
            l.pass,
            l.m,
            l.fold_ms,
            l.peft_ms,
            l.peft_ms / l.fold_ms,
            l.rel
        );
    }
    // The LoRA branch kernels vs the cuBLAS calls they replace.
    let branch = if want("branch") {
        mc::bench_lora_branch(dev, &blas, iters)?
    } else {
        vec![]
    };
    if !branch.is_empty() {
        println!(
            "\n{:<16} {:<36} {:>9} {:>9} {:>8} {:>8}",
            "LoRA branch", "config", "ms", "cuBLAS", "speedup", "GB/s"
        );
    }
    for b in &branch {
        println!(
            "{:<16} {:<36} {:>9.4} {:>9.4} {:>7.2}x {:>8.0}",
            b.op,
            b.config,
            b.ms,
            b.cublas_ms,
            b.cublas_ms / b.ms,
            b.gbs
        );
    }
    if let Some(p) = json {
        let date = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_default();
        let date = date.trim();
        let gpu = dev.name();
        let c: Vec<String> = checks
            .iter()
            .map(|r| {
                format!(
                    "{{\"kernel\":\"{}\",\"dtype\":\"{}\",\"shape\":\"{}\",\"config\":\"{}\",\"output\":\"{}\",\"rel_l2\":{},\"max_abs\":{},\"tolerance\":{:e},\"pass\":{}}}",
                    r.kernel, r.dtype, r.shape, r.config, r.output, json_num(r.rel_l2), json_num(r.max_abs), r.tolerance, r.pass
                )
            })
            .collect();
        let g: Vec<String> = gemm
            .iter()
            .map(|(r, base)| {
                format!(
                    "{{\"kernel\":\"{}\",\"m\":{},\"n\":{},\"k\":{},\"config\":\"{}\",\"ms\":{:.6},\"tflops\":{:.2},\"cublas_ms\":{:.6},\"of_cublas\":{:.4}}}",
                    r.kernel, r.m, r.n, r.k, r.config, r.ms, r.tflops, base, base / r.ms
                )
            })
            .collect();
        let s: Vec<String> = sparse
            .iter()
            .map(|r| {
                format!(
                    "{{\"gpu\":\"{gpu}\",\"date\":\"{date}\",\"shape\":{{\"m\":{},\"k\":{},\"n\":{}}},\"block\":{},\"mode\":\"{}\",\"density\":{:.4},\"ms\":{:.6},\"cublas_dense_ms\":{:.6}}}",
                    r.m, r.k, r.n, r.bs, r.mode, r.density, r.ms, r.cublas_dense_ms
                )
            })
            .collect();
        let l: Vec<String> = lora
            .iter()
            .map(|r| {
                format!(
                    "{{\"pass\":\"{}\",\"m\":{},\"d\":{},\"r\":{},\"fused_ms\":{:.6},\"peft_ms\":{:.6},\"speedup\":{:.3}}}",
                    r.pass, r.m, r.d, r.r, r.fused_ms, r.peft_ms, r.peft_ms / r.fused_ms
                )
            })
            .collect();
        let lf: Vec<String> = fold
            .iter()
            .map(|r| {
                format!(
                    "{{\"pass\":\"{}\",\"m\":{},\"d\":{},\"r\":{},\"fold_ms\":{:.6},\"peft_ms\":{:.6},\"speedup\":{:.3},\"rel_l2\":{}}}",
                    r.pass, r.m, r.d, r.r, r.fold_ms, r.peft_ms, r.peft_ms / r.fold_ms, json_num(r.rel)
                )
            })
            .collect();
        let br: Vec<String> = branch
            .iter()
            .map(|r| {
                format!(
                    "{{\"op\":\"{}\",\"m\":4096,\"d\":2048,\"r\":4,\"config\":\"{}\",\"ms\":{:.6},\"cublas_ms\":{:.6},\"gb_per_s\":{:.1}}}",
                    r.op, r.config, r.ms, r.cublas_ms, r.gbs
                )
            })
            .collect();
        std::fs::write(
            &p,
            format!(
                "{{\"device\":\"{gpu}\",\"date\":\"{date}\",\"cublas_version\":{},\"iters\":{iters},\n\"checks\":[\n{}\n],\n\"gemm\":[\n{}\n],\n\"sparse\":[\n{}\n],\n\"lora\":[\n{}\n],\n\"lora_fold\":[\n{}\n],\n\"lora_branch\":[\n{}\n]}}\n",
                blas.version(),
                c.join(",\n"),
                g.join(",\n"),
                s.join(",\n"),
                l.join(",\n"),
                lf.join(",\n"),
                br.join(",\n")
            ),
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    if failed > 0 {
        bail!("{failed} checks failed");
    }
    Ok(())
}
