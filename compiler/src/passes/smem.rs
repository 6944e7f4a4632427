//! The shared-memory plan: which ops need scratch, at which offset, and the kernel's total,
//! checked against the target's static limit at compile time.
//!
//! *Scratch* users: cross-warp reductions (each warp that holds part of a reduced dimension
//! writes its partial results, and after a barrier every thread combines them), layout
//! conversions, and `dot` operands staged from registers (except an A operand that the layout
//! pass feeds to the MMA from registers, the mma-to-dot shortcut: it takes no scratch). Such ops run one after another with
//! a barrier at the end of each, so they all reuse one region at offset 0: its size is the
//! largest single need, not the sum.
//!
//! *Pipeline* buffers (the slots of streamed `dot` operands, [`super::pipeline`]) live for a
//! whole loop, next to scratch users inside it, so they follow the scratch region.
//!
//! Up to the target's static limit (48 KB) the memory is a static array; above it, dynamic
//! shared memory that the launcher opts into.

use super::layouts::LayoutPlan;
use super::pipeline::PipelinePlan;
use crate::dtype::DType;
use crate::ir::{IrError, Kernel, Op, ValueId};
use crate::layout::shared::SharedLayout;
use crate::target::Target;

/// One scratch allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The op's (first) result.
    pub value: ValueId,
    /// Byte offset in the kernel's shared memory.
    pub offset: usize,
    /// Bytes.
    pub size: usize,
}

/// The plan for one kernel.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SmemPlan {
    pub allocations: Vec<Allocation>,
    /// Shared memory of the kernel in bytes.
    pub total: usize,
    /// Whether `total` exceeds the static limit, so the memory is dynamic (declared `extern`,
    /// sized at launch).
    pub dynamic: bool,
}

impl SmemPlan {
    /// The allocation of the op defining `v`.
    pub fn of(&self, v: ValueId) -> Option<&Allocation> {
        self.allocations.iter().find(|a| a.value == v)
    }

    /// Text form for snapshots.
    pub fn print(&self) -> String {
        let kind = if self.dynamic { " (dynamic)" } else { "" };
        let mut s = format!("smem total {} bytes{kind}\n", self.total);
        for (i, a) in self.allocations.iter().enumerate() {
            s.push_str(&format!(
                "  scratch {i}: offset {} size {}\n",
                a.offset, a.size
            ));
        }
        s
    }
}

/// Number of warps that hold distinct parts of dimension `axis` of a layout.
pub fn warps_along(l: &crate::layout::Layout, axis: usize) -> usize {
    1 << l.warp.iter().filter(|b| b[axis] != 0).count()
}

/// The scratch a `dot` needs to stage its operands from registers: the A tile then the B tile,
/// each in its swizzled shared layout ([`dot_operand_layouts`]), and the B tile's byte offset.
/// With `a_in_regs` (the mma-to-dot shortcut, [`LayoutPlan::dot_a_regs`]) A takes no shared
/// memory and B starts at 0.
pub fn dot_scratch(
    k: &Kernel,
    a: ValueId,
    b: ValueId,
    a_in_regs: bool,
) -> (SharedLayout, SharedLayout, usize) {
    let (la, lb) = dot_operand_layouts(k, a, b);
    let b_off = if a_in_regs {
        0
    } else {
        la.bytes().next_multiple_of(1024)
    };
    (la, lb, b_off)
}

/// The value a `dot` operand is stored from (looking through `trans`) and whether it was
/// transposed.
pub fn dot_source(k: &Kernel, v: ValueId) -> (ValueId, bool) {
    let mut found = (v, false);
    k.walk(&mut |i| {
        if let (Op::Trans { src }, Some(r)) = (&i.op, i.results.first()) {
            if *r == v {
                found = (*src, true);
            }
        }
    });
    found
}

/// Shared layouts of the stored forms of a `dot`'s operands: each operand's source tile as it is
/// (before `trans`), contiguous along its last dimension.
pub fn dot_operand_layouts(k: &Kernel, a: ValueId, b: ValueId) -> (SharedLayout, SharedLayout) {
    let lay = |v: ValueId| {
        let (s, _) = dot_source(k, v);
        let t = k.ty(s);
        SharedLayout::choose(t.shape[0], t.shape[1], t.dtype.bytes())
    };
    (lay(a), lay(b))
}

