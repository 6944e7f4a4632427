//! The layout pass's mma-to-dot decision (COMPILER.md §1.7) on small textual kernels: an
//! attention-shaped `exp2(q·kᵀ).cast() · v` (`ir/attention.ir`) feeds the second dot's A operand
//! from registers when the first accumulator's warps own whole rows, and keeps the
//! shared-memory path when they do not (8 warps: `wn = 2`) or when the operand comes from an
//! accumulator of another column extent (`ir/attention_rowstat.ir`: a row statistic of a
//! `[64, 512]` accumulator broadcast to the `[64, 64]` operand).

use lexp_compiler::ir::{parser, Kernel, Op, ValueId};
use lexp_compiler::layout::mma::dot_a_in_registers;
use lexp_compiler::layout::Layout;
use lexp_compiler::passes::{self, Compiled};
use lexp_compiler::target;

const ATTENTION: &str = include_str!("ir/attention.ir");
const ROWSTAT: &str = include_str!("ir/attention_rowstat.ir");

/// The results of the kernel's `dot`s, in program order.
fn dots(k: &Kernel) -> Vec<ValueId> {
    let mut out = vec![];
    k.walk(&mut |i| {
        if matches!(i.op, Op::Dot { .. }) {
            out.push(i.results[0]);
        }
    });
    out
}

fn compile(text: &str) -> Compiled {
    passes::compile(parser::parse(text).unwrap(), &target::SM90).unwrap()
}

fn layouts_stage(c: &Compiled) -> &str {
    &c.stages.iter().find(|(n, _)| *n == "layouts").unwrap().1
}

#[test]
fn attention_with_whole_row_warps_feeds_a_from_registers() {
    let c = compile(ATTENTION);
    let d = dots(&c.kernel);
    assert_eq!(d.len(), 2);
    // `s = q·kᵀ` reads loaded tiles (shared memory); `o = p·v` takes `p` from registers.
    assert!(!c.layouts.dot_a_regs.contains(&d[0]));
    assert!(c.layouts.dot_a_regs.contains(&d[1]));
    let s = c.layouts.of(d[0]);
    assert_eq!(s, &Layout::mma_acc_for(64, 64, 4).unwrap());
    assert_eq!(s.mma_warp_grid(), (4, 1), "16 whole rows per warp");
    // The layout dump says so, on the second dot only.
    let text = layouts_stage(&c);
    assert_eq!(text.matches("a-in-regs").count(), 1, "{text}");
    let line = text.lines().find(|l| l.contains("a-in-regs")).unwrap();
    assert!(
        line.contains("= dot ") && line.contains(": f32[64,32]"),
        "{line}"
    );
    // The second dot stages only `v` (4 KB), not `p` (8 KB more).
    let alloc = c.smem.of(d[1]).expect("scratch for v");
    assert_eq!(alloc.size, 64 * 32 * 2);
}

#[test]
fn eight_warps_split_the_rows_and_keep_shared_memory() {
    // [64, 64] on 8 warps: 4 x 2 warps, each holding half of its rows' columns.
    let c = compile(&ATTENTION.replace("warps 4", "warps 8"));
    let d = dots(&c.kernel);
    assert_eq!(c.layouts.of(d[0]).mma_warp_grid(), (4, 2));
    assert!(c.layouts.dot_a_regs.is_empty());
    assert!(!layouts_stage(&c).contains("a-in-regs"));
    let alloc = c.smem.of(d[1]).unwrap();
    assert_eq!(alloc.size, 64 * 64 * 2 + 64 * 32 * 2, "p and v staged");
}

#[test]
fn an_operand_from_an_accumulator_of_another_width_keeps_shared_memory() {
    let c = compile(ROWSTAT);
    let d = dots(&c.kernel);
    // The [64, 512] accumulator spreads its columns over the warps (1 x 4): the broadcast
    // [64, 64] operand is in every warp, rows in registers, not in fragment layout.
    assert_eq!(c.layouts.of(d[0]).mma_warp_grid(), (1, 4));
    assert!(c.layouts.dot_a_regs.is_empty());
    assert!(!layouts_stage(&c).contains("a-in-regs"));
}

