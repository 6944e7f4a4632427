//! The tensor-core path of the compiler on a small textual kernel (`ir/matmul.ir`: a 64 x 64
//! tile of `a · bᵀ` with a K loop): dimension spaces, the accumulator layout, the pipeliner's
//! plan and the shared-memory plan, and (with LLVM) `mma.sync` for sm_80 and `wgmma` for sm_90.

use lexp_compiler::ir::{parser, printer, Op, ValueId};
use lexp_compiler::layout::Layout;
use lexp_compiler::{passes, target};

const MATMUL: &str = include_str!("ir/matmul.ir");

fn dot_result(k: &lexp_compiler::ir::Kernel) -> ValueId {
    let mut r = None;
    k.walk(&mut |i| {
        if matches!(i.op, Op::Dot { .. }) {
            r = Some(i.results[0]);
        }
    });
    r.expect("a dot")
}

#[test]
fn dot_and_trans_print_and_parse_back() {
    let k = parser::parse(MATMUL).unwrap();
    let text = printer::print(&k);
    assert!(text.contains("dot %23, %27, %14 : f32[64,64]"), "{text}");
    assert!(text.contains("trans %26 : bf16[32,64]"), "{text}");
    assert!(text.contains("warps 4 stages 3"), "{text}");
    assert_eq!(printer::print(&parser::parse(&text).unwrap()), text);
}

#[test]
fn spaces_layouts_and_the_pipeline_plan() {
    let c = passes::compile(parser::parse(MATMUL).unwrap(), &target::SM90).unwrap();
    let d = dot_result(&c.kernel);
    // The accumulator is warpgroup-shaped: 4 warps x 16 rows, each the full 64 columns.
    let acc = Layout::mma_acc_for(64, 64, 4).unwrap();
    assert_eq!(c.layouts.of(d), &acc);
    assert_eq!(acc.mma_warp_grid(), (4, 1));
    // Both operand loads are streamed through 3 slots, and the dot stays in flight.
    assert_eq!(c.pipeline.loops.len(), 1);
    let l = &c.pipeline.loops[0];
    assert_eq!((l.stages, l.loads.len()), (3, 2));
    assert_eq!(l.async_dots, vec![d]);
    for ld in &l.loads {
        assert_eq!(
            (ld.shared.rows, ld.shared.cols, ld.shared.swz),
            (64, 32, 64)
        );
        assert_eq!(ld.offset % 1024, 0, "slots start on the swizzle period");
    }
    // The store of the accumulator goes through a layout conversion to a coalesced layout,
    // whose scratch may reuse the slots (it runs after the loop): total = the slots.
    let mut converts = vec![];
    let mut stored = vec![];
    c.kernel.walk(&mut |i| match &i.op {
        Op::ConvertLayout { .. } => converts.push(i.results[0]),
        Op::Store { value, .. } => stored.push(*value),
        _ => {}
    });
    assert_eq!(stored.len(), 1);
    assert!(
        converts.contains(&stored[0]),
        "the stored value is not converted"
    );
    assert_ne!(c.layouts.of(stored[0]), &acc);
    assert_eq!(c.smem.total, 2 * 3 * 64 * 32 * 2);
    // The shared index chain `%20` was copied for each operand: the two loads are in
    // different spaces (their pointers have their own layouts, both 16-byte vectors).
    for ld in &l.loads {
        assert_eq!(c.layouts.vec[&ld.ptr], 8);
    }
}

#[test]
fn dot_shapes_are_checked() {
    let bad = MATMUL.replace("range 64", "range 48").replace("64", "48");
    let err = parser::parse(&bad)
        .and_then(|k| passes::compile(k, &target::SM90).map(|_| ()))
        .expect_err("48 rows");
    assert!(
        err.0.contains("power of two") || err.0.contains("multiple of 16"),
        "{err}"
    );
}

#[cfg(feature = "llvm")]
#[test]
fn mma_sync_on_sm80_and_wgmma_on_sm90() {
    use lexp_compiler::codegen;
    let c = passes::compile(parser::parse(MATMUL).unwrap(), &target::SM90).unwrap();
    let p80 = codegen::lower(&c, &target::SM80, "matmul").unwrap().ptx;
    for want in [
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
        "cp.async.cg.shared.global",
        "cp.async.wait_group 1",
    ] {
        assert!(p80.contains(want), "sm_80 PTX lacks `{want}`");
    }
    assert!(!p80.contains("wgmma"));
    let p90 = codegen::lower(&c, &target::SM90, "matmul").unwrap().ptx;
    for want in [
        ".target sm_90a",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",
        "wgmma.fence.sync.aligned",
        "wgmma.wait_group.sync.aligned 1",
        "fence.proxy.async.shared::cta",
    ] {
        assert!(p90.contains(want), "sm_90 PTX lacks `{want}`");
    }
}

