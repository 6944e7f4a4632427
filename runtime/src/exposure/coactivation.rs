//! Co-activation counts of one layer's neurons (DESIGN.md §7, MLP step 1): the Gram matrix
//! `G = Xᵀ·X` of the binary activity matrix `X` (`X[t, i] = 1` when neuron `i`'s activation on
//! token `t` is `> 0`), accumulated over batches. `G[i, j]` counts the tokens on which neurons
//! `i` and `j` are both active; `G[i, i]` counts neuron `i`'s active tokens.
//!
//! The balanced clustering ([`super::cluster`]) needs nothing else: the cosine similarity of two
//! neurons' activity vectors is `G[i, j] / √(G[i, i]·G[j, j])`.

use crate::cpu::matmul::matmul;

/// Rows per product: each product's counts are at most this, exact in f32 (`< 2^24`).
const CHUNK_ROWS: usize = 8192;

/// Errors of the co-activation accumulator.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoactivationError {
    /// The activations are not `[rows, ffn]`.
    #[error("activations of length {len} are not [{rows}, {ffn}]")]
    Shape {
        /// Length given.
        len: usize,
        /// Rows claimed.
        rows: usize,
        /// Neurons.
        ffn: usize,
    },
}

/// The co-activation Gram matrix of one layer, summed over every batch added.
#[derive(Clone, Debug, PartialEq)]
pub struct Coactivation {
    ffn: usize,
    tokens: u64,
    /// `[ffn, ffn]`, row-major, symmetric.
    counts: Vec<f64>,
}

impl Coactivation {
    /// Zero counts for `ffn` neurons.
    pub fn new(ffn: usize) -> Coactivation {
        Coactivation {
            ffn,
            tokens: 0,
            counts: vec![0.0; ffn * ffn],
        }
    }

    /// Neurons.
    pub fn ffn(&self) -> usize {
        self.ffn
    }

    /// Tokens added so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The counts `G` (`[ffn, ffn]`, row-major). Whole numbers, exact below 2^53 tokens.
    pub fn gram(&self) -> &[f64] {
        &self.counts
    }

    /// Adds `act` (`[rows, ffn]`, dense activations; only their sign matters).
    pub fn add(&mut self, act: &[f32], rows: usize) -> Result<(), CoactivationError> {
        let f = self.ffn;
        if act.len() != rows * f {
            return Err(CoactivationError::Shape {
                len: act.len(),
                rows,
                ffn: f,
            });
        }
        let mut part = vec![0.0f32; f * f];
        for chunk in act.chunks(CHUNK_ROWS * f.max(1)) {
            let r = chunk.len() / f.max(1);
            let x: Vec<f32> = chunk.iter().map(|&v| (v > 0.0) as u8 as f32).collect();
            // part[f, f] = xᵀ·x: op(a) = xᵀ (stored [r, f], transposed), op(b) = x.
            matmul(&mut part, &x, &x, f, r, f, true, false, 1.0, 0.0);
            for (c, p) in self.counts.iter_mut().zip(&part) {
                *c += *p as f64;
            }
        }
        self.tokens += rows as u64;
        Ok(())
    }

    /// Adds another accumulator's counts (same `ffn`).
    pub fn merge(&mut self, other: &Coactivation) {
        debug_assert_eq!(self.ffn, other.ffn);
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        self.tokens += other.tokens;
    }

    /// The cosine similarities of the neurons' activity vectors (`[ffn, ffn]`): the Gram
    /// matrix of the L2-normalised rows of `Xᵀ`. A never-active neuron's vector is zero (as
    /// the recipe's `x / (‖x‖ + 1e-9)` makes it), so its similarities are zero.
    pub fn cosine(&self) -> Vec<f64> {
        let f = self.ffn;
        let inv: Vec<f64> = (0..f)
            .map(|i| {
                let d = self.counts[i * f + i];
                if d > 0.0 {
                    1.0 / d.sqrt()
                } else {
                    0.0
                }
            })
            .collect();
        let mut out = self.counts.clone();
        for (i, row) in out.chunks_mut(f.max(1)).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v *= inv[i] * inv[j];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    #[test]
    fn gram_matches_naive_counts_over_batches() {
        let (f, rows) = (37, 50);
        let mut rng = SplitMix64::new(7);
        let mut acc = Coactivation::new(f);
        let mut all = Vec::new();
        for _ in 0..3 {
            let act: Vec<f32> = (0..rows * f)
                .map(|_| {
                    let u = rng.below(100) as f32;
                    if u < 70.0 {
                        0.0
                    } else {
                        u - 70.0 + 0.5
                    }
                })
                .collect();
            acc.add(&act, rows).unwrap();
            all.extend(act);
        }
        let t = all.len() / f;
        for i in 0..f {
            for j in 0..f {
                let n = (0..t)
                    .filter(|&r| all[r * f + i] > 0.0 && all[r * f + j] > 0.0)
                    .count();
                assert_eq!(acc.gram()[i * f + j], n as f64, "({i}, {j})");
            }
        }
        assert_eq!(acc.tokens(), 150);
        let cos = acc.cosine();
        for i in 0..f {
            if acc.gram()[i * f + i] > 0.0 {
                assert!((cos[i * f + i] - 1.0).abs() < 1e-12);
            }
        }
        assert!(acc.add(&all[..10], 1).is_err());
    }
}
