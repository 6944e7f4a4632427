//! Correctness of the dynamic-aware MLP operators (`sparse_fc1_fwd`, `sparse_fc2_fwd`,
//! `sparse_fc2_dh`, `sparse_fc1_dx`, `sparse_colsum`) on the GPU against `lexp_kernels::reference_sparse_mlp`: every compiled
//! configuration, bf16 and f16, blocks of 64 and 128, token counts that are not group
//! multiples, ragged block lists with an empty group; compact outputs pre-filled with a
//! sentinel that slots past a count must keep, dense outputs poisoned.

use super::*;
use crate::block_list::BlockList;
use crate::sparse_ops::{self, SparseOpError};
use lexp_kernels::reference_sparse_mlp::{self as rs, Blocks};

/// What unused compact slots hold before a launch (and must still hold after it).
const SENTINEL: f32 = 7.0;

/// A ragged random list: each group keeps a random number of distinct blocks (in random
/// order) up to `max = min(nb, 5)`, padded with -1; group 1 keeps nothing, group 0 keeps
/// `max`. Returns the uploaded list and its host arrays.
pub(crate) fn ragged_list(
    dev: &CudaDevice,
    rng: &mut Rng,
    groups: usize,
    nb: usize,
) -> Result<(BlockList, Vec<i32>, Vec<i32>, usize), DeviceError> {
    let max = nb.min(5);
    let below = |rng: &mut Rng, n: usize| {
        ((rng.uniform(1, 0.0, 1.0)[0] as f64 * n as f64) as usize).min(n - 1)
    };
    let mut counts = vec![];
    let mut idx = vec![-1i32; groups * max];
    for g in 0..groups {
        let c = match g {
            0 => max,
            1 => 0,
            _ => below(rng, max + 1),
        };
        let mut ids: Vec<i32> = (0..nb as i32).collect();
        for i in 0..c {
            let j = i + below(rng, nb - i);
            ids.swap(i, j);
        }
        idx[g * max..g * max + c].copy_from_slice(&ids[..c]);
        counts.push(c as i32);
    }
    let bl = BlockList::from_host(dev, &counts, &idx, max, nb)
        .map_err(|e| DeviceError::InvalidArgument(e.to_string()))?;
    Ok((bl, counts, idx, max))
}

/// Records a compact output twice: its kept slots against `want` (other positions zeroed on
/// both sides, so that the sentinel does not dilute the relative error), and an exact check
/// that every slot past a group's count still holds [`SENTINEL`] (`max_abs` is the largest
/// deviation there).
#[allow(clippy::too_many_arguments)]
fn record_compact(
    rows: &mut Vec<MatCheck>,
    kernel: &'static str,
    dtype: Storage,
    shape: &str,
    config: String,
    output: &'static str,
    got: &[f32],
    want: &[f32],
    list: Blocks,
) {
    let width = list.max_blocks * list.bs;
    let kept = |r: usize, c: usize| {
        let count = list.counts.get(r / list.bm).copied().unwrap_or(0).max(0) as usize;
        c < count * list.bs
    };
    let (mut g, mut w) = (got.to_vec(), want.to_vec());
    let (mut written, mut worst) = (0usize, 0f64);
    for (i, (gv, wv)) in g.iter_mut().zip(w.iter_mut()).enumerate() {
        if !kept(i / width, i % width) {
            if gv.to_bits() != SENTINEL.to_bits() {
                written += 1;
                worst = worst.max((*gv as f64 - SENTINEL as f64).abs());
            }
            *gv = 0.0;
            *wv = 0.0;
        }
    }
    record(
        rows,
        kernel,
        dtype,
        shape.to_string(),
        config.clone(),
        output,
        &g,
        &w,
    );
    rows.push(MatCheck {
        kernel,
        dtype: dtype.name(),
        shape: shape.to_string(),
        config,
        output: "untouched",
        rel_l2: 0.0,
        max_abs: if worst.is_nan() { f64::INFINITY } else { worst },
        tolerance: 0.0,
        non_finite: written,
        pass: written == 0,
    });
}

