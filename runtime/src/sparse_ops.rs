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
    need("sparse_out", w.dims[0] % bs == 0, || {
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
    need("sparse_red", w2.dims[1] % bs == 0, || {
        format!(
            "weight columns {} are not a multiple of the block size {bs}",
            w2.dims[1]
        )
    })?;
    list.check_against(groups(h.dims[0]), w2.dims[1] / bs)?;
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
        w.dims[0] % bs == 0 && w.dims[1] % bs == 0,
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
