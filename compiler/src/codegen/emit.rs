//! Per-op emission of LLVM IR for one kernel (see the module doc of [`super`]).

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
) -> R<FunctionValue<'c>> {
    let k = &c.kernel;
    let mut params: Vec<BasicMetadataTypeEnum> = vec![];
    for a in &k.args {
        params.push(llvm_ty(ctx, k.ty(a.value).dtype).into());
    }
    let fn_ty = ctx.void_type().fn_type(&params, false);
    let func = module.add_function(symbol, fn_ty, None);
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
    if c.smem.total > 0 {
        let ty = ctx.i8_type().array_type(c.smem.total as u32);
        let gv = module.add_global(ty, Some(shared()), "lexp_smem");
        gv.set_linkage(Linkage::Internal);
        gv.set_initializer(&ty.get_undef());
        gv.set_alignment(16);
        g.smem = Some(gv);
    }
    for (i, a) in k.args.iter().enumerate() {
        let p = func
            .get_nth_param(i as u32)
            .ok_or_else(|| IrError("missing parameter".into()))?;
        p.set_name(&a.name.replace('.', "_"));
        g.vals.insert(a.value, vec![p]);
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
    g.b.build_return(None).map_err(be)?;
    Ok(func)
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
    exit: BasicBlock<'c>,
}

