//! Causal self-attention of one layer over the packed sequences of a batch, forward and
//! backward (RUNTIME.md §2.3), in one of two implementations ([`AttentionImpl`]):
//!
//! - **Flash** (the default): the DSL's flash-attention kernels
//!   (`lexp_kernels::flash_attention`, FA2 form). Scores and probabilities never reach memory;
//!   the forward keeps only `o` and a base-2 log-sum-exp per (head, token), and the backward
//!   recomputes the probabilities from it. All sequences and heads of a batch go in one launch
//!   per kernel, driven by device-side block lists ([`BlockLists`]) uploaded with the batch.
//!   The kernels are compiled for tiles 64 and 128 wide. OPT-2.7B's heads of 80 run kernels
//!   that split every product over the head in 64 + 16 (`lexp_kernels::flash_split`); other
//!   head dimensions between 64 and 128 run the 128 kernels in place ([`flash_kernels_for`]):
//!   their loads zero-fill the tile's columns past the head and their stores drop them, which
//!   changes no result in exact arithmetic.
//! - **Materialised**: per sequence, strided-batched cuBLAS GEMMs over the heads read q, k and
//!   v in place in the `[T, 3H]` projection output (head `h` at column `h·hd`, row stride
//!   `3H`); f32 scores, a causal-softmax kernel, bf16 probabilities saved for the backward.
//!   Any head dimension; the `hd^-0.5` scale of q is folded into the GEMMs' `alpha`.
//!
//! Both apply the scale to `q·kᵀ`, not to the projected q (bias and LoRA delta included):
//! the same math as PyTorch's OPT, without a pass over q.

use super::flash_launch::{self as fl, Bwd, BwdArgs};
pub use super::flash_launch::{FlashFamily, Tiles};
use super::layer::{Ctx, Segment};
use super::ops::{arg, arg_at, causal_softmax, mat_arg, mm_batched, softmax_bwd, upload_prefix, R};
use super::sparse_attention::{self, sparse_config, AttnArgs, SparseFlashConfig};
use super::workspace::{LayerActs, Scratch};
use crate::buffer::DeviceTensor;
use crate::cublas::{Mat, MatLayout, MatMut};
use crate::device::CudaDevice;
use crate::model::ModelError;
use lexp_compiler::launch::{Arch, LaunchError, Launcher, TensorArg};
use lexp_kernels::flash_attention::{self as fa, BlockRow};

/// The flash-attention tile configurations the engine runs for one head dimension, and the
/// block sizes of the lists they take.
#[derive(Debug, PartialEq, Eq)]
pub struct FlashConfig {
    /// The head dimension the kernels are compiled for: with [`FlashFamily::Tile`] their tile
    /// width `D`, the widest head they take (narrower ones run in place,
    /// [`flash_kernels_for`]); with [`FlashFamily::Split`] `LO + HI`, the only one.
    pub hd: usize,
    /// Which kernels.
    pub family: FlashFamily,
    /// `flash_fwd`: `BM` queries per program, `BN` keys per step.
    pub fwd: Tiles,
    /// `flash_bwd_dkdv`: `BN` keys per program, `BM` queries per step.
    pub dkdv: Tiles,
    /// `flash_bwd_dq`: `BM` queries per program, `BN` keys per step.
    pub dq: Tiles,
    /// `flash_bwd_fused` (dk, dv and dq in one pass, `dq` added in L2 by the TMA), run instead
    /// of dk/dv + dq where set (sm_90 configurations only) unless the process asked for the
    /// deterministic backward ([`deterministic_attention`]); the key-block list is then built
    /// for its `BN` ([`FlashConfig::dkdv_bn`]).
    pub fused: Option<Tiles>,
    /// `(tokens, configuration)`: the configuration for batches whose longest sequence has at
    /// least `tokens` tokens, where each program's loop is long and the tiles that win differ
    /// (`None`: these at every length). Its block sizes may differ, so the block lists are
    /// built from the configuration the batch runs ([`FlashConfig::for_longest`]), which
    /// follows the long configuration's own `long` in turn.
    pub long: Option<(usize, &'static FlashConfig)>,
    /// The configuration sm_80 runs instead, where some of these tiles spill there (`None`:
    /// these). Its block sizes may differ, so the block lists are built from the
    /// configuration of the device's architecture ([`FlashConfig::on`]).
    pub sm80: Option<&'static FlashConfig>,
}

impl FlashConfig {
    /// The configuration a batch whose longest sequence has `longest` tokens runs
    /// ([`FlashConfig::long`]); apply after [`FlashConfig::on`].
    pub fn for_longest(&'static self, longest: usize) -> &'static FlashConfig {
        match self.long {
            Some((from, c)) if longest >= from => c.for_longest(longest),
            _ => self,
        }
    }

    /// Queries per block of the forward's list.
    pub fn fwd_bm(&self) -> usize {
        param(self.fwd, "BM")
    }

    /// Queries per block of `flash_bwd_dq`'s list.
    pub fn dq_bm(&self) -> usize {
        param(self.dq, "BM")
    }

    /// Keys per block of the key-block list: `flash_bwd_dkdv`'s, or the fused backward's
    /// where it runs ([`FlashConfig::fused_tiles`]).
    pub fn dkdv_bn(&self) -> usize {
        param(self.fused_tiles().unwrap_or(self.dkdv), "BN")
    }

    /// The fused backward's tiles where it runs: set for these heads and lengths, and the
    /// process did not ask for the deterministic backward ([`deterministic_attention`]).
    pub fn fused_tiles(&self) -> Option<Tiles> {
        self.fused.filter(|_| !deterministic_attention())
    }

    /// The configuration to run on `arch` ([`FlashConfig::sm80`]).
    pub fn on(&'static self, arch: Arch) -> &'static FlashConfig {
        match (arch, self.sm80) {
            (Arch::Sm80, Some(c)) => c,
            _ => self,
        }
    }

    /// The tile width of `flash_bwd_delta` for these heads (the split kernels' heads of 80
    /// run it on the 128 tile, masked).
    pub fn delta_width(&self) -> usize {
        match self.family {
            FlashFamily::Tile => self.hd,
            FlashFamily::Split => FLASH_128.hd,
        }
    }
}

/// Set to `1` to run the two-kernel flash backward (dk/dv, then dq) where the fused one would
/// run: the fused kernel adds each key block's share of `dq` into an f32 accumulator in
/// whatever order the programs finish, so `dq`'s rounding differs from run to run.
pub const DETERMINISTIC_ATTENTION_ENV: &str = "LEXP_DETERMINISTIC_ATTENTION";

/// True when [`DETERMINISTIC_ATTENTION_ENV`] is `1`; read once per process.
pub fn deterministic_attention() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var(DETERMINISTIC_ATTENTION_ENV).as_deref() == Ok("1");
        tracing::debug!(on, "deterministic flash backward");
        on
    })
}

