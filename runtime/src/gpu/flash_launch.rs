//! The dense flash-attention launches for either kernel family ([`FlashFamily`]): the one
//! place that maps a (family, tile configuration) to the kernel that runs it, for the engine
//! ([`super::attention`]) and the stand-alone problem of the tests and benchmarks
//! ([`super::flash_problem`]).

use lexp_compiler::launch::{LaunchError, Launcher, TensorArg};
use lexp_kernels::flash_attention as fa;
use lexp_kernels::flash_fused as ff;
use lexp_kernels::flash_split as fs;

/// Which flash kernels take a head dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashFamily {
    /// `lexp_kernels::flash_attention`, tile width `D`: heads of `D` columns, or narrower ones
    /// in place (the columns past the head zero-filled).
    Tile,
    /// `lexp_kernels::flash_split`: heads of 64 + 16 columns (OPT-2.7B's 80), each product
    /// over the head split in two, so no work is spent on padding.
    Split,
}

/// A tile configuration: `(name, value)` of const parameters of a kernel variant.
pub type Tiles = &'static [(&'static str, usize)];

/// The tensors of the backward launches: q/k/v and their gradient `[T, 3·nh, hd]`, `dO`
/// `[T, nh, hd]`, the statistics `[nh, T']`.
pub struct BwdArgs<'a> {
    /// q, k and v, `[T, 3·nh, hd]`.
    pub qkv: &'a TensorArg,
    /// The output's gradient, `[T, nh, hd]`.
    pub d_o: &'a TensorArg,
    /// The forward's base-2 log-sum-exp per (head, token).
    pub lse2: &'a TensorArg,
    /// `rowsum(dO ⊙ O)` per (head, token) ([`delta`]).
    pub delta: &'a TensorArg,
    /// The gradient of q, k and v, laid out like `qkv`.
    pub dqkv: &'a TensorArg,
    /// Softmax scale `hd^-0.5`.
    pub scale: f32,
}

/// `o` and `lse2` from `qkv` over the query blocks `blocks`.
#[allow(clippy::too_many_arguments)]
pub fn fwd(
    l: &dyn Launcher,
    family: FlashFamily,
    tiles: &[(&str, usize)],
    qkv: &TensorArg,
    blocks: &TensorArg,
    scale: f32,
    o: &TensorArg,
    lse2: &TensorArg,
) -> Result<(), LaunchError> {
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    // The two kernels take the same arguments.
    macro_rules! launch {
        ($m:ident :: $k:ident) => {
            $m::$k::launch_with(
                l,
                tiles,
                &$m::$k::Args {
                    qkv,
                    blocks,
                    scale_log2,
                    o,
                    lse2,
                },
            )
        };
    }
    match family {
        FlashFamily::Tile => launch!(fa::flash_fwd),
        FlashFamily::Split => launch!(fs::flash_fwd_split),
    }
}

/// `delta = rowsum(dO ⊙ O)` per (head, token), on the `width`-wide tile (`flash_bwd_delta`
/// serves both families: its tile is masked to the head).
pub fn delta(
    l: &dyn Launcher,
    width: usize,
    o: &TensorArg,
    d_o: &TensorArg,
    delta: &TensorArg,
) -> Result<(), LaunchError> {
    fa::flash_bwd_delta::launch_with(
        l,
        &[("D", width)],
        &fa::flash_bwd_delta::Args { o, d_o, delta },
    )
}

/// `delta` as [`delta`] computes it, and the f32 `dq` accumulator `dq_acc [T, nh, hd]` of the
/// fused backward ([`fused`]) cleared, in one launch (`flash_bwd_prep`, tile family only).
pub fn prep(
    l: &dyn Launcher,
    width: usize,
    o: &TensorArg,
    d_o: &TensorArg,
    delta: &TensorArg,
    dq_acc: &TensorArg,
) -> Result<(), LaunchError> {
    ff::flash_bwd_prep::launch_with(
        l,
        &[("D", width)],
        &ff::flash_bwd_prep::Args {
            o,
            d_o,
            delta,
            dq_acc,
        },
    )
}

/// The fused backward (`flash_bwd_fused`, tile family only): dk and dv of every key block of
/// `blocks` into `a.dqkv`, and `dq` added into `dq_acc` (cleared by [`prep`]; [`dq_store`]
/// finishes it).
pub fn fused(
    l: &dyn Launcher,
    tiles: &[(&str, usize)],
    blocks: &TensorArg,
    a: &BwdArgs,
    dq_acc: &TensorArg,
) -> Result<(), LaunchError> {
    ff::flash_bwd_fused::launch_with(
        l,
        tiles,
        &ff::flash_bwd_fused::Args {
            qkv: a.qkv,
            d_o: a.d_o,
            lse2: a.lse2,
            delta: a.delta,
            blocks,
            scale_log2: a.scale * std::f32::consts::LOG2_E,
            scale: a.scale,
            dqkv: a.dqkv,
            dq_acc,
        },
    )
}

/// `dq = scale · dq_acc` into the q rows of `dqkv` (`flash_bwd_dq_store`).
pub fn dq_store(
    l: &dyn Launcher,
    width: usize,
    dq_acc: &TensorArg,
    scale: f32,
    dqkv: &TensorArg,
) -> Result<(), LaunchError> {
    ff::flash_bwd_dq_store::launch_with(
        l,
        &[("D", width)],
        &ff::flash_bwd_dq_store::Args {
            dq_acc,
            scale,
            dqkv,
        },
    )
}

/// Which backward kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bwd {
    /// dk and dv, one program per key block.
    DkDv,
    /// dq, one program per query block.
    Dq,
}

/// One backward launch (`which`) over `blocks` (key blocks for dk/dv, query blocks for dq).
pub fn bwd(
    l: &dyn Launcher,
    family: FlashFamily,
    which: Bwd,
    tiles: &[(&str, usize)],
    blocks: &TensorArg,
    a: &BwdArgs,
) -> Result<(), LaunchError> {
    let scale_log2 = a.scale * std::f32::consts::LOG2_E;
    // The four kernels take the same arguments.
    macro_rules! launch {
        ($m:ident :: $k:ident) => {
            $m::$k::launch_with(
                l,
                tiles,
                &$m::$k::Args {
                    qkv: a.qkv,
                    d_o: a.d_o,
                    lse2: a.lse2,
                    delta: a.delta,
                    blocks,
                    scale_log2,
                    scale: a.scale,
                    dqkv: a.dqkv,
                },
            )
        };
    }
    match (family, which) {
        (FlashFamily::Tile, Bwd::DkDv) => launch!(fa::flash_bwd_dkdv),
        (FlashFamily::Tile, Bwd::Dq) => launch!(fa::flash_bwd_dq),
        (FlashFamily::Split, Bwd::DkDv) => launch!(fs::flash_bwd_dkdv_split),
        (FlashFamily::Split, Bwd::Dq) => launch!(fs::flash_bwd_dq_split),
    }
}
