//! TMA operand streaming (COMPILER.md §8.2): which streamed `dot` operands of a pipelined loop
//! the tensor memory accelerator can copy on sm_90a, and from where.
//!
//! The pipeliner ([`super::pipeline`]) streams a loop's operand tiles into a ring of swizzled
//! shared-memory slots. With `cp.async` every thread computes addresses and masks and copies
//! 16 bytes at a time. A bulk tensor copy does the same with one instruction per 64-column
//! panel, issued by one thread, from a *tensor map* the host encodes once per launch: the
//! tensor's base, extents and row stride, the box (`rows x panel`) and the swizzle. The panels
//! of [`SharedLayout`] are exactly what `SWIZZLE_128B/64B/32B` writes, and out-of-bounds parts
//! of a box are zero-filled, which is what the DSL's bounds mask means.
//!
//! A streamed load qualifies when its pointer tile is `t + rows·t.stride0 + cols` for a rank-2
//! tensor argument `t`, with `rows = r0 + range(BM)` and `cols = c0 + range(BN)` for scalars
//! `r0`, `c0` (a `t.load([rows, cols])` of contiguous index ranges, block-list starts included),
//! or `t + rows·t.stride0 + h·t.stride1 + cols` for a rank-3 view with a fixed middle index `h`
//! (`qkv.load([rows, head, cols])`: one head of a `[T, heads, hd]` tensor, a 3-D box one head
//! deep), and its mask (if any) only bounds those indices by `t`'s extents; the variant must
//! guarantee 16-byte alignment of `t` and its row stride (the TMA's requirement), and the slot
//! must be swizzled. A loop is streamed by TMA only when the kernel asks for it
//! ([`Kernel::tma`]) and every ring load qualifies; resident loads keep `cp.async`.
//!
//! *Bulk reductions.* In such a kernel, an `atomic_add` of a rank-2 f32 tile whose pointer
//! tile qualifies the same way (FlashAttention's `dq += dS·k`, added into an f32 accumulator
//! per key block) is a [`TmaReduce`]: codegen stages the tile in a swizzled shared buffer of
//! its own and one thread adds it to global memory with `cp.reduce.async.bulk.tensor` (one
//! instruction per panel, the additions done in L2), instead of one `red.global.add.f32` per
//! element from every thread (which L2's atomic throughput bounds:
//! `bench/results/2026-11-30-h200-fused-bwd/`). The box's parts out of the tensor's extents
//! are dropped, which is what the bounds mask means. The tile's rows must be its own to add
//! to: the kernel masks what it must not add (with zeros), not the store.

use crate::dtype::DType;
use crate::ir::{BinOp, CmpPred, Kernel, Op, ValueId};
use crate::launch::TmaMap;
use crate::layout::shared::SharedLayout;
use std::collections::HashMap;

/// One operand a loop copies with TMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmaOperand {
    /// The streamed load (its [`super::pipeline::StagedLoad`]).
    pub load: ValueId,
    /// Index of its tensor map in [`super::pipeline::PipelinePlan::maps`].
    pub map: usize,
    /// The tile's first index along each tensor dimension, outermost first, as a sum of
    /// scalars (empty: 0): rows, then the fixed index of a rank-3 view's middle dimension (a
    /// head), then columns.
    pub start: Vec<Vec<ValueId>>,
}

/// The TMA side of one pipelined loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmaLoop {
    pub operands: Vec<TmaOperand>,
    /// Byte offset of the loop's mbarriers (set by the shared-memory plan): `full[s]` at
    /// `barriers + 8·s` (the copies of slot `s` have landed), `empty[s]` at
    /// `barriers + 8·(stages + s)` (every warp is done reading slot `s`).
    pub barriers: usize,
}

/// An `atomic_add` that the TMA performs as a bulk tensor reduction (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmaReduce {
    /// The `atomic_add`'s pointer tile (the op has no result to name it by).
    pub ptr: ValueId,
    /// Index of its tensor map (f32) in [`super::pipeline::PipelinePlan::maps`].
    pub map: usize,
    /// The tile's first index along each tensor dimension, as in [`TmaOperand::start`].
    pub start: Vec<Vec<ValueId>>,
    /// The staging buffer's layout (the box the map describes, panel by panel).
    pub shared: SharedLayout,
    /// Byte offset of the staging buffer (set by the shared-memory plan).
    pub offset: usize,
}

