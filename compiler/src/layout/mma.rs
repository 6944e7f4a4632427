//! Tensor-core fragment layouts for `mma.sync.aligned.m16n8k16` (COMPILER.md §1.3, §1.4, §2):
//! the f32 accumulator (`Mma`) and the 16-bit A and B operands (`DotA`, `DotB`), tiled over a
//! CTA tile of `wm x wn` warps. They are linear layouts like the blocked ones, so the same
//! machinery (coordinates, register maps, duplicate detection) applies; the tests check them
//! against a literal transcription of the PTX ISA fragment tables for every lane.
//!
//! Conventions: `g = lane >> 2`, `t = lane & 3`; warp placement `warp_m = warp % wm`,
//! `warp_n = warp / wm` (M fastest); warp tile `WM = BM / wm`, `WN = BN / wn`.

use super::{log2, unit, Layout};

/// Why a fragment layout cannot be built for the given tile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tensor-core tile {what}: {why}")]
pub struct MmaShapeError {
    pub what: String,
    pub why: String,
}

fn check(what: &str, ok: bool, why: &str) -> Result<(), MmaShapeError> {
    if ok {
        Ok(())
    } else {
        Err(MmaShapeError {
            what: what.to_string(),
            why: why.to_string(),
        })
    }
}

fn warp_bases(
    wm: usize,
    wn: usize,
    m_step: Option<usize>,
    n_step: Option<usize>,
) -> Vec<Vec<usize>> {
    let mut w = vec![];
    for b in 0..log2(wm) {
        w.push(match m_step {
            Some(s) => unit(2, 0, s << b),
            None => vec![0, 0],
        });
    }
    for b in 0..log2(wn) {
        w.push(match n_step {
            Some(s) => unit(2, 1, s << b),
            None => vec![0, 0],
        });
    }
    w
}

fn finish(
    shape: [usize; 2],
    reg: Vec<Vec<usize>>,
    lane: Vec<Vec<usize>>,
    warp: Vec<Vec<usize>>,
) -> Layout {
    let n = reg.len();
    Layout {
        shape: shape.to_vec(),
        reg,
        lane,
        warp,
        reg_ids: (0..n).collect(),
    }
}

/// The warp grid of a *warpgroup-shaped* accumulator, when the tile allows one: every warp owns
/// 16 full rows of its warpgroup's `64 x (bn / wn)` piece, which is exactly the register layout
/// of Hopper's `wgmma.m64nNk16` (COMPILER.md §8.1), so sm_90 can use `wgmma` and sm_80 the same
/// layout with `mma.sync`. Needs warps in groups of 4, `bm` a multiple of 64 with `bm / 16`
/// warps along M, and `8 <= bn / wn <= 256`.
pub fn wgmma_grid(bm: usize, bn: usize, num_warps: usize) -> Option<(usize, usize)> {
    if !num_warps.is_multiple_of(4) || !bm.is_multiple_of(64) {
        return None;
    }
    let wm = bm / 16;
    if wm > num_warps || !num_warps.is_multiple_of(wm) {
        return None;
    }
    let wn = num_warps / wm;
    let wtn = bn / wn;
    (bn.is_multiple_of(wn) && wtn.is_multiple_of(8) && (8..=256).contains(&wtn)).then_some((wm, wn))
}

/// The warp grid `wm x wn` for a `bm x bn` accumulator tile on `num_warps` warps: warp tiles as
/// square as possible (ties: taller), each at least 16 x 8. When the tile is too small for all
/// warps, the grid uses fewer (the rest duplicate work).
pub fn warp_grid(bm: usize, bn: usize, num_warps: usize) -> (usize, usize) {
    let mut best: Option<(usize, usize, i64)> = None;
    let mut w = num_warps.max(1);
    while best.is_none() && w >= 1 {
        let mut wm = 1;
        while wm <= w {
            let wn = w / wm;
            if bm / wm >= 16
                && bn / wn >= 8
                && bm.is_multiple_of(16 * wm)
                && bn.is_multiple_of(8 * wn)
            {
                let skew = (log2(bm / wm) as i64 - log2(bn / wn) as i64).abs();
                let better = match best {
                    None => true,
                    Some((bwm, _, bs)) => skew < bs || (skew == bs && wm < bwm),
                };
                if better {
                    best = Some((wm, wn, skew));
                }
            }
            wm *= 2;
        }
        w /= 2;
    }
    best.map(|(m, n, _)| (m, n)).unwrap_or((1, 1))
}

