//! The dynamic-aware MLP operators (DESIGN.md §7, MLP step 5): the block-sparse products of a
//! ReLU MLP `h = relu(x·W1ᵀ + b1)`, `y = h·W2ᵀ + b2` (`W1 [F, H]`, `W2 [H, F]`) that are not
//! plain [`sparse`](crate::sparse) GEMMs, over the same device-side block lists (`counts[g]`,
//! `indices[g, j]`, groups of `BM` token rows, blocks of `BS` neurons):
//!
//! 1. [`sparse_fc1_fwd`]: fc1 forward on the kept blocks with the bias and the ReLU fused into
//!    the epilogue, `h` stored compactly (one `BS`-wide slot per kept block);
//! 2. fc2 forward is [`sparse_red`](crate::sparse::sparse_red) on that compact `h`, or
//!    [`sparse_fc2_fwd`]: the same product with fc2's bias and the residual stream added in
//!    its epilogue (the MLP block's output in one pass);
//! 3. [`sparse_fc2_dh`]: fc2's input gradient on the kept blocks, `dy·W2[:, blk]` (W2 read as
//!    stored, no transpose), masked by the ReLU of the compact `h`;
//! 4. [`sparse_fc1_dx`]: fc1's input gradient `Σ_j dh[:, slot j]·W1[blk_j, :]`, a reduction over
//!    the kept blocks (W1 read as stored).
//!
//! Given the forward's block list, the backward pieces are exact: a dropped block has `h = 0`
//! and contributes nothing to `y`, so its gradient is 0 and is never computed. Grids are sized
//! by the bound `indices.dim(1)`; programs with no work return at once. Lists are validated by
//! the runtime (`BlockList`) before they reach a launch; slots past a group's count are left
//! untouched.

use lexp_macros::kernel;

/// fc1 forward: for group `g` and slot `j < counts[g]` with block `b = indices[g, j]`,
/// `h[rows(g), j*BS ..][.. BS] = relu(x[rows(g), :] · w1[b*BS .. +BS, :]ᵀ + b1[b*BS .. +BS])`
/// (f32 accumulation, bias and ReLU in f32, one rounding to `T`). Slots past the count are
/// untouched.
///
/// Two slots per program, as in [`sparse_out`](crate::sparse::sparse_out): one `x` tile feeds
/// the two blocks' products, each a `BM x BS` accumulator over `BS` contiguous weight rows (one
/// TMA box per block on sm_90a), and the compact slots it writes are contiguous. A program whose
/// second slot is past the count computes the first block twice and stores it once.
#[kernel(
    variants(T = [bf16, f16], BM = [128], BS = [64, 128], BK = [32, 64], S = [3, 4, 6], W = [4, 8], TMA = [0, 1]),
    only = [S <= 4 || W == 8, (BM + 2 * BS) * BK * 2 * S <= 200 * 1024, W == 8 || BS == 64, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(indices.dim(1), 2), cdiv(x.dim(0), BM)],
    require = [
        w1.dim(1) == x.dim(1), b1.dim(0) == w1.dim(0), h.dim(0) == x.dim(0),
        h.dim(1) == indices.dim(1) * BS, counts.dim(0) == indices.dim(0),
        indices.dim(0) == cdiv(x.dim(0), BM)
    ]
)]
pub fn sparse_fc1_fwd<
    T,
    const BM: usize,
    const BS: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    x: Tensor<T, 2>,
    w1: Tensor<T, 2>,
    b1: Tensor<T, 1>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    h: TensorMut<T, 2>,
) {
    let j = program_id(0) * 2;
    let g = program_id(1);
    let count = counts.load([g]);
    if j >= count {
        return;
    }
    let j1 = min(j + 1, count - 1);
    let cols0 = indices.load([g, j]) * BS + range::<BS>();
    let cols1 = indices.load([g, j1]) * BS + range::<BS>();
    let rows = g * BM + range::<BM>();
    let mut acc0 = zeros::<f32, BM, BS>();
    let mut acc1 = zeros::<f32, BM, BS>();
    for k in (0..x.dim(1)).step_by(BK) {
        let ks = k + range::<BK>();
        let xt = x.load([rows, ks]);
        acc0 = dot(xt, w1.load([cols0, ks]).t(), acc0);
        acc1 = dot(xt, w1.load([cols1, ks]).t(), acc1);
    }
    let h0 = relu(acc0 + b1.load([cols0]).cast::<f32>().expand(0));
    h.store([rows, j * BS + range::<BS>()], h0.cast::<T>());
    if j + 1 < count {
        let h1 = relu(acc1 + b1.load([cols1]).cast::<f32>().expand(0));
        h.store([rows, (j + 1) * BS + range::<BS>()], h1.cast::<T>());
    }
}

