//! Correctness of `select_blocks` (device-side block selection) on the GPU against
//! `lexp_kernels::reference_select`: bf16, f16 and f32 predicted log-masses, block counts
//! filling each compiled bound and between them, token counts that are not group multiples,
//! budgets from one block to all of them. The list is poisoned before each launch (counts -7,
//! ids -9); a slot past a group's count must keep its poison. A group passes when
//! `check_selection` accepts its count and ids; the row's `rel_l2` is the share of groups that
//! fail.

use super::*;
use crate::block_list::BlockList;
use crate::sparse_ops;
use lexp_kernels::reference_select::{failing_groups, select_blocks};

/// Runs the selection checks.
pub fn check_select(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let mut rng = Rng::new(0x5e1ec7);
    for dtype in [Storage::BF16, Storage::F16, Storage::F32] {
        for (nb, t, budget) in [
            (5usize, 1usize, 1.0f64),
            (12, 300, 0.5),
            (24, 257, 0.25),
            (64, 640, 0.3),
        ] {
            let max_blocks = ((budget * nb as f64).ceil() as usize).clamp(1, nb);
            let groups = t.div_ceil(sparse_ops::GROUP_ROWS);
            // Hot blocks over a cold background, as predicted ReLU masses look.
            let u = rng.uniform(t * nb, 0.0, 1.0);
            let mut o: Vec<f32> = rng
                .uniform(t * nb, -4.0, 2.5)
                .into_iter()
                .zip(&u)
                .map(|(v, &p)| if p < 0.8 { v.min(0.2) } else { v })
                .collect();
            o = rounded(dtype, o);
            let bias = rng.uniform(nb, -0.3, 0.3);
            let (scale, target) = (0.7f32, 0.9f32);
            let od = DeviceTensor::from_f32(dev, dtype, &[nb, t], &o)?;
            let bd = DeviceTensor::from_f32(dev, Storage::F32, &[nb], &bias)?;
            let counts = DeviceTensor::from_i32(dev, &[groups], &vec![-7; groups])?;
            let indices =
                DeviceTensor::from_i32(dev, &[groups, max_blocks], &vec![-9; groups * max_blocks])?;
            let list = BlockList::from_device(counts, indices, nb)
                .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
            sparse_ops::select_blocks(dev, &od.as_arg(), &bd.as_arg(), (scale, target), &list)
                .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
            dev.synchronize()?;
            let (c, i) = (list.counts().to_i32_vec()?, list.indices().to_i32_vec()?);
            let want = select_blocks(&o, (t, nb), &bias, scale, target, max_blocks, 128);
            let failed = failing_groups(&want, (&c, &i), (target, max_blocks), -9, 1e-4);
            rows.push(MatCheck {
                kernel: "select_blocks",
                dtype: dtype.name(),
                shape: format!("{t} tokens, {nb} blocks, at most {max_blocks}"),
                config: String::new(),
                output: "list",
                rel_l2: failed as f64 / groups as f64,
                max_abs: 0.0,
                tolerance: 0.0,
                non_finite: 0,
                pass: failed == 0,
            });
        }
    }
    Ok(rows)
}
