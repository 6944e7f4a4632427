//! Which micro-batches of a global optimizer step each rank computes.
//!
//! Every rank builds the same global step (same data order, same seed, same packing: the
//! [`crate::train::plan::StepPlan`] of one process), then computes only its share:
//! micro-batch `j` goes to rank `j mod world_size`. The union over the ranks is exactly the
//! global step, so the summed gradients are those of one process (up to f32 summation order),
//! and each micro-batch keeps its global index (its dropout seed).

/// The global indices of the micro-batches `rank` computes out of `num_micro`, ascending.
/// Empty when `rank >= world_size` or there are fewer micro-batches than ranks (that rank
/// then contributes zero gradients).
pub fn rank_micro_batches(num_micro: usize, rank: usize, world_size: usize) -> Vec<usize> {
    if world_size == 0 || rank >= world_size {
        return Vec::new();
    }
    (rank..num_micro).step_by(world_size).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    #[test]
    fn world_of_one_is_the_identity() {
        for n in [0, 1, 2, 7, 64] {
            assert_eq!(rank_micro_batches(n, 0, 1), (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn ranks_partition_the_global_step() {
        let mut rng = SplitMix64::new(0x5a4d);
        for _ in 0..200 {
            let n = (rng.next_u64() % 40) as usize;
            let world = 1 + (rng.next_u64() % 9) as usize;
            let mut seen = vec![0usize; n];
            for rank in 0..world {
                let mine = rank_micro_batches(n, rank, world);
                assert!(mine.windows(2).all(|w| w[0] < w[1]), "ascending");
                for &j in &mine {
                    assert_eq!(j % world, rank);
                    seen[j] += 1;
                }
                // Balanced: shares differ by at most one micro-batch.
                assert!(mine.len() == n / world || mine.len() == n.div_ceil(world));
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "n={n} world={world}: {seen:?}"
            );
        }
        assert!(rank_micro_batches(5, 3, 3).is_empty());
        assert!(rank_micro_batches(2, 2, 3).is_empty());
    }
}