/// fc2 forward with its bias and the residual stream, the MLP block's output:
/// `out[rows(g), n] = Σ_{j < counts[g]} h[rows(g), j*BS .. +BS] · w2[n, indices[g, j]*BS ..
/// +BS]ᵀ + b2[n] + res[rows(g), n]` (f32 sum, one rounding to `T`). The product is
/// [`sparse_red`](crate::sparse::sparse_red)'s; adding the bias and the residual in its
/// epilogue saves the separate pass that wrote the product and read it back (`bias_residual`:
/// 15 µs per layer of an OPT-1.3B 4 x 1024 step on the H200). A group with count 0 gets
/// `b2 + res`. One tile shape (the engine's, `runtime/src/gpu/sparse_mlp.rs`).
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [256], BS = [64, 128], BK = [64], S = [4], W = [8], TMA = [0, 1]),
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(w2.dim(0), BN), cdiv(h.dim(0), BM)],
    require = [
        h.dim(1) == indices.dim(1) * BS, out.dim(0) == h.dim(0), out.dim(1) == w2.dim(0),
        b2.dim(0) == w2.dim(0), res.dim(0) == out.dim(0), res.dim(1) == out.dim(1),
        counts.dim(0) == indices.dim(0), indices.dim(0) == cdiv(h.dim(0), BM)
    ]
)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_fc2_fwd<
    T,
    const BM: usize,
    const BN: usize,
    const BS: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    h: Tensor<T, 2>,
    w2: Tensor<T, 2>,
    b2: Tensor<T, 1>,
    res: Tensor<T, 2>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    out: TensorMut<T, 2>,
) {
    let g = program_id(1);
    let rows = g * BM + range::<BM>();
    let cols = program_id(0) * BN + range::<BN>();
    let mut acc = zeros::<f32, BM, BN>();
    for (e, part, blk) in blocks(counts, indices, g, BS / BK) {
        let kh = e * BS + part * BK + range::<BK>();
        let kw = blk * BS + part * BK + range::<BK>();
        acc = dot(h.load([rows, kh]), w2.load([cols, kw]).t(), acc);
    }
    let y = acc + b2.load([cols]).cast::<f32>().expand(0) + res.load([rows, cols]).cast::<f32>();
    out.store([rows, cols], y.cast::<T>());
}

/// fc2 input gradient: for group `g` and slot `j < counts[g]` with block `b = indices[g, j]`,
/// `dh[rows(g), j*BS + c] = (dy[rows(g), :] · w2[:, b*BS + c])` where
/// `h[rows(g), j*BS + c] > 0`, else 0. `dy` is `[T, H]`, `w2` the fc2 weight `[H, F]` read as
/// stored (K = H runs along its rows), `h` the compact forward activation (the ReLU mask).
/// Slots past the count are untouched.
///
/// Two slots per program (one `dy` tile feeds two blocks), as in [`sparse_fc1_fwd`].
#[kernel(
    variants(T = [bf16, f16], BM = [128], BS = [64, 128], BK = [32, 64], S = [3, 4, 6], W = [4, 8], TMA = [0, 1]),
    only = [S <= 4 || W == 8, (BM + 2 * BS) * BK * 2 * S <= 200 * 1024, W == 8 || BS == 64, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(indices.dim(1), 2), cdiv(dy.dim(0), BM)],
    require = [
        w2.dim(0) == dy.dim(1), h.dim(0) == dy.dim(0), h.dim(1) == indices.dim(1) * BS,
        dh.dim(0) == dy.dim(0), dh.dim(1) == h.dim(1), counts.dim(0) == indices.dim(0),
        indices.dim(0) == cdiv(dy.dim(0), BM)
    ]
)]
pub fn sparse_fc2_dh<
    T,
    const BM: usize,
    const BS: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    dy: Tensor<T, 2>,
    w2: Tensor<T, 2>,
    h: Tensor<T, 2>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    dh: TensorMut<T, 2>,
) {
    let j = program_id(0) * 2;
    let g = program_id(1);
    let count = counts.load([g]);
    if j >= count {
        return;
    }
    let j1 = min(j + 1, count - 1);
    let cols0 = indices.load([g, j]) * BS + range::<BS>();
    let cols1 = indices.load([g, j1]) * BS + range::<BS>();
    let rows = g * BM + range::<BM>();
    let mut acc0 = zeros::<f32, BM, BS>();
    let mut acc1 = zeros::<f32, BM, BS>();
    for k in (0..dy.dim(1)).step_by(BK) {
        let ks = k + range::<BK>();
        let dyt = dy.load([rows, ks]);
        acc0 = dot(dyt, w2.load([ks, cols0]), acc0);
        acc1 = dot(dyt, w2.load([ks, cols1]), acc1);
    }
    let s0 = j * BS + range::<BS>();
    let live0 = h.load([rows, s0]).cast::<f32>() > 0.0;
    dh.store([rows, s0], select(live0, acc0, 0.0).cast::<T>());
    if j + 1 < count {
        let s1 = (j + 1) * BS + range::<BS>();
        let live1 = h.load([rows, s1]).cast::<f32>() > 0.0;
        dh.store([rows, s1], select(live1, acc1, 0.0).cast::<T>());
    }
}

