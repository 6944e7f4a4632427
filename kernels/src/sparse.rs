//! Block-sparse GEMMs over a device-side *block list*: the three products a sparse MLP needs
//! (DESIGN.md §"Compute", COMPILER.md §6). Tokens are cut into row groups of `BM` rows; for
//! each group the list names the neuron blocks (of `BS` neurons) that matter:
//!
//! - `counts[g]`: how many blocks group `g` keeps (at most `indices.dim(1)`, the grid bound);
//! - `indices[g, j]` for `j < counts[g]`: the block ids (entries past the count are ignored).
//!
//! A list is ordinary run-time data: no recompilation per pattern or count. Grids are sized by
//! the bound `indices.dim(1)`; a program with no work returns at once. Reduction loops iterate
//! the list with the DSL's block-list loop, `for (e, part, block) in blocks(counts, indices, g,
//! BS / BK)`. The runtime's
//! `BlockList` validates lists before they reach a launch (ids in range, counts within the
//! bound).

use lexp_macros::kernel;

/// Output blocks selected (fc1 forward): for each group `g` and slot `j < counts[g]` with block
/// `b = indices[g, j]`, `h[rows(g), j*BS ..][.. BS] = x[rows(g), :] · w[b*BS .. +BS, :]ᵀ`
/// (a compact output: one `BS`-wide slot per kept block). Slots past the count are untouched.
///
/// Each program computes two consecutive slots, so that one `x` tile feeds two blocks (a
/// `BM x 2·BS` tile, as wide as the dense GEMM's); with an odd count the last program
/// computes its second block twice and stores it once. Programs run `G` row groups at a time
/// (program-id swizzling as in the dense GEMM; `G = 1`: every slot pair of one group, then
/// the next group).
#[kernel(
    variants(T = [bf16, f16], BM = [128], BS = [64, 128], BK = [32, 64], S = [3, 4, 6], W = [4, 8], TMA = [0, 1], G = [1, 8]),
    only = [S <= 4 || W == 8, (BM + 2 * BS) * BK * 2 * S <= 200 * 1024, W == 8 || BS == 64, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(indices.dim(1), 2) * cdiv(x.dim(0), BM)],
    require = [
        w.dim(1) == x.dim(1), h.dim(0) == x.dim(0), h.dim(1) == indices.dim(1) * BS,
        counts.dim(0) == indices.dim(0), indices.dim(0) == cdiv(x.dim(0), BM)
    ]
)]
pub fn sparse_out<
    T,
    const BM: usize,
    const BS: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
    const G: usize,
>(
    x: Tensor<T, 2>,
    w: Tensor<T, 2>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    h: TensorMut<T, 2>,
) {
    let (g, pair) = grouped(
        program_id(0),
        cdiv(x.dim(0), BM),
        cdiv(indices.dim(1), 2),
        G,
    );
    let j = pair * 2;
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
        acc0 = dot(xt, w.load([cols0, ks]).t(), acc0);
        acc1 = dot(xt, w.load([cols1, ks]).t(), acc1);
    }
    h.store([rows, j * BS + range::<BS>()], acc0.cast::<T>());
    if j + 1 < count {
        h.store([rows, (j + 1) * BS + range::<BS>()], acc1.cast::<T>());
    }
}

/// Reduction blocks selected (fc2 forward): `y[rows(g), n] = Σ_{j < counts[g]}
/// h[rows(g), j*BS .. +BS] · w2[n, indices[g, j]*BS .. +BS]ᵀ`, with `h` compact as
/// `sparse_out` writes it and `w2` a `Linear` weight `[out, ffn]`. A group with count 0 gets 0.
#[kernel(
    variants(T = [bf16, f16], BM = [128], BN = [128, 256], BS = [64, 128], BK = [32, 64], S = [3, 4, 6], W = [4, 8], TMA = [0, 1]),
    only = [W == 8 || BN == 128, S <= 4 || W == 8, (BM + BN) * BK * 2 * S <= 200 * 1024, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [cdiv(w2.dim(0), BN), cdiv(h.dim(0), BM)],
    require = [
        h.dim(1) == indices.dim(1) * BS, y.dim(0) == h.dim(0), y.dim(1) == w2.dim(0),
        counts.dim(0) == indices.dim(0), indices.dim(0) == cdiv(h.dim(0), BM)
    ]
)]
pub fn sparse_red<
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
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    y: TensorMut<T, 2>,
) {
    let g = program_id(1);
    let rows = g * BM + range::<BM>();
    let cols = program_id(0) * BN + range::<BN>();
    let mut acc = zeros::<f32, BM, BN>();
    // Every kept block of the group, in BS / BK slices of BK.
    for (e, part, blk) in blocks(counts, indices, g, BS / BK) {
        let kh = e * BS + part * BK + range::<BK>();
        let kw = blk * BS + part * BK + range::<BK>();
        acc = dot(h.load([rows, kh]), w2.load([cols, kw]).t(), acc);
    }
    y.store([rows, cols], acc.cast::<T>());
}

/// Both selected: output blocks from one list and reduction blocks from another, per group:
/// `out[rows(g), j*BS ..][.. BS] = Σ_{e < counts_i[g]} h[rows(g), e*BS .. +BS] ·
/// w[indices_o[g, j]*BS .. +BS, indices_i[g, e]*BS .. +BS]ᵀ` for `j < counts_o[g]` (compact in,
/// compact out; slots past the count untouched).
#[kernel(
    variants(T = [bf16, f16], BM = [128], BS = [64, 128], BK = [32, 64], S = [3, 4, 6], W = [4, 8], TMA = [0, 1]),
    only = [S <= 4 || W == 8, (BM + BS) * BK * 2 * S <= 200 * 1024, TMA == 0 || W == 8 && BK == 64],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [indices_o.dim(1), cdiv(h.dim(0), BM)],
    require = [
        h.dim(1) == indices_i.dim(1) * BS, out.dim(0) == h.dim(0),
        out.dim(1) == indices_o.dim(1) * BS,
        counts_o.dim(0) == indices_o.dim(0), counts_i.dim(0) == indices_i.dim(0),
        indices_o.dim(0) == cdiv(h.dim(0), BM), indices_i.dim(0) == indices_o.dim(0)
    ]
)]
pub fn sparse_both<
    T,
    const BM: usize,
    const BS: usize,
    const BK: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    h: Tensor<T, 2>,
    w: Tensor<T, 2>,
    counts_o: Tensor<i32, 1>,
    indices_o: Tensor<i32, 2>,
    counts_i: Tensor<i32, 1>,
    indices_i: Tensor<i32, 2>,
    out: TensorMut<T, 2>,
) {
    let j = program_id(0);
    let g = program_id(1);
    if j >= counts_o.load([g]) {
        return;
    }
    let ob = indices_o.load([g, j]);
    let rows = g * BM + range::<BM>();
    let cols = ob * BS + range::<BS>();
    let mut acc = zeros::<f32, BM, BS>();
    for (e, part, blk) in blocks(counts_i, indices_i, g, BS / BK) {
        let kh = e * BS + part * BK + range::<BK>();
        let kw = blk * BS + part * BK + range::<BK>();
        acc = dot(h.load([rows, kh]), w.load([cols, kw]).t(), acc);
    }
    out.store([rows, j * BS + range::<BS>()], acc.cast::<T>());
}
