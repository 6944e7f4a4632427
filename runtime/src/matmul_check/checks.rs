//! Correctness of the tensor-core kernels on the GPU against the CPU references.

use super::*;
use crate::block_list::{self, BlockList};
use crate::sparse_ops;
use lexp_kernels::reference_matmul as rm;

/// Dense GEMM checks: every layout, bf16 and f16, shapes with edges.
pub fn check_gemm(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let shapes = [
        (8, 8, 16),
        (200, 136, 72),
        (328, 264, 520),
        (1024, 512, 256),
    ];
    for layout in Layout::ALL {
        for dtype in [Storage::BF16, Storage::F16] {
            if !has_dtype(layout.kernel(), dtype) {
                continue;
            }
            for (seed, &(m, n, kk)) in shapes.iter().enumerate() {
                let mut rng = Rng::new(seed as u64 + 11);
                let (da, db) = layout.dims(m, n, kk);
                let (ta, ha) = random(dev, &mut rng, dtype, &da)?;
                let (tb, hb) = random(dev, &mut rng, dtype, &db)?;
                let mut tc = DeviceTensor::poisoned(dev, dtype, &[m, n])?;
                let (tra, trb) = layout.trans();
                let want = rm::matmul(&ha, &hb, m, kk, n, tra, trb);
                for cfg in configs(layout.kernel()) {
                    tc.poison()?;
                    launch_gemm(dev, layout, &cfg, &ta.as_arg(), &tb.as_arg(), &tc.as_arg())?;
                    dev.synchronize()?;
                    let got = tc.to_f32_vec()?;
                    record(
                        &mut rows,
                        layout.kernel(),
                        dtype,
                        format!("{m}x{n}x{kk}"),
                        config_text(&cfg),
                        "c",
                        &got,
                        &want,
                    );
                }
            }
        }
    }
    Ok(rows)
}

/// A device tensor filled with `v` everywhere (the sentinel of outputs a kernel must leave
/// partly untouched).
fn filled(
    dev: &CudaDevice,
    dtype: Storage,
    dims: &[usize],
    v: f32,
) -> Result<(DeviceTensor, Vec<f32>), DeviceError> {
    let host = vec![v; dims.iter().product()];
    Ok((DeviceTensor::from_f32(dev, dtype, dims, &host)?, host))
}

/// A random block list with one empty group (the early-exit path) and the rest at `density`.
fn list(
    dev: &CudaDevice,
    groups: usize,
    num_blocks: usize,
    density: f64,
    seed: u64,
) -> Result<(BlockList, Vec<i32>, Vec<i32>, usize), DeviceError> {
    let (mut counts, idx, max) = block_list::random_host(groups, num_blocks, density, seed);
    // Pad to one more slot than used, so the bound is not the count; group 1 keeps nothing.
    let max2 = max + 1;
    let mut padded = vec![-1i32; groups * max2];
    for g in 0..groups {
        padded[g * max2..g * max2 + max].copy_from_slice(&idx[g * max..g * max + max]);
    }
    if groups > 1 {
        counts[1] = 0;
    }
    let bl = BlockList::from_host(dev, &counts, &padded, max2, num_blocks)
        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
    Ok((bl, counts, padded, max2))
}

