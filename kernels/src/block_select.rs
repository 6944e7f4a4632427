//! Block selection on the device (DESIGN.md §7, MLP step 4): from the predictor's per-token
//! outputs, each 128-row group's kept neuron blocks, written straight into the block list the
//! sparse MLP operators read. Nothing goes back to the host, so the sparse step needs no
//! synchronisation between the predictor and the operators.
//!
//! The predictor writes its outputs block-major, `o [nb, tokens]`: a group's tokens are then
//! contiguous, its loads move 16 bytes per thread, and the per-block results (sums, ranks, the
//! scattered id store) live along the other tile dimension, where they do not limit the
//! loads' vector width.
//!
//! One program per row group. It sums the predicted masses of the group's rows per block, then
//! decides every block at once with an `NB x NB` comparison tile instead of a sort: block `i`'s
//! rank is the number of blocks ahead of it (larger sum, or equal sum and lower id), and
//! `before[i]` is the sum of those blocks. Block `i` is kept when `rank < max_blocks` and
//! (`rank == 0` or `before < target · total`): exactly the greedy rule of the CPU's
//! `exposure::selection::select` (take blocks in descending order until the target share is
//! covered or the budget is full), without its sequential loop. The kept ids are written in
//! ascending order: id `i` goes to slot `#{kept j < i}`.

use lexp_macros::kernel;

/// Most blocks per layer [`select_blocks`] takes.
pub const MAX_SELECT_BLOCKS: usize = 64;

/// The compiled configuration of [`select_blocks`] for `nb` blocks: the smallest `NB` that
/// holds them, with its `BR` (`None` above [`MAX_SELECT_BLOCKS`]).
pub fn select_config(nb: usize) -> Option<[(&'static str, usize); 3]> {
    let bound = [16, 32, 64].into_iter().find(|&b| b >= nb)?;
    let br = if bound == 64 { 128 } else { 64 };
    Some([("BM", 128), ("NB", bound), ("BR", br)])
}

/// Selects each row group's blocks from predicted log-masses (the predictor's `LogMass`
/// target), block-major: the mass of token `r`, block `b` is
/// `max(scale · (exp(o[b, r] + bias[b]) − 1), 0)`. Per group `g` (tokens `g·BM ..`), with
/// `s[b]` the group's summed mass, `max_blocks = indices.dim(1)` and `total = Σ s`, blocks are
/// taken in descending `s` (ties: lower id first) until their sum reaches `target · total` or
/// `max_blocks` are taken, at least one. Writes `counts[g]` and the kept ids in ascending
/// order to `indices[g, ..counts[g]]`; the slots past the count are not written. `NB` is the
/// compiled bound of `o.dim(0)`; `scale` must be positive.
#[kernel(
    variants(T = [bf16, f16, f32], BM = [128], NB = [16, 32, 64], BR = [64, 128]),
    // `BR` tokens of `NB` blocks per load: wide enough for 16-byte accesses, and never equal
    // to `NB` (one range would then index both dimensions). `select_config` picks the one
    // variant of each `NB`. `NB = 128` spills in the unaligned class (the `NB x NB` tiles
    // need more than 255 registers per thread even with 8 warps): 64 blocks is the bound.
    only = [BR != NB, BR == 64 || NB == 64],
    warps = 4,
    grid = [counts.dim(0)],
    require = [
        o.dim(0) <= NB, bias.dim(0) == o.dim(0), indices.dim(0) == counts.dim(0),
        counts.dim(0) == cdiv(o.dim(1), BM), indices.dim(1) <= o.dim(0)
    ]
)]
pub fn select_blocks<T, const BM: usize, const NB: usize, const BR: usize>(
    o: Tensor<T, 2>,
    bias: Tensor<f32, 1>,
    scale: f32,
    target: f32,
    counts: TensorMut<i32, 1>,
    indices: TensorMut<i32, 2>,
) {
    let g = program_id(0);
    let nb = o.dim(0);
    let max_blocks = indices.dim(1);
    let blocks = range::<NB>();
    let b2 = bias.load_or([blocks], 0.0).expand(1);
    let r0 = g.cast::<i64>() * BM;
    let mut acc = zeros::<f32, NB, BR>();
    for r in (r0..r0 + BM).step_by(BR) {
        let rows = r + range::<BR>();
        // Tokens past the end and blocks past `nb` read -inf: a mass of max(-scale, 0) = 0.
        let v = o.load_or([blocks, rows], NEG_INFINITY).cast::<f32>() + b2;
        acc += max(scale * (exp(v) - 1.0), 0.0);
    }
    // Per-block tiles live along the rows (`i`) of the `NB x NB` comparison tiles; their
    // column forms (`j`) are expands. Padded blocks (`>= nb`) sum to -1, behind every real
    // block (all >= 0): their rank is at least `nb >= max_blocks`, so they are never kept.
    let s = select(blocks < nb, acc.sum(1), -1.0);
    // Padded blocks hold zero mass, so the total needs no mask.
    let goal = target * acc.sum(1).sum(0);
    let si = s.expand(1);
    let sj = s.expand(0);
    let ri = blocks.expand(1);
    let rj = blocks.expand(0);
    // first[i, j]: block j comes before block i in the greedy order.
    let first = (sj > si) | ((sj == si) & (rj < ri));
    let rank = select(first, 1.0, 0.0).sum(1);
    let before = select(first, sj, 0.0).sum(1);
    let keep = (rank < max_blocks.cast::<f32>()) & ((rank < 0.5) | (before < goal));
    // Kept blocks of lower id: the slot of block i in the ascending list.
    let slot = select(keep.expand(0) & (rj < ri), 1.0, 0.0).sum(1);
    counts.store([g], select(keep, 1.0, 0.0).sum(0).cast::<i32>());
    // A dropped block's slot is past the row (`NB >= max_blocks`): the store masks it off.
    indices.store([g, select(keep, slot.cast::<i32>(), NB)], blocks);
}