/// fc1 input gradient: `dx[rows(g), n] = Σ_{j < counts[g]} dh[rows(g), j*BS .. +BS] ·
/// w1[indices[g, j]*BS .. +BS, n]`, with `dh` compact (as [`sparse_fc2_dh`] writes it) and
/// `w1` the fc1 weight `[F, H]` read as stored. A group with count 0 gets 0.
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [128, 256], BS = [64, 128], BK = [32, 64], S = [3, 4, 6], W = [4, 8], TMA = [0, 1]),
    only = [W == 8 || BN == 128, S <= 4 || W == 8, (BM + BN) * BK * 2 * S <= 200 * 1024, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(w1.dim(1), BN), cdiv(dh.dim(0), BM)],
    require = [
        dh.dim(1) == indices.dim(1) * BS, dx.dim(0) == dh.dim(0), dx.dim(1) == w1.dim(1),
        counts.dim(0) == indices.dim(0), indices.dim(0) == cdiv(dh.dim(0), BM)
    ]
)]
pub fn sparse_fc1_dx<
    T,
    const BM: usize,
    const BN: usize,
    const BS: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    dh: Tensor<T, 2>,
    w1: Tensor<T, 2>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    dx: TensorMut<T, 2>,
) {
    let g = program_id(1);
    let rows = g * BM + range::<BM>();
    let cols = program_id(0) * BN + range::<BN>();
    let mut acc = zeros::<f32, BM, BN>();
    // Every kept block of the group, in BS / BK slices of BK rows of w1.
    for (e, part, blk) in blocks(counts, indices, g, BS / BK) {
        let kh = e * BS + part * BK + range::<BK>();
        let kw = blk * BS + part * BK + range::<BK>();
        acc = dot(dh.load([rows, kh]), w1.load([kw, cols]), acc);
    }
    dx.store([rows, cols], acc.cast::<T>());
}

/// fc1's bias gradient on the kept blocks (BitFit under a sparse MLP): for group `g` and slot
/// `j < counts[g]` with block `b = indices[g, j]`,
/// `out[b*BS + c] += Σ_{r in rows(g)} dh[r, j*BS + c]` (f32, atomically: groups that keep the
/// same block add into the same entries). `dh` is compact, as [`sparse_fc2_dh`] writes it; a
/// dropped block's gradient is 0 and adds nothing. Zero `out` first (or accumulate into it).
/// Slots past the count, and rows past the end, are not read.
#[kernel(
    variants(T = [bf16, f16], BM = [128], BS = [64, 128], BR = [16]),
    warps = 4,
    grid = [indices.dim(1), cdiv(dh.dim(0), BM)],
    require = [
        dh.dim(1) == indices.dim(1) * BS, counts.dim(0) == indices.dim(0),
        indices.dim(0) == cdiv(dh.dim(0), BM)
    ]
)]
pub fn sparse_colsum<T, const BM: usize, const BS: usize, const BR: usize>(
    dh: Tensor<T, 2>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    out: TensorMut<f32, 1>,
) {
    let j = program_id(0);
    let g = program_id(1);
    let count = counts.load([g]);
    if j >= count {
        return;
    }
    let cols = j * BS + range::<BS>();
    let r0 = g.cast::<i64>() * BM;
    let mut acc = zeros::<f32, BR, BS>();
    for r in (r0..r0 + BM).step_by(BR) {
        let rows = r + range::<BR>();
        acc += dh.load([rows, cols]).cast::<f32>();
    }
    let blk = indices.load([g, j]);
    out.atomic_add([blk * BS + range::<BS>()], acc.sum(0));
}
