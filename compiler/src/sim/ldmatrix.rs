//! `ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16` (PTX ISA 9.7.14.5.15).
//!
//! Lanes `8q .. 8q+7` supply the row start addresses of matrix `q` (lane `8q+r` -> row `r`); each
//! row is eight consecutive 16-bit values. Result register `q` of lane `l` holds, low half
//! first, row `l/4`, columns `2(l%4)` and `2(l%4)+1` of matrix `q`; with `.trans`, the same of
//! the transposed matrix (stored rows `2(l%4)`, `2(l%4)+1`, column `l/4`).

/// Shared memory as 16-bit words, addressed in bytes.
pub struct Smem<'a>(pub &'a [u16]);

impl Smem<'_> {
    fn at(&self, byte: usize) -> u16 {
        self.0[byte / 2]
    }
}

/// The registers `ldmatrix` returns: `out[lane][q] = (low, high)` for `q < num`.
pub fn ldmatrix(
    smem: &Smem<'_>,
    addrs: &[usize; 32],
    num: usize,
    trans: bool,
) -> [[(u16, u16); 4]; 32] {
    let mut out = [[(0u16, 0u16); 4]; 32];
    for (l, regs) in out.iter_mut().enumerate() {
        for (q, reg) in regs.iter_mut().enumerate().take(num) {
            let row_addr = |r: usize| addrs[8 * q + r];
            *reg = if trans {
                let col = l / 4;
                (
                    smem.at(row_addr(2 * (l % 4)) + 2 * col),
                    smem.at(row_addr(2 * (l % 4) + 1) + 2 * col),
                )
            } else {
                let row = l / 4;
                (
                    smem.at(row_addr(row) + 2 * (2 * (l % 4))),
                    smem.at(row_addr(row) + 2 * (2 * (l % 4) + 1)),
                )
            };
        }
    }
    out
}
