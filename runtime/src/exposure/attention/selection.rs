//! Choosing key blocks (DESIGN.md §7, attention step 3): per (sequence, query block, head) the
//! *local window* (the diagonal blocks and `window` key blocks before them) and the *sink*
//! blocks (the first `sinks` key blocks of the sequence) are always kept; then the other causal
//! blocks in order of predicted mass until the predicted mass covered reaches the target, or
//! the row's budget (`max_density` of its causal blocks) is spent.
//!
//! Blocks are sequence-relative and never past the diagonal, so the causal and the packing
//! masks hold by construction; the result is an [`AttentionMask`] that passes
//! [`AttentionMask::validate`].
//!
//! The same selection on the exact maps ([`oracle`]) is the best a per-row greedy choice can do:
//! its density at a recall is the floor the predictor is compared against.

use super::maps::{BlockMaps, RowLayout};
use crate::model::AttentionMask;
use serde::{Deserialize, Serialize};

/// How a row's blocks are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelectionParams {
    /// Key blocks before the diagonal always kept.
    pub window: usize,
    /// First key blocks of the sequence always kept.
    pub sinks: usize,
    /// Predicted mass share a row covers, in `(0, 1]`.
    pub target: f64,
    /// Largest share of a row's causal blocks kept beyond the forced ones' count, in `(0, 1]`.
    pub max_density: f64,
}

impl Default for SelectionParams {
    fn default() -> Self {
        SelectionParams {
            window: 1,
            sinks: 1,
            target: 0.95,
            max_density: 1.0,
        }
    }
}

/// Whether key block `kb` of a row with causal range `(lo, hi)` is always kept.
pub fn forced(kb: usize, lo: usize, window: usize, sinks: usize) -> bool {
    kb < sinks || kb + window >= lo
}

/// The mask keeping, per row of `layout`, the forced blocks and the best-scored others up to
/// `params.target` of the row's score sum. `scores` has one non-negative entry per causal block
/// (the layout's entries), e.g. predicted or exact block masses.
///
/// # Panics
/// If `scores.len()` is not the layout's entry count (a programming error).
pub fn select(layout: &RowLayout, scores: &[f32], params: &SelectionParams) -> AttentionMask {
    assert_eq!(scores.len(), layout.entries(), "one score per causal block");
    let (mut offsets, mut keys) = (Vec::with_capacity(layout.rows() + 1), Vec::new());
    offsets.push(0);
    let mut order: Vec<usize> = Vec::new();
    for r in 0..layout.rows() {
        let (lo, hi) = layout.range(r);
        let row = &scores[layout.offsets[r]..layout.offsets[r + 1]];
        let total: f64 = row.iter().map(|&v| v.max(0.0) as f64).sum();
        let mut keep = vec![false; hi];
        let mut covered = 0.0f64;
        let mut count = 0usize;
        for (kb, k) in keep.iter_mut().enumerate() {
            if forced(kb, lo, params.window, params.sinks) {
                *k = true;
                covered += row[kb].max(0.0) as f64;
                count += 1;
            }
        }
        let cap = ((params.max_density * hi as f64).ceil() as usize).max(count);
        order.clear();
        order.extend((0..hi).filter(|&kb| !keep[kb]));
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &kb in &order {
            if count >= cap || covered >= params.target * total {
                break;
            }
            keep[kb] = true;
            covered += row[kb].max(0.0) as f64;
            count += 1;
        }
        keys.extend((0..hi).filter(|&kb| keep[kb]).map(|kb| kb as u32));
        offsets.push(keys.len());
    }
    AttentionMask {
        q_block: layout.q_block,
        k_block: layout.k_block,
        heads: layout.heads,
        lens: layout.lens.clone(),
        offsets,
        keys,
    }
}

/// The selection on the exact maps: the per-row greedy oracle.
pub fn oracle(maps: &BlockMaps, params: &SelectionParams) -> AttentionMask {
    select(&maps.layout, &maps.mass, params)
}

