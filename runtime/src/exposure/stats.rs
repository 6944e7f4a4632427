//! Activation statistics of one layer's MLP (DESIGN.md §7, MLP step 1): how much of the ReLU
//! sparsity survives at GPU-friendly granularities, under a given neuron order.
//!
//! The definitions are those of the fixtures' `recipe/explore_sparsity.py` (whose numbers the
//! fixture README's table reports), computed from dense activations `act` (`[tokens, ffn]`,
//! row-major) with neurons read in the order `perm` (new position -> old neuron; the identity
//! when absent) and cut into blocks of `block` consecutive (new) positions:
//!
//! - **zero fraction** ([`zero_fraction`]): share of (token, neuron) pairs that are not `> 0`;
//! - **any**: share of (token, block) pairs with at least one activation `> 0`;
//! - **m99 / m999**: per token, the block masses (sums of the block's activations) sorted in
//!   descending order; the number of blocks needed for their running sum to reach 99% (99.9%)
//!   of the token's total mass, as a share of the blocks; averaged over tokens. A token of zero
//!   mass needs no block (the recipe's `+1e-9` guard gives it all blocks plus one; such tokens
//!   do not occur in the fixtures);
//! - **tiles of `t` tokens**: consecutive runs of `t` tokens of one batch (a batch's last run
//!   may be shorter) x one block; share of such tiles with any activation `> 0`;
//! - **batch union**: per forward batch (one [`BlockAccumulator::add`] call), share of blocks
//!   with any activation `> 0` in any token of the batch; averaged over batches.
//!
//! [`BlockAccumulator`] streams these over batches: counts are summed and turned into shares
//! by [`BlockAccumulator::finish`].

use rayon::prelude::*;
use serde::Serialize;

/// The activation-mass targets reported (the recipe's `mass0.99` and `mass0.999`).
pub const MASS_TARGETS: [f64; 2] = [0.99, 0.999];

/// The token-tile heights reported (the recipe's `tile16` and `tile64`).
pub const TILE_ROWS: [usize; 2] = [16, 64];

/// Errors of the statistics: shapes that do not fit together.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatsError {
    /// The neuron count is not a multiple of the block size (or either is zero).
    #[error("ffn {ffn} is not a positive multiple of the block size {block}")]
    Block {
        /// Neurons.
        ffn: usize,
        /// Neurons per block.
        block: usize,
    },
    /// The neuron order is not a permutation of `0..ffn`.
    #[error("neuron order of length {len} is not a permutation of 0..{ffn}")]
    Order {
        /// Its length.
        len: usize,
        /// Neurons.
        ffn: usize,
    },
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
    /// A tile height of zero.
    #[error("tile heights must be positive")]
    Tile,
}

/// Share of activations that are not `> 0` (for ReLU outputs: exactly zero).
pub fn zero_fraction(act: &[f32]) -> f64 {
    if act.is_empty() {
        return 0.0;
    }
    let zeros: usize = act
        .par_chunks(1 << 16)
        .map(|c| c.iter().filter(|&&v| v <= 0.0 || v.is_nan()).count())
        .sum();
    zeros as f64 / act.len() as f64
}

/// The block statistics of one layer at one block size and neuron order, as shares in `[0, 1]`
/// (definitions in the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockStats {
    /// Neurons per block.
    pub block: usize,
    /// Tokens measured.
    pub tokens: u64,
    /// Share of (token, block) pairs with any activation `> 0`.
    pub any: f64,
    /// Mean share of blocks needed to hold 99% of a token's activation mass.
    pub m99: f64,
    /// Mean share of blocks needed to hold 99.9% of a token's activation mass.
    pub m999: f64,
    /// `(tile height in tokens, share of active tiles)`, one per height asked for.
    pub tiles: Vec<(usize, f64)>,
    /// Mean over batches of the share of blocks active anywhere in the batch.
    pub batch_union: f64,
}

/// Streams [`BlockStats`] over batches of activations.
#[derive(Clone, Debug)]
pub struct BlockAccumulator {
    ffn: usize,
    block: usize,
    perm: Vec<usize>,
    tile_rows: Vec<usize>,
    tokens: u64,
    active_pairs: u64,
    need: [u64; 2],
    tiles: Vec<(u64, u64)>,
    batches: u64,
    union_active: u64,
}

impl BlockAccumulator {
    /// An empty accumulator for `ffn` neurons in blocks of `block`, read in the order `perm`
    /// (new position -> old neuron; `None`: the identity), with token tiles of `tile_rows`.
    pub fn new(
        ffn: usize,
        block: usize,
        perm: Option<&[usize]>,
        tile_rows: &[usize],
    ) -> Result<BlockAccumulator, StatsError> {
        if block == 0 || ffn == 0 || !ffn.is_multiple_of(block) {
            return Err(StatsError::Block { ffn, block });
        }
        if tile_rows.contains(&0) {
            return Err(StatsError::Tile);
        }
        let perm = match perm {
            Some(p) => {
                let mut seen = vec![false; ffn];
                if p.len() != ffn
                    || !p
                        .iter()
                        .all(|&o| o < ffn && !std::mem::replace(&mut seen[o], true))
                {
                    return Err(StatsError::Order { len: p.len(), ffn });
                }
                p.to_vec()
            }
            None => (0..ffn).collect(),
        };
        Ok(BlockAccumulator {
            ffn,
            block,
            perm,
            tile_rows: tile_rows.to_vec(),
            tokens: 0,
            active_pairs: 0,
            need: [0; 2],
            tiles: vec![(0, 0); tile_rows.len()],
            batches: 0,
            union_active: 0,
        })
    }

