//! Per-op emission of LLVM IR for one kernel (see the module doc of [`super`]): the kernel
//! skeleton and op dispatch here; arithmetic in `arith.rs`, global memory in `memory.rs`,
//! reductions and layout conversions in `scratch.rs`, loops and branches in `control.rs`.

mod arith;
mod control;
mod memory;
mod mma;
mod scratch;
mod tma;
mod wgmma;

use super::shared;
use crate::dtype::DType;
use crate::ir::{BinOp, Block, CmpPred, ConstValue, IrError, Op, ReduceKind, UnOp, ValueId};
use crate::layout::Layout;
use crate::passes::smem::warps_along;
use crate::passes::Compiled;
use crate::target::{ADDRSPACE_GLOBAL, WARP_SIZE};
use inkwell::basic_block::BasicBlock;
use inkwell::builder::{Builder, BuilderError};
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicMetadataTypeEnum, BasicType, BasicTypeEnum};
use inkwell::values::{
    BasicValue, BasicValueEnum, FloatValue, FunctionValue, GlobalValue, IntValue, PointerValue,
};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use std::collections::HashMap;

type V<'c> = BasicValueEnum<'c>;
type R<T> = Result<T, IrError>;

fn be(e: BuilderError) -> IrError {
    IrError(format!("LLVM builder: {e}"))
}

/// Emits the kernel function into `module`.
pub(super) fn emit_kernel<'c>(
    ctx: &'c Context,
    module: &Module<'c>,
    c: &Compiled,
    symbol: &str,
    wgmma: bool,
) -> R<FunctionValue<'c>> {
    let k = &c.kernel;
    let mut params: Vec<BasicMetadataTypeEnum> = vec![];
    for a in &k.args {
        params.push(llvm_ty(ctx, k.ty(a.value).dtype).into());
    }
    // Tensor maps of the TMA loops (sm_90a): 128-byte `byval` parameters, aligned to 64, that
    // [`super::lower`] marks `grid_constant` so that their address is the parameter's own.
    let maps = tma_map_count(c, wgmma);
    for _ in 0..maps {
        params.push(ctx.ptr_type(AddressSpace::default()).into());
    }
    let fn_ty = ctx.void_type().fn_type(&params, false);
    let func = module.add_function(symbol, fn_ty, None);
    let map_ty = ctx.i8_type().array_type(128);
    for i in 0..maps {
        let at = inkwell::attributes::AttributeLoc::Param((k.args.len() + i) as u32);
        let byval = inkwell::attributes::Attribute::get_named_enum_kind_id("byval");
        func.add_attribute(at, ctx.create_type_attribute(byval, map_ty.into()));
        let align = inkwell::attributes::Attribute::get_named_enum_kind_id("align");
        func.add_attribute(at, ctx.create_enum_attribute(align, 64));
    }
    let entry = ctx.append_basic_block(func, "entry");
    let body = ctx.append_basic_block(func, "body");
    let exit = ctx.append_basic_block(func, "exit");
    let b = ctx.create_builder();
    b.position_at_end(entry);
    let mut g = Gen {
        ctx,
        module,
        b,
        func,
        c,
        vals: HashMap::new(),
        lane: ctx.i32_type().const_zero(),
        warp: ctx.i32_type().const_zero(),
        entry,
        coords: HashMap::new(),
        owners: HashMap::new(),
        smem: None,
        slots: HashMap::new(),
        wgmma,
        async_dots: Default::default(),
        pingpong: None,
        tma_maps: vec![],
        exit,
    };
    let tid = g
        .call(
            "llvm.nvvm.read.ptx.sreg.tid.x",
            ctx.i32_type().into(),
            &[],
            &[],
        )?
        .into_int_value();
    g.lane =
        g.b.build_and(tid, g.i32(WARP_SIZE as i64 - 1), "lane")
            .map_err(be)?;
    g.warp =
        g.b.build_right_shift(tid, g.i32(5), false, "warp")
            .map_err(be)?;
    if c.smem.dynamic {
        // Dynamic shared memory: sized by the launcher (`KernelInfo::smem_bytes`).
        let ty = ctx.i8_type().array_type(0);
        let gv = module.add_global(ty, Some(shared()), "lexp_dyn_smem");
        gv.set_linkage(Linkage::External);
        gv.set_alignment(1024);
        g.smem = Some(gv);
    } else if c.smem.total > 0 {
        let ty = ctx.i8_type().array_type(c.smem.total as u32);
        let gv = module.add_global(ty, Some(shared()), "lexp_smem");
        gv.set_linkage(Linkage::Internal);
        gv.set_initializer(&ty.get_undef());
        // Swizzled tiles repeat every 1024 bytes (COMPILER.md §1.5).
        gv.set_alignment(if c.pipeline.loops.is_empty() && !has_dot(c) {
            16
        } else {
            1024
        });
        g.smem = Some(gv);
    }
    for (i, a) in k.args.iter().enumerate() {
        let p = func
            .get_nth_param(i as u32)
            .ok_or_else(|| IrError("missing parameter".into()))?;
        p.set_name(&a.name.replace('.', "_"));
        g.vals.insert(a.value, vec![p]);
    }
    for i in 0..maps {
        let p = func
            .get_nth_param((k.args.len() + i) as u32)
            .ok_or_else(|| IrError("missing tensor map parameter".into()))?;
        p.set_name(&format!("tma_map_{i}"));
        g.tma_maps.push(p.into_pointer_value());
    }
    g.b.position_at_end(body);
    g.block(&k.body)?;
    if g.b
        .get_insert_block()
        .and_then(|bb| bb.get_terminator())
        .is_none()
    {
        g.b.build_unconditional_branch(exit).map_err(be)?;
    }
    g.b.position_at_end(entry);
    g.b.build_unconditional_branch(body).map_err(be)?;
    g.b.position_at_end(exit);
    if wgmma && !c.pipeline.reduces.is_empty() {
        g.bulk_reduce_drain()?;
    }
    g.b.build_return(None).map_err(be)?;
    Ok(func)
}

