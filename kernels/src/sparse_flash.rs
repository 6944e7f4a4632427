//! Block-sparse flash attention (DESIGN.md §7, attention step 4): the kernels of
//! [`flash_attention`](crate::flash_attention) restricted, per (sequence, query block, head),
//! to a device-side list of kept key blocks. A dropped block's scores count as −∞: its
//! probabilities are 0, the softmax normalises over the kept keys, and the backward is exact
//! given the forward's lists.
//!
//! Blocks are square, `KB` positions of a sequence each (128 in the engine), counted from the
//! sequence's first token. A *block row* is `(sequence, block)`; numbering the blocks of all
//! sequences one after the other, block row `r` and head `h` form list row `g = r·heads + h`
//! (the order of `lexp_runtime::model::AttentionMask`). Two lists, both ordinary run-time data
//! (no recompilation per pattern):
//!
//! - the **forward list** `counts[g]`, `indices[g, j]`: the key blocks query block row `r`
//!   keeps under head `h`, ascending (the forward and `dq` iterate over it);
//! - its **transpose** `counts_t[g]`, `indices_t[g, j]`: the query blocks that keep key block
//!   row `r` under head `h`, ascending (`dk`/`dv` iterate over it), from [`transpose`].
//!
//! Every query block must keep its diagonal block (so every query sees at least itself, and
//! the first tile of each row's online softmax has a visible key); the runtime validates lists
//! before they reach a launch. Programs are described by *block tables* `[nb, 4]` of `i32`:
//! `(start, len, first, row)` — the sequence's first token and length, the first query (key)
//! position of the program, and the block row holding it. A program may cover part of a block
//! (`BM` or `BN` smaller than `KB`); [`block_table`] writes one row per part.
//!
//! Within a kept block the causal mask applies as in the dense kernels, and the `delta`
//! kernel of the dense backward ([`flash_bwd_delta`](crate::flash_attention::flash_bwd_delta))
//! is shared unchanged. Tensors are viewed per head as in the dense kernels (`[T, 3·nh, hd]`,
//! `hd <= D`).

use lexp_macros::kernel;

/// One row of a block table: `(start, len, first, row)`.
pub type TableRow = [i32; 4];

/// The block table for programs of `size` positions (queries for [`sparse_flash_fwd`] and
/// [`sparse_flash_dq`], keys for [`sparse_flash_dkdv`]) over square blocks of `kb`: one row
/// per `size`-chunk of every sequence of `cu_seqlens`, with the global block row holding it.
/// `descending_first` puts the programs with the latest positions first (the query side's
/// longest-running programs under causality), otherwise the earliest first (the key side's).
/// `None` if a position does not fit in `i32` or `size` does not divide `kb`.
pub fn block_table(
    cu_seqlens: &[usize],
    size: usize,
    kb: usize,
    descending_first: bool,
) -> Option<Vec<TableRow>> {
    if size == 0 || !kb.is_multiple_of(size) {
        return None;
    }
    let (mut rows, mut block_row) = (vec![], 0usize);
    for w in cu_seqlens.windows(2) {
        let len = w[1].checked_sub(w[0])?;
        let (start, len_i) = (i32::try_from(w[0]).ok()?, i32::try_from(len).ok()?);
        for first in (0..len).step_by(size) {
            let row = i32::try_from(block_row + first / kb).ok()?;
            rows.push([start, len_i, i32::try_from(first).ok()?, row]);
        }
        block_row += len.div_ceil(kb);
    }
    if descending_first {
        rows.sort_by_key(|r| std::cmp::Reverse(r[2]));
    } else {
        rows.sort_by_key(|r| std::cmp::Reverse(r[1] - r[2]));
    }
    Some(rows)
}

/// A block list in the kernels' layout: `counts [rows]`, `indices [rows, width]` (entries
/// past a row's count are 0 and never read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceList {
    /// Entries per row.
    pub counts: Vec<i32>,
    /// `[rows, width]`, row-major.
    pub indices: Vec<i32>,
    /// The row width: the largest count (at least 1, so the tensor is never empty).
    pub width: usize,
}

