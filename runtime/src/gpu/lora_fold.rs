//! The q/k/v LoRA fold: the adapters of q, k and v run inside the frozen projection's GEMM.
//!
//! A LoRA branch adds `s·(x·Aᵀ)·Bᵀ` to the projection `x·Wᵀ`. Concatenated along K,
//!
//! ```text
//! [x | u] · [W | s·B]ᵀ  =  x·Wᵀ + s·u·Bᵀ,        u = x·Aᵀ
//! ```
//!
//! so with every adapted target's `u` in spare columns of the GEMM's input and its `s·B` in
//! spare columns of the weight, the fused q/k/v GEMM (`K = H + kc` instead of `H`: 3% more
//! work at OPT-1.3B's `H = 2048`) computes all the branches' expands. The forward then runs one `lora_down` for all
//! targets (from the `A`s kept in the weight's spare rows) instead of a `lora_down` and a
//! `lora_expand` per target. The backward does the same along the other K: each target's
//! `du = s·dy·B` goes into spare columns of `dqkv`, and the input gradient's GEMM
//! `[dqkv | du]·[Wqkv ; A']` (K = 3H + kc) sums `dqkv·Wqkv` and every `du·A`, instead of one
//! `lora_expand` per target. The weight gradients read `u` and `du` where the fold keeps them:
//! a `lora_wgrad` pass per target for `dB`, one pass over LN1's output for every target's `dA`
//! (their `du` lie side by side), run two to a launch (`lora_wgrad_pair`), and one reduce
//! launch for all of a layer's gradients.
//!
//! Layout, for a layer whose adapted q/k/v targets take slots `j = 0, 1, ...` in q, k, v
//! order (`rp` = [`rank_pad`]`(r)`; `kc` = the targets' `rp` columns padded with empty slots to
//! a multiple of [`FOLD_K_ALIGN`], 64 for every rank the kernels take):
//!
//! - the stored weight `[3H + QKV_ROOM, H + QKV_ROOM]` (row stride [`qkv_ld`]): `Wqkv` in
//!   `[0..3H, 0..H]`; target `j`'s `A [r, H]` in rows `3H + j·rp ..` (pad rows zero); `s·B`
//!   in columns `H + j·rp ..` of the target's own output rows, zero in the other rows;
//! - LN1's output `a [T, H + kc]`: LN1 in columns `0..H`, target `j`'s `u` in `H + j·rp ..`
//!   (its pad columns zero, as `lora_down` writes them); the empty slots' columns keep the
//!   workspace's finite values, which the weight's zero columns there cancel;
//! - the backward's `dqkv [T, 3H + kc]`: the heads' gradients in columns `0..3H` (the
//!   attention backward writes them with this row stride), target `j`'s `du` in `3H + j·rp ..`.
//!
//! [`QkvFold::write`] rewrites the room from the adapter parameters (`lexp_kernels::lora_fold`,
//! one launch per layer, after each upload or optimizer step, with `Bᵀ`). The fold is off with
//! `LEXP_NO_LORA_FOLD=1` (for A/B timing), for ranks above [`MAX_KERNEL_RANK`] or hidden sizes
//! that are not multiples of 8 (the branch then runs on cuBLAS), and in a call with LoRA
//! dropout on q, k or v (each branch must see its own dropped input): the per-target branch
//! of [`super::lora`] runs then, on the same weight (its room is simply not read).

use super::lora::Adapters;
use super::lora::{rank_pad, Slots, MAX_KERNEL_RANK};
use super::ops::{
    arg, dev_err, launch_err, lora_down, lora_wgrad_pair, lora_wgrad_pass, lora_wgrad_reduce_many,
    mat_arg, GradWrite, LORA_WGRAD_CHUNKS, R,
};
use super::weights::{qkv_ld, LayerWeights};
use crate::buffer::DeviceTensor;
use crate::cublas::{Mat, MatLayout};
use crate::device::CudaDevice;
use crate::model::ModelError;
use crate::peft::LoraTarget;
use lexp_kernels as k;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The fold's K extension is padded to a multiple of this (with empty slots, zeros): cuBLAS
/// ran `4096 x 6144 x 2064` at 678 TFLOP/s where `x 2048` runs at 726 (call 87), the ragged
/// last K tile costing more than the padding's 3%.
pub const FOLD_K_ALIGN: usize = 64;

