//! Block-sparse flash attention on the device (DESIGN.md §7, attention step 4): an
//! [`AttentionMask`] (kept key blocks per sequence, query block and head) turned into the
//! device-side lists and block tables of `lexp_kernels::sparse_flash`, and the launches of its
//! forward and backward.
//!
//! - [`SparsePlan`]: the host side, checked against the batch (block sizes, shape, causality,
//!   diagonal blocks) before anything reaches a launch.
//! - [`SparseLists`]: its device copy.
//! - [`forward`] / [`backward`]: the kernels over one layer's `[T, 3H]` q/k/v. The backward
//!   shares the dense kernels' `delta` step.
//!
//! The mask's blocks must be [`GPU_Q_BLOCK`] x [`GPU_K_BLOCK`] (128 x 128), the block size the
//! kernels are compiled for.

use super::ops::{arg, dev_err, R};
use crate::buffer::DeviceTensor;
use crate::device::CudaDevice;
use crate::model::attention_hook::{GPU_K_BLOCK, GPU_Q_BLOCK};
use crate::model::{AttentionMask, ModelError};
use lexp_compiler::launch::{LaunchError, TensorArg};
use lexp_kernels::flash_attention::flash_bwd_delta;
use lexp_kernels::sparse_flash::{self as sf, block_table, transpose, DeviceList, TableRow};