#[test]
fn the_decision_is_the_layout_identity() {
    let acc = |m, n, w| Layout::mma_acc_for(m, n, w).unwrap();
    // Whole-row warps, K = the accumulator's width: yes (flash attention's 8-warp tiles).
    assert!(dot_a_in_registers(&acc(128, 64, 8), &acc(128, 64, 8), 64));
    assert!(dot_a_in_registers(&acc(128, 128, 8), &acc(128, 64, 8), 128));
    assert!(dot_a_in_registers(&acc(64, 64, 4), &acc(64, 32, 4), 64));
    // K different from the accumulator's width.
    assert!(!dot_a_in_registers(&acc(128, 64, 8), &acc(128, 64, 8), 32));
    assert!(!dot_a_in_registers(&acc(128, 64, 8), &acc(128, 64, 8), 128));
    // wn > 1 in the operand's accumulator.
    assert!(!dot_a_in_registers(&acc(64, 64, 8), &acc(64, 64, 8), 64));
    assert!(!dot_a_in_registers(
        &Layout::mma_acc(128, 128, 2, 4).unwrap(),
        &Layout::mma_acc(128, 64, 2, 4).unwrap(),
        128
    ));
    // Rows of the operand's warps differ from the result's (2 x 4 result grid vs 8 x 1).
    assert!(!dot_a_in_registers(
        &acc(128, 64, 8),
        &Layout::mma_acc(128, 64, 2, 4).unwrap(),
        64
    ));
    // A blocked (loaded) operand.
    assert!(!dot_a_in_registers(
        &Layout::blocked(&[128, 64], 8, 8),
        &acc(128, 64, 8),
        64
    ));
}

/// Codegen: the second dot packs `p` with `cvt.rn.bf16x2.f32` and feeds it to `mma.sync`
/// (sm_80) or to the register-A form of `wgmma` (sm_90a); only `q` is read with a
/// non-transposed `ldmatrix`. The 8-warp kernel keeps the shared-memory path.
#[cfg(feature = "llvm")]
#[test]
fn registers_feed_mma_sync_and_wgmma() {
    use lexp_compiler::codegen;
    let c = compile(ATTENTION);
    let p80 = codegen::lower(&c, &target::SM80, "attention").unwrap().ptx;
    assert!(p80.contains("cvt.rn.bf16x2.f32"), "{p80}");
    assert!(p80.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    // Each thread holds 32 values of p: 16 paired conversions, no single ones.
    assert_eq!(p80.matches("cvt.rn.bf16x2.f32").count(), 16);
    assert!(!p80.contains("cvt.rn.bf16.f32"));
    // Non-transposed ldmatrix: the first dot's q (2 k16 steps) and kᵀ (4 pairs of n-tiles x 2
    // k16 steps) only; p is not loaded (v, N-major, is read with `.trans`).
    let count = |ptx: &str| {
        ptx.lines()
            .filter(|l| l.contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16"))
            .count()
    };
    assert_eq!(count(&p80), 2 + 8);
    // With 8 warps (4 x 2): q 2, kᵀ 2 pairs x 2 k16 steps, and p's 4 k16 steps.
    let wide = codegen::lower(
        &compile(&ATTENTION.replace("warps 4", "warps 8")),
        &target::SM80,
        "attention",
    )
    .unwrap()
    .ptx;
    assert_eq!(count(&wide), 2 + 4 + 4);
    assert!(!wide.contains("cvt.rn.bf16x2.f32"));
    let p90 = codegen::lower(&c, &target::SM90, "attention").unwrap().ptx;
    let wg: Vec<&str> = p90
        .lines()
        .filter(|l| l.contains("wgmma.mma_async.sync.aligned"))
        .collect();
    // First dot: m64n64k16 from descriptors (tA, tB immediates); second: m64n32k16 with
    // `{a0, a1, a2, a3}` registers and only the tB immediate (1: `v` is N-major).
    let reg_a: Vec<&&str> = wg
        .iter()
        .filter(|l| l.contains("m64n32k16") && l.matches('{').count() == 2)
        .collect();
    assert_eq!(reg_a.len(), 4, "{wg:#?}");
    assert!(
        reg_a.iter().all(|l| l.trim_end().ends_with("p, 1, 1, 1;")),
        "{reg_a:#?}"
    );
    assert!(wg
        .iter()
        .filter(|l| l.contains("m64n64k16"))
        .all(|l| l.matches('{').count() == 1));
    assert!(p90.contains("cvt.rn.bf16x2.f32"));
}

/// The f16 form: `cvt.rn.f16x2.f32` packing, the f16 `mma.sync` and register-A `wgmma`.
#[cfg(feature = "llvm")]
#[test]
fn f16_operands_pack_with_the_f16x2_conversion() {
    use lexp_compiler::codegen;
    let c = compile(&ATTENTION.replace("bf16", "f16"));
    assert_eq!(c.layouts.dot_a_regs.len(), 1);
    let p80 = codegen::lower(&c, &target::SM80, "attention").unwrap().ptx;
    assert_eq!(p80.matches("cvt.rn.f16x2.f32").count(), 16);
    assert!(p80.contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"));
    let p90 = codegen::lower(&c, &target::SM90, "attention").unwrap().ptx;
    assert_eq!(
        p90.lines()
            .filter(
                |l| l.contains("wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16")
                    && l.matches('{').count() == 2
            )
            .count(),
        4
    );
}