/// Tensor-map parameters the kernel takes on this target: the TMA plan's maps on sm_90a
/// (`wgmma`), none on sm_80, where the loops copy with `cp.async`.
pub(super) fn tma_map_count(c: &Compiled, sm90: bool) -> usize {
    if sm90 {
        c.pipeline.maps.len()
    } else {
        0
    }
}

fn has_dot(c: &Compiled) -> bool {
    crate::passes::spaces::has_dot(&c.kernel)
}

/// The LLVM type of one register of `dtype`.
fn llvm_ty(ctx: &Context, dtype: DType) -> BasicTypeEnum<'_> {
    match dtype {
        DType::I1 => ctx.bool_type().into(),
        DType::I32 => ctx.i32_type().into(),
        DType::I64 => ctx.i64_type().into(),
        DType::F16 => ctx.f16_type().into(),
        DType::BF16 => ctx.bf16_type().into(),
        DType::F32 => ctx.f32_type().into(),
        DType::Ptr(_) => ctx.ptr_type(AddressSpace::from(ADDRSPACE_GLOBAL)).into(),
    }
}

struct Gen<'c, 'a> {
    ctx: &'c Context,
    module: &'a Module<'c>,
    b: Builder<'c>,
    func: FunctionValue<'c>,
    c: &'a Compiled,
    vals: HashMap<ValueId, Vec<V<'c>>>,
    lane: IntValue<'c>,
    warp: IntValue<'c>,
    /// The prologue: per-thread facts computed once, dominating every use.
    entry: BasicBlock<'c>,
    coords: HashMap<Layout, Vec<IntValue<'c>>>,
    owners: HashMap<Layout, Option<IntValue<'c>>>,
    smem: Option<GlobalValue<'c>>,
    /// Byte offset of the current slot of each streamed load (set inside pipelined loops).
    slots: HashMap<ValueId, IntValue<'c>>,
    /// Whether the target has Hopper's warpgroup MMA (`wgmma`, sm_90a).
    wgmma: bool,
    /// `dot`s (by result) of the pipelined loop being emitted whose MMAs stay in flight
    /// across iterations (see `PipelinedLoop::async_dots`).
    async_dots: std::collections::HashSet<ValueId>,
    /// Inside a ping-pong loop ([`crate::ir::Kernel::pingpong`]): whether this thread is in
    /// warpgroup 1 (`i1`; see [`Gen::pingpong_turn`]).
    pingpong: Option<IntValue<'c>>,
    /// The tensor-map parameters (sm_90a TMA loops), in the plan's order.
    tma_maps: Vec<PointerValue<'c>>,
    exit: BasicBlock<'c>,
}

