//! CPU reference of [`select_blocks`](crate::block_select) (device-side block selection) and
//! a checker that judges a selection against it up to rounding.
//!
//! The kernel sums f32 masses in its own order and uses `exp` of the target's precision, so
//! its group sums differ from these f64 sums in the last bits, and a block whose sum is within
//! that rounding of another's (or whose running sum is within it of the goal) may go either
//! way. [`check_selection`] therefore accepts any selection the greedy rule could give with
//! sums perturbed by `tol · total`, and nothing else: a wrong count, a non-top block, ids out of
//! order or out of range all fail.

/// One group's selection as the reference computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSelection {
    /// Summed predicted mass of each block, f64.
    pub sums: Vec<f64>,
    /// Kept block ids, ascending.
    pub kept: Vec<i32>,
}

/// The selection of every group of `bm` rows: row `r`, block `b` carries
/// `max(scale · (exp(o[b, r] + bias[b]) − 1), 0)`; per group, blocks in descending sum (ties:
/// lower id) until the sum reaches `target · total` or `max_blocks` are taken, at least one.
/// `o` is block-major `[nb, t]`, as the kernel reads it.
pub fn select_blocks(
    o: &[f32],
    (t, nb): (usize, usize),
    bias: &[f32],
    scale: f32,
    target: f32,
    max_blocks: usize,
    bm: usize,
) -> Vec<GroupSelection> {
    let groups = t.div_ceil(bm.max(1));
    (0..groups)
        .map(|g| {
            let mut sums = vec![0.0f64; nb];
            for r in g * bm..((g + 1) * bm).min(t) {
                for (b, s) in sums.iter_mut().enumerate() {
                    let v =
                        f64::from(o[b * t + r]) + f64::from(bias.get(b).copied().unwrap_or(0.0));
                    *s += (f64::from(scale) * v.exp_m1()).max(0.0);
                }
            }
            let mut order: Vec<usize> = (0..nb).collect();
            order.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]).then(a.cmp(&b)));
            let goal = f64::from(target) * sums.iter().sum::<f64>();
            let (mut covered, mut kept) = (0.0, vec![]);
            for &b in &order {
                if kept.len() == max_blocks || (!kept.is_empty() && covered >= goal) {
                    break;
                }
                covered += sums[b];
                kept.push(b as i32);
            }
            kept.sort_unstable();
            GroupSelection { sums, kept }
        })
        .collect()
}

/// Checks a device selection (`count`, the first `count` ids of the group's row) against the
/// reference's sums: ids ascending and in range, `1 <= count <= max_blocks`, every kept block's
/// sum at least every dropped block's minus `tol · total`, and a count the greedy rule allows:
/// when below `max_blocks`, the kept sum reaches the goal (minus `tol · total`); when above
/// one, the kept set without its smallest block falls short of it (plus `tol · total`).
pub fn check_selection(
    r: &GroupSelection,
    kept: &[i32],
    target: f32,
    max_blocks: usize,
    tol: f64,
) -> Result<(), String> {
    let nb = r.sums.len();
    if kept.is_empty() || kept.len() > max_blocks {
        return Err(format!("count {} outside 1..={max_blocks}", kept.len()));
    }
    if kept.windows(2).any(|w| w[0] >= w[1]) || kept.iter().any(|&b| b < 0 || b as usize >= nb) {
        return Err(format!("ids {kept:?} not ascending within 0..{nb}"));
    }
    let total: f64 = r.sums.iter().sum();
    let slack = tol * total.max(f64::MIN_POSITIVE);
    let s = |b: i32| r.sums[b as usize];
    let min_kept = kept.iter().map(|&b| s(b)).fold(f64::INFINITY, f64::min);
    let max_dropped = (0..nb as i32)
        .filter(|b| !kept.contains(b))
        .map(s)
        .fold(f64::NEG_INFINITY, f64::max);
    if min_kept < max_dropped - slack {
        return Err(format!(
            "kept {kept:?} holds a block of sum {min_kept} below a dropped one of {max_dropped}"
        ));
    }
    let goal = f64::from(target) * total;
    let covered: f64 = kept.iter().map(|&b| s(b)).sum();
    if kept.len() < max_blocks && covered < goal - slack {
        return Err(format!(
            "kept {kept:?} covers {covered} < goal {goal} with room for more blocks"
        ));
    }
    if kept.len() > 1 && covered - min_kept >= goal + slack {
        return Err(format!(
            "kept {kept:?} covers the goal {goal} without its smallest block ({covered} - {min_kept})"
        ));
    }
    Ok(())
}