fn param(c: Tiles, name: &str) -> usize {
    c.iter().find(|(n, _)| *n == name).map_or(0, |&(_, v)| v)
}

/// Head dimension 64 (OPT-125m to 1.3B), batches of sequences shorter than 16384 tokens:
/// one-warpgroup programs (`W = 4`: 64 queries or keys each, 123–213 registers, so two to four
/// CTAs share a multiprocessor and one's prologue and epilogue overlap another's products). At
/// OPT-1.3B's 4 x 1024 on the H200 they beat the two-warpgroup tiles that ran before in every
/// kernel (`bench/results/2026-12-01-h200-flash-w4/call106`,
/// `runtime/tests/gpu_flash.rs` times every configuration): forward 0.085 against 0.095 ms,
/// dk/dv 0.165 against 0.184, dq 0.087 against 0.103; at 4 x 512 0.033 / 0.062 / 0.035
/// against 0.036 / 0.073 / 0.043; at 1 x 4096 0.267 / 0.506 / 0.271 against 0.274 / 0.526 /
/// 0.284, at 1 x 8192 0.924 / 1.785 / 0.942 against 0.936 / 1.805 / 0.960 (call 107); dk/dv
/// in 4 stages, 1–2% faster than in 3 from 4 x 512 to 1 x 8192 (call 111: 0.161 against 0.164
/// ms at 4 x 1024, 0.501 against 0.507 at 1 x 4096); with the causal mask on the diagonal
/// blocks only (call 113) 2 stages are as fast or faster at every length (0.153 against 0.154 ms
/// at 4 x 1024, 0.460 against 0.465 at 1 x 4096, 1.628 against 1.639 with 3 at 1 x 8192).
/// dk/dv held to three programs per multiprocessor (`C = 3`: 168 registers and 48 bytes
/// spilled in the key loop, against 225 registers and two programs), faster at every length
/// (call 117, `bench/results/2026-12-01-h200-ctas/`: 0.147 against 0.153 ms at 4 x 1024, 0.443
/// against 0.461 at 1 x 4096, 1.545 against 1.625 at 1 x 8192, 5.863 against 5.968 at 1 x
/// 16384). Earlier history of the two-warpgroup tiles: `P` and `dSᵀ`
/// feed the MMAs from registers when each warp owns whole rows (COMPILER.md §1.7), and TMA
/// copies beat `cp.async` (`bench/results/2026-11-30-h200-tma/call66/`).
#[rustfmt::skip]
static FLASH_64: FlashConfig = FlashConfig {
    hd: 64,
    family: FlashFamily::Tile,
    fwd: &[("D", 64), ("BM", 64), ("BN", 64), ("S", 2), ("W", 4), ("TMA", 1)],
    dkdv: &[("D", 64), ("BN", 64), ("BM", 64), ("S", 2), ("W", 4), ("TMA", 1), ("C", 3)],
    dq: &[("D", 64), ("BM", 64), ("BN", 64), ("S", 2), ("W", 4), ("TMA", 1)],
    fused: None,
    long: Some((8192, &FLASH_64_MID)),
    sm80: Some(&FLASH_64_SM80),
};

/// [`FLASH_64`] from 8192 tokens: the backward fused (`lexp_kernels::flash_fused`: dk, dv and
/// dq in one pass over the key blocks, `dq` added into an f32 accumulator by the TMA's bulk
/// reductions, five products instead of seven), one warpgroup of 64 keys in 64-query steps, 3
/// stages. At 1 x 8192, 32 heads (`gpu_flash`'s timing test,
/// `bench/results/2026-12-02-h200-fused-bwd-tma/call137`): 2.329 ms against 2.444 for delta +
/// dk/dv + dq (0.021 + 1.513 + 0.910); the two-warpgroup 128-key fused tile 2.407. Below 8192
/// the two kernels stay: at 4 x 1024 the fused backward took 0.222 against 0.216 ms, at 1 x
/// 4096 forward + backward 0.939 against 0.909 (call 135, fused in 2 stages). Heads of 128
/// keep the two kernels at every length (the fused 64 x 32 tile took 15.9 ms at 1 x 16384,
/// call 137; one warpgroup of 64 x 64 spills 148 bytes).
#[rustfmt::skip]
static FLASH_64_MID: FlashConfig = FlashConfig {
    fused: Some(&[("D", 64), ("BN", 64), ("BM", 64), ("S", 3), ("W", 4), ("TMA", 1)]),
    long: Some((16384, &FLASH_64_LONG)),
    sm80: None,
    ..FLASH_64
};

