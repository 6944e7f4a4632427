//! Flash attention (FA2 form, COMPILER.md §7.3): causal self-attention over packed sequences
//! without materialising the scores, forward and backward.
//!
//! q, k and v are read in place from the output of the fused q/k/v projection, viewed as
//! `[T, 3·nh, hd]` (head `h` of q, k and v at rows `h`, `nh + h` and `2·nh + h` of the middle
//! dimension), as the GPU engine lays them out; `o`, `dO` and the gradients are `[T, nh, hd]`
//! and `[T, 3·nh, hd]` likewise. The tile width `D` is a compile-time constant and the head
//! width `hd` a run-time one, `hd <= D`: the loads' bounds mask zero-fills the columns past
//! `hd` and the stores drop them, so a model whose heads have no kernels of their own (OPT-2.7B's
//! 80) runs the next wider ones (128) in place, with no padded copies. Zero columns change no
//! score, and their output and gradient columns are never stored. Packed
//! sequences are described by a *query-block list* `blocks [nb, 3]` of `i32`: row `b` is
//! `(start, len, q0)` — the sequence's first token, its length, and the block's first query
//! position inside it. The host writes one row per `BM`-query block of every sequence
//! (longest-running blocks first, for load balance); the grid is `nb x heads`, so no
//! recompilation happens per batch shape.
//!
//! Softmax statistics are kept in base 2 (`exp2` of scores multiplied by
//! `c = softmax_scale · log2 e`, one fused multiply-add per score): the forward writes
//! `lse2 = c·m + log2(l)` per (head, token), with `m` the row's largest raw score, and the
//! backward recomputes `P = exp2(c·q·kᵀ − lse2)` from it. Only rows of the block that lie
//! inside the sequence are stored: rows past its end are redirected to an out-of-range index
//! (the loads' and stores' bounds mask then drops them). Keys past a query are masked to −inf
//! (causal), which also hides every key past the sequence's end from every stored row. Only the
//! key blocks that cross the diagonal (or the sequence's end) are masked, inside an `if`: the
//! others are entirely visible, and their scores skip the compare and select.
//!
//! The kernels take 16-byte-aligned tensors only (tensor-core variants), so the f32 `[nh, T]`
//! statistics (`lse2`, `delta`) may have more columns than tokens: the caller pads their rows
//! to a multiple of 4 (the columns past `T` are scratch).

use lexp_macros::kernel;

/// One row of a block list: `(start, len, first)` — a sequence's first token, its length, and
/// the first query (or key) position of the block inside it.
pub type BlockRow = [i32; 3];

/// The query-block list of [`flash_fwd`] and [`flash_bwd_dq`]: one row per `bm`-query block
/// of every sequence of `cu_seqlens`, blocks that visit the most keys (the last ones of long
/// sequences) first, so that the long programs start early. `None` if a position does not
/// fit in `i32`.
pub fn query_blocks(cu_seqlens: &[usize], bm: usize) -> Option<Vec<BlockRow>> {
    let mut b = block_rows(cu_seqlens, bm)?;
    b.sort_by_key(|r| std::cmp::Reverse(r[2]));
    Some(b)
}

/// The key-block list of [`flash_bwd_dkdv`]: one row per `bn`-key block, blocks that visit the
/// most queries (the first ones of long sequences) first.
pub fn key_blocks(cu_seqlens: &[usize], bn: usize) -> Option<Vec<BlockRow>> {
    let mut b = block_rows(cu_seqlens, bn)?;
    b.sort_by_key(|r| std::cmp::Reverse(r[1] - r[2]));
    Some(b)
}

fn block_rows(cu_seqlens: &[usize], size: usize) -> Option<Vec<BlockRow>> {
    let mut b = vec![];
    for w in cu_seqlens.windows(2) {
        let (start, len) = (
            i32::try_from(w[0]).ok()?,
            i32::try_from(w[1].checked_sub(w[0])?).ok()?,
        );
        for first in (0..len).step_by(size.max(1)) {
            b.push([start, len, first]);
        }
    }
    Some(b)
}

