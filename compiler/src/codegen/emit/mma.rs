//! Tensor cores: `dot` as `ldmatrix` + `mma.sync.aligned.m16n8k16` (COMPILER.md §2–3), the
//! swizzled shared-memory addressing both share, the staging of register operands into shared
//! memory, and the `cp.async` copies of streamed operands (§4).
//!
//! Each warp owns a `WM x WN` piece of the accumulator (the `Mma` layout, [`Layout::mma_acc`]):
//! per k16 step it loads `WM/16` A fragments and `WN/8` B fragments with `ldmatrix` from the
//! operands' shared tiles and issues `(WM/16) * (WN/8)` MMAs. An A operand that the layout pass
//! marked as already in fragment layout (the mma-to-dot shortcut, COMPILER.md §1.7) is not
//! loaded: its registers are packed in pairs (`cvt.rn.bf16x2.f32`) into the A fragments.

use super::*;
use crate::layout::shared::SharedLayout;
use crate::passes::smem::{dot_scratch, dot_source};

/// Pointer to byte `off` of the kernel's shared memory.
fn byte_ptr<'c>(g: &Gen<'c, '_>, off: IntValue<'c>) -> R<PointerValue<'c>> {
    let gv = g
        .smem
        .ok_or_else(|| IrError("codegen: dot without shared memory".into()))?;
    // SAFETY: offsets come from the shared-memory plan's layouts, inside the allocation.
    unsafe {
        g.b.build_gep(g.ctx.i8_type(), gv.as_pointer_value(), &[off], "")
    }
    .map_err(be)
}

