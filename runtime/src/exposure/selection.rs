//! Block selection (DESIGN.md §7, MLP step 4): per row group, keep neuron blocks in descending
//! order of predicted mass until a target share of the group's predicted mass is covered,
//! capped by a per-layer budget; emit the CPU model's [`MlpMask`] and the block list
//! (`counts`, `indices`) that [`crate::block_list::BlockList::from_host`] uploads for the
//! block-sparse GPU operators.
//!
//! Groups are consecutive rows of the packed batch (the GPU operators' row tiles). Sorting
//! tokens by a short code of their predicted pattern (their top-2 predicted blocks) before
//! grouping was measured on held-out opt-mini tokens (`LEXP_SORT=1` in the ignored
//! measurement of `tests/exposure_predictor.rs`) and did not lower the density at recall 0.99
//! (blocks of 32, groups of 16: 0.992 sorted vs 0.990 in order), so it is not done.

use crate::model::MlpMask;

/// How blocks are chosen for one layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelectionParams {
    /// Rows per group.
    pub group: usize,
    /// Share of the group's predicted mass to cover, in `(0, 1]`.
    pub target: f64,
    /// Most blocks a group keeps (the grid bound `max_blocks`), `1..=num_blocks`.
    pub max_blocks: usize,
}

/// The grid bound for a budget given as the largest share of blocks a group may keep:
/// `ceil(budget · num_blocks)`, at least 1 and at most `num_blocks`.
pub fn budget_blocks(num_blocks: usize, budget: f64) -> usize {
    ((budget * num_blocks as f64).ceil() as usize).clamp(1, num_blocks.max(1))
}

/// The kept blocks of one layer in both forms.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// For the CPU model.
    pub mask: MlpMask,
    /// Kept blocks per group, `[groups]`.
    pub counts: Vec<i32>,
    /// `[groups, max_blocks]`: the first `counts[g]` entries of row `g` are the kept block
    /// ids in ascending order; the rest is padding (0).
    pub indices: Vec<i32>,
    /// The grid bound of `indices`.
    pub max_blocks: usize,
}

/// Chooses the kept blocks from predicted scores `[rows, num_blocks]` (`>= 0`).
///
/// For each group the scores of its rows are summed per block; blocks are taken in
/// descending order of that sum (ties: lower id first) until their sum reaches
/// `target ·` the group's total, or `max_blocks` are taken. At least one block is kept.
pub fn select(
    scores: &[f32],
    rows: usize,
    num_blocks: usize,
    block: usize,
    p: &SelectionParams,
) -> Selection {
    let group = p.group.max(1);
    let max_blocks = p.max_blocks.clamp(1, num_blocks.max(1));
    let groups = rows.div_ceil(group);
    let mut keep = vec![false; groups * num_blocks];
    let mut counts = vec![0i32; groups];
    let mut indices = vec![0i32; groups * max_blocks];
    let mut sums = vec![0.0f64; num_blocks];
    let mut order: Vec<usize> = (0..num_blocks).collect();
    for g in 0..groups {
        sums.iter_mut().for_each(|s| *s = 0.0);
        for r in g * group..((g + 1) * group).min(rows) {
            for (s, &v) in sums
                .iter_mut()
                .zip(&scores[r * num_blocks..(r + 1) * num_blocks])
            {
                *s += v.max(0.0) as f64;
            }
        }
        let total: f64 = sums.iter().sum();
        order.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]).then(a.cmp(&b)));
        let goal = p.target * total;
        let mut covered = 0.0;
        let mut kept = Vec::with_capacity(max_blocks);
        for &b in &order {
            if kept.len() == max_blocks || (!kept.is_empty() && covered >= goal) {
                break;
            }
            covered += sums[b];
            kept.push(b);
        }
        kept.sort_unstable();
        counts[g] = kept.len() as i32;
        for (j, &b) in kept.iter().enumerate() {
            keep[g * num_blocks + b] = true;
            indices[g * max_blocks + j] = b as i32;
        }
    }
    Selection {
        mask: MlpMask {
            group,
            block,
            num_blocks,
            keep,
        },
        counts,
        indices,
        max_blocks,
    }
}

/// Activation-mass recall of a mask: `(kept mass, total mass)` of the dense ReLU output `act`
/// (`[rows, num_blocks · block]`) over the blocks the mask keeps.
pub fn mass_recall(act: &[f32], rows: usize, mask: &MlpMask) -> (f64, f64) {
    let ffn = mask.num_blocks * mask.block;
    let (mut kept, mut total) = (0.0f64, 0.0f64);
    for (r, row) in act.chunks(ffn).take(rows).enumerate() {
        let g = r / mask.group.max(1);
        for (b, blk) in row.chunks(mask.block).enumerate() {
            let s: f64 = blk.iter().map(|&v| v as f64).sum();
            total += s;
            if mask.keeps(g, b) {
                kept += s;
            }
        }
    }
    (kept, total)
}

