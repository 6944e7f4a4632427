//! The mma-to-dot register shortcut (COMPILER.md §1.7), emulated lane by lane: an f32
//! accumulator whose warps own whole rows becomes the 16-bit A operand of the next MMA by
//! packing register pairs with `cvt.rn.{bf16,f16}x2.f32`, instead of a round trip through
//! shared memory (store in the accumulator layout, barrier, `ldmatrix`).
//!
//! [`cvt_rn_x2`] is written from the PTX ISA text of `cvt` ("for `.f16x2` and `.bf16x2`
//! instruction type, two inputs `a` and `b` of `.f32` type are converted into `.f16` or `.bf16`
//! type and the converted values are packed in the destination register `d`, such that the
//! value converted from input `a` is stored in the upper half of `d` and the value converted
//! from input `b` is stored in the lower half of `d`"); [`a_fragment_from_acc`] applies the
//! register choice codegen uses ([`crate::layout::mma::dot_a_fragment_regs`]). The tests stage
//! the same accumulator through a swizzled shared tile and read it back with the `ldmatrix`
//! emulator, as the fallback path does, and require identical registers for every lane; and
//! check that `wgmma`'s register-A fragment (CuTe's `ALayout_64x16`) is that same A fragment
//! per warp of the warpgroup, so one packing serves `mma.sync` and `wgmma`.

/// A 16-bit floating-point MMA operand type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    /// The bits of `x` rounded to nearest, ties to even (`.rn`).
    pub fn round_bits(self, x: f32) -> u16 {
        match self {
            Half::Bf16 => half::bf16::from_f32(x).to_bits(),
            Half::F16 => half::f16::from_f32(x).to_bits(),
        }
    }
}

/// `cvt.rn.{bf16x2,f16x2}.f32 d, a, b`: `a` (the *first* source) goes to the upper half.
pub fn cvt_rn_x2(ty: Half, a: f32, b: f32) -> u32 {
    (ty.round_bits(a) as u32) << 16 | ty.round_bits(b) as u32
}