impl DeviceList {
    /// The list of the compressed rows `keys[offsets[r] .. offsets[r + 1]]`. `None` if an id
    /// does not fit in `i32` or the offsets are not a running sum.
    pub fn from_rows(offsets: &[usize], keys: &[u32]) -> Option<DeviceList> {
        let width = offsets
            .windows(2)
            .map(|w| w[1].checked_sub(w[0]))
            .try_fold(1usize, |m, c| c.map(|c| m.max(c)))?;
        let rows = offsets.len().saturating_sub(1);
        let mut counts = Vec::with_capacity(rows);
        let mut indices = vec![0i32; rows * width];
        for r in 0..rows {
            let kept = keys.get(offsets[r]..offsets[r + 1])?;
            counts.push(i32::try_from(kept.len()).ok()?);
            for (slot, &k) in indices[r * width..].iter_mut().zip(kept) {
                *slot = i32::try_from(k).ok()?;
            }
        }
        Some(DeviceList {
            counts,
            indices,
            width,
        })
    }
}

/// The transpose of a forward list over square blocks (see the module doc): for list row
/// `g = r·heads + h` of key block row `r` (block `kb` of sequence `s`), the query blocks `qb`
/// of `s` whose row keeps `kb`, ascending. `blocks_per_seq[s]` is the number of blocks of
/// sequence `s`. Returns the compressed rows `(offsets, ids)`. `None` if the forward rows do
/// not match `blocks_per_seq` and `heads` or an id is out of range.
pub fn transpose(
    blocks_per_seq: &[usize],
    heads: usize,
    offsets: &[usize],
    keys: &[u32],
) -> Option<(Vec<usize>, Vec<u32>)> {
    let total: usize = blocks_per_seq.iter().sum();
    if offsets.len() != total * heads + 1 {
        return None;
    }
    let mut cols: Vec<Vec<u32>> = vec![vec![]; total * heads];
    let mut first = 0;
    for &n in blocks_per_seq {
        for qb in 0..n {
            for h in 0..heads {
                let g = (first + qb) * heads + h;
                for &kb in keys.get(offsets[g]..offsets[g + 1])? {
                    let kb = kb as usize;
                    if kb >= n {
                        return None;
                    }
                    cols[(first + kb) * heads + h].push(qb as u32);
                }
            }
        }
        first += n;
    }
    let mut t_offsets = vec![0];
    let mut t_ids = vec![];
    for c in cols {
        t_ids.extend(c);
        t_offsets.push(t_ids.len());
    }
    Some((t_offsets, t_ids))
}

