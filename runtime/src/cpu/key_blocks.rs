//! [`KeyBlocks`]: which key blocks each (segment, query block, head) of a packed batch's
//! attention keeps, the CPU attention's view of a block-sparse attention mask.
//!
//! The CPU backend knows nothing of exposure (module `model` builds on `cpu`, not the other way
//! round), so the mask reaches [`attention_fwd_masked`](super::attention_fwd_masked) as this
//! plain borrowed view of the arrays: the model's `AttentionMask` lends its own
//! (`AttentionMask::key_blocks`), with no copy. The layout is the mask's: rows ordered segment,
//! then query block, then head; row `r` keeps the ascending, segment-relative key-block ids
//! `keys[offsets[r] .. offsets[r + 1]]`.
//!
//! The semantics are those of the block-sparse flash attention: a dropped key block's scores
//! are −∞, the softmax normalises over the kept causal keys, the backward is exact given the
//! mask. Every row must keep its *diagonal* blocks (those holding its own query positions), so
//! every query sees at least itself; [`KeyBlocks::rows_of`] checks that and the rest of the
//! layout, so a malformed mask is an error instead of a panic or a NaN.

use super::CpuError;

/// Kept key blocks per (segment, query block, head): a borrowed view of a block mask.
#[derive(Clone, Copy, Debug)]
pub struct KeyBlocks<'a> {
    /// Query rows per block (any size ≥ 1).
    pub q_block: usize,
    /// Keys per block (any size ≥ 1).
    pub k_block: usize,
    /// Attention heads the mask was made for.
    pub heads: usize,
    /// `[rows + 1]` start of each row in `keys`.
    pub offsets: &'a [usize],
    /// Kept key-block ids, row after row, ascending within a row.
    pub keys: &'a [u32],
}

impl<'a> KeyBlocks<'a> {
    /// Checks the mask against the segments `(start, len)` of a batch and `nh` heads, and
    /// returns the first row of each segment (row of `(s, qb, h)` is `first[s] + qb·nh + h`).
    ///
    /// # Errors
    /// [`CpuError::KeyBlocks`] naming the first rule broken: head count, block sizes, row
    /// count, offsets not a running sum, ids not ascending or past the causal range, or a
    /// missing diagonal block.
    pub(crate) fn rows_of(
        &self,
        segs: &[(usize, usize)],
        nh: usize,
    ) -> Result<Vec<usize>, CpuError> {
        let bad = |m: String| Err(CpuError::KeyBlocks(m));
        if self.heads != nh {
            return bad(format!(
                "made for {} heads, the attention has {nh}",
                self.heads
            ));
        }
        if self.q_block == 0 || self.k_block == 0 {
            return bad("zero block size".into());
        }
        let mut first = Vec::with_capacity(segs.len());
        let mut rows = 0;
        for &(_, len) in segs {
            first.push(rows);
            rows += len.div_ceil(self.q_block) * nh;
        }
        if self.offsets.len() != rows + 1 {
            return bad(format!(
                "{} rows, the batch needs {rows}",
                self.offsets.len().saturating_sub(1)
            ));
        }
        if self.offsets[0] != 0
            || self.offsets.windows(2).any(|w| w[1] < w[0])
            || self.offsets[rows] != self.keys.len()
        {
            return bad("offsets are not a running sum of the keys".into());
        }
        for (s, &(_, len)) in segs.iter().enumerate() {
            for qb in 0..len.div_ceil(self.q_block) {
                let (lo, hi) = self.diagonal(qb, len);
                for h in 0..nh {
                    let kept = self.kept(first[s] + qb * nh + h);
                    let at = || format!("segment {s}, query block {qb}, head {h}");
                    if kept.windows(2).any(|w| w[1] <= w[0]) {
                        return bad(format!("{}: ids not ascending", at()));
                    }
                    if kept.last().is_some_and(|&k| k as usize >= hi) {
                        return bad(format!("{}: a block past the causal range", at()));
                    }
                    // Ascending ids below `hi`: the diagonal `lo..hi` is present iff the
                    // `hi − lo`-th id from the end is `lo`.
                    let n = hi - lo;
                    if kept.len() < n || kept[kept.len() - n] as usize != lo {
                        return bad(format!("{}: a diagonal block is missing", at()));
                    }
                }
            }
        }
        Ok(first)
    }

    /// The kept key blocks of row `r` (after [`rows_of`](Self::rows_of) accepted the mask).
    pub(crate) fn kept(&self, r: usize) -> &'a [u32] {
        &self.keys[self.offsets[r]..self.offsets[r + 1]]
    }

    /// `(lo, hi)`: query block `qb` of a `len`-token segment sees key blocks `0..hi` causally;
    /// `lo..hi` hold its own positions.
    fn diagonal(&self, qb: usize, len: usize) -> (usize, usize) {
        let (first, end) = (qb * self.q_block, ((qb + 1) * self.q_block).min(len));
        (first / self.k_block, end.div_ceil(self.k_block))
    }
}

/// The key positions `[a, b)` that the kept blocks `kept` (ascending) give query rows below
/// `r1`, into `ranges`: blocks merged where adjacent, clipped to `r1`. Returns whether they are
/// the whole causal prefix `0..r1` (the rows attend densely).
pub(crate) fn key_ranges(
    kept: &[u32],
    k_block: usize,
    r1: usize,
    ranges: &mut Vec<(usize, usize)>,
) -> bool {
    ranges.clear();
    for &kb in kept {
        let a = kb as usize * k_block;
        if a >= r1 {
            break;
        }
        let b = (a + k_block).min(r1);
        match ranges.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => ranges.push((a, b)),
        }
    }
    ranges.as_slice() == [(0, r1)]
}
