//! The block-sparse GEMMs of a sparse MLP as checked operations: each takes a validated
//! [`BlockList`], checks that it fits the operands (row groups, block count, compact widths)
//! and only then launches. A list is validated when it is built ([`BlockList::from_host`], or
//! [`BlockList::validate_device`] for lists produced on the device), so out-of-range indices or
//! counts above the grid bound never reach a kernel.

use crate::block_list::{BlockList, BlockListError};
use lexp_compiler::launch::{LaunchError, Launcher, TensorArg};
use lexp_kernels as k;

/// Rows per group (`BM` of the sparse kernels).
pub const GROUP_ROWS: usize = 128;

/// Why a sparse operation did not launch.
#[derive(Debug, thiserror::Error)]
pub enum SparseOpError {
    #[error("block list: {0}")]
    List(#[from] BlockListError),
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

fn need(op: &'static str, ok: bool, what: impl FnOnce() -> String) -> Result<(), SparseOpError> {
    if ok {
        Ok(())
    } else {
        Err(SparseOpError::Shape { op, what: what() })
    }
}

/// The tile configuration `tile` (other constants, e.g. from the autotuner) with `BS = bs`.
fn with_bs<'a>(bs: usize, tile: &[(&'a str, usize)]) -> Vec<(&'a str, usize)> {
    let mut c: Vec<(&str, usize)> = tile.iter().copied().filter(|(n, _)| *n != "BS").collect();
    c.push(("BS", bs));
    c
}

fn groups(rows: usize) -> usize {
    rows.div_ceil(GROUP_ROWS)
}

/// The checks of a product reducing over the kept blocks (`h [M, ..]` compact, `w2 [N, F]`):
/// `F` is whole blocks, and `list` fits `h`'s row groups and `F / bs` blocks.
fn check_reduction(
    op: &'static str,
    h: &TensorArg,
    w2: &TensorArg,
    list: &BlockList,
    bs: usize,
) -> Result<(), SparseOpError> {
    need(op, w2.dims[1].is_multiple_of(bs), || {
        format!(
            "weight columns {} are not a multiple of the block size {bs}",
            w2.dims[1]
        )
    })?;
    list.check_against(groups(h.dims[0]), w2.dims[1] / bs)?;
    Ok(())
}

/// `h = x · w[kept blocks]ᵀ`, compact. `tile` picks a compiled configuration (empty: the
/// default) (see `lexp_kernels::sparse_out`). `w` is `[F, K]` with
/// `F = num_blocks * bs`; `h` is `[M, max_blocks * bs]`.
pub fn sparse_out(
    l: &dyn Launcher,
    x: &TensorArg,
    w: &TensorArg,
    list: &BlockList,
    h: &TensorArg,
    bs: usize,
    tile: &[(&str, usize)],
) -> Result<(), SparseOpError> {
    need("sparse_out", w.dims[0].is_multiple_of(bs), || {
        format!(
            "weight rows {} are not a multiple of the block size {bs}",
            w.dims[0]
        )
    })?;
    list.check_against(groups(x.dims[0]), w.dims[0] / bs)?;
    need("sparse_out", h.dims[1] == list.max_blocks() * bs, || {
        format!(
            "compact output has {} columns; the list's bound {} x block {bs} needs {}",
            h.dims[1],
            list.max_blocks(),
            list.max_blocks() * bs
        )
    })?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::sparse_out::launch_with(
        l,
        &with_bs(bs, tile),
        &k::sparse_out::Args {
            x,
            w,
            counts: &c,
            indices: &i,
            h,
        },
    )?;
    Ok(())
}

/// `y = Σ_kept h_block · w2[:, block]ᵀ` (see `lexp_kernels::sparse_red`). `w2` is `[N, F]`.
pub fn sparse_red(
    l: &dyn Launcher,
    h: &TensorArg,
    w2: &TensorArg,
    list: &BlockList,
    y: &TensorArg,
    bs: usize,
    tile: &[(&str, usize)],
) -> Result<(), SparseOpError> {
    check_reduction("sparse_red", h, w2, list, bs)?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::sparse_red::launch_with(
        l,
        &with_bs(bs, tile),
        &k::sparse_red::Args {
            h,
            w2,
            counts: &c,
            indices: &i,
            y,
        },
    )?;
    Ok(())
}

/// The MLP block's output in one pass: `out = Σ_kept h_block · w2[:, block]ᵀ + b2 + res` (see
/// `lexp_kernels::sparse_fc2_fwd`). `w2` is `[N, F]`, `b2` `[N]`, `res` and `out` `[M, N]`.
/// `tile` may name `BN`, `S` and `TMA` of the one compiled shape family.
#[allow(clippy::too_many_arguments)]
pub fn sparse_fc2_fwd(
    l: &dyn Launcher,
    h: &TensorArg,
    w2: &TensorArg,
    b2: &TensorArg,
    res: &TensorArg,
    list: &BlockList,
    out: &TensorArg,
    bs: usize,
    tile: &[(&str, usize)],
) -> Result<(), SparseOpError> {
    check_reduction("sparse_fc2_fwd", h, w2, list, bs)?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::sparse_fc2_fwd::launch_with(
        l,
        &with_bs(bs, tile),
        &k::sparse_fc2_fwd::Args {
            h,
            w2,
            b2,
            res,
            counts: &c,
            indices: &i,
            out,
        },
    )?;
    Ok(())
}