/// Bytes of one loop's mbarriers.
pub fn barrier_bytes(stages: usize) -> usize {
    2 * stages * 8
}

/// A contiguous 1-D index: `Σ start + range(n)` (scalars, sorted; empty for 0).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Index {
    start: Vec<ValueId>,
    n: usize,
}

struct Matcher<'k> {
    k: &'k Kernel,
    defs: HashMap<ValueId, &'k Op>,
    /// Argument index by value.
    args: HashMap<ValueId, usize>,
}

impl<'k> Matcher<'k> {
    fn new(k: &'k Kernel) -> Matcher<'k> {
        let mut defs = HashMap::new();
        fn go<'a>(b: &'a crate::ir::Block, defs: &mut HashMap<ValueId, &'a Op>) {
            for inst in &b.insts {
                for r in &inst.results {
                    defs.insert(*r, &inst.op);
                }
                for nb in inst.op.blocks() {
                    go(nb, defs);
                }
            }
        }
        go(&k.body, &mut defs);
        let args = k
            .args
            .iter()
            .enumerate()
            .map(|(i, a)| (a.value, i))
            .collect();
        Matcher { k, defs, args }
    }

    fn op(&self, v: ValueId) -> Option<&'k Op> {
        self.defs.get(&v).copied()
    }

    /// Looks through `broadcast`.
    fn unbroadcast(&self, v: ValueId) -> ValueId {
        match self.op(v) {
            Some(Op::Broadcast { src }) => *src,
            _ => v,
        }
    }

    /// The scalar a `splat` repeats.
    fn splat_of(&self, v: ValueId) -> Option<ValueId> {
        match self.op(v) {
            Some(Op::Splat { src }) if self.k.ty(*src).rank() == 0 => Some(*src),
            _ => None,
        }
    }

    fn index(&self, v: ValueId) -> Option<Index> {
        match self.op(v)? {
            Op::Cast { src } => self.index(*src),
            Op::Range { n } => Some(Index {
                start: vec![],
                n: *n,
            }),
            Op::Binary {
                op: BinOp::Add,
                lhs,
                rhs,
            } => {
                let (s, i) = match (self.splat_of(*lhs), self.splat_of(*rhs)) {
                    (Some(s), None) => (s, self.index(*rhs)?),
                    (None, Some(s)) => (s, self.index(*lhs)?),
                    _ => return None,
                };
                let mut start = i.start;
                start.push(s);
                start.sort();
                Some(Index { start, n: i.n })
            }
            _ => None,
        }
    }

    /// `expand_dims(i, axis)` for the given axis (or a cast of it: i32 indices are widened
    /// after expansion).
    fn expanded(&self, v: ValueId, axis: usize) -> Option<Index> {
        match self.op(v)? {
            Op::ExpandDims { src, axis: a } if *a == axis => self.index(*src),
            Op::Cast { src } => self.expanded(*src, axis),
            _ => None,
        }
    }

    /// The argument `base` has the name `name`.
    fn is_arg(&self, v: ValueId, name: &str) -> bool {
        self.args
            .get(&v)
            .is_some_and(|i| self.k.args[*i].name == name)
    }

    /// `broadcast(expand_dims(rows, 1) * splat(t.stride0))`.
    fn row_term(&self, v: ValueId, t: &str) -> Option<Index> {
        let Some(Op::Binary {
            op: BinOp::Mul,
            lhs,
            rhs,
        }) = self.op(self.unbroadcast(v))
        else {
            return None;
        };
        let stride = format!("{t}.stride0");
        for (i, s) in [(*lhs, *rhs), (*rhs, *lhs)] {
            if self.splat_of(s).is_some_and(|s| self.is_arg(s, &stride)) {
                if let Some(ix) = self.expanded(i, 1) {
                    return Some(ix);
                }
            }
        }
        None
    }

    /// `broadcast(expand_dims(cols, 0))`.
    fn col_term(&self, v: ValueId) -> Option<Index> {
        self.expanded(self.unbroadcast(v), 0)
    }

    /// `splat(h * t.stride1)` (possibly broadcast): a rank-3 view's fixed middle index `h`.
    fn middle_term(&self, v: ValueId, t: &str) -> Option<ValueId> {
        let s = self.splat_of(self.unbroadcast(v))?;
        let Some(Op::Binary {
            op: BinOp::Mul,
            lhs,
            rhs,
        }) = self.op(s)
        else {
            return None;
        };
        let stride = format!("{t}.stride1");
        if self.is_arg(*rhs, &stride) {
            Some(*lhs)
        } else if self.is_arg(*lhs, &stride) {
            Some(*rhs)
        } else {
            None
        }
    }

    /// The leaves of a tree of `add`s (looking through `broadcast`).
    fn sum_leaves(&self, v: ValueId, out: &mut Vec<ValueId>) {
        match self.op(self.unbroadcast(v)) {
            Some(Op::Binary {
                op: BinOp::Add,
                lhs,
                rhs,
            }) if self.k.ty(v).rank() > 0 => {
                self.sum_leaves(*lhs, out);
                self.sum_leaves(*rhs, out);
            }
            _ => out.push(v),
        }
    }

    /// Whether every leaf of the `and` tree `m` bounds one of the access's indices by `t`'s
    /// extent along that dimension: a tile index (`rows < t.dim0`, `cols < t.dim{last}`) or a
    /// fixed middle index (`splat(h < t.dim1)`).
    fn bounds_mask(
        &self,
        m: ValueId,
        t: &str,
        rows: &Index,
        cols: &Index,
        mid: Option<ValueId>,
        rank: usize,
    ) -> bool {
        let m = self.unbroadcast(m);
        if let Some(c) = self.splat_of(m) {
            return matches!(self.op(c), Some(Op::Cmp { pred: CmpPred::Lt, lhs, rhs })
                if Some(*lhs) == mid && self.is_arg(*rhs, &format!("{t}.dim1")));
        }
        match self.op(m) {
            Some(Op::Binary {
                op: BinOp::And,
                lhs,
                rhs,
            }) => {
                self.bounds_mask(*lhs, t, rows, cols, mid, rank)
                    && self.bounds_mask(*rhs, t, rows, cols, mid, rank)
            }
            Some(Op::Cmp {
                pred: CmpPred::Lt,
                lhs,
                rhs,
            }) => {
                let bound = |dim: usize| {
                    self.splat_of(*rhs)
                        .is_some_and(|d| self.is_arg(d, &format!("{t}.dim{dim}")))
                };
                // Rows are expanded along 1, columns along 0.
                (self.expanded(*lhs, 1).as_ref() == Some(rows) && bound(0))
                    || (self.expanded(*lhs, 0).as_ref() == Some(cols) && bound(rank - 1))
            }
            _ => false,
        }
    }

    /// The tensor map and tile start of a streamed load, if TMA can copy it.
    fn access(
        &self,
        ptr: ValueId,
        mask: Option<ValueId>,
        shape: &[usize],
        shared: &SharedLayout,
    ) -> Option<(TmaMap, Vec<Vec<ValueId>>)> {
        let Some(Op::AddPtr { ptr: p, offset }) = self.op(ptr) else {
            return None;
        };
        let base = self.splat_of(*p)?;
        let param = *self.args.get(&base)?;
        let t = self.k.args[param].name.clone();
        let rank = if self.k.args.iter().any(|a| a.name == format!("{t}.dim2")) {
            3
        } else {
            2
        };
        if self.k.args.iter().any(|a| a.name == format!("{t}.dim3")) {
            return None;
        }
        // The launcher's parameter order: base, the extents, the strides of all but the last
        // dimension.
        let names: Vec<String> = (0..rank)
            .map(|d| format!("{t}.dim{d}"))
            .chain((0..rank - 1).map(|d| format!("{t}.stride{d}")))
            .collect();
        for (j, n) in names.iter().enumerate() {
            if self.k.args.get(param + 1 + j).map(|a| a.name.as_str()) != Some(n.as_str()) {
                return None;
            }
        }
        let elem = shared.elem;
        let strides_aligned =
            (0..rank - 1).all(|d| self.k.args[param + 1 + rank + d].div * (elem as u64) >= 16);
        if self.k.args[param].div < 16 || !strides_aligned {
            return None;
        }
        let mut leaves = vec![];
        self.sum_leaves(*offset, &mut leaves);
        if leaves.len() != rank {
            return None;
        }
        let (mut rows, mut cols, mut mid) = (None, None, None);
        for l in leaves {
            if let Some(r) = self.row_term(l, &t).filter(|_| rows.is_none()) {
                rows = Some(r);
            } else if let Some(c) = self.col_term(l).filter(|_| cols.is_none()) {
                cols = Some(c);
            } else if let Some(h) = self
                .middle_term(l, &t)
                .filter(|_| rank == 3 && mid.is_none())
            {
                mid = Some(h);
            } else {
                return None;
            }
        }
        let (rows, cols) = (rows?, cols?);
        if rank == 3 && mid.is_none() {
            return None;
        }
        if rows.n != shape[0] || cols.n != shape[1] {
            return None;
        }
        if mask.is_some_and(|m| !self.bounds_mask(m, &t, &rows, &cols, mid, rank)) {
            return None;
        }
        if shared.swz == 0 || shared.rows > 256 || shared.rows != shape[0] {
            return None;
        }
        let map = TmaMap {
            param,
            rank,
            elem,
            box_rows: shared.rows as u32,
            box_cols: shared.panel_cols() as u32,
            swizzle: shared.swz as u32,
            float32: false,
        };
        let start = match mid {
            Some(h) => vec![rows.start, vec![h], cols.start],
            None => vec![rows.start, cols.start],
        };
        Some((map, start))
    }
}

