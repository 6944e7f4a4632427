//! Constants, element-wise arithmetic, comparisons, math functions and casts, register by
//! register (16-bit floats compute in f32).

use super::*;
use inkwell::values::FastMathFlags;

impl<'c> Gen<'c, '_> {
    pub(super) fn constant(&self, v: ConstValue, dtype: DType) -> V<'c> {
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

    pub(super) fn widen(&self, v: V<'c>, dt: DType) -> R<FloatValue<'c>> {
        let f = v.into_float_value();
        if dt == DType::F32 {
            Ok(f)
        } else {
            self.b
                .build_float_ext(f, self.ctx.f32_type(), "")
                .map_err(be)
        }
    }

    pub(super) fn narrow(&self, v: FloatValue<'c>, dt: DType) -> R<V<'c>> {
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

    pub(super) fn binary(&self, op: BinOp, dt: DType, x: V<'c>, y: V<'c>) -> R<V<'c>> {
        let b = &self.b;
        if dt.is_float() {
            let (a, c) = (self.widen(x, dt)?, self.widen(y, dt)?);
            let r = match op {
                BinOp::Add => contract(b.build_float_add(a, c, "").map_err(be)?)?,
                BinOp::Sub => contract(b.build_float_sub(a, c, "").map_err(be)?)?,
                BinOp::Mul => contract(b.build_float_mul(a, c, "").map_err(be)?)?,
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

    pub(super) fn cmp(&self, pred: CmpPred, dt: DType, x: V<'c>, y: V<'c>) -> R<V<'c>> {
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

    pub(super) fn unary(&self, op: UnOp, dt: DType, x: V<'c>) -> R<V<'c>> {
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

    pub(super) fn cast(&self, x: V<'c>, from: DType, to: DType) -> R<V<'c>> {
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
}

/// Marks a float add, subtract or multiply as contractible, so that a multiply feeding an add
/// becomes one fused multiply-add (`fma.rn.f32`), as `nvcc` does by default: without the flag
/// the NVPTX backend emits `mul.rn` and `add.rn`, whose explicit rounding ptxas may not fuse.
/// In flash attention's softmax, `c·s − c·m` is then one instruction per score.
fn contract(v: FloatValue<'_>) -> R<FloatValue<'_>> {
    if let Some(i) = v.as_instruction() {
        i.set_fast_math_flags(FastMathFlags::AllowContract)
            .map_err(|e| IrError(format!("LLVM: fast-math flags: {e}")))?;
    }
    Ok(v)
}