/// Spare rows and columns of the stored q/k/v weight: three targets at the largest rank the
/// branch kernels take, padded to [`FOLD_K_ALIGN`].
pub const QKV_ROOM: usize =
    (3 * MAX_KERNEL_RANK.div_ceil(8) * 8).div_ceil(FOLD_K_ALIGN) * FOLD_K_ALIGN;

/// The environment variable that turns the fold off (`=1`).
pub const NO_LORA_FOLD_ENV: &str = "LEXP_NO_LORA_FOLD";

/// True unless [`NO_LORA_FOLD_ENV`] is `1`; read once per process.
pub fn fold_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var(NO_LORA_FOLD_ENV).as_deref() != Ok("1");
        tracing::debug!(on, "q/k/v LoRA fold");
        on
    })
}

/// Columns the fold may add at rank `r` (0 without adapters or past [`MAX_KERNEL_RANK`], where
/// it does not apply): the workspace sizes LN1's output `a` as `[T, H + fold_cols(r)]` and
/// `dqkv` as `[T, 3H + fold_cols(r)]`.
pub fn fold_cols(r: usize) -> usize {
    match r {
        1..=MAX_KERNEL_RANK => padded(3 * rank_pad(r)),
        _ => 0,
    }
}

/// `n` rounded up to [`FOLD_K_ALIGN`].
fn padded(n: usize) -> usize {
    n.div_ceil(FOLD_K_ALIGN) * FOLD_K_ALIGN
}

/// The widest `u` a `lora_down` writes and the widest rank side a `lora_wgrad` pass reads (both
/// kernels' `R`): wider folds take several launches.
const DOWN_COLS: usize = 16;

/// One layer's fold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerFold {
    /// The slot of q, k and v (`None`: not adapted).
    pub slot: [Option<usize>; 3],
    /// Padded rank.
    pub rp: usize,
    /// Hidden size.
    pub h: usize,
    /// Adapted targets (the first slots).
    pub targets: usize,
    /// First row of this layer's slots in [`QkvFold`]'s offsets.
    first: usize,
    /// First row of this layer's gradients in [`QkvFold`]'s reduce table, and their number.
    mods: (usize, usize),
}

fn internal(what: &str) -> ModelError {
    ModelError::Device(format!("internal: LoRA fold: {what}"))
}

impl LayerFold {
    /// `kc`: the extra K columns, the targets' `rp` each padded to [`FOLD_K_ALIGN`].
    pub fn cols(&self) -> usize {
        padded(self.targets * self.rp)
    }

    /// Slots (`kc / rp`), the empty padding ones included.
    fn slots(&self) -> usize {
        self.cols() / self.rp
    }

    /// Columns of LN1's output `a`: `H + kc`.
    pub fn width(&self) -> usize {
        self.h + self.cols()
    }

    /// Row stride of the backward's `dqkv`: `3H + kc`.
    pub fn dqkv_ld(&self) -> usize {
        3 * self.h + self.cols()
    }

    /// `du` of q/k/v target `i` inside the backward's `dqkv` (`t` rows, padded rank wide),
    /// past the heads.
    pub fn du(&self, i: usize, t: usize) -> Option<MatLayout> {
        let j = self.slot[i]?;
        Some(MatLayout::at(
            3 * self.h + j * self.rp,
            t,
            self.rp,
            self.dqkv_ld(),
        ))
    }

    /// `u = a[:, ..H]·A'ᵀ` for every target into `a`'s fold columns (`A'` the weight's room
    /// rows), one `lora_down` launch per 16 columns of the targets' slots. `x` and `u` are
    /// disjoint columns of `a`. The empty slots' columns are not written: they hold whatever
    /// finite values the workspace had (zeros, or an earlier LN1 output), which the weight's
    /// zero columns there cancel.
    pub fn down(&self, dev: &CudaDevice, w: &LayerWeights, a: &DeviceTensor, t: usize) -> R {
        let (h, used, ld) = (self.h, self.targets * self.rp, self.width());
        let x = Mat::new(a, MatLayout::at(0, t, h, ld));
        let room = w.qkv_room(h, used);
        for c0 in (0..used).step_by(DOWN_COLS) {
            let cw = DOWN_COLS.min(used - c0);
            let (off, wld) = (room.layout.offset + c0 * room.layout.ld, room.layout.ld);
            let rows = Mat::new(room.tensor, MatLayout::at(off, cw, h, wld));
            lora_down(dev, x, rows, 1.0, (a, MatLayout::at(h + c0, t, cw, ld)))?;
        }
        Ok(())
    }