/// Forward: for query block row `row` (a `BM = KB` block) and head `h`,
/// `o = softmax(scale · q·kᵀ)·v` over the causal keys of the kept key blocks
/// (`indices[row·heads + h, ..counts]`), and `lse2` as in
/// [`flash_fwd`](crate::flash_attention::flash_fwd). Each kept block is visited in `KB / BN`
/// steps of `BN` keys.
#[kernel(
    // Head dimension 128: 32-key steps (64 spill 32 bytes on sm_80 with the list's extra
    // indexing, where the dense kernel does not; 64-query programs of 4 warps spill 16).
    variants(T = [bf16, f16], D = [64, 128], BM = [128], BN = [32, 64, 128], KB = [128], S = [2, 3], W = [8], TMA = [0, 1]),
    only = [D == 64 || BN == 32, D == 128 || BN >= 64, D == 64 || S == 2],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [qblocks.dim(0), o.dim(1)],
    require = [
        qblocks.dim(1) == 4, qkv.dim(1) == 3 * o.dim(1), o.dim(0) == qkv.dim(0),
        qkv.dim(2) == o.dim(2), o.dim(2) <= D, lse2.dim(0) == o.dim(1),
        lse2.dim(1) >= qkv.dim(0), counts.dim(0) == indices.dim(0)
    ]
)]
pub fn sparse_flash_fwd<
    T,
    const D: usize,
    const BM: usize,
    const BN: usize,
    const KB: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    qkv: Tensor<T, 3>,
    qblocks: Tensor<i32, 2>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    scale_log2: f32,
    o: TensorMut<T, 3>,
    lse2: TensorMut<f32, 2>,
) {
    let blk = program_id(0);
    let head = program_id(1);
    let start = qblocks.load([blk, 0]);
    let len = qblocks.load([blk, 1]);
    let q0 = qblocks.load([blk, 2]);
    let nh = o.dim(1);
    let g = qblocks.load([blk, 3]) * nh + head;
    let qi = q0 + range::<BM>();
    let rows = start + qi;
    let c = range::<D>();
    let mut m = full::<f32, BM>(NEG_INFINITY);
    let mut l = zeros::<f32, BM>();
    let mut acc = zeros::<f32, BM, D>();
    for (_e, part, kb) in blocks(counts, indices, g, KB / BN) {
        let k0 = kb * KB + part * BN;
        let kj = k0 + range::<BN>();
        let krows = start + kj;
        // q is loop-invariant but loaded here so that it is streamed (see `flash_fwd`).
        let q = qkv.load([rows, head, c]);
        let k = qkv.load([krows, nh + head, c]);
        let mut s = dot(q, k.t(), zeros::<f32, BM, BN>());
        // Masked and scaled as in `flash_fwd`: the mask on the diagonal steps only, the
        // maximum in raw score units.
        if k0 + BN > q0 {
            s = select(kj.expand(0) <= qi.expand(1), s, NEG_INFINITY);
        }
        let m_new = max(m, s.reduce_max(1));
        let alpha = exp2((m - m_new) * scale_log2);
        let p = exp2(s * scale_log2 - (m_new * scale_log2).expand(1));
        l = l * alpha + p.sum(1);
        let v = qkv.load([krows, 2 * nh + head, c]);
        acc = dot(p.cast::<T>(), v, acc * alpha.expand(1));
        m = m_new;
    }
    // The diagonal block is always kept and visited in ascending order, so every stored row
    // has a visible key in its first step and `l >= 1`.
    let out_rows = select(qi < len, rows, qkv.dim(0));
    o.store([out_rows, head, c], (acc * (1.0 / l).expand(1)).cast::<T>());
    lse2.store(
        [head, select(qi < len, rows, lse2.dim(1))],
        m * scale_log2 + log2(l),
    );
}

