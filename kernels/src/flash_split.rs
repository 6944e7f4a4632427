//! Flash attention for heads whose width is not a power of two (OPT-2.7B's 80), as the sum of
//! two power-of-two pieces `LO + HI` (64 + 16): every product over the head dimension is
//! split in two `dot`s (`q·kᵀ = q[:, ..LO]·k[:, ..LO]ᵀ + q[:, LO..]·k[:, LO..]ᵀ`), and every
//! output or gradient over it is kept as two accumulators, `LO` and `HI` columns wide.
//!
//! Tile extents are powers of two, so the [`flash_attention`](crate::flash_attention) kernels
//! can only take such heads on their next wider tile (128 for 80) with the columns past the
//! head zero-filled: 1.6x the tensor-core work of the head itself. These kernels do the head's
//! own work. They are the same algorithm, line for line, as `flash_fwd`, `flash_bwd_dkdv` and
//! `flash_bwd_dq` (see there for the block lists, the base-2 statistics and the masking), with
//! each head-dimension tile written twice; `flash_bwd_delta` serves both (its tile is masked
//! to the head, and it does no matrix work).

use lexp_macros::kernel;

/// Forward of [`flash_fwd`](crate::flash_attention::flash_fwd) on heads of `LO + HI` columns.
#[kernel(
    variants(T = [bf16, f16], LO = [64], HI = [16], BM = [128], BN = [64, 128], S = [2, 3], W = [8]),
    warps = W,
    stages = S,
    grid = [blocks.dim(0), o.dim(1)],
    require = [
        blocks.dim(1) == 3, qkv.dim(1) == 3 * o.dim(1), o.dim(0) == qkv.dim(0),
        qkv.dim(2) == o.dim(2), o.dim(2) == LO + HI, lse2.dim(0) == o.dim(1),
        lse2.dim(1) >= qkv.dim(0)
    ]
)]
pub fn flash_fwd_split<
    T,
    const LO: usize,
    const HI: usize,
    const BM: usize,
    const BN: usize,
    const S: usize,
    const W: usize,
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
    let c = range::<LO>();
    let e = LO + range::<HI>();
    let mut m = full::<f32, BM>(NEG_INFINITY);
    let mut l = zeros::<f32, BM>();
    let mut acc = zeros::<f32, BM, LO>();
    let mut acc_e = zeros::<f32, BM, HI>();
    let hi = min(q0 + BM, len);
    for k0 in (0..hi).step_by(BN) {
        let kj = k0 + range::<BN>();
        let krows = start + kj;
        let q = qkv.load([rows, head, c]);
        let q_e = qkv.load([rows, head, e]);
        let k = qkv.load([krows, nh + head, c]);
        let k_e = qkv.load([krows, nh + head, e]);
        let mut s = dot(q_e, k_e.t(), dot(q, k.t(), zeros::<f32, BM, BN>()));
        // Masked and scaled as in `flash_fwd`.
        if k0 + BN > q0 {
            s = select(kj.expand(0) <= qi.expand(1), s, NEG_INFINITY);
        }
        let m_new = max(m, s.reduce_max(1));
        let alpha = exp2((m - m_new) * scale_log2);
        let p = exp2(s * scale_log2 - (m_new * scale_log2).expand(1));
        l = l * alpha + p.sum(1);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let v_e = qkv.load([krows, 2 * nh + head, e]);
        let pc = p.cast::<T>();
        acc = dot(pc, v, acc * alpha.expand(1));
        acc_e = dot(pc, v_e, acc_e * alpha.expand(1));
        m = m_new;
    }
    let out_rows = select(qi < len, rows, qkv.dim(0));
    let inv = (1.0 / l).expand(1);
    o.store([out_rows, head, c], (acc * inv).cast::<T>());
    o.store([out_rows, head, e], (acc_e * inv).cast::<T>());
    lse2.store(
        [head, select(qi < len, rows, lse2.dim(1))],
        m * scale_log2 + log2(l),
    );
}