/// The groups of a device list (`counts [groups]`, `indices [groups, max_blocks]` read back)
/// that fail against the reference `want`: a count outside `0..=max_blocks`, a slot past the
/// count that lost its `poison`, or a selection [`check_selection`] refuses (with `tol`).
pub fn failing_groups(
    want: &[GroupSelection],
    (counts, indices): (&[i32], &[i32]),
    (target, max_blocks): (f32, usize),
    poison: i32,
    tol: f64,
) -> usize {
    want.iter()
        .enumerate()
        .filter(|(g, r)| {
            let Some(count) = counts
                .get(*g)
                .and_then(|&c| usize::try_from(c).ok())
                .filter(|&c| c <= max_blocks)
            else {
                return true;
            };
            let Some(row) = indices.get(g * max_blocks..(g + 1) * max_blocks) else {
                return true;
            };
            row[count..].iter().any(|&v| v != poison)
                || check_selection(r, &row[..count], target, max_blocks, tol).is_err()
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(sums: &[f64]) -> GroupSelection {
        GroupSelection {
            sums: sums.to_vec(),
            kept: vec![],
        }
    }

    #[test]
    fn greedy_rule_ties_and_zero_mass() {
        // Rows of one group: block 2 carries most, blocks 0 and 3 tie.
        let o = [0.5f32, -9.0, 2.0, 0.5]; // one token: [nb, 1] is the same as [1, nb]
        let r = select_blocks(&o, (1, 4), &[0.0; 4], 1.0, 0.9, 4, 128);
        assert_eq!(r[0].kept, vec![0, 2]);
        let r = select_blocks(&o, (1, 4), &[0.0; 4], 1.0, 0.99, 4, 128);
        assert_eq!(r[0].kept, vec![0, 2, 3]);
        let r = select_blocks(&o, (1, 4), &[0.0; 4], 1.0, 0.99, 1, 128);
        assert_eq!(r[0].kept, vec![2]);
        // No mass at all: one block, the lowest id.
        let r = select_blocks(&[-5.0f32; 8], (2, 4), &[0.0; 4], 1.0, 0.9, 4, 128);
        assert_eq!(r[0].kept, vec![0]);
    }

    #[test]
    fn the_checker_fails_wrong_selections() {
        let g = group(&[1.0, 0.0, 5.0, 1.0]);
        assert!(check_selection(&g, &[0, 2], 0.85, 4, 1e-9).is_ok());
        assert!(
            check_selection(&g, &[2, 3], 0.85, 4, 1e-9).is_ok(),
            "a tie may go either way"
        );
        assert!(
            check_selection(&g, &[2], 0.85, 4, 1e-9).is_err(),
            "short of the goal"
        );
        assert!(
            check_selection(&g, &[0, 2, 3], 0.7, 4, 1e-9).is_err(),
            "one too many"
        );
        assert!(
            check_selection(&g, &[1, 2], 0.85, 4, 1e-9).is_err(),
            "not a top block"
        );
        assert!(
            check_selection(&g, &[2, 0], 0.85, 4, 1e-9).is_err(),
            "out of order"
        );
        assert!(check_selection(&g, &[], 0.85, 4, 1e-9).is_err(), "empty");
        assert!(
            check_selection(&g, &[0, 2, 3], 1.0, 2, 1e-9).is_err(),
            "over the budget"
        );
        assert!(
            check_selection(&g, &[2, 4], 0.85, 4, 1e-9).is_err(),
            "out of range"
        );
    }
}
