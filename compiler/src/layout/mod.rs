//! Distributed layouts: which thread holds which element of a tile.
//!
//! A layout is linear over GF(2) on the bits of `(reg, lane, warp)` (COMPILER.md §1): each bit
//! has a *basis*, the coordinate offset it contributes, and an element's coordinate is the XOR
//! (here also the sum: bases of one layout use distinct bits) of the bases of the set bits.
//! A basis of all zeros means the bit does not change the element: the element has several
//! owners (a *broadcast* layout), and stores must be predicated to one owner.
//!
//! Every layout of a kernel is a *projection* of one root [`Layout::blocked`] layout: the value's
//! dimensions map to root dimensions, bases beyond the value's extent drop (modulo), and reg bits
//! that become zero are compacted away. So broadcasting, expanding dims and reducing move values
//! between registers by static index maps ([`Layout::reg_map`]), with no data movement.

use std::fmt;

pub mod mma;
pub mod shared;

/// A linear layout of a tile of static `shape` over `1 << lane.len()` lanes and
/// `1 << warp.len()` warps.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Tile shape.
    pub shape: Vec<usize>,
    /// Basis of each register bit (never all-zero after compaction).
    pub reg: Vec<Vec<usize>>,
    /// Basis of each of the 5 lane bits.
    pub lane: Vec<Vec<usize>>,
    /// Basis of each warp bit.
    pub warp: Vec<Vec<usize>>,
    /// For each register bit, its index among the root layout's register bits.
    pub reg_ids: Vec<usize>,
}

pub(crate) fn log2(x: usize) -> usize {
    x.trailing_zeros() as usize
}

pub(crate) fn unit(rank: usize, d: usize, v: usize) -> Vec<usize> {
    let mut b = vec![0; rank];
    b[d] = v;
    b
}

impl Layout {
    /// The blocked layout of COMPILER.md §1.1 for a rank-1 or rank-2 tile: each thread holds
    /// `vec` consecutive elements along the last (contiguous) dimension, lanes then warps cover
    /// the last dimension first, and what is left repeats in registers (last dim first).
    /// Dimensions smaller than the footprint are covered by duplicate owners.
    pub fn blocked(shape: &[usize], vec: usize, num_warps: usize) -> Layout {
        let rank = shape.len();
        assert!(rank <= 2, "blocked layouts are rank 0..=2");
        assert!(shape.iter().all(|d| d.is_power_of_two()) && num_warps.is_power_of_two());
        if rank == 0 {
            return Layout {
                shape: vec![],
                reg: vec![],
                lane: vec![vec![]; 5],
                warp: vec![vec![]; log2(num_warps)],
                reg_ids: vec![],
            };
        }
        let last = rank - 1;
        let c = shape[last];
        let r = if rank == 2 { shape[0] } else { 1 };
        let vec = vec.clamp(1, c);
        let tc = (c / vec).clamp(1, 32);
        let tr = 32 / tc;
        let wc = (c / (vec * tc)).clamp(1, num_warps);
        let wr = num_warps / wc;
        let (fc, fr) = (vec * tc * wc, tr * wr);
        let mut reg = vec![];
        for b in 0..log2(vec) {
            reg.push(unit(rank, last, 1 << b));
        }
        for b in 0..log2((c / fc).max(1)) {
            reg.push(unit(rank, last, fc << b));
        }
        if rank == 2 {
            for b in 0..log2((r / fr).max(1)) {
                reg.push(unit(rank, 0, fr << b));
            }
        }
        let mut lane = vec![];
        for b in 0..log2(tc) {
            lane.push(unit(rank, last, vec << b));
        }
        for b in 0..log2(tr) {
            lane.push(if rank == 2 {
                unit(rank, 0, 1 << b)
            } else {
                vec![0; rank]
            });
        }
        let mut warp = vec![];
        for b in 0..log2(wc) {
            warp.push(unit(rank, last, (vec * tc) << b));
        }
        for b in 0..log2(wr) {
            warp.push(if rank == 2 {
                unit(rank, 0, tr << b)
            } else {
                vec![0; rank]
            });
        }
        let n = reg.len();
        let full = Layout {
            shape: shape.to_vec(),
            reg,
            lane,
            warp,
            reg_ids: (0..n).collect(),
        };
        let dims: Vec<usize> = (0..rank).collect();
        full.project(&dims, shape)
    }