/// The shared layout a layout conversion of a `shape` tile of `dtype` goes through, when it
/// can take a swizzled one: a rank-2 tile of 16-bit or 32-bit elements, power-of-two extents,
/// rows of at least 32 bytes (so the swizzle needs no padding and the scratch keeps the tile's
/// size). Threads then move up to 16 bytes per access, and the eight rows an MMA accumulator's
/// warp writes in one access land in different bank groups. `None`: the plain row-major scratch,
/// one element per access.
pub fn convert_scratch(shape: &[usize], dtype: DType) -> Option<SharedLayout> {
    let [rows, cols] = shape else {
        return None;
    };
    let elem = dtype.bytes();
    if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32 | DType::I32)
        || !rows.is_power_of_two()
        || !cols.is_power_of_two()
    {
        return None;
    }
    let l = SharedLayout::choose(*rows, *cols, elem);
    (l.swz != 0).then_some(l)
}

/// Plans scratch for every op that needs it, then the pipeline buffers.
pub fn plan(
    k: &Kernel,
    layouts: &LayoutPlan,
    pipeline: &mut PipelinePlan,
    target: &Target,
) -> Result<SmemPlan, IrError> {
    let mut plan = SmemPlan::default();
    // Scratch users inside pipelined loops: their region must not overlap the loop's slots.
    let mut inside: Vec<ValueId> = vec![];
    fn mark(b: &crate::ir::Block, pipeline: &PipelinePlan, on: bool, out: &mut Vec<ValueId>) {
        for inst in &b.insts {
            if on {
                out.extend(inst.results.iter().copied());
            }
            if let Op::For { body, .. } = &inst.op {
                let on = on || pipeline.for_iv(body.args[0]).is_some();
                mark(body, pipeline, on, out);
            } else {
                for nb in inst.op.blocks() {
                    mark(nb, pipeline, on, out);
                }
            }
        }
    }
    mark(&k.body, pipeline, false, &mut inside);
    k.walk(&mut |inst| {
        if let Op::Dot { a, b, .. } = &inst.op {
            let staged = |v: ValueId| pipeline.staged(dot_source(k, v).0).is_some();
            // An A operand fed from registers needs no shared memory at all.
            let a_regs = layouts.dot_a_regs.contains(&inst.results[0]);
            if !((a_regs || staged(*a)) && staged(*b)) {
                let (_, lb, b_off) = dot_scratch(k, *a, *b, a_regs);
                plan.allocations.push(Allocation {
                    value: inst.results[0],
                    offset: 0,
                    size: b_off + lb.bytes(),
                });
            }
        }
        if let Op::ConvertLayout { src } = &inst.op {
            let (from, to) = (layouts.of(*src), layouts.of(inst.results[0]));
            if from != to {
                let t = k.ty(*src);
                let size = match convert_scratch(&t.shape, t.dtype) {
                    Some(l) => l.bytes(),
                    None => t.numel().max(1) * t.dtype.bytes(),
                }
                .next_multiple_of(16);
                plan.allocations.push(Allocation {
                    value: inst.results[0],
                    offset: 0,
                    size,
                });
            }
        }
        if let Op::Reduce { src, axis, .. } = &inst.op {
            let w = warps_along(layouts.of(*src), *axis);
            if w > 1 {
                let out = k.ty(inst.results[0]);
                let size = w * out.numel().max(1) * 4;
                plan.allocations.push(Allocation {
                    value: inst.results[0],
                    offset: 0,
                    size,
                });
            }
        }
    });
    let need = |f: &dyn Fn(&Allocation) -> bool| {
        plan.allocations
            .iter()
            .filter(|a| f(a))
            .map(|a| a.offset + a.size)
            .max()
            .unwrap_or(0)
    };
    // Scratch outside the pipelined loops may reuse the slots (the loop drains and
    // synchronises before it ends, and every scratch user ends with a barrier).
    let outside = need(&|a| !inside.contains(&a.value));
    let mut end = need(&|a| inside.contains(&a.value));
    for l in &mut pipeline.loops {
        for ld in &mut l.loads {
            end = end.next_multiple_of(1024);
            ld.offset = end;
            end += ld.slots(l.stages) * ld.shared.bytes();
        }
        if let Some(t) = &mut l.tma {
            end = end.next_multiple_of(8);
            t.barriers = end;
            end += super::tma::barrier_bytes(l.stages);
        }
    }
    // Bulk-reduction staging buffers (sm_90a only: `compile` clears them for sm_80) live from
    // their first use to the kernel's end (the TMA reads them asynchronously): past everything.
    if !pipeline.reduces.is_empty() {
        end = end.max(outside);
        for r in &mut pipeline.reduces {
            end = end.next_multiple_of(1024);
            r.offset = end;
            end += r.shared.bytes();
        }
    }
    plan.total = outside.max(end);
    plan.dynamic = plan.total > target.max_static_smem;
    if plan.total > target.max_dynamic_smem {
        crate::ir_bail!(
            "kernel `{}` needs {} bytes of shared memory; {} allows {} bytes per CTA (use fewer pipeline stages or smaller tiles)",
            k.name,
            plan.total,
            target.name,
            target.max_dynamic_smem
        );
    }
    Ok(plan)
}