    /// Adds one forward batch of activations `act` (`[rows, ffn]`).
    pub fn add(&mut self, act: &[f32], rows: usize) -> Result<(), StatsError> {
        let (ffn, block) = (self.ffn, self.block);
        if act.len() != rows * ffn {
            return Err(StatsError::Shape {
                len: act.len(),
                rows,
                ffn,
            });
        }
        if rows == 0 {
            return Ok(());
        }
        let nb = ffn / block;
        let perm = &self.perm;
        // Per token: which blocks are active, and the blocks needed for each mass target.
        let per_token: Vec<(Vec<bool>, [u64; 2])> = act
            .par_chunks(ffn)
            .map(|row| {
                let mut mass = vec![0.0f64; nb];
                let mut any = vec![false; nb];
                for (b, idx) in perm.chunks(block).enumerate() {
                    let mut s = 0.0f64;
                    let mut a = false;
                    for &o in idx {
                        let v = row[o];
                        if v > 0.0 {
                            a = true;
                            s += v as f64;
                        }
                    }
                    mass[b] = s;
                    any[b] = a;
                }
                (any, blocks_needed(&mut mass))
            })
            .collect();
        self.tokens += rows as u64;
        self.batches += 1;
        let mut union = vec![false; nb];
        for (any, need) in &per_token {
            self.active_pairs += any.iter().filter(|&&a| a).count() as u64;
            self.need[0] += need[0];
            self.need[1] += need[1];
            for (u, &a) in union.iter_mut().zip(any) {
                *u |= a;
            }
        }
        self.union_active += union.iter().filter(|&&a| a).count() as u64;
        for (k, &t) in self.tile_rows.iter().enumerate() {
            for run in per_token.chunks(t) {
                for b in 0..nb {
                    self.tiles[k].0 += 1;
                    self.tiles[k].1 += run.iter().any(|(any, _)| any[b]) as u64;
                }
            }
        }
        Ok(())
    }

    /// The shares over everything added (zeros when nothing was).
    pub fn finish(&self) -> BlockStats {
        let nb = (self.ffn / self.block) as f64;
        let share = |num: u64, den: f64| if den > 0.0 { num as f64 / den } else { 0.0 };
        let pairs = self.tokens as f64 * nb;
        BlockStats {
            block: self.block,
            tokens: self.tokens,
            any: share(self.active_pairs, pairs),
            m99: share(self.need[0], pairs),
            m999: share(self.need[1], pairs),
            tiles: self
                .tile_rows
                .iter()
                .zip(&self.tiles)
                .map(|(&t, &(n, a))| (t, share(a, n as f64)))
                .collect(),
            batch_union: share(self.union_active, self.batches as f64 * nb),
        }
    }
}

/// For block masses `mass` (reordered in place), the number of blocks, taken heaviest first,
/// whose mass reaches each of [`MASS_TARGETS`] of the total (0 for a zero total).
fn blocks_needed(mass: &mut [f64]) -> [u64; 2] {
    let total: f64 = mass.iter().sum();
    if total <= 0.0 {
        return [0, 0];
    }
    mass.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut out = [mass.len() as u64; 2];
    let mut done = [false; 2];
    let mut cum = 0.0;
    for (n, &m) in mass.iter().enumerate() {
        cum += m;
        for (q, &target) in MASS_TARGETS.iter().enumerate() {
            if !done[q] && cum >= target * total {
                out[q] = n as u64 + 1;
                done[q] = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    out
}

/// Computes [`BlockStats`] of `act` (`[rows, ffn]`, one batch) in one call.
pub fn block_stats(
    act: &[f32],
    rows: usize,
    ffn: usize,
    block: usize,
    perm: Option<&[usize]>,
) -> Result<BlockStats, StatsError> {
    let mut acc = BlockAccumulator::new(ffn, block, perm, &TILE_ROWS)?;
    acc.add(act, rows)?;
    Ok(acc.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_needed_takes_heaviest_first() {
        // Total 100: 60 + 30 = 90 is not 99%, + 9.5 = 99.5 is; 99.95 with the 0.45 is 99.9%.
        let mut m = vec![9.5, 60.0, 0.45, 30.0, 0.05];
        assert_eq!(blocks_needed(&mut m), [3, 4]);
        assert_eq!(blocks_needed(&mut [0.0, 0.0]), [0, 0]);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(BlockAccumulator::new(10, 4, None, &[16]).is_err());
        assert!(BlockAccumulator::new(8, 4, Some(&[0, 1, 2, 3, 4, 5, 6, 6]), &[16]).is_err());
        let mut acc = BlockAccumulator::new(8, 4, None, &[16]).unwrap();
        assert!(acc.add(&[0.0; 15], 2).is_err());
    }
}