/// Forward: `o = softmax(scale · q·kᵀ + causal mask) · v` per sequence and head, and
/// `lse2[h, t] = log2 Σ_j 2^(c·s_tj)` (base 2, `c = scale · log2 e`) for the backward.
/// `c` is passed as `scale_log2`.
#[kernel(
    // Head dimension 128: 2 stages; 128-key steps spill on sm_80 (the engine runs them on
    // sm_90 only, `FlashConfig::sm80`). 64-query programs are one warpgroup (W = 4, two to
    // four CTAs per SM; the engine's tiles below 4096–16384 tokens, call 106), 128-query ones
    // two.
    variants(T = [bf16, f16], D = [64, 128], BM = [64, 128], BN = [64, 128], S = [2, 3], W = [4, 8], TMA = [0, 1]),
    only = [D == 64 || S == 2, (W == 4) == (BM == 64)],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [blocks.dim(0), o.dim(1)],
    require = [
        blocks.dim(1) == 3, qkv.dim(1) == 3 * o.dim(1), o.dim(0) == qkv.dim(0),
        qkv.dim(2) == o.dim(2), o.dim(2) <= D, lse2.dim(0) == o.dim(1),
        lse2.dim(1) >= qkv.dim(0)
    ]
)]
pub fn flash_fwd<
    T,
    const D: usize,
    const BM: usize,
    const BN: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    qkv: Tensor<T, 3>,
    blocks: Tensor<i32, 2>,
    scale_log2: f32,
    o: TensorMut<T, 3>,
    lse2: TensorMut<f32, 2>,
) {
    let blk = program_id(0);
    let head = program_id(1);
    let start = blocks.load([blk, 0]);
    let len = blocks.load([blk, 1]);
    let q0 = blocks.load([blk, 2]);
    let nh = o.dim(1);
    let qi = q0 + range::<BM>();
    let rows = start + qi;
    let c = range::<D>();
    let mut m = full::<f32, BM>(NEG_INFINITY);
    let mut l = zeros::<f32, BM>();
    let mut acc = zeros::<f32, BM, D>();
    let hi = min(q0 + BM, len);
    for k0 in (0..hi).step_by(BN) {
        let kj = k0 + range::<BN>();
        let krows = start + kj;
        // q is loop-invariant but loaded here: a load inside the loop is streamed into shared
        // memory by `cp.async` (L2 hits after the first iteration), where one hoisted out of it
        // would be staged from registers, with two barriers, at every iteration.
        let q = qkv.load([rows, head, c]);
        let k = qkv.load([krows, nh + head, c]);
        let mut s = dot(q, k.t(), zeros::<f32, BM, BN>());
        // Only a key block that reaches past the block's first query (the diagonal ones, and
        // the last, which may hold the next sequence's keys) needs the causal mask: the
        // others are entirely visible, and skipping the per-score compare and select there
        // saves two of the softmax's dozen instructions per score.
        if k0 + BN > q0 {
            s = select(kj.expand(0) <= qi.expand(1), s, NEG_INFINITY);
        }
        // The running maximum is kept in raw score units, so that `c·s − c·m` is one fused
        // multiply-add per score.
        let m_new = max(m, s.reduce_max(1));
        let alpha = exp2((m - m_new) * scale_log2);
        let p = exp2(s * scale_log2 - (m_new * scale_log2).expand(1));
        l = l * alpha + p.sum(1);
        let v = qkv.load([krows, 2 * nh + head, c]);
        acc = dot(p.cast::<T>(), v, acc * alpha.expand(1));
        m = m_new;
    }
    // Every query sees itself, so `l >= 1` on every row that is stored.
    let out_rows = select(qi < len, rows, qkv.dim(0));
    o.store([out_rows, head, c], (acc * (1.0 / l).expand(1)).cast::<T>());
    lse2.store(
        [head, select(qi < len, rows, lse2.dim(1))],
        m * scale_log2 + log2(l),
    );
}

