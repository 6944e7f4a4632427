//! Balanced clustering of a layer's neurons by co-activation (DESIGN.md §7, MLP step 2): the
//! structure-making half of the exposer. Neurons that fire together land in the same block, so
//! a token's activation mass concentrates in fewer blocks.
//!
//! The algorithm is the fixtures' `recipe/explore_sparsity.py` `balanced_kmeans`, computed from
//! the co-activation Gram matrix alone ([`super::coactivation`]). There, the rows are the
//! neurons' L2-normalised activity vectors `x_i`; `k = ffn / block` centroids start as `k`
//! distinct random rows; each iteration scores `S[i, c] = x_i · C_c`, assigns neurons greedily
//! (in descending order of their best score, each to its best cluster that still has room, every
//! cluster holding exactly `block` neurons), and resets `C_c = m_c / (‖m_c‖ + 1e-9)` with `m_c`
//! the mean of its members. With `N[i, j] = x_i · x_j` (the cosine matrix):
//!
//! - initial scores: `S[i, c] = N[i, seed_c]`;
//! - afterwards: `S[i, c] = Σ_{j∈c} N[i, j] / (√(Σ_{j,l∈c} N[j, l]) + block·1e-9)`, since
//!   `m_c = (1/block)·Σ_{j∈c} x_j` and `‖m_c‖ = √(Σ_{j,l∈c} N[j, l]) / block`.
//!
//! The assignment of the last iteration is returned. Ties (for example the all-zero scores of
//! never-active neurons) go to the lower neuron index first and then to the lower cluster index.

use crate::data::SplitMix64;
use rayon::prelude::*;

/// The recipe's number of k-means iterations.
pub const DEFAULT_ITERS: usize = 15;

/// Errors of the clustering.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClusterError {
    /// The neuron count is not a positive multiple of the block size.
    #[error("ffn {ffn} is not a positive multiple of the block size {block}")]
    Block {
        /// Neurons.
        ffn: usize,
        /// Neurons per block.
        block: usize,
    },
    /// The similarity matrix is not `[ffn, ffn]`.
    #[error("similarity matrix of length {len} is not [{ffn}, {ffn}]")]
    Shape {
        /// Length given.
        len: usize,
        /// Neurons.
        ffn: usize,
    },
}

/// Balanced k-means of `ffn` neurons into clusters of exactly `block`, from their cosine
/// similarity matrix `cosine` (`[ffn, ffn]`, e.g. [`Coactivation::cosine`]), with `iters`
/// assignment steps and initial centroids drawn with `seed`. Returns each neuron's cluster.
///
/// [`Coactivation::cosine`]: super::coactivation::Coactivation::cosine
pub fn balanced_kmeans(
    cosine: &[f64],
    ffn: usize,
    block: usize,
    iters: usize,
    seed: u64,
) -> Result<Vec<usize>, ClusterError> {
    if block == 0 || ffn == 0 || !ffn.is_multiple_of(block) {
        return Err(ClusterError::Block { ffn, block });
    }
    if cosine.len() != ffn * ffn {
        return Err(ClusterError::Shape {
            len: cosine.len(),
            ffn,
        });
    }
    let k = ffn / block;
    // Initial centroids: the first k of a seeded random permutation of the neurons.
    let mut order: Vec<usize> = (0..ffn).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    let seeds = &order[..k];
    let mut scores: Vec<f64> = (0..ffn)
        .flat_map(|i| seeds.iter().map(move |&s| cosine[i * ffn + s]))
        .collect();
    let mut assign = vec![0usize; ffn];
    for it in 0..iters.max(1) {
        assign = greedy_assign(&scores, ffn, k, block);
        if it + 1 < iters.max(1) {
            scores = centroid_scores(cosine, &assign, ffn, k, block);
        }
    }
    Ok(assign)
}

/// Capacity-limited greedy assignment: neurons in descending order of their best score, each
/// to its best-scoring cluster with room left (`scores` is `[ffn, k]`).
fn greedy_assign(scores: &[f64], ffn: usize, k: usize, cap: usize) -> Vec<usize> {
    let best: Vec<f64> = scores
        .chunks(k)
        .map(|r| r.iter().copied().fold(f64::NEG_INFINITY, f64::max))
        .collect();
    let mut order: Vec<usize> = (0..ffn).collect();
    order.sort_by(|&a, &b| best[b].total_cmp(&best[a]).then(a.cmp(&b)));
    let mut left = vec![cap; k];
    let mut assign = vec![0usize; ffn];
    for i in order {
        let row = &scores[i * k..(i + 1) * k];
        let mut pick = None;
        for (c, &s) in row.iter().enumerate() {
            if left[c] > 0 && pick.is_none_or(|p: usize| s > row[p]) {
                pick = Some(c);
            }
        }
        // Capacities sum to ffn, so a cluster with room always exists.
        let c = pick.unwrap_or(0);
        left[c] = left[c].saturating_sub(1);
        assign[i] = c;
    }
    assign
}

/// Scores of every neuron against every cluster's normalised mean (module documentation).
fn centroid_scores(
    cosine: &[f64],
    assign: &[usize],
    ffn: usize,
    k: usize,
    block: usize,
) -> Vec<f64> {
    // sums[i, c] = Σ_{j∈c} N[i, j].
    let mut sums = vec![0.0f64; ffn * k];
    sums.par_chunks_mut(k).enumerate().for_each(|(i, out)| {
        let row = &cosine[i * ffn..(i + 1) * ffn];
        for (j, &v) in row.iter().enumerate() {
            out[assign[j]] += v;
        }
    });
    // ‖Σ_{j∈c} x_j‖² = Σ_{j∈c} sums[j, c].
    let mut sq = vec![0.0f64; k];
    for (j, &c) in assign.iter().enumerate() {
        sq[c] += sums[j * k + c];
    }
    let denom: Vec<f64> = sq
        .iter()
        .map(|&s| s.max(0.0).sqrt() + block as f64 * 1e-9)
        .collect();
    for row in sums.chunks_mut(k) {
        for (v, d) in row.iter_mut().zip(&denom) {
            *v /= d;
        }
    }
    sums
}

/// The neuron order that puts each cluster's members together: new position -> old neuron,
/// clusters in ascending id, members in ascending neuron index (the recipe's stable
/// `assign.argsort()`).
pub fn cluster_order(assign: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..assign.len()).collect();
    order.sort_by_key(|&i| (assign[i], i));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_respects_capacity_and_preference() {
        // 4 neurons, 2 clusters of 2: neurons 0, 1, 2 all prefer cluster 0; 2 is weakest.
        let scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.1, 0.2];
        assert_eq!(greedy_assign(&scores, 4, 2, 2), vec![0, 0, 1, 1]);
        assert_eq!(cluster_order(&[1, 0, 1, 0]), vec![1, 3, 0, 2]);
    }
}
