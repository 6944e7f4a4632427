//! TMA bulk tensor copies and the mbarriers they complete on (COMPILER.md §8.2), as inline PTX
//! (LLVM 19 has no intrinsics for them). Used by the pipelined loops that
//! [`crate::passes::tma`] streams by TMA: one elected thread issues a slot's copies after
//! announcing their bytes on the slot's `full` barrier; every thread waits on that barrier
//! before reading the slot, and each warp arrives on the slot's `empty` barrier when it is done
//! with it, which the producer waits for before refilling the slot.

use super::*;

/// The two barriers of a TMA ring slot.
#[derive(Clone, Copy)]
pub(super) enum Bar {
    /// The slot's copies have landed.
    Full,
    /// Every warp is done reading the slot.
    Empty,
}

impl<'c> Gen<'c, '_> {
    /// The 32-bit shared-memory address of byte `off` of the kernel's shared memory.
    pub(super) fn smem_addr(&self, off: IntValue<'c>) -> R<IntValue<'c>> {
        let gv = self
            .smem
            .ok_or_else(|| IrError("codegen: TMA without shared memory".into()))?;
        let base = self
            .b
            .build_ptr_to_int(gv.as_pointer_value(), self.ctx.i32_type(), "")
            .map_err(be)?;
        self.b.build_int_add(base, off, "").map_err(be)
    }

    /// Whether this thread is thread 0 of the CTA (the TMA producer).
    pub(super) fn is_thread0(&self) -> R<IntValue<'c>> {
        let tid = self.b.build_or(self.lane, self.warp, "").map_err(be)?;
        self.b
            .build_int_compare(IntPredicate::EQ, tid, self.i32(0), "")
            .map_err(be)
    }

    /// `mbarrier.init` with the number of arrivals a phase takes.
    pub(super) fn mbar_init(&self, addr: IntValue<'c>, count: usize) -> R<()> {
        self.asm(
            "mbarrier.init.shared::cta.b64 [$0], $1;",
            "r,r",
            None,
            &[addr.into(), self.i32(count as i64).into()],
        )?;
        Ok(())
    }

    /// `mbarrier.inval`: the barrier's memory may be initialised again.
    pub(super) fn mbar_inval(&self, addr: IntValue<'c>) -> R<()> {
        self.asm(
            "mbarrier.inval.shared::cta.b64 [$0];",
            "r",
            None,
            &[addr.into()],
        )?;
        Ok(())
    }

    /// Makes initialised mbarriers visible to the other threads and the async proxy (followed
    /// by a CTA barrier).
    pub(super) fn fence_mbar_init(&self) -> R<()> {
        self.asm("fence.mbarrier_init.release.cluster;", "", None, &[])?;
        Ok(())
    }

    /// Spins until the phase of parity `parity` of the barrier at `addr` has completed.
    pub(super) fn mbar_wait(&self, addr: IntValue<'c>, parity: IntValue<'c>) -> R<()> {
        let spin = self.ctx.append_basic_block(self.func, "mbar.wait");
        let done = self.ctx.append_basic_block(self.func, "mbar.done");
        self.b.build_unconditional_branch(spin).map_err(be)?;
        self.b.position_at_end(spin);
        let ok = self
            .asm(
                "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2;\nselp.u32 $0, 1, 0, p;\n}",
                "=r,r,r",
                Some(self.ctx.i32_type().into()),
                &[addr.into(), parity.into()],
            )?
            .ok_or_else(|| IrError("codegen: try_wait without result".into()))?;
        let ok = self
            .b
            .build_int_compare(IntPredicate::NE, ok.into_int_value(), self.i32(0), "")
            .map_err(be)?;
        self.b
            .build_conditional_branch(ok, done, spin)
            .map_err(be)?;
        self.b.position_at_end(done);
        Ok(())
    }

    /// Lane 0 of every warp arrives on the barrier at `addr` once the whole warp got here
    /// (the `empty` barriers count warps), where `cond` holds (uniform across the warp).
    pub(super) fn mbar_arrive_warp(
        &mut self,
        addr: IntValue<'c>,
        cond: Option<IntValue<'c>>,
    ) -> R<()> {
        self.asm("bar.warp.sync -1;", "", None, &[])?;
        let lane0 = self
            .b
            .build_int_compare(IntPredicate::EQ, self.lane, self.i32(0), "")
            .map_err(be)?;
        let cond = match cond {
            Some(c) => self.b.build_and(c, lane0, "").map_err(be)?,
            None => lane0,
        };
        self.guarded(Some(cond), |g| {
            g.asm(
                "mbarrier.arrive.shared::cta.b64 _, [$0];",
                "r",
                None,
                &[addr.into()],
            )
            .map(|_| ())
        })?;
        Ok(())
    }

    /// Thread-side arrival that also announces `bytes` of TMA transactions on the barrier.
    pub(super) fn mbar_expect_tx(&self, addr: IntValue<'c>, bytes: usize) -> R<()> {
        self.asm(
            "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;",
            "r,r",
            None,
            &[addr.into(), self.i32(bytes as i64).into()],
        )?;
        Ok(())
    }

    /// One bulk tensor copy of the box at `coords` (innermost first: column, then the outer
    /// dimensions) of tensor map `map` into shared address `dst`, completing on the barrier at
    /// `bar`.
    pub(super) fn tma_load(
        &self,
        dst: IntValue<'c>,
        map: PointerValue<'c>,
        coords: &[IntValue<'c>],
        bar: IntValue<'c>,
    ) -> R<()> {
        let m = self
            .b
            .build_ptr_to_int(map, self.ctx.i64_type(), "")
            .map_err(be)?;
        let n = coords.len();
        if !(1..=5).contains(&n) {
            return Err(IrError(format!("codegen: a {n}-D tensor copy")));
        }
        let c: Vec<String> = (0..n).map(|i| format!("${}", i + 2)).collect();
        let text = format!(
            "cp.async.bulk.tensor.{n}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [$0], [$1, {{{}}}], [${}];",
            c.join(", "),
            n + 2
        );
        let cons = format!("r,l,{},r", vec!["r"; n].join(","));
        let mut args: Vec<V<'c>> = vec![dst.into(), m.into()];
        args.extend(coords.iter().map(|v| -> V<'c> { (*v).into() }));
        args.push(bar.into());
        self.asm(&text, &cons, None, &args)?;
        Ok(())
    }

    /// A TMA tile start ([`crate::passes::tma::TmaOperand::start`]) as box coordinates: the
    /// first column, and the outer dimensions' starts innermost first.
    fn tile_coords(&self, start: &[Vec<ValueId>]) -> R<(IntValue<'c>, Vec<IntValue<'c>>)> {
        let sum = |v: &[ValueId]| -> R<IntValue<'c>> {
            let mut acc = self.i32(0);
            for x in v {
                let x = self.cast(self.get(*x)?[0], self.dtype(*x), DType::I32)?;
                acc = self
                    .b
                    .build_int_add(acc, x.into_int_value(), "")
                    .map_err(be)?;
            }
            Ok(acc)
        };
        let (cols, outer) = start
            .split_last()
            .ok_or_else(|| IrError("codegen: a TMA tile without dimensions".into()))?;
        let outer = outer.iter().rev().map(|v| sum(v)).collect::<R<Vec<_>>>()?;
        Ok((sum(cols)?, outer))
    }

    /// `atomic_add` of the f32 tile `value` as the bulk tensor reduction `r`
    /// ([`crate::passes::tma::TmaReduce`]). Thread 0 first waits until the buffer's previous
    /// reduction has read it (issued an iteration earlier, so normally long done); after a
    /// barrier every thread writes its part of the tile into the buffer, makes it visible to
    /// the async proxy, and after another barrier thread 0 issues one reduction per panel as
    /// one bulk group. [`Gen::bulk_reduce_drain`] waits for the last group at the kernel's end.
    pub(super) fn bulk_reduce(
        &mut self,
        r: &crate::passes::tma::TmaReduce,
        value: ValueId,
    ) -> R<()> {
        let t0 = self.is_thread0()?;
        self.guarded(Some(t0), |g| {
            g.asm("cp.async.bulk.wait_group.read 0;", "", None, &[])
                .map(|_| ())
        })?;
        self.call_void("llvm.nvvm.barrier0")?;
        self.stage_registers(value, &r.shared, r.offset)?;
        self.fence_proxy_async()?;
        self.call_void("llvm.nvvm.barrier0")?;
        let map = *self
            .tma_maps
            .get(r.map)
            .ok_or_else(|| IrError("codegen: missing tensor map parameter".into()))?;
        let m = self
            .b
            .build_ptr_to_int(map, self.ctx.i64_type(), "")
            .map_err(be)?;
        let (x0, outer) = self.tile_coords(&r.start)?;
        let sl = r.shared;
        self.guarded(Some(t0), |g| {
            let n = 1 + outer.len();
            let c: Vec<String> = (0..n).map(|i| format!("${}", i + 2)).collect();
            let text = format!(
                "cp.reduce.async.bulk.tensor.{n}d.global.shared::cta.add.tile.bulk_group [$1, {{{}}}], [$0];",
                c.join(", ")
            );
            let cons = format!("r,l,{}", vec!["r"; n].join(","));
            for p in 0..sl.cols / sl.panel_cols() {
                let x =
                    g.b.build_int_add(x0, g.i32((p * sl.panel_cols()) as i64), "")
                        .map_err(be)?;
                let src = g.smem_addr(g.i32((r.offset + p * sl.rows * sl.swz) as i64))?;
                let mut args: Vec<V<'c>> = vec![src.into(), m.into(), x.into()];
                args.extend(outer.iter().map(|v| -> V<'c> { (*v).into() }));
                g.asm(&text, &cons, None, &args)?;
            }
            g.asm("cp.async.bulk.commit_group;", "", None, &[])
                .map(|_| ())
        })?;
        Ok(())
    }

    /// At the kernel's end: thread 0 waits until its bulk reductions are complete (their
    /// shared buffers must outlive the reads, and the sums be done before the grid is).
    pub(super) fn bulk_reduce_drain(&mut self) -> R<()> {
        let t0 = self.is_thread0()?;
        self.guarded(Some(t0), |g| {
            g.asm("cp.async.bulk.wait_group 0;", "", None, &[])
                .map(|_| ())
        })?;
        Ok(())
    }

    /// The shared address of `which` barrier of ring slot `slot` of a TMA loop.
    pub(super) fn bar_addr(
        &self,
        t: &crate::passes::tma::TmaLoop,
        stages: usize,
        which: Bar,
        slot: IntValue<'c>,
    ) -> R<IntValue<'c>> {
        let first = t.barriers
            + match which {
                Bar::Full => 0,
                Bar::Empty => 8 * stages,
            };
        let off = self.b.build_int_mul(slot, self.i32(8), "").map_err(be)?;
        let off = self
            .b
            .build_int_add(off, self.i32(first as i64), "")
            .map_err(be)?;
        self.smem_addr(off)
    }

    /// TMA counterpart of `Gen::prefetch` for the ring: thread 0, if `iv < hi`, waits until
    /// slot `slot` is released (`empty_parity`; `None` on a slot's first fill), announces the
    /// tile's bytes on its `full` barrier and issues one bulk tensor copy per panel of every
    /// operand.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prefetch_tma(
        &mut self,
        body: &Block,
        pl: &crate::passes::pipeline::PipelinedLoop,
        t: &crate::passes::tma::TmaLoop,
        iv: IntValue<'c>,
        hi: IntValue<'c>,
        slot: IntValue<'c>,
        empty_parity: Option<IntValue<'c>>,
    ) -> R<()> {
        let in_range = self
            .b
            .build_int_compare(IntPredicate::SLT, iv, hi, "")
            .map_err(be)?;
        let t0 = self.is_thread0()?;
        let cond = self.b.build_and(in_range, t0, "").map_err(be)?;
        self.with_slice(body, pl, iv, cond, |g| {
            if let Some(p) = empty_parity {
                g.mbar_wait(g.bar_addr(t, pl.stages, Bar::Empty, slot)?, p)?;
            }
            let full = g.bar_addr(t, pl.stages, Bar::Full, slot)?;
            let loads = t
                .operands
                .iter()
                .map(|o| {
                    pl.loads
                        .iter()
                        .find(|l| l.load == o.load)
                        .ok_or_else(|| IrError("codegen: TMA operand is not streamed".into()))
                })
                .collect::<R<Vec<_>>>()?;
            g.mbar_expect_tx(full, loads.iter().map(|ld| ld.shared.bytes()).sum())?;
            for (o, ld) in t.operands.iter().zip(loads) {
                let map = *g
                    .tma_maps
                    .get(o.map)
                    .ok_or_else(|| IrError("codegen: missing tensor map parameter".into()))?;
                let (x0, outer) = g.tile_coords(&o.start)?;
                let base = g.slot_base(ld, slot)?;
                let sl = &ld.shared;
                for p in 0..sl.cols / sl.panel_cols() {
                    let x =
                        g.b.build_int_add(x0, g.i32((p * sl.panel_cols()) as i64), "")
                            .map_err(be)?;
                    let off =
                        g.b.build_int_add(base, g.i32((p * sl.rows * sl.swz) as i64), "")
                            .map_err(be)?;
                    let mut coords = vec![x];
                    coords.extend_from_slice(&outer);
                    g.tma_load(g.smem_addr(off)?, map, &coords, full)?;
                }
            }
            Ok(())
        })
    }
}
