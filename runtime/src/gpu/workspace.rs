//! The GPU model's buffers: what each layer's forward keeps for its backward, the backward's
//! scratch, and the LM head's. Allocated once for the largest batch seen ([`Caps`]) and
//! reused by every call (a batch uses a prefix of each buffer), so a training step allocates
//! nothing.
//!
//! Memory per layer, for `T` tokens: `T·(8H + F)` bf16 activations, plus, with flash
//! attention, an f32 log-sum-exp per (head, token); with materialised attention instead the
//! probabilities `P`, `Σ_b nh·L_b²` bf16 for the packed sequences of lengths `L_b` (268 MB a
//! layer for 4 sequences of 1024 tokens with 32 heads).

use super::attention::BlockLists;
use super::lora::{rank_pad, MAX_KERNEL_RANK};
use super::lora_fold::fold_cols;
use super::ops::{dev_err, LORA_WGRAD_CHUNKS, R};
use super::weights::ACT;
use crate::buffer::DeviceTensor;
use crate::checkpoint::OptConfig;
use crate::device::CudaDevice;
use crate::model::ModelError;
use lexp_compiler::dtype::Storage;

/// Rows of the LM head computed at once (its f32 logits are `[LOSS_CHUNK, V]`).
pub const LOSS_CHUNK: usize = 1024;

/// The model's extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Hidden size `H`.
    pub h: usize,
    /// MLP width `F`.
    pub f: usize,
    /// Attention heads.
    pub nh: usize,
    /// Head dimension `H / nh`.
    pub hd: usize,
    /// Vocabulary size.
    pub v: usize,
    /// Decoder layers.
    pub layers: usize,
}

impl Dims {
    /// The extents of `c`.
    pub fn of(c: &OptConfig) -> Dims {
        Dims {
            h: c.hidden_size,
            f: c.ffn_dim,
            nh: c.num_attention_heads,
            hd: c.head_dim(),
            v: c.vocab_size,
            layers: c.num_hidden_layers,
        }
    }
}

/// What a workspace is sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Tokens of a batch.
    pub tokens: usize,
    /// Elements of one layer's saved attention probabilities (all sequences of a batch;
    /// materialised attention only, else 0).
    pub probs: usize,
    /// Tokens of the longest packed sequence (materialised attention's score scratch is
    /// `nh·L²`; 0 with flash attention).
    pub max_len: usize,
    /// Rows of the flash-attention block lists (0 with materialised attention).
    pub blocks: usize,
    /// LoRA rank (0 without adapters).
    pub rank: usize,
    /// Columns of saved dropout masks per token and layer (0 without dropout; see
    /// [`MaskLayout`](super::dropout::MaskLayout)).
    pub mask_cols: usize,
}

impl Caps {
    /// True when a workspace of `self` can run a batch needing `need`.
    pub fn covers(&self, need: &Caps) -> bool {
        self.tokens >= need.tokens
            && self.probs >= need.probs
            && self.max_len >= need.max_len
            && self.blocks >= need.blocks
            && self.rank >= need.rank
            && self.mask_cols >= need.mask_cols
    }

    /// The larger of each size.
    pub fn max(&self, o: &Caps) -> Caps {
        Caps {
            tokens: self.tokens.max(o.tokens),
            probs: self.probs.max(o.probs),
            max_len: self.max_len.max(o.max_len),
            blocks: self.blocks.max(o.blocks),
            rank: self.rank.max(o.rank),
            mask_cols: self.mask_cols.max(o.mask_cols),
        }
    }

    /// Rows of the LM-head chunk buffers.
    fn chunk(&self) -> usize {
        LOSS_CHUNK.min(self.tokens).max(1)
    }

    /// Elements of the per-sequence score scratch, `nh·L²`.
    fn scores(&self, d: &Dims) -> usize {
        d.nh * self.max_len * self.max_len
    }

    /// Elements of the dropout scratch (uniforms, f32, and the dropped branch input): one
    /// `[T, max(H, F)]` each with dropout, 0 without.
    fn dropout_scratch(&self, d: &Dims) -> usize {
        if self.mask_cols > 0 {
            self.tokens * d.h.max(d.f)
        } else {
            0
        }
    }

    /// Elements of flash attention's per-(head, token) statistics (`lse2` per layer, `delta`
    /// in the scratch), 0 with materialised attention.
    fn flash_stats(&self, d: &Dims) -> usize {
        if self.blocks > 0 {
            d.nh * super::attention::stats_cols(self.tokens)
        } else {
            0
        }
    }