    /// Wgrad blocks of the backward: one `dB` pass per target, one `dA` pass per 16 columns
    /// of the targets' `du`.
    fn wgrad_blocks(&self) -> usize {
        self.targets + (self.targets * self.rp).div_ceil(DOWN_COLS)
    }

    /// The q/k/v branches' backward but for the input gradient (which the GEMM over
    /// `[dqkv | du]` sums): per target, `du = s·dy·B` beside `dqkv` and the `dB` pass over
    /// `dy` (16 columns of LN1's output from its `u`); one `dA` pass over LN1's output per 16
    /// columns of `du`, two passes to a launch (`lora_wgrad_pair`, a lone last one by itself);
    /// then every gradient from one `lora_wgrad_reduce_many` launch. Passes write whole
    /// 16-column blocks; the columns no gradient reads are never summed.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dev: &CudaDevice,
        (ad, li): (&Adapters<'_>, usize),
        (a, dqkv): (&DeviceTensor, &DeviceTensor),
        t: usize,
        part: &DeviceTensor,
        grads: &DeviceTensor,
    ) -> R {
        let (h, w) = (self.h, DOWN_COLS);
        let fold = ad
            .fold
            .ok_or_else(|| internal("adapters without their fold"))?;
        let block = |b: usize| b * LORA_WGRAD_CHUNKS * h * w;
        let x = Mat::new(a, MatLayout::at(0, t, h, self.width()));
        // Every pass's operands by its block (rank side, wide side): target `j`'s `dB` pass in
        // block `j`, the `dA` passes after them. `du` first, so that the passes run in pairs.
        let mut passes: Vec<Option<(Mat<'_>, Mat<'_>)>> = vec![None; self.wgrad_blocks()];
        for (i, target) in QKV.into_iter().enumerate() {
            let Some(j) = self.slot[i] else { continue };
            let s = ad
                .slot(li, target)
                .ok_or_else(|| internal("a fold slot of no module"))?;
            let bt = ad.bt(&s).ok_or_else(|| internal("the fold without Bᵀ"))?;
            let dy = Mat::new(dqkv, MatLayout::at(i * h, t, h, self.dqkv_ld()));
            let u = Mat::new(a, MatLayout::at(h + j * self.rp, t, w, self.width()));
            let du = self.du(i, t).ok_or_else(|| internal("a slot without du"))?;
            lora_down(dev, dy, bt, ad.scale, (dqkv, du))?;
            *passes
                .get_mut(j)
                .ok_or_else(|| internal("a fold slot past the targets"))? = Some((u, dy));
        }
        for c in 0..self.wgrad_blocks() - self.targets {
            let du = Mat::new(dqkv, MatLayout::at(3 * h + c * w, t, w, self.dqkv_ld()));
            passes[self.targets + c] = Some((du, x));
        }
        for (p, pair) in passes.chunks(2).enumerate() {
            let off = block(2 * p);
            match pair {
                [Some(first), Some(second)] => {
                    lora_wgrad_pair(dev, *first, *second, (part, off))?;
                }
                [Some((u, dy))] => lora_wgrad_pass(dev, *u, *dy, (part, off))?,
                _ => return Err(internal("a wgrad block without its pass")),
            }
        }
        let (first, n) = self.mods;
        let mods = mat_arg(&fold.mods, &MatLayout::at(first * 5, n, 5, 5))?;
        lora_wgrad_reduce_many(
            dev,
            (part, self.wgrad_blocks()),
            (h, ad.r, w),
            &mods,
            ad.scale,
            (grads, GradWrite::Accumulate),
        )
    }

