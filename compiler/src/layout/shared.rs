//! Shared-memory tile layouts: swizzled 128/64/32-byte panels (COMPILER.md §1.5).
//!
//! A tile of `rows x cols` elements (cols contiguous) is stored as `cols / P` panels of
//! `rows x swz` bytes, `P = swz / elem` columns each. Inside a panel, the 16-byte chunk index of a
//! row is XORed with a per-row phase, so that the eight rows an `ldmatrix` phase reads fall into
//! eight different bank groups. On one panel this is CuTe's `Swizzle<B, 4, 3>` (B = 3, 2, 1 for
//! 128, 64, 32 bytes), also the layout TMA's `SWIZZLE_128B/64B/32B` writes and `wgmma` reads.

/// A swizzled shared-memory layout of one tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    pub rows: usize,
    pub cols: usize,
    /// Element size in bytes.
    pub elem: usize,
    /// Swizzle width in bytes: 128, 64, 32, or 0 (no XOR; rows padded by 16 bytes).
    pub swz: usize,
}

impl SharedLayout {
    /// The choice rule of COMPILER.md §1.5: 128-byte swizzle when a row has at least 128 bytes,
    /// else the row's byte width (64 or 32); below 32 bytes no swizzle, 16-byte row padding.
    pub fn choose(rows: usize, cols: usize, elem: usize) -> SharedLayout {
        let row_bytes = cols * elem;
        let swz = if row_bytes >= 128 {
            128
        } else if row_bytes == 64 || row_bytes == 32 {
            row_bytes
        } else {
            0
        };
        SharedLayout {
            rows,
            cols,
            elem,
            swz,
        }
    }

    /// Columns per panel.
    pub fn panel_cols(&self) -> usize {
        if self.swz == 0 {
            self.cols
        } else {
            self.swz / self.elem
        }
    }

    fn phase(&self, r: usize) -> usize {
        match self.swz {
            128 => r & 7,
            64 => (r >> 1) & 3,
            32 => (r >> 2) & 1,
            _ => 0,
        }
    }

    /// Byte offset of element `(r, c)`.
    pub fn offset(&self, r: usize, c: usize) -> usize {
        if self.swz == 0 {
            let pitch = self.cols * self.elem + 16;
            return r * pitch + c * self.elem;
        }
        let p_cols = self.panel_cols();
        let (p, cc) = (c / p_cols, c % p_cols);
        let ch = (cc * self.elem) / 16;
        p * self.rows * self.swz
            + r * self.swz
            + ((ch ^ self.phase(r)) * 16)
            + (cc * self.elem) % 16
    }

    /// Total bytes.
    pub fn bytes(&self) -> usize {
        if self.swz == 0 {
            self.rows * (self.cols * self.elem + 16)
        } else {
            self.rows * self.cols * self.elem
        }
    }

    /// Required alignment of the tile's base (the swizzle pattern's repeat).
    pub fn base_alignment(&self) -> usize {
        match self.swz {
            128 => 1024,
            64 => 512,
            32 => 256,
            _ => 16,
        }
    }
}

/// CuTe's `Swizzle<b, 4, 3>` on a byte offset: bits `[4, 4+b)` ^= bits `[7, 7+b)`.
pub fn cute_swizzle(b: u32, offset: usize) -> usize {
    let mask = ((1usize << b) - 1) << 4;
    offset ^ ((offset >> 3) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn one_panel_is_cute_swizzle() {
        for (swz, b) in [(128usize, 3u32), (64, 2), (32, 1)] {
            for elem in [2usize, 4] {
                let l = SharedLayout {
                    rows: 64,
                    cols: swz / elem,
                    elem,
                    swz,
                };
                for r in 0..l.rows {
                    for c in 0..l.cols {
                        let linear = r * swz + c * elem;
                        assert_eq!(
                            l.offset(r, c),
                            cute_swizzle(b, linear),
                            "swz {swz} elem {elem} ({r}, {c})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bijective_and_keeps_16_byte_chunks_together() {
        for (rows, cols, elem) in [
            (64, 64, 2),
            (128, 32, 2),
            (32, 16, 2),
            (64, 32, 4),
            (16, 8, 2),
            (8, 4, 2),
        ] {
            let l = SharedLayout::choose(rows, cols, elem);
            let mut seen = HashSet::new();
            for r in 0..rows {
                for c in 0..cols {
                    let o = l.offset(r, c);
                    assert!(o + elem <= l.bytes(), "{l:?} ({r}, {c}) out of range");
                    assert!(seen.insert(o), "{l:?}: ({r}, {c}) collides");
                    // Elements of one logical 16-byte chunk stay one physical chunk, in order.
                    let per = 16 / elem;
                    if c % per != 0 {
                        assert_eq!(
                            o,
                            l.offset(r, c - 1) + elem,
                            "{l:?}: chunk split at ({r}, {c})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn choice_rule() {
        assert_eq!(SharedLayout::choose(128, 64, 2).swz, 128);
        assert_eq!(SharedLayout::choose(128, 32, 2).swz, 64);
        assert_eq!(SharedLayout::choose(128, 16, 2).swz, 32);
        assert_eq!(SharedLayout::choose(128, 8, 2).swz, 0);
        assert_eq!(SharedLayout::choose(128, 64, 2).base_alignment(), 1024);
    }
}