impl<'c> Gen<'c, '_> {
    fn i32(&self, v: i64) -> IntValue<'c> {
        self.ctx.i32_type().const_int(v as u64, true)
    }

    fn f32(&self, v: f64) -> FloatValue<'c> {
        self.ctx.f32_type().const_float(v)
    }

    fn get(&self, v: ValueId) -> R<&Vec<V<'c>>> {
        self.vals
            .get(&v)
            .ok_or_else(|| IrError(format!("codegen: value #{} used before definition", v.0)))
    }

    fn layout(&self, v: ValueId) -> &Layout {
        self.c.layouts.of(v)
    }

    fn dtype(&self, v: ValueId) -> DType {
        self.c.kernel.ty(v).dtype
    }

    fn call(
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

    fn call_void(&self, name: &str) -> R<()> {
        let f = self.module.get_function(name).unwrap_or_else(|| {
            self.module
                .add_function(name, self.ctx.void_type().fn_type(&[], false), None)
        });
        self.b.build_call(f, &[], "").map_err(be)?;
        Ok(())
    }

    fn f32_intrinsic(&self, name: &str, args: &[FloatValue<'c>]) -> R<FloatValue<'c>> {
        let t = self.ctx.f32_type();
        let tys: Vec<BasicMetadataTypeEnum> = args.iter().map(|_| t.into()).collect();
        let vals: Vec<V> = args.iter().map(|a| (*a).into()).collect();
        Ok(self.call(name, t.into(), &tys, &vals)?.into_float_value())
    }

    /// Runs `f` with the builder at the end of the prologue, then restores the position.
    fn in_prologue<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        let here = self.b.get_insert_block();
        self.b.position_at_end(self.entry);
        let r = f(self);
        if let Some(bb) = here {
            self.b.position_at_end(bb);
        }
        r
    }

    /// The thread part of each coordinate of `l` (i32), computed once in the prologue.
    fn thread_coord(&mut self, l: &Layout) -> R<Vec<IntValue<'c>>> {
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
    fn owner(&mut self, l: &Layout) -> R<Option<IntValue<'c>>> {
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

    fn terminated(&self) -> bool {
        self.b
            .get_insert_block()
            .and_then(|bb| bb.get_terminator())
            .is_some()
    }

    /// Emits a block; returns the values of its final `yield`, if any.
    fn block(&mut self, blk: &Block) -> R<Option<Vec<Vec<V<'c>>>>> {
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

    fn op(&mut self, op: &Op, results: &[ValueId]) -> R<Vec<Vec<V<'c>>>> {
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
                one(self.load(r, *ptr, *mask, *other)?)
            }
            Op::Store { ptr, value, mask } => {
                self.store(*ptr, *value, *mask, false)?;
                Ok(vec![])
            }
            Op::AtomicAdd { ptr, value, mask } => {
                self.store(*ptr, *value, *mask, true)?;
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

    fn constant(&self, v: ConstValue, dtype: DType) -> V<'c> {
        match dtype {
            DType::I1 | DType::I32 | DType::I64 => {
                let t = llvm_ty(self.ctx, dtype).into_int_type();
                let i = match v {
                    ConstValue::Int(i) => i,
                    ConstValue::Float(x) => x as i64,
                };
                t.const_int(i as u64, true).into()
            }
            DType::F16 | DType::BF16 | DType::F32 => llvm_ty(self.ctx, dtype)
                .into_float_type()
                .const_float(v.as_f64())
                .into(),
            DType::Ptr(_) => self
                .ctx
                .ptr_type(AddressSpace::from(ADDRSPACE_GLOBAL))
                .const_null()
                .into(),
        }
    }

    fn widen(&self, v: V<'c>, dt: DType) -> R<FloatValue<'c>> {
        let f = v.into_float_value();
        if dt == DType::F32 {
            Ok(f)
        } else {
            self.b
                .build_float_ext(f, self.ctx.f32_type(), "")
                .map_err(be)
        }
    }

    fn narrow(&self, v: FloatValue<'c>, dt: DType) -> R<V<'c>> {
        if dt == DType::F32 {
            Ok(v.into())
        } else {
            Ok(self
                .b
                .build_float_trunc(v, llvm_ty(self.ctx, dt).into_float_type(), "")
                .map_err(be)?
                .into())
        }
    }

    fn binary(&self, op: BinOp, dt: DType, x: V<'c>, y: V<'c>) -> R<V<'c>> {
        let b = &self.b;
        if dt.is_float() {
            let (a, c) = (self.widen(x, dt)?, self.widen(y, dt)?);
            let r = match op {
                BinOp::Add => b.build_float_add(a, c, "").map_err(be)?,
                BinOp::Sub => b.build_float_sub(a, c, "").map_err(be)?,
                BinOp::Mul => b.build_float_mul(a, c, "").map_err(be)?,
                BinOp::Div => b.build_float_div(a, c, "").map_err(be)?,
                BinOp::Max => self.f32_intrinsic("llvm.maxnum.f32", &[a, c])?,
                BinOp::Min => self.f32_intrinsic("llvm.minnum.f32", &[a, c])?,
                BinOp::Rem | BinOp::And | BinOp::Or => {
                    return Err(IrError(format!("{op:?} on floats")))
                }
            };
            return self.narrow(r, dt);
        }
        let (a, c) = (x.into_int_value(), y.into_int_value());
        Ok(match op {
            BinOp::Add => b.build_int_add(a, c, "").map_err(be)?,
            BinOp::Sub => b.build_int_sub(a, c, "").map_err(be)?,
            BinOp::Mul => b.build_int_mul(a, c, "").map_err(be)?,
            BinOp::Div => b.build_int_signed_div(a, c, "").map_err(be)?,
            BinOp::Rem => b.build_int_signed_rem(a, c, "").map_err(be)?,
            BinOp::And => b.build_and(a, c, "").map_err(be)?,
            BinOp::Or => b.build_or(a, c, "").map_err(be)?,
            BinOp::Max | BinOp::Min => {
                let p = if op == BinOp::Max {
                    IntPredicate::SGT
                } else {
                    IntPredicate::SLT
                };
                let gt = b.build_int_compare(p, a, c, "").map_err(be)?;
                b.build_select(gt, a, c, "").map_err(be)?.into_int_value()
            }
        }
        .into())
    }

    fn cmp(&self, pred: CmpPred, dt: DType, x: V<'c>, y: V<'c>) -> R<V<'c>> {
        if dt.is_float() {
            let (a, c) = (self.widen(x, dt)?, self.widen(y, dt)?);
            let p = match pred {
                CmpPred::Lt => FloatPredicate::OLT,
                CmpPred::Le => FloatPredicate::OLE,
                CmpPred::Gt => FloatPredicate::OGT,
                CmpPred::Ge => FloatPredicate::OGE,
                CmpPred::Eq => FloatPredicate::OEQ,
                CmpPred::Ne => FloatPredicate::UNE,
            };
            return Ok(self.b.build_float_compare(p, a, c, "").map_err(be)?.into());
        }
        let p = match pred {
            CmpPred::Lt => IntPredicate::SLT,
            CmpPred::Le => IntPredicate::SLE,
            CmpPred::Gt => IntPredicate::SGT,
            CmpPred::Ge => IntPredicate::SGE,
            CmpPred::Eq => IntPredicate::EQ,
            CmpPred::Ne => IntPredicate::NE,
        };
        Ok(self
            .b
            .build_int_compare(p, x.into_int_value(), y.into_int_value(), "")
            .map_err(be)?
            .into())
    }

    fn unary(&self, op: UnOp, dt: DType, x: V<'c>) -> R<V<'c>> {
        let b = &self.b;
        if !dt.is_float() {
            let a = x.into_int_value();
            return Ok(match op {
                UnOp::Neg => b.build_int_neg(a, "").map_err(be)?,
                UnOp::Not => b.build_not(a, "").map_err(be)?,
                UnOp::Abs => {
                    let neg = b.build_int_neg(a, "").map_err(be)?;
                    let lt = b
                        .build_int_compare(IntPredicate::SLT, a, a.get_type().const_zero(), "")
                        .map_err(be)?;
                    b.build_select(lt, neg, a, "").map_err(be)?.into_int_value()
                }
                _ => return Err(IrError(format!("{op:?} on integers"))),
            }
            .into());
        }
        let a = self.widen(x, dt)?;
        let log2e = std::f64::consts::LOG2_E;
        let ln2 = std::f64::consts::LN_2;
        let r = match op {
            UnOp::Neg => b.build_float_neg(a, "").map_err(be)?,
            UnOp::Abs => self.f32_intrinsic("llvm.fabs.f32", &[a])?,
            UnOp::Exp => {
                let s = b.build_float_mul(a, self.f32(log2e), "").map_err(be)?;
                self.f32_intrinsic("llvm.nvvm.ex2.approx.f", &[s])?
            }
            UnOp::Exp2 => self.f32_intrinsic("llvm.nvvm.ex2.approx.f", &[a])?,
            UnOp::Log => {
                let l = self.f32_intrinsic("llvm.nvvm.lg2.approx.f", &[a])?;
                b.build_float_mul(l, self.f32(ln2), "").map_err(be)?
            }
            UnOp::Log2 => self.f32_intrinsic("llvm.nvvm.lg2.approx.f", &[a])?,
            UnOp::Sqrt => self.f32_intrinsic("llvm.sqrt.f32", &[a])?,
            UnOp::Rsqrt => self.f32_intrinsic("llvm.nvvm.rsqrt.approx.f", &[a])?,
            UnOp::Tanh => {
                // tanh(x) = sign(x) * (1 - t) / (1 + t), t = exp(-2|x|): no overflow for any x.
                let ax = self.f32_intrinsic("llvm.fabs.f32", &[a])?;
                let s = b
                    .build_float_mul(ax, self.f32(-2.0 * log2e), "")
                    .map_err(be)?;
                let t = self.f32_intrinsic("llvm.nvvm.ex2.approx.f", &[s])?;
                let num = b.build_float_sub(self.f32(1.0), t, "").map_err(be)?;
                let den = b.build_float_add(self.f32(1.0), t, "").map_err(be)?;
                let r = b.build_float_div(num, den, "").map_err(be)?;
                self.f32_intrinsic("llvm.copysign.f32", &[r, a])?
            }
            UnOp::Not => return Err(IrError("`not` on floats".into())),
        };
        self.narrow(r, dt)
    }

    fn cast(&self, x: V<'c>, from: DType, to: DType) -> R<V<'c>> {
        let b = &self.b;
        if from == to {
            return Ok(x);
        }
        let tt = llvm_ty(self.ctx, to);
        Ok(match (from.is_float(), to.is_float()) {
            (true, true) => {
                let f = self.widen(x, from)?;
                self.narrow(f, to)?
            }
            (false, false) => {
                let i = x.into_int_value();
                let t = tt.into_int_type();
                if from == DType::I1 {
                    b.build_int_z_extend(i, t, "").map_err(be)?.into()
                } else if to == DType::I1 {
                    b.build_int_compare(IntPredicate::NE, i, i.get_type().const_zero(), "")
                        .map_err(be)?
                        .into()
                } else if from.bytes() < to.bytes() {
                    b.build_int_s_extend(i, t, "").map_err(be)?.into()
                } else {
                    b.build_int_truncate(i, t, "").map_err(be)?.into()
                }
            }
            (false, true) => {
                let i = x.into_int_value();
                let f = if from == DType::I1 {
                    b.build_unsigned_int_to_float(i, self.ctx.f32_type(), "")
                        .map_err(be)?
                } else {
                    b.build_signed_int_to_float(i, self.ctx.f32_type(), "")
                        .map_err(be)?
                };
                self.narrow(f, to)?
            }
            (true, false) => {
                let f = self.widen(x, from)?;
                if to == DType::I1 {
                    b.build_float_compare(FloatPredicate::UNE, f, self.f32(0.0), "")
                        .map_err(be)?
                        .into()
                } else {
                    b.build_float_to_signed_int(f, tt.into_int_type(), "")
                        .map_err(be)?
                        .into()
                }
            }
        })
    }

    /// Branches to a new block when `cond` holds, runs `f` there, and returns
    /// `(block before, block at the end of f, merge block)`; the builder ends in the merge block.
    fn guarded<T>(
        &mut self,
        cond: Option<IntValue<'c>>,
        f: impl FnOnce(&mut Self) -> R<T>,
    ) -> R<(T, BasicBlock<'c>, BasicBlock<'c>)> {
        let before = self
            .b
            .get_insert_block()
            .ok_or_else(|| IrError("builder not positioned".into()))?;
        match cond {
            None => {
                let t = f(self)?;
                let end = self.b.get_insert_block().unwrap_or(before);
                Ok((t, end, before))
            }
            Some(c) => {
                let then_bb = self.ctx.append_basic_block(self.func, "masked");
                let merge = self.ctx.append_basic_block(self.func, "merge");
                self.b
                    .build_conditional_branch(c, then_bb, merge)
                    .map_err(be)?;
                self.b.position_at_end(then_bb);
                let t = f(self)?;
                let end = self.b.get_insert_block().unwrap_or(then_bb);
                self.b.build_unconditional_branch(merge).map_err(be)?;
                self.b.position_at_end(merge);
                Ok((t, end, before))
            }
        }
    }

    fn load(
        &mut self,
        r: ValueId,
        ptr: ValueId,
        mask: Option<ValueId>,
        other: Option<ValueId>,
    ) -> R<Vec<V<'c>>> {
        let dt = self.dtype(r);
        let elem = llvm_ty(self.ctx, dt);
        let n = self.layout(r).num_regs();
        let w = self.c.layouts.vec.get(&ptr).copied().unwrap_or(1).min(n);
        let ptrs = self.get(ptr)?.clone();
        let masks = match mask {
            Some(m) => Some(self.get(m)?.clone()),
            None => None,
        };
        let others = match other {
            Some(o) => self.get(o)?.clone(),
            None => vec![self.constant(ConstValue::Int(0), dt); n],
        };
        let mut out = vec![];
        for g in (0..n).step_by(w) {
            let p = ptrs[g].into_pointer_value();
            let cond = masks.as_ref().map(|m| m[g].into_int_value());
            let Some(cond) = cond else {
                out.extend(self.load_vector(p, elem, dt, w)?);
                continue;
            };
            // Masked: the merge takes the whole vector (loaded, or `other`), and elements are
            // extracted after it, so 16-bit pairs stay packed in 32-bit registers until used.
            let fill = self.pack(elem, &others[g..g + w])?;
            let (raw, end, before) = self.guarded(Some(cond), |s| s.load_raw(p, elem, dt, w))?;
            let phi = self.b.build_phi(raw.get_type(), "").map_err(be)?;
            phi.add_incoming(&[
                (&raw as &dyn BasicValue, end),
                (&fill as &dyn BasicValue, before),
            ]);
            out.extend(self.unpack(phi.as_basic_value(), w)?);
        }
        Ok(out)
    }

    /// One load of `w` elements (a vector when `w > 1`), aligned to its size.
    fn load_raw(
        &self,
        p: PointerValue<'c>,
        elem: BasicTypeEnum<'c>,
        dt: DType,
        w: usize,
    ) -> R<V<'c>> {
        let ty = if w == 1 { elem } else { vector_of(elem, w) };
        let v = self.b.build_load(ty, p, "").map_err(be)?;
        set_align(v, dt.bytes() * w)?;
        Ok(v)
    }

    /// Packs registers into a vector (or passes a single one through).
    fn pack(&self, elem: BasicTypeEnum<'c>, vals: &[V<'c>]) -> R<V<'c>> {
        if vals.len() == 1 {
            return Ok(vals[0]);
        }
        let mut v = vector_of(elem, vals.len()).into_vector_type().get_undef();
        for (i, x) in vals.iter().enumerate() {
            v = self
                .b
                .build_insert_element(v, *x, self.i32(i as i64), "")
                .map_err(be)?;
        }
        Ok(v.into())
    }

    /// Splits a vector into registers (or passes a single one through).
    fn unpack(&self, v: V<'c>, w: usize) -> R<Vec<V<'c>>> {
        if w == 1 {
            return Ok(vec![v]);
        }
        (0..w)
            .map(|i| {
                self.b
                    .build_extract_element(v.into_vector_value(), self.i32(i as i64), "")
                    .map_err(be)
            })
            .collect()
    }

    fn load_vector(
        &self,
        p: PointerValue<'c>,
        elem: BasicTypeEnum<'c>,
        dt: DType,
        w: usize,
    ) -> R<Vec<V<'c>>> {
        let raw = self.load_raw(p, elem, dt, w)?;
        self.unpack(raw, w)
    }

    fn store(
        &mut self,
        ptr: ValueId,
        value: ValueId,
        mask: Option<ValueId>,
        atomic: bool,
    ) -> R<()> {
        let dt = self.dtype(value);
        let elem = llvm_ty(self.ctx, dt);
        let l = self.layout(value).clone();
        let n = l.num_regs();
        let w = if atomic {
            1
        } else {
            self.c.layouts.vec.get(&ptr).copied().unwrap_or(1).min(n)
        };
        let owner = self.owner(&l)?;
        let ptrs = self.get(ptr)?.clone();
        let vals = self.get(value)?.clone();
        let masks = match mask {
            Some(m) => Some(self.get(m)?.clone()),
            None => None,
        };
        for g in (0..n).step_by(w) {
            let m = masks.as_ref().map(|m| m[g].into_int_value());
            let cond = match (m, owner) {
                (Some(m), Some(o)) => Some(self.b.build_and(m, o, "").map_err(be)?),
                (Some(m), None) => Some(m),
                (None, o) => o,
            };
            let p = ptrs[g].into_pointer_value();
            let group: Vec<V> = vals[g..g + w].to_vec();
            self.guarded(cond, |s| {
                if atomic {
                    s.red_add(p, group[0].into_float_value())
                } else {
                    s.store_vector(p, elem, dt, &group)
                }
            })?;
        }
        Ok(())
    }

    fn store_vector(
        &self,
        p: PointerValue<'c>,
        elem: BasicTypeEnum<'c>,
        dt: DType,
        vals: &[V<'c>],
    ) -> R<()> {
        let v = self.pack(elem, vals)?;
        let st = self.b.build_store(p, v).map_err(be)?;
        st.set_alignment((dt.bytes() * vals.len()) as u32)
            .map_err(|e| IrError(format!("LLVM: alignment: {e}")))?;
        Ok(())
    }

    /// `red.global.add.f32` (no return value), as inline PTX: inkwell has no float atomicrmw.
    fn red_add(&self, p: PointerValue<'c>, v: FloatValue<'c>) -> R<()> {
        let fty = self
            .ctx
            .void_type()
            .fn_type(&[p.get_type().into(), self.ctx.f32_type().into()], false);
        let asm = self.ctx.create_inline_asm(
            fty,
            "red.global.add.f32 [$0], $1;".into(),
            "l,f,~{memory}".into(),
            true,
            false,
            None,
            false,
        );
        self.b
            .build_indirect_call(fty, asm, &[p.into(), v.into()], "")
            .map_err(be)?;
        Ok(())
    }

    fn combine(&self, kind: ReduceKind, dt: DType, a: V<'c>, b: V<'c>) -> R<V<'c>> {
        let op = match kind {
            ReduceKind::Sum => BinOp::Add,
            ReduceKind::Max => BinOp::Max,
            ReduceKind::Min => BinOp::Min,
        };
        self.binary(op, dt, a, b)
    }

    fn shfl_xor(&self, v: V<'c>, dt: DType, mask: u32) -> R<V<'c>> {
        let (name, ty): (&str, BasicTypeEnum) = match dt {
            DType::F32 => ("llvm.nvvm.shfl.sync.bfly.f32", self.ctx.f32_type().into()),
            _ => ("llvm.nvvm.shfl.sync.bfly.i32", self.ctx.i32_type().into()),
        };
        let i32t = self.ctx.i32_type();
        let args: Vec<V> = vec![
            i32t.const_all_ones().into(),
            v,
            self.i32(mask as i64).into(),
            self.i32(0x1f).into(),
        ];
        self.call(
            name,
            ty,
            &[i32t.into(), ty.into(), i32t.into(), i32t.into()],
            &args,
        )
    }

    fn reduce(&mut self, r: ValueId, src: ValueId, axis: usize, kind: ReduceKind) -> R<Vec<V<'c>>> {
        let dt = self.dtype(r);
        let sl = self.layout(src).clone();
        let rl = self.layout(r).clone();
        let map = sl
            .reg_map(&rl)
            .ok_or_else(|| IrError("codegen: reduce result layout is not a slice".into()))?;
        let s = self.get(src)?.clone();
        // 1. Within the thread.
        let mut acc: Vec<Option<V>> = vec![None; rl.num_regs()];
        for (reg, q) in map.iter().enumerate() {
            acc[*q] = Some(match acc[*q] {
                None => s[reg],
                Some(a) => self.combine(kind, dt, a, s[reg])?,
            });
        }
        let mut acc: Vec<V> = acc
            .into_iter()
            .map(|a| a.ok_or_else(|| IrError("empty reduction".into())))
            .collect::<R<_>>()?;
        // 2. Across lanes.
        for (j, basis) in sl.lane.iter().enumerate() {
            if basis[axis] != 0 {
                for a in acc.iter_mut() {
                    let o = self.shfl_xor(*a, dt, 1 << j)?;
                    *a = self.combine(kind, dt, *a, o)?;
                }
            }
        }
        // 3. Across warps, through shared memory.
        let w = warps_along(&sl, axis);
        if w > 1 {
            let alloc = self
                .c
                .smem
                .of(r)
                .cloned()
                .ok_or_else(|| IrError("codegen: reduce without scratch".into()))?;
            let gv = self
                .smem
                .ok_or_else(|| IrError("codegen: no shared memory".into()))?;
            let numel = self.c.kernel.ty(r).numel().max(1) as i64;
            let mut widx = self.i32(0);
            let mut k = 0;
            for (j, basis) in sl.warp.iter().enumerate() {
                if basis[axis] != 0 {
                    let bit = self
                        .b
                        .build_right_shift(self.warp, self.i32(j as i64), false, "")
                        .map_err(be)?;
                    let bit = self.b.build_and(bit, self.i32(1), "").map_err(be)?;
                    let bit = self.b.build_left_shift(bit, self.i32(k), "").map_err(be)?;
                    widx = self.b.build_or(widx, bit, "").map_err(be)?;
                    k += 1;
                }
            }
            let shape = self.c.kernel.ty(r).shape.clone();
            let mut flats = vec![];
            for q in 0..rl.num_regs() {
                flats.push(self.flat_index(&rl, &shape, q)?);
            }
            let base = self
                .b
                .build_int_mul(widx, self.i32(numel), "")
                .map_err(be)?;
            for q in 0..acc.len() {
                let idx = self.b.build_int_add(base, flats[q], "").map_err(be)?;
                let p = self.smem_f32_ptr(gv, alloc.offset, idx)?;
                let v = self.cast(acc[q], dt, DType::F32)?;
                self.b.build_store(p, v).map_err(be)?;
            }
            self.call_void("llvm.nvvm.barrier0")?;
            for (q, a) in acc.iter_mut().enumerate() {
                let mut tot: Option<V> = None;
                for wi in 0..w {
                    let idx = self
                        .b
                        .build_int_add(self.i32(wi as i64 * numel), flats[q], "")
                        .map_err(be)?;
                    let p = self.smem_f32_ptr(gv, alloc.offset, idx)?;
                    let v = self.b.build_load(self.ctx.f32_type(), p, "").map_err(be)?;
                    let v = self.cast(v, DType::F32, dt)?;
                    tot = Some(match tot {
                        None => v,
                        Some(t) => self.combine(kind, dt, t, v)?,
                    });
                }
                *a = tot.ok_or_else(|| IrError("empty warp reduction".into()))?;
            }
            self.call_void("llvm.nvvm.barrier0")?;
        }
        Ok(acc)
    }

    fn smem_f32_ptr(
        &self,
        gv: GlobalValue<'c>,
        offset: usize,
        idx: IntValue<'c>,
    ) -> R<PointerValue<'c>> {
        self.smem_ptr(gv, offset, 4, idx)
    }

    /// Address of element `idx` of `elem_bytes`-byte elements in the scratch at `offset`.
    fn smem_ptr(
        &self,
        gv: GlobalValue<'c>,
        offset: usize,
        elem_bytes: usize,
        idx: IntValue<'c>,
    ) -> R<PointerValue<'c>> {
        let byte = self
            .b
            .build_int_mul(idx, self.i32(elem_bytes as i64), "")
            .map_err(be)?;
        let byte = self
            .b
            .build_int_add(byte, self.i32(offset as i64), "")
            .map_err(be)?;
        // SAFETY: the shared-memory plan sized the scratch for every index used here.
        unsafe {
            self.b
                .build_gep(self.ctx.i8_type(), gv.as_pointer_value(), &[byte], "")
        }
        .map_err(be)
    }

    /// Row-major flat index of register `reg` of layout `l` (tile `shape`) for this thread.
    fn flat_index(&mut self, l: &Layout, shape: &[usize], reg: usize) -> R<IntValue<'c>> {
        let tc = self.thread_coord(l)?;
        let rc = l.reg_coord(reg);
        let mut flat = self.i32(0);
        for d in 0..shape.len() {
            let stride: usize = shape[d + 1..].iter().product();
            let c = self
                .b
                .build_or(tc[d], self.i32(rc[d] as i64), "")
                .map_err(be)?;
            let t = self
                .b
                .build_int_mul(c, self.i32(stride as i64), "")
                .map_err(be)?;
            flat = self.b.build_int_add(flat, t, "").map_err(be)?;
        }
        Ok(flat)
    }

    /// Moves a tile between two layouts through shared memory: every thread writes the
    /// elements it holds (duplicate owners write equal values), a barrier, every thread reads
    /// the elements its destination layout gives it, and a barrier before the scratch is reused.
    fn convert_layout(&mut self, r: ValueId, src: ValueId) -> R<Vec<V<'c>>> {
        let (sl, dl) = (self.layout(src).clone(), self.layout(r).clone());
        let vals = self.get(src)?.clone();
        if sl == dl {
            return Ok(vals);
        }
        let dt = self.dtype(src);
        let shape = self.c.kernel.ty(r).shape.clone();
        let alloc = self
            .c
            .smem
            .of(r)
            .cloned()
            .ok_or_else(|| IrError("codegen: convert without scratch".into()))?;
        let gv = self
            .smem
            .ok_or_else(|| IrError("codegen: no shared memory".into()))?;
        // Masks travel as bytes.
        let (mem_ty, bytes): (BasicTypeEnum, usize) = if dt == DType::I1 {
            (self.ctx.i8_type().into(), 1)
        } else {
            (llvm_ty(self.ctx, dt), dt.bytes())
        };
        for (reg, v) in vals.iter().enumerate() {
            let idx = self.flat_index(&sl, &shape, reg)?;
            let p = self.smem_ptr(gv, alloc.offset, bytes, idx)?;
            let v = if dt == DType::I1 {
                self.b
                    .build_int_z_extend(v.into_int_value(), self.ctx.i8_type(), "")
                    .map_err(be)?
                    .into()
            } else {
                *v
            };
            self.b.build_store(p, v).map_err(be)?;
        }
        self.call_void("llvm.nvvm.barrier0")?;
        let mut out = vec![];
        for reg in 0..dl.num_regs() {
            let idx = self.flat_index(&dl, &shape, reg)?;
            let p = self.smem_ptr(gv, alloc.offset, bytes, idx)?;
            let v = self.b.build_load(mem_ty, p, "").map_err(be)?;
            out.push(if dt == DType::I1 {
                self.b
                    .build_int_truncate(v.into_int_value(), self.ctx.bool_type(), "")
                    .map_err(be)?
                    .into()
            } else {
                v
            });
        }
        self.call_void("llvm.nvvm.barrier0")?;
        Ok(out)
    }

    fn phis(&self, template: &[Vec<V<'c>>]) -> R<Vec<Vec<inkwell::values::PhiValue<'c>>>> {
        template
            .iter()
            .map(|regs| {
                regs.iter()
                    .map(|v| self.b.build_phi(v.get_type(), "").map_err(be))
                    .collect::<R<Vec<_>>>()
            })
            .collect()
    }

    fn for_loop(
        &mut self,
        lo: ValueId,
        hi: ValueId,
        step: ValueId,
        inits: &[ValueId],
        body: &Block,
    ) -> R<Vec<Vec<V<'c>>>> {
        let ivt = self.dtype(lo);
        let lo_v = self.get(lo)?[0];
        let hi_v = self
            .cast(self.get(hi)?[0], self.dtype(hi), ivt)?
            .into_int_value();
        let step_v = self
            .cast(self.get(step)?[0], self.dtype(step), ivt)?
            .into_int_value();
        let init_vals: Vec<Vec<V>> = inits
            .iter()
            .map(|v| self.get(*v).cloned())
            .collect::<R<_>>()?;
        let pre = self
            .b
            .get_insert_block()
            .ok_or_else(|| IrError("builder not positioned".into()))?;
        let header = self.ctx.append_basic_block(self.func, "for.header");
        let body_bb = self.ctx.append_basic_block(self.func, "for.body");
        let exit = self.ctx.append_basic_block(self.func, "for.exit");
        self.b.build_unconditional_branch(header).map_err(be)?;
        self.b.position_at_end(header);
        let iv = self.b.build_phi(llvm_ty(self.ctx, ivt), "iv").map_err(be)?;
        iv.add_incoming(&[(&lo_v as &dyn BasicValue, pre)]);
        let carried = self.phis(&init_vals)?;
        for (ps, vs) in carried.iter().zip(&init_vals) {
            for (p, v) in ps.iter().zip(vs) {
                p.add_incoming(&[(v as &dyn BasicValue, pre)]);
            }
        }
        let ivv = iv.as_basic_value().into_int_value();
        let cond = self
            .b
            .build_int_compare(IntPredicate::SLT, ivv, hi_v, "")
            .map_err(be)?;
        self.b
            .build_conditional_branch(cond, body_bb, exit)
            .map_err(be)?;
        self.b.position_at_end(body_bb);
        self.vals.insert(body.args[0], vec![ivv.into()]);
        for (a, ps) in body.args[1..].iter().zip(&carried) {
            self.vals
                .insert(*a, ps.iter().map(|p| p.as_basic_value()).collect());
        }
        let yielded = self.block(body)?;
        if !self.terminated() {
            let latch = self
                .b
                .get_insert_block()
                .ok_or_else(|| IrError("builder not positioned".into()))?;
            let next = self.b.build_int_add(ivv, step_v, "").map_err(be)?;
            iv.add_incoming(&[(&next as &dyn BasicValue, latch)]);
            let y = yielded.unwrap_or_default();
            if y.len() != carried.len() {
                return Err(IrError(
                    "codegen: `for` body yields the wrong number of values".into(),
                ));
            }
            for (ps, vs) in carried.iter().zip(&y) {
                for (p, v) in ps.iter().zip(vs) {
                    p.add_incoming(&[(v as &dyn BasicValue, latch)]);
                }
            }
            self.b.build_unconditional_branch(header).map_err(be)?;
        }
        self.b.position_at_end(exit);
        Ok(carried
            .iter()
            .map(|ps| ps.iter().map(|p| p.as_basic_value()).collect())
            .collect())
    }

    fn if_(
        &mut self,
        cond: ValueId,
        then_block: &Block,
        else_block: &Block,
        results: &[ValueId],
    ) -> R<Vec<Vec<V<'c>>>> {
        let c = self.get(cond)?[0].into_int_value();
        let then_bb = self.ctx.append_basic_block(self.func, "if.then");
        let else_bb = self.ctx.append_basic_block(self.func, "if.else");
        let merge = self.ctx.append_basic_block(self.func, "if.end");
        self.b
            .build_conditional_branch(c, then_bb, else_bb)
            .map_err(be)?;
        let mut incoming = vec![];
        for (bb, blk) in [(then_bb, then_block), (else_bb, else_block)] {
            self.b.position_at_end(bb);
            let y = self.block(blk)?;
            if !self.terminated() {
                let end = self
                    .b
                    .get_insert_block()
                    .ok_or_else(|| IrError("builder not positioned".into()))?;
                self.b.build_unconditional_branch(merge).map_err(be)?;
                incoming.push((y.unwrap_or_default(), end));
            }
        }
        self.b.position_at_end(merge);
        let mut out = vec![];
        for (i, r) in results.iter().enumerate() {
            let ty = llvm_ty(self.ctx, self.dtype(*r));
            let n = self.layout(*r).num_regs();
            let mut regs = vec![];
            for reg in 0..n {
                let phi = self.b.build_phi(ty, "").map_err(be)?;
                for (vals, bb) in &incoming {
                    let v = vals.get(i).and_then(|v| v.get(reg)).ok_or_else(|| {
                        IrError("codegen: `if` branch yields too few values".into())
                    })?;
                    phi.add_incoming(&[(v as &dyn BasicValue, *bb)]);
                }
                regs.push(phi.as_basic_value());
            }
            out.push(regs);
        }
        Ok(out)
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
