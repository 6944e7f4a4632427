//! The fused flash-attention backward (FlashAttention-3's form, COMPILER.md §7.3): dk, dv and
//! dq in one pass over the (key block, query block) pairs, so the softmax `P` and `dP` are
//! computed once per pair instead of twice — five products where
//! [`flash_bwd_dkdv`](crate::flash_attention::flash_bwd_dkdv) +
//! [`flash_bwd_dq`](crate::flash_attention::flash_bwd_dq) run seven.
//!
//! Each key-block program adds its share `dS·k` of every query block's `dq` into an f32
//! accumulator `dq_acc [T, nh, hd]`. On sm_90a that `atomic_add` is a bulk tensor reduction
//! (`lexp_compiler::passes::tma::TmaReduce`): the tile is staged in
//! shared memory and one thread hands it to the TMA, which adds it in L2 — the FlashAttention-2
//! form, one `red.global.add.f32` per element from every thread, was bound by L2's atomic
//! throughput and lost to the two-kernel backward everywhere (commit 6d19927, call 81: 17.6
//! against 10.8 ms at 1 x 16384). On sm_80 the compiler still lowers it to `red.global`.
//!
//! Three launches: [`flash_bwd_prep`] (`delta` and the accumulator cleared), [`flash_bwd_fused`],
//! [`flash_bwd_dq_store`] (`dq = scale · dq_acc`, converted). The additions' order depends on
//! the order the programs run in, so `dq` is not bit-reproducible from run to run (within f32
//! rounding of the same sum); the engine keeps the two-kernel backward where that matters
//! (`LEXP_DETERMINISTIC_ATTENTION=1`, `runtime/src/gpu/attention.rs`).

use lexp_macros::kernel;

/// Step 1: [`flash_bwd_delta`](crate::flash_attention::flash_bwd_delta)'s
/// `delta[h, t] = Σ_d dO·O`, and the rows of `dq_acc` it covers set to zero, so that clearing
/// the accumulator costs no launch of its own.
#[kernel(
    variants(T = [bf16, f16], D = [64, 128], BR = [32]),
    warps = 4,
    grid = [cdiv(o.dim(0), BR), o.dim(1)],
    require = [
        d_o.dim(0) == o.dim(0), d_o.dim(1) == o.dim(1), d_o.dim(2) == o.dim(2), o.dim(2) <= D,
        delta.dim(0) == o.dim(1), delta.dim(1) >= o.dim(0),
        dq_acc.dim(0) == o.dim(0), dq_acc.dim(1) == o.dim(1), dq_acc.dim(2) == o.dim(2)
    ]
)]
pub fn flash_bwd_prep<T, const D: usize, const BR: usize>(
    o: Tensor<T, 3>,
    d_o: Tensor<T, 3>,
    delta: TensorMut<f32, 2>,
    dq_acc: TensorMut<f32, 3>,
) {
    let head = program_id(1);
    let rows = program_id(0) * BR + range::<BR>();
    let cols = range::<D>();
    let prod =
        o.load([rows, head, cols]).cast::<f32>() * d_o.load([rows, head, cols]).cast::<f32>();
    delta.store([head, rows], prod.sum(1));
    dq_acc.store([rows, head, cols], zeros::<f32, BR, D>());
}

