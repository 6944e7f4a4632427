//! The tensor-core data path, emulated lane by lane (COMPILER.md §3.2, §9.1): `ldmatrix` from
//! a swizzled shared tile with the per-lane addresses of §3.2 yields exactly the registers the
//! A / B fragment layouts say, with one wavefront per phase (and the unswizzled tile does
//! conflict, so the check is sensitive); one emulated MMA over random bf16 matches a CPU GEMM.

use lexp_compiler::layout::shared::SharedLayout;
use lexp_compiler::layout::Layout;
use lexp_compiler::sim::{banks, ldmatrix, mma};

/// A shared tile of `rows x cols` 16-bit tags, stored with layout `l`; `tag(r, c)` is what the
/// stored element `(r, c)` holds.
fn fill(l: &SharedLayout, tag: impl Fn(usize, usize) -> u16) -> Vec<u16> {
    let mut smem = vec![0u16; l.bytes() / 2];
    for r in 0..l.rows {
        for c in 0..l.cols {
            smem[l.offset(r, c) / 2] = tag(r, c);
        }
    }
    smem
}

#[derive(Clone, Copy, Debug)]
enum Case {
    /// A stored [M][K] (K contiguous): `ldmatrix.x4`.
    AKContig,
    /// A stored [K][M] (M contiguous): `ldmatrix.x4.trans`.
    AMContig,
    /// B stored [N][K] (K contiguous, W of x·Wᵀ): `ldmatrix.x4`.
    BKContig,
    /// B stored [K][N] (N contiguous): `ldmatrix.x4.trans`.
    BNContig,
}

/// Runs one case for a warp tile of `mn` rows (A: M, B: N) and `bk` columns of K, with the
/// shared layout `swizzled` or plain row-major. Returns the worst wavefront count.
fn run(case: Case, mn: usize, bk: usize, swizzled: bool) -> usize {
    let is_a = matches!(case, Case::AKContig | Case::AMContig);
    let k_contig = matches!(case, Case::AKContig | Case::BKContig);
    // Logical operand tags: A (m, k) -> m*bk + k; B (k, n) -> k*mn + n.
    let logical = |mn_i: usize, k: usize| -> u16 {
        if is_a {
            (mn_i * bk + k) as u16
        } else {
            (k * mn + mn_i) as u16
        }
    };
    let (rows, cols) = if k_contig { (mn, bk) } else { (bk, mn) };
    let mut l = SharedLayout::choose(rows, cols, 2);
    if !swizzled {
        l.swz = 0;
    }
    let plain = |r: usize, c: usize| r * cols * 2 + c * 2;
    let smem = if swizzled {
        fill(&l, |r, c| {
            if k_contig {
                logical(r, c)
            } else {
                logical(c, r)
            }
        })
    } else {
        let mut v = vec![0u16; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                v[plain(r, c) / 2] = if k_contig {
                    logical(r, c)
                } else {
                    logical(c, r)
                };
            }
        }
        v
    };
    let addr = |r: usize, c: usize| {
        if swizzled {
            l.offset(r, c)
        } else {
            plain(r, c)
        }
    };
    let frag = if is_a {
        Layout::dot_a(mn, bk, 1, 1).unwrap()
    } else {
        Layout::dot_b(bk, mn, 1, 1).unwrap()
    };
    let mut worst = 0;
    for i16 in 0..mn / 16 {
        for ik in 0..bk / 16 {
            let (m0, k0) = (16 * i16, 16 * ik);
            let addrs: [usize; 32] = std::array::from_fn(|lane| {
                let (q, r8) = (lane >> 3, lane & 7);
                match case {
                    Case::AKContig => addr(m0 + r8 + 8 * (q & 1), k0 + 8 * (q >> 1)),
                    Case::AMContig => addr(k0 + r8 + 8 * (q >> 1), m0 + 8 * (q & 1)),
                    Case::BKContig => addr(m0 + r8 + 8 * (q >> 1), k0 + 8 * (q & 1)),
                    Case::BNContig => addr(k0 + r8 + 8 * (q & 1), m0 + 8 * (q >> 1)),
                }
            });
            worst = worst.max(*banks::ldmatrix(&addrs, 4).iter().max().unwrap());
            let regs = ldmatrix::ldmatrix(&ldmatrix::Smem(&smem), &addrs, 4, !k_contig);
            for lane in 0..32 {
                for q in 0..4 {
                    let (lo, hi) = regs[lane][q];
                    // Which fragment registers ldmatrix register q fills (COMPILER.md §3.2).
                    let (reg_lo, reg_hi) = if is_a {
                        let base = (i16 * (bk / 16) + ik) * 8;
                        (base + 2 * q, base + 2 * q + 1)
                    } else {
                        let n_tile = 2 * i16 + (q >> 1);
                        let base = (n_tile * (bk / 16) + ik) * 4 + 2 * (q & 1);
                        (base, base + 1)
                    };
                    for (got, reg) in [(lo, reg_lo), (hi, reg_hi)] {
                        let c = frag.coord(lane, reg);
                        let want = if is_a {
                            logical(c[0], c[1])
                        } else {
                            logical(c[1], c[0])
                        };
                        assert_eq!(
                            got, want,
                            "{case:?} {mn}x{bk} tile ({i16},{ik}) lane {lane} reg {q}"
                        );
                    }
                }
            }
        }
    }
    worst
}

