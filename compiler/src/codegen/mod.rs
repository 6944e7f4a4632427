//! Lowering to LLVM IR (inkwell) and PTX (LLVM's NVPTX backend at -O3).
//!
//! Every tile value becomes, per thread, the list of registers its layout gives that thread
//! ([`crate::layout::Layout::num_regs`]); element-wise ops work register by register, layout
//! changes that involve no data movement (broadcast, expand, reduce results) are static
//! register maps, reductions combine in registers, then across lanes with butterfly shuffles,
//! then across warps through the shared-memory plan. Global accesses move one vector of the
//! width the layout pass chose per predicate. See `emit.rs` for the per-op rules.

mod emit;

use crate::ir::IrError;
use crate::passes::Compiled;
use crate::target::{Target, ADDRSPACE_SHARED, PTX_KERNEL_CC, TRIPLE};
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target as LlvmTarget, TargetMachine,
    TargetTriple,
};
use inkwell::values::BasicMetadataValueEnum;
use inkwell::{AddressSpace, OptimizationLevel};

/// LLVM IR (after optimisation) and PTX of one kernel variant for one target.
#[derive(Clone, Debug)]
pub struct Lowered {
    pub llvm_ir: String,
    pub ptx: String,
}

fn err(what: &str, e: impl std::fmt::Display) -> IrError {
    IrError(format!("LLVM: {what}: {e}"))
}

fn target_machine(target: &Target) -> Result<TargetMachine, IrError> {
    LlvmTarget::initialize_nvptx(&InitializationConfig::default());
    let triple = TargetTriple::create(TRIPLE);
    let t = LlvmTarget::from_triple(&triple).map_err(|e| err("no NVPTX target in this LLVM", e))?;
    t.create_target_machine(
        &triple,
        target.cpu,
        target.features,
        OptimizationLevel::Aggressive,
        RelocMode::Default,
        CodeModel::Default,
    )
    .ok_or_else(|| {
        IrError(format!(
            "LLVM: cannot create a target machine for {}",
            target.name
        ))
    })
}

/// Lowers a compiled kernel to LLVM IR and PTX, with entry name `symbol`.
pub fn lower(c: &Compiled, target: &Target, symbol: &str) -> Result<Lowered, IrError> {
    let ctx = Context::create();
    let module = ctx.create_module(symbol);
    let tm = target_machine(target)?;
    module.set_triple(&TargetTriple::create(TRIPLE));
    module.set_data_layout(&tm.get_target_data().get_data_layout());

    let wgmma = target.arch == crate::launch::Arch::Sm90;
    let func = emit::emit_kernel(&ctx, &module, c, symbol, wgmma)?;
    func.set_call_conventions(PTX_KERNEL_CC);
    let maps = emit::tma_map_count(c, wgmma);
    annotate(
        &ctx,
        &module,
        func,
        (c.kernel.num_threads(), c.kernel.min_ctas),
        c.kernel.args.len(),
        maps,
    )?;
    module
        .verify()
        .map_err(|e| err("invalid module", e.to_string()))?;
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(|e| err("optimisation failed", e.to_string()))?;
    let llvm_ir = module.print_to_string().to_string();
    let buf = tm
        .write_to_memory_buffer(&module, FileType::Assembly)
        .map_err(|e| err("PTX emission failed", e.to_string()))?;
    let ptx = String::from_utf8_lossy(buf.as_slice())
        .trim_end_matches('\0')
        .to_string();
    if ptx.contains(".extern .func llvm.") {
        return Err(IrError(format!(
            "kernel `{symbol}`: PTX calls an unknown LLVM intrinsic (see COMPILER.md §8.4)"
        )));
    }
    Ok(Lowered { llvm_ir, ptx })
}

/// `!nvvm.annotations`: mark the kernel and its CTA size so ptxas can budget registers.
fn annotate<'c>(
    ctx: &'c Context,
    module: &Module<'c>,
    func: inkwell::values::FunctionValue<'c>,
    (threads, min_ctas): (usize, usize),
    args: usize,
    maps: usize,
) -> Result<(), IrError> {
    let fptr: BasicMetadataValueEnum = func.as_global_value().as_pointer_value().into();
    let i32t = ctx.i32_type();
    // `minctasm 1` stops ptxas from squeezing registers for full occupancy (it spilled at 32
    // registers on sm_80 without it); the CTA size bounds registers at 255 anyway. A kernel
    // asking for more programs per multiprocessor ([`Kernel::min_ctas`]) gets that budget.
    for (key, value) in [
        ("kernel", 1u64),
        ("maxntidx", threads as u64),
        ("minctasm", min_ctas.max(1) as u64),
    ] {
        let node = ctx.metadata_node(&[
            fptr,
            ctx.metadata_string(key).into(),
            i32t.const_int(value, false).into(),
        ]);
        module
            .add_global_metadata("nvvm.annotations", &node)
            .map_err(|e| err("metadata", e))?;
    }
    if maps > 0 {
        // `grid_constant` (1-based parameter numbers): the tensor maps are read in place, and
        // their address is taken with `cvta.param` (COMPILER.md §8.2); without it LLVM would
        // copy them to local memory, which is not a valid tensor map.
        let nums: Vec<BasicMetadataValueEnum> = (0..maps)
            .map(|i| i32t.const_int((args + i + 1) as u64, false).into())
            .collect();
        let node = ctx.metadata_node(&[
            fptr,
            ctx.metadata_string("grid_constant").into(),
            ctx.metadata_node(&nums).into(),
        ]);
        module
            .add_global_metadata("nvvm.annotations", &node)
            .map_err(|e| err("metadata", e))?;
    }
    Ok(())
}

/// The shared-memory address space.
pub(crate) fn shared() -> AddressSpace {
    AddressSpace::from(ADDRSPACE_SHARED)
}
