//! Plain-Rust CPU references for the dynamic-aware MLP operators of
//! [`sparse_mlp`](crate::sparse_mlp), and for the masked dense MLP they compute piecewise.
//!
//! Conventions as in [`reference_matmul`](crate::reference_matmul) (whose module docs define
//! block lists and compact activations): inputs are `f32` slices of values already rounded to
//! the storage type, arithmetic is `f64`, results are `f32` not rounded to the storage type;
//! malformed input never panics (a missing element reads as 0, a negative block id contributes
//! nothing; a count is clamped to `0..=max_blocks`).
//!
//! Shapes: `x [M, H]`, `w1 [F, H]`, `b1 [F]`, `w2 [H, F]`, `b2 [H]`, `dy [M, H]`, compact
//! `h`/`dh [M, max_blocks * bs]`, row groups of `bm` rows, `F = num_blocks * bs`.

/// A block list and its geometry: `counts [groups]`, `indices [groups, max_blocks]`, row groups
/// of `bm` rows, blocks of `bs` neurons.
#[derive(Clone, Copy, Debug)]
pub struct Blocks<'a> {
    /// Valid entries per group.
    pub counts: &'a [i32],
    /// Block ids, row-major `[groups, max_blocks]`; entries past a group's count are padding.
    pub indices: &'a [i32],
    /// The grid bound (entries per group, compact slots).
    pub max_blocks: usize,
    /// Rows per group.
    pub bm: usize,
    /// Neurons per block.
    pub bs: usize,
}

impl Blocks<'_> {
    /// The valid entries of the group of row `r`: `(slot, block)`, skipping negative ids.
    fn of_row(&self, r: usize) -> Vec<(usize, usize)> {
        let Some(g) = r.checked_div(self.bm) else {
            return vec![];
        };
        let count = self
            .counts
            .get(g)
            .map(|&c| usize::try_from(c).unwrap_or(0).min(self.max_blocks))
            .unwrap_or(0);
        let start = g.saturating_mul(self.max_blocks);
        self.indices
            .get(start..)
            .unwrap_or(&[])
            .iter()
            .take(count)
            .enumerate()
            .filter_map(|(j, &b)| usize::try_from(b).ok().map(|b| (j, b)))
            .collect()
    }

    /// Width of a compact activation, `max_blocks * bs` (saturating).
    fn width(&self) -> usize {
        self.max_blocks.saturating_mul(self.bs)
    }

    /// `keep[r * (num_blocks * bs) + n]`: whether neuron `n` is kept for row `r` (its block is
    /// in the list of `r`'s group), for `m` rows and `f` neurons.
    pub fn dense_mask(&self, m: usize, f: usize) -> Vec<bool> {
        let mut keep = vec![false; m.saturating_mul(f)];
        for r in 0..m {
            for (_, b) in self.of_row(r) {
                for c in 0..self.bs {
                    if let Some(n) = b.checked_mul(self.bs).and_then(|n| n.checked_add(c)) {
                        if n < f {
                            keep[r * f + n] = true;
                        }
                    }
                }
            }
        }
        keep
    }
}

/// Element `[r, c]` of a row-major slice with `cols` columns as f64; 0 outside.
fn at(x: &[f32], cols: usize, r: usize, c: usize) -> f64 {
    if c >= cols {
        return 0.0;
    }
    r.checked_mul(cols)
        .and_then(|i| i.checked_add(c))
        .and_then(|i| x.get(i))
        .map(|&v| v as f64)
        .unwrap_or(0.0)
}

/// `init` copied into a `rows x cols` buffer (missing elements 0).
fn start_from(init: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let len = rows.saturating_mul(cols);
    let mut out = vec![0.0f32; len];
    let n = init.len().min(len);
    out[..n].copy_from_slice(&init[..n]);
    out
}

