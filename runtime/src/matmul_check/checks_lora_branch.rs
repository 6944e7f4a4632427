//! Correctness of the LoRA branch kernels (`lexp_kernels::lora_branch`: `transpose_b`,
//! `lora_down`, `lora_expand`, `lora_wgrad` with `lora_wgrad_reduce`) on the GPU against `reference_matmul`, chained as the engine
//! runs them, for every compiled configuration: `Bᵀ` from `B`, `u = x·Aᵀ`, `y += s·u·Bᵀ` into
//! a column block of a wider buffer (the q/v blocks of the fused projection's output; the
//! other columns must keep their values), `du = s·dy·B` from such a block, `dx += du·A`,
//! `dB += s·dyᵀ·u` and `dA += duᵀ·x`; and both weight-gradient passes in one launch
//! (`lora_wgrad_pair`) with the fold's reduce (`lora_wgrad_reduce_many`) writing them.
//! Outputs are poisoned before each launch (`u`, `du`) or hold random values the expand adds
//! to (`y`, `dx`); the padding columns of `u` and `du` must come out zero.

use super::*;
use lexp_compiler::launch::TensorArg;
use lexp_kernels::reference_matmul as rm;

/// Runs the LoRA branch checks.
pub fn check_lora_branch(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let s = 2.0f32;
    for dtype in [Storage::BF16, Storage::F16] {
        let round = |v: f64| round_to(dtype.dtype(), v as f32);
        for (seed, &(m, kk, n, r)) in [
            (4096usize, 2048usize, 2048usize, 4usize),
            (200, 136, 264, 5),
            (1000, 512, 256, 16),
            (37, 64, 72, 1),
        ]
        .iter()
        .enumerate()
        {
            let rp = r.div_ceil(8) * 8;
            let shape = format!("{m} tokens, {kk} -> {n}, r {r}");
            let mut rng = Rng::new(seed as u64 + 0x10a);
            let (x, hx) = random(dev, &mut rng, dtype, &[m, kk])?;
            let (a, ha) = random(dev, &mut rng, dtype, &[r, kk])?;
            // Two modules' B in one flat buffer with a gap (B [n, r], then B2 [24, r]); the
            // output starts as a sentinel that the gap and the tail must keep.
            let (n2, gap) = (24usize, 8usize);
            let len = n * r + gap + n2 * r + gap;
            let (flat, hflat) = random(dev, &mut rng, dtype, &[len])?;
            let bt = DeviceTensor::from_f32(dev, dtype, &[len], &vec![7.0; len])?;
            let offs = DeviceTensor::from_i32(dev, &[2], &[0, (n * r + gap) as i32])?;
            let rws = DeviceTensor::from_i32(dev, &[2], &[n as i32, n2 as i32])?;
            k::transpose_b::launch(
                dev,
                &k::transpose_b::Args {
                    x: &flat.as_arg(),
                    offs: &offs.as_arg(),
                    rows: &rws.as_arg(),
                    r: r as i64,
                    y: &bt.as_arg(),
                },
            )?;
            dev.synchronize()?;
            let mut want = vec![7.0f32; len];
            for (off, rows_m) in [(0, n), (n * r + gap, n2)] {
                for i in 0..rows_m * r {
                    want[off + i] = hflat[off + (i % rows_m) * r + i / rows_m];
                }
            }
            let got_all = bt.to_f32_vec()?;
            record(
                &mut rows,
                "transpose_b",
                dtype,
                format!("{n}x{r} and {n2}x{r}, gaps kept"),
                String::new(),
                "bt",
                &got_all,
                &want,
            );
            // The q/v fold into a projection of `kk` features (room holding a sentinel).
            let fold = rm::FoldCase::new(kk, r, |n| rounded(dtype, rng.uniform(n, -1.0, 1.0)));
            let (frp, fk, fnn) = fold.dims;
            let (frows, fld) = fold.rows_ld;
            let w = DeviceTensor::from_f32(dev, dtype, &[fold.y0.len()], &fold.y0)?;
            let params = DeviceTensor::from_f32(dev, dtype, &[fold.x.len()], &fold.x)?;
            k::lora_fold::launch_with(
                dev,
                &[("RP", frp)],
                &k::lora_fold::Args {
                    x: &params.as_arg(),
                    offs: &DeviceTensor::from_i32(dev, &[3, 5], &fold.offs())?.as_arg(),
                    k: fk as i64,
                    n: fnn as i64,
                    rows: frows as i64,
                    ld: fld as i64,
                    s,
                    y: &w.as_arg(),
                },
            )?;
            let want = fold.want(s, round);
            record(
                &mut rows,
                "lora_fold",
                dtype,
                format!("q/v into {kk} features, r {r}"),
                String::new(),
                "w",
                &w.to_f32_vec()?,
                &want,
            );
            // The fold's reduces in one launch (four gradients, 16 chunks).
            let red = rm::ReduceManyCase::new(kk, r, 16, |n| rng.uniform(n, -1.0, 1.0));
            let (rq, rr, rw, rc) = red.dims;
            let g = DeviceTensor::from_f32(dev, Storage::F32, &[red.g0.len()], &red.g0)?;
            let part =
                DeviceTensor::from_f32(dev, Storage::F32, &[red.blocks * rc, rq * rw], &red.part)?;
            k::lora_wgrad_reduce_many::launch(
                dev,
                &k::lora_wgrad_reduce_many::Args {
                    part: &part.as_arg(),
                    mods: &DeviceTensor::from_i32(dev, &[4, 5], &red.mods_i32())?.as_arg(),
                    q: rq as i64,
                    r: rr as i64,
                    w: rw as i64,
                    n: (rq * rr) as i64,
                    chunks: rc as i64,
                    s,
                    acc: 1,
                    g: &g.as_arg(),
                },
            )?;
            record(
                &mut rows,
                "lora_wgrad_reduce_many",
                Storage::F32,
                format!("{kk} rows, r {r}, 4 modules"),
                String::new(),
                "g",
                &g.to_f32_vec()?,
                &red.want(s),
            );
            let got_bt = got_all[..r * n].to_vec();
            let bt2 = bt.offset_arg(0, &[r, n])?;
            // The middle `[m, n]` block of a `[m, 3n]` buffer (as the q/v blocks of the fused
            // projection's output), and its values from the buffer's host copy.
            let middle = |t: &DeviceTensor| -> Result<TensorArg, DeviceError> {
                let mut v = t.offset_arg(n, &[m, n])?;
                v.strides = vec![3 * n, 1];
                Ok(v)
            };
            let of_middle = |h: &[f32]| -> Vec<f32> {
                (0..m * n).map(|i| h[(i / n) * 3 * n + n + i % n]).collect()
            };
            for cfg in configs("lora_down") {
                let ecfg = configs("lora_expand");
                let ecfg = &ecfg[rows.len() % ecfg.len().max(1)];
                let cname = format!("{} / {}", config_text(&cfg), config_text(ecfg));
                // `u = T(s·x·wᵀ)` into a poisoned `[m, rp]`, read back.
                let down = |x: &TensorArg, w: &TensorArg, s: f32| {
                    let u = DeviceTensor::poisoned(dev, dtype, &[m, rp])?;
                    let args = k::lora_down::Args {
                        x,
                        w,
                        s,
                        u: &u.as_arg(),
                    };
                    k::lora_down::launch_with(dev, &cfg, &args)?;
                    dev.synchronize()?;
                    Ok::<_, DeviceError>((u.to_f32_vec()?, u))
                };
                // `y += s·u·w` in place.
                let expand = |u: &DeviceTensor, w: &TensorArg, s: f32, y: &TensorArg| {
                    let args = k::lora_expand::Args {
                        u: &u.as_arg(),
                        w,
                        s,
                        y,
                    };
                    k::lora_expand::launch_with(dev, ecfg, &args)?;
                    dev.synchronize()
                };
                // One row of this configuration's results.
                let rec = |rows: &mut Vec<MatCheck>, kernel, out, got: &[f32], want: &[f32]| {
                    record(
                        rows,
                        kernel,
                        dtype,
                        shape.clone(),
                        cname.clone(),
                        out,
                        got,
                        want,
                    )
                };
                // Forward: u = x·Aᵀ, then y += s·u·Bᵀ into the middle block of [m, 3n].
                let (got_u, u) = down(&x.as_arg(), &a.as_arg(), 1.0)?;
                let want_u = rm::lora_down(&hx, &ha, 1.0, m, kk, r, rp, round);
                rec(&mut rows, "lora_down", "u", &got_u, &want_u);
                let (wide, hwide) = random(dev, &mut rng, dtype, &[m, 3 * n])?;
                expand(&u, &bt2, s, &middle(&wide)?)?;
                let wy = rm::lora_expand(&of_middle(&hwide), &got_u, &got_bt, s, m, n, r, rp);
                let mut want_wide = hwide.clone();
                for (i, v) in wy.iter().enumerate() {
                    want_wide[(i / n) * 3 * n + n + i % n] = *v;
                }
                let got_wide = wide.to_f32_vec()?;
                rec(
                    &mut rows,
                    "lora_expand",
                    "y (block of 3)",
                    &got_wide,
                    &want_wide,
                );
                // Backward: du = s·dy·B from a block of a fresh [m, 3n] (values of gradient
                // size: the expanded y above overflows f16 once summed over n again), then
                // dx += du·A.
                let (wide_dy, hwide_dy) = random(dev, &mut rng, dtype, &[m, 3 * n])?;
                let dyv = middle(&wide_dy)?;
                let (got_du, du) = down(&dyv, &bt2, s)?;
                let dy = of_middle(&hwide_dy);
                let want_du = rm::lora_down(&dy, &got_bt, s, m, n, r, rp, round);
                rec(&mut rows, "lora_down", "du", &got_du, &want_du);
                let (dx, hdx) = random(dev, &mut rng, dtype, &[m, kk])?;
                expand(&du, &a.as_arg(), 1.0, &dx.as_arg())?;
                let want_dx = rm::lora_expand(&hdx, &got_du, &ha, 1.0, m, kk, r, rp);
                let got_dx = dx.to_f32_vec()?;
                rec(&mut rows, "lora_expand", "dx", &got_dx, &want_dx);
                // Weight gradients: dB += s·dyᵀ·u ([n, r]) and dA += du·x ([r, kk]), split over
                // 16 token chunks into a poisoned scratch, reduced in order into gradients
                // that already hold values.
                let wcfg = configs("lora_wgrad");
                let wcfg = &wcfg[rows.len() % wcfg.len().max(1)];
                let compact = |v: &[f32]| -> Vec<f32> {
                    (0..m * r).map(|i| v[(i / r) * rp + i % r]).collect()
                };
                for (out, rank_side, wide, host_wide, q, tr, scale) in [
                    ("dB", &u, &dyv, &dy, n, 0usize, s),
                    ("dA", &du, &x.as_arg(), &hx, kk, 1, 1.0),
                ] {
                    let chunks = 16;
                    let part = DeviceTensor::poisoned(dev, Storage::F32, &[chunks * q * rp])?;
                    k::lora_wgrad::launch_with(
                        dev,
                        wcfg,
                        &k::lora_wgrad::Args {
                            a: &rank_side.as_arg(),
                            b: wide,
                            part: &part.offset_arg(0, &[chunks * q, rp])?,
                        },
                    )?;
                    let (g, g0) = random(dev, &mut rng, Storage::F32, &[q * r])?;
                    k::lora_wgrad_reduce::launch(
                        dev,
                        &k::lora_wgrad_reduce::Args {
                            part: &part.offset_arg(0, &[chunks, q * rp])?,
                            q: q as i64,
                            r: r as i64,
                            rp: rp as i64,
                            tr: tr as i64,
                            s: scale,
                            g: &g.as_arg(),
                        },
                    )?;
                    dev.synchronize()?;
                    let cu = compact(&rank_side.to_f32_vec()?);
                    let grad = if tr == 0 {
                        rm::lora_grad_b(host_wide, &cu, m, q, r)
                    } else {
                        rm::lora_grad_a(&cu, host_wide, m, q, r)
                    };
                    let want: Vec<f32> = g0.iter().zip(&grad).map(|(a, b)| a + scale * b).collect();
                    record(
                        &mut rows,
                        "lora_wgrad",
                        Storage::F32,
                        shape.clone(),
                        config_text(wcfg),
                        out,
                        &g.to_f32_vec()?,
                        &want,
                    );
                }
                // Both passes in one launch (`lora_wgrad_pair`, as the fold pairs them): dB
                // over dy and dA over a second [m, n] input, into a poisoned scratch, reduced
                // by `lora_wgrad_reduce_many` in its writing form (`acc = 0`) into poisoned
                // gradients [dB [n, r] | dA [r, n]].
                let pcfg = configs("lora_wgrad_pair");
                let pcfg = &pcfg[rows.len() % pcfg.len().max(1)];
                let (x2, hx2) = random(dev, &mut rng, dtype, &[m, n])?;
                let chunks = 16;
                let part = DeviceTensor::poisoned(dev, Storage::F32, &[2 * chunks * n * rp])?;
                k::lora_wgrad_pair::launch_with(
                    dev,
                    pcfg,
                    &k::lora_wgrad_pair::Args {
                        a0: &u.as_arg(),
                        b0: &dyv,
                        a1: &du.as_arg(),
                        b1: &x2.as_arg(),
                        part: &part.offset_arg(0, &[2 * chunks * n, rp])?,
                    },
                )?;
                let g = DeviceTensor::poisoned(dev, Storage::F32, &[2 * n * r])?;
                let mods = DeviceTensor::from_i32(dev, &[2, 5], &rm::PairCase::mods_i32(n, r))?;
                k::lora_wgrad_reduce_many::launch(
                    dev,
                    &k::lora_wgrad_reduce_many::Args {
                        part: &part.offset_arg(0, &[2 * chunks, n * rp])?,
                        mods: &mods.as_arg(),
                        q: n as i64,
                        r: r as i64,
                        w: rp as i64,
                        n: (n * r) as i64,
                        chunks: chunks as i64,
                        s,
                        acc: 0,
                        g: &g.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let (cu, cdu) = (compact(&u.to_f32_vec()?), compact(&du.to_f32_vec()?));
                let want = rm::PairCase::want((&dy, &cu), (&cdu, &hx2), (m, n, r), s);
                record(
                    &mut rows,
                    "lora_wgrad_pair",
                    Storage::F32,
                    shape.clone(),
                    config_text(pcfg),
                    "dB, dA",
                    &g.to_f32_vec()?,
                    &want,
                );
            }
        }
    }
    Ok(rows)
}