    /// The layout of a value whose dimension `d` is this layout's dimension `dims[d]`, with
    /// extent `shape[d]` (at most the root's extent, a power of two).
    pub fn project(&self, dims: &[usize], shape: &[usize]) -> Layout {
        let proj = |b: &Vec<usize>| -> Vec<usize> {
            dims.iter()
                .zip(shape)
                .map(|(&rd, &s)| if b[rd] < s { b[rd] } else { 0 })
                .collect()
        };
        let mut reg = vec![];
        let mut reg_ids = vec![];
        for (b, id) in self.reg.iter().zip(&self.reg_ids) {
            let p = proj(b);
            if p.iter().any(|x| *x != 0) {
                reg.push(p);
                reg_ids.push(*id);
            }
        }
        Layout {
            shape: shape.to_vec(),
            reg,
            lane: self.lane.iter().map(proj).collect(),
            warp: self.warp.iter().map(proj).collect(),
            reg_ids,
        }
    }

    /// The same distribution of a rank-2 tile with its two dimensions swapped (what `trans`
    /// needs to be a pure renaming of registers).
    pub fn transpose(&self) -> Layout {
        let sw = |b: &Vec<usize>| -> Vec<usize> {
            if b.len() == 2 {
                vec![b[1], b[0]]
            } else {
                b.clone()
            }
        };
        Layout {
            shape: sw(&self.shape),
            reg: self.reg.iter().map(sw).collect(),
            lane: self.lane.iter().map(sw).collect(),
            warp: self.warp.iter().map(sw).collect(),
            reg_ids: self.reg_ids.clone(),
        }
    }

    /// Registers per thread.
    pub fn num_regs(&self) -> usize {
        1 << self.reg.len()
    }

    /// Rank of the tile.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The static part of register `r`'s coordinate.
    pub fn reg_coord(&self, r: usize) -> Vec<usize> {
        let mut c = vec![0; self.rank()];
        for (j, b) in self.reg.iter().enumerate() {
            if r >> j & 1 == 1 {
                for d in 0..c.len() {
                    c[d] ^= b[d];
                }
            }
        }
        c
    }

    /// The thread part of the coordinate of thread `tid`.
    pub fn thread_coord(&self, tid: usize) -> Vec<usize> {
        let (lane, warp) = (tid % 32, tid / 32);
        let mut c = vec![0; self.rank()];
        for (j, b) in self.lane.iter().enumerate() {
            if lane >> j & 1 == 1 {
                for d in 0..c.len() {
                    c[d] ^= b[d];
                }
            }
        }
        for (j, b) in self.warp.iter().enumerate() {
            if warp >> j & 1 == 1 {
                for d in 0..c.len() {
                    c[d] ^= b[d];
                }
            }
        }
        c
    }

    /// Coordinate of `(tid, reg)`.
    pub fn coord(&self, tid: usize, reg: usize) -> Vec<usize> {
        self.thread_coord(tid)
            .iter()
            .zip(self.reg_coord(reg))
            .map(|(a, b)| a ^ b)
            .collect()
    }

    /// Lane bits whose basis is zero (they only duplicate), as a mask over the lane id.
    pub fn dup_lane_mask(&self) -> u32 {
        self.lane
            .iter()
            .enumerate()
            .filter(|(_, b)| b.iter().all(|x| *x == 0))
            .map(|(j, _)| 1u32 << j)
            .sum()
    }

    /// Warp bits whose basis is zero, as a mask over the warp id.
    pub fn dup_warp_mask(&self) -> u32 {
        self.warp
            .iter()
            .enumerate()
            .filter(|(_, b)| b.iter().all(|x| *x == 0))
            .map(|(j, _)| 1u32 << j)
            .sum()
    }