fn op_err(e: SparseOpError) -> DeviceError {
    DeviceError::InvalidArgument(e.to_string())
}

/// The compiled configurations of `kernel` with block size `bs` and element type `dtype`.
fn configs_for(kernel: &str, bs: usize, dtype: Storage) -> Vec<Vec<(&'static str, usize)>> {
    if !has_dtype(kernel, dtype) {
        return vec![];
    }
    configs(kernel)
        .into_iter()
        .filter(|c| cfg_value(c, "BS") == bs)
        .collect()
}

/// The three operators' checks (see the module docs).
pub fn check_sparse_mlp(dev: &CudaDevice) -> Result<Vec<MatCheck>, DeviceError> {
    let mut rows = vec![];
    let bm = sparse_ops::GROUP_ROWS;
    for dtype in [Storage::BF16, Storage::F16] {
        for bs in [64usize, 128] {
            // (tokens, hidden, blocks): a ragged last group and a hidden size that is not a
            // tile multiple; then group multiples with a wider hidden size.
            for (seed, &(m, hd, nb)) in [(300usize, 264usize, 5usize), (512, 392, 8)]
                .iter()
                .enumerate()
            {
                let mut rng = Rng::new(seed as u64 + 1000 * bs as u64 + 57);
                let groups = m.div_ceil(bm);
                let f = nb * bs;
                let (bl, counts, idx, max) = ragged_list(dev, &mut rng, groups, nb)?;
                let list = Blocks {
                    counts: &counts,
                    indices: &idx,
                    max_blocks: max,
                    bm,
                    bs,
                };
                let width = max * bs;
                let shape = format!("{m}x{hd} -> {nb}x{bs}");
                let sentinel = vec![SENTINEL; m * width];
                // fc1 forward: x [m, hd], w1 [f, hd], b1 [f] -> compact h.
                let (x, hx) = random(dev, &mut rng, dtype, &[m, hd])?;
                let (w1, hw1) = random(dev, &mut rng, dtype, &[f, hd])?;
                let (b1, hb1) = random(dev, &mut rng, dtype, &[f])?;
                let mut h = DeviceTensor::from_f32(dev, dtype, &[m, width], &sentinel)?;
                let want = rs::sparse_fc1_fwd(&hx, &hw1, &hb1, (m, hd, f), list, &sentinel);
                for cfg in configs_for("sparse_fc1_fwd", bs, dtype) {
                    h.write_f32(&sentinel)?;
                    sparse_ops::sparse_fc1_fwd(
                        dev,
                        &x.as_arg(),
                        &w1.as_arg(),
                        &b1.as_arg(),
                        &bl,
                        &h.as_arg(),
                        bs,
                        &cfg,
                    )
                    .map_err(op_err)?;
                    dev.synchronize()?;
                    record_compact(
                        &mut rows,
                        "sparse_fc1_fwd",
                        dtype,
                        &shape,
                        config_text(&cfg),
                        "h",
                        &h.to_f32_vec()?,
                        &want,
                        list,
                    );
                }
                // fc2 forward with bias and residual: a random compact h, w2 [hd, f], b2 [hd],
                // res [m, hd] -> out [m, hd].
                let (hc, hhc) = random(dev, &mut rng, dtype, &[m, width])?;
                let (w2f, hw2f) = random(dev, &mut rng, dtype, &[hd, f])?;
                let (b2, hb2) = random(dev, &mut rng, dtype, &[hd])?;
                let (res, hres) = random(dev, &mut rng, dtype, &[m, hd])?;
                let mut y = DeviceTensor::poisoned(dev, dtype, &[m, hd])?;
                let want = rs::sparse_fc2_fwd(&hhc, &hw2f, &hb2, &hres, (m, hd, f), list);
                for cfg in configs_for("sparse_fc2_fwd", bs, dtype) {
                    y.poison()?;
                    sparse_ops::sparse_fc2_fwd(
                        dev,
                        &hc.as_arg(),
                        &w2f.as_arg(),
                        &b2.as_arg(),
                        &res.as_arg(),
                        &bl,
                        &y.as_arg(),
                        bs,
                        &cfg,
                    )
                    .map_err(op_err)?;
                    dev.synchronize()?;
                    record(
                        &mut rows,
                        "sparse_fc2_fwd",
                        dtype,
                        shape.clone(),
                        config_text(&cfg),
                        "out",
                        &y.to_f32_vec()?,
                        &want,
                    );
                }
                // fc2 input gradient: dy [m, hd], w2 [hd, f], a random compact h (about half
                // of it <= 0: the ReLU mask) -> compact dh.
                let (dy, hdy) = random(dev, &mut rng, dtype, &[m, hd])?;
                let (w2, hw2) = random(dev, &mut rng, dtype, &[hd, f])?;
                let (hr, hhr) = random(dev, &mut rng, dtype, &[m, width])?;
                let mut dh = DeviceTensor::from_f32(dev, dtype, &[m, width], &sentinel)?;
                let want = rs::sparse_fc2_dh(&hdy, &hw2, &hhr, (m, hd, f), list, &sentinel);
                for cfg in configs_for("sparse_fc2_dh", bs, dtype) {
                    dh.write_f32(&sentinel)?;
                    sparse_ops::sparse_fc2_dh(
                        dev,
                        &dy.as_arg(),
                        &w2.as_arg(),
                        &hr.as_arg(),
                        &bl,
                        &dh.as_arg(),
                        bs,
                        &cfg,
                    )
                    .map_err(op_err)?;
                    dev.synchronize()?;
                    record_compact(
                        &mut rows,
                        "sparse_fc2_dh",
                        dtype,
                        &shape,
                        config_text(&cfg),
                        "dh",
                        &dh.to_f32_vec()?,
                        &want,
                        list,
                    );
                }
                // fc1 input gradient: a random compact dh, w1 [f, hd] -> dx [m, hd].
                let (dhr, hdhr) = random(dev, &mut rng, dtype, &[m, width])?;
                let mut dx = DeviceTensor::poisoned(dev, dtype, &[m, hd])?;
                let want = rs::sparse_fc1_dx(&hdhr, &hw1, (m, hd, f), list);
                for cfg in configs_for("sparse_fc1_dx", bs, dtype) {
                    dx.poison()?;
                    sparse_ops::sparse_fc1_dx(
                        dev,
                        &dhr.as_arg(),
                        &w1.as_arg(),
                        &bl,
                        &dx.as_arg(),
                        bs,
                        &cfg,
                    )
                    .map_err(op_err)?;
                    dev.synchronize()?;
                    record(
                        &mut rows,
                        "sparse_fc1_dx",
                        dtype,
                        shape.clone(),
                        config_text(&cfg),
                        "dx",
                        &dx.to_f32_vec()?,
                        &want,
                    );
                }
                // fc1's bias gradient from the same compact dh, added to a random f32 start
                // (the kernel accumulates atomically).
                let (db, hdb) = random(dev, &mut rng, Storage::F32, &[f])?;
                let want = rs::sparse_colsum(&hdhr, (m, f), list, &hdb);
                sparse_ops::sparse_colsum(dev, &dhr.as_arg(), &bl, &db.as_arg(), bs)
                    .map_err(op_err)?;
                dev.synchronize()?;
                record(
                    &mut rows,
                    "sparse_colsum",
                    dtype,
                    shape.clone(),
                    String::new(),
                    "db1",
                    &db.to_f32_vec()?,
                    &want,
                );
            }
        }
    }
    Ok(rows)
}
