//! Structured control flow: `for` with loop-carried values as phis, `if` with results.

use super::tma::Bar;
use super::*;

/// `dot` result -> `(a, b)` for the `dot`s directly in `body`.
fn dot_operands(body: &Block) -> std::collections::HashMap<ValueId, (ValueId, ValueId)> {
    body.insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::Dot { a, b, .. } => Some((i.results[0], (*a, *b))),
            _ => None,
        })
        .collect()
}

/// True when a `dot` lies in a block nested inside `body` (an `if` or an inner loop): such a
/// dot may run a different number of times in the two warpgroups, which ping-pong cannot take.
fn nested_dots(body: &Block) -> bool {
    fn any_dot(b: &Block) -> bool {
        b.insts
            .iter()
            .any(|i| matches!(i.op, Op::Dot { .. }) || i.op.blocks().into_iter().any(any_dot))
    }
    body.insts
        .iter()
        .any(|i| i.op.blocks().into_iter().any(any_dot))
}

/// Which loads a [`Gen::prefetch`] copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// The streamed loads, into one ring slot.
    Ring,
    /// The resident loads, once, before the ring's prologue.
    Resident,
}

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
        let pl = self.c.pipeline.for_iv(body.args[0]).cloned();
        // With MMAs in flight across iterations, prefetch one tile less far ahead (`ahead`
        // tiles instead of S-1) so that the slot a prefetch overwrites was read two
        // iterations ago, by MMAs that have completed.
        // When the target runs those MMAs asynchronously (`wgmma`); the pipeliner only lists
        // MMAs whose operands are streamed slots.
        let in_flight = pl.as_ref().is_some_and(|pl| {
            pl.stages >= 3 && !pl.async_dots.is_empty() && {
                let dots = dot_operands(body);
                pl.async_dots.iter().all(|d| {
                    dots.get(d)
                        .is_some_and(|(a, b)| self.dot_is_wgmma(*d, *a, *b))
                })
            }
        });
        // On sm_90a a loop the TMA plan covers copies its ring with bulk tensor copies
        // completing on mbarriers (`emit/tma.rs`) instead of `cp.async` groups.
        let tma = pl
            .as_ref()
            .and_then(|pl| pl.tma.clone())
            .filter(|_| self.wgmma);
        // A TMA loop whose MMAs stay in flight refills at the end of an iteration, once the
        // previous iteration's MMAs are done and its slot released, so it keeps S-1 tiles
        // ahead; a `cp.async` loop refills at the top, where only the slot of two iterations
        // ago is known to be free.
        let late_refill = in_flight && tma.is_some();
        let ahead = pl
            .as_ref()
            .map(|pl| pl.stages - 1 - (in_flight && !late_refill) as usize)
            .unwrap_or(0);
        if in_flight {
            if let Some(pl) = &pl {
                self.async_dots = pl.async_dots.iter().copied().collect();
            }
        }
        if let Some(pl) = &pl {
            // Prologue. With TMA, thread 0 initialises the ring's barriers first.
            if let Some(t) = &tma {
                let t0 = self.is_thread0()?;
                let warps = self.c.kernel.num_warps;
                self.guarded(Some(t0), |g| {
                    for s in 0..pl.stages {
                        g.mbar_init(g.bar_addr(t, pl.stages, Bar::Full, g.i32(s as i64))?, 1)?;
                        g.mbar_init(
                            g.bar_addr(t, pl.stages, Bar::Empty, g.i32(s as i64))?,
                            warps,
                        )?;
                    }
                    g.fence_mbar_init()
                })?;
            }
            // Resident tiles first, in a group of their own: copied once, read by
            // every iteration (the first iteration's wait covers this group too, being older).
            // Then tiles 0 .. ahead-1 into slots 0 .. ahead-1, one commit group each (empty
            // past the end, which keeps the group count uniform).
            if pl.loads.iter().any(|ld| ld.resident) {
                self.prefetch(
                    body,
                    pl,
                    lo_v.into_int_value(),
                    hi_v,
                    self.i32(0),
                    Fill::Resident,
                )?;
            }
            if tma.is_some() {
                // The ring's waits are on mbarriers, so the resident group is awaited here;
                // the CTA barrier also publishes the barriers' initialisation.
                if pl.loads.iter().any(|ld| ld.resident) {
                    self.call_void_with(
                        "llvm.nvvm.cp.async.wait.group",
                        &[self.ctx.i32_type().into()],
                        &[self.i32(0).into()],
                    )?;
                    self.fence_proxy_async()?;
                }
                self.call_void("llvm.nvvm.barrier0")?;
            }
            for s in 0..ahead {
                let off = self
                    .b
                    .build_int_mul(step_v, self.iv_const(ivt, s), "")
                    .map_err(be)?;
                let iv_s = self
                    .b
                    .build_int_add(lo_v.into_int_value(), off, "")
                    .map_err(be)?;
                match &tma {
                    Some(t) => {
                        self.prefetch_tma(body, pl, t, iv_s, hi_v, self.i32(s as i64), None)?
                    }
                    None => self.prefetch(body, pl, iv_s, hi_v, self.i32(s as i64), Fill::Ring)?,
                }
            }
        }
        // Ping-pong (two warpgroups, MMAs awaited in the iteration): warpgroup g waits on named
        // barrier 1 + g before its MMAs and arrives on the other's after issuing them, so
        // their MMAs alternate. Warpgroup 1 gives warpgroup 0 the first turn; warpgroup 0
        // takes back that one surplus turn after the loop, so both barriers end balanced.
        let pingpong = self.c.kernel.pingpong
            && self.wgmma
            && self.c.kernel.num_warps == 8
            && pl.is_some()
            && !in_flight
            && !nested_dots(body)
            && self.pingpong.is_none();
        let wg1 = if pingpong {
            let wg = self.shr_c(self.warp, 2)?;
            let wg1 = self
                .b
                .build_int_compare(IntPredicate::EQ, wg, self.i32(1), "")
                .map_err(be)?;
            self.guarded(Some(wg1), |g| {
                g.asm("bar.arrive 1, 256;", "", None, &[]).map(|_| ())
            })?;
            self.pingpong = Some(wg1);
            Some(wg1)
        } else {
            None
        };
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
        // Ring positions: the slot read this iteration and the slot written by its prefetch.
        let slots = match &pl {
            Some(_) => {
                let i32t = self.ctx.i32_type();
                let rd = self.b.build_phi(i32t, "slot.read").map_err(be)?;
                let wr = self.b.build_phi(i32t, "slot.write").map_err(be)?;
                rd.add_incoming(&[(&self.i32(0) as &dyn BasicValue, pre)]);
                wr.add_incoming(&[(&self.i32(ahead as i64) as &dyn BasicValue, pre)]);
                Some((rd, wr))
            }
            None => None,
        };
        // TMA: the parity of the `full` phase the slot read this iteration completes, that of
        // the `empty` phase the slot written must have completed (1 on a slot's first fill,
        // which a fresh barrier reports as done), and the slot read by the previous iteration.
        let phases = match &tma {
            Some(_) => {
                let i32t = self.ctx.i32_type();
                let pr = self.b.build_phi(i32t, "phase.read").map_err(be)?;
                let pw = self.b.build_phi(i32t, "phase.write").map_err(be)?;
                let prev = self.b.build_phi(i32t, "slot.prev").map_err(be)?;
                pr.add_incoming(&[(&self.i32(0) as &dyn BasicValue, pre)]);
                pw.add_incoming(&[(&self.i32(1) as &dyn BasicValue, pre)]);
                prev.add_incoming(&[(&self.i32(0) as &dyn BasicValue, pre)]);
                Some((pr, pw, prev))
            }
            None => None,
        };
        let ivv = iv.as_basic_value().into_int_value();
        let cond = self
            .b
            .build_int_compare(IntPredicate::SLT, ivv, hi_v, "")
            .map_err(be)?;
        self.b
            .build_conditional_branch(cond, body_bb, exit)
            .map_err(be)?;
        self.b.position_at_end(body_bb);
        if let (Some(pl), Some((rd, wr)), Some(t), Some((pr, pw, _))) = (&pl, &slots, &tma, &phases)
        {
            // Thread 0 refills the slot every warp has released (here, or with MMAs in flight
            // at the end of the iteration), then everyone waits for this iteration's tile.
            if !late_refill {
                let nxt = self.iv_ahead(ivv, ivt, step_v, ahead)?;
                let (wr_v, pw_v) = (wr.as_basic_value(), pw.as_basic_value());
                let (wr_v, pw_v) = (wr_v.into_int_value(), pw_v.into_int_value());
                self.prefetch_tma(body, pl, t, nxt, hi_v, wr_v, Some(pw_v))?;
            }
            let rd_v = rd.as_basic_value().into_int_value();
            let full = self.bar_addr(t, pl.stages, Bar::Full, rd_v)?;
            self.mbar_wait(full, pr.as_basic_value().into_int_value())?;
            for ld in &pl.loads {
                let base = self.slot_base(ld, rd_v)?;
                self.slots.insert(ld.load, base);
            }
        } else if let (Some(pl), Some((rd, wr))) = (&pl, &slots) {
            // Tile `kt` has landed (mine, then everyone's), and every warp is done reading the
            // slot the prefetch below overwrites (it was read in the previous iteration).
            self.call_void_with(
                "llvm.nvvm.cp.async.wait.group",
                &[self.ctx.i32_type().into()],
                &[self.i32(ahead as i64 - 1).into()],
            )?;
            if self.wgmma {
                // `wgmma` reads the slots through the async proxy.
                self.fence_proxy_async()?;
            }
            self.call_void("llvm.nvvm.barrier0")?;
            let nxt = self.iv_ahead(ivv, ivt, step_v, ahead)?;
            let wr_v = wr.as_basic_value().into_int_value();
            self.prefetch(body, pl, nxt, hi_v, wr_v, Fill::Ring)?;
            let rd_v = rd.as_basic_value().into_int_value();
            for ld in &pl.loads {
                let base = self.slot_base(ld, rd_v)?;
                self.slots.insert(ld.load, base);
            }
        }
        self.vals.insert(body.args[0], vec![ivv.into()]);
        for (a, ps) in body.args[1..].iter().zip(&carried) {
            self.vals
                .insert(*a, ps.iter().map(|p| p.as_basic_value()).collect());
        }
        let yielded = self.block(body)?;
        if in_flight && !self.terminated() {
            // This iteration's MMAs stay in flight; the previous iteration's must be done
            // before the next prefetch reuses their slots.
            self.wgmma_commit_wait(1)?;
        }
        if let (Some(pl), Some((rd, _)), Some(t), Some((_, _, prev))) = (&pl, &slots, &tma, &phases)
        {
            if !self.terminated() {
                // Release the slot whose reads are done: this iteration's, or with MMAs in
                // flight the previous iteration's (none on the first).
                let (slot, cond) = if in_flight {
                    let not_first = self
                        .b
                        .build_int_compare(IntPredicate::SGT, ivv, lo_v.into_int_value(), "")
                        .map_err(be)?;
                    (prev.as_basic_value().into_int_value(), Some(not_first))
                } else {
                    (rd.as_basic_value().into_int_value(), None)
                };
                let empty = self.bar_addr(t, pl.stages, Bar::Empty, slot)?;
                self.mbar_arrive_warp(empty, cond)?;
                if late_refill {
                    // The slot just released (the previous iteration's) takes the tile S-1
                    // ahead, once every warp has released it.
                    let (wr, pw) = match (&slots, &phases) {
                        (Some((_, wr)), Some((_, pw, _))) => (wr, pw),
                        _ => return Err(IrError("codegen: TMA ring without slots".into())),
                    };
                    let nxt = self.iv_ahead(ivv, ivt, step_v, ahead)?;
                    let (wr_v, pw_v) = (wr.as_basic_value(), pw.as_basic_value());
                    let (wr_v, pw_v) = (wr_v.into_int_value(), pw_v.into_int_value());
                    self.prefetch_tma(body, pl, t, nxt, hi_v, wr_v, Some(pw_v))?;
                }
            }
        }
        if !self.terminated() {
            let latch = self
                .b
                .get_insert_block()
                .ok_or_else(|| IrError("builder not positioned".into()))?;
            let next = self.b.build_int_add(ivv, step_v, "").map_err(be)?;
            iv.add_incoming(&[(&next as &dyn BasicValue, latch)]);
            if let (Some(pl), Some((rd, wr))) = (&pl, &slots) {
                for phi in [rd, wr] {
                    let v = phi.as_basic_value().into_int_value();
                    let inc = self.b.build_int_add(v, self.i32(1), "").map_err(be)?;
                    let wrap = self
                        .b
                        .build_int_compare(IntPredicate::EQ, inc, self.i32(pl.stages as i64), "")
                        .map_err(be)?;
                    let nv = self
                        .b
                        .build_select(wrap, self.i32(0), inc, "")
                        .map_err(be)?;
                    phi.add_incoming(&[(&nv as &dyn BasicValue, latch)]);
                }
                if let Some((pr, pw, prev)) = &phases {
                    // A phase flips each time its slot index wraps to 0.
                    for (slot, ph) in [(rd, pr), (wr, pw)] {
                        let v = slot.as_basic_value().into_int_value();
                        let last = self
                            .b
                            .build_int_compare(
                                IntPredicate::EQ,
                                v,
                                self.i32(pl.stages as i64 - 1),
                                "",
                            )
                            .map_err(be)?;
                        let flip = self
                            .b
                            .build_int_z_extend(last, self.ctx.i32_type(), "")
                            .map_err(be)?;
                        let nv = self
                            .b
                            .build_xor(ph.as_basic_value().into_int_value(), flip, "")
                            .map_err(be)?;
                        ph.add_incoming(&[(&nv as &dyn BasicValue, latch)]);
                    }
                    prev.add_incoming(&[(&rd.as_basic_value() as &dyn BasicValue, latch)]);
                }
            }
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
        if let Some(wg1) = wg1 {
            let wg0 = self.b.build_not(wg1, "").map_err(be)?;
            self.guarded(Some(wg0), |g| {
                g.asm("bar.sync 1, 256;", "", None, &[]).map(|_| ())
            })?;
            self.pingpong = None;
        }
        let mut results: Vec<Vec<V<'c>>> = carried
            .iter()
            .map(|ps| ps.iter().map(|p| p.as_basic_value()).collect())
            .collect();
        if in_flight {
            // The results of in-flight MMAs are usable only after they complete.
            let yields = match body.insts.last().map(|i| &i.op) {
                Some(Op::Yield { values }) => values.clone(),
                _ => vec![],
            };
            let mut all: Vec<V<'c>> = vec![];
            let mut which = vec![];
            for (j, y) in yields.iter().enumerate() {
                if self.async_dots.contains(y) {
                    which.push((j, all.len(), results[j].len()));
                    all.extend(results[j].iter().copied());
                }
            }
            let fenced = self.wgmma_drain(&all)?;
            for (j, at, n) in which {
                results[j] = fenced[at..at + n].to_vec();
            }
            self.async_dots.clear();
        }
        if let Some(pl) = &pl {
            for ld in &pl.loads {
                self.slots.remove(&ld.load);
            }
            // Drain: nothing in flight before the shared memory is reused.
            self.call_void_with(
                "llvm.nvvm.cp.async.wait.group",
                &[self.ctx.i32_type().into()],
                &[self.i32(0).into()],
            )?;
            self.call_void("llvm.nvvm.barrier0")?;
            if let Some(t) = &tma {
                // Every copy issued was awaited, every warp is past its last wait: the barriers
                // are retired, so that a later run of this loop can initialise them again.
                let t0 = self.is_thread0()?;
                self.guarded(Some(t0), |g| {
                    for s in 0..pl.stages {
                        for which in [Bar::Full, Bar::Empty] {
                            g.mbar_inval(g.bar_addr(t, pl.stages, which, g.i32(s as i64))?)?;
                        }
                    }
                    Ok(())
                })?;
            }
        }
        Ok(results)
    }

    /// The induction variable `ahead` iterations after `iv`.
    fn iv_ahead(
        &self,
        iv: IntValue<'c>,
        ivt: DType,
        step: IntValue<'c>,
        ahead: usize,
    ) -> R<IntValue<'c>> {
        let off = self
            .b
            .build_int_mul(step, self.iv_const(ivt, ahead), "")
            .map_err(be)?;
        self.b.build_int_add(iv, off, "").map_err(be)
    }

    fn iv_const(&self, ivt: DType, c: usize) -> IntValue<'c> {
        self.constant(ConstValue::Int(c as i64), ivt)
            .into_int_value()
    }

    /// Byte offset of `ld`'s slot number `slot` (its only slot when resident).
    pub(super) fn slot_base(
        &self,
        ld: &crate::passes::pipeline::StagedLoad,
        slot: IntValue<'c>,
    ) -> R<IntValue<'c>> {
        if ld.resident {
            return Ok(self.i32(ld.offset as i64));
        }
        let off = self
            .b
            .build_int_mul(slot, self.i32(ld.shared.bytes() as i64), "")
            .map_err(be)?;
        self.b
            .build_int_add(off, self.i32(ld.offset as i64), "")
            .map_err(be)
    }

    /// Issues the copies of iteration `iv` (if `iv < hi`) into ring slot `slot` (or, with
    /// [`Fill::Resident`], the resident loads into their own slots), then commits a group
    /// (always).
    fn prefetch(
        &mut self,
        body: &Block,
        pl: &crate::passes::pipeline::PipelinedLoop,
        iv: IntValue<'c>,
        hi: IntValue<'c>,
        slot: IntValue<'c>,
        fill: Fill,
    ) -> R<()> {
        let cond = self
            .b
            .build_int_compare(IntPredicate::SLT, iv, hi, "")
            .map_err(be)?;
        self.with_slice(body, pl, iv, cond, |g| {
            for ld in pl
                .loads
                .iter()
                .filter(|ld| ld.resident == (fill == Fill::Resident))
            {
                let off = g.slot_base(ld, slot)?;
                g.copy_async(ld.ptr, ld.mask, &ld.shared, off)?;
            }
            Ok(())
        })?;
        self.call_void("llvm.nvvm.cp.async.commit.group")
    }

    /// Runs `f` where `cond` holds, after emitting the body's address computations (the
    /// loop's slice) for iteration `iv`; they are forgotten afterwards so the body's own
    /// emission recomputes them. What prefetches, `cp.async` or TMA, issue their copies in.
    pub(super) fn with_slice(
        &mut self,
        body: &Block,
        pl: &crate::passes::pipeline::PipelinedLoop,
        iv: IntValue<'c>,
        cond: IntValue<'c>,
        f: impl FnOnce(&mut Self) -> R<()>,
    ) -> R<()> {
        let saved_iv = self.vals.insert(body.args[0], vec![iv.into()]);
        self.guarded(Some(cond), |g| {
            for inst in &body.insts {
                if inst.results.first().is_some_and(|r| pl.slice.contains(r)) {
                    let res = g.op(&inst.op, &inst.results)?;
                    for (r, v) in inst.results.iter().zip(res) {
                        g.vals.insert(*r, v);
                    }
                }
            }
            f(g)
        })?;
        for v in &pl.slice {
            self.vals.remove(v);
        }
        match saved_iv {
            Some(old) => self.vals.insert(body.args[0], old),
            None => self.vals.remove(&body.args[0]),
        };
        Ok(())
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