/// Backward, `dk` and `dv` of one `BN`-key program (all or part of key block row `row`) and
/// head, visiting the query blocks that keep it (`indices_t[row·heads + h, ..counts_t]`, each
/// in `KB / BM` steps of `BM` queries), as in
/// [`flash_bwd_dkdv`](crate::flash_attention::flash_bwd_dkdv).
#[kernel(
    // W = 4: one warpgroup of 64 keys (heads of 64), as the dense kernel's short-batch tile.
    variants(T = [bf16, f16], D = [64, 128], BN = [64, 128], BM = [32, 64], KB = [128], S = [2, 3], W = [4, 8], TMA = [0, 1]),
    only = [
        BN % BM == 0, D == 64 || S == 2, D == 64 || BN == 64, D == 64 || BM == 32, D == 128 || BM == 64,
        W == 8 || (D == 64 && BN == 64)
    ],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [kblocks.dim(0), d_o.dim(1)],
    require = [
        kblocks.dim(1) == 4, qkv.dim(1) == 3 * d_o.dim(1), d_o.dim(0) == qkv.dim(0),
        d_o.dim(2) == qkv.dim(2), d_o.dim(2) <= D, lse2.dim(0) == d_o.dim(1),
        lse2.dim(1) >= qkv.dim(0), delta.dim(0) == lse2.dim(0), delta.dim(1) == lse2.dim(1),
        dqkv.dim(0) == qkv.dim(0), dqkv.dim(1) == qkv.dim(1), dqkv.dim(2) == qkv.dim(2),
        counts_t.dim(0) == indices_t.dim(0)
    ]
)]
pub fn sparse_flash_dkdv<
    T,
    const D: usize,
    const BN: usize,
    const BM: usize,
    const KB: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    qkv: Tensor<T, 3>,
    d_o: Tensor<T, 3>,
    lse2: Tensor<f32, 2>,
    delta: Tensor<f32, 2>,
    kblocks: Tensor<i32, 2>,
    counts_t: Tensor<i32, 1>,
    indices_t: Tensor<i32, 2>,
    scale_log2: f32,
    scale: f32,
    dqkv: TensorMut<T, 3>,
) {
    let blk = program_id(0);
    let head = program_id(1);
    let start = kblocks.load([blk, 0]);
    let len = kblocks.load([blk, 1]);
    let k0 = kblocks.load([blk, 2]);
    let nh = d_o.dim(1);
    let g = kblocks.load([blk, 3]) * nh + head;
    let kj = k0 + range::<BN>();
    let krows = start + kj;
    let c = range::<D>();
    let mut dk = zeros::<f32, BN, D>();
    let mut dv = zeros::<f32, BN, D>();
    for (_e, part, qb) in blocks(counts_t, indices_t, g, KB / BM) {
        let q0 = qb * KB + part * BM;
        let qi = q0 + range::<BM>();
        let qrows = start + qi;
        // The statistics before the MMAs, as in `flash_bwd_dkdv`.
        let l = lse2.load([head, qrows]);
        let dl = delta.load([head, qrows]);
        // k and v are loop-invariant but loaded here so that they are streamed.
        let k = qkv.load([krows, nh + head, c]);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let q = qkv.load([qrows, head, c]);
        let dout = d_o.load([qrows, head, c]);
        let st = dot(k, q.t(), zeros::<f32, BN, BM>());
        let mut pt = exp2(st * scale_log2 - l.expand(0));
        // Masked on the diagonal and the sequence's last steps only, as in `flash_bwd_dkdv`.
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

/// Backward, `dq` of one `BM`-query program (all or part of query block row `row`) and head,
/// over the kept key blocks of the forward list (each in `KB / BN` steps), as in
/// [`flash_bwd_dq`](crate::flash_attention::flash_bwd_dq).
#[kernel(
    // Head dimension 128: 32-query programs (64 spill 4 bytes on sm_80). W = 4: one warpgroup
    // of 64 queries (heads of 64), as the dense kernel's short-batch tile.
    variants(T = [bf16, f16], D = [64, 128], BM = [32, 64, 128], BN = [64], KB = [128], S = [2, 3], W = [4, 8], TMA = [0, 1]),
    only = [D == 64 || S == 2, D == 64 || BM == 32, D == 128 || BM >= 64, W == 8 || (D == 64 && BM == 64)],
    warps = W,
    stages = S,
    tma = TMA,
    grid = [qblocks.dim(0), d_o.dim(1)],
    require = [
        qblocks.dim(1) == 4, qkv.dim(1) == 3 * d_o.dim(1), d_o.dim(0) == qkv.dim(0),
        d_o.dim(2) == qkv.dim(2), d_o.dim(2) <= D, lse2.dim(0) == d_o.dim(1),
        lse2.dim(1) >= qkv.dim(0), delta.dim(0) == lse2.dim(0), delta.dim(1) == lse2.dim(1),
        dqkv.dim(0) == qkv.dim(0), dqkv.dim(1) == qkv.dim(1), dqkv.dim(2) == qkv.dim(2),
        counts.dim(0) == indices.dim(0)
    ]
)]
pub fn sparse_flash_dq<
    T,
    const D: usize,
    const BM: usize,
    const BN: usize,
    const KB: usize,
    const S: usize,
    const W: usize,
    const TMA: usize,