    /// Elements of the fused flash backward's f32 `dq` accumulator, `[T, H]` (0 with
    /// materialised attention).
    fn flash_dq(&self, d: &Dims) -> usize {
        if self.blocks > 0 {
            self.tokens * d.h
        } else {
            0
        }
    }

    /// Device bytes of a workspace of these sizes.
    pub fn bytes(&self, d: &Dims) -> usize {
        let (t, h, f) = (self.tokens, d.h, d.f);
        let a = ACT.bytes();
        let scores = self.scores(d);
        let (rp, fc) = (rank_pad(self.rank), fold_cols(self.rank));
        let layer = a * (t * (7 * h + fc + f) + self.probs + 6 * t * rp + t * self.mask_cols)
            + 4 * 4 * t
            + 4 * self.flash_stats(d);
        let scratch = a * (t * (3 * h + f + 3 * h + fc) + t * rp + scores)
            + 4 * (scores + d.nh * self.max_len + wgrad_part_len(self.rank, h, f))
            + (a + 4) * self.dropout_scratch(d)
            + 4 * (self.flash_stats(d) + self.flash_dq(d))
            + 3 * 12 * self.blocks;
        let head =
            a * (t * 4 * h + self.chunk() * d.v) + 4 * (self.chunk() * d.v + 2 * t) + 4 * 3 * t;
        d.layers * layer + scratch + head
    }
}

/// What one layer's forward keeps for its backward.
pub struct LayerActs {
    /// Layer input `[T, H]` (the residual stream).
    pub x: DeviceTensor,
    /// `LN1(x)`, the q/k/v input, `[T, H]`; with the LoRA fold `[T, H + kc]`, the q/k/v
    /// branches' `u` in the columns past `H` ([`super::lora_fold`]).
    pub a: DeviceTensor,
    /// LN1 statistics, f32 `[T]`.
    pub mean1: DeviceTensor,
    /// See `mean1`.
    pub rstd1: DeviceTensor,
    /// `[q | k | v]`, `[T, 3H]`: q unscaled (the scale is applied in the score GEMM).
    pub qkv: DeviceTensor,
    /// Attention probabilities of every sequence, `[nh, L, L]` each, bf16 (materialised
    /// attention).
    pub p: DeviceTensor,
    /// Base-2 log-sum-exp of each (head, token)'s scores, f32 `[nh, T]` (flash attention).
    pub lse2: DeviceTensor,
    /// Attention output (heads concatenated), `[T, H]`.
    pub o: DeviceTensor,
    /// `x + attention`, the LN2 input.
    pub h1: DeviceTensor,
    /// `LN2(h1)`, the fc1 input.
    pub b: DeviceTensor,
    /// LN2 statistics.
    pub mean2: DeviceTensor,
    /// See `mean2`.
    pub rstd2: DeviceTensor,
    /// ReLU output `[T, F]`, the fc2 input (its zero pattern is the ReLU mask).
    pub act: DeviceTensor,
    /// LoRA `u = x·Aᵀ` of each of the 6 targets, `[T, rank_pad(r)]` each.
    pub u: DeviceTensor,
    /// The dropout masks of the layer's sites (`0` or `1/(1−p)`), `[T, w]` each at the
    /// offsets of a [`MaskLayout`](super::dropout::MaskLayout); empty without dropout.
    pub mask: DeviceTensor,
}