/// Backward, step 1: `delta[h, t] = Σ_d dO[t, h, d] · O[t, h, d]` (f32), the row sums
/// `rowsum(P ⊙ dP)` of the softmax backward, from the stored output. (`BR` must differ from
/// `D`: the layout pass of a kernel without `dot` cannot place one `range` tile along two
/// dimensions, and equal-length ranges are merged.)
#[kernel(
    variants(T = [bf16, f16], D = [64, 128], BR = [32]),
    warps = 4,
    grid = [cdiv(o.dim(0), BR), o.dim(1)],
    require = [
        d_o.dim(0) == o.dim(0), d_o.dim(1) == o.dim(1), d_o.dim(2) == o.dim(2), o.dim(2) <= D,
        delta.dim(0) == o.dim(1), delta.dim(1) >= o.dim(0)
    ]
)]
pub fn flash_bwd_delta<T, const D: usize, const BR: usize>(
    o: Tensor<T, 3>,
    d_o: Tensor<T, 3>,
    delta: TensorMut<f32, 2>,
) {
    let head = program_id(1);
    let rows = program_id(0) * BR + range::<BR>();
    let cols = range::<D>();
    let prod =
        o.load([rows, head, cols]).cast::<f32>() * d_o.load([rows, head, cols]).cast::<f32>();
    delta.store([head, rows], prod.sum(1));
}

/// Backward, step 2: `dk` and `dv` of one `BN`-key block and head, visiting the query blocks
/// at and after it (`blocks` rows are `(start, len, k0)`, one per key block). Transposed
/// tiles: `Pᵀ = exp2(c·k·qᵀ − lse2)`, `dv += Pᵀ·dO`, `dSᵀ = Pᵀ ⊙ (v·dOᵀ − delta)`,
/// `dk += dSᵀ·q`; `dk` is scaled by `scale` at the end. Writes the k and v blocks of `dqkv`.
#[kernel(
    // BN = 128: 8 warps of 16 whole key rows, so Pᵀ and dSᵀ go to the MMAs straight from
    // registers (the mma-to-dot shortcut, COMPILER.md §1.7); with it the sm_80 code no longer
    // spills (255 registers, 0 spills). BN = 64 splits the rows over 4 x 2 warps and stages
    // them through shared memory.
    // Head dimension 64: 64-query steps (128 spill even on sm_90a). Head dimension 128: 2
    // stages (3 measured slower, call 84), 32- or 64-query steps; 128 keys spill on sm_80 (run
    // on sm_90 only), and 128 x 64 on sm_90 too since the diagonal-only mask (16 bytes with
    // TMA, more without: no such variant; the one-warpgroup 64 x 64 was faster anyway, call 113).
    // W = 4: one warpgroup of 64 keys in 64-query steps (213–247 registers on sm_90, two CTAs
    // per SM; the engine's short-sequence tile, call 106), also in 4 stages (1–2% faster than
    // 3 with heads of 64, call 111; 32-query steps were no faster there); with heads of 128 it
    // spills on sm_80 (run on sm_90 only).
    // C = 3: the one-warpgroup tile of heads of 64 held to three CTAs per SM (168 registers,
    // 48 bytes spilled and 52 reloaded in the key loop), where it takes 225 and fits two; the
    // third program hides more latency than the spills cost (`runtime/src/gpu/attention.rs`).
    variants(T = [bf16, f16], D = [64, 128], BN = [64, 128], BM = [32, 64], S = [2, 3, 4], W = [4, 8], TMA = [0, 1], C = [1, 3]),
    only = [
        BN % BM == 0, D == 64 || S == 2, D == 128 || BM == 64,
        D == 64 || BN == 64 || BM == 32, W == 8 || (BN == 64 && BM == 64),
        S < 4 || (W == 4 && TMA == 1), C == 1 || (W == 4 && D == 64 && TMA == 1 && S == 2)
    ],
    warps = W,
    stages = S,
    tma = TMA,
    ctas = C,
    grid = [blocks.dim(0), d_o.dim(1)],
    require = [
        blocks.dim(1) == 3, qkv.dim(1) == 3 * d_o.dim(1), d_o.dim(0) == qkv.dim(0),
        d_o.dim(2) == qkv.dim(2), d_o.dim(2) <= D, lse2.dim(0) == d_o.dim(1),
        lse2.dim(1) >= qkv.dim(0), delta.dim(0) == lse2.dim(0), delta.dim(1) == lse2.dim(1),
        dqkv.dim(0) == qkv.dim(0), dqkv.dim(1) == qkv.dim(1), dqkv.dim(2) == qkv.dim(2)
    ]
)]
pub fn flash_bwd_dkdv<
    T,
    const D: usize,
    const BN: usize,
    const BM: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
    const C: usize,