/// Share of the `fc1`/`fc2` work a mask keeps: kept (row, block) pairs over all, so a short
/// last group weighs by its rows.
pub fn work_density(mask: &MlpMask, rows: usize) -> f64 {
    if rows == 0 || mask.num_blocks == 0 {
        return 1.0;
    }
    let mut kept = 0usize;
    for g in 0..mask.groups() {
        let n = ((g + 1) * mask.group).min(rows) - g * mask.group;
        let k = (0..mask.num_blocks).filter(|&b| mask.keeps(g, b)).count();
        kept += n * k;
    }
    kept as f64 / (rows * mask.num_blocks) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_list::validate;
    use crate::data::SplitMix64;

    #[test]
    fn keeps_exactly_the_blocks_covering_the_target() {
        // One group of 2 rows, 5 blocks; summed scores 1, 10, 4, 0, 5 (total 20).
        let scores = [0.5, 6.0, 2.0, 0.0, 1.0, 0.5, 4.0, 2.0, 0.0, 4.0];
        let at = |target: f64, max_blocks: usize| {
            select(
                &scores,
                2,
                5,
                4,
                &SelectionParams {
                    group: 2,
                    target,
                    max_blocks,
                },
            )
        };
        // 0.5 of 20 = 10: block 1 alone.
        assert_eq!(at(0.5, 5).mask.keep, vec![false, true, false, false, false]);
        // 0.7 -> 14: 10 + 5 = 15 (blocks 1, 4).
        let s = at(0.7, 5);
        assert_eq!(s.mask.keep, vec![false, true, false, false, true]);
        assert_eq!(
            (s.counts.clone(), s.indices[..2].to_vec()),
            (vec![2], vec![1, 4])
        );
        // 0.9 -> 18: 10 + 5 + 4 = 19 (blocks 1, 4, 2).
        assert_eq!(at(0.9, 5).mask.keep, vec![false, true, true, false, true]);
        // 1.0 -> 20: blocks 1, 4, 2, 0 reach it; the zero block 3 is not needed.
        assert_eq!(at(1.0, 5).counts, vec![4]);
        // A budget of 2 blocks caps it.
        assert_eq!(at(0.9, 2).mask.keep, vec![false, true, false, false, true]);
    }

    #[test]
    fn random_selections_respect_groups_budget_and_target_and_pass_validation() {
        let mut rng = SplitMix64::new(5);
        for case in 0..50 {
            let nb = 1 + (rng.next_u64() % 24) as usize;
            let rows = 1 + (rng.next_u64() % 300) as usize;
            let group = 1 + (rng.next_u64() % 64) as usize;
            let max_blocks = 1 + (rng.next_u64() % nb as u64) as usize;
            let target = 0.5 + 0.5 * (rng.next_u64() % 1000) as f64 / 1000.0;
            let scores: Vec<f32> = (0..rows * nb)
                .map(|_| ((rng.next_u64() % 1000) as f32 / 100.0).powi(3))
                .collect();
            let p = SelectionParams {
                group,
                target,
                max_blocks,
            };
            let s = select(&scores, rows, nb, 8, &p);
            validate(&s.counts, &s.indices, s.max_blocks, nb).unwrap();
            assert_eq!(s.counts.len(), rows.div_ceil(group), "case {case}");
            for g in 0..s.counts.len() {
                let sums: Vec<f64> = (0..nb)
                    .map(|b| {
                        (g * group..((g + 1) * group).min(rows))
                            .map(|r| scores[r * nb + b] as f64)
                            .sum()
                    })
                    .collect();
                let total: f64 = sums.iter().sum();
                let kept: Vec<usize> = (0..nb).filter(|&b| s.mask.keeps(g, b)).collect();
                let c = s.counts[g] as usize;
                assert_eq!(kept.len(), c);
                assert_eq!(
                    s.indices[g * max_blocks..g * max_blocks + c]
                        .iter()
                        .map(|&i| i as usize)
                        .collect::<Vec<_>>(),
                    kept
                );
                assert!(c >= 1 && c <= max_blocks);
                let covered: f64 = kept.iter().map(|&b| sums[b]).sum();
                // Covered unless the budget stopped it; minimal: dropping the smallest kept
                // block falls short of the target.
                if c < max_blocks {
                    assert!(covered >= target * total - 1e-9 * total.max(1.0));
                }
                let smallest = kept.iter().map(|&b| sums[b]).fold(f64::INFINITY, f64::min);
                if c > 1 {
                    assert!(covered - smallest < target * total + 1e-9 * total.max(1.0));
                }
                // Every dropped block scores no higher than every kept one.
                for b in (0..nb).filter(|b| !kept.contains(b)) {
                    assert!(sums[b] <= smallest);
                }
            }
        }
    }

    #[test]
    fn recall_and_work_density_against_hand_numbers() {
        // 3 rows, groups of 2, 2 blocks of 2 neurons.
        let mask = MlpMask {
            group: 2,
            block: 2,
            num_blocks: 2,
            keep: vec![true, false, false, true],
        };
        let act = [1.0, 1.0, 2.0, 0.0, 0.0, 3.0, 1.0, 0.0, 5.0, 0.0, 0.0, 4.0];
        // Kept: rows 0,1 block 0 (2 + 3), row 2 block 1 (4); total 17.
        assert_eq!(mass_recall(&act, 3, &mask), (9.0, 17.0));
        // Kept pairs: 2 rows x 1 + 1 row x 1 = 3 of 6.
        assert_eq!(work_density(&mask, 3), 0.5);
    }

    #[test]
    fn budget_blocks_rounds_up_and_clamps() {
        assert_eq!(budget_blocks(48, 0.5), 24);
        assert_eq!(budget_blocks(48, 0.51), 25);
        assert_eq!(budget_blocks(48, 0.0), 1);
        assert_eq!(budget_blocks(48, 2.0), 48);
    }
}