/// fc1 forward on the kept blocks, compact: for row `r` and slot `j` of its group's list with
/// block `b`, `h[r, j*bs + c] = max(0, Σ_p x[r, p]·w1[b*bs + c, p] + b1[b*bs + c])`. `x` is
/// `[m, hd]`, `w1` `[f, hd]`, `b1` `[f]`. Slots past a count keep their value from `init`
/// (`[m, max_blocks * bs]`).
pub fn sparse_fc1_fwd(
    x: &[f32],
    w1: &[f32],
    b1: &[f32],
    (m, hd, f): (usize, usize, usize),
    list: Blocks,
    init: &[f32],
) -> Vec<f32> {
    let width = list.width();
    let mut out = start_from(init, m, width);
    for r in 0..m {
        for (j, b) in list.of_row(r) {
            for c in 0..list.bs {
                let n = b.saturating_mul(list.bs).saturating_add(c);
                let s: f64 = if n < f {
                    (0..hd)
                        .map(|p| at(x, hd, r, p) * at(w1, hd, n, p))
                        .sum::<f64>()
                        + b1.get(n).map_or(0.0, |&v| v as f64)
                } else {
                    0.0
                };
                out[r * width + j * list.bs + c] = s.max(0.0) as f32;
            }
        }
    }
    out
}

/// fc2 input gradient on the kept blocks, compact and masked by the ReLU:
/// `dh[r, j*bs + c] = Σ_p dy[r, p]·w2[p, b*bs + c]` where `h[r, j*bs + c] > 0`, else 0. `dy`
/// is `[m, hd]`, `w2` `[hd, f]` (not transposed), `h` compact. Slots past a count keep their
/// value from `init`.
pub fn sparse_fc2_dh(
    dy: &[f32],
    w2: &[f32],
    h: &[f32],
    (m, hd, f): (usize, usize, usize),
    list: Blocks,
    init: &[f32],
) -> Vec<f32> {
    let width = list.width();
    let mut out = start_from(init, m, width);
    for r in 0..m {
        for (j, b) in list.of_row(r) {
            for c in 0..list.bs {
                let slot = j * list.bs + c;
                let n = b.saturating_mul(list.bs).saturating_add(c);
                let live = at(h, width, r, slot) > 0.0;
                let s: f64 = if live && n < f {
                    (0..hd).map(|p| at(dy, hd, r, p) * at(w2, f, p, n)).sum()
                } else {
                    0.0
                };
                out[r * width + slot] = s as f32;
            }
        }
    }
    out
}

/// fc2 forward with bias and residual, the MLP block's output: `out[r, p] = Σ_j Σ_c h[r, j*bs +
/// c]·w2[p, b_j*bs + c] + b2[p] + res[r, p]`, `[m, hd]`; `h` is compact, `w2` `[hd, f]`, `b2`
/// `[hd]`, `res` `[m, hd]`. A group with count 0 gives `b2 + res`.
pub fn sparse_fc2_fwd(
    h: &[f32],
    w2: &[f32],
    b2: &[f32],
    res: &[f32],
    (m, hd, f): (usize, usize, usize),
    list: Blocks,
) -> Vec<f32> {
    let width = list.width();
    let mut out = vec![0.0f32; m.saturating_mul(hd)];
    for r in 0..m {
        let kept = list.of_row(r);
        for p in 0..hd {
            let mut s = b2.get(p).map_or(0.0, |&v| v as f64) + at(res, hd, r, p);
            for &(j, b) in &kept {
                for c in 0..list.bs {
                    let n = b.saturating_mul(list.bs).saturating_add(c);
                    if n < f {
                        s += at(h, width, r, j * list.bs + c) * at(w2, f, p, n);
                    }
                }
            }
            out[r * hd + p] = s as f32;
        }
    }
    out
}