    /// `[dqkv | du]` (`[T, 3H + kc]`): the input gradient's GEMM multiplies it by
    /// [`weight_rows`](Self::weight_rows), summing `dqkv·Wqkv` and every target's `du·A`.
    pub fn dqkv_du<'a>(&self, dqkv: &'a DeviceTensor, t: usize) -> Mat<'a> {
        Mat::new(dqkv, MatLayout::at(0, t, self.dqkv_ld(), self.dqkv_ld()))
    }

    /// `[Wqkv ; A']` (`[3H + kc, H]`): the stored weight's first `3H + kc` rows.
    pub fn weight_rows<'a>(&self, w: &'a LayerWeights) -> Mat<'a> {
        let ld = qkv_ld(self.h);
        Mat::new(&w.wqkv, MatLayout::at(0, self.dqkv_ld(), self.h, ld))
    }
}

/// What [`QkvFold::new`] uploads: every layer's fold, and the two tables (rows of 5 i32).
struct Tables {
    layers: Vec<Option<LayerFold>>,
    /// Per slot, `[A offset, B offset, first output row, slot, rank]`.
    offs: Vec<i32>,
    /// Per gradient, `[wgrad block, column shift, transposed, offset, scaled]`.
    mods: Vec<i32>,
}

/// The fold of adapters laid out as `slots` at rank `r`, or `None` when it does not apply
/// (rank, hidden size, no q/k/v target; see the module doc). Targets take the first slots in
/// q, k, v order, empty slots pad K to [`FOLD_K_ALIGN`]; the backward's reduce takes target
/// `j`'s `dB` from wgrad block `j` (scaled) and its `dA` from block `targets + j·rp / 16`,
/// `j·rp % 16` columns in (the shared passes over the targets' `du`, 16 columns each).
fn tables(slots: &Slots, r: usize) -> Option<Tables> {
    if r == 0 || r > MAX_KERNEL_RANK {
        return None;
    }
    let rp = rank_pad(r);
    let (mut offs, mut mods) = (Vec::new(), Vec::new());
    let mut layers = Vec::with_capacity(slots.len());
    for layer in slots {
        let mut f = LayerFold {
            slot: [None; 3],
            rp,
            h: 0,
            targets: 0,
            first: offs.len() / 5,
            mods: (mods.len() / 5, 0),
        };
        for (i, t) in QKV.iter().enumerate() {
            let Some(s) = layer[t.index()] else { continue };
            if s.in_f % 8 != 0 || s.in_f != s.out_f {
                return None;
            }
            f.h = s.in_f;
            f.slot[i] = Some(f.targets);
            offs.extend([s.a, s.b, i * s.out_f, f.targets, r].map(|v| v as i32));
            f.targets += 1;
        }
        offs.extend((f.targets..f.slots()).flat_map(|j| [0, 0, 0, j as i32, 0]));
        for (i, t) in QKV.iter().enumerate() {
            let (Some(j), Some(s)) = (f.slot[i], layer[t.index()]) else {
                continue;
            };
            let col = j * rp;
            mods.extend([j, 0, 0, s.b, 1].map(|v| v as i32));
            let da = [f.targets + col / DOWN_COLS, col % DOWN_COLS, 1, s.a, 0];
            mods.extend(da.map(|v| v as i32));
        }
        f.mods.1 = mods.len() / 5 - f.mods.0;
        layers.push((f.targets > 0).then_some(f));
    }
    (!offs.is_empty()).then_some(Tables { layers, offs, mods })
}

const QKV: [LoraTarget; 3] = [LoraTarget::Q, LoraTarget::K, LoraTarget::V];

/// The fold of every layer, and the per-target offsets [`write`](Self::write) reads.
pub struct QkvFold {
    layers: Vec<Option<LayerFold>>,
    /// Set once the empty slots have been written (zeros): they never change, so later writes
    /// rewrite the targets' slots only.
    padded: AtomicBool,
    /// Per slot of every layer, `[A offset, B offset, first output row, slot, rank]` (i32;
    /// rank 0 for the padding's empty slots).
    offs: DeviceTensor,
    /// Per gradient of every layer, the backward's reduce (`lora_wgrad_reduce_many`): `[wgrad
    /// block, column shift, transposed, offset in the gradients, scaled]` (i32).
    mods: DeviceTensor,
}