/// Per head: `(kept blocks, causal blocks)` of `mask`.
pub fn head_blocks(mask: &AttentionMask, layout: &RowLayout) -> Vec<(usize, usize)> {
    let mut out = vec![(0, 0); layout.heads];
    for (r, &(_, _, h)) in layout.index.iter().enumerate() {
        out[h].0 += mask.kept(r).len();
        out[h].1 += layout.range(r).1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    #[test]
    fn forced_blocks_always_and_the_best_others_until_the_target() {
        // One 512-token sequence, q blocks of 128, k blocks of 64: rows see 2, 4, 6, 8 blocks.
        let cu = [0i32, 512, 700];
        let layout = RowLayout::new(&cu, 2, 128, 64);
        let mut rng = SplitMix64::new(3);
        let scores: Vec<f32> = (0..layout.entries())
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32).powi(4))
            .collect();
        for &target in &[0.0, 0.5, 0.8, 0.95, 1.0] {
            let p = SelectionParams {
                target,
                ..Default::default()
            };
            let mask = select(&layout, &scores, &p);
            mask.validate(&cu, 2).unwrap();
            for r in 0..layout.rows() {
                let (lo, hi) = layout.range(r);
                let row = &scores[layout.offsets[r]..layout.offsets[r + 1]];
                let kept = mask.kept(r);
                for kb in 0..hi {
                    if forced(kb, lo, 1, 1) {
                        assert!(kept.contains(&(kb as u32)), "forced {kb} in row {r}");
                    }
                }
                let total: f64 = row.iter().map(|&v| v as f64).sum();
                let cov: f64 = kept.iter().map(|&k| row[k as usize] as f64).sum();
                let optional: Vec<usize> = (0..hi)
                    .filter(|&kb| kept.contains(&(kb as u32)) && !forced(kb, lo, 1, 1))
                    .collect();
                // Reaches the target; and minimal: without its weakest optional block it would not.
                assert!(cov >= target * total - 1e-9);
                if let Some(&w) = optional.iter().min_by(|&&a, &&b| row[a].total_cmp(&row[b])) {
                    assert!(cov - (row[w] as f64) < target * total);
                    // Every dropped block scores no higher than every optional kept one.
                    for kb in (0..hi).filter(|&kb| !kept.contains(&(kb as u32))) {
                        assert!(row[kb] <= row[w]);
                    }
                }
            }
        }
        // Density grows with the target; the dense target keeps (almost) everything.
        let d = |t: f64| {
            select(
                &layout,
                &scores,
                &SelectionParams {
                    target: t,
                    ..Default::default()
                },
            )
            .density()
        };
        assert!(d(0.5) <= d(0.8) && d(0.8) <= d(0.95) && d(0.95) < d(1.0) + 1e-12);
        assert!(d(1.0) > 0.99, "{}", d(1.0));
    }

    #[test]
    fn the_budget_caps_a_row_but_never_drops_forced_blocks() {
        let cu = [0i32, 1024];
        let layout = RowLayout::new(&cu, 1, 128, 64);
        let scores = vec![1.0f32; layout.entries()];
        let p = SelectionParams {
            target: 1.0,
            max_density: 0.5,
            ..Default::default()
        };
        let mask = select(&layout, &scores, &p);
        mask.validate(&cu, 1).unwrap();
        for r in 0..layout.rows() {
            let (lo, hi) = layout.range(r);
            let forced_n = (0..hi).filter(|&kb| forced(kb, lo, 1, 1)).count();
            let cap = ((0.5 * hi as f64).ceil() as usize).max(forced_n);
            assert_eq!(mask.kept(r).len(), cap.min(hi), "row {r}");
        }
        let heads = head_blocks(&mask, &layout);
        assert_eq!(heads[0].0, mask.keys.len());
        assert_eq!(heads[0].1, mask.causal_blocks());
    }
}