/// Register bases repeating a `step`-sized fragment `count` times along `dim` (count a power of
/// two): `step, 2*step, 4*step, ..`.
fn repeats(reg: &mut Vec<Vec<usize>>, dim: usize, step: usize, count: usize) {
    for b in 0..log2(count) {
        reg.push(unit(2, dim, step << b));
    }
}

fn powers(x: &[usize]) -> bool {
    x.iter().all(|v| v.is_power_of_two())
}

impl Layout {
    /// The f32 accumulator of a `bm x bn` CTA tile over `wm x wn` warps:
    /// `reg = (im*Nr + in)*4 + j`, `row = warp_m*WM + 16*im + g + 8*(j>>1)`,
    /// `col = warp_n*WN + 8*in + 2t + (j&1)`.
    pub fn mma_acc(bm: usize, bn: usize, wm: usize, wn: usize) -> Result<Layout, MmaShapeError> {
        let what = format!("acc [{bm}, {bn}] on {wm}x{wn} warps");
        check(
            &what,
            powers(&[bm, bn, wm, wn]),
            "extents and warp counts must be powers of two",
        )?;
        let (wtm, wtn) = (bm / wm, bn / wn);
        check(
            &what,
            wtm >= 16 && wtn >= 8,
            "each warp needs at least a 16x8 tile",
        )?;
        let mut reg = vec![unit(2, 1, 1), unit(2, 0, 8)];
        repeats(&mut reg, 1, 8, wtn / 8);
        repeats(&mut reg, 0, 16, wtm / 16);
        let lane = vec![
            unit(2, 1, 2),
            unit(2, 1, 4),
            unit(2, 0, 1),
            unit(2, 0, 2),
            unit(2, 0, 4),
        ];
        Ok(finish(
            [bm, bn],
            reg,
            lane,
            warp_bases(wm, wn, Some(wtm), Some(wtn)),
        ))
    }

    /// The accumulator layout of a `bm x bn` tile on `num_warps` warps, with the warp grid
    /// chosen by [`warp_grid`]. Warps beyond what the tile can use hold copies.
    pub fn mma_acc_for(bm: usize, bn: usize, num_warps: usize) -> Result<Layout, MmaShapeError> {
        let (wm, wn) =
            wgmma_grid(bm, bn, num_warps).unwrap_or_else(|| warp_grid(bm, bn, num_warps));
        let mut l = Layout::mma_acc(bm, bn, wm, wn)?;
        while (1usize << l.warp.len()) < num_warps {
            l.warp.push(vec![0, 0]);
        }
        Ok(l)
    }

    /// `(wm, wn)` of an accumulator layout made by [`Layout::mma_acc_for`].
    pub fn mma_warp_grid(&self) -> (usize, usize) {
        let along = |d: usize| 1usize << self.warp.iter().filter(|b| b[d] != 0).count();
        (along(0), along(1))
    }

    /// The A operand `[bm, bk]` (16-bit, two values per 32-bit register), replicated over the
    /// `wn` warps of a warp row: `reg = (im*(BK/16) + ik)*8 + j`,
    /// `row = warp_m*WM + 16*im + g + 8*((j>>1)&1)`, `col = 16*ik + 2t + (j&1) + 8*(j>>2)`.
    pub fn dot_a(bm: usize, bk: usize, wm: usize, wn: usize) -> Result<Layout, MmaShapeError> {
        let what = format!("A [{bm}, {bk}] on {wm}x{wn} warps");
        check(
            &what,
            powers(&[bm, bk, wm, wn]),
            "extents and warp counts must be powers of two",
        )?;
        let wtm = bm / wm;
        check(
            &what,
            wtm >= 16 && bk >= 16,
            "A needs at least 16 rows per warp and k >= 16",
        )?;
        let mut reg = vec![unit(2, 1, 1), unit(2, 0, 8), unit(2, 1, 8)];
        repeats(&mut reg, 1, 16, bk / 16);
        repeats(&mut reg, 0, 16, wtm / 16);
        let lane = vec![
            unit(2, 1, 2),
            unit(2, 1, 4),
            unit(2, 0, 1),
            unit(2, 0, 2),
            unit(2, 0, 4),
        ];
        Ok(finish(
            [bm, bk],
            reg,
            lane,
            warp_bases(wm, wn, Some(wtm), None),
        ))
    }

