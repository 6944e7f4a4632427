//! Exact block-pooled attention maps (DESIGN.md §7, attention step 1): for every (sequence,
//! query block, head), how much of the causal softmax's probability falls in each key block.
//!
//! Row `(s, qb, h)` holds one entry per causal key block `kb` of that query block (key blocks
//! `0 .. hi`, [`causal_range`]): `Σ_{i ∈ qb} Σ_{j ∈ kb, j ≤ i} softmax_i(j) / |qb|`, the mean
//! over the block's queries of the probability mass on the key block. A row therefore sums to 1.
//! Rows are ordered as the rows of an [`AttentionMask`] (sequence, query block, head), and
//! blocks are sequence-relative, so a map and a mask of the same batch line up row for row.
//!
//! The maps are what the exposer profiles, what the predictor learns, and the ground truth the
//! selection's recall is measured against.

use crate::cpu::matmul;
use crate::model::{AttentionInput, AttentionMask};
use rayon::prelude::*;

/// `(lo, hi)`: query block `qb` of a `len`-token sequence sees key blocks `0 .. hi` causally,
/// and key blocks `lo .. hi` hold its own positions (the diagonal, always kept).
pub fn causal_range(qb: usize, len: usize, q_block: usize, k_block: usize) -> (usize, usize) {
    let (first, end) = (qb * q_block, ((qb + 1) * q_block).min(len));
    (first / k_block, end.div_ceil(k_block))
}

/// The row layout shared by maps, scores and masks of one batch: one row per (sequence, query
/// block, head), each row as long as its causal key blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct RowLayout {
    /// Query rows per block.
    pub q_block: usize,
    /// Keys per block.
    pub k_block: usize,
    /// Attention heads.
    pub heads: usize,
    /// Sequence lengths.
    pub lens: Vec<usize>,
    /// `[rows + 1]` start of each row's entries.
    pub offsets: Vec<usize>,
    /// Per row: `(sequence, query block, head)`.
    pub index: Vec<(usize, usize, usize)>,
}

impl RowLayout {
    /// The layout of a packed batch with sequence boundaries `cu_seqlens`.
    pub fn new(cu_seqlens: &[i32], heads: usize, q_block: usize, k_block: usize) -> RowLayout {
        let lens: Vec<usize> = cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]).max(0) as usize)
            .collect();
        let (mut offsets, mut index) = (vec![0], vec![]);
        for (s, &len) in lens.iter().enumerate() {
            for qb in 0..len.div_ceil(q_block) {
                let hi = causal_range(qb, len, q_block, k_block).1;
                for h in 0..heads {
                    offsets.push(offsets[offsets.len() - 1] + hi);
                    index.push((s, qb, h));
                }
            }
        }
        RowLayout {
            q_block,
            k_block,
            heads,
            lens,
            offsets,
            index,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.index.len()
    }

    /// Entries of all rows (the causal blocks a dense attention visits).
    pub fn entries(&self) -> usize {
        self.offsets[self.rows()]
    }

    /// `(lo, hi)` of row `r` ([`causal_range`]).
    pub fn range(&self, r: usize) -> (usize, usize) {
        let (s, qb, _) = self.index[r];
        causal_range(qb, self.lens[s], self.q_block, self.k_block)
    }

    /// Queries in row `r`'s block (the last block of a sequence may be short).
    pub fn queries(&self, r: usize) -> usize {
        let (s, qb, _) = self.index[r];
        (self.lens[s] - qb * self.q_block).min(self.q_block)
    }
}

/// Block-pooled attention mass of one layer on one batch (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockMaps {
    /// Which row is which.
    pub layout: RowLayout,
    /// Entry `offsets[r] + kb`: the mean mass of row `r`'s queries on key block `kb`.
    pub mass: Vec<f32>,
}

impl BlockMaps {
    /// Row `r`'s masses, one per causal key block.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.mass[self.layout.offsets[r]..self.layout.offsets[r + 1]]
    }

    /// `(kept, total)`: the dense attention mass `mask` keeps, summed over query tokens (each
    /// row weighs its queries), and all of it (= the number of queries per head).
    ///
    /// # Panics
    /// If `mask` was made for another batch layout (a programming error).
    pub fn mass_kept(&self, mask: &AttentionMask) -> (f64, f64) {
        assert_eq!(mask.num_rows(), self.layout.rows(), "mask and maps rows");
        let (mut kept, mut total) = (0.0f64, 0.0f64);
        for r in 0..self.layout.rows() {
            let w = self.layout.queries(r) as f64;
            let row = self.row(r);
            kept += w * mask
                .kept(r)
                .iter()
                .map(|&kb| row.get(kb as usize).copied().unwrap_or(0.0) as f64)
                .sum::<f64>();
            total += w * row.iter().map(|&m| m as f64).sum::<f64>();
        }
        (kept, total)
    }

    /// Kept share of the dense attention mass under `mask` (1 for an empty batch).
    pub fn recall(&self, mask: &AttentionMask) -> f64 {
        let (k, t) = self.mass_kept(mask);
        if t > 0.0 {
            k / t
        } else {
            1.0
        }
    }
}

/// Columns of head `h` for positions `lo .. hi`, gathered into `[hi − lo, d]`.
pub(crate) fn head_slice(
    x: &[f32],
    heads: usize,
    d: usize,
    h: usize,
    lo: usize,
    hi: usize,
) -> Vec<f32> {
    let width = heads * d;
    let mut out = Vec::with_capacity((hi - lo) * d);
    for t in lo..hi {
        out.extend_from_slice(&x[t * width + h * d..t * width + (h + 1) * d]);
    }
    out
}

