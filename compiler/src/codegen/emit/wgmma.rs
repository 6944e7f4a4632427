//! Hopper's warpgroup MMA (COMPILER.md §8.1): `dot` as `wgmma.mma_async.m64nNk16` reading both
//! operands from shared memory through 64-bit matrix descriptors, or A from registers when the
//! layout pass chose the mma-to-dot shortcut (COMPILER.md §1.7: `{a0, a1, a2, a3}` per k16 step,
//! no A transpose immediate). LLVM 19 has no intrinsics for it, so the instructions are inline
//! PTX (`sm_90a`).
//!
//! Used for accumulators in the warpgroup-shaped layout ([`crate::layout::mma::wgmma_grid`]):
//! each warpgroup (4 warps) owns a `64 x WN` piece and its registers are exactly `wgmma`'s
//! accumulator fragment, so no data moves. The operand tiles are the same swizzled tiles the
//! `mma.sync` path reads with `ldmatrix` (the CuTe/TMA swizzle `wgmma` expects): K-major tiles
//! (`[rows, K]`, K contiguous) and MN-major ones (`[K, rows]`, transposed in the instruction).

use super::*;
use crate::layout::shared::SharedLayout;
use inkwell::InlineAsmDialect;

/// One operand of a warpgroup MMA: its shared tile, where it starts, whether it is stored
/// MN-major (`[K, M]` for A, `[K, N]` for B), and the warpgroup's first row (M or N).
pub(super) struct WgOperand<'c> {
    pub sl: SharedLayout,
    pub base: IntValue<'c>,
    pub mn_major: bool,
    pub first: IntValue<'c>,
}