#[test]
fn ldmatrix_fills_the_fragment_layouts_without_bank_conflicts() {
    for case in [
        Case::AKContig,
        Case::AMContig,
        Case::BKContig,
        Case::BNContig,
    ] {
        for (mn, bk) in [(64, 64), (64, 32), (32, 16), (128, 64)] {
            let contiguous_extent = if matches!(case, Case::AKContig | Case::BKContig) {
                bk
            } else {
                mn
            };
            if contiguous_extent * 2 < 32 {
                continue;
            }
            assert_eq!(run(case, mn, bk, true), 1, "{case:?} {mn}x{bk} swizzled");
        }
    }
}

#[test]
fn unswizzled_tiles_do_conflict() {
    // 128-byte rows: all eight rows of an ldmatrix phase land in one bank group.
    assert_eq!(run(Case::AKContig, 64, 64, false), 8);
    assert_eq!(run(Case::BKContig, 64, 64, false), 8);
    // 64-byte rows: 4-way.
    assert_eq!(run(Case::AKContig, 64, 32, false), 4);
}

#[test]
fn emulated_mma_matches_a_cpu_gemm() {
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        half::bf16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0).to_f32()
    };
    let a: Vec<Vec<f32>> = (0..16).map(|_| (0..16).map(|_| rnd()).collect()).collect();
    let b: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| rnd()).collect()).collect();
    let c: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| rnd()).collect()).collect();
    let (la, lb, lc) = (
        Layout::dot_a(16, 16, 1, 1).unwrap(),
        Layout::dot_b(16, 8, 1, 1).unwrap(),
        Layout::mma_acc(16, 8, 1, 1).unwrap(),
    );
    let fa: [[f32; 8]; 32] = std::array::from_fn(|l| {
        std::array::from_fn(|i| {
            let p = la.coord(l, i);
            a[p[0]][p[1]]
        })
    });
    let fb: [[f32; 4]; 32] = std::array::from_fn(|l| {
        std::array::from_fn(|i| {
            let p = lb.coord(l, i);
            b[p[0]][p[1]]
        })
    });
    let fc: [[f32; 4]; 32] = std::array::from_fn(|l| {
        std::array::from_fn(|i| {
            let p = lc.coord(l, i);
            c[p[0]][p[1]]
        })
    });
    let d = mma::mma_m16n8k16(&fa, &fb, &fc);
    for lane in 0..32 {
        for i in 0..4 {
            let p = lc.coord(lane, i);
            let want: f64 = c[p[0]][p[1]] as f64
                + (0..16)
                    .map(|k| a[p[0]][k] as f64 * b[k][p[1]] as f64)
                    .sum::<f64>();
            assert!(
                (d[lane][i] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "lane {lane} elem {i}"
            );
        }
    }
}
