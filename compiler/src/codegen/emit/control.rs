//! Structured control flow: `for` with loop-carried values as phis, `if` with results.

use super::*;

impl<'c> Gen<'c, '_> {
    pub(super) fn phis(
        &self,
        template: &[Vec<V<'c>>],
    ) -> R<Vec<Vec<inkwell::values::PhiValue<'c>>>> {
        template
            .iter()
            .map(|regs| {
                regs.iter()
                    .map(|v| self.b.build_phi(v.get_type(), "").map_err(be))
                    .collect::<R<Vec<_>>>()
            })
            .collect()
    }

    pub(super) fn for_loop(
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

    pub(super) fn if_(
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