/// The A operand of a warpgroup MMA: a shared tile read through descriptors, or registers
/// (the register-A form; `frags[ik]` = the four `.b32` registers of k16 step `ik`, warp `w` of
/// the warpgroup holding rows `16w .. 16w + 16`: the m16n8k16 A fragment of those rows).
pub(super) enum WgA<'c> {
    Shared(WgOperand<'c>),
    Registers(Vec<Vec<IntValue<'c>>>),
}

impl<'c> Gen<'c, '_> {
    /// Inline PTX with side effects and a memory clobber (never moved across other memory
    /// operations), returning `ret` (void when `None`).
    pub(super) fn asm(
        &self,
        text: &str,
        constraints: &str,
        ret: Option<BasicTypeEnum<'c>>,
        args: &[V<'c>],
    ) -> R<Option<V<'c>>> {
        let tys: Vec<BasicMetadataTypeEnum> = args.iter().map(|a| a.get_type().into()).collect();
        let fn_ty = match ret {
            Some(t) => t.fn_type(&tys, false),
            None => self.ctx.void_type().fn_type(&tys, false),
        };
        let mut cons = constraints.to_string();
        if !cons.is_empty() {
            cons.push(',');
        }
        cons.push_str("~{memory}");
        let f = self.ctx.create_inline_asm(
            fn_ty,
            text.to_string(),
            cons,
            true,
            false,
            Some(InlineAsmDialect::ATT),
            false,
        );
        let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
        let cs = self
            .b
            .build_indirect_call(fn_ty, f, &args, "")
            .map_err(be)?;
        Ok(cs.try_as_basic_value().basic())
    }

    /// `fence.proxy.async.shared::cta`: this thread's ordinary and `cp.async` writes to shared
    /// memory become visible to the async proxy that `wgmma` reads through.
    pub(super) fn fence_proxy_async(&self) -> R<()> {
        self.asm("fence.proxy.async.shared::cta;", "", None, &[])
            .map(|_| ())
    }

    /// Passes `vals` (f32, or i32 fragment registers) through an empty asm so that LLVM cannot
    /// move their definitions or uses across the surrounding `wgmma` synchronisation
    /// (CUTLASS's `warpgroup_fence_operand`).
    fn fence_operands(&self, vals: &[V<'c>]) -> R<Vec<V<'c>>> {
        let n = vals.len();
        let tys: Vec<BasicTypeEnum> = vals.iter().map(|v| v.get_type()).collect();
        let ret = self.ctx.struct_type(&tys, false);
        let outs: Vec<String> = vals
            .iter()
            .map(|v| if v.is_int_value() { "=r" } else { "=f" }.to_string())
            .collect();
        let ins: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let cons = format!("{},{}", outs.join(","), ins.join(","));
        let s = self
            .asm("", &cons, Some(ret.into()), vals)?
            .ok_or_else(|| IrError("codegen: asm without result".into()))?;
        (0..n as u32)
            .map(|i| {
                self.b
                    .build_extract_value(s.into_struct_value(), i, "")
                    .map_err(be)
            })
            .collect()
    }

    /// The 64-bit shared-memory matrix descriptor of the 8-row (K-major) or 8-k (MN-major)
    /// swizzle atoms starting at byte `off` of the kernel's shared memory.
    fn descriptor(&self, sl: &SharedLayout, mn_major: bool, off: IntValue<'c>) -> R<IntValue<'c>> {
        let gv = self
            .smem
            .ok_or_else(|| IrError("codegen: wgmma without shared memory".into()))?;
        let i64t = self.ctx.i64_type();
        let base = self
            .b
            .build_ptr_to_int(gv.as_pointer_value(), i64t, "")
            .map_err(be)?;
        let off64 = self.b.build_int_z_extend(off, i64t, "").map_err(be)?;
        let addr = self.b.build_int_add(base, off64, "").map_err(be)?;
        let start = self
            .b
            .build_and(
                self.b
                    .build_right_shift(addr, i64t.const_int(4, false), false, "")
                    .map_err(be)?,
                i64t.const_int(0x3FFF, false),
                "",
            )
            .map_err(be)?;
        let sbo = (8 * sl.swz) as u64;
        let lbo = if mn_major {
            (sl.rows * sl.swz) as u64
        } else {
            16 // unused for swizzled K-major tiles
        };
        let mode: u64 = match sl.swz {
            128 => 1,
            64 => 2,
            _ => 3,
        };
        let fixed = ((lbo >> 4) & 0x3FFF) << 16 | ((sbo >> 4) & 0x3FFF) << 32 | mode << 62;
        self.b
            .build_or(start, i64t.const_int(fixed, false), "")
            .map_err(be)
    }

    /// `acc += a · b` for one warpgroup piece `64 x n` over `kk` (see the module doc). With
    /// `wait`, the MMAs are committed and awaited here; without, they stay in flight and the
    /// enclosing pipelined loop commits and waits ([`Gen::wgmma_commit_wait`]). In a ping-pong
    /// loop ([`Gen::pingpong`]) the warpgroup first waits for its turn and hands the turn on
    /// once its MMAs are issued, before it waits for them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn wgmma(
        &mut self,
        dt: DType,
        a: &WgA<'c>,
        b: &WgOperand<'c>,
        n: usize,
        kk: usize,
        acc: &[V<'c>],
        wait: bool,
    ) -> R<Vec<V<'c>>> {
        let regs = n / 2;
        if acc.len() != regs {
            return Err(IrError(format!(
                "codegen: wgmma m64n{n} needs {regs} accumulators per thread, got {}",
                acc.len()
            )));
        }
        let ty = if dt == DType::BF16 { "bf16" } else { "f16" };
        let outs: Vec<String> = (0..regs).map(|i| format!("${i}")).collect();
        let t: Vec<String> = (0..regs).map(|i| i.to_string()).collect();
        let o: Vec<String> = (0..regs).map(|_| "=f".to_string()).collect();
        // Operands: the outputs, their tied inputs, then A (a descriptor, or four registers),
        // B's descriptor and scale-d. With A in registers there is no A transpose immediate.
        let (text, cons) = match a {
            WgA::Shared(sa) => (
                format!(
                    "{{\n.reg .pred p;\nsetp.ne.b32 p, ${}, 0;\nwgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{}}}, ${}, ${}, p, 1, 1, {}, {};\n}}",
                    2 * regs + 2,
                    outs.join(", "),
                    2 * regs,
                    2 * regs + 1,
                    sa.mn_major as u8,
                    b.mn_major as u8
                ),
                format!("{},{},l,l,r", o.join(","), t.join(",")),
            ),
            WgA::Registers(_) => (
                format!(
                    "{{\n.reg .pred p;\nsetp.ne.b32 p, ${}, 0;\nwgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{}}}, {{${}, ${}, ${}, ${}}}, ${}, p, 1, 1, {};\n}}",
                    2 * regs + 5,
                    outs.join(", "),
                    2 * regs,
                    2 * regs + 1,
                    2 * regs + 2,
                    2 * regs + 3,
                    2 * regs + 4,
                    b.mn_major as u8
                ),
                format!("{},{},r,r,r,r,l,r", o.join(","), t.join(",")),
            ),
        };
        // Register A: pinned after its (ordinary) definition and before `wgmma.fence`, which
        // orders those register writes before the asynchronous MMAs that read them.
        let a_regs: Vec<V<'c>> = match a {
            WgA::Registers(f) => {
                if f.len() != kk / 16 || f.iter().any(|x| x.len() != 4) {
                    return Err(IrError(
                        "codegen: wgmma register A needs four registers per k16 step".into(),
                    ));
                }
                if !wait {
                    return Err(IrError(
                        "codegen: a wgmma with A in registers cannot stay in flight".into(),
                    ));
                }
                let flat: Vec<V<'c>> = f.iter().flatten().map(|x| (*x).into()).collect();
                self.fence_operands(&flat)?
            }
            WgA::Shared(_) => vec![],
        };
        let f32t = self.ctx.f32_type();
        let ret = self.ctx.struct_type(&vec![f32t.into(); regs], false);
        let mut c = self.fence_operands(acc)?;
        let turn = self.pingpong.filter(|_| wait);
        if let Some(wg1) = turn {
            self.pingpong_turn("bar.sync", wg1, false)?;
        }
        self.asm("wgmma.fence.sync.aligned;", "", None, &[])?;
        for ik in 0..kk / 16 {
            let k0 = self.i32(16 * ik as i64);
            let off = |g: &Self, op: &WgOperand<'c>| -> R<IntValue<'c>> {
                let (row, col) = if op.mn_major {
                    (k0, op.first)
                } else {
                    (op.first, k0)
                };
                let o = g.shared_offset(&op.sl, row, col)?;
                g.b.build_int_add(o, op.base, "").map_err(be)
            };
            let mut args = c.clone();
            match a {
                WgA::Shared(sa) => {
                    let da = self.descriptor(&sa.sl, sa.mn_major, off(self, sa)?)?;
                    args.push(da.into());
                }
                WgA::Registers(_) => args.extend_from_slice(&a_regs[4 * ik..4 * ik + 4]),
            }
            let db = self.descriptor(&b.sl, b.mn_major, off(self, b)?)?;
            args.push(db.into());
            args.push(self.i32(1).into());
            let s = self
                .asm(&text, &cons, Some(ret.into()), &args)?
                .ok_or_else(|| IrError("codegen: wgmma without result".into()))?;
            c = (0..regs as u32)
                .map(|i| {
                    self.b
                        .build_extract_value(s.into_struct_value(), i, "")
                        .map_err(be)
                })
                .collect::<R<_>>()?;
        }
        if !wait {
            return Ok(c);
        }
        match turn {
            Some(wg1) => {
                self.asm("wgmma.commit_group.sync.aligned;", "", None, &[])?;
                self.pingpong_turn("bar.arrive", wg1, true)?;
                self.asm("wgmma.wait_group.sync.aligned 0;", "", None, &[])?;
            }
            None => self.wgmma_commit_wait(0)?,
        }
        if !a_regs.is_empty() {
            // The A registers stay live (not reused) until the MMAs reading them are done.
            self.fence_operands(&a_regs)?;
        }
        self.fence_operands(&c)
    }

    /// Closes the open group of warpgroup MMAs and waits until at most `pending` groups are
    /// still in flight.
    pub(super) fn wgmma_commit_wait(&self, pending: usize) -> R<()> {
        self.asm("wgmma.commit_group.sync.aligned;", "", None, &[])?;
        self.asm(
            &format!("wgmma.wait_group.sync.aligned {pending};"),
            "",
            None,
            &[],
        )?;
        Ok(())
    }

    /// `bar.sync` or `bar.arrive` (`op`) of a ping-pong loop: on the named barrier of this
    /// thread's warpgroup (1 + g for warpgroup g), or with `other` on the other one's. 256
    /// threads take part in each phase: the 128 that wait and the 128 that arrive. The ids are
    /// immediates (a branch per warpgroup), so ptxas reserves three barriers, not all sixteen.
    pub(super) fn pingpong_turn(&mut self, op: &str, wg1: IntValue<'c>, other: bool) -> R<()> {
        let wg0 = self.b.build_not(wg1, "").map_err(be)?;
        for (cond, mine) in [(wg0, 1), (wg1, 2)] {
            let id = if other { 3 - mine } else { mine };
            self.guarded(Some(cond), |g| {
                g.asm(&format!("{op} {id}, 256;"), "", None, &[])
                    .map(|_| ())
            })?;
        }
        Ok(())
    }

    /// Waits for every warpgroup MMA, then fences `vals` (their results) for ordinary use.
    pub(super) fn wgmma_drain(&self, vals: &[V<'c>]) -> R<Vec<V<'c>>> {
        self.asm("wgmma.wait_group.sync.aligned 0;", "", None, &[])?;
        self.fence_operands(vals)
    }
}
