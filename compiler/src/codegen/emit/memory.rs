//! Global memory: masked vector loads and stores (one predicate per vector, stores
//! predicated to one owner) and atomic adds.

use super::*;

impl<'c> Gen<'c, '_> {
    /// Branches to a new block when `cond` holds, runs `f` there, and returns
    /// `(block before, block at the end of f, merge block)`; the builder ends in the merge block.
    pub(super) fn guarded<T>(
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

    pub(super) fn load(
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
    pub(super) fn load_raw(
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
    pub(super) fn pack(&self, elem: BasicTypeEnum<'c>, vals: &[V<'c>]) -> R<V<'c>> {
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
    pub(super) fn unpack(&self, v: V<'c>, w: usize) -> R<Vec<V<'c>>> {
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

    pub(super) fn load_vector(
        &self,
        p: PointerValue<'c>,
        elem: BasicTypeEnum<'c>,
        dt: DType,
        w: usize,
    ) -> R<Vec<V<'c>>> {
        let raw = self.load_raw(p, elem, dt, w)?;
        self.unpack(raw, w)
    }

    pub(super) fn store(
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

    pub(super) fn store_vector(
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
    pub(super) fn red_add(&self, p: PointerValue<'c>, v: FloatValue<'c>) -> R<()> {
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
}