/// The backward's scratch, shared by all layers.
pub struct Scratch {
    /// `[T, H]` temporaries.
    pub tmp: DeviceTensor,
    /// See `tmp`.
    pub tmp2: DeviceTensor,
    /// fc2 input gradient `[T, F]`.
    pub dact: DeviceTensor,
    /// `[dq | dk | dv]`, `[T, 3H]`; with the LoRA fold `[T, 3H + kc]`, the q/k/v branches' `du`
    /// past the heads ([`super::lora_fold`]; room for [`fold_cols`] columns).
    pub dqkv: DeviceTensor,
    /// LoRA `du`, `[T, rank_pad(r)]` (the LoRA fold keeps q/k/v's in `dqkv`).
    pub du: DeviceTensor,
    /// LoRA weight gradients' split-K partial sums, f32
    /// `[LORA_WGRAD_CHUNKS · max(H, F), rank_pad(r)]`, or room for the LoRA fold's six
    /// `[LORA_WGRAD_CHUNKS · H, 16]` blocks ([`wgrad_part_len`]).
    pub wpart: DeviceTensor,
    /// f32 scores `S` (forward) and `dP` (backward) of one sequence, `[nh, L, L]`.
    pub s: DeviceTensor,
    /// `dS` of one sequence, bf16.
    pub ds: DeviceTensor,
    /// The softmax's log-sum-exp per query row (written by the kernel, unused after).
    pub lse: DeviceTensor,
    /// Flash attention's `rowsum(dO ⊙ O)` per (head, token), f32 `[nh, T]`.
    pub delta: DeviceTensor,
    /// The fused flash backward's f32 `dq` accumulator, `[T, nh, hd]`.
    pub dq_acc: DeviceTensor,
    /// Flash attention's block lists of the current batch.
    pub blocks: BlockLists,
    /// Dropout: f32 uniforms of one site, `[T, w]`, `w ≤ max(H, F)`.
    pub rand: DeviceTensor,
    /// Dropout: a LoRA branch's dropped input `x ⊙ mask` (forward, and `dA`'s input in the
    /// backward), then its masked input gradient; `[T, max(H, F)]`.
    pub xd: DeviceTensor,
}

/// The embeddings' inputs and the LM head's buffers.
pub struct HeadBufs {
    /// Output of the last layer, `[T, H]`.
    pub x_out: DeviceTensor,
    /// `LN_final(x_out)`.
    pub hf: DeviceTensor,
    /// Final LN statistics.
    pub meanf: DeviceTensor,
    /// See `meanf`.
    pub rstdf: DeviceTensor,
    /// The gradient of the residual stream, `[T, H]`, updated in place layer by layer.
    pub g: DeviceTensor,
    /// Hidden rows with a target, gathered: `[N, H]`.
    pub hsel: DeviceTensor,
    /// Their gradient.
    pub dhsel: DeviceTensor,
    /// f32 logits of one chunk, `[chunk, V]` (the cross-entropy kernel writes their gradient
    /// into `dz`).
    pub z: DeviceTensor,
    /// `dz` rounded to bf16.
    pub dz: DeviceTensor,
    /// Token ids, i32 `[T]`.
    pub ids: DeviceTensor,
    /// Positions, i32 `[T]`.
    pub pos_ids: DeviceTensor,
    /// Targets of the gathered rows, i32 `[N]`.
    pub targets: DeviceTensor,
    /// Per-row losses, f32 `[N]`.
    pub loss: DeviceTensor,
}

/// All buffers of the GPU model for batches up to [`Workspace::caps`].
pub struct Workspace {
    /// The sizes allocated.
    pub caps: Caps,
    /// Per layer.
    pub layers: Vec<LayerActs>,
    /// Backward scratch.
    pub scratch: Scratch,
    /// Embedding inputs and LM head.
    pub head: HeadBufs,
}

/// Allocates zeroed tensors, turning failures into a [`ModelError::Device`] with the sizes.
struct Alloc<'a> {
    dev: &'a CudaDevice,
    total: usize,
}

impl Alloc<'_> {
    fn t(&self, dtype: Storage, n: usize) -> R<DeviceTensor> {
        DeviceTensor::zeros(self.dev, dtype, &[n.max(1)]).map_err(|e| {
            let mem = match self.dev.mem_info() {
                Ok((free, total)) => format!("{} MiB free of {} MiB", free >> 20, total >> 20),
                Err(_) => "free memory unknown".into(),
            };
            ModelError::Device(format!(
                "allocating the GPU workspace ({} MiB in all; {mem}): {e}",
                self.total >> 20
            ))
        })
    }
}

/// The refusal of a workspace of `caps` for a model of `d` on a device with `free` of `all`
/// bytes free, naming needed and free MiB and the settings that shrink it; `None` when it
/// fits. Planned before allocating, so a too-large request fails at start-up with the numbers
/// instead of a driver error halfway through.
pub fn out_of_memory(caps: &Caps, d: &Dims, free: usize, all: usize) -> Option<String> {
    let total = caps.bytes(d);
    (total > free).then(|| {
        format!(
            "out of GPU memory: a batch of {} tokens needs a {} MiB workspace ({} MiB of \
             it saved attention probabilities), but only {} MiB of {} MiB are free; use \
             a smaller --micro-batch-tokens or --max-seq-len",
            caps.tokens,
            total >> 20,
            (d.layers * caps.probs * ACT.bytes()) >> 20,
            free >> 20,
            all >> 20
        )
    })
}