    /// For each register of `self`, the register of `other` holding the element `other` is
    /// derived from (other's register bits must be a subset of self's). `None` otherwise.
    pub fn reg_map(&self, other: &Layout) -> Option<Vec<usize>> {
        let pos: Vec<usize> = other
            .reg_ids
            .iter()
            .map(|id| self.reg_ids.iter().position(|x| x == id))
            .collect::<Option<Vec<_>>>()?;
        Some(
            (0..self.num_regs())
                .map(|r| pos.iter().enumerate().map(|(j, p)| (r >> p & 1) << j).sum())
                .collect(),
        )
    }

    /// Number of leading register bits that step by 1, 2, 4, .. along the last dimension:
    /// the longest run of consecutive elements a thread holds (its widest vector), as a count.
    pub fn contiguous_regs(&self) -> usize {
        let Some(last) = self.rank().checked_sub(1) else {
            return 1;
        };
        let mut n = 0;
        for (j, b) in self.reg.iter().enumerate() {
            if *b == unit(self.rank(), last, 1 << j) {
                n += 1;
            } else {
                break;
            }
        }
        1 << n
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |bs: &Vec<Vec<usize>>| -> String {
            bs.iter()
                .map(|b| {
                    format!(
                        "[{}]",
                        b.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        write!(
            f,
            "#linear<reg {{{}}} lane {{{}}} warp {{{}}}>",
            show(&self.reg),
            show(&self.lane),
            show(&self.warp)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(l: &Layout, threads: usize) -> std::collections::HashMap<Vec<usize>, usize> {
        let mut m = std::collections::HashMap::new();
        for t in 0..threads {
            for r in 0..l.num_regs() {
                *m.entry(l.coord(t, r)).or_insert(0) += 1;
            }
        }
        m
    }

    #[test]
    fn blocked_is_a_bijection_when_the_tile_covers_the_footprint() {
        for (shape, vec, warps) in [
            (vec![128, 64], 8, 4),
            (vec![32, 128], 4, 4),
            (vec![1024], 8, 4),
            (vec![64, 256], 8, 8),
        ] {
            let l = Layout::blocked(&shape, vec, warps);
            let o = owners(&l, warps * 32);
            assert_eq!(o.len(), shape.iter().product::<usize>(), "{shape:?}");
            assert!(o.values().all(|c| *c == 1), "{shape:?}: duplicate owners");
        }
    }

    #[test]
    fn small_tiles_get_duplicate_owners_and_a_dup_mask() {
        let l = Layout::blocked(&[2, 64], 8, 4);
        let o = owners(&l, 128);
        assert_eq!(o.len(), 128);
        // 128 threads x 8 registers over 128 elements: every element has 8 owners.
        assert!(o.values().all(|c| *c == 8));
        assert_ne!(l.dup_lane_mask() | l.dup_warp_mask(), 0);
    }

    #[test]
    fn coalescing_table_of_compiler_md() {
        // A [128, 64] bf16 (vec 8, 4 warps): tpw [4, 8], wpc [4, 1]: lanes 0-2 along cols.
        let l = Layout::blocked(&[128, 64], 8, 4);
        assert_eq!(l.lane[0], vec![0, 8]);
        assert_eq!(l.lane[2], vec![0, 32]);
        assert_eq!(l.lane[3], vec![1, 0]);
        assert_eq!(l.warp[0], vec![4, 0]);
        assert_eq!(l.contiguous_regs(), 8);
        assert_eq!(l.num_regs(), 8 * 8);
    }

    #[test]
    fn projection_and_reg_maps() {
        let root = Layout::blocked(&[32, 128], 8, 4);
        let col = root.project(&[1], &[128]);
        let row = root.project(&[0], &[32]);
        let scalar = root.project(&[], &[]);
        assert_eq!(scalar.num_regs(), 1);
        let m = root.reg_map(&col).unwrap();
        for t in 0..128 {
            for r in 0..root.num_regs() {
                assert_eq!(root.coord(t, r)[1], col.coord(t, m[r])[0]);
            }
        }
        let m = root.reg_map(&row).unwrap();
        for t in 0..128 {
            for r in 0..root.num_regs() {
                assert_eq!(root.coord(t, r)[0], row.coord(t, m[r])[0]);
            }
        }
    }
}