>(
    qkv: Tensor<T, 3>,
    d_o: Tensor<T, 3>,
    lse2: Tensor<f32, 2>,
    delta: Tensor<f32, 2>,
    blocks: Tensor<i32, 2>,
    scale_log2: f32,
    scale: f32,
    dqkv: TensorMut<T, 3>,
) {
    let blk = program_id(0);
    let head = program_id(1);
    let start = blocks.load([blk, 0]);
    let len = blocks.load([blk, 1]);
    let k0 = blocks.load([blk, 2]);
    let nh = d_o.dim(1);
    let kj = k0 + range::<BN>();
    let krows = start + kj;
    let c = range::<D>();
    let mut dk = zeros::<f32, BN, D>();
    let mut dv = zeros::<f32, BN, D>();
    for q0 in (k0..len).step_by(BM) {
        let qi = q0 + range::<BM>();
        let qrows = start + qi;
        // The statistics first: their global loads are then in flight during the two MMAs
        // below instead of stalling after them (a warpgroup MMA is a barrier to code motion).
        let l = lse2.load([head, qrows]);
        let dl = delta.load([head, qrows]);
        // k and v are loop-invariant but loaded here so that they are streamed (see
        // `flash_fwd`).
        let k = qkv.load([krows, nh + head, c]);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let q = qkv.load([qrows, head, c]);
        let dout = d_o.load([qrows, head, c]);
        let st = dot(k, q.t(), zeros::<f32, BN, BM>());
        let mut pt = exp2(st * scale_log2 - l.expand(0));
        // Masked only where a query block reaches the diagonal or past the sequence's end
        // (whose rows would be the next sequence's queries); the others are entirely visible.
        if (q0 < k0 + BN) | (q0 + BM > len) {
            let visible = (kj.expand(1) <= qi.expand(0)) & (qi < len).expand(0);
            pt = select(visible, pt, 0.0);
        }
        dv = dot(pt.cast::<T>(), dout, dv);
        let dpt = dot(v, dout.t(), zeros::<f32, BN, BM>());
        let dst = pt * (dpt - dl.expand(0));
        dk = dot(dst.cast::<T>(), q, dk);
    }
    let out = select(kj < len, krows, qkv.dim(0));
    dqkv.store([out, nh + head, c], (dk * scale).cast::<T>());
    dqkv.store([out, 2 * nh + head, c], dv.cast::<T>());
}