/// [`FLASH_64`] from 16384 tokens: the forward and dq in two-warpgroup programs of 128
/// queries, which at 1 x 16384 are as fast or faster than the one-warpgroup ones (call 113,
/// diagonal-only mask: forward 2.812 against 2.875 ms, dq 3.483 against 3.489; call 106:
/// 3.39 against 3.42, 3.40 against 3.65). Forward with 128-key steps (3.42 against 3.57 ms with
/// 64, `bench/results/2026-11-30-h200-timing/call76/`) in 3 stages (2.760 against 2.799 ms in
/// 2, `bench/results/2026-12-02-h200-epilogue/call126/`), dq with 128-key steps in 2 stages
/// (3.40 against 3.58–3.60 with 3 in both runs of call 106). dk/dv one-warpgroup at three
/// programs per multiprocessor as in [`FLASH_64`] (call 117: 5.863 ms; call 113, two programs:
/// 5.989 against 6.020 for 128 keys in 2 stages and 6.102 in 3). The backward fused as in
/// [`FLASH_64_MID`] (call 137: 8.662 ms against 9.206 for delta + dk/dv + dq; the
/// two-warpgroup 128-key fused tile 8.759).
#[rustfmt::skip]
static FLASH_64_LONG: FlashConfig = FlashConfig {
    hd: 64,
    family: FlashFamily::Tile,
    fwd: &[("D", 64), ("BM", 128), ("BN", 128), ("S", 3), ("W", 8), ("TMA", 1)],
    dkdv: &[("D", 64), ("BN", 64), ("BM", 64), ("S", 2), ("W", 4), ("TMA", 1), ("C", 3)],
    dq: &[("D", 64), ("BM", 128), ("BN", 128), ("S", 2), ("W", 8), ("TMA", 1)],
    fused: Some(&[("D", 64), ("BN", 64), ("BM", 64), ("S", 3), ("W", 4), ("TMA", 1)]),
    long: None,
    sm80: None,
};

/// [`FLASH_64`] on sm_80: the two-warpgroup tiles sm_90 ran before call 106 (the
/// one-warpgroup ones are not measured there), dk/dv in 2 stages with `cp.async` copies;
/// 128-key forward steps from 4096 tokens.
#[rustfmt::skip]
static FLASH_64_SM80: FlashConfig = FlashConfig {
    hd: 64,
    family: FlashFamily::Tile,
    fwd: &[("D", 64), ("BM", 128), ("BN", 64), ("S", 3), ("W", 8), ("TMA", 1)],
    dkdv: &[("D", 64), ("BN", 128), ("BM", 64), ("S", 2), ("W", 8), ("TMA", 0)],
    dq: &[("D", 64), ("BM", 128), ("BN", 128), ("S", 3), ("W", 8), ("TMA", 1)],
    fused: None,
    long: Some((4096, &FLASH_64_SM80_LONG)),
    sm80: None,
};

/// [`FLASH_64_SM80`] from 4096 tokens.
#[rustfmt::skip]
static FLASH_64_SM80_LONG: FlashConfig = FlashConfig {
    fwd: &[("D", 64), ("BM", 128), ("BN", 128), ("S", 2), ("W", 8), ("TMA", 1)],
    long: None,
    ..FLASH_64_SM80
};

/// Head dimension 128 (OPT-6.7B and larger), sm_90, batches of sequences shorter than 4096
/// tokens: one-warpgroup programs as for [`FLASH_64`] (call 106, 16 heads at 4 x
/// 1024: forward 0.076 against 0.079 ms, dk/dv 0.133 against 0.148, dq 0.083 against 0.090).
#[rustfmt::skip]
static FLASH_128: FlashConfig = FlashConfig {
    hd: 128,
    family: FlashFamily::Tile,
    fwd: &[("D", 128), ("BM", 64), ("BN", 64), ("S", 2), ("W", 4), ("TMA", 1)],
    dkdv: &[("D", 128), ("BN", 64), ("BM", 64), ("S", 2), ("W", 4), ("TMA", 1)],
    dq: &[("D", 128), ("BM", 64), ("BN", 64), ("S", 2), ("W", 4), ("TMA", 1)],
    fused: None,
    long: Some((4096, &FLASH_128_LONG)),
    sm80: Some(&FLASH_128_SM80),
};

/// [`FLASH_128`] from 4096 tokens: forward with 128-query programs and 128-key
/// steps (call 106: 0.207 against 0.221 ms at 1 x 4096, 2.26 against 2.69 at 1 x 16384; call
/// 113, diagonal-only mask: 0.185 against 0.204, 1.948 against 2.432). dk/dv and dq stay
/// one-warpgroup (call 113: dk/dv 0.365 against 0.407 ms for 128 keys at 1 x 4096, 4.452
/// against 4.485 at 1 x 16384; dq 0.240 against 0.254 for 128 queries at 1 x 4096).
#[rustfmt::skip]
static FLASH_128_LONG: FlashConfig = FlashConfig {
    fwd: &[("D", 128), ("BM", 128), ("BN", 128), ("S", 2), ("W", 8), ("TMA", 1)],
    long: Some((16384, &FLASH_128_LONGEST)),
    sm80: None,
    ..FLASH_128
};