/// `dk` and `dv` of [`flash_bwd_dkdv`](crate::flash_attention::flash_bwd_dkdv) on heads of
/// `LO + HI` columns.
#[kernel(
    // 128 keys x 64 queries spills 92 bytes on sm_80 (244 registers and none on sm_90a): the
    // engine runs it on sm_90 only (`FlashConfig::sm80`, `tests/tests/ptxas.rs`).
    variants(T = [bf16, f16], LO = [64], HI = [16], BN = [64, 128], BM = [32, 64], S = [2], W = [8]),
    only = [BN % BM == 0],
    warps = W,
    stages = S,
    grid = [blocks.dim(0), d_o.dim(1)],
    require = [
        blocks.dim(1) == 3, qkv.dim(1) == 3 * d_o.dim(1), d_o.dim(0) == qkv.dim(0),
        d_o.dim(2) == qkv.dim(2), d_o.dim(2) == LO + HI, lse2.dim(0) == d_o.dim(1),
        lse2.dim(1) >= qkv.dim(0), delta.dim(0) == lse2.dim(0), delta.dim(1) == lse2.dim(1),
        dqkv.dim(0) == qkv.dim(0), dqkv.dim(1) == qkv.dim(1), dqkv.dim(2) == qkv.dim(2)
    ]
)]
pub fn flash_bwd_dkdv_split<
    T,
    const LO: usize,
    const HI: usize,
    const BN: usize,
    const BM: usize,
    const S: usize,
    const W: usize,
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
    let c = range::<LO>();
    let e = LO + range::<HI>();
    let mut dk = zeros::<f32, BN, LO>();
    let mut dk_e = zeros::<f32, BN, HI>();
    let mut dv = zeros::<f32, BN, LO>();
    let mut dv_e = zeros::<f32, BN, HI>();
    for q0 in (k0..len).step_by(BM) {
        let qi = q0 + range::<BM>();
        let qrows = start + qi;
        let l = lse2.load([head, qrows]);
        let dl = delta.load([head, qrows]);
        let k = qkv.load([krows, nh + head, c]);
        let k_e = qkv.load([krows, nh + head, e]);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let v_e = qkv.load([krows, 2 * nh + head, e]);
        let q = qkv.load([qrows, head, c]);
        let q_e = qkv.load([qrows, head, e]);
        let dout = d_o.load([qrows, head, c]);
        let dout_e = d_o.load([qrows, head, e]);
        let st = dot(k_e, q_e.t(), dot(k, q.t(), zeros::<f32, BN, BM>()));
        let mut pt = exp2(st * scale_log2 - l.expand(0));
        // Masked as in `flash_bwd_dkdv`.
        if (q0 < k0 + BN) | (q0 + BM > len) {
            let visible = (kj.expand(1) <= qi.expand(0)) & (qi < len).expand(0);
            pt = select(visible, pt, 0.0);
        }
        let ptc = pt.cast::<T>();
        dv = dot(ptc, dout, dv);
        dv_e = dot(ptc, dout_e, dv_e);
        let dpt = dot(v_e, dout_e.t(), dot(v, dout.t(), zeros::<f32, BN, BM>()));
        let dst = (pt * (dpt - dl.expand(0))).cast::<T>();
        dk = dot(dst, q, dk);
        dk_e = dot(dst, q_e, dk_e);
    }
    let out = select(kj < len, krows, qkv.dim(0));
    dqkv.store([out, nh + head, c], (dk * scale).cast::<T>());
    dqkv.store([out, nh + head, e], (dk_e * scale).cast::<T>());
    dqkv.store([out, 2 * nh + head, c], dv.cast::<T>());
    dqkv.store([out, 2 * nh + head, e], dv_e.cast::<T>());
}

/// `dq` of [`flash_bwd_dq`](crate::flash_attention::flash_bwd_dq) on heads of `LO + HI`
/// columns.
#[kernel(
    variants(T = [bf16, f16], LO = [64], HI = [16], BM = [64, 128], BN = [64], S = [2], W = [8]),
    warps = W,
    stages = S,
    grid = [blocks.dim(0), d_o.dim(1)],
    require = [
        blocks.dim(1) == 3, qkv.dim(1) == 3 * d_o.dim(1), d_o.dim(0) == qkv.dim(0),
        d_o.dim(2) == qkv.dim(2), d_o.dim(2) == LO + HI, lse2.dim(0) == d_o.dim(1),
        lse2.dim(1) >= qkv.dim(0), delta.dim(0) == lse2.dim(0), delta.dim(1) == lse2.dim(1),
        dqkv.dim(0) == qkv.dim(0), dqkv.dim(1) == qkv.dim(1), dqkv.dim(2) == qkv.dim(2)
    ]
)]
pub fn flash_bwd_dq_split<
    T,
    const LO: usize,
    const HI: usize,
    const BM: usize,
    const BN: usize,
    const S: usize,
    const W: usize,
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
    let c = range::<LO>();
    let e = LO + range::<HI>();
    let l = lse2.load([head, rows]);
    let dl = delta.load([head, rows]);
    let mut dq = zeros::<f32, BM, LO>();
    let mut dq_e = zeros::<f32, BM, HI>();
    let hi = min(q0 + BM, len);
    for k0 in (0..hi).step_by(BN) {
        let kj = k0 + range::<BN>();
        let krows = start + kj;
        let q = qkv.load([rows, head, c]);
        let q_e = qkv.load([rows, head, e]);
        let dout = d_o.load([rows, head, c]);
        let dout_e = d_o.load([rows, head, e]);
        let k = qkv.load([krows, nh + head, c]);
        let k_e = qkv.load([krows, nh + head, e]);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let v_e = qkv.load([krows, 2 * nh + head, e]);
        let s = dot(q_e, k_e.t(), dot(q, k.t(), zeros::<f32, BM, BN>()));
        let mut p = exp2(s * scale_log2 - l.expand(1));
        // Masked as in `flash_bwd_dq`.
        if k0 + BN > q0 {
            p = select(kj.expand(0) <= qi.expand(1), p, 0.0);
        }
        let dp = dot(dout_e, v_e.t(), dot(dout, v.t(), zeros::<f32, BM, BN>()));
        let ds = (p * (dp - dl.expand(1))).cast::<T>();
        dq = dot(ds, k, dq);
        dq_e = dot(ds, k_e, dq_e);
    }
    let out = select(qi < len, rows, qkv.dim(0));
    dqkv.store([out, head, c], (dq * scale).cast::<T>());
    dqkv.store([out, head, e], (dq_e * scale).cast::<T>());
}