    /// The B operand `[bk, bn]` (k = row, n = col), replicated over the `wm` warps of a warp
    /// column: `reg = (in*(BK/16) + ik)*4 + j`, `k = 16*ik + 2t + (j&1) + 8*(j>>1)`,
    /// `n = warp_n*WN + 8*in + g`.
    pub fn dot_b(bk: usize, bn: usize, wm: usize, wn: usize) -> Result<Layout, MmaShapeError> {
        let what = format!("B [{bk}, {bn}] on {wm}x{wn} warps");
        check(
            &what,
            powers(&[bk, bn, wm, wn]),
            "extents and warp counts must be powers of two",
        )?;
        let wtn = bn / wn;
        check(
            &what,
            wtn >= 8 && bk >= 16,
            "B needs at least 8 columns per warp and k >= 16",
        )?;
        let mut reg = vec![unit(2, 0, 1), unit(2, 0, 8)];
        repeats(&mut reg, 0, 16, bk / 16);
        repeats(&mut reg, 1, 8, wtn / 8);
        let lane = vec![
            unit(2, 0, 2),
            unit(2, 0, 4),
            unit(2, 1, 1),
            unit(2, 1, 2),
            unit(2, 1, 4),
        ];
        Ok(finish(
            [bk, bn],
            reg,
            lane,
            warp_bases(wm, wn, None, Some(wtn)),
        ))
    }
}

/// The *mma-to-dot shortcut* (COMPILER.md §1.7): whether a 16-bit `dot` A operand `[bm, bk]`
/// held in layout `a` already *is*, register for register, the A fragment the `dot` producing
/// an accumulator in layout `result` needs, so that the MMA can take it from registers (packed
/// in pairs with `cvt.rn.{bf16,f16}x2.f32`) instead of through shared memory.
///
/// That holds exactly when `a` equals the DotA layout ([`Layout::dot_a`]) of `result`'s warp
/// grid, as bases (`reg_ids` are bookkeeping of projections and do not matter). For an operand
/// that comes from an accumulator (a cast of the f32 tile of an earlier `dot`, as `P` in flash
/// attention) that means: the accumulator is `[bm, bk]` with the same rows per warp as
/// `result`, and its warps are all along M (`wn == 1`: every warp owns whole rows, all `bk`
/// columns of them), since then the Mma layout of §1.3 with `WN = bk` and the DotA layout of
/// §1.4 have identical bases: k-tile `i` of the A fragment is the C fragments of n-tiles `2i`
/// and `2i + 1`, in the same register order. With `wn > 1` each warp holds only `bk / wn`
/// columns of its rows, and an accumulator of another width does not have the DotA shape.
pub fn dot_a_in_registers(a: &Layout, result: &Layout, bk: usize) -> bool {
    if a.rank() != 2 || result.rank() != 2 || a.shape != [result.shape[0], bk] {
        return false;
    }
    let (wm, wn) = result.mma_warp_grid();
    let Ok(mut want) = Layout::dot_a(result.shape[0], bk, wm, wn) else {
        return false;
    };
    // Warps a small tile cannot use hold copies (as in `mma_acc_for`).
    while want.warp.len() < result.warp.len() {
        want.warp.push(vec![0, 0]);
    }
    // The result must be an accumulator on that grid (rows of warp `w` of the A operand are the
    // rows warp `w` accumulates).
    let Ok(mut acc) = Layout::mma_acc(result.shape[0], result.shape[1], wm, wn) else {
        return false;
    };
    while acc.warp.len() < result.warp.len() {
        acc.warp.push(vec![0, 0]);
    }
    let same = |x: &Layout, y: &Layout| x.reg == y.reg && x.lane == y.lane && x.warp == y.warp;
    same(&acc, result) && same(a, &want)
}