/// Output blocks from `out_list`, reduction blocks from `in_list` (see
/// `lexp_kernels::sparse_both`). `w` is `[F_out, F_in]`.
pub fn sparse_both(
    l: &dyn Launcher,
    h: &TensorArg,
    w: &TensorArg,
    out_list: &BlockList,
    in_list: &BlockList,
    out: &TensorArg,
    bs: usize,
    tile: &[(&str, usize)],
) -> Result<(), SparseOpError> {
    need(
        "sparse_both",
        w.dims[0].is_multiple_of(bs) && w.dims[1].is_multiple_of(bs),
        || {
            format!(
                "weight {:?} is not a multiple of the block size {bs}",
                w.dims
            )
        },
    )?;
    out_list.check_against(groups(h.dims[0]), w.dims[0] / bs)?;
    in_list.check_against(groups(h.dims[0]), w.dims[1] / bs)?;
    let (co, io) = (out_list.counts().as_arg(), out_list.indices().as_arg());
    let (ci, ii) = (in_list.counts().as_arg(), in_list.indices().as_arg());
    k::sparse_both::launch_with(
        l,
        &with_bs(bs, tile),
        &k::sparse_both::Args {
            h,
            w,
            counts_o: &co,
            indices_o: &io,
            counts_i: &ci,
            indices_i: &ii,
            out,
        },
    )?;
    Ok(())
}

/// fc1 forward of a sparse MLP: `h = relu(x · w1[kept blocks]ᵀ + b1[kept blocks])`, compact
/// (see `lexp_kernels::sparse_fc1_fwd`). `w1` is `[F, H]` with `F = num_blocks * bs`, `b1`
/// `[F]`, `h` `[M, max_blocks * bs]`.
#[allow(clippy::too_many_arguments)]
pub fn sparse_fc1_fwd(
    l: &dyn Launcher,
    x: &TensorArg,
    w1: &TensorArg,
    b1: &TensorArg,
    list: &BlockList,
    h: &TensorArg,
    bs: usize,
    tile: &[(&str, usize)],
) -> Result<(), SparseOpError> {
    const OP: &str = "sparse_fc1_fwd";
    let nb = num_blocks(OP, w1, 0, bs)?;
    list.check_against(groups(dim(x, 0)), nb)?;
    compact_width(OP, h, list, bs)?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::sparse_fc1_fwd::launch_with(
        l,
        &with_bs(bs, tile),
        &k::sparse_fc1_fwd::Args {
            x,
            w1,
            b1,
            counts: &c,
            indices: &i,
            h,
        },
    )?;
    Ok(())
}

/// fc2 input gradient of a sparse MLP on the kept blocks, masked by the ReLU of the compact
/// forward activation: `dh = (dy · w2[:, kept blocks]) ⊙ [h > 0]` (see
/// `lexp_kernels::sparse_fc2_dh`). `dy` is `[M, H]`, `w2` `[H, F]` (not transposed), `h` and
/// `dh` `[M, max_blocks * bs]`.
#[allow(clippy::too_many_arguments)]
pub fn sparse_fc2_dh(
    l: &dyn Launcher,
    dy: &TensorArg,
    w2: &TensorArg,
    h: &TensorArg,
    list: &BlockList,
    dh: &TensorArg,
    bs: usize,
    tile: &[(&str, usize)],
) -> Result<(), SparseOpError> {
    const OP: &str = "sparse_fc2_dh";
    let nb = num_blocks(OP, w2, 1, bs)?;
    list.check_against(groups(dim(dy, 0)), nb)?;
    compact_width(OP, h, list, bs)?;
    compact_width(OP, dh, list, bs)?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::sparse_fc2_dh::launch_with(
        l,
        &with_bs(bs, tile),
        &k::sparse_fc2_dh::Args {
            dy,
            w2,
            h,
            counts: &c,
            indices: &i,
            dh,
        },
    )?;
    Ok(())
}