impl<'c> Gen<'c, '_> {
    fn add(&self, a: IntValue<'c>, b: IntValue<'c>) -> R<IntValue<'c>> {
        self.b.build_int_add(a, b, "").map_err(be)
    }

    fn addc(&self, a: IntValue<'c>, c: usize) -> R<IntValue<'c>> {
        if c == 0 {
            return Ok(a);
        }
        self.add(a, self.i32(c as i64))
    }

    fn and_c(&self, a: IntValue<'c>, c: usize) -> R<IntValue<'c>> {
        self.b.build_and(a, self.i32(c as i64), "").map_err(be)
    }

    pub(super) fn shr_c(&self, a: IntValue<'c>, c: usize) -> R<IntValue<'c>> {
        if c == 0 {
            return Ok(a);
        }
        self.b
            .build_right_shift(a, self.i32(c as i64), false, "")
            .map_err(be)
    }

    fn shl_c(&self, a: IntValue<'c>, c: usize) -> R<IntValue<'c>> {
        if c == 0 {
            return Ok(a);
        }
        self.b
            .build_left_shift(a, self.i32(c as i64), "")
            .map_err(be)
    }

    fn mul_c(&self, a: IntValue<'c>, c: usize) -> R<IntValue<'c>> {
        if c.is_power_of_two() {
            return self.shl_c(a, c.trailing_zeros() as usize);
        }
        self.b.build_int_mul(a, self.i32(c as i64), "").map_err(be)
    }

    /// Byte offset of element `(row, col)` of a tile in `sl` ([`SharedLayout::offset`], at run
    /// time).
    pub(super) fn shared_offset(
        &self,
        sl: &SharedLayout,
        row: IntValue<'c>,
        col: IntValue<'c>,
    ) -> R<IntValue<'c>> {
        if sl.swz == 0 {
            let r = self.mul_c(row, sl.cols * sl.elem + 16)?;
            let c = self.mul_c(col, sl.elem)?;
            return self.add(r, c);
        }
        let pc = sl.panel_cols();
        let lp = pc.trailing_zeros() as usize;
        let panel = self.shr_c(col, lp)?;
        let cc = self.and_c(col, pc - 1)?;
        let byte = self.mul_c(cc, sl.elem)?;
        let chunk = self.shr_c(byte, 4)?;
        let within = self.and_c(byte, 15)?;
        let phase = match sl.swz {
            128 => self.and_c(row, 7)?,
            64 => self.and_c(self.shr_c(row, 1)?, 3)?,
            _ => self.and_c(self.shr_c(row, 2)?, 1)?,
        };
        let sw = self.b.build_xor(chunk, phase, "").map_err(be)?;
        let mut off = self.mul_c(panel, sl.rows * sl.swz)?;
        off = self.add(off, self.mul_c(row, sl.swz)?)?;
        off = self.add(off, self.shl_c(sw, 4)?)?;
        self.add(off, within)
    }

    /// Register `reg`'s coordinate `(row, col)` of a rank-2 layout, for this thread.
    fn coord2(&mut self, l: &Layout, reg: usize) -> R<(IntValue<'c>, IntValue<'c>)> {
        let tc = self.thread_coord(l)?;
        let rc = l.reg_coord(reg);
        let row = self
            .b
            .build_or(tc[0], self.i32(rc[0] as i64), "")
            .map_err(be)?;
        let col = self
            .b
            .build_or(tc[1], self.i32(rc[1] as i64), "")
            .map_err(be)?;
        Ok((row, col))
    }

    /// Registers a thread of `l` moves as one shared-memory access: its longest run of
    /// contiguous elements, at most 16 bytes of `dt`.
    pub(super) fn run_width(l: &Layout, dt: DType) -> usize {
        l.contiguous_regs().min(16 / dt.bytes()).max(1)
    }

    /// Where register `reg` of layout `l` (the first of a run) lies in the shared tile `sl` that
    /// starts at byte `base`, for this thread.
    pub(super) fn run_ptr(
        &mut self,
        l: &Layout,
        reg: usize,
        sl: &SharedLayout,
        base: usize,
    ) -> R<PointerValue<'c>> {
        let (row, col) = self.coord2(l, reg)?;
        let off = self.shared_offset(sl, row, col)?;
        let off = self.addc(off, base)?;
        byte_ptr(self, off)
    }

    /// Writes the register tile `v` into shared memory at byte `base` in layout `sl`, one store
    /// per run of contiguous registers (at most 16 bytes).
    pub(super) fn stage_registers(&mut self, v: ValueId, sl: &SharedLayout, base: usize) -> R<()> {
        let l = self.layout(v).clone();
        let vals = self.get(v)?.clone();
        let dt = self.dtype(v);
        let elem = llvm_ty(self.ctx, dt);
        let w = Self::run_width(&l, dt);
        for g in (0..vals.len()).step_by(w) {
            let p = self.run_ptr(&l, g, sl, base)?;
            let packed = self.pack(elem, &vals[g..g + w])?;
            let st = self.b.build_store(p, packed).map_err(be)?;
            st.set_alignment((w * dt.bytes()) as u32)
                .map_err(|e| IrError(format!("LLVM alignment: {e}")))?;
        }
        Ok(())
    }

    /// `ldmatrix.sync.aligned.m8n8.{x2,x4}[.trans].shared.b16` at byte offset `off`.
    fn ldmatrix(&self, off: IntValue<'c>, x4: bool, trans: bool) -> R<Vec<IntValue<'c>>> {
        let n = if x4 { 4 } else { 2 };
        let name = format!(
            "llvm.nvvm.ldmatrix.sync.aligned.m8n8.x{n}{}.b16.p3",
            if trans { ".trans" } else { "" }
        );
        let i32t = self.ctx.i32_type();
        let fields: Vec<BasicTypeEnum> = vec![i32t.into(); n];
        let ret = self.ctx.struct_type(&fields, false);
        let p = byte_ptr(self, off)?;
        let s = self.call(&name, ret.into(), &[p.get_type().into()], &[p.into()])?;
        (0..n as u32)
            .map(|i| {
                self.b
                    .build_extract_value(s.into_struct_value(), i, "")
                    .map_err(be)
                    .map(|v| v.into_int_value())
            })
            .collect()
    }

    /// One `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32`: `c += a · b`.
    fn mma(&self, dt: DType, a: &[IntValue<'c>], b: &[IntValue<'c>], c: &[V<'c>]) -> R<Vec<V<'c>>> {
        let f32t = self.ctx.f32_type();
        let ret = self.ctx.struct_type(&[f32t.into(); 4], false);
        let (name, op_ty): (&str, BasicTypeEnum) = match dt {
            DType::BF16 => (
                "llvm.nvvm.mma.m16n8k16.row.col.bf16",
                self.ctx.i32_type().into(),
            ),
            _ => (
                "llvm.nvvm.mma.m16n8k16.row.col.f32.f32",
                self.ctx.f16_type().vec_type(2).into(),
            ),
        };
        let mut args: Vec<V> = vec![];
        let mut tys: Vec<BasicMetadataTypeEnum> = vec![];
        for x in a.iter().chain(b) {
            let v: V = if dt == DType::BF16 {
                (*x).into()
            } else {
                self.b.build_bit_cast(*x, op_ty, "").map_err(be)?
            };
            args.push(v);
            tys.push(op_ty.into());
        }
        for x in c {
            args.push(*x);
            tys.push(f32t.into());
        }
        let s = self.call(name, ret.into(), &tys, &args)?;
        (0..4)
            .map(|i| {
                self.b
                    .build_extract_value(s.into_struct_value(), i, "")
                    .map_err(be)
            })
            .collect()
    }

    /// Whether the `dot` producing `r` from operands `a`, `b` runs as `wgmma` on this target.
    pub(super) fn dot_is_wgmma(&self, r: ValueId, a: ValueId, b: ValueId) -> bool {
        let k = &self.c.kernel;
        let (m, n) = (k.ty(r).shape[0], k.ty(r).shape[1]);
        let a_regs = self.c.layouts.dot_a_regs.contains(&r);
        let (la, lb, _) = dot_scratch(k, a, b, a_regs);
        self.wgmma
            && crate::layout::mma::wgmma_grid(m, n, k.num_warps)
                == Some(self.layout(r).mma_warp_grid())
            && (a_regs || la.swz != 0)
            && lb.swz != 0
    }

    /// The A fragments of a `dot` whose A operand `a` is fed from registers (the mma-to-dot
    /// shortcut, COMPILER.md §1.7; decided by the layout pass): `out[im][ik]` = the four `.b32`
    /// registers of m-tile `im`, k-tile `ik`. The operand's layout is the DotA layout itself, so
    /// DotA register `(im*(K/16) + ik)*8 + j` is the operand's register of the same index, and
    /// register `q` of the fragment packs values `2q` (low half) and `2q + 1` (high half). When
    /// the operand is a cast from f32 (the usual case: an accumulator), each pair is converted
    /// by one `cvt.rn.{bf16,f16}x2.f32`, which takes the *high* value first.
    fn a_fragments_from_registers(
        &mut self,
        a: ValueId,
        mr: usize,
        kk: usize,
    ) -> R<Vec<Vec<Vec<IntValue<'c>>>>> {
        let k = &self.c.kernel;
        let dt = k.ty(a).dtype;
        let mut cast_from = None;
        k.walk(&mut |i| {
            if let (Op::Cast { src }, Some(r)) = (&i.op, i.results.first()) {
                if *r == a && k.ty(*src).dtype == DType::F32 {
                    cast_from = Some(*src);
                }
            }
        });
        let i32t = self.ctx.i32_type();
        let regs = self.get(a)?.clone();
        let f32_regs = match cast_from {
            Some(src) if self.layout(src).num_regs() == regs.len() => Some(self.get(src)?.clone()),
            _ => None,
        };
        if regs.len() != mr * kk / 16 * 8 {
            return Err(IrError(format!(
                "codegen: A operand in registers has {} values per thread, the fragments need {}",
                regs.len(),
                mr * kk / 16 * 8
            )));
        }
        let elem = llvm_ty(self.ctx, dt);
        let pair_ty = vector_of(elem, 2);
        let cvt = if dt == DType::BF16 {
            "llvm.nvvm.ff2bf16x2.rn"
        } else {
            "llvm.nvvm.ff2f16x2.rn"
        };
        let mut out = vec![];
        for im in 0..mr {
            let mut row = vec![];
            for ik in 0..kk / 16 {
                let mut frag = vec![];
                for (lo, hi) in crate::layout::mma::dot_a_fragment_regs(im, ik, kk) {
                    let pair = match &f32_regs {
                        Some(f) => {
                            let f32t = self.ctx.f32_type();
                            self.call(cvt, pair_ty, &[f32t.into(), f32t.into()], &[f[hi], f[lo]])?
                        }
                        None => self.pack(elem, &[regs[lo], regs[hi]])?,
                    };
                    frag.push(
                        self.b
                            .build_bit_cast(pair, i32t, "")
                            .map_err(be)?
                            .into_int_value(),
                    );
                }
                row.push(frag);
            }
            out.push(row);
        }
        Ok(out)
    }

    /// `acc + a · b` (see the module doc).
    pub(super) fn dot(
        &mut self,
        r: ValueId,
        a: ValueId,
        b: ValueId,
        acc: ValueId,
    ) -> R<Vec<V<'c>>> {
        let k = &self.c.kernel;
        let lc = self.layout(r).clone();
        let (m, n) = (k.ty(r).shape[0], k.ty(r).shape[1]);
        let kk = k.ty(a).shape[1];
        let dt = k.ty(a).dtype;
        let expect =
            Layout::mma_acc_for(m, n, k.num_warps).map_err(|e| IrError(format!("codegen: {e}")))?;
        if lc != expect || *self.layout(acc) != lc {
            return Err(IrError(format!(
                "codegen: dot result [{m}, {n}] is not in the MMA accumulator layout"
            )));
        }
        let (wm, wn) = lc.mma_warp_grid();
        let (wtm, wtn) = (m / wm, n / wn);
        let (mr, nr) = (wtm / 16, wtn / 8);
        let (sa, ta) = dot_source(k, a);
        let (sb, tb) = dot_source(k, b);
        let a_regs = self.c.layouts.dot_a_regs.contains(&r);
        let (la_s, lb_s, b_off) = dot_scratch(k, a, b, a_regs);
        // Where each operand's tile is: a streamed slot, or scratch written from registers.
        let mut staged_any = false;
        let mut place = |g: &mut Self, src: ValueId, sl: SharedLayout, scratch: usize| {
            if let Some(off) = g.slots.get(&src) {
                return Ok::<_, IrError>((*off, sl));
            }
            g.stage_registers(src, &sl, scratch)?;
            staged_any = true;
            Ok((g.i32(scratch as i64), sl))
        };
        // The A fragments straight from registers (mma-to-dot shortcut), or A's shared tile.
        let (a_frags, base_a, la) = if a_regs {
            let f = self.a_fragments_from_registers(a, mr, kk)?;
            (Some(f), self.i32(0), la_s)
        } else {
            let (base, sl) = place(self, sa, la_s, 0)?;
            (None, base, sl)
        };
        let (base_b, lb) = place(self, sb, lb_s, b_off)?;
        let use_wgmma = self.dot_is_wgmma(r, a, b);
        if staged_any {
            if use_wgmma {
                self.fence_proxy_async()?;
            }
            self.call_void("llvm.nvvm.barrier0")?;
        }
        if use_wgmma {
            // Warpgroup g = warps 4g..4g+3 (all in one warp column, since wm % 4 == 0).
            let warp_m = self.and_c(self.warp, wm - 1)?;
            let warp_n = self.shr_c(self.warp, wm.trailing_zeros() as usize)?;
            let warp_n = self.and_c(warp_n, wn - 1)?;
            let m_first = self.mul_c(self.shr_c(warp_m, 2)?, 64)?;
            let n_first = self.mul_c(warp_n, wtn)?;
            let opa = match &a_frags {
                // One warp's 16 rows per k16 step: the wgmma register-A fragment.
                Some(f) => super::wgmma::WgA::Registers(f[0].clone()),
                None => super::wgmma::WgA::Shared(super::wgmma::WgOperand {
                    sl: la,
                    base: base_a,
                    mn_major: ta,
                    first: m_first,
                }),
            };
            let opb = super::wgmma::WgOperand {
                sl: lb,
                base: base_b,
                mn_major: !tb,
                first: n_first,
            };
            let c = self.get(acc)?.clone();
            let in_flight = self.async_dots.contains(&r);
            let out = self.wgmma(dt, &opa, &opb, wtn, kk, &c, !in_flight)?;
            if staged_any {
                self.call_void("llvm.nvvm.barrier0")?;
            }
            return Ok(out);
        }
        let lw = wm.trailing_zeros() as usize;
        let warp_m = self.and_c(self.warp, wm - 1)?;
        let warp_n = self.and_c(self.shr_c(self.warp, lw)?, wn - 1)?;
        let m_base = self.mul_c(warp_m, wtm)?;
        let n_base = self.mul_c(warp_n, wtn)?;
        let q = self.shr_c(self.lane, 3)?;
        let r8 = self.and_c(self.lane, 7)?;
        let q_lo8 = self.shl_c(self.and_c(q, 1)?, 3)?; // 8 * (q & 1)
        let q_hi8 = self.shl_c(self.shr_c(q, 1)?, 3)?; // 8 * (q >> 1)
        let mut c = self.get(acc)?.clone();
        for ik in 0..kk / 16 {
            let k0 = 16 * ik;
            let mut af = vec![];
            for im in 0..mr {
                if let Some(f) = &a_frags {
                    af.push(f[im][ik].clone());
                    continue;
                }
                let m0 = self.addc(m_base, 16 * im)?;
                let (row, col) = if !ta {
                    (self.add(self.add(m0, r8)?, q_lo8)?, self.addc(q_hi8, k0)?)
                } else {
                    (self.add(self.addc(r8, k0)?, q_hi8)?, self.add(m0, q_lo8)?)
                };
                let off = self.add(base_a, self.shared_offset(&la, row, col)?)?;
                af.push(self.ldmatrix(off, true, ta)?);
            }
            // B fragments one pair of n8 tiles at a time, each used by every A fragment at
            // once: few live fragment registers even for wide warp tiles.
            for p in 0..nr.div_ceil(2) {
                let n0 = self.addc(n_base, 16 * p)?;
                let x4 = nr - 2 * p >= 2;
                // x2 loads use only lanes 0-15: matrix q & 1.
                let (row, col) = match (tb, x4) {
                    (true, true) => (self.add(self.add(n0, r8)?, q_hi8)?, self.addc(q_lo8, k0)?),
                    (true, false) => (self.add(n0, r8)?, self.addc(q_lo8, k0)?),
                    (false, true) => (self.add(self.addc(r8, k0)?, q_lo8)?, self.add(n0, q_hi8)?),
                    (false, false) => (self.add(self.addc(r8, k0)?, q_lo8)?, n0),
                };
                let off = self.add(base_b, self.shared_offset(&lb, row, col)?)?;
                let regs = self.ldmatrix(off, x4, !tb)?;
                let pair: Vec<(usize, &[IntValue])> = if x4 {
                    vec![(2 * p, &regs[0..2]), (2 * p + 1, &regs[2..4])]
                } else {
                    vec![(2 * p, &regs[0..2])]
                };
                for (im, a_regs) in af.iter().enumerate() {
                    for (inn, b_regs) in &pair {
                        let at = (im * nr + inn) * 4;
                        let out = self.mma(dt, a_regs, b_regs, &c[at..at + 4])?;
                        c[at..at + 4].copy_from_slice(&out);
                    }
                }
            }
        }
        if staged_any {
            // The scratch is reused by the next op that needs it.
            self.call_void("llvm.nvvm.barrier0")?;
        }
        Ok(c)
    }

    /// `cp.async.cg.shared.global` of every 16-byte chunk of a streamed load's tile into the
    /// slot at byte `slot_off` (zero-filled where the mask is off). Duplicate owners skip.
    pub(super) fn copy_async(
        &mut self,
        ptr: ValueId,
        mask: Option<ValueId>,
        sl: &SharedLayout,
        slot_off: IntValue<'c>,
    ) -> R<()> {
        let l = self.layout(ptr).clone();
        let ptrs = self.get(ptr)?.clone();
        let masks = match mask {
            Some(m) => Some(self.get(m)?.clone()),
            None => None,
        };
        let w = 16 / sl.elem;
        if l.contiguous_regs() < w {
            return Err(IrError(
                "codegen: a streamed load needs 16-byte vectors".into(),
            ));
        }
        let owner = self.owner(&l)?;
        let i32t = self.ctx.i32_type();
        self.guarded(owner, |g| {
            for i in (0..ptrs.len()).step_by(w) {
                let (row, col) = g.coord2(&l, i)?;
                let off = g.shared_offset(sl, row, col)?;
                let off = g.add(off, slot_off)?;
                let dst = byte_ptr(g, off)?;
                let size = match &masks {
                    Some(ms) => {
                        g.b.build_select(ms[i].into_int_value(), g.i32(16), g.i32(0), "")
                            .map_err(be)?
                    }
                    None => g.i32(16).into(),
                };
                let src = ptrs[i].into_pointer_value();
                g.call_void_with(
                    "llvm.nvvm.cp.async.cg.shared.global.16.s",
                    &[dst.get_type().into(), src.get_type().into(), i32t.into()],
                    &[dst.into(), src.into(), size],
                )?;
            }
            Ok(())
        })?;
        Ok(())
    }
}