/// fc1 input gradient from the compact `dh`: `dx[r, p] = Σ_j Σ_c dh[r, j*bs + c]·w1[b_j*bs + c,
/// p]`, `[m, hd]`; `w1` is `[f, hd]` (not transposed). A group with count 0 gives zeros.
pub fn sparse_fc1_dx(
    dh: &[f32],
    w1: &[f32],
    (m, hd, f): (usize, usize, usize),
    list: Blocks,
) -> Vec<f32> {
    let width = list.width();
    let mut out = vec![0.0f32; m.saturating_mul(hd)];
    for r in 0..m {
        let kept = list.of_row(r);
        let mut acc = vec![0.0f64; hd];
        for &(j, b) in &kept {
            for c in 0..list.bs {
                let n = b.saturating_mul(list.bs).saturating_add(c);
                let d = at(dh, width, r, j * list.bs + c);
                if n >= f || d == 0.0 {
                    continue;
                }
                for (p, a) in acc.iter_mut().enumerate() {
                    *a += d * at(w1, hd, n, p);
                }
            }
        }
        for (p, a) in acc.into_iter().enumerate() {
            out[r * hd + p] = a as f32;
        }
    }
    out
}

/// fc1's bias gradient from the compact `dh` (`[m, max_blocks * bs]`): `db1[b*bs + c] =
/// init[b*bs + c] + Σ_r Σ_{(j, b) of r's group} dh[r, j*bs + c]`, `[f]` (entries past `f`
/// dropped).
pub fn sparse_colsum(dh: &[f32], (m, f): (usize, usize), list: Blocks, init: &[f32]) -> Vec<f32> {
    let width = list.width();
    let mut acc: Vec<f64> = start_from(init, 1, f).iter().map(|&v| v as f64).collect();
    for r in 0..m {
        for (j, b) in list.of_row(r) {
            for c in 0..list.bs {
                let n = b.saturating_mul(list.bs).saturating_add(c);
                if n < f {
                    acc[n] += at(dh, width, r, j * list.bs + c);
                }
            }
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// The masked dense MLP, forward and backward to the input, written densely (independently of
/// the compact layout): `h = relu(x·W1ᵀ + b1) ⊙ keep` (a dropped block's activations are zero),
/// `y = h·W2ᵀ + b2`, `dh = (dy·W2) ⊙ [h > 0]`, `dx = dh·W1`. All `[m, ·]`, row-major.
#[derive(Clone, Debug)]
pub struct MaskedMlp {
    /// `[m, f]`, zero outside the kept blocks.
    pub h: Vec<f32>,
    /// `[m, hd]`.
    pub y: Vec<f32>,
    /// `[m, f]`, zero outside the kept blocks and where `h = 0`.
    pub dh: Vec<f32>,
    /// `[m, hd]`.
    pub dx: Vec<f32>,
}

/// [`MaskedMlp`] for `x [m, hd]`, `w1 [f, hd]`, `b1 [f]`, `w2 [hd, f]`, `b2 [hd]`, `dy [m, hd]`
/// and the kept-neuron mask `keep [m, f]` (e.g. [`Blocks::dense_mask`]).
#[allow(clippy::too_many_arguments)]
pub fn masked_mlp(
    x: &[f32],
    w1: &[f32],
    b1: &[f32],
    w2: &[f32],
    b2: &[f32],
    dy: &[f32],
    keep: &[bool],
    (m, hd, f): (usize, usize, usize),
) -> MaskedMlp {
    let mf = m.saturating_mul(f);
    let mh = m.saturating_mul(hd);
    let mut h = vec![0.0f64; mf];
    for r in 0..m {
        for n in 0..f {
            if keep.get(r * f + n).copied().unwrap_or(false) {
                let s: f64 = (0..hd)
                    .map(|p| at(x, hd, r, p) * at(w1, hd, n, p))
                    .sum::<f64>()
                    + b1.get(n).map_or(0.0, |&v| v as f64);
                h[r * f + n] = s.max(0.0);
            }
        }
    }
    let mut y = vec![0.0f64; mh];
    let mut dx = vec![0.0f64; mh];
    let mut dh = vec![0.0f64; mf];
    for r in 0..m {
        for p in 0..hd {
            y[r * hd + p] = (0..f).map(|n| h[r * f + n] * at(w2, f, p, n)).sum::<f64>()
                + b2.get(p).map_or(0.0, |&v| v as f64);
        }
        for n in 0..f {
            if h[r * f + n] > 0.0 {
                dh[r * f + n] = (0..hd).map(|p| at(dy, hd, r, p) * at(w2, f, p, n)).sum();
            }
        }
        for p in 0..hd {
            dx[r * hd + p] = (0..f).map(|n| dh[r * f + n] * at(w1, hd, n, p)).sum();
        }
    }
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    MaskedMlp {
        h: f32s(h),
        y: f32s(y),
        dh: f32s(dh),
        dx: f32s(dx),
    }
}

/// Scatters a compact activation `[m, max_blocks * bs]` to dense `[m, f]` (zeros where no slot
/// holds the neuron): the inverse of the compact layout, for comparing with [`MaskedMlp`].
pub fn scatter(compact: &[f32], (m, f): (usize, usize), list: Blocks) -> Vec<f32> {
    let width = list.width();
    let mut out = vec![0.0f32; m.saturating_mul(f)];
    for r in 0..m {
        for (j, b) in list.of_row(r) {
            for c in 0..list.bs {
                let n = b.saturating_mul(list.bs).saturating_add(c);
                if n < f {
                    out[r * f + n] = at(compact, width, r, j * list.bs + c) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference_matmul as rm;

    /// Deterministic pseudo-random values in [-1, 1].
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f32], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                ((*g - *w) as f64).abs() <= tol * (1.0 + w.abs() as f64),
                "element {i}: {g} vs {w}"
            );
        }
    }

    /// 3 groups of 4 rows (10 rows: the last group ragged), 4 blocks of 2 neurons; group 1
    /// keeps nothing, group 2 keeps blocks 3 and 0 (unsorted).
    fn setup() -> (Vec<i32>, Vec<i32>, usize, usize, usize, usize, usize) {
        let (counts, idx) = (vec![2, 0, 2], vec![1, 2, -1, -7, 3, 0]);
        (counts, idx, 2, 4, 2, 10, 8)
    }

    #[test]
    fn fc1_fwd_hand_checked() {
        // One row, one block of 2 neurons out of 2 blocks: h = relu(x·w1[2..4]ᵀ + b1[2..4]).
        let x = [1.0, 2.0];
        let w1 = [9.0, 9.0, 9.0, 9.0, 1.0, -1.0, 0.5, 0.25];
        let b1 = [0.0, 0.0, 0.25, -2.0];
        let list = Blocks {
            counts: &[1],
            indices: &[1, 5],
            max_blocks: 2,
            bm: 4,
            bs: 2,
        };
        let h = sparse_fc1_fwd(&x, &w1, &b1, (1, 2, 4), list, &[7.0; 4]);
        // Both clip: 1 - 2 + 0.25 = -0.75 and 0.5 + 0.5 - 2 = -1.
        assert_eq!(h, vec![0.0, 0.0, 7.0, 7.0]);
        let b1 = [0.0, 0.0, 2.0, 0.5];
        // With other biases: -1 + 2 = 1 and 1 + 0.5 = 1.5.
        let h = sparse_fc1_fwd(&x, &w1, &b1, (1, 2, 4), list, &[7.0; 4]);
        assert_eq!(h, vec![1.0, 1.5, 7.0, 7.0]);
    }

    #[test]
    fn fc1_fwd_is_relu_of_sparse_out_plus_bias() {
        let (counts, idx, max, bm, bs, m, hd) = setup();
        let f = 4 * bs;
        let (x, w1, b1) = (data(m * hd, 1), data(f * hd, 2), data(f, 3));
        let list = Blocks {
            counts: &counts,
            indices: &idx,
            max_blocks: max,
            bm,
            bs,
        };
        let init = vec![7.0; m * max * bs];
        let got = sparse_fc1_fwd(&x, &w1, &b1, (m, hd, f), list, &init);
        let lin = rm::sparse_out(&x, &w1, m, hd, f, &counts, &idx, max, bm, bs, &init);
        let mut want = lin.clone();
        for r in 0..m {
            for (j, b) in list.of_row(r) {
                for c in 0..bs {
                    let i = r * max * bs + j * bs + c;
                    want[i] = (lin[i] + b1[b * bs + c]).max(0.0);
                }
            }
        }
        close(&got, &want, 1e-6);
        // Untouched: group 1 entirely, and no other slot past a count.
        assert!(got[4 * max * bs..8 * max * bs].iter().all(|&v| v == 7.0));
        assert!(got.contains(&0.0), "some ReLU must clip");
        assert!(got.iter().any(|&v| v > 0.0 && v != 7.0));
    }

    #[test]
    fn fc2_fwd_is_sparse_red_plus_bias_and_residual() {
        let (counts, idx, max, bm, bs, m, hd) = setup();
        let f = 4 * bs;
        let (h, w2) = (data(m * max * bs, 4), data(hd * f, 5));
        let (b2, res) = (data(hd, 6), data(m * hd, 7));
        let list = Blocks {
            counts: &counts,
            indices: &idx,
            max_blocks: max,
            bm,
            bs,
        };
        let got = sparse_fc2_fwd(&h, &w2, &b2, &res, (m, hd, f), list);
        let lin = rm::sparse_red(&h, &w2, m, hd, f, &counts, &idx, max, bm, bs);
        let want: Vec<f32> = (0..m * hd).map(|i| lin[i] + b2[i % hd] + res[i]).collect();
        close(&got, &want, 1e-6);
        // Group 1 (rows 4..8) has count 0: bias and residual only.
        for i in 4 * hd..8 * hd {
            assert!((got[i] - (b2[i % hd] + res[i])).abs() < 1e-6);
        }
        assert!(lin[..4 * hd].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn the_chain_of_sparse_references_is_the_masked_dense_mlp() {
        let (counts, idx, max, bm, bs, m, hd) = setup();
        let f = 4 * bs;
        let (x, w1, b1) = (data(m * hd, 4), data(f * hd, 5), data(f, 6));
        let (w2, b2, dy) = (data(hd * f, 7), data(hd, 8), data(m * hd, 9));
        let list = Blocks {
            counts: &counts,
            indices: &idx,
            max_blocks: max,
            bm,
            bs,
        };
        let zeros = vec![0.0; m * max * bs];
        let h = sparse_fc1_fwd(&x, &w1, &b1, (m, hd, f), list, &zeros);
        let mut y = rm::sparse_red(&h, &w2, m, hd, f, &counts, &idx, max, bm, bs);
        for r in 0..m {
            for p in 0..hd {
                y[r * hd + p] += b2[p];
            }
        }
        let dh = sparse_fc2_dh(&dy, &w2, &h, (m, hd, f), list, &zeros);
        let dx = sparse_fc1_dx(&dh, &w1, (m, hd, f), list);
        let keep = list.dense_mask(m, f);
        let want = masked_mlp(&x, &w1, &b1, &w2, &b2, &dy, &keep, (m, hd, f));
        close(&scatter(&h, (m, f), list), &want.h, 1e-6);
        close(&y, &want.y, 1e-5);
        close(&scatter(&dh, (m, f), list), &want.dh, 1e-5);
        close(&dx, &want.dx, 1e-5);
        // Group 1 keeps nothing: its y is b2 and its dx is 0.
        for r in 4..8 {
            close(&y[r * hd..(r + 1) * hd], &b2, 1e-7);
            assert!(dx[r * hd..(r + 1) * hd].iter().all(|&v| v == 0.0));
        }
        // The mask matters: the full MLP differs.
        let all = vec![true; m * f];
        let full = masked_mlp(&x, &w1, &b1, &w2, &b2, &dy, &all, (m, hd, f));
        assert!(full
            .y
            .iter()
            .zip(&want.y)
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }

    /// The backward is the exact gradient of the masked forward: `dx = ∂(Σ dy ⊙ y)/∂x` by
    /// central differences (the function is piecewise linear, so they are exact away from
    /// ReLU kinks; the step is far smaller than any pre-activation's distance to 0 here).
    #[test]
    fn masked_backward_matches_finite_differences() {
        let (counts, idx, max, bm, bs, m, hd) = setup();
        let f = 4 * bs;
        let (x, w1, b1) = (data(m * hd, 10), data(f * hd, 11), data(f, 12));
        let (w2, b2, dy) = (data(hd * f, 13), data(hd, 14), data(m * hd, 15));
        let list = Blocks {
            counts: &counts,
            indices: &idx,
            max_blocks: max,
            bm,
            bs,
        };
        let keep = list.dense_mask(m, f);
        let base = masked_mlp(&x, &w1, &b1, &w2, &b2, &dy, &keep, (m, hd, f));
        let loss = |x: &[f32]| -> f64 {
            let o = masked_mlp(x, &w1, &b1, &w2, &b2, &dy, &keep, (m, hd, f));
            o.y.iter()
                .zip(&dy)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        let eps = 1e-3f32;
        for i in [0, 5, 17, 33, 40, 79] {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += eps;
            xm[i] -= eps;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * eps as f64);
            let got = base.dx[i] as f64;
            assert!(
                (fd - got).abs() <= 2e-3 * (1.0 + got.abs()),
                "x[{i}]: {fd} vs {got}"
            );
        }
        assert!(base.dx.iter().any(|&v| v.abs() > 1e-2));
    }

    #[test]
    fn dh_is_masked_by_the_compact_h_and_slots_past_count_are_untouched() {
        let list = Blocks {
            counts: &[1],
            indices: &[1, 0],
            max_blocks: 2,
            bm: 8,
            bs: 2,
        };
        // One row, hd = 1: dh = dy·w2[0, 2..4], masked by h.
        let dh = sparse_fc2_dh(
            &[2.0],
            &[5.0, 5.0, 3.0, -1.0],
            &[0.5, 0.0, 9.0, 9.0],
            (1, 1, 4),
            list,
            &[7.0; 4],
        );
        assert_eq!(dh, vec![6.0, 0.0, 7.0, 7.0]);
    }

    #[test]
    fn sparse_colsum_is_the_column_sum_of_the_scattered_gradient() {
        let (counts, indices, max, bm, bs, m, _hd) = setup();
        let f = 4 * bs;
        let list = Blocks {
            counts: &counts,
            indices: &indices,
            max_blocks: max,
            bm,
            bs,
        };
        let dh = data(m * max * bs, 7);
        let dense = scatter(&dh, (m, f), list);
        let init = data(f, 8);
        let got = sparse_colsum(&dh, (m, f), list, &init);
        for n in 0..f {
            let want = init[n] as f64 + (0..m).map(|r| dense[r * f + n] as f64).sum::<f64>();
            assert!(
                (got[n] as f64 - want).abs() < 1e-5,
                "neuron {n}: {} vs {want}",
                got[n]
            );
        }
    }

    #[test]
    fn malformed_input_does_not_panic() {
        let list = Blocks {
            counts: &[5, -1],
            indices: &[99, -3],
            max_blocks: 1,
            bm: 0,
            bs: 4,
        };
        let _ = sparse_fc1_fwd(&[], &[], &[], (3, 2, 8), list, &[]);
        let _ = sparse_fc2_dh(&[], &[], &[], (3, 2, 8), list, &[]);
        let _ = sparse_fc1_dx(&[], &[], (3, 2, 8), list);
        let list = Blocks { bm: 2, ..list };
        assert_eq!(
            sparse_fc1_fwd(&[1.0; 6], &[], &[], (3, 2, 8), list, &[]).len(),
            12
        );
        assert_eq!(
            sparse_fc1_dx(&[1.0; 12], &[], (3, 2, 8), list),
            vec![0.0; 6]
        );
        let _ = scatter(&[], (3, 8), list);
        let _ = list.dense_mask(3, 8);
    }
}