>(
    qkv: Tensor<T, 3>,
    d_o: Tensor<T, 3>,
    lse2: Tensor<f32, 2>,
    delta: Tensor<f32, 2>,
    qblocks: Tensor<i32, 2>,
    counts: Tensor<i32, 1>,
    indices: Tensor<i32, 2>,
    scale_log2: f32,
    scale: f32,
    dqkv: TensorMut<T, 3>,
) {
    let blk = program_id(0);
    let head = program_id(1);
    let start = qblocks.load([blk, 0]);
    let len = qblocks.load([blk, 1]);
    let q0 = qblocks.load([blk, 2]);
    let nh = d_o.dim(1);
    let g = qblocks.load([blk, 3]) * nh + head;
    let qi = q0 + range::<BM>();
    let rows = start + qi;
    let c = range::<D>();
    let l = lse2.load([head, rows]);
    let dl = delta.load([head, rows]);
    let mut dq = zeros::<f32, BM, D>();
    for (_e, part, kb) in blocks(counts, indices, g, KB / BN) {
        let k0 = kb * KB + part * BN;
        let kj = k0 + range::<BN>();
        let krows = start + kj;
        // q and dO are loop-invariant but loaded here so that they are streamed.
        let q = qkv.load([rows, head, c]);
        let dout = d_o.load([rows, head, c]);
        let k = qkv.load([krows, nh + head, c]);
        let v = qkv.load([krows, 2 * nh + head, c]);
        let s = dot(q, k.t(), zeros::<f32, BM, BN>());
        let mut p = exp2(s * scale_log2 - l.expand(1));
        // Masked on the diagonal steps only, as in `flash_bwd_dq`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tables_name_the_block_row_of_each_program() {
        // Sequences of 300 and 100 tokens: blocks of 128 → rows 0..3 and 3.
        let t = block_table(&[0, 300, 400], 64, 128, false).unwrap();
        let mut got: Vec<TableRow> = t.clone();
        got.sort();
        assert_eq!(
            got,
            vec![
                [0, 300, 0, 0],
                [0, 300, 64, 0],
                [0, 300, 128, 1],
                [0, 300, 192, 1],
                [0, 300, 256, 2],
                [300, 100, 0, 3],
                [300, 100, 64, 3],
            ]
        );
        assert_eq!(t[0], [0, 300, 0, 0], "most remaining positions first");
        assert!(block_table(&[0, 10], 96, 128, true).is_none());
    }

    #[test]
    fn transpose_inverts_the_forward_rows() {
        // One sequence of 3 blocks, 2 heads: row (qb, h) keeps the listed key blocks.
        let rows: [&[u32]; 6] = [&[0], &[0], &[0, 1], &[1], &[2], &[0, 2]];
        let mut offsets = vec![0];
        let keys: Vec<u32> = rows.iter().flat_map(|r| r.to_vec()).collect();
        for r in rows {
            offsets.push(offsets.last().unwrap() + r.len());
        }
        let (to, ti) = transpose(&[3], 2, &offsets, &keys).unwrap();
        let col = |g: usize| ti[to[g]..to[g + 1]].to_vec();
        assert_eq!(col(0), vec![0, 1], "key block 0, head 0");
        assert_eq!(col(1), vec![0, 2], "key block 0, head 1");
        assert_eq!(col(2), vec![1], "key block 1, head 0");
        assert_eq!(col(3), vec![1], "key block 1, head 1");
        assert_eq!(col(4), vec![2]);
        assert_eq!(col(5), vec![2]);
        let l = DeviceList::from_rows(&offsets, &keys).unwrap();
        assert_eq!((l.width, l.counts.clone()), (2, vec![1, 1, 2, 1, 1, 2]));
        assert_eq!(&l.indices[4..6], &[0, 1]);
        assert!(transpose(&[2], 2, &offsets, &keys).is_none(), "shape");
    }
}
