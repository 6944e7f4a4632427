//! Compiler passes, in pipeline order: [`canonicalize`], [`layouts`] (with [`axis_info`]),
//! [`smem`]. [`compile`] runs them and keeps the text of every stage for snapshots and dumps.

pub mod axis_info;
pub mod canonicalize;
pub mod layouts;
pub mod pipeline;
pub mod smem;
pub mod spaces;
pub mod tma;

use crate::ir::{printer, IrError, Kernel};
use crate::target::Target;

/// A kernel after all target-independent passes, with the text of each stage.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub kernel: Kernel,
    pub layouts: layouts::LayoutPlan,
    pub smem: smem::SmemPlan,
    /// Loops whose `dot` operands are streamed through shared memory.
    pub pipeline: pipeline::PipelinePlan,
    /// `(stage name, text)` in order: `parsed`, `canonical`, `layouts`, `smem`.
    pub stages: Vec<(&'static str, String)>,
}

/// Runs the pass pipeline on `kernel` for `target`.
pub fn compile(mut kernel: Kernel, target: &Target) -> Result<Compiled, IrError> {
    let mut stages = vec![("parsed", printer::print(&kernel))];
    canonicalize::canonicalize(&mut kernel);
    stages.push(("canonical", printer::print(&kernel)));
    let layouts = layouts::assign_layouts(&mut kernel)?;
    stages.push(("layouts", layouts.print(&kernel)));
    let mut pipeline = pipeline::plan(&kernel, &layouts);
    tma::plan(&kernel, &mut pipeline);
    // Bulk reductions are sm_90a's (TMA); sm_80 adds with `red.global` from the atomic's own
    // layouts, so its value keeps the conversion into the pointer's layout.
    if target.arch == crate::launch::Arch::Sm90 {
        tma::unconvert_reduces(&mut kernel, &pipeline);
    } else {
        pipeline.reduces.clear();
    }
    let smem = smem::plan(&kernel, &layouts, &mut pipeline, target)?;
    let mut text = smem.print();
    text.push_str(&pipeline.print());
    stages.push(("smem", text));
    Ok(Compiled {
        kernel,
        layouts,
        smem,
        pipeline,
        stages,
    })
}