/// A tile configuration of one kernel: `(name, value)` of each const parameter.
pub type SparseTiles = [(&'static str, usize); 7];

/// The block-sparse kernels' tile configurations for one head dimension.
#[derive(Debug, PartialEq, Eq)]
pub struct SparseFlashConfig {
    /// The head dimension (`D`).
    pub hd: usize,
    /// `sparse_flash_fwd`: `BM` queries per program (one block), `BN` keys per step.
    pub fwd: SparseTiles,
    /// `sparse_flash_dkdv`: `BN` keys per program, `BM` queries per step.
    pub dkdv: SparseTiles,
    /// `sparse_flash_dq`: `BM` queries per program, `BN` keys per step.
    pub dq: SparseTiles,
}

fn param(c: &SparseTiles, name: &str) -> usize {
    c.iter().find(|(n, _)| *n == name).map_or(0, |&(_, v)| v)
}

/// Head dimension 64: the fastest compiled configurations at one 16384-token sequence, 32
/// heads, a 25% mask on the H200 (`gpu_sparse_attention`'s timed test), all with TMA on sm_90
/// (`bench/results/2026-11-30-h200-tma/call66/gpu_sparse_attention.txt`; sm_80 runs the same
/// variants with `cp.async`): forward 0.979 ms with 64-key steps in 3 stages (1.305 for the
/// previous `cp.async` choice). dk/dv and dq in one-warpgroup programs of 64 keys or queries
/// (`W = 4`, as the dense kernels' short-batch tiles; `bench/results/2026-12-01-h200-flash-w4/
/// call111/gpu_sparse_attention.txt`): dk/dv 2.313 ms against 2.413 with 128 keys in two
/// warpgroups, dq 0.989 ms (3 stages) against 1.165 with 128-query programs.
#[rustfmt::skip]
const SPARSE_64: SparseFlashConfig = SparseFlashConfig {
    hd: 64,
    fwd: [("D", 64), ("BM", 128), ("BN", 64), ("KB", 128), ("S", 3), ("W", 8), ("TMA", 1)],
    dkdv: [("D", 64), ("BN", 64), ("BM", 64), ("KB", 128), ("S", 2), ("W", 4), ("TMA", 1)],
    dq: [("D", 64), ("BM", 64), ("BN", 64), ("KB", 128), ("S", 3), ("W", 4), ("TMA", 1)],
};

/// Head dimension 128: the variants that assemble without spills on sm_80 (32-key forward
/// steps and 32-query dq programs, smaller than the dense kernels': the list indexing costs
/// registers), with TMA on sm_90 (call 66: forward 1.075 against 1.188 ms, dk/dv 3.205 against
/// 3.616, dq 2.271 against 2.717).
#[rustfmt::skip]
const SPARSE_128: SparseFlashConfig = SparseFlashConfig {
    hd: 128,
    fwd: [("D", 128), ("BM", 128), ("BN", 32), ("KB", 128), ("S", 2), ("W", 8), ("TMA", 1)],
    dkdv: [("D", 128), ("BN", 64), ("BM", 32), ("KB", 128), ("S", 2), ("W", 8), ("TMA", 1)],
    dq: [("D", 128), ("BM", 32), ("BN", 64), ("KB", 128), ("S", 2), ("W", 8), ("TMA", 1)],
};

/// The block-sparse configuration for head dimension `hd`, if its kernels exist.
pub fn sparse_config(hd: usize) -> Option<&'static SparseFlashConfig> {
    [&SPARSE_64, &SPARSE_128].into_iter().find(|c| c.hd == hd)
}

/// The host side of one layer's block-sparse attention: block tables and lists.
#[derive(Clone, Debug, PartialEq)]
pub struct SparsePlan {
    /// Programs of `sparse_flash_fwd` (`(start, len, q0, block row)`).
    pub fwd: Vec<TableRow>,
    /// Programs of `sparse_flash_dq`.
    pub dq: Vec<TableRow>,
    /// Programs of `sparse_flash_dkdv` (`(start, len, k0, block row)`).
    pub dkdv: Vec<TableRow>,
    /// Kept key blocks per (block row, head).
    pub list: DeviceList,
    /// Query blocks keeping each (key block row, head).
    pub list_t: DeviceList,
    /// The mask's density (kept over causal blocks).
    pub density: f64,
}

impl SparsePlan {
    /// The plan of `mask` for the batch `cu_seqlens` with `heads` heads and `cfg`'s kernels.
    ///
    /// # Errors
    /// [`ModelError::Batch`] if the mask does not fit the batch or has other block sizes than
    /// the kernels', naming the broken row.
    pub fn of(
        mask: &AttentionMask,
        cu_seqlens: &[i32],
        heads: usize,
        cfg: &SparseFlashConfig,
    ) -> R<SparsePlan> {
        let bad = |m: String| ModelError::Batch(format!("block-sparse attention: {m}"));
        if (mask.q_block, mask.k_block) != (GPU_Q_BLOCK, GPU_K_BLOCK) {
            return Err(bad(format!(
                "blocks of {} x {}, the kernels take {GPU_Q_BLOCK} x {GPU_K_BLOCK}",
                mask.q_block, mask.k_block
            )));
        }
        mask.validate(cu_seqlens, heads)
            .map_err(|e| bad(e.to_string()))?;
        let cu: Vec<usize> = cu_seqlens.iter().map(|&c| c.max(0) as usize).collect();
        let kb = GPU_K_BLOCK;
        let too_long = || bad("a position or id does not fit in i32".into());
        let nblocks: Vec<usize> = mask.lens.iter().map(|l| l.div_ceil(kb)).collect();
        let (to, ti) = transpose(&nblocks, heads, &mask.offsets, &mask.keys)
            .ok_or_else(|| bad("the lists do not match the batch".into()))?;
        Ok(SparsePlan {
            fwd: block_table(&cu, param(&cfg.fwd, "BM"), kb, true).ok_or_else(too_long)?,
            dq: block_table(&cu, param(&cfg.dq, "BM"), kb, true).ok_or_else(too_long)?,
            dkdv: block_table(&cu, param(&cfg.dkdv, "BN"), kb, false).ok_or_else(too_long)?,
            list: DeviceList::from_rows(&mask.offsets, &mask.keys).ok_or_else(too_long)?,
            list_t: DeviceList::from_rows(&to, &ti).ok_or_else(too_long)?,
            density: mask.density(),
        })
    }
}

/// A [`SparsePlan`] on the device.
pub struct SparseLists {
    fwd: DeviceTensor,
    dq: DeviceTensor,
    dkdv: DeviceTensor,
    counts: DeviceTensor,
    indices: DeviceTensor,
    counts_t: DeviceTensor,
    indices_t: DeviceTensor,
    /// The mask's density.
    pub density: f64,
}

fn table(dev: &CudaDevice, rows: &[TableRow]) -> R<DeviceTensor> {
    let flat: Vec<i32> = rows.iter().flatten().copied().collect();
    DeviceTensor::from_i32(dev, &[rows.len(), 4], &flat).map_err(dev_err("block table"))
}

fn list(dev: &CudaDevice, l: &DeviceList) -> R<(DeviceTensor, DeviceTensor)> {
    let rows = l.counts.len();
    Ok((
        DeviceTensor::from_i32(dev, &[rows], &l.counts).map_err(dev_err("block list"))?,
        DeviceTensor::from_i32(dev, &[rows, l.width], &l.indices).map_err(dev_err("block list"))?,
    ))
}

impl SparseLists {
    /// Uploads `plan` (new buffers).
    pub fn upload(dev: &CudaDevice, plan: &SparsePlan) -> R<SparseLists> {
        let (counts, indices) = list(dev, &plan.list)?;
        let (counts_t, indices_t) = list(dev, &plan.list_t)?;
        Ok(SparseLists {
            fwd: table(dev, &plan.fwd)?,
            dq: table(dev, &plan.dq)?,
            dkdv: table(dev, &plan.dkdv)?,
            counts,
            indices,
            counts_t,
            indices_t,
            density: plan.density,
        })
    }
}

/// One layer's attention tensors as kernel arguments: `qkv [T, 3H]`, `o`, `d_o` `[T, H]`,
/// `lse2`, `delta` `[nh, stats cols]` and `dqkv [T, 3H]`.
pub struct AttnArgs {
    /// Packed q, k, v, `[T, 3·nh, hd]`.
    pub qkv: TensorArg,
    /// The forward's output, `[T, nh, hd]`.
    pub o: TensorArg,
    /// Base-2 log-sum-exp per (head, token).
    pub lse2: TensorArg,
    /// The output's gradient (backward only).
    pub d_o: TensorArg,
    /// `rowsum(dO ⊙ O)` (backward only).
    pub delta: TensorArg,
    /// The input gradient (backward only).
    pub dqkv: TensorArg,
    /// Softmax scale `hd^-0.5`.
    pub scale: f32,
}

fn launch_err(what: &'static str) -> impl FnOnce(LaunchError) -> ModelError {
    move |e| ModelError::Device(format!("{what}: {e}"))
}

/// Whole-tensor argument of a list buffer.
fn whole(t: &DeviceTensor) -> R<TensorArg> {
    arg(t, t.dims())
}

/// `o` and `lse2` over the kept blocks of `lists`.
pub fn forward(dev: &CudaDevice, cfg: &SparseFlashConfig, l: &SparseLists, a: &AttnArgs) -> R {
    sf::sparse_flash_fwd::launch_with(
        dev,
        &cfg.fwd,
        &sf::sparse_flash_fwd::Args {
            qkv: &a.qkv,
            qblocks: &whole(&l.fwd)?,
            counts: &whole(&l.counts)?,
            indices: &whole(&l.indices)?,
            scale_log2: a.scale * std::f32::consts::LOG2_E,
            o: &a.o,
            lse2: &a.lse2,
        },
    )
    .map_err(launch_err("block-sparse attention forward"))
}

/// `dqkv` from `d_o` over the kept blocks of `lists` (the forward's lists): `delta`, then dk
/// and dv per key block, then dq per query block.
pub fn backward(dev: &CudaDevice, cfg: &SparseFlashConfig, l: &SparseLists, a: &AttnArgs) -> R {
    flash_bwd_delta::launch_with(
        dev,
        &[("D", cfg.hd)],
        &flash_bwd_delta::Args {
            o: &a.o,
            d_o: &a.d_o,
            delta: &a.delta,
        },
    )
    .map_err(launch_err("block-sparse attention backward (delta)"))?;
    let scale_log2 = a.scale * std::f32::consts::LOG2_E;
    sf::sparse_flash_dkdv::launch_with(
        dev,
        &cfg.dkdv,
        &sf::sparse_flash_dkdv::Args {
            qkv: &a.qkv,
            d_o: &a.d_o,
            lse2: &a.lse2,
            delta: &a.delta,
            kblocks: &whole(&l.dkdv)?,
            counts_t: &whole(&l.counts_t)?,
            indices_t: &whole(&l.indices_t)?,
            scale_log2,
            scale: a.scale,
            dqkv: &a.dqkv,
        },
    )
    .map_err(launch_err("block-sparse attention backward (dk, dv)"))?;
    sf::sparse_flash_dq::launch_with(
        dev,
        &cfg.dq,
        &sf::sparse_flash_dq::Args {
            qkv: &a.qkv,
            d_o: &a.d_o,
            lse2: &a.lse2,
            delta: &a.delta,
            qblocks: &whole(&l.dq)?,
            counts: &whole(&l.counts)?,
            indices: &whole(&l.indices)?,
            scale_log2,
            scale: a.scale,
            dqkv: &a.dqkv,
        },
    )
    .map_err(launch_err("block-sparse attention backward (dq)"))
}

/// Random masks at a fixed density in place of the attention predictor's, for measurements
/// inside the GPU engine's step ([`crate::gpu::engine::GpuEngine::set_synthetic_attention`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyntheticAttention {
    /// Share of the causal blocks kept, in `(0, 1]` (the diagonal and sink blocks are kept
    /// even where that exceeds it).
    pub density: f64,
    /// Seed of the masks. A layer's mask depends on the seed, the layer and the batch shape.
    pub seed: u64,
}