impl<'c> Gen<'c, '_> {
    pub(super) fn i32(&self, v: i64) -> IntValue<'c> {
        self.ctx.i32_type().const_int(v as u64, true)
    }

    pub(super) fn f32(&self, v: f64) -> FloatValue<'c> {
        self.ctx.f32_type().const_float(v)
    }

    pub(super) fn get(&self, v: ValueId) -> R<&Vec<V<'c>>> {
        self.vals
            .get(&v)
            .ok_or_else(|| IrError(format!("codegen: value #{} used before definition", v.0)))
    }

    pub(super) fn layout(&self, v: ValueId) -> &Layout {
        self.c.layouts.of(v)
    }

    pub(super) fn dtype(&self, v: ValueId) -> DType {
        self.c.kernel.ty(v).dtype
    }

    pub(super) fn call(
        &self,
        name: &str,
        ret: BasicTypeEnum<'c>,
        arg_tys: &[BasicMetadataTypeEnum<'c>],
        args: &[V<'c>],
    ) -> R<V<'c>> {
        let f = self.module.get_function(name).unwrap_or_else(|| {
            self.module
                .add_function(name, ret.fn_type(arg_tys, false), None)
        });
        let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
        let cs = self.b.build_call(f, &args, "").map_err(be)?;
        cs.try_as_basic_value()
            .basic()
            .ok_or_else(|| IrError(format!("intrinsic {name} returned nothing")))
    }

    /// Calls a function returning nothing, declaring it on first use.
    pub(super) fn call_void_with(
        &self,
        name: &str,
        arg_tys: &[BasicMetadataTypeEnum<'c>],
        args: &[V<'c>],
    ) -> R<()> {
        let f = self.module.get_function(name).unwrap_or_else(|| {
            self.module
                .add_function(name, self.ctx.void_type().fn_type(arg_tys, false), None)
        });
        let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
        self.b.build_call(f, &args, "").map_err(be)?;
        Ok(())
    }

    pub(super) fn call_void(&self, name: &str) -> R<()> {
        let f = self.module.get_function(name).unwrap_or_else(|| {
            self.module
                .add_function(name, self.ctx.void_type().fn_type(&[], false), None)
        });
        self.b.build_call(f, &[], "").map_err(be)?;
        Ok(())
    }

    pub(super) fn f32_intrinsic(&self, name: &str, args: &[FloatValue<'c>]) -> R<FloatValue<'c>> {
        let t = self.ctx.f32_type();
        let tys: Vec<BasicMetadataTypeEnum> = args.iter().map(|_| t.into()).collect();
        let vals: Vec<V> = args.iter().map(|a| (*a).into()).collect();
        Ok(self.call(name, t.into(), &tys, &vals)?.into_float_value())
    }

    /// Runs `f` with the builder at the end of the prologue, then restores the position.
    pub(super) fn in_prologue<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        let here = self.b.get_insert_block();
        self.b.position_at_end(self.entry);
        let r = f(self);
        if let Some(bb) = here {
            self.b.position_at_end(bb);
        }
        r
    }

    /// The thread part of each coordinate of `l` (i32), computed once in the prologue.
    pub(super) fn thread_coord(&mut self, l: &Layout) -> R<Vec<IntValue<'c>>> {
        if let Some(c) = self.coords.get(l) {
            return Ok(c.clone());
        }
        let l2 = l.clone();
        let coords = self.in_prologue(|g| {
            let mut out = vec![];
            for d in 0..l2.rank() {
                let mut sum = g.i32(0);
                for (src, bases) in [(g.lane, &l2.lane), (g.warp, &l2.warp)] {
                    for (j, basis) in bases.iter().enumerate() {
                        if basis[d] == 0 {
                            continue;
                        }
                        let bit =
                            g.b.build_right_shift(src, g.i32(j as i64), false, "")
                                .map_err(be)?;
                        let bit = g.b.build_and(bit, g.i32(1), "").map_err(be)?;
                        let term =
                            g.b.build_left_shift(bit, g.i32(basis[d].trailing_zeros() as i64), "")
                                .map_err(be)?;
                        sum = g.b.build_or(sum, term, "").map_err(be)?;
                    }
                }
                out.push(sum);
            }
            Ok(out)
        })?;
        self.coords.insert(l.clone(), coords.clone());
        Ok(coords)
    }

    /// The predicate "this thread is the one owner of its elements" of `l` (None: always).
    pub(super) fn owner(&mut self, l: &Layout) -> R<Option<IntValue<'c>>> {
        if let Some(o) = self.owners.get(l) {
            return Ok(*o);
        }
        let (dl, dw) = (l.dup_lane_mask(), l.dup_warp_mask());
        let o = if dl == 0 && dw == 0 {
            None
        } else {
            Some(self.in_prologue(|g| {
                let a = g.b.build_and(g.lane, g.i32(dl as i64), "").map_err(be)?;
                let w = g.b.build_and(g.warp, g.i32(dw as i64), "").map_err(be)?;
                let any = g.b.build_or(a, w, "").map_err(be)?;
                g.b.build_int_compare(IntPredicate::EQ, any, g.i32(0), "owner")
                    .map_err(be)
            })?)
        };
        self.owners.insert(l.clone(), o);
        Ok(o)
    }

    pub(super) fn terminated(&self) -> bool {
        self.b
            .get_insert_block()
            .and_then(|bb| bb.get_terminator())
            .is_some()
    }

    /// Emits a block; returns the values of its final `yield`, if any.
    pub(super) fn block(&mut self, blk: &Block) -> R<Option<Vec<Vec<V<'c>>>>> {
        for inst in &blk.insts {
            if let Op::Yield { values } = &inst.op {
                let vs = values
                    .iter()
                    .map(|v| self.get(*v).cloned())
                    .collect::<R<Vec<_>>>()?;
                return Ok(Some(vs));
            }
            let results = self.op(&inst.op, &inst.results)?;
            for (r, v) in inst.results.iter().zip(results) {
                self.vals.insert(*r, v);
            }
            if matches!(inst.op, Op::Return) {
                // The block is terminated (a branch to the exit): what follows is dead.
                return Ok(None);
            }
        }
        Ok(None)
    }

    pub(super) fn op(&mut self, op: &Op, results: &[ValueId]) -> R<Vec<Vec<V<'c>>>> {
        let res = results.first().copied();
        let one = |v: Vec<V<'c>>| Ok(vec![v]);
        match op {
            Op::ProgramId { axis } => {
                let name = format!(
                    "llvm.nvvm.read.ptx.sreg.ctaid.{}",
                    ["x", "y", "z"][*axis as usize]
                );
                one(vec![self.call(
                    &name,
                    self.ctx.i32_type().into(),
                    &[],
                    &[],
                )?])
            }
            Op::Const { value } => {
                let r = res.ok_or_else(|| IrError("const without result".into()))?;
                let v = self.constant(*value, self.dtype(r));
                one(vec![v; self.layout(r).num_regs()])
            }
            Op::Range { .. } => {
                let r = res.ok_or_else(|| IrError("range without result".into()))?;
                let l = self.layout(r).clone();
                let tc = self.thread_coord(&l)?;
                let mut out = vec![];
                for reg in 0..l.num_regs() {
                    let off = self.i32(l.reg_coord(reg)[0] as i64);
                    out.push(self.b.build_or(tc[0], off, "").map_err(be)?.into());
                }
                one(out)
            }
            Op::Splat { src } => {
                let r = res.ok_or_else(|| IrError("splat without result".into()))?;
                let v = self.get(*src)?[0];
                one(vec![v; self.layout(r).num_regs()])
            }
            Op::ConvertLayout { src } => {
                let r = res.ok_or_else(|| IrError("convert without result".into()))?;
                one(self.convert_layout(r, *src)?)
            }
            Op::ExpandDims { src, .. } | Op::Broadcast { src } => {
                let r = res.ok_or_else(|| IrError("broadcast without result".into()))?;
                let map = self.layout(r).reg_map(self.layout(*src)).ok_or_else(|| {
                    IrError("codegen: broadcast between unrelated layouts".into())
                })?;
                let s = self.get(*src)?;
                one(map.iter().map(|m| s[*m]).collect())
            }
            Op::Binary { op, lhs, rhs } => {
                let dt = self.dtype(*lhs);
                let (a, b) = (self.get(*lhs)?.clone(), self.get(*rhs)?.clone());
                let out = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| self.binary(*op, dt, *x, *y))
                    .collect::<R<Vec<_>>>()?;
                one(out)
            }
            Op::Cmp { pred, lhs, rhs } => {
                let dt = self.dtype(*lhs);
                let (a, b) = (self.get(*lhs)?.clone(), self.get(*rhs)?.clone());
                let out = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| self.cmp(*pred, dt, *x, *y))
                    .collect::<R<Vec<_>>>()?;
                one(out)
            }
            Op::Unary { op, src } => {
                let dt = self.dtype(*src);
                let a = self.get(*src)?.clone();
                one(a
                    .iter()
                    .map(|x| self.unary(*op, dt, *x))
                    .collect::<R<Vec<_>>>()?)
            }
            Op::Select { cond, a, b } => {
                let (c, x, y) = (
                    self.get(*cond)?.clone(),
                    self.get(*a)?.clone(),
                    self.get(*b)?.clone(),
                );
                let mut out = vec![];
                for i in 0..c.len() {
                    out.push(
                        self.b
                            .build_select(c[i].into_int_value(), x[i], y[i], "")
                            .map_err(be)?,
                    );
                }
                one(out)
            }
            Op::Cast { src } => {
                let r = res.ok_or_else(|| IrError("cast without result".into()))?;
                let (from, to) = (self.dtype(*src), self.dtype(r));
                let a = self.get(*src)?.clone();
                one(a
                    .iter()
                    .map(|x| self.cast(*x, from, to))
                    .collect::<R<Vec<_>>>()?)
            }
            Op::AddPtr { ptr, offset } => {
                let DType::Ptr(st) = self.dtype(*ptr) else {
                    return Err(IrError("addptr on a non-pointer".into()));
                };
                let elem = llvm_ty(self.ctx, st.dtype());
                let (p, o) = (self.get(*ptr)?.clone(), self.get(*offset)?.clone());
                let mut out = vec![];
                for i in 0..p.len() {
                    // SAFETY: in-bounds-ness is the kernel's contract; accesses are masked.
                    let q = unsafe {
                        self.b.build_gep(
                            elem,
                            p[i].into_pointer_value(),
                            &[o[i].into_int_value()],
                            "",
                        )
                    }
                    .map_err(be)?;
                    out.push(q.into());
                }
                one(out)
            }
            Op::Load { ptr, mask, other } => {
                let r = res.ok_or_else(|| IrError("load without result".into()))?;
                if self.c.pipeline.staged(r).is_some() {
                    // Streamed by `cp.async`; only `dot` reads it, from its shared slot.
                    return one(vec![]);
                }
                one(self.load(r, *ptr, *mask, *other)?)
            }
            Op::Trans { src } => {
                let r = res.ok_or_else(|| IrError("trans without result".into()))?;
                if self.c.pipeline.staged(*src).is_some() {
                    return one(vec![]);
                }
                if *self.layout(r) != self.layout(*src).transpose() {
                    return Err(IrError(
                        "codegen: trans result is not the transposed layout".into(),
                    ));
                }
                one(self.get(*src)?.clone())
            }
            Op::Dot { a, b, acc } => {
                let r = res.ok_or_else(|| IrError("dot without result".into()))?;
                one(self.dot(r, *a, *b, *acc)?)
            }
            Op::Store { ptr, value, mask } => {
                self.store(*ptr, *value, *mask, false)?;
                Ok(vec![])
            }
            Op::AtomicAdd { ptr, value, mask } => {
                let bulk = self
                    .c
                    .pipeline
                    .reduces
                    .iter()
                    .find(|r| r.ptr == *ptr)
                    .filter(|_| self.wgmma);
                match bulk {
                    Some(r) => self.bulk_reduce(r, *value)?,
                    None => self.store(*ptr, *value, *mask, true)?,
                }
                Ok(vec![])
            }
            Op::Reduce { src, axis, kind } => {
                let r = res.ok_or_else(|| IrError("reduce without result".into()))?;
                one(self.reduce(r, *src, *axis, *kind)?)
            }
            Op::For {
                lo,
                hi,
                step,
                inits,
                body,
            } => self.for_loop(*lo, *hi, *step, inits, body),
            Op::If {
                cond,
                then_block,
                else_block,
            } => self.if_(*cond, then_block, else_block, results),
            Op::Return => {
                self.b.build_unconditional_branch(self.exit).map_err(be)?;
                Ok(vec![])
            }
            Op::Yield { .. } => Err(IrError("codegen: yield outside a block end".into())),
        }
    }
}

fn vector_of(elem: BasicTypeEnum<'_>, w: usize) -> BasicTypeEnum<'_> {
    match elem {
        BasicTypeEnum::FloatType(t) => t.vec_type(w as u32).into(),
        BasicTypeEnum::IntType(t) => t.vec_type(w as u32).into(),
        other => other,
    }
}

fn set_align(v: V<'_>, bytes: usize) -> R<()> {
    if let Some(i) = v.as_instruction_value() {
        i.set_alignment(bytes as u32)
            .map_err(|e| IrError(format!("LLVM: alignment: {e}")))?;
    }
    Ok(())
}
