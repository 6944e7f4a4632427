//! The shared-memory plan: which ops need scratch, at which offset, and the kernel's total,
//! checked against the target's static limit at compile time.
//!
//! Today's users are cross-warp reductions: each warp that holds part of a reduced dimension
//! writes its partial results to scratch, and after a barrier every thread combines them.
//! Such ops run one after another with a barrier at the end of each, so they all reuse one
//! region at offset 0: the total is the largest single need, not the sum.

use super::layouts::LayoutPlan;
use crate::ir::{IrError, Kernel, Op, ValueId};
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
    /// Static shared memory of the kernel in bytes.
    pub total: usize,
}

impl SmemPlan {
    /// The allocation of the op defining `v`.
    pub fn of(&self, v: ValueId) -> Option<&Allocation> {
        self.allocations.iter().find(|a| a.value == v)
    }

    /// Text form for snapshots.
    pub fn print(&self) -> String {
        let mut s = format!("smem total {} bytes\n", self.total);
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

/// Plans scratch for every reduction that crosses warps.
pub fn plan(k: &Kernel, layouts: &LayoutPlan, target: &Target) -> Result<SmemPlan, IrError> {
    let mut plan = SmemPlan::default();
    k.walk(&mut |inst| {
        if let Op::ConvertLayout { src } = &inst.op {
            let (from, to) = (layouts.of(*src), layouts.of(inst.results[0]));
            if from != to {
                let t = k.ty(*src);
                let size = (t.numel().max(1) * t.dtype.bytes()).next_multiple_of(16);
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
    plan.total = plan
        .allocations
        .iter()
        .map(|a| a.offset + a.size)
        .max()
        .unwrap_or(0);
    if plan.total > target.max_static_smem {
        crate::ir_bail!(
            "kernel `{}` needs {} bytes of shared memory; {} allows {} bytes of static shared memory",
            k.name,
            plan.total,
            target.name,
            target.max_static_smem
        );
    }
    Ok(plan)
}