impl QkvFold {
    /// The fold of adapters laid out as `slots` at rank `r`, or `None` when it does not apply
    /// (see the module doc; `LEXP_NO_LORA_FOLD=1`, rank, hidden size, no q/k/v target).
    pub fn new(dev: &CudaDevice, slots: &Slots, r: usize) -> R<Option<QkvFold>> {
        if !fold_enabled() {
            return Ok(None);
        }
        let Some(t) = tables(slots, r) else {
            return Ok(None);
        };
        let offs = DeviceTensor::from_i32(dev, &[t.offs.len() / 5, 5], &t.offs)
            .map_err(dev_err("uploading the LoRA fold's offsets"))?;
        let mods = DeviceTensor::from_i32(dev, &[t.mods.len() / 5, 5], &t.mods)
            .map_err(dev_err("uploading the LoRA fold's reduce table"))?;
        Ok(Some(QkvFold {
            layers: t.layers,
            offs,
            mods,
            padded: AtomicBool::new(false),
        }))
    }

    /// Layer `li`'s fold, if it has adapted q/k/v targets.
    pub fn layer(&self, li: usize) -> Option<LayerFold> {
        self.layers.get(li).copied().flatten()
    }

    /// Writes every layer's `A`s and `s·B`s from the flat bf16 `params` into the room of its
    /// q/k/v weight (one `lora_fold` launch per layer).
    pub fn write(
        &self,
        dev: &CudaDevice,
        params: &DeviceTensor,
        scale: f32,
        weights: &[LayerWeights],
    ) -> R {
        // The first write zeroes the empty slots too (a previous layout may have used them).
        let slots = |f: &LayerFold| match self.padded.load(Ordering::Relaxed) {
            true => f.targets,
            false => f.slots(),
        };
        for (f, w) in self.layers.iter().zip(weights) {
            let Some(f) = f else { continue };
            k::lora_fold::launch_with(
                dev,
                &[("RP", f.rp)],
                &k::lora_fold::Args {
                    x: &params.as_arg(),
                    offs: &mat_arg(&self.offs, &MatLayout::at(f.first * 5, slots(f), 5, 5))?,
                    k: f.h as i64,
                    n: f.h as i64,
                    rows: (3 * f.h) as i64,
                    ld: qkv_ld(f.h) as i64,
                    s: scale,
                    y: &arg(&w.wqkv, &[w.wqkv.numel()])?,
                },
            )
            .map_err(launch_err)?;
        }
        self.padded.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Device addresses of the tables (for a CUDA graph's key).
    pub fn buffer_ptrs(&self) -> [u64; 2] {
        [self.offs.device_ptr(), self.mods.device_ptr()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::OptConfig;
    use crate::gpu::lora::layout;
    use crate::peft::{LoraConfig, LoraParams};
    use std::path::Path;

    fn slots(targets: Vec<LoraTarget>, r: usize) -> (Slots, usize) {
        let c = OptConfig::from_json(
            r#"{"model_type":"opt","vocab_size":64,"hidden_size":16,"ffn_dim":32,
                "num_hidden_layers":2,"num_attention_heads":2,"max_position_embeddings":16}"#,
            Path::new("t/config.json"),
        )
        .unwrap();
        let cfg = LoraConfig {
            r,
            targets,
            ..LoraConfig::default()
        };
        (layout(&LoraParams::init(&cfg, &c, 1), 2).0, 16)
    }

    /// q and v at rank 4: slots 0 and 1, K padded to 64 with six empty slots, and the reduce
    /// taking each `dB` from its own block and both `dA` from the shared block, v's 8 columns
    /// in; the layouts of `u`, `du` and the GEMMs follow.
    #[test]
    fn q_and_v_at_rank_4_take_two_slots_of_a_64_column_fold() {
        let (s, h) = slots(vec![LoraTarget::Q, LoraTarget::V], 4);
        let t = tables(&s, 4).unwrap();
        let f = t.layers[1].unwrap();
        assert_eq!(
            (f.slot, f.targets, f.rp, f.h),
            ([Some(0), None, Some(1)], 2, 8, h)
        );
        assert_eq!(
            (f.cols(), f.slots(), f.width(), f.dqkv_ld()),
            (64, 8, h + 64, 3 * h + 64)
        );
        assert_eq!(t.offs.len(), 2 * 8 * 5);
        let (q, v) = (
            s[1][LoraTarget::Q.index()].unwrap(),
            s[1][LoraTarget::V.index()].unwrap(),
        );
        let row = |i: usize| &t.offs[(f.first + i) * 5..(f.first + i + 1) * 5];
        assert_eq!(row(0), [q.a, q.b, 0, 0, 4].map(|v| v as i32));
        assert_eq!(row(1), [v.a, v.b, 2 * h, 1, 4].map(|v| v as i32));
        assert!((2..8).all(|j| row(j) == [0, 0, 0, j as i32, 0]));
        let mods = &t.mods[f.mods.0 * 5..(f.mods.0 + f.mods.1) * 5];
        let want = [
            [0, 0, 0, q.b, 1],
            [2, 0, 1, q.a, 0],
            [1, 0, 0, v.b, 1],
            [2, 8, 1, v.a, 0],
        ];
        let want: Vec<i32> = want.iter().flatten().map(|&v| v as i32).collect();
        assert_eq!(mods, want);
        assert_eq!(
            f.du(2, 10).unwrap(),
            MatLayout::at(3 * h + 8, 10, 8, 3 * h + 64)
        );
        assert_eq!(f.wgrad_blocks(), 3);
    }

    /// q, k and v at rank 16 fill 48 columns (padded to 64); each `dA` has a block of its own.
    /// No q/k/v target, a rank past the kernels' or none at all: no fold.
    #[test]
    fn three_targets_at_rank_16_and_the_cases_without_a_fold() {
        let (s, _) = slots(vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V], 16);
        let t = tables(&s, 16).unwrap();
        let f = t.layers[0].unwrap();
        assert_eq!(
            (f.targets, f.cols(), f.slots(), f.wgrad_blocks()),
            (3, 64, 4, 6)
        );
        let da: Vec<[i32; 2]> = t
            .mods
            .chunks(5)
            .filter(|r| r[2] == 1)
            .take(3)
            .map(|r| [r[0], r[1]])
            .collect();
        assert_eq!(da, [[3, 0], [4, 0], [5, 0]]);
        assert!(tables(&slots(vec![LoraTarget::Fc1], 4).0, 4).is_none());
        assert!(tables(&slots(vec![LoraTarget::Q], 32).0, 32).is_none());
        assert!(tables(&s, 0).is_none());
        assert!(QKV_ROOM >= fold_cols(MAX_KERNEL_RANK) && QKV_ROOM % FOLD_K_ALIGN == 0);
        assert_eq!((fold_cols(0), fold_cols(4), fold_cols(32)), (0, 64, 0));
    }

    /// The forward runs as one `lora_fwd` while the targets' slots fit its 16 rank columns
    /// (q and v at rank 4 or 8, one target at 16) and its 128 x 256 tiles one wave: 132
    /// multiprocessors take 512 tokens of a 2048-wide model's q/k/v (96 tiles), not 1024.
    #[test]
    fn the_one_kernel_forward_takes_slots_of_16_columns_and_one_wave_of_tiles() {
        use super::super::fold_one_kernel::one_wave;
        assert!(one_wave(2048, 2048, 132) && !one_wave(2049, 2048, 132));
        assert!(!one_wave(4096, 2048, 132) && one_wave(4096, 2048, 256));
        let fold = |targets: Vec<LoraTarget>, r| {
            tables(&slots(targets, r).0, r).unwrap().layers[0].unwrap()
        };
        let qv = |r| fold(vec![LoraTarget::Q, LoraTarget::V], r);
        let h = qv(4).h;
        let per_wave = |t: usize| t.div_ceil(128) * (3 * h).div_ceil(256);
        assert!(qv(4).one_kernel_fits(512, per_wave(512)) && qv(8).one_kernel_fits(1, 132));
        assert!(!qv(4).one_kernel_fits(512, per_wave(512) - 1));
        assert!(!qv(16).one_kernel_fits(1, 132));
        assert!(fold(vec![LoraTarget::V], 16).one_kernel_fits(1, 132));
        assert!(!fold(vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V], 4).one_kernel_fits(1, 132));
    }
}