/// [`FLASH_128_LONG`] from 16384 tokens: dq in 128-query programs (call 113: 2.870 against
/// 3.100 ms for the one-warpgroup ones at 1 x 16384; 8192 tokens not measured).
#[rustfmt::skip]
static FLASH_128_LONGEST: FlashConfig = FlashConfig {
    dq: &[("D", 128), ("BM", 128), ("BN", 64), ("S", 2), ("W", 8), ("TMA", 1)],
    fused: None,
    long: None,
    ..FLASH_128_LONG
};

/// Heads of 128 on sm_80: the tiles that assemble there without spills (64 keys per forward
/// step and dk/dv program, 32-query dk/dv steps, 64-query dq programs), two warpgroups.
#[rustfmt::skip]
static FLASH_128_SM80: FlashConfig = FlashConfig {
    hd: 128,
    family: FlashFamily::Tile,
    fwd: &[("D", 128), ("BM", 128), ("BN", 64), ("S", 2), ("W", 8), ("TMA", 0)],
    dkdv: &[("D", 128), ("BN", 64), ("BM", 32), ("S", 2), ("W", 8), ("TMA", 0)],
    dq: &[("D", 128), ("BM", 64), ("BN", 64), ("S", 2), ("W", 8), ("TMA", 0)],
    fused: None,
    long: None,
    sm80: None,
};

/// Head dimension 80 (OPT-2.7B) as 64 + 16 (`lexp_kernels::flash_split`): the fastest
/// compiled configurations at OPT-2.7B's 4 x 1024 on the H200 (`gpu_flash`'s timing test,
/// `bench/results/2026-11-30-h200-flash-heads/call59-split/gpu_flash-timed.txt`): forward
/// 0.127 ms with 3 stages (0.136 with 2), dq 0.145 ms with 128 queries. dk/dv: 128 keys in
/// 64-query steps on sm_90 (0.281 ms, against 0.307 with 32; `call62-dkdv-sm90/`), which
/// spill on sm_80, where 32-query steps run.
#[rustfmt::skip]
static FLASH_80: FlashConfig = FlashConfig {
    hd: 80,
    family: FlashFamily::Split,
    fwd: &[("BM", 128), ("BN", 128), ("S", 3), ("W", 8)],
    dkdv: &[("BN", 128), ("BM", 64), ("S", 2), ("W", 8)],
    dq: &[("BM", 128), ("BN", 64), ("S", 2), ("W", 8)],
    fused: None,
    long: None,
    sm80: Some(&FLASH_80_SM80),
};

/// [`FLASH_80`] on sm_80: dk/dv in 32-query steps.
#[rustfmt::skip]
static FLASH_80_SM80: FlashConfig = FlashConfig {
    dkdv: &[("BN", 128), ("BM", 32), ("S", 2), ("W", 8)],
    sm80: None,
    ..FLASH_80
};

/// The head dimensions flash kernels are compiled for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [FLASH_64.hd, FLASH_80.hd, FLASH_128.hd];

/// The flash configuration compiled for head dimension `hd`, if there is one.
pub fn flash_config(hd: usize) -> Option<&'static FlashConfig> {
    [&FLASH_64, &FLASH_80, &FLASH_128]
        .into_iter()
        .find(|c| c.hd == hd)
}

/// The flash kernels the engine runs for head dimension `hd`: those compiled for it, or for
/// another head dimension between 64 and 128 that is a multiple of 8 (the kernels' 16-byte
/// copies need whole 8-column pieces) the 128 ones, which take the narrower heads in place
/// (then `cfg.hd > hd`). Small head dimensions (test models) do not run on the 64 ones:
/// that measured worse bf16 agreement with the CPU than the materialised attention (last-layer
/// q/k gradients of `gpu_engine`'s clean variant with heads of 16, 1.75e-1 against ≤ 8e-2).
pub fn flash_kernels_for(hd: usize) -> Option<&'static FlashConfig> {
    let narrower = hd > FLASH_64.hd && hd < FLASH_128.hd && hd.is_multiple_of(8);
    flash_config(hd).or_else(|| narrower.then_some(&FLASH_128))
}

/// Which attention implementation the GPU engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Flash attention in the DSL (head dimensions [`FLASH_HEAD_DIMS`]).
    Flash,
    /// Materialised scores with cuBLAS (any head dimension).
    Materialised,
}

impl AttentionImpl {
    /// Flash where its kernels take the head dimension `hd`, else materialised.
    pub fn default_for(hd: usize) -> AttentionImpl {
        if flash_kernels_for(hd).is_some() {
            AttentionImpl::Flash
        } else {
            AttentionImpl::Materialised
        }
    }

    /// `self` for a model with head dimension `hd`, or why it cannot run it.
    pub fn check(self, hd: usize) -> Result<AttentionImpl, ModelError> {
        if self == AttentionImpl::Flash && flash_kernels_for(hd).is_none() {
            return Err(ModelError::Unsupported(format!(
                "flash attention is compiled for head dimensions {FLASH_HEAD_DIMS:?} (and runs \
                 multiples of 8 between them on the wider kernels); this model's is {hd} (use \
                 the materialised attention)"
            )));
        }
        Ok(self)
    }

    /// The name the CLI and the benchmark JSON use.
    pub fn name(self) -> &'static str {
        match self {
            AttentionImpl::Flash => "flash",
            AttentionImpl::Materialised => "materialised",
        }
    }
}