/// For an A operand held in the DotA layout (see [`dot_a_in_registers`]): the operand registers
/// `(low, high)` that `.b32` register `q` of the A fragment of m-tile `im`, k-tile `ik` packs,
/// for a `K = kk` operand. DotA register `(im*(kk/16) + ik)*8 + j` holds fragment element `j`
/// (§1.4), and fragment register `q` holds elements `2q` (low half) and `2q + 1` (high half).
/// Seen from the accumulator the operand was cast from: k-tile `ik` = the C fragments of n-tiles
/// `2ik` (registers 0, 1) and `2ik + 1` (registers 2, 3).
pub fn dot_a_fragment_regs(im: usize, ik: usize, kk: usize) -> [(usize, usize); 4] {
    let first = (im * (kk / 16) + ik) * 8;
    std::array::from_fn(|q| (first + 2 * q, first + 2 * q + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warpgroup_shaped_grids() {
        // 8 warps on 128 rows: 16 rows each, two warpgroups of 64 x BN.
        assert_eq!(wgmma_grid(128, 128, 8), Some((8, 1)));
        assert_eq!(wgmma_grid(128, 256, 8), Some((8, 1)));
        assert_eq!(wgmma_grid(64, 256, 8), Some((4, 2)));
        assert_eq!(wgmma_grid(128, 16, 8), Some((8, 1)));
        // Not possible: 4 warps cannot cover 128 rows in 16-row slices; a 16-row tile has no
        // warpgroup; 512 columns exceed wgmma's N.
        assert_eq!(wgmma_grid(128, 128, 4), None);
        assert_eq!(wgmma_grid(16, 128, 4), None);
        assert_eq!(wgmma_grid(64, 512, 4), None);
        // Such layouts are the m16n8 fragment repeated over N per warp: wgmma's register order.
        let l = Layout::mma_acc_for(128, 128, 8).unwrap();
        assert_eq!(l.mma_warp_grid(), (8, 1));
        for lane in 0..32 {
            for v in 0..64 {
                let (g, t) = (lane >> 2, lane & 3);
                let want = vec![
                    g + 8 * ((v >> 1) & 1) + 16 * 3,
                    8 * (v >> 2) + 2 * t + (v & 1),
                ];
                assert_eq!(
                    l.coord(3 * 32 + lane, v),
                    want,
                    "warp 3 lane {lane} reg {v}"
                );
            }
        }
        // Without a warpgroup shape, the squarest warp tiles (the sm_80 choice).
        assert_eq!(
            Layout::mma_acc_for(128, 128, 4).unwrap().mma_warp_grid(),
            (2, 2)
        );
    }

    // Literal transcriptions of PTX ISA 9.7.14.5.8 (m16n8k16, 16-bit A/B, f32 C/D), element `i`
    // of the fragment held by lane (g, t).
    fn isa_a(lane: usize, i: usize) -> (usize, usize) {
        let (g, t) = (lane >> 2, lane & 3);
        (g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2))
    }
    fn isa_b(lane: usize, i: usize) -> (usize, usize) {
        let (g, t) = (lane >> 2, lane & 3);
        (2 * t + (i & 1) + 8 * (i >> 1), g)
    }
    fn isa_c(lane: usize, i: usize) -> (usize, usize) {
        let (g, t) = (lane >> 2, lane & 3);
        (g + 8 * (i >> 1), 2 * t + (i & 1))
    }

    #[test]
    fn single_mma_fragments_match_the_isa_tables() {
        let (a, b, c) = (
            Layout::dot_a(16, 16, 1, 1).unwrap(),
            Layout::dot_b(16, 8, 1, 1).unwrap(),
            Layout::mma_acc(16, 8, 1, 1).unwrap(),
        );
        assert_eq!((a.num_regs(), b.num_regs(), c.num_regs()), (8, 4, 4));
        for lane in 0..32 {
            for i in 0..8 {
                let (r, k) = isa_a(lane, i);
                assert_eq!(a.coord(lane, i), vec![r, k], "A lane {lane} element {i}");
            }
            for i in 0..4 {
                let (k, n) = isa_b(lane, i);
                assert_eq!(b.coord(lane, i), vec![k, n], "B lane {lane} element {i}");
                let (r, n) = isa_c(lane, i);
                assert_eq!(c.coord(lane, i), vec![r, n], "C lane {lane} element {i}");
            }
        }
    }

    #[test]
    fn tiled_fragments_follow_the_compiler_md_formulas() {
        // 128x128 CTA tile, 2x2 warps (64x64 warp tiles), BK = 32.
        let (bm, bn, bk, wm, wn) = (128, 128, 32, 2, 2);
        let (wtm, wtn) = (bm / wm, bn / wn);
        let (mr, nr, kr) = (wtm / 16, wtn / 8, bk / 16);
        let acc = Layout::mma_acc(bm, bn, wm, wn).unwrap();
        let a = Layout::dot_a(bm, bk, wm, wn).unwrap();
        let b = Layout::dot_b(bk, bn, wm, wn).unwrap();
        assert_eq!(acc.num_regs(), 4 * mr * nr);
        for tid in 0..wm * wn * 32 {
            let (warp, lane) = (tid / 32, tid % 32);
            let (warp_m, warp_n) = (warp % wm, warp / wm);
            for im in 0..mr {
                for inn in 0..nr {
                    for j in 0..4 {
                        let (r, c) = isa_c(lane, j);
                        let want = vec![warp_m * wtm + 16 * im + r, warp_n * wtn + 8 * inn + c];
                        assert_eq!(acc.coord(tid, (im * nr + inn) * 4 + j), want);
                    }
                }
                for ik in 0..kr {
                    for j in 0..8 {
                        let (r, k) = isa_a(lane, j);
                        assert_eq!(
                            a.coord(tid, (im * kr + ik) * 8 + j),
                            vec![warp_m * wtm + 16 * im + r, 16 * ik + k]
                        );
                    }
                }
            }
            for inn in 0..nr {
                for ik in 0..kr {
                    for j in 0..4 {
                        let (k, n) = isa_b(lane, j);
                        assert_eq!(
                            b.coord(tid, (inn * kr + ik) * 4 + j),
                            vec![16 * ik + k, warp_n * wtn + 8 * inn + n]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn accumulators_are_bijective_and_operands_replicated() {
        for (bm, bn, wm, wn) in [
            (128, 128, 2, 2),
            (128, 128, 2, 4),
            (64, 128, 4, 1),
            (16, 8, 1, 1),
        ] {
            let count = |l: &Layout| {
                let mut m = std::collections::HashMap::new();
                for tid in 0..wm * wn * 32 {
                    for r in 0..l.num_regs() {
                        *m.entry(l.coord(tid, r)).or_insert(0usize) += 1;
                    }
                }
                m
            };
            let acc = count(&Layout::mma_acc(bm, bn, wm, wn).unwrap());
            assert_eq!(acc.len(), bm * bn);
            assert!(acc.values().all(|c| *c == 1), "acc {bm}x{bn} {wm}x{wn}");
            let a = count(&Layout::dot_a(bm, 32, wm, wn).unwrap());
            assert!(
                a.len() == bm * 32 && a.values().all(|c| *c == wn),
                "A is replicated over wn warps"
            );
            let b = count(&Layout::dot_b(32, bn, wm, wn).unwrap());
            assert!(
                b.len() == 32 * bn && b.values().all(|c| *c == wm),
                "B is replicated over wm warps"
            );
        }
    }

    #[test]
    fn bad_tiles_are_errors() {
        assert!(Layout::mma_acc(16, 8, 2, 1).is_err(), "8-row warp tile");
        assert!(Layout::dot_a(48, 16, 1, 1).is_err(), "not a power of two");
        assert!(Layout::dot_b(8, 8, 1, 1).is_err(), "k < 16");
    }
}
