//! The LoRA fold's forward in one kernel: `lexp_kernels::lora_fwd` over the folded weight.
//!
//! The fold ([`super::lora_fold`]) runs its forward as two launches: `lora_down` writes `u =
//! x·A'ᵀ` beside the layer's input, then one GEMM over `[x | u]·[W | s·B]ᵀ`. Read through
//! views of the same folded weight, `lora_fwd` does both in one kernel: its rank product
//! `x·A'ᵀ` accumulates alongside the main K loop from the `x` tiles already in shared memory
//! (`A'` = the weight's room rows), its expand multiplies by the room columns `s·B`, and it
//! stores `u` (with `s = 1`: unscaled, rounded once, as `lora_down` writes it) where
//! the fold's backward reads it. The weights, the saved activations and the backward are the
//! fold's; only the forward's launches change.
//!
//! Which form is faster depends on how many output tiles there are. Rank 16, a 2048 x 2048
//! layer (`lexp bench matmul --only lora`, row `fwd-1k`): at 2048 tokens, 128 tiles of 128 x
//! 256, one wave on the H200's 132 multiprocessors, the one kernel took 0.0311–0.0313 ms
//! against 0.0339–0.0340 for `lora_down` + cuBLASLt (`lora_down` alone costs a fixed 7.7–9.8
//! µs there, `bench/results/2026-12-02-h200-lora-epilogue/call129`); at 4096 tokens (two
//! waves) 0.0582–0.0584 against 0.0570, at 16384 0.218 against 0.205 (call 131): past one wave
//! cuBLASLt's GEMM is the faster base. The OPT-1.3B step's q/k/v projection (6144 columns)
//! has 384 tiles at 4 x 512 tokens and showed no gain (call 131: 21.28 / 20.97 ms direct /
//! graph-replayed with it, 21.23 / 20.69 without). So the one-kernel form runs when its
//! tiles fit one wave ([`one_wave`]) and the adapted targets' slots fit the kernel's rank side
//! (`R = 16`: q and v at rank 4 or 8, one target up to 16); `LEXP_FOLD_ONE_KERNEL=0` turns it
//! off (for A/B timing).

use super::lora_fold::{LayerFold, FOLD_K_ALIGN};
use super::ops::{launch_err, mat_arg, R};
use super::weights::{qkv_ld, LayerWeights};
use crate::buffer::DeviceTensor;
use crate::cublas::{Mat, MatLayout};
use crate::device::CudaDevice;
use lexp_compiler::launch::{Arch, Launcher};
use lexp_kernels as k;
use std::sync::OnceLock;

/// The rank side of `lora_fwd` (its `R`): the folded columns the one kernel reads.
pub const ONE_KERNEL_COLS: usize = 16;
const _: () = assert!(FOLD_K_ALIGN >= ONE_KERNEL_COLS);

/// The environment variable that turns the one-kernel form off (`=0`).
pub const ONE_KERNEL_ENV: &str = "LEXP_FOLD_ONE_KERNEL";

/// True unless [`ONE_KERNEL_ENV`] is `0`; read once per process.
pub fn one_kernel_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var(ONE_KERNEL_ENV).as_deref() != Ok("0");
        tracing::debug!(on, "LoRA fold forward in one kernel");
        on
    })
}

/// Rows and columns of the [`tile`].
const TILE: (usize, usize) = (128, 256);

/// Whether a `[t, n]` output takes at most one wave of [`tile`]s on `sms` multiprocessors
/// (one program each: the tile takes most of a multiprocessor's shared memory).
pub fn one_wave(t: usize, n: usize, sms: usize) -> bool {
    t.div_ceil(TILE.0) * n.div_ceil(TILE.1) <= sms
}