impl SyntheticAttention {
    /// Checks the settings against a model with head dimension `hd`.
    pub fn check(&self, hd: usize) -> R {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(ModelError::Unsupported(format!(
                "synthetic attention density {} must be in (0, 1]",
                self.density
            )));
        }
        if sparse_config(hd).is_none() {
            return Err(ModelError::Unsupported(format!(
                "block-sparse attention is compiled for head dimensions 64 and 128; this model's \
                 is {hd}"
            )));
        }
        Ok(())
    }
}

/// One batch's block-sparse attention lists, one per layer, on the device, with the masks
/// they came from.
pub struct AttnLists {
    /// The batch's sequence boundaries the lists were made for.
    pub cu_seqlens: Vec<i32>,
    layers: Vec<SparseLists>,
    masks: Vec<AttentionMask>,
}

impl AttnLists {
    /// Synthetic masks ([`synthetic_mask`]) for every layer of a model with `heads` heads of
    /// `hd` over the batch `cu_seqlens`.
    pub fn synthetic(
        dev: &CudaDevice,
        s: &SyntheticAttention,
        layers: usize,
        cu_seqlens: &[i32],
        (heads, hd): (usize, usize),
    ) -> R<AttnLists> {
        s.check(hd)?;
        let cfg = sparse_config(hd)
            .ok_or_else(|| ModelError::Unsupported("no block-sparse attention".into()))?;
        let masks: Vec<AttentionMask> = (0..layers)
            .map(|l| {
                let seed = s.seed ^ (l as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                synthetic_mask(cu_seqlens, heads, s.density, seed)
            })
            .collect();
        let layers = masks
            .iter()
            .map(|m| SparseLists::upload(dev, &SparsePlan::of(m, cu_seqlens, heads, cfg)?))
            .collect::<R<Vec<_>>>()?;
        Ok(AttnLists {
            cu_seqlens: cu_seqlens.to_vec(),
            layers,
            masks,
        })
    }

    /// Layer `li`'s mask (what the CPU model keeps to compute the same attention).
    pub fn mask(&self, li: usize) -> Option<&AttentionMask> {
        self.masks.get(li)
    }

    /// Layer `li`'s lists.
    pub fn layer(&self, li: usize) -> R<&SparseLists> {
        self.layers
            .get(li)
            .ok_or_else(|| ModelError::Device(format!("no attention lists for layer {li}")))
    }

    /// The mean density over the layers.
    pub fn density(&self) -> f64 {
        let n = self.layers.len().max(1) as f64;
        self.layers.iter().map(|l| l.density).sum::<f64>() / n
    }
}

/// A random mask at about `density` of the causal blocks, for measurements: the diagonal
/// block and the first (sink) block always, the other causal blocks each kept with the
/// probability that brings the expected density to `density` (at least the diagonal and sink
/// share). Deterministic in `seed`. Labelled *synthetic* wherever it is used.
pub fn synthetic_mask(cu_seqlens: &[i32], heads: usize, density: f64, seed: u64) -> AttentionMask {
    let (qb, kb) = (GPU_Q_BLOCK, GPU_K_BLOCK);
    let must = AttentionMask::from_fn(cu_seqlens, heads, qb, kb, |_, _, _, k| k == 0);
    let (causal, fixed) = (must.causal_blocks() as f64, must.keys.len() as f64);
    let p = if causal > fixed {
        ((density * causal - fixed) / (causal - fixed)).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let mut rng = crate::data::SplitMix64::new(seed);
    AttentionMask::from_fn(cu_seqlens, heads, qb, kb, |_, _, _, k| {
        k == 0 || ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_masks_hit_their_density_and_plans_check_the_mask() {
        let cu = [0, 4096, 6000];
        let m = synthetic_mask(&cu, 4, 0.25, 1);
        assert!((m.density() - 0.25).abs() < 0.02, "{}", m.density());
        let plan = SparsePlan::of(&m, &cu, 4, &SPARSE_64).unwrap();
        // 32 + 15 blocks, 4 heads.
        assert_eq!(plan.list.counts.len(), 47 * 4);
        assert_eq!(plan.list_t.counts.len(), 47 * 4);
        let kept: i32 = plan.list.counts.iter().sum();
        assert_eq!(kept, plan.list_t.counts.iter().sum::<i32>());
        assert_eq!(kept as usize, m.keys.len());
        assert_eq!(plan.fwd.len(), 47);
        // 64-key dk/dv programs: 64 + 30.
        assert_eq!(plan.dkdv.len(), 94);
        let e = SparsePlan::of(&m, &cu, 2, &SPARSE_64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("heads"), "{e}");
        let small = AttentionMask::dense(&cu, 4, 64, 64);
        let e = SparsePlan::of(&small, &cu, 4, &SPARSE_64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("64 x 64"), "{e}");
    }
}