impl std::str::FromStr for AttentionImpl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flash" => Ok(AttentionImpl::Flash),
            "materialised" | "materialized" => Ok(AttentionImpl::Materialised),
            other => Err(format!(
                "unknown attention implementation `{other}` (flash, materialised)"
            )),
        }
    }
}

/// The host side of a batch's block lists: `(start, len, first)` rows for the three
/// flash-attention launches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockPlan {
    /// Query blocks of `flash_fwd` ([`FlashConfig::fwd_bm`] queries each).
    pub fwd: Vec<BlockRow>,
    /// Query blocks of `flash_bwd_dq` ([`FlashConfig::dq_bm`]).
    pub dq: Vec<BlockRow>,
    /// Key blocks of `flash_bwd_dkdv` ([`FlashConfig::dkdv_bn`]).
    pub dkdv: Vec<BlockRow>,
}

impl BlockPlan {
    /// The lists of the sequences `segs` for the kernels of `cfg`.
    pub fn of(segs: &[Segment], cfg: &FlashConfig) -> R<BlockPlan> {
        let mut cu = Vec::with_capacity(segs.len() + 1);
        cu.push(segs.first().map_or(0, |s| s.start));
        cu.extend(segs.iter().map(|s| s.start + s.len));
        let too_long = || ModelError::Batch("a batch position does not fit in i32".into());
        Ok(BlockPlan {
            fwd: fa::query_blocks(&cu, cfg.fwd_bm()).ok_or_else(too_long)?,
            dq: fa::query_blocks(&cu, cfg.dq_bm()).ok_or_else(too_long)?,
            dkdv: fa::key_blocks(&cu, cfg.dkdv_bn()).ok_or_else(too_long)?,
        })
    }

    /// Rows of the longest list (what a [`BlockLists`] buffer must hold).
    pub fn rows(&self) -> usize {
        self.fwd.len().max(self.dq.len()).max(self.dkdv.len())
    }
}

/// The device copies of a batch's block lists, `[rows, 3]` i32 each, in buffers of a
/// workspace's capacity.
pub struct BlockLists {
    /// See [`BlockPlan::fwd`].
    pub fwd: DeviceTensor,
    /// See [`BlockPlan::dq`].
    pub dq: DeviceTensor,
    /// See [`BlockPlan::dkdv`].
    pub dkdv: DeviceTensor,
    /// Rows in use of each (`fwd`, `dq`, `dkdv`).
    pub rows: [usize; 3],
}

impl BlockLists {
    /// Uploads `plan` (asynchronously, on the device's stream).
    pub fn upload(&mut self, dev: &CudaDevice, plan: &BlockPlan) -> R {
        let bytes = |v: &[BlockRow]| -> Vec<u8> {
            v.iter().flatten().flat_map(|x| x.to_le_bytes()).collect()
        };
        upload_prefix(dev, &mut self.fwd, &bytes(&plan.fwd))?;
        upload_prefix(dev, &mut self.dq, &bytes(&plan.dq))?;
        upload_prefix(dev, &mut self.dkdv, &bytes(&plan.dkdv))?;
        self.rows = [plan.fwd.len(), plan.dq.len(), plan.dkdv.len()];
        Ok(())
    }

    fn args(&self) -> R<[TensorArg; 3]> {
        Ok([
            arg(&self.fwd, &[self.rows[0], 3])?,
            arg(&self.dq, &[self.rows[1], 3])?,
            arg(&self.dkdv, &[self.rows[2], 3])?,
        ])
    }
}

fn launch_err(what: &'static str) -> impl FnOnce(LaunchError) -> ModelError {
    move |e| ModelError::Device(format!("{what}: {e}"))
}

/// `o = softmax(s·q·kᵀ + causal mask)·v` per sequence and head, into `acts.o`; over layer
/// `li`'s kept blocks when the context has block-sparse lists.
pub fn forward(cx: &Ctx, li: usize, acts: &mut LayerActs, sc: &mut Scratch) -> R {
    if let Some(lists) = cx.attn {
        return sparse_attention::forward(
            cx.dev,
            sparse_cfg(cx)?,
            lists.layer(li)?,
            &args(cx, li, acts, sc)?,
        );
    }
    match cx.attention {
        AttentionImpl::Flash => flash_forward(cx, acts, sc),
        AttentionImpl::Materialised => materialised_forward(cx, acts, sc),
    }
}

/// The backward from `dO` in `sc.tmp` into `sc.dqkv`: `dP = dO·vᵀ`,
/// `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, `dq = s·dS·k`, `dk = s·dSᵀ·q`, `dv = Pᵀ·dO`.
pub fn backward(cx: &Ctx, li: usize, acts: &LayerActs, sc: &mut Scratch) -> R {
    if let Some(lists) = cx.attn {
        return sparse_attention::backward(
            cx.dev,
            sparse_cfg(cx)?,
            lists.layer(li)?,
            &args(cx, li, acts, sc)?,
        );
    }
    match cx.attention {
        AttentionImpl::Flash => flash_backward(cx, li, acts, sc),
        AttentionImpl::Materialised => materialised_backward(cx, li, acts, sc),
    }
}

/// Columns of the f32 `[nh, T]` statistics: `T` rounded up to 4, so that their rows are
/// 16-byte aligned as the kernels require.
pub fn stats_cols(t: usize) -> usize {
    t.div_ceil(4) * 4
}

