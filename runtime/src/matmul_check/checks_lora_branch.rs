//! Correctness of the LoRA branch kernels (`lexp_kernels::lora_branch`: `transpose`,
//! `lora_down`, `lora_expand`) on the GPU against `reference_matmul`, chained as the engine
//! runs them, for every compiled configuration: `Bᵀ` from `B`, `u = x·Aᵀ`, `y += s·u·Bᵀ` into
//! a column block of a wider buffer (the q/v blocks of the fused projection's output; the
//! other columns must keep their sentinel), `du = s·dy·B` from such a block, `dx += du·A`.
//! Outputs are poisoned before each launch (`u`, `du`) or hold random values the expand adds
//! to (`y`, `dx`); the padding columns of `u` and `du` must come out zero.

use super::*;
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
            let (b, hb) = random(dev, &mut rng, dtype, &[n * r])?;
            let bt = DeviceTensor::poisoned(dev, dtype, &[r * n])?;
            k::transpose::launch(
                dev,
                &k::transpose::Args {
                    x: &b.as_arg(),
                    rows: n as i64,
                    y: &bt.as_arg(),
                },
            )?;
            dev.synchronize()?;
            let want_bt: Vec<f32> = (0..r * n).map(|i| hb[(i % n) * r + i / n]).collect();
            let got_bt = bt.to_f32_vec()?;
            record(
                &mut rows,
                "transpose",
                dtype,
                format!("{n}x{r}"),
                String::new(),
                "bt",
                &got_bt,
                &want_bt,
            );
            let bt2 = bt.offset_arg(0, &[r, n])?;
            for cfg in configs("lora_down") {
                let ecfg = configs("lora_expand");
                let ecfg = &ecfg[rows.len() % ecfg.len().max(1)];
                let cname = format!("{} / {}", config_text(&cfg), config_text(ecfg));
                // Forward: u = x·Aᵀ, then y += s·u·Bᵀ into the middle block of [m, 3n].
                let u = DeviceTensor::poisoned(dev, dtype, &[m, rp])?;
                k::lora_down::launch_with(
                    dev,
                    &cfg,
                    &k::lora_down::Args {
                        x: &x.as_arg(),
                        w: &a.as_arg(),
                        s: 1.0,
                        u: &u.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let got_u = u.to_f32_vec()?;
                let want_u = rm::lora_down(&hx, &ha, 1.0, m, kk, r, rp, round);
                record(
                    &mut rows,
                    "lora_down",
                    dtype,
                    shape.clone(),
                    cname.clone(),
                    "u",
                    &got_u,
                    &want_u,
                );
                let (wide, hwide) = random(dev, &mut rng, dtype, &[m, 3 * n])?;
                let mut yv = wide.offset_arg(n, &[m, n])?;
                yv.dims = vec![m, n];
                yv.strides = vec![3 * n, 1];
                k::lora_expand::launch_with(
                    dev,
                    ecfg,
                    &k::lora_expand::Args {
                        u: &u.as_arg(),
                        w: &bt2,
                        s,
                        y: &yv,
                    },
                )?;
                dev.synchronize()?;
                let y0: Vec<f32> = (0..m * n)
                    .map(|i| hwide[(i / n) * 3 * n + n + i % n])
                    .collect();
                let wy = rm::lora_expand(&y0, &got_u, &got_bt, s, m, n, r, rp);
                let mut want_wide = hwide.clone();
                for (i, v) in wy.iter().enumerate() {
                    want_wide[(i / n) * 3 * n + n + i % n] = *v;
                }
                record(
                    &mut rows,
                    "lora_expand",
                    dtype,
                    shape.clone(),
                    cname.clone(),
                    "y (block of 3)",
                    &wide.to_f32_vec()?,
                    &want_wide,
                );
                // Backward: du = s·dy·B from that block, then dx += du·A.
                let du = DeviceTensor::poisoned(dev, dtype, &[m, rp])?;
                k::lora_down::launch_with(
                    dev,
                    &cfg,
                    &k::lora_down::Args {
                        x: &yv,
                        w: &bt2,
                        s,
                        u: &du.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let got_wide = wide.to_f32_vec()?;
                let dy: Vec<f32> = (0..m * n)
                    .map(|i| got_wide[(i / n) * 3 * n + n + i % n])
                    .collect();
                let got_du = du.to_f32_vec()?;
                let want_du = rm::lora_down(&dy, &got_bt, s, m, n, r, rp, round);
                record(
                    &mut rows,
                    "lora_down",
                    dtype,
                    shape.clone(),
                    cname.clone(),
                    "du",
                    &got_du,
                    &want_du,
                );
                let (dx, hdx) = random(dev, &mut rng, dtype, &[m, kk])?;
                k::lora_expand::launch_with(
                    dev,
                    ecfg,
                    &k::lora_expand::Args {
                        u: &du.as_arg(),
                        w: &a.as_arg(),
                        s: 1.0,
                        y: &dx.as_arg(),
                    },
                )?;
                dev.synchronize()?;
                let want_dx = rm::lora_expand(&hdx, &got_du, &ha, 1.0, m, kk, r, rp);
                record(
                    &mut rows,
                    "lora_expand",
                    dtype,
                    shape.clone(),
                    cname,
                    "dx",
                    &dx.to_f32_vec()?,
                    &want_dx,
                );
            }
        }
    }
    Ok(rows)
}