#[test]
fn sm90a_ptx_only_on_compute_capability_9_0() {
    use lexp_compiler::launch::Arch;
    assert_eq!(Arch::for_compute_capability(9, 0), Some(Arch::Sm90));
    // `sm_90a` code does not run on later GPUs; they JIT the sm_80 PTX.
    assert_eq!(Arch::for_compute_capability(10, 0), Some(Arch::Sm80));
    assert_eq!(Arch::for_compute_capability(12, 0), Some(Arch::Sm80));
    assert_eq!(Arch::for_compute_capability(8, 6), Some(Arch::Sm80));
    assert_eq!(Arch::for_compute_capability(7, 5), None);
}

/// A `dot` operand computed in registers (here the square of a loaded tile) is staged through
/// scratch each iteration, so its MMAs must complete within the iteration: no MMA stays in
/// flight across the loop's back edge.
#[cfg(feature = "llvm")]
#[test]
fn register_staged_operands_keep_mmas_within_the_iteration() {
    use lexp_compiler::codegen;
    let text = MATMUL.replace(
        "%27 = trans %26 : bf16[32,64]",
        "%40 = mul %26, %26 : bf16[64,32]\n    %27 = trans %40 : bf16[32,64]",
    );
    let c = passes::compile(parser::parse(&text).unwrap(), &target::SM90).unwrap();
    let l = &c.pipeline.loops[0];
    assert_eq!(l.loads.len(), 1, "only `a` is streamed");
    assert!(
        l.async_dots.is_empty(),
        "the dot reads register-staged scratch"
    );
    let p90 = codegen::lower(&c, &target::SM90, "matmul").unwrap().ptx;
    assert!(p90.contains("wgmma.wait_group.sync.aligned 0"));
    assert!(
        !p90.contains("wgmma.wait_group.sync.aligned 1"),
        "an MMA stays in flight"
    );
    // With both operands streamed, they do.
    let c = passes::compile(parser::parse(MATMUL).unwrap(), &target::SM90).unwrap();
    let p90 = codegen::lower(&c, &target::SM90, "matmul").unwrap().ptx;
    assert!(p90.contains("wgmma.wait_group.sync.aligned 1"));
}

/// A loop whose operand tiles are bounds-masked tensor loads, with `tma`: on sm_90a its ring is
/// filled by bulk tensor copies through two `grid_constant` tensor-map parameters, completing
/// on mbarriers (no `cp.async`, no CTA barrier per iteration); sm_80 keeps `cp.async`.
#[cfg(feature = "llvm")]
#[test]
fn tma_loops_copy_with_bulk_tensor_copies_on_sm90() {
    use lexp_compiler::codegen;
    const TMA: &str = include_str!("ir/matmul_tma.ir");
    let c = passes::compile(parser::parse(TMA).unwrap(), &target::SM90).unwrap();
    assert_eq!(c.pipeline.maps.len(), 2);
    let p90 = codegen::lower(&c, &target::SM90, "matmul_tma").unwrap().ptx;
    for want in [
        ".param .align 64 .b8 matmul_tma_param_9[128]",
        ".param .align 64 .b8 matmul_tma_param_10[128]",
        "cvta.param.u64",
        "mbarrier.init.shared::cta.b64",
        "fence.mbarrier_init.release.cluster",
        "mbarrier.arrive.expect_tx.shared::cta.b64",
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
        "mbarrier.try_wait.parity.shared::cta.b64",
        "mbarrier.arrive.shared::cta.b64",
        "mbarrier.inval.shared::cta.b64",
        "wgmma.wait_group.sync.aligned 1",
    ] {
        assert!(p90.contains(want), "sm_90 PTX lacks `{want}`");
    }
    assert!(
        !p90.contains("cp.async.cg"),
        "a TMA loop copies with cp.async"
    );
    // One CTA barrier publishes the barriers' initialisation, one ends the loop, one the
    // epilogue's layout conversion (if any): none per iteration.
    let loop_body = p90
        .split("mbarrier.try_wait.parity")
        .nth(1)
        .and_then(|s| s.split("wgmma.wait_group.sync.aligned 0").next())
        .unwrap_or("");
    assert!(!loop_body.contains("bar.sync"), "a CTA barrier in the loop");
    let p80 = codegen::lower(&c, &target::SM80, "matmul_tma").unwrap().ptx;
    assert!(p80.contains("cp.async.cg.shared.global"));
    assert!(!p80.contains("cp.async.bulk") && !p80.contains("mbarrier"));
    assert!(
        !p80.contains(".b8 matmul_tma_param_9"),
        "sm_80 takes no tensor maps"
    );
}