impl Workspace {
    /// Allocates a workspace of `caps` for a model of `d`, refusing with the numbers when the
    /// device has too little free memory.
    pub fn new(dev: &CudaDevice, d: &Dims, caps: Caps) -> R<Workspace> {
        let total = caps.bytes(d);
        let (free, all) = dev.mem_info().map_err(dev_err("querying GPU memory"))?;
        if let Some(msg) = out_of_memory(&caps, d, free, all) {
            return Err(ModelError::Device(msg));
        }
        let al = Alloc { dev, total };
        let (t, h, f, r) = (caps.tokens, d.h, d.f, caps.rank);
        let f32t = Storage::F32;
        let layers = (0..d.layers)
            .map(|_| {
                Ok(LayerActs {
                    x: al.t(ACT, t * h)?,
                    a: al.t(ACT, t * (h + fold_cols(r)))?,
                    mean1: al.t(f32t, t)?,
                    rstd1: al.t(f32t, t)?,
                    qkv: al.t(ACT, t * 3 * h)?,
                    p: al.t(ACT, caps.probs)?,
                    lse2: al.t(f32t, caps.flash_stats(d))?,
                    o: al.t(ACT, t * h)?,
                    h1: al.t(ACT, t * h)?,
                    b: al.t(ACT, t * h)?,
                    mean2: al.t(f32t, t)?,
                    rstd2: al.t(f32t, t)?,
                    act: al.t(ACT, t * f)?,
                    u: al.t(ACT, 6 * t * rank_pad(r))?,
                    mask: al.t(ACT, t * caps.mask_cols)?,
                })
            })
            .collect::<R<Vec<_>>>()?;
        let scores = caps.scores(d);
        let scratch = Scratch {
            tmp: al.t(ACT, t * h)?,
            tmp2: al.t(ACT, t * h)?,
            dact: al.t(ACT, t * f)?,
            dqkv: al.t(ACT, t * (3 * h + fold_cols(r)))?,
            du: al.t(ACT, t * rank_pad(r))?,
            wpart: al.t(f32t, wgrad_part_len(r, h, f))?,
            s: al.t(f32t, scores)?,
            ds: al.t(ACT, scores)?,
            lse: al.t(f32t, d.nh * caps.max_len)?,
            delta: al.t(f32t, caps.flash_stats(d))?,
            dq_acc: al.t(f32t, caps.flash_dq(d))?,
            blocks: BlockLists {
                fwd: al.t(Storage::I32, 3 * caps.blocks)?,
                dq: al.t(Storage::I32, 3 * caps.blocks)?,
                dkdv: al.t(Storage::I32, 3 * caps.blocks)?,
                rows: [0; 3],
            },
            rand: al.t(f32t, caps.dropout_scratch(d))?,
            xd: al.t(ACT, caps.dropout_scratch(d))?,
        };
        let chunk = caps.chunk();
        let head = HeadBufs {
            x_out: al.t(ACT, t * h)?,
            hf: al.t(ACT, t * h)?,
            meanf: al.t(f32t, t)?,
            rstdf: al.t(f32t, t)?,
            g: al.t(ACT, t * h)?,
            hsel: al.t(ACT, t * h)?,
            dhsel: al.t(ACT, t * h)?,
            z: al.t(f32t, chunk * d.v)?,
            dz: al.t(ACT, chunk * d.v)?,
            ids: al.t(Storage::I32, t)?,
            pos_ids: al.t(Storage::I32, t)?,
            targets: al.t(Storage::I32, t)?,
            loss: al.t(f32t, t)?,
        };
        tracing::debug!(?caps, mib = total >> 20, "GPU workspace allocated");
        Ok(Workspace {
            caps,
            layers,
            scratch,
            head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_cover_and_grow() {
        let a = Caps {
            tokens: 100,
            probs: 50,
            max_len: 30,
            blocks: 0,
            rank: 4,
            mask_cols: 0,
        };
        let b = Caps {
            tokens: 80,
            probs: 60,
            max_len: 10,
            blocks: 3,
            rank: 8,
            mask_cols: 5,
        };
        assert!(!a.covers(&b) && !b.covers(&a));
        let m = a.max(&b);
        assert!(m.covers(&a) && m.covers(&b));
        assert_eq!(
            (m.tokens, m.probs, m.max_len, m.blocks, m.rank, m.mask_cols),
            (100, 60, 30, 3, 8, 5)
        );
    }

    #[test]
    fn workspace_bytes_grow_with_every_size() {
        let d = Dims {
            h: 64,
            f: 256,
            nh: 4,
            hd: 16,
            v: 1000,
            layers: 2,
        };
        let base = Caps {
            tokens: 128,
            probs: 4096,
            max_len: 64,
            blocks: 0,
            rank: 4,
            mask_cols: 0,
        };
        let b0 = base.bytes(&d);
        for bigger in [
            Caps {
                tokens: 256,
                ..base
            },
            Caps {
                probs: 8192,
                ..base
            },
            Caps {
                max_len: 65,
                ..base
            },
            Caps { blocks: 2, ..base },
            // u and du are padded to 8 columns: rank 16 is the next size up from 4.
            Caps { rank: 16, ..base },
            Caps {
                mask_cols: 1,
                ..base
            },
        ] {
            assert!(bigger.bytes(&d) > b0, "{bigger:?}");
        }
        // Saved probabilities are counted once per layer, in bf16.
        let more = Caps {
            probs: base.probs + 1000,
            ..base
        };
        assert_eq!(more.bytes(&d) - b0, d.layers * 1000 * 2);
        // Dropout: the bf16 masks per layer, plus one f32 and one bf16 `[T, max(H, F)]`.
        let drop = Caps {
            mask_cols: 3,
            ..base
        };
        assert_eq!(
            drop.bytes(&d) - b0,
            d.layers * 128 * 3 * 2 + 128 * 256 * (4 + 2)
        );
    }

    /// An OPT-1.3B-sized request at a huge token budget is refused by the plan (no GPU holds
    /// it), with the numbers and the way out; a usual budget fits an H200.
    #[test]
    fn gpu_oom_sized_request_is_refused_with_the_numbers() {
        // facebook/opt-1.3b.
        let d = Dims {
            h: 2048,
            f: 8192,
            nh: 32,
            hd: 64,
            v: 50272,
            layers: 24,
        };
        let caps = |tokens: usize| Caps {
            tokens,
            probs: 0,
            max_len: 0,
            blocks: tokens.div_ceil(64),
            rank: 8,
            mask_cols: 0,
        };
        let huge = caps(1 << 20);
        // Saved bf16 activations alone: T·(7H + F) per layer.
        let floor = (1usize << 20) * (7 * d.h + d.f) * 2 * d.layers;
        assert!(huge.bytes(&d) >= floor, "{} < {floor}", huge.bytes(&d));
        let h200 = 141 << 30;
        assert!(huge.bytes(&d) > 2 * h200);
        let (free, all) = (h200 - (3 << 30), h200);
        let msg = out_of_memory(&huge, &d, free, all).unwrap();
        for needle in [
            "out of GPU memory: a batch of 1048576 tokens".to_string(),
            format!("needs a {} MiB workspace", huge.bytes(&d) >> 20),
            format!("only {} MiB of {} MiB are free", free >> 20, all >> 20),
            "use a smaller --micro-batch-tokens".to_string(),
        ] {
            assert!(msg.contains(&needle), "{msg:?} lacks {needle:?}");
        }
        let usual = caps(4096);
        assert!(usual.bytes(&d) < 16 << 30);
        assert_eq!(out_of_memory(&usual, &d, free, all), None);
        // The boundary: exactly the workspace fits, one byte less does not.
        let need = usual.bytes(&d);
        assert_eq!(out_of_memory(&usual, &d, need, all), None);
        assert!(out_of_memory(&usual, &d, need - 1, all).is_some());
    }
}

/// Elements of the LoRA weight-gradient scratch for rank `r`, hidden size `h` and MLP width
/// `f`: one pass of the widest side (`max(h, f)` rows per chunk), or the LoRA fold's passes
/// of a layer side by side (up to six blocks of `h` rows, 16 columns each: three `dB`, up to
/// three `dA`; [`super::lora_fold`]); none without LoRA or for ranks the branch kernels do not
/// take (they run on cuBLAS).
fn wgrad_part_len(r: usize, h: usize, f: usize) -> usize {
    let rows = h.max(f) * rank_pad(r);
    match r {
        1..=MAX_KERNEL_RANK => LORA_WGRAD_CHUNKS * rows.max(6 * h * 16),
        _ => 0,
    }
}