fn scale(cx: &Ctx) -> f32 {
    (cx.d.hd as f32).powf(-0.5)
}

/// The block-sparse configuration of the layer's head dimension.
fn sparse_cfg(cx: &Ctx) -> R<&'static SparseFlashConfig> {
    sparse_config(cx.d.hd).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "no block-sparse attention for head dimension {}",
            cx.d.hd
        ))
    })
}

/// The layer's attention tensors as the block-sparse kernels' arguments.
fn args(cx: &Ctx, li: usize, acts: &LayerActs, sc: &Scratch) -> R<AttnArgs> {
    let (t, nh) = (cx.t, cx.d.nh);
    Ok(AttnArgs {
        qkv: heads(&acts.qkv, cx, 3 * nh)?,
        o: heads(&acts.o, cx, nh)?,
        lse2: arg(&acts.lse2, &[nh, stats_cols(t)])?,
        d_o: heads(&sc.tmp, cx, nh)?,
        delta: arg(&sc.delta, &[nh, stats_cols(t)])?,
        dqkv: dqkv_heads(&sc.dqkv, cx, li)?,
        scale: scale(cx),
    })
}

/// The flash configuration of the layer's head dimension on the device's architecture for the
/// batch's longest sequence (the one the batch's block lists were built for, `Engine`'s
/// `BlockPlan`).
fn config(cx: &Ctx) -> R<&'static FlashConfig> {
    let cfg = flash_kernels_for(cx.d.hd).ok_or_else(|| {
        ModelError::Unsupported(format!("no flash attention for head dimension {}", cx.d.hd))
    })?;
    Ok(cfg.on(Launcher::arch(cx.dev)).for_longest(longest(cx.segs)))
}

/// Tokens of the longest of `segs` ([`FlashConfig::for_longest`]).
pub fn longest(segs: &[Segment]) -> usize {
    segs.iter().map(|s| s.len).max().unwrap_or(0)
}

/// `[t, groups, hd]`: the `groups` heads of each token in `t`, as the flash kernels index them
/// (q, k and v are 3·nh groups of the projection output, `o` and `dO` nh).
fn heads(t: &DeviceTensor, cx: &Ctx, groups: usize) -> R<TensorArg> {
    arg(t, &[cx.t, groups, cx.d.hd])
}

/// The backward's `dqkv` as [`heads`] (`3·nh` groups), with its row stride
/// ([`Ctx::dqkv_ld`]: wider than `3H` when the LoRA fold keeps `du` past the heads).
fn dqkv_heads(t: &DeviceTensor, cx: &Ctx, li: usize) -> R<TensorArg> {
    let ld = cx.dqkv_ld(li);
    let mut a = mat_arg(t, &MatLayout::at(0, cx.t, 3 * cx.d.h, ld))?;
    a.dims = vec![cx.t, 3 * cx.d.nh, cx.d.hd];
    a.strides = vec![ld, cx.d.hd, 1];
    Ok(a)
}

fn flash_forward(cx: &Ctx, acts: &mut LayerActs, sc: &Scratch) -> R {
    let (t, nh) = (cx.t, cx.d.nh);
    let [fwd, _, _] = sc.blocks.args()?;
    let cfg = config(cx)?;
    fl::fwd(
        cx.dev,
        cfg.family,
        cfg.fwd,
        &heads(&acts.qkv, cx, 3 * nh)?,
        &fwd,
        scale(cx),
        &heads(&acts.o, cx, nh)?,
        &arg(&acts.lse2, &[nh, stats_cols(t)])?,
    )
    .map_err(launch_err("flash attention forward"))
}

fn flash_backward(cx: &Ctx, li: usize, acts: &LayerActs, sc: &mut Scratch) -> R {
    let (t, nh) = (cx.t, cx.d.nh);
    let [_, dq, dkdv] = sc.blocks.args()?;
    let cfg = config(cx)?;
    let a = BwdArgs {
        qkv: &heads(&acts.qkv, cx, 3 * nh)?,
        d_o: &heads(&sc.tmp, cx, nh)?,
        lse2: &arg(&acts.lse2, &[nh, stats_cols(t)])?,
        delta: &arg(&sc.delta, &[nh, stats_cols(t)])?,
        dqkv: &dqkv_heads(&sc.dqkv, cx, li)?,
        scale: scale(cx),
    };
    let o = heads(&acts.o, cx, nh)?;
    if let Some(tiles) = cfg.fused_tiles() {
        let dq_acc = heads(&sc.dq_acc, cx, nh)?;
        fl::prep(cx.dev, cfg.delta_width(), &o, a.d_o, a.delta, &dq_acc)
            .map_err(launch_err("flash attention backward (delta)"))?;
        fl::fused(cx.dev, tiles, &dkdv, &a, &dq_acc)
            .map_err(launch_err("flash attention backward (dk, dv, dq)"))?;
        return fl::dq_store(cx.dev, cfg.delta_width(), &dq_acc, a.scale, a.dqkv)
            .map_err(launch_err("flash attention backward (dq)"));
    }
    fl::delta(cx.dev, cfg.delta_width(), &o, a.d_o, a.delta)
        .map_err(launch_err("flash attention backward (delta)"))?;
    fl::bwd(cx.dev, cfg.family, Bwd::DkDv, cfg.dkdv, &dkdv, &a)
        .map_err(launch_err("flash attention backward (dk, dv)"))?;
    fl::bwd(cx.dev, cfg.family, Bwd::Dq, cfg.dq, &dq, &a)
        .map_err(launch_err("flash attention backward (dq)"))
}