/// The four `.b32` A-fragment registers of m-tile `im`, k-tile `ik` that one thread builds from
/// its accumulator registers `acc` (an operand `[.., kk]` in the DotA = accumulator layout):
/// register `q` = `cvt(high, low)` of the register pair codegen picks.
pub fn a_fragment_from_acc(ty: Half, acc: &[f32], im: usize, ik: usize, kk: usize) -> [u32; 4] {
    let regs = crate::layout::mma::dot_a_fragment_regs(im, ik, kk);
    std::array::from_fn(|q| {
        let (lo, hi) = regs[q];
        cvt_rn_x2(ty, acc[hi], acc[lo])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::mma::dot_a_in_registers;
    use crate::layout::shared::SharedLayout;
    use crate::layout::Layout;
    use crate::sim::ldmatrix::{ldmatrix, Smem};
    use crate::sim::mma::mma_m16n8k16;

    /// Deterministic values with bits below bf16/f16 precision, both signs, some exact ties.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let x = ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0;
                if i % 17 == 0 {
                    // A tie between two bf16 values: exercises round-to-even.
                    1.0 + 3.0 / 256.0
                } else {
                    x
                }
            })
            .collect()
    }

    /// For an accumulator `[m, kk]` on `warps` warps: every thread's shortcut fragments equal
    /// what `ldmatrix.x4` (COMPILER.md §3.2, A stored `[M][K]`) returns from the tile staged
    /// in shared memory in the rounded type, lane by lane. Returns the number of fragments
    /// compared.
    fn shortcut_equals_ldmatrix(ty: Half, m: usize, kk: usize, warps: usize) -> usize {
        let acc = Layout::mma_acc_for(m, kk, warps).unwrap();
        let (wm, wn) = acc.mma_warp_grid();
        assert_eq!(wn, 1, "[{m}, {kk}] on {warps} warps: warps along M only");
        // The next dot's result (`[m, 64]`, same rows per warp): the layout pass's decision.
        let result = Layout::mma_acc_for(m, 64, warps).unwrap();
        assert!(dot_a_in_registers(&acc, &result, kk));
        let x = values(m * kk, (m * 31 + kk * 7 + warps) as u64);
        // Shared tile of the fallback path: the rounded values at their swizzled offsets.
        let sl = SharedLayout::choose(m, kk, 2);
        let mut smem = vec![0u16; sl.bytes() / 2];
        for r in 0..m {
            for c in 0..kk {
                smem[sl.offset(r, c) / 2] = ty.round_bits(x[r * kk + c]);
            }
        }
        let wtm = m / wm;
        let mut compared = 0;
        for warp in 0..warps {
            // Every lane's accumulator registers, in the Mma layout.
            let regs: Vec<Vec<f32>> = (0..32)
                .map(|lane| {
                    (0..acc.num_regs())
                        .map(|reg| {
                            let p = acc.coord(32 * warp + lane, reg);
                            x[p[0] * kk + p[1]]
                        })
                        .collect()
                })
                .collect();
            let warp_m = warp % wm;
            for im in 0..wtm / 16 {
                for ik in 0..kk / 16 {
                    let (m0, k0) = (warp_m * wtm + 16 * im, 16 * ik);
                    let addrs: [usize; 32] = std::array::from_fn(|lane| {
                        let (q, r8) = (lane >> 3, lane & 7);
                        sl.offset(m0 + r8 + 8 * (q & 1), k0 + 8 * (q >> 1))
                    });
                    let loaded = ldmatrix(&Smem(&smem), &addrs, 4, false);
                    for lane in 0..32 {
                        let got = a_fragment_from_acc(ty, &regs[lane], im, ik, kk);
                        for q in 0..4 {
                            let (lo, hi) = loaded[lane][q];
                            let want = (hi as u32) << 16 | lo as u32;
                            assert_eq!(
                                got[q], want,
                                "{ty:?} [{m},{kk}] warp {warp} tile ({im},{ik}) lane {lane} reg {q}"
                            );
                        }
                        compared += 1;
                    }
                }
            }
        }
        compared
    }

    #[test]
    fn register_packing_equals_ldmatrix_from_the_staged_tile() {
        for ty in [Half::Bf16, Half::F16] {
            // Flash attention's P tiles (128 x 64/128 on 8 warps), 4-warp ones, a 64-row tile.
            for (m, kk, warps) in [(128, 64, 8), (128, 128, 8), (64, 64, 4), (64, 32, 4)] {
                let n = shortcut_equals_ldmatrix(ty, m, kk, warps);
                assert_eq!(n, warps * 32 * (m / warps / 16).max(1) * (kk / 16));
            }
        }
    }

    /// The register-A fragment of `wgmma.m64nNk16` (16-bit types) is, per warp of the
    /// warpgroup, the m16n8k16 A fragment of rows `16w .. 16w + 16`: a literal transcription of
    /// CuTe's `ALayout_64x16` (`mma_traits_sm90_gmma.hpp`: thread shape `(4, 8, 4)` strides
    /// `(128, 1, 16)`, value shape `(2, 2, 2)` strides `(64, 8, 512)`, into the column-major
    /// `64 x 16` tile) equals the DotA layout of a warpgroup-shaped `64 x 16` operand, which is
    /// what the shortcut feeds it.
    #[test]
    fn wgmma_register_a_fragment_is_the_dot_a_layout_of_the_warp_rows() {
        let a = Layout::dot_a(64, 16, 4, 1).unwrap();
        for tid in 0..128 {
            let (t0, t1, t2) = (tid % 4, (tid / 4) % 8, tid / 32);
            for v in 0..8 {
                let (v0, v1, v2) = (v % 2, (v / 2) % 2, v / 4);
                let off = t0 * 128 + t1 + t2 * 16 + v0 * 64 + v1 * 8 + v2 * 512;
                assert_eq!(
                    a.coord(tid, v),
                    vec![off % 64, off / 64],
                    "thread {tid} value {v}"
                );
            }
        }
    }

    #[test]
    fn cvt_puts_the_first_source_in_the_upper_half() {
        let d = cvt_rn_x2(Half::Bf16, 1.0, -2.0);
        assert_eq!(d >> 16, 0x3F80);
        assert_eq!(d & 0xFFFF, 0xC000);
        let d = cvt_rn_x2(Half::F16, 1.0, -2.0);
        assert_eq!((d >> 16, d & 0xFFFF), (0x3C00, 0xC000));
        // Round to nearest even: 1 + 2^-8 is halfway between two bf16 values, rounds to 1.0.
        assert_eq!(
            cvt_rn_x2(Half::Bf16, 0.0, 1.0 + 1.0 / 256.0) & 0xFFFF,
            0x3F80
        );
        // A wrong operand order would swap the halves, which the fragment test would catch too.
        assert_ne!(
            cvt_rn_x2(Half::Bf16, 1.0, -2.0),
            cvt_rn_x2(Half::Bf16, -2.0, 1.0)
        );
    }

    /// The shortcut's fragments drive an emulated MMA to `P · B` of the rounded accumulator
    /// (the second dot of attention), for one warp's 16 rows.
    #[test]
    fn mma_on_shortcut_fragments_multiplies_the_rounded_accumulator() {
        let ty = Half::Bf16;
        let (m, kk, warps) = (64, 32, 4);
        let acc = Layout::mma_acc_for(m, kk, warps).unwrap();
        let x = values(m * kk, 99);
        let bv = values(kk * 8, 7);
        let round = |v: f32| half::bf16::from_bits(ty.round_bits(v)).to_f32();
        let warp = 2;
        let regs: Vec<Vec<f32>> = (0..32)
            .map(|lane| {
                (0..acc.num_regs())
                    .map(|reg| {
                        let p = acc.coord(32 * warp + lane, reg);
                        x[p[0] * kk + p[1]]
                    })
                    .collect()
            })
            .collect();
        let lb = Layout::dot_b(16, 8, 1, 1).unwrap();
        let mut c = [[0f32; 4]; 32];
        for ik in 0..kk / 16 {
            let a: [[f32; 8]; 32] = std::array::from_fn(|lane| {
                let f = a_fragment_from_acc(ty, &regs[lane], 0, ik, kk);
                std::array::from_fn(|i| {
                    let bits = (f[i / 2] >> (16 * (i % 2))) as u16;
                    half::bf16::from_bits(bits).to_f32()
                })
            });
            let b: [[f32; 4]; 32] = std::array::from_fn(|lane| {
                std::array::from_fn(|i| {
                    let p = lb.coord(lane, i);
                    round(bv[(16 * ik + p[0]) * 8 + p[1]])
                })
            });
            c = mma_m16n8k16(&a, &b, &c);
        }
        let lc = Layout::mma_acc(16, 8, 1, 1).unwrap();
        for (lane, cl) in c.iter().enumerate() {
            for (i, got) in cl.iter().enumerate() {
                let p = lc.coord(lane, i);
                let row = 16 * warp + p[0];
                let want: f32 = (0..kk)
                    .map(|k| round(x[row * kk + k]) * round(bv[k * 8 + p[1]]))
                    .sum();
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "lane {lane} c{i}: {got} vs {want}"
                );
            }
        }
    }
}