/// Block-sparse GEMM checks: the three modes, both block sizes, edge row counts.
pub fn check_sparse(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let bm = sparse_ops::GROUP_ROWS;
    for dtype in [Storage::BF16, Storage::F16] {
        for bs in [64usize, 128] {
            for (seed, &(m, kk, nb)) in [(300usize, 264usize, 5usize), (512, 128, 8)]
                .iter()
                .enumerate()
            {
                for warps in [4usize, 8] {
                    let cfg = vec![("W", warps)];
                    let mut rng = Rng::new(seed as u64 + 31);
                    let groups = m.div_ceil(bm);
                    let f = nb * bs;
                    let (bl, counts, idx, max) = list(dev, groups, nb, 0.6, seed as u64)?;
                    // sparse_out: x [m, kk] · w [f, kk]ᵀ.
                    let (x, hx) = random(dev, &mut rng, dtype, &[m, kk])?;
                    let (w, hw) = random(dev, &mut rng, dtype, &[f, kk])?;
                    let (h, init) = filled(dev, dtype, &[m, max * bs], 7.0)?;
                    let has = |kernel: &str| has_config(kernel, &[("W", warps), ("BS", bs)]);
                    let shape = format!("{m}x{kk} -> {nb}x{bs}");
                    if has("sparse_out") {
                        sparse_ops::sparse_out(
                            dev,
                            &x.as_arg(),
                            &w.as_arg(),
                            &bl,
                            &h.as_arg(),
                            bs,
                            &cfg,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
                        dev.synchronize()?;
                        let want =
                            rm::sparse_out(&hx, &hw, m, kk, f, &counts, &idx, max, bm, bs, &init);
                        record(
                            &mut rows,
                            "sparse_out",
                            dtype,
                            shape.clone(),
                            format!("BS={bs},W={warps}"),
                            "h",
                            &h.to_f32_vec()?,
                            &want,
                        );
                    }
                    // sparse_red: h [m, max*bs] (compact, random) · w2 [n, f]ᵀ.
                    let n = 136;
                    let (hc, hh) = random(dev, &mut rng, dtype, &[m, max * bs])?;
                    let (w2, hw2) = random(dev, &mut rng, dtype, &[n, f])?;
                    let mut y = DeviceTensor::poisoned(dev, dtype, &[m, n])?;
                    y.poison()?;
                    if has("sparse_red") {
                        sparse_ops::sparse_red(
                            dev,
                            &hc.as_arg(),
                            &w2.as_arg(),
                            &bl,
                            &y.as_arg(),
                            bs,
                            &cfg,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
                        dev.synchronize()?;
                        let want = rm::sparse_red(&hh, &hw2, m, n, f, &counts, &idx, max, bm, bs);
                        record(
                            &mut rows,
                            "sparse_red",
                            dtype,
                            shape.clone(),
                            format!("BS={bs},W={warps}"),
                            "y",
                            &y.to_f32_vec()?,
                            &want,
                        );
                    }
                    // sparse_both: out list over w's rows, in list = bl over its columns.
                    let nbo = 3;
                    let (blo, co, io, maxo) = list(dev, groups, nbo, 0.7, seed as u64 + 100)?;
                    let (wb, hwb) = random(dev, &mut rng, dtype, &[nbo * bs, f])?;
                    let (o, init_o) = filled(dev, dtype, &[m, maxo * bs], 7.0)?;
                    if has("sparse_both") {
                        sparse_ops::sparse_both(
                            dev,
                            &hc.as_arg(),
                            &wb.as_arg(),
                            &blo,
                            &bl,
                            &o.as_arg(),
                            bs,
                            &cfg,
                        )
                        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
                        dev.synchronize()?;
                        let want = rm::sparse_both(
                            &hh,
                            &hwb,
                            m,
                            nbo * bs,
                            f,
                            &co,
                            &io,
                            maxo,
                            &counts,
                            &idx,
                            max,
                            bm,
                            bs,
                            &init_o,
                        );
                        record(
                            &mut rows,
                            "sparse_both",
                            dtype,
                            shape.clone(),
                            format!("BS={bs},W={warps}"),
                            "out",
                            &o.to_f32_vec()?,
                            &want,
                        );
                    }
                }
            }
        }
    }
    Ok(rows)
}

/// Fused LoRA checks (forward, backward to the input, weight gradients).
pub fn check_lora(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let r = 16;
    let s = 2.0f32;
    for dtype in [Storage::BF16, Storage::F16] {
        let round = |v: f64| round_to(dtype.dtype(), v as f32);
        for (seed, &(m, kk, n)) in [(200usize, 136usize, 264usize), (1024, 512, 256)]
            .iter()
            .enumerate()
        {
            for warps in [4usize, 8] {
                let tile = [("W", warps)];
                let tname = format!("W={warps}");
                let mut rng = Rng::new(seed as u64 + 77);
                let shape = format!("{m}x{kk} -> {n}, r {r}");
                let (x, hx) = random(dev, &mut rng, dtype, &[m, kk])?;
                let (w, hw) = random(dev, &mut rng, dtype, &[n, kk])?;
                let (bias, hbias) = random(dev, &mut rng, dtype, &[n])?;
                let (a, ha) = random(dev, &mut rng, dtype, &[r, kk])?;
                let (b, hb) = random(dev, &mut rng, dtype, &[n, r])?;
                let y = DeviceTensor::poisoned(dev, dtype, &[m, n])?;
                let xa = DeviceTensor::poisoned(dev, dtype, &[m, r])?;
                if !has_config("lora_fwd", &tile) || !has_config("lora_bwd_dx", &tile) {
                    continue;
                }
                k::lora_fwd::launch_with(
                    dev,
                    &tile,
                    &k::lora_fwd::Args {
                        x: &x.as_arg(),
                        w: &w.as_arg(),
                        bias: &bias.as_arg(),
                        a: &a.as_arg(),
                        b: &b.as_arg(),
                        s,
                        y: &y.as_arg(),
                        xa: &xa.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let (wy, wxa) =
                    rm::lora_fwd(&hx, &hw, Some(&hbias), &ha, &hb, s, m, kk, n, r, round);
                let got_xa = xa.to_f32_vec()?;
                record(
                    &mut rows,
                    "lora_fwd",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "xa",
                    &got_xa,
                    &wxa,
                );
                record(
                    &mut rows,
                    "lora_fwd",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "y",
                    &y.to_f32_vec()?,
                    &wy,
                );
                // Backward to the input.
                let (dy, hdy) = random(dev, &mut rng, dtype, &[m, n])?;
                let dx = DeviceTensor::poisoned(dev, dtype, &[m, kk])?;
                let u = DeviceTensor::poisoned(dev, dtype, &[m, r])?;
                k::lora_bwd_dx::launch_with(
                    dev,
                    &tile,
                    &k::lora_bwd_dx::Args {
                        dy: &dy.as_arg(),
                        w: &w.as_arg(),
                        a: &a.as_arg(),
                        b: &b.as_arg(),
                        s,
                        dx: &dx.as_arg(),
                        u: &u.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let (wdx, wu) = rm::lora_bwd_dx(&hdy, &hw, &ha, &hb, s, m, kk, n, r, round);
                let got_u = u.to_f32_vec()?;
                record(
                    &mut rows,
                    "lora_bwd_dx",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "u",
                    &got_u,
                    &wu,
                );
                record(
                    &mut rows,
                    "lora_bwd_dx",
                    dtype,
                    shape.clone(),
                    tname.clone(),
                    "dx",
                    &dx.to_f32_vec()?,
                    &wdx,
                );
                // Weight gradients from the kernel's own u and xa.
                let mut da = DeviceTensor::zeros(dev, Storage::F32, &[r, kk])?;
                let mut db = DeviceTensor::zeros(dev, Storage::F32, &[n, r])?;
                for cfg in configs("lora_grad")
                    .into_iter()
                    .filter(|c| cfg_value(c, "W") == warps)
                {
                    da.fill_zero()?;
                    db.fill_zero()?;
                    let (bp, bq) = (cfg_value(&cfg, "BP"), cfg_value(&cfg, "BQ"));
                    // dA = uᵀ x: P = r; dB = dyᵀ xa: Q = r. Each config runs where it fits.
                    if bp == 16 {
                        k::lora_grad::launch_with(
                            dev,
                            &cfg,
                            &k::lora_grad::Args {
                                a: &u.as_arg(),
                                b: &x.as_arg(),
                                c: &da.as_arg(),
                            },
                        )?;
                        dev.synchronize()?;
                        let want = rm::lora_grad_a(&got_u, &hx, m, kk, r);
                        record(
                            &mut rows,
                            "lora_grad",
                            dtype,
                            shape.clone(),
                            config_text(&cfg),
                            "dA",
                            &da.to_f32_vec()?,
                            &want,
                        );
                    }
                    if bq == 16 {
                        k::lora_grad::launch_with(
                            dev,
                            &cfg,
                            &k::lora_grad::Args {
                                a: &dy.as_arg(),
                                b: &xa.as_arg(),
                                c: &db.as_arg(),
                            },
                        )?;
                        dev.synchronize()?;
                        let want = rm::lora_grad_b(&hdy, &got_xa, m, n, r);
                        record(
                            &mut rows,
                            "lora_grad",
                            dtype,
                            shape.clone(),
                            config_text(&cfg),
                            "dB",
                            &db.to_f32_vec()?,
                            &want,
                        );
                    }
                }
            }
        }
    }
    Ok(rows)
}