/// Plans TMA copies for the loops of `plan` and bulk reductions (see the module doc): sets
/// each qualifying loop's [`TmaLoop`], `plan.reduces`, and `plan.maps`, the tensor maps the
/// kernel takes, in parameter order.
pub fn plan(k: &Kernel, plan: &mut super::pipeline::PipelinePlan) {
    plan.maps.clear();
    plan.reduces.clear();
    if !k.tma {
        return;
    }
    let m = Matcher::new(k);
    for l in &mut plan.loops {
        let mut operands = vec![];
        let mut maps = plan.maps.clone();
        let mut all = true;
        for ld in l.loads.iter().filter(|ld| !ld.resident) {
            let shape = &k.ty(ld.load).shape;
            match m.access(ld.ptr, ld.mask, shape, &ld.shared) {
                Some((map, start)) => {
                    let i = maps.iter().position(|x| *x == map).unwrap_or_else(|| {
                        maps.push(map);
                        maps.len() - 1
                    });
                    operands.push(TmaOperand {
                        load: ld.load,
                        map: i,
                        start,
                    });
                }
                None => all = false,
            }
        }
        if all && !operands.is_empty() {
            plan.maps = maps;
            l.tma = Some(TmaLoop {
                operands,
                barriers: 0,
            });
        }
    }
    let mut reduces = vec![];
    k.walk(&mut |i| {
        let Op::AtomicAdd { ptr, value, mask } = &i.op else {
            return;
        };
        let t = k.ty(*value);
        if t.dtype != DType::F32 || t.rank() != 2 {
            return;
        }
        let shared = SharedLayout::choose(t.shape[0], t.shape[1], t.dtype.bytes());
        if let Some((mut map, start)) = m.access(*ptr, *mask, &t.shape, &shared) {
            map.float32 = true;
            let i = plan.maps.iter().position(|x| *x == map).unwrap_or_else(|| {
                plan.maps.push(map);
                plan.maps.len() - 1
            });
            reduces.push(TmaReduce {
                ptr: *ptr,
                map: i,
                start,
                shared,
                offset: 0,
            });
        }
    });
    plan.reduces = reduces;
}