fn materialised_forward(cx: &Ctx, acts: &mut LayerActs, sc: &mut Scratch) -> R {
    let (h, nh) = (cx.d.h, cx.d.nh);
    for seg in cx.segs {
        let l = seg.len;
        let (q, k, v) = (
            cx.heads(seg, 0, 3 * h),
            cx.heads(seg, h, 3 * h),
            cx.heads(seg, 2 * h, 3 * h),
        );
        let s = MatMut::new(&mut sc.s, MatLayout::dense(l, l));
        mm_batched(
            cx.blas,
            Mat::new(&acts.qkv, q),
            Mat::new(&acts.qkv, k),
            s,
            nh,
            false,
            true,
            scale(cx),
        )?;
        causal_softmax(
            cx.dev,
            &arg(&sc.s, &[nh * l, l])?,
            &arg_at(&acts.p, seg.probs, &[nh * l, l])?,
            &arg(&sc.lse, &[nh * l])?,
        )?;
        let p = MatLayout::at(seg.probs, l, l, l).batched(l * l);
        let o = MatMut::new(&mut acts.o, cx.heads(seg, 0, h));
        mm_batched(
            cx.blas,
            Mat::new(&acts.p, p),
            Mat::new(&acts.qkv, v),
            o,
            nh,
            false,
            false,
            1.0,
        )?;
    }
    Ok(())
}