/// Backward, step 3: `dq` of one `BM`-query block and head (`blocks` as in [`flash_fwd`]):
/// `P = exp2(c·q·kᵀ − lse2)`, `dS = P ⊙ (dO·vᵀ − delta)`, `dq = scale · Σ dS·k`. Writes the
/// q block of `dqkv`. Recomputing `S` and `dP` here instead of accumulating `dq` atomically in
/// the key-block kernel keeps the backward deterministic, and on the H200 it is also faster:
/// the atomic (FlashAttention-2) form, one `red.global.add.f32` per element of each `dS·k`
/// tile, took 0.433 ms against 0.304 for delta + dk/dv + dq at OPT-1.3B's 4 x 1024 and 17.6
/// against 10.8 ms at 1 x 16384 (`bench/results/2026-11-30-h200-fused-bwd/`, commit 6d19927):
/// the adds, half an f32 per score, are bound by L2's atomic throughput. FlashAttention-3's
/// answer is a bulk reduce of the tile from shared memory (`cp.reduce.async.bulk`), which the
/// DSL does not have.
#[kernel(
    // Head dimension 128: 2 stages (3 measured slower, call 84). 128-key steps: heads of 64 in
    // 128-query programs, and one-warpgroup 64-query programs (W = 4, the engine's
    // short-sequence tile, call 106) of heads of 64 (of 128 they spill on sm_80).
    variants(T = [bf16, f16], D = [64, 128], BM = [64, 128], BN = [64, 128], S = [2, 3], W = [4, 8], TMA = [0, 1]),
    only = [
        D == 64 || S == 2, BN == 64 || (D == 64 && BM == 128) || W == 4, W == 8 || BM == 64,
        W == 8 || D == 64 || BN == 64
    ],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [blocks.dim(0), d_o.dim(1)],
    require = [
        blocks.dim(1) == 3, qkv.dim(1) == 3 * d_o.dim(1), d_o.dim(0) == qkv.dim(0),
        d_o.dim(2) == qkv.dim(2), d_o.dim(2) <= D, lse2.dim(0) == d_o.dim(1),
        lse2.dim(1) >= qkv.dim(0), delta.dim(0) == lse2.dim(0), delta.dim(1) == lse2.dim(1),
        dqkv.dim(0) == qkv.dim(0), dqkv.dim(1) == qkv.dim(1), dqkv.dim(2) == qkv.dim(2)
    ]
)]
pub fn flash_bwd_dq<
    T,
    const D: usize,
    const BM: usize,
    const BN: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    qkv: Tensor<T, 3>,
    d_o: Tensor<T, 3>,
    lse2: Tensor<f32, 2>,
    delta: Tensor<f32, 2>,
    blocks: Tensor<i32, 2>,
    scale_log2: f32,
    scale: f32,
    dqkv: TensorMut<T, 3>,
) {
    let blk = program_id(0);
    let head = program_id(1);
    let start = blocks.load([blk, 0]);
    let len = blocks.load([blk, 1]);
    let q0 = blocks.load([blk, 2]);
    let nh = d_o.dim(1);
    let qi = q0 + range::<BM>();
    let rows = start + qi;
    let c = range::<D>();
    let l = lse2.load([head, rows]);
    let dl = delta.load([head, rows]);
    let mut dq = zeros::<f32, BM, D>();
    let hi = min(q0 + BM, len);
    for k0 in (0..hi).step_by(BN) {
        let kj = k0 + range::<BN>();
        let krows = start + kj;
        // q and dO are loop-invariant but loaded here so that they are streamed (see
        // `flash_fwd`).
        let q = qkv.load([rows, head, c]);
        let dout = d_o.load([rows, head, c]);
        let k = qkv.load([krows, nh + head, c]);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let s = dot(q, k.t(), zeros::<f32, BM, BN>());
        let mut p = exp2(s * scale_log2 - l.expand(1));
        // Masked only where the key block reaches past the block's first query (as in
        // `flash_fwd`).
        if k0 + BN > q0 {
            p = select(kj.expand(0) <= qi.expand(1), p, 0.0);
        }
        let dp = dot(dout, v.t(), zeros::<f32, BM, BN>());
        let ds = p * (dp - dl.expand(1));
        dq = dot(ds.cast::<T>(), k, dq);
    }
    let out = select(qi < len, rows, qkv.dim(0));
    dqkv.store([out, head, c], (dq * scale).cast::<T>());
}