/// The `lora_fwd` tile: the dense GEMM's 128 x 256, 64-wide K steps, 4 stages, two
/// warpgroups; TMA copies on sm_90, `cp.async` on sm_80.
fn tile(arch: Arch) -> [(&'static str, usize); 8] {
    let tma = usize::from(arch == Arch::Sm90);
    [
        ("BM", TILE.0),
        ("BN", TILE.1),
        ("BK", 64),
        ("R", ONE_KERNEL_COLS),
        ("S", 4),
        ("W", 8),
        ("G", 8),
        ("TMA", tma),
    ]
}

/// The views of a folded weight one `lora_fwd` reads: the base `w [out, in]`, the
/// [`ONE_KERNEL_COLS`] room rows `A' [16, in]` and the room columns `s·B [out, 16]`.
#[derive(Clone, Copy, Debug)]
pub struct FoldedViews<'a> {
    pub w: Mat<'a>,
    pub a: Mat<'a>,
    pub sb: Mat<'a>,
}

/// `y = x·wᵀ + bias + u·sbᵀ` with `u = T(x·aᵀ)` stored in `u` (one `lora_fwd` launch, `s =
/// 1`): the fold's forward for a folded weight's [`FoldedViews`].
pub fn one_kernel_forward(
    dev: &CudaDevice,
    x: Mat<'_>,
    v: FoldedViews<'_>,
    bias: &DeviceTensor,
    y: (&DeviceTensor, MatLayout),
    u: (&DeviceTensor, MatLayout),
) -> R {
    k::lora_fwd::launch_with(
        dev,
        &tile(Launcher::arch(dev)),
        &k::lora_fwd::Args {
            x: &mat_arg(x.tensor, &x.layout)?,
            w: &mat_arg(v.w.tensor, &v.w.layout)?,
            bias: &bias.as_arg(),
            a: &mat_arg(v.a.tensor, &v.a.layout)?,
            b: &mat_arg(v.sb.tensor, &v.sb.layout)?,
            s: 1.0,
            y: &mat_arg(y.0, &y.1)?,
            xa: &mat_arg(u.0, &u.1)?,
        },
    )
    .map_err(launch_err)
}

impl LayerFold {
    /// Whether this layer's forward over `t` tokens runs as one kernel on a GPU of `sms`
    /// multiprocessors (see the module doc).
    pub fn one_kernel(&self, t: usize, sms: usize) -> bool {
        one_kernel_enabled() && self.one_kernel_fits(t, sms)
    }

    /// Whether the one kernel can and should run, [`ONE_KERNEL_ENV`] aside: its tiles fit one
    /// wave and the targets' slots its [`ONE_KERNEL_COLS`] (the fold's columns, a multiple of
    /// [`FOLD_K_ALIGN`], always hold that many).
    pub fn one_kernel_fits(&self, t: usize, sms: usize) -> bool {
        one_wave(t, 3 * self.h, sms) && self.targets * self.rp <= ONE_KERNEL_COLS
    }

    /// The q/k/v projection with every target's branch, `qkv = a·Wqkvᵀ + bqkv + u·(s·B)ᵀ`,
    /// and `u` into LN1's output `a` (`[t, H + kc]`) past `H`, in one launch. The room's rows
    /// and columns past the targets' slots are zero (written so by `lora_fold`), so the 16 it
    /// reads add nothing else, and `u`'s columns there come out zero.
    pub fn forward_one_kernel(
        &self,
        dev: &CudaDevice,
        w: &LayerWeights,
        a: &DeviceTensor,
        qkv: &DeviceTensor,
        t: usize,
    ) -> R {
        let (h, ld, c) = (self.h, qkv_ld(self.h), ONE_KERNEL_COLS);
        let views = FoldedViews {
            w: w.qkv(h, h),
            a: w.qkv_room(h, c),
            sb: Mat::new(&w.wqkv, MatLayout::at(h, 3 * h, c, ld)),
        };
        let x = Mat::new(a, MatLayout::at(0, t, h, self.width()));
        let u = MatLayout::at(h, t, c, self.width());
        let y = MatLayout::dense(t, 3 * h);
        one_kernel_forward(dev, x, views, &w.bqkv, (qkv, y), (a, u))
    }
}