fn materialised_backward(cx: &Ctx, li: usize, acts: &LayerActs, sc: &mut Scratch) -> R {
    let (h, nh, ld) = (cx.d.h, cx.d.nh, cx.dqkv_ld(li));
    for seg in cx.segs {
        let l = seg.len;
        let (q, k, v) = (
            cx.heads(seg, 0, 3 * h),
            cx.heads(seg, h, 3 * h),
            cx.heads(seg, 2 * h, 3 * h),
        );
        // The same heads of `dqkv`, whose rows may be wider.
        let (dq, dk, dv) = (
            cx.heads(seg, 0, ld),
            cx.heads(seg, h, ld),
            cx.heads(seg, 2 * h, ld),
        );
        let d_o = Mat::new(&sc.tmp, cx.heads(seg, 0, h));
        let p = Mat::new(&acts.p, MatLayout::at(seg.probs, l, l, l).batched(l * l));
        let sq = MatLayout::dense(l, l);
        mm_batched(
            cx.blas,
            d_o,
            Mat::new(&acts.qkv, v),
            MatMut::new(&mut sc.s, sq),
            nh,
            false,
            true,
            1.0,
        )?;
        softmax_bwd(
            cx.dev,
            &arg_at(&acts.p, seg.probs, &[nh * l, l])?,
            &arg(&sc.s, &[nh * l, l])?,
            &arg(&sc.ds, &[nh * l, l])?,
        )?;
        let ds = Mat::new(&sc.ds, sq);
        let dq = MatMut::new(&mut sc.dqkv, dq);
        mm_batched(
            cx.blas,
            ds,
            Mat::new(&acts.qkv, k),
            dq,
            nh,
            false,
            false,
            scale(cx),
        )?;
        let dk = MatMut::new(&mut sc.dqkv, dk);
        mm_batched(
            cx.blas,
            ds,
            Mat::new(&acts.qkv, q),
            dk,
            nh,
            true,
            false,
            scale(cx),
        )?;
        let dv = MatMut::new(&mut sc.dqkv, dv);
        mm_batched(cx.blas, p, d_o, dv, nh, true, false, 1.0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_plan_covers_every_query_and_key_once() {
        let segs = [
            Segment {
                start: 0,
                len: 130,
                probs: 0,
            },
            Segment {
                start: 130,
                len: 1,
                probs: 0,
            },
            Segment {
                start: 131,
                len: 64,
                probs: 0,
            },
        ];
        // Short sequences: 64-token blocks everywhere in the head-dimension-64 configuration.
        let c = FLASH_64.for_longest(longest(&segs));
        assert_eq!(c, &FLASH_64);
        assert_eq!((c.fwd_bm(), c.dq_bm(), c.dkdv_bn()), (64, 64, 64));
        let p = BlockPlan::of(&segs, c).unwrap();
        // Longest programs first: the last query block of the 130-token sequence, and its
        // first key block.
        assert_eq!(p.fwd[0], [0, 130, 128]);
        assert_eq!(p.dkdv[0], [0, 130, 0]);
        assert_eq!(p.rows(), 5);
        let covered = |list: &[BlockRow]| {
            let mut c: Vec<(i32, i32)> = list.iter().map(|r| (r[0], r[2])).collect();
            c.sort();
            c
        };
        for list in [&p.fwd, &p.dq, &p.dkdv] {
            assert_eq!(
                covered(list),
                vec![(0, 0), (0, 64), (0, 128), (130, 0), (131, 0)]
            );
        }
    }

    /// From its threshold a batch runs the long configuration, whose 128-token blocks its lists
    /// are built for; below, the short one; sm_80 has its own pair.
    #[test]
    fn long_sequences_run_the_long_configuration() {
        let (mid, mid_cfg) = FLASH_64.long.unwrap();
        assert_eq!(FLASH_64.for_longest(mid), mid_cfg);
        assert_eq!(mid_cfg.dkdv_bn(), 64);
        let (from, long_cfg) = mid_cfg.long.unwrap();
        let seg = |len| Segment {
            start: 0,
            len,
            probs: 0,
        };
        let long = [seg(from)];
        assert_eq!(longest(&long), from);
        assert_eq!(FLASH_64.for_longest(from - 1), &FLASH_64_MID);
        let c = FLASH_64.for_longest(from);
        assert_eq!(c, long_cfg);
        let p = BlockPlan::of(&long, c).unwrap();
        assert_eq!(p.fwd.len(), from / c.fwd_bm());
        assert_eq!(p.dkdv.len(), from / c.dkdv_bn());
        assert_eq!((c.fwd_bm(), c.dkdv_bn()), (128, 64));
        // Heads of 128: a second threshold, taken from the first's configuration.
        assert_eq!(FLASH_128.for_longest(4095), &FLASH_128);
        assert_eq!(FLASH_128.for_longest(8192), &FLASH_128_LONG);
        assert_eq!(FLASH_128.for_longest(16384), &FLASH_128_LONGEST);
        // Long configurations run the same kernels, with no further override.
        for c in [&FLASH_64, &FLASH_80, &FLASH_128] {
            for a in [Arch::Sm80, Arch::Sm90] {
                let l = c.on(a).for_longest(usize::MAX);
                assert_eq!((l.hd, l.family, l.long), (c.hd, c.family, None));
            }
        }
        assert_eq!(
            FLASH_64.on(Arch::Sm80).for_longest(4096),
            &FLASH_64_SM80_LONG
        );
    }

    /// Each head dimension's sm_80 configuration is one of the same kernels (head dimension,
    /// family), with no further override; sm_90 runs the configuration itself.
    #[test]
    fn sm80_configurations_run_the_same_kernels() {
        for c in [&FLASH_64, &FLASH_80, &FLASH_128] {
            let s = c.on(Arch::Sm80);
            assert_eq!((s.hd, s.family, s.sm80), (c.hd, c.family, None), "{c:?}");
            assert_eq!(c.on(Arch::Sm90), c);
        }
        // Long sequences with heads of 64 take 64-key programs on sm_90 (fused or dk/dv) and
        // 128-key dk/dv ones on sm_80: the block lists differ by architecture.
        let long = |a| FLASH_64.on(a).for_longest(usize::MAX).dkdv_bn();
        assert_eq!((long(Arch::Sm90), long(Arch::Sm80)), (64, 128));
    }

    /// Where the fused backward runs, the key-block list is built for its `BN` and its tiles
    /// are a compiled `flash_bwd_fused` variant; it runs on sm_90 only (its `dq` reduction is
    /// the TMA's; sm_80 would add with one atomic per element, which call 81 measured slower).
    #[test]
    fn fused_backward_tiles_share_dkdv_key_blocks_on_sm90_only() {
        for c in [&FLASH_64, &FLASH_80, &FLASH_128] {
            assert_eq!(
                c.on(Arch::Sm80).for_longest(usize::MAX).fused,
                None,
                "{c:?}"
            );
            for len in [0, 4096, 8192, 16384, usize::MAX] {
                let g = c.on(Arch::Sm90).for_longest(len);
                if let Some(f) = g.fused {
                    if !deterministic_attention() {
                        assert_eq!(param(f, "BN"), g.dkdv_bn(), "{g:?}");
                    }
                    let info = &lexp_kernels::flash_fused::flash_bwd_fused::INFO;
                    assert!(
                        info.configurations().iter().any(|v| f
                            .iter()
                            .all(|(n, x)| v.iter().any(|(m, y)| m == n && y == x))),
                        "{f:?} is not a compiled flash_bwd_fused configuration"
                    );
                }
            }
        }
        assert!(FLASH_64_MID.fused.is_some() && FLASH_64_LONG.fused.is_some());
        assert!(FLASH_64.fused.is_none() && FLASH_128.for_longest(usize::MAX).fused.is_none());
    }

    #[test]
    fn flash_for_its_head_dimensions_and_in_place_below_128() {
        assert_eq!(AttentionImpl::default_for(64), AttentionImpl::Flash);
        assert_eq!(AttentionImpl::default_for(128), AttentionImpl::Flash);
        assert!(AttentionImpl::Flash.check(128).is_ok());
        // OPT-2.7B's 80 runs the split kernels, any other multiple of 8 up to 128 the 128
        // ones in place; below 64 stays materialised, and so do widths the 16-byte copies
        // cannot split.
        assert_eq!(AttentionImpl::default_for(80), AttentionImpl::Flash);
        assert_eq!(
            flash_kernels_for(80).map(|c| (c.hd, c.family, c.delta_width())),
            Some((80, FlashFamily::Split, 128))
        );
        assert_eq!(flash_kernels_for(96).map(|c| c.hd), Some(128));
        assert!(
            flash_kernels_for(100).is_none(),
            "100 is not a multiple of 8"
        );
        assert_eq!(flash_kernels_for(64).map(|c| c.hd), Some(64));
        assert!(flash_kernels_for(32).is_none());
        assert_eq!(AttentionImpl::default_for(16), AttentionImpl::Materialised);
        assert!(flash_config(96).is_none(), "no kernels compiled for 96");
        // Past the largest compiled head dimension only the materialised attention runs.
        assert_eq!(AttentionImpl::default_for(256), AttentionImpl::Materialised);
        assert!(AttentionImpl::Flash.check(256).is_err());
        assert!(AttentionImpl::Materialised.check(80).is_ok());
        assert_eq!("flash".parse::<AttentionImpl>(), Ok(AttentionImpl::Flash));
        assert!("fast".parse::<AttentionImpl>().is_err());
    }
}
