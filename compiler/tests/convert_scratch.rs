//! The epilogue's layout conversion (an MMA accumulator to the coalesced store layout) through
//! the swizzled scratch of `passes::smem::convert_scratch`, emulated lane by lane: the runs of
//! registers the code generator moves as one vector are contiguous and aligned in the scratch,
//! every element read back is the element written, and every warp access of a 16-bit tile takes
//! one wavefront per phase (f32 accumulator writes two; the row-major scratch it replaced, one
//! element per access, conflicts 8-way on the accumulator's writes, so the check is sensitive).

use lexp_compiler::dtype::DType;
use lexp_compiler::layout::shared::SharedLayout;
use lexp_compiler::layout::Layout;
use lexp_compiler::passes::smem::convert_scratch;
use lexp_compiler::sim::banks;
use std::collections::HashMap;

/// `(accumulator, store layout, warps)` of the epilogues of the GEMM-like kernels: mma.sync
/// warp tiles (4 warps) and warpgroup-shaped `wgmma` accumulators (8 warps).
fn cases(elem: usize) -> Vec<(Layout, Layout, usize)> {
    let vec = 16 / elem;
    [
        (128, 64, 4),
        (64, 64, 4),
        (128, 128, 4),
        (128, 128, 8),
        (128, 256, 8),
        (64, 128, 8),
    ]
    .into_iter()
    .map(|(m, n, w)| {
        let acc = Layout::mma_acc_for(m, n, w).expect("valid accumulator");
        (acc, Layout::blocked(&[m, n], vec, w), w)
    })
    .collect()
}

/// Byte offsets in the scratch of each run of `l`'s registers that the code generator moves
/// as one access, per thread: `(thread, first register, byte offset, width in bytes)`.
fn runs(l: &Layout, sl: &SharedLayout, threads: usize) -> Vec<(usize, usize, usize, usize)> {
    let w = l.contiguous_regs().min(16 / sl.elem).max(1);
    let mut out = vec![];
    for t in 0..threads {
        for g in (0..l.num_regs()).step_by(w) {
            let c = l.coord(t, g);
            let off = sl.offset(c[0], c[1]);
            for i in 1..w {
                let ci = l.coord(t, g + i);
                assert_eq!(
                    sl.offset(ci[0], ci[1]),
                    off + i * sl.elem,
                    "register {} of thread {t} is not next to register {g} in the scratch",
                    g + i
                );
            }
            assert_eq!(
                off % (w * sl.elem),
                0,
                "run at {off} not aligned to its width"
            );
            out.push((t, g, off, w * sl.elem));
        }
    }
    out
}

/// Most wavefronts any phase of any warp-wide access of `runs` needs.
fn worst_wavefronts(runs: &[(usize, usize, usize, usize)], threads: usize) -> usize {
    let mut by_access: HashMap<(usize, usize), [usize; 32]> = HashMap::new();
    let mut width = 0;
    for &(t, g, off, w) in runs {
        by_access.entry((t / 32, g)).or_insert([0; 32])[t % 32] = off;
        width = w;
    }
    assert_eq!(
        by_access.len() * 32,
        runs.len(),
        "{threads} threads, every lane in every access"
    );
    by_access
        .values()
        .flat_map(|addrs| banks::vector_access(addrs, width))
        .max()
        .unwrap_or(0)
}

#[test]
fn accumulator_epilogue_moves_vectors_without_bank_conflicts() {
    for dt in [DType::BF16, DType::F32] {
        for (acc, store, warps) in cases(dt.bytes()) {
            let shape = acc.shape.clone();
            let sl = convert_scratch(&shape, dt).expect("a swizzled scratch");
            assert_eq!(sl.bytes(), shape[0] * shape[1] * dt.bytes(), "no padding");
            let threads = 32 * warps;
            let written = runs(&acc, &sl, threads);
            let read = runs(&store, &sl, threads);
            // Every element written once per owner at one place, and read from that place.
            let mut at: HashMap<usize, (usize, usize)> = HashMap::new();
            for t in 0..threads {
                for r in 0..acc.num_regs() {
                    let c = acc.coord(t, r);
                    let prev = at.insert(sl.offset(c[0], c[1]), (c[0], c[1]));
                    assert!(
                        prev.is_none() || prev == Some((c[0], c[1])),
                        "two elements, one address"
                    );
                }
            }
            assert_eq!(at.len(), shape[0] * shape[1], "every element written");
            for t in 0..threads {
                for r in 0..store.num_regs() {
                    let c = store.coord(t, r);
                    assert_eq!(at.get(&sl.offset(c[0], c[1])), Some(&(c[0], c[1])));
                }
            }
            let what = format!("{dt:?} {shape:?} on {warps} warps");
            // 16-bit pairs: a phase's eight rows in eight chunks. f32 pairs (8 bytes, phases of
            // 16 lanes: four rows of two chunks each) pair up under the XOR: 2-way.
            let want = if dt.bytes() == 2 { 1 } else { 2 };
            assert_eq!(
                worst_wavefronts(&written, threads),
                want,
                "accumulator writes, {what}"
            );
            assert_eq!(
                worst_wavefronts(&read, threads),
                1,
                "store-layout reads, {what}"
            );
        }
    }
}

#[test]
fn row_major_scalar_scratch_does_conflict() {
    // What the conversion did before: one 2-byte access per element, row-major, unpadded.
    let (acc, _, warps) = cases(2).remove(3);
    let cols = acc.shape[1];
    let threads = 32 * warps;
    let scalar: Vec<_> = (0..threads)
        .flat_map(|t| (0..acc.num_regs()).map(move |g| (t, g)))
        .map(|(t, g)| {
            let c = acc.coord(t, g);
            (t, g, 2 * (c[0] * cols + c[1]), 2)
        })
        .collect();
    assert_eq!(worst_wavefronts(&scalar, threads), 8);
}

#[test]
fn masks_and_odd_shapes_keep_the_row_major_scratch() {
    assert!(convert_scratch(&[128, 128], DType::I1).is_none());
    assert!(convert_scratch(&[128], DType::F32).is_none());
    assert!(
        convert_scratch(&[16, 8], DType::BF16).is_none(),
        "16-byte rows"
    );
    assert!(
        convert_scratch(&[16, 16], DType::BF16).is_some(),
        "32-byte rows"
    );
}