/// Ping-pong (`pingpong` in the kernel header): on sm_90a each warpgroup waits for its turn on
/// its named barrier before its MMAs and hands the turn on after issuing them; warpgroup 1
/// gives the first turn before the loop and warpgroup 0 takes the surplus one back after it.
/// Without the flag, on sm_80, or with four warps, no named barrier appears.
#[cfg(feature = "llvm")]
#[test]
fn pingpong_loops_alternate_the_warpgroups_mmas_on_sm90() {
    use lexp_compiler::codegen;
    use lexp_compiler::ir::printer;
    const TMA: &str = include_str!("ir/matmul_tma.ir");
    let header = "warps 4 stages 3 tma {";
    assert!(TMA.contains(header));
    let ptx = |text: &str, t: &target::Target| {
        let c = passes::compile(parser::parse(text).unwrap(), t).unwrap();
        codegen::lower(&c, t, "matmul_tma").unwrap().ptx
    };
    let pp = TMA.replace(header, "warps 8 stages 2 tma pingpong {");
    let k = parser::parse(&pp).unwrap();
    assert!(k.pingpong);
    assert!(printer::print(&k).contains("warps 8 stages 2 tma pingpong {"));
    let p90 = ptx(&pp, &target::SM90);
    let count = |s: &str| p90.matches(s).count();
    // Before the loop, warpgroup 1's first turn; in it, one wait and one hand-over per
    // warpgroup (a branch each); after it, warpgroup 0's closing wait.
    assert_eq!(count("bar.arrive 1, 256;"), 2, "{p90}");
    assert_eq!(count("bar.arrive 2, 256;"), 1);
    assert_eq!(count("bar.sync 1, 256;"), 2);
    assert_eq!(count("bar.sync 2, 256;"), 1);
    // The hand-over comes after the MMAs are issued and before they are awaited.
    let after_commit = p90
        .split("wgmma.commit_group.sync.aligned;")
        .nth(1)
        .and_then(|s| s.split("wgmma.wait_group.sync.aligned 0;").next())
        .unwrap_or("");
    assert!(
        after_commit.contains("bar.arrive"),
        "no hand-over between commit and wait"
    );
    for (text, t) in [
        (pp.as_str(), &target::SM80),
        (
            &TMA.replace(header, "warps 8 stages 2 tma {"),
            &target::SM90,
        ),
        (
            &TMA.replace(header, "warps 4 stages 2 tma pingpong {"),
            &target::SM90,
        ),
    ] {
        let p = ptx(text, t);
        assert!(
            !p.contains(", 256;"),
            "a named barrier without ping-pong:\n{p}"
        );
    }
}

/// `ctas N` in the kernel header (the macro's `ctas = N`): parsed, printed back, and lowered to
/// the `.minnctapersm N` directive that makes ptxas fit N programs per multiprocessor; without
/// it the directive says 1 (a program may take every register its CTA size allows).
#[cfg(feature = "llvm")]
#[test]
fn ctas_header_sets_the_programs_per_multiprocessor() {
    use lexp_compiler::codegen;
    use lexp_compiler::ir::printer;
    const TMA: &str = include_str!("ir/matmul_tma.ir");
    let header = "warps 4 stages 3 tma {";
    assert!(TMA.contains(header));
    let three = TMA.replace(header, "warps 4 stages 3 tma ctas 3 {");
    let k = parser::parse(&three).unwrap();
    assert_eq!(k.min_ctas, 3);
    assert!(printer::print(&k).contains("warps 4 stages 3 tma ctas 3 {"));
    let ptx = |text: &str| {
        let c = passes::compile(parser::parse(text).unwrap(), &target::SM90).unwrap();
        codegen::lower(&c, &target::SM90, "matmul_tma").unwrap().ptx
    };
    assert!(ptx(&three).contains(".minnctapersm 3"));
    let one = ptx(TMA);
    assert!(one.contains(".minnctapersm 1"), "{one}");
    assert!(!printer::print(&parser::parse(TMA).unwrap()).contains("ctas"));
}