/// Step 2: [`flash_bwd_dkdv`](crate::flash_attention::flash_bwd_dkdv) (same block list, one
/// row per `BN`-key block, same masking) that also adds each query block's share of `dq`,
/// `dS·k` (the transpose of the `dSᵀ` tile it already has, times its keys), into `dq_acc`
/// (cleared by [`flash_bwd_prep`]). Rows past a sequence's end add zeros (their `dSᵀ` columns
/// are masked), so the reduction's box needs no other mask than the tensor's extent.
#[kernel(
    // Heads of 64: one warpgroup of 64 keys in 64-query steps (the two-kernel backward's
    // tile), or two of 128 keys; 3 stages (254 and 253 registers on sm_90a; in 2 stages both
    // spill 4 bytes). Heads of 128: two warpgroups of 64 keys in 32-query steps (186
    // registers; one warpgroup of 64 x 64 spills 148 bytes).
    variants(T = [bf16, f16], D = [64, 128], BN = [64, 128], BM = [32, 64], S = [2, 3], W = [4, 8], TMA = [1]),
    only = [
        (D == 64 && S == 3 && BM == 64 && ((W == 4 && BN == 64) || (W == 8 && BN == 128)))
            || (D == 128 && S == 2 && W == 8 && BN == 64 && BM == 32)
    ],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [blocks.dim(0), d_o.dim(1)],
    require = [
        blocks.dim(1) == 3, qkv.dim(1) == 3 * d_o.dim(1), d_o.dim(0) == qkv.dim(0),
        d_o.dim(2) == qkv.dim(2), d_o.dim(2) <= D, lse2.dim(0) == d_o.dim(1),
        lse2.dim(1) >= qkv.dim(0), delta.dim(0) == lse2.dim(0), delta.dim(1) == lse2.dim(1),
        dqkv.dim(0) == qkv.dim(0), dqkv.dim(1) == qkv.dim(1), dqkv.dim(2) == qkv.dim(2),
        dq_acc.dim(0) == d_o.dim(0), dq_acc.dim(1) == d_o.dim(1), dq_acc.dim(2) == d_o.dim(2)
    ]
)]
pub fn flash_bwd_fused<
    T,
    const D: usize,
    const BN: usize,
    const BM: usize,
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
    dq_acc: TensorMut<f32, 3>,
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
        // As in `flash_bwd_dkdv`: the statistics first, k and v streamed.
        let l = lse2.load([head, qrows]);
        let dl = delta.load([head, qrows]);
        let k = qkv.load([krows, nh + head, c]);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let q = qkv.load([qrows, head, c]);
        let dout = d_o.load([qrows, head, c]);
        let st = dot(k, q.t(), zeros::<f32, BN, BM>());
        let mut pt = exp2(st * scale_log2 - l.expand(0));
        if (q0 < k0 + BN) | (q0 + BM > len) {
            let visible = (kj.expand(1) <= qi.expand(0)) & (qi < len).expand(0);
            pt = select(visible, pt, 0.0);
        }
        dv = dot(pt.cast::<T>(), dout, dv);
        let dpt = dot(v, dout.t(), zeros::<f32, BN, BM>());
        let dst = (pt * (dpt - dl.expand(0))).cast::<T>();
        dk = dot(dst, q, dk);
        dq_acc.atomic_add([qrows, head, c], dot(dst.t(), k, zeros::<f32, BM, D>()));
    }
    let out = select(kj < len, krows, qkv.dim(0));
    dqkv.store([out, nh + head, c], (dk * scale).cast::<T>());
    dqkv.store([out, 2 * nh + head, c], dv.cast::<T>());
}

/// Step 3: `dq = scale · dq_acc`, converted into the q rows of `dqkv`.
#[kernel(
    variants(T = [bf16, f16], D = [64, 128], BR = [32]),
    warps = 4,
    grid = [cdiv(dq_acc.dim(0), BR), dq_acc.dim(1)],
    require = [
        dqkv.dim(0) == dq_acc.dim(0), dqkv.dim(1) == 3 * dq_acc.dim(1),
        dqkv.dim(2) == dq_acc.dim(2), dq_acc.dim(2) <= D
    ]
)]
pub fn flash_bwd_dq_store<T, const D: usize, const BR: usize>(
    dq_acc: Tensor<f32, 3>,
    scale: f32,
    dqkv: TensorMut<T, 3>,
) {
    let head = program_id(1);
    let rows = program_id(0) * BR + range::<BR>();
    let cols = range::<D>();
    dqkv.store(
        [rows, head, cols],
        (dq_acc.load([rows, head, cols]) * scale).cast::<T>(),
    );
}