/// The exact maps of `input` with blocks of `q_block` queries and `k_block` keys. Scores are
/// `q·kᵀ` in f32 (as the model computes them), the softmax and the sums in f64.
pub fn block_maps(input: &AttentionInput<'_>, q_block: usize, k_block: usize) -> BlockMaps {
    let (heads, d) = (input.heads, input.head_dim);
    let layout = RowLayout::new(input.cu_seqlens, heads, q_block, k_block);
    let starts: Vec<usize> = input
        .cu_seqlens
        .iter()
        .map(|&c| c.max(0) as usize)
        .collect();
    let jobs: Vec<(usize, usize)> = (0..layout.lens.len())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    // Per (sequence, head): per query block, its causal key-block masses.
    let per: Vec<Vec<Vec<f64>>> = jobs
        .par_iter()
        .map(|&(s, h)| {
            let (lo, len) = (starts[s], layout.lens[s]);
            let q = head_slice(input.q, heads, d, h, lo, lo + len);
            let k = head_slice(input.k, heads, d, h, lo, lo + len);
            let mut out = Vec::with_capacity(len.div_ceil(q_block));
            let mut scores = vec![0.0f32; q_block * len];
            for qb in 0..len.div_ceil(q_block) {
                let (q0, q1) = (qb * q_block, ((qb + 1) * q_block).min(len));
                let (nq, nk) = (q1 - q0, q1);
                let sc = &mut scores[..nq * nk];
                matmul(
                    sc,
                    &q[q0 * d..q1 * d],
                    &k[..nk * d],
                    nq,
                    d,
                    nk,
                    false,
                    true,
                    1.0,
                    0.0,
                );
                let hi = causal_range(qb, len, q_block, k_block).1;
                let mut row = vec![0.0f64; hi];
                for i in 0..nq {
                    let s_i = &sc[i * nk..i * nk + q0 + i + 1];
                    let m = s_i.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    let z: f64 = s_i.iter().map(|&v| (v as f64 - m).exp()).sum();
                    for (j, &v) in s_i.iter().enumerate() {
                        row[j / k_block] += (v as f64 - m).exp() / z;
                    }
                }
                row.iter_mut().for_each(|v| *v /= nq as f64);
                out.push(row);
            }
            out
        })
        .collect();
    let mut mass = vec![0.0f32; layout.entries()];
    for (r, &(s, qb, h)) in layout.index.iter().enumerate() {
        let src = &per[s * heads + h][qb];
        for (dst, &v) in mass[layout.offsets[r]..layout.offsets[r + 1]]
            .iter_mut()
            .zip(src)
        {
            *dst = v as f32;
        }
    }
    BlockMaps { layout, mass }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    pub(crate) fn random(n: usize, scale: f32, rng: &mut SplitMix64) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn maps_match_a_naive_f64_softmax_on_a_packed_batch() {
        let mut rng = SplitMix64::new(7);
        let (heads, d) = (3, 8);
        let cu = [0i32, 70, 75, 200];
        let t = 200;
        let q = random(t * heads * d, 1.5, &mut rng);
        let k = random(t * heads * d, 1.5, &mut rng);
        let input = AttentionInput {
            q: &q,
            k: &k,
            cu_seqlens: &cu,
            heads,
            head_dim: d,
        };
        let (qbs, kbs) = (32, 16);
        let maps = block_maps(&input, qbs, kbs);
        assert_eq!(maps.layout.rows(), (3 + 1 + 4) * heads);
        for (r, &(s, qb, h)) in maps.layout.index.iter().enumerate() {
            let (lo, len) = (cu[s] as usize, maps.layout.lens[s]);
            let (q0, q1) = (qb * qbs, ((qb + 1) * qbs).min(len));
            let mut want = vec![0.0f64; maps.row(r).len()];
            for i in q0..q1 {
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|c| {
                                q[(lo + i) * heads * d + h * d + c] as f64
                                    * k[(lo + j) * heads * d + h * d + c] as f64
                            })
                            .sum()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
                for (j, v) in sc.iter().enumerate() {
                    want[j / kbs] += (v - m).exp() / z / (q1 - q0) as f64;
                }
            }
            let got = maps.row(r);
            assert_eq!(got.len(), causal_range(qb, len, qbs, kbs).1);
            for (a, b) in got.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-5, "row {r}: {got:?} vs {want:?}");
            }
            let sum: f64 = got.iter().map(|&v| v as f64).sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
        // Recall: the dense mask keeps everything, the diagonal-only mask its share.
        let dense = AttentionMask::dense(&cu, heads, qbs, kbs);
        assert!((maps.recall(&dense) - 1.0).abs() < 1e-9);
        let diag = AttentionMask::from_fn(&cu, heads, qbs, kbs, |_, _, _, _| false);
        let (kept, total) = maps.mass_kept(&diag);
        assert!((total - (t * heads) as f64).abs() < 1e-2);
        let mut want = 0.0;
        for r in 0..maps.layout.rows() {
            let (lo, hi) = maps.layout.range(r);
            want += maps.layout.queries(r) as f64
                * maps.row(r)[lo..hi].iter().map(|&v| v as f64).sum::<f64>();
        }
        assert!((kept - want).abs() < 1e-6 * total && kept < total * 0.99);
    }
}