/// fc1 input gradient of a sparse MLP: `dx = Σ_kept dh_block · w1[block, :]` (see
/// `lexp_kernels::sparse_fc1_dx`). `dh` is compact `[M, max_blocks * bs]`, `w1` `[F, H]` (not
/// transposed), `dx` `[M, H]`.
pub fn sparse_fc1_dx(
    l: &dyn Launcher,
    dh: &TensorArg,
    w1: &TensorArg,
    list: &BlockList,
    dx: &TensorArg,
    bs: usize,
    tile: &[(&str, usize)],
) -> Result<(), SparseOpError> {
    const OP: &str = "sparse_fc1_dx";
    let nb = num_blocks(OP, w1, 0, bs)?;
    list.check_against(groups(dim(dh, 0)), nb)?;
    compact_width(OP, dh, list, bs)?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::sparse_fc1_dx::launch_with(
        l,
        &with_bs(bs, tile),
        &k::sparse_fc1_dx::Args {
            dh,
            w1,
            counts: &c,
            indices: &i,
            dx,
        },
    )?;
    Ok(())
}

/// fc1's bias gradient on the kept blocks: `out[block*bs + c] += Σ_rows dh[:, slot*bs + c]`
/// (see `lexp_kernels::sparse_colsum`; accumulates in f32). `dh` is compact
/// `[M, max_blocks * bs]`, `out` `[F]` with `F = num_blocks * bs`.
pub fn sparse_colsum(
    l: &dyn Launcher,
    dh: &TensorArg,
    list: &BlockList,
    out: &TensorArg,
    bs: usize,
) -> Result<(), SparseOpError> {
    const OP: &str = "sparse_colsum";
    let nb = num_blocks(OP, out, 0, bs)?;
    list.check_against(groups(dim(dh, 0)), nb)?;
    compact_width(OP, dh, list, bs)?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::sparse_colsum::launch_with(
        l,
        &with_bs(bs, &[]),
        &k::sparse_colsum::Args {
            dh,
            counts: &c,
            indices: &i,
            out,
        },
    )?;
    Ok(())
}

/// Fills `list` on the device from predicted log-masses (`lexp_kernels::select_blocks`): `o` is
/// block-major `[nb, M]` (f32 or the model's type), `bias [nb]` f32 is added to it, the mass is
/// `max(scale · (exp(o + bias) − 1), 0)`, and each 128-row group keeps its heaviest blocks
/// until `target` of its mass is covered or the list's `max_blocks` are taken (at least one).
///
/// The list is valid by construction (counts in `1..=max_blocks`, ascending ids below `nb`),
/// so nothing is read back. Refused: more than 64 blocks, a list of another geometry, a
/// non-positive or non-finite `scale`, a `target` outside `(0, 1]`.
pub fn select_blocks(
    l: &dyn Launcher,
    o: &TensorArg,
    bias: &TensorArg,
    (scale, target): (f32, f32),
    list: &BlockList,
) -> Result<(), SparseOpError> {
    const OP: &str = "select_blocks";
    let (nb, m) = (dim(o, 0), dim(o, 1));
    let cfg = k::block_select::select_config(nb).ok_or_else(|| SparseOpError::Shape {
        op: OP,
        what: format!(
            "{nb} blocks per layer; device selection takes at most {} (use larger blocks)",
            k::block_select::MAX_SELECT_BLOCKS
        ),
    })?;
    list.check_against(groups(m), nb)?;
    need(OP, scale.is_finite() && scale > 0.0, || {
        format!("mass scale {scale} is not a positive number (an untrained predictor?)")
    })?;
    need(OP, target > 0.0 && target <= 1.0, || {
        format!("mass target {target} is outside (0, 1]")
    })?;
    let (c, i) = (list.counts().as_arg(), list.indices().as_arg());
    k::select_blocks::launch_with(
        l,
        &cfg,
        &k::select_blocks::Args {
            o,
            bias,
            scale,
            target,
            counts: &c,
            indices: &i,
        },
    )?;
    Ok(())
}

/// A compact activation must be `max_blocks * bs` wide.
fn compact_width(
    op: &'static str,
    t: &TensorArg,
    list: &BlockList,
    bs: usize,
) -> Result<(), SparseOpError> {
    let width = list.max_blocks().saturating_mul(bs);
    need(op, t.dims.get(1) == Some(&width), || {
        format!(
            "compact activation {:?}; the list's bound {} x block {bs} needs {width} columns",
            t.dims,
            list.max_blocks(),
        )
    })
}

/// Extent `i` of `t` (0 when `t` has fewer dimensions: the launcher then refuses the rank).
fn dim(t: &TensorArg, i: usize) -> usize {
    t.dims.get(i).copied().unwrap_or(0)
}

/// The number of `bs`-neuron blocks along dimension `i` of the weight `w`: `bs` must be
/// positive and divide that extent.
fn num_blocks(
    op: &'static str,
    w: &TensorArg,
    i: usize,
    bs: usize,
) -> Result<usize, SparseOpError> {
    let extent = dim(w, i);
    need(op, bs > 0 && extent.is_multiple_of(bs), || {
        format!(
            "weight {:?}: dimension {i} ({extent} neurons) is not a multiple of the block size {bs}",
            w.dims
        )
    })?;
    Ok(extent / bs)
}