/// Drops the layout conversion in front of each bulk reduction's value: the layout pass
/// converts an `atomic_add`'s value into the coalesced layout of its space (through shared
/// memory, with two barriers), but the reduction stages the tile in its own shared buffer from
/// whatever layout its registers hold. Only a conversion used by the reduction alone goes.
pub fn unconvert_reduces(k: &mut Kernel, plan: &super::pipeline::PipelinePlan) {
    let mut uses: HashMap<ValueId, usize> = HashMap::new();
    k.walk(&mut |i| {
        for o in i.op.operands() {
            *uses.entry(o).or_default() += 1;
        }
    });
    let ptrs: Vec<ValueId> = plan.reduces.iter().map(|r| r.ptr).collect();
    fn walk(b: &mut crate::ir::Block, ptrs: &[ValueId], uses: &HashMap<ValueId, usize>) {
        for inst in &mut b.insts {
            for nb in inst.op.blocks_mut() {
                walk(nb, ptrs, uses);
            }
        }
        let mut drop = vec![];
        for j in 0..b.insts.len() {
            let Op::AtomicAdd { ptr, value, .. } = b.insts[j].op else {
                continue;
            };
            if !ptrs.contains(&ptr) || uses.get(&value) != Some(&1) {
                continue;
            }
            let def = b.insts[..j]
                .iter()
                .position(|i| i.results.first() == Some(&value));
            if let Some(d) = def {
                if let Op::ConvertLayout { src } = b.insts[d].op {
                    if let Op::AtomicAdd { value, .. } = &mut b.insts[j].op {
                        *value = src;
                    }
                    drop.push(d);
                }
            }
        }
        for d in drop.into_iter().rev() {
            b.insts.remove(d);
        }
    }
    walk(&mut k.body, &ptrs, &uses);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::parser::parse;
    use crate::passes::{layouts, pipeline};

    /// A GEMM-like loop `acc += a[rows, ks] · b[cols, ks]ᵀ`: `a_mask` is the text after `a`'s
    /// load pointer (` mask %40` bounds it by its own extents, ` mask %43` by `b.dim1`), `tma`
    /// the header flag, `a_div` the alignment of `a`'s base.
    fn kernel(a_mask: &str, tma: &str, a_div: u32) -> Kernel {
        let text = format!(
            r#"kernel @k(%0: ptr<bf16> "a" div {a_div}, %1: i64 "a.dim0", %2: i64 "a.dim1" div 8, %3: i64 "a.stride0" div 8, %4: ptr<bf16> "b" div 16, %5: i64 "b.dim0", %6: i64 "b.dim1" div 8, %7: i64 "b.stride0" div 8, %8: ptr<f32> "c" div 16) warps 4 stages 3{tma} {{
  %9 = program_id 0 : i32
  %10 = cast %9 : i64
  %11 = const 64 : i64
  %12 = mul %10, %11 : i64
  %13 = const 0 : i64
  %14 = const 64 : i64
  %15 = const 0.0 : f32[64,64]
  %16 = for %17 = %13 to %2 step %14 iter(%18 = %15) : f32[64,64] {{
    %19 = splat %12 : i64[64]
    %20 = range 64 : i32[64]
    %21 = cast %20 : i64[64]
    %22 = add %19, %21 : i64[64]
    %23 = expand_dims %22, 1 : i64[64,1]
    %24 = splat %3 : i64[64,1]
    %25 = mul %23, %24 : i64[64,1]
    %26 = broadcast %25 : i64[64,64]
    %27 = splat %17 : i64[64]
    %28 = add %27, %21 : i64[64]
    %29 = expand_dims %28, 0 : i64[1,64]
    %30 = broadcast %29 : i64[64,64]
    %31 = add %26, %30 : i64[64,64]
    %32 = splat %0 : ptr<bf16>[64,64]
    %33 = addptr %32, %31 : ptr<bf16>[64,64]
    %34 = splat %1 : i64[64,1]
    %35 = cmp lt %23, %34 : i1[64,1]
    %36 = broadcast %35 : i1[64,64]
    %37 = splat %2 : i64[1,64]
    %38 = cmp lt %29, %37 : i1[1,64]
    %39 = broadcast %38 : i1[64,64]
    %40 = and %36, %39 : i1[64,64]
    %41 = splat %6 : i64[1,64]
    %42 = cmp lt %29, %41 : i1[1,64]
    %43 = broadcast %42 : i1[64,64]
    %44 = load %33{a_mask} : bf16[64,64]
    %45 = splat %7 : i64[64,1]
    %46 = mul %23, %45 : i64[64,1]
    %47 = broadcast %46 : i64[64,64]
    %48 = add %30, %47 : i64[64,64]
    %49 = splat %4 : ptr<bf16>[64,64]
    %50 = addptr %49, %48 : ptr<bf16>[64,64]
    %51 = load %50 mask %43 : bf16[64,64]
    %52 = trans %51 : bf16[64,64]
    %53 = dot %44, %52, %18 : f32[64,64]
    yield %53
  }}
  return
}}
"#
        );
        parse(&text).unwrap()
    }

    fn planned(k: &mut Kernel) -> pipeline::PipelinePlan {
        let l = layouts::assign_layouts(k).unwrap();
        let mut p = pipeline::plan(k, &l);
        plan(k, &mut p);
        p
    }

    #[test]
    fn bounds_masked_tile_loads_become_tensor_maps() {
        let mut k = kernel(" mask %40", " tma", 16);
        let p = planned(&mut k);
        let t = p.loops[0].tma.as_ref().expect("loop streamed by TMA");
        assert_eq!(t.operands.len(), 2);
        assert_eq!(p.maps.len(), 2);
        assert_eq!(
            p.maps[0],
            TmaMap {
                param: 0,
                rank: 2,
                elem: 2,
                box_rows: 64,
                box_cols: 64,
                swizzle: 128,
                float32: false
            }
        );
        assert_eq!(p.maps[1].param, 4);
        // a: rows start at pid·64, columns at the induction variable; b's rows are the same
        // index, its columns the induction variable too.
        let iv = p.loops[0].iv;
        let rows = t.operands[0].start[0].clone();
        assert_eq!(rows.len(), 1);
        assert_ne!(rows[0], iv);
        assert_eq!(k.ty(rows[0]).rank(), 0);
        assert_eq!(t.operands[0].start, vec![rows.clone(), vec![iv]]);
        assert_eq!(t.operands[1].start, vec![rows, vec![iv]]);
    }

    #[test]
    fn only_when_asked() {
        let mut k = kernel(" mask %40", "", 16);
        let p = planned(&mut k);
        assert!(p.loops[0].tma.is_none());
        assert!(p.maps.is_empty());
    }

    #[test]
    fn a_mask_other_than_the_bounds_keeps_cp_async() {
        // `a`'s columns compared with `b.dim1`: not a's bound, so TMA's zero fill would differ.
        let mut k = kernel(" mask %43", " tma", 16);
        let p = planned(&mut k);
        assert!(p.loops[0].tma.is_none(), "{:?}", p.loops[0].tma);
    }

    #[test]
    fn unaligned_tensors_are_not_streamed() {
        // `a` is not 16-byte aligned: it takes the register path, and only `b` is copied.
        let mut k = kernel(" mask %40", " tma", 2);
        let p = planned(&mut k);
        let t = p.loops[0].tma.as_ref().expect("b streamed by TMA");
        assert_eq!(t.operands.len(), 1);
        assert_eq!(p.maps.len(), 1);
        assert_eq!(p.maps[0].param, 4);
    }

    /// `c[rows, cols] += x` for an f32 tile `x` computed in registers (`const` here, a `dot`
    /// in the kernels), `c`'s alignment `c_div`, with the header flag `tma`.
    fn reduce_kernel(tma: &str, c_div: u32) -> Kernel {
        let text = format!(
            r#"kernel @r(%0: ptr<f32> "c" div {c_div}, %1: i64 "c.dim0", %2: i64 "c.dim1" div 4, %3: i64 "c.stride0" div 4) warps 4{tma} {{
  %4 = program_id 0 : i32
  %5 = cast %4 : i64
  %6 = const 64 : i64
  %7 = mul %5, %6 : i64
  %8 = splat %7 : i64[64]
  %9 = range 64 : i32[64]
  %10 = cast %9 : i64[64]
  %11 = add %8, %10 : i64[64]
  %12 = expand_dims %11, 1 : i64[64,1]
  %13 = splat %3 : i64[64,1]
  %14 = mul %12, %13 : i64[64,1]
  %15 = broadcast %14 : i64[64,64]
  %16 = range 64 : i32[64]
  %17 = cast %16 : i64[64]
  %18 = expand_dims %17, 0 : i64[1,64]
  %19 = broadcast %18 : i64[64,64]
  %20 = add %15, %19 : i64[64,64]
  %21 = splat %0 : ptr<f32>[64,64]
  %22 = addptr %21, %20 : ptr<f32>[64,64]
  %23 = splat %1 : i64[64,1]
  %24 = cmp lt %12, %23 : i1[64,1]
  %25 = broadcast %24 : i1[64,64]
  %26 = const 1.5 : f32[64,64]
  atomic_add %22, %26 mask %25
  return
}}
"#
        );
        parse(&text).unwrap()
    }

    #[test]
    fn a_bounds_masked_f32_tile_atomic_add_becomes_a_bulk_reduction() {
        let mut k = reduce_kernel(" tma", 16);
        let p = planned(&mut k);
        assert_eq!(p.reduces.len(), 1, "{}", p.print());
        let r = &p.reduces[0];
        assert_eq!(r.map, 0);
        // 64 f32 columns: two 128-byte panels of 32.
        assert_eq!((r.shared.rows, r.shared.cols, r.shared.swz), (64, 64, 128));
        assert_eq!(
            p.maps,
            vec![TmaMap {
                param: 0,
                rank: 2,
                elem: 4,
                box_rows: 64,
                box_cols: 32,
                swizzle: 128,
                float32: true
            }]
        );
        // Rows start at pid·64, columns at 0.
        assert_eq!(r.start.len(), 2);
        assert_eq!(r.start[0].len(), 1);
        assert!(r.start[1].is_empty());
    }

    #[test]
    fn atomic_adds_stay_atomics_without_tma_or_alignment() {
        for (tma, div) in [("", 16), (" tma", 4)] {
            let mut k = reduce_kernel(tma, div);
            let p = planned(&mut k);
            assert!(p.reduces.is_empty() && p.maps.is_empty(), "{tma} {div}");
        }
    }

    #[test]
    fn the_conversion_in_front_of_a_bulk_reduction_is_dropped() {
        let mut k = reduce_kernel(" tma", 16);
        let p = planned(&mut k);
        // Put a conversion between the value and the reduction, as the layout pass does for a
        // `dot` result, then drop it again.
        let convert = |k: &mut Kernel| {
            let v = ValueId(26);
            k.types.push(k.types[v.0 as usize].clone());
            let c = ValueId(k.types.len() as u32 - 1);
            let at = k.body.insts.len() - 2;
            k.body.insts.insert(
                at,
                crate::ir::Inst {
                    results: vec![c],
                    op: Op::ConvertLayout { src: v },
                },
            );
            if let Op::AtomicAdd { value, .. } = &mut k.body.insts[at + 1].op {
                *value = c;
            }
        };
        convert(&mut k);
        let n = k.body.insts.len();
        unconvert_reduces(&mut k, &p);
        assert_eq!(k.body.insts.len(), n - 1);
        assert!(matches!(
            k.body.insts[n - 3].op,
            Op::AtomicAdd {
                value: ValueId(26),
                ..
            }
        ));
    }

    #[test]
    fn an_unmasked_load_qualifies() {
        let mut k = kernel("", " tma", 16);
        let p = planned(&mut k);
        assert!(p.loops[0].tma.is_some());
    }
}
