//! Work across threads: reductions (in registers, then butterfly shuffles, then across warps
//! through shared memory) and layout conversions through shared memory.

use super::*;
use crate::layout::shared::SharedLayout;
use crate::passes::smem::convert_scratch;

impl<'c> Gen<'c, '_> {
    pub(super) fn combine(&self, kind: ReduceKind, dt: DType, a: V<'c>, b: V<'c>) -> R<V<'c>> {
        let op = match kind {
            ReduceKind::Sum => BinOp::Add,
            ReduceKind::Max => BinOp::Max,
            ReduceKind::Min => BinOp::Min,
        };
        self.binary(op, dt, a, b)
    }

    pub(super) fn shfl_xor(&self, v: V<'c>, dt: DType, mask: u32) -> R<V<'c>> {
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

    pub(super) fn reduce(
        &mut self,
        r: ValueId,
        src: ValueId,
        axis: usize,
        kind: ReduceKind,
    ) -> R<Vec<V<'c>>> {
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

    pub(super) fn smem_f32_ptr(
        &self,
        gv: GlobalValue<'c>,
        offset: usize,
        idx: IntValue<'c>,
    ) -> R<PointerValue<'c>> {
        self.smem_ptr(gv, offset, 4, idx)
    }

    /// Address of element `idx` of `elem_bytes`-byte elements in the scratch at `offset`.
    pub(super) fn smem_ptr(
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
    pub(super) fn flat_index(
        &mut self,
        l: &Layout,
        shape: &[usize],
        reg: usize,
    ) -> R<IntValue<'c>> {
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
    ///
    /// Tiles that [`convert_scratch`] gives a swizzled layout move in runs of contiguous
    /// registers (up to 16 bytes per access) and without bank conflicts for the MMA
    /// accumulator's rows (the epilogue of every GEMM-like kernel); others one element at a
    /// time through a row-major scratch.
    pub(super) fn convert_layout(&mut self, r: ValueId, src: ValueId) -> R<Vec<V<'c>>> {
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
        if let Some(swizzled) = convert_scratch(&shape, dt) {
            return self.convert_through(src, &dl, &swizzled, alloc.offset);
        }
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

    /// The vectorised form of [`Self::convert_layout`] through the swizzled scratch `sl` at
    /// byte `base`: `src`'s registers written in runs (as `dot` stages a register operand),
    /// the destination layout `dl`'s runs read back.
    fn convert_through(
        &mut self,
        src: ValueId,
        dl: &Layout,
        sl: &SharedLayout,
        base: usize,
    ) -> R<Vec<V<'c>>> {
        self.stage_registers(src, sl, base)?;
        self.call_void("llvm.nvvm.barrier0")?;
        let dt = self.dtype(src);
        let elem = llvm_ty(self.ctx, dt);
        let w = Self::run_width(dl, dt);
        let mut out = Vec::with_capacity(dl.num_regs());
        for g in (0..dl.num_regs()).step_by(w) {
            let p = self.run_ptr(dl, g, sl, base)?;
            out.extend(self.load_vector(p, elem, dt, w)?);
        }
        self.call_void("llvm.nvvm.barrier0")?;
        Ok(out)
    }
}
