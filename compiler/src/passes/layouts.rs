//! The layout pass (the coalescing pass of COMPILER.md §1.6).
//!
//! 1. Every value's dimensions are mapped to the dimensions of the kernel's *root* tile (the
//!    widest tile of the highest rank), by propagating through expand/broadcast/reduce and
//!    element-wise ops.
//! 2. The root gets a blocked layout whose per-thread vector along the contiguous (last)
//!    dimension is as wide as every global access allows: 16 bytes of the narrowest element
//!    type, cut down to what the axis analysis proves contiguous, aligned and uniformly masked.
//! 3. Each value's layout is the root's projection ([`Layout::project`]); each global access
//!    gets its own vector width (it may be narrower than the root's, e.g. f32 next to bf16).
//! 4. Where a 1-D tile is expanded along a different root dimension than it already lives on,
//!    a `convert` (through shared memory) is inserted before the expand and step 1 reruns.
//!
//! With `dot`, one root is not enough: a GEMM has three dimension spaces (the `[M, N]`
//! accumulator, the `[M, K]` and `[K, N]` operand loads), and rank-2 tiles of different spaces
//! must not be identified. [`super::spaces`] groups tiles into spaces (a `dot` does not join its
//! operands with its result, `trans` and `convert` split spaces, cheap index chains are copied
//! per use); each space gets its own root: the MMA accumulator layout
//! ([`Layout::mma_acc_for`]) for accumulator spaces, the operand's layout transposed for a
//! `trans` result's space, a blocked layout otherwise. Kernels without `dot` keep the single
//! root. `dot` operands need no particular register layout: codegen stages them in swizzled
//! shared memory (from registers, or by `cp.async` when [`super::pipeline`] streams them).
//!
//! # The mma-to-dot register shortcut (COMPILER.md §1.7)
//!
//! One exception to "operands go through shared memory": when a `dot`'s A operand already sits
//! in registers in exactly the A-fragment layout of that dot ([`LayoutPlan::dot_a_regs`]), the
//! MMA takes it from there. That is the case of a second `dot` whose A operand is the cast of
//! an earlier accumulator whose warps all lie along M (`wn == 1`, each warp owning whole rows:
//! the warpgroup-shaped accumulators of 8-warp attention kernels, 16 rows per warp), when that
//! accumulator's column extent is the second dot's K (flash attention's `P·V`, `dS·K`,
//! `Pᵀ·dO`, `dSᵀ·Q`): the Mma layout (§1.3) with `WN = K` and the DotA layout (§1.4) with
//! `wn = 1` have the same bases, so A k-tile `i` is the C fragments of n-tiles `2i`, `2i + 1`.
//! The decision is a pure layout comparison ([`crate::layout::mma::dot_a_in_registers`]);
//! codegen then packs the f32 pairs with `cvt.rn.{bf16,f16}x2.f32` into the four A registers
//! of `mma.sync` (sm_80) or of the register-A form of `wgmma.mma_async` (sm_90a, whose
//! per-warp A fragment is the m16n8k16 one for the warp's 16 rows), with no scratch, no
//! `bar.sync`, and no shared-memory allocation for A. Anything else (`wn > 1`, another width,
//! a transposed or loaded operand) keeps the shared-memory conversion.

use super::axis_info::{self, AxisInfo};
use super::spaces;
use crate::dtype::DType;
use crate::ir::{printer, Block, IrError, Kernel, Op, ValueId};
use crate::layout::Layout;
use std::collections::{HashMap, HashSet};

/// Each value's dimensions as dimensions of its space's root.
type DimMaps = HashMap<ValueId, Vec<usize>>;

/// Most values of one tile a thread may hold.
pub const MAX_VALUES_PER_THREAD: usize = 256;

/// The layouts chosen for one kernel.
#[derive(Clone, Debug)]
pub struct LayoutPlan {
    /// Layout of every value.
    pub layouts: HashMap<ValueId, Layout>,
    /// Vector width (elements per access) of each global load/store/atomic, keyed by its pointer.
    pub vec: HashMap<ValueId, usize>,
    /// The `dot`s (by result) whose A operand is fed to the MMA straight from registers: the
    /// operand's layout already is the A fragment layout (the mma-to-dot shortcut of
    /// COMPILER.md §1.7, [`crate::layout::mma::dot_a_in_registers`]), so codegen packs its
    /// registers in pairs instead of staging the tile through shared memory. Printed as
    /// `a-in-regs` after the dot's layout.
    pub dot_a_regs: HashSet<ValueId>,
}

impl LayoutPlan {
    /// The layout of `v`.
    pub fn of(&self, v: ValueId) -> &Layout {
        &self.layouts[&v]
    }

    /// The kernel's IR with every tile value annotated with its layout, the layouts listed once
    /// at the top (`#L0 = ...`), and pointer tiles with their access width.
    pub fn print(&self, k: &Kernel) -> String {
        let mut distinct: Vec<&Layout> = vec![];
        let mut ids: HashMap<ValueId, usize> = HashMap::new();
        let mut order = vec![];
        k.walk(&mut |i| order.extend(i.results.iter().copied()));
        for v in order {
            let Some(l) = self.layouts.get(&v) else {
                continue;
            };
            if l.rank() == 0 {
                continue;
            }
            let idx = match distinct.iter().position(|d| *d == l) {
                Some(i) => i,
                None => {
                    distinct.push(l);
                    distinct.len() - 1
                }
            };
            ids.insert(v, idx);
        }
        let mut out = String::new();
        for (i, l) in distinct.iter().enumerate() {
            out.push_str(&format!("// #L{i} = {l}\n"));
        }
        let note = |v: ValueId| -> Option<String> {
            let id = ids.get(&v)?;
            Some(match self.vec.get(&v) {
                Some(w) => format!("#L{id} vec {w}"),
                None if self.dot_a_regs.contains(&v) => format!("#L{id} a-in-regs"),
                None => format!("#L{id}"),
            })
        };
        out.push_str(&printer::print_annotated(k, &note));
        out
    }
}

/// Chooses layouts for `k`.
pub fn assign_layouts(k: &mut Kernel) -> Result<LayoutPlan, IrError> {
    let dot = spaces::has_dot(k);
    if dot {
        spaces::split_index_chains(k);
        spaces::convert_dot_stores(k);
    }
    // A tile used along two dimensions (a range that indexes both rows and columns) gets a
    // conversion through shared memory before its second use.
    let mut maps = HashMap::new();
    let mut sp = Spaces::of(k, dot);
    for _ in 0..8 {
        sp = Spaces::of(k, dot);
        let (m, conflicts) = dim_maps(k, &sp)?;
        maps = m;
        if conflicts.is_empty() {
            break;
        }
        insert_converts(k, &conflicts);
    }
    let k: &Kernel = k;
    if let Some(r) = sp.rank.values().find(|r| **r > 2) {
        crate::ir_bail!(
            "kernel `{}`: tiles of rank {r} are not supported (at most 2)",
            k.name
        );
    }
    let info = axis_info::analyze(k);
    let accesses = memory_accesses(k);
    // Per space: the root shape (largest extent along each root dimension) and vector width.
    let mut shapes: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, t) in k.types.iter().enumerate() {
        let v = ValueId(i as u32);
        if let (Some(m), Some(s)) = (maps.get(&v), sp.space.get(&v)) {
            let shape = shapes.entry(*s).or_insert_with(|| vec![1; sp.rank[s]]);
            for (d, &rd) in m.iter().enumerate() {
                shape[rd] = shape[rd].max(t.shape[d]);
            }
        }
    }
    for shape in shapes.values() {
        if let Some(bad) = shape.iter().find(|d| !d.is_power_of_two()) {
            crate::ir_bail!(
                "kernel `{}`: tile extent {bad} is not a power of two",
                k.name
            );
        }
    }
    let mut vecs: HashMap<u32, usize> = HashMap::new();
    let mut widths = HashMap::new();
    for (ptr, mask, elem) in &accesses {
        let Some(s) = sp.space.get(ptr) else { continue };
        let w = access_width(k, &maps, &info, sp.rank[s], *ptr, *mask, *elem);
        widths.insert(*ptr, w);
        if let Some(w) = w {
            let e = vecs.entry(*s).or_insert(w.1);
            *e = (*e).min(w.1);
        }
    }
    let roots = choose_roots(k, &sp, &shapes, &vecs)?;
    let root = roots
        .get(&0)
        .or_else(|| roots.values().next())
        .cloned()
        .unwrap_or_else(|| Layout::blocked(&[], 1, k.num_warps));
    let mut layouts = HashMap::new();
    for (i, t) in k.types.iter().enumerate() {
        let v = ValueId(i as u32);
        let l = match sp.space.get(&v) {
            Some(s) => {
                let dims = maps
                    .get(&v)
                    .cloned()
                    .unwrap_or_else(|| default_map(t.rank(), sp.rank[s]));
                roots[s].project(&dims, &t.shape)
            }
            None => root.project(&[], &[]),
        };
        layouts.insert(v, l);
    }
    // A thread has 255 registers; a tile that needs more values per thread than that cannot
    // stay in registers (the compile would crawl and ptxas would spill).
    // (The first such value in definition order, so the message is deterministic.)
    let widest = (0..k.types.len())
        .map(|i| ValueId(i as u32))
        .find(|v| layouts[v].num_regs() > MAX_VALUES_PER_THREAD);
    if let Some(v) = widest {
        crate::ir_bail!(
            "kernel `{}`: the tile {} needs {} values per thread with {} warps (at most {MAX_VALUES_PER_THREAD}); use a smaller tile or more warps",
            k.name,
            k.ty(v),
            layouts[&v].num_regs(),
            k.num_warps
        );
    }
    let mut vec = HashMap::new();
    for (ptr, _, _) in &accesses {
        let own = widths.get(ptr).copied().flatten().map(|w| w.0).unwrap_or(1);
        let l: &Layout = &layouts[ptr];
        vec.insert(*ptr, own.min(l.contiguous_regs()).max(1));
    }
    let dot_a_regs = dot_a_in_registers(k, &layouts);
    Ok(LayoutPlan {
        layouts,
        vec,
        dot_a_regs,
    })
}

/// The `dot`s whose A operand can be fed from registers (COMPILER.md §1.7): a 16-bit operand,
/// not transposed, whose layout is the A fragment layout of the dot's accumulator (in practice
/// the cast of an earlier `dot`'s accumulator whose warps own whole rows, as `P` in flash
/// attention). Every other A operand keeps the shared-memory path.
fn dot_a_in_registers(k: &Kernel, layouts: &HashMap<ValueId, Layout>) -> HashSet<ValueId> {
    let mut out = HashSet::new();
    k.walk(&mut |i| {
        let Op::Dot { a, .. } = &i.op else { return };
        let r = i.results[0];
        let ta = k.ty(*a);
        let transposed = super::smem::dot_source(k, *a).1;
        if ta.rank() == 2
            && ta.dtype.bytes() == 2
            && !transposed
            && crate::layout::mma::dot_a_in_registers(&layouts[a], &layouts[&r], ta.shape[1])
        {
            out.insert(r);
        }
    });
    out
}

/// The spaces of a kernel: each tile's space id and each space's rank. Without `dot` every tile
/// is in space 0, as the single-root design always had it.
struct Spaces {
    space: HashMap<ValueId, u32>,
    rank: HashMap<u32, usize>,
    /// Spaces that hold a `dot` accumulator (their root is the MMA fragment layout).
    acc: Vec<u32>,
    /// `trans` results' spaces, with the space of the transposed operand.
    trans: Vec<(u32, ValueId, ValueId)>,
}

impl Spaces {
    fn of(k: &Kernel, dot: bool) -> Spaces {
        let mut c = spaces::components(k, true);
        let accs = if dot {
            spaces::accumulator_components(k, &mut c)
        } else {
            Default::default()
        };
        let mut space = HashMap::new();
        let mut rank: HashMap<u32, usize> = HashMap::new();
        for (i, t) in k.types.iter().enumerate() {
            if t.rank() == 0 {
                continue;
            }
            let v = ValueId(i as u32);
            let s = if dot { c.find(v) } else { 0 };
            space.insert(v, s);
            let r = rank.entry(s).or_insert(0);
            *r = (*r).max(t.rank());
        }
        let mut trans = vec![];
        k.walk(&mut |i| {
            if let Op::Trans { src } = &i.op {
                trans.push((space[&i.results[0]], i.results[0], *src));
            }
        });
        let mut acc: Vec<u32> = accs.into_iter().collect();
        acc.sort_unstable();
        Spaces {
            space,
            rank,
            acc,
            trans,
        }
    }
}

/// The root layout of every space: the MMA accumulator layout for accumulator spaces, the
/// operand's layout with dimensions swapped for the space of a `trans` result, a blocked
/// layout otherwise.
fn choose_roots(
    k: &Kernel,
    sp: &Spaces,
    shapes: &HashMap<u32, Vec<usize>>,
    vecs: &HashMap<u32, usize>,
) -> Result<HashMap<u32, Layout>, IrError> {
    let mut roots: HashMap<u32, Layout> = HashMap::new();
    for (s, shape) in shapes {
        if sp.acc.contains(s) {
            let l = Layout::mma_acc_for(shape[0], shape[1], k.num_warps)
                .map_err(|e| IrError(format!("kernel `{}`: {e}", k.name)))?;
            roots.insert(*s, l);
        } else if !sp.trans.iter().any(|(ts, _, _)| ts == s) {
            let v = vecs.get(s).copied().unwrap_or(1).max(1);
            roots.insert(*s, Layout::blocked(shape, v, k.num_warps));
        }
    }
    // `trans` spaces, in dependency order (a transposed tile may itself be transposed).
    for _ in 0..sp.trans.len() + 1 {
        for (ts, r, src) in &sp.trans {
            if roots.contains_key(ts) {
                continue;
            }
            let Some(ss) = sp.space.get(src) else {
                continue;
            };
            let Some(root) = roots.get(ss) else { continue };
            let src_shape = &k.ty(*src).shape;
            if root.shape != *src_shape || shapes.get(ts) != Some(&k.ty(*r).shape) {
                crate::ir_bail!(
                    "kernel `{}`: `trans` of {} needs the tile to be the largest of its space (root {:?}, result space {:?})",
                    k.name,
                    k.ty(*src),
                    root.shape,
                    shapes.get(ts)
                );
            }
            roots.insert(*ts, root.transpose());
        }
    }
    if let Some((_, r, _)) = sp.trans.iter().find(|(ts, _, _)| !roots.contains_key(ts)) {
        crate::ir_bail!(
            "kernel `{}`: cannot place the transposed tile {}",
            k.name,
            k.ty(*r)
        );
    }
    Ok(roots)
}

fn default_map(rank: usize, root_rank: usize) -> Vec<usize> {
    (root_rank - rank..root_rank).collect()
}

/// `(pointer, mask, element bytes)` of every global access.
fn memory_accesses(k: &Kernel) -> Vec<(ValueId, Option<ValueId>, usize)> {
    let mut out = vec![];
    k.walk(&mut |i| {
        let (ptr, mask) = match &i.op {
            Op::Load { ptr, mask, .. }
            | Op::Store { ptr, mask, .. }
            | Op::AtomicAdd { ptr, mask, .. } => (*ptr, *mask),
            _ => return,
        };
        if let DType::Ptr(s) = k.ty(ptr).dtype {
            if k.ty(ptr).rank() > 0 {
                out.push((ptr, mask, s.bytes()));
            }
        }
    });
    out
}

/// `(own width, width in elements of the narrowest type)` for an access along the root's
/// contiguous dimension; `None` when the access's last dim is not the root's last dim.
#[allow(clippy::too_many_arguments)]
fn access_width(
    k: &Kernel,
    maps: &HashMap<ValueId, Vec<usize>>,
    info: &HashMap<ValueId, AxisInfo>,
    root_rank: usize,
    ptr: ValueId,
    mask: Option<ValueId>,
    elem: usize,
) -> Option<(usize, usize)> {
    let rank = k.ty(ptr).rank();
    let dims = maps
        .get(&ptr)
        .cloned()
        .unwrap_or_else(|| default_map(rank, root_rank));
    if dims.last() != Some(&(root_rank - 1)) {
        return None;
    }
    let last = rank - 1;
    let pi = info.get(&ptr)?;
    let mut limit = pi.contig[last]
        .min(pi.div[last] / elem as u64)
        .min(k.ty(ptr).shape[last] as u64);
    if let Some(m) = mask {
        limit = limit.min(info.get(&m).map(|i| i.cst[last]).unwrap_or(1));
    }
    let limit = prev_pow2(limit.max(1) as usize);
    let own = limit.min(16 / elem);
    // The root vector is counted in elements of the narrowest type (16 bytes of bf16 = 8),
    // limited by what this access proves.
    let narrow = limit.min(8);
    Some((own, narrow))
}

fn prev_pow2(x: usize) -> usize {
    1 << (usize::BITS - 1 - x.leading_zeros())
}

/// Maps every value's dimensions to root dimensions.
/// Dimension maps of every value, and the `expand_dims` results whose operand is already used
/// along another root dimension (each needs a layout conversion of its operand).
fn dim_maps(k: &Kernel, sp: &Spaces) -> Result<(DimMaps, Vec<ValueId>), IrError> {
    let root_rank = |v: ValueId| sp.space.get(&v).map(|s| sp.rank[s]).unwrap_or(0);
    let mut maps: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, t) in k.types.iter().enumerate() {
        let v = ValueId(i as u32);
        if t.rank() == root_rank(v) || t.rank() == 0 {
            maps.insert(v, (0..t.rank()).collect());
        }
    }
    let mut conflicts = vec![];
    for _ in 0..64 {
        let mut changed = false;
        let mut err = None;
        propagate(
            k,
            &k.body,
            &mut maps,
            &mut changed,
            &mut err,
            &mut conflicts,
            &root_rank,
        );
        if let Some(e) = err {
            return Err(e);
        }
        if !changed {
            break;
        }
    }
    Ok((maps, conflicts))
}

/// Inserts `convert` before each listed `expand_dims`, which then expands the converted copy.
fn insert_converts(k: &mut Kernel, at: &[ValueId]) {
    fn walk(b: &mut Block, at: &[ValueId], types: &mut Vec<crate::ir::Type>) {
        let mut out = Vec::with_capacity(b.insts.len());
        for mut inst in std::mem::take(&mut b.insts) {
            for nb in inst.op.blocks_mut() {
                walk(nb, at, types);
            }
            if let (Op::ExpandDims { src, .. }, Some(r)) = (&mut inst.op, inst.results.first()) {
                if at.contains(r) {
                    types.push(types[src.0 as usize].clone());
                    let c = ValueId(types.len() as u32 - 1);
                    out.push(crate::ir::Inst {
                        results: vec![c],
                        op: Op::ConvertLayout { src: *src },
                    });
                    *src = c;
                }
            }
            out.push(inst);
        }
        b.insts = out;
    }
    let mut types = std::mem::take(&mut k.types);
    walk(&mut k.body, at, &mut types);
    k.types = types;
}

fn propagate(
    k: &Kernel,
    b: &Block,
    maps: &mut HashMap<ValueId, Vec<usize>>,
    changed: &mut bool,
    err: &mut Option<IrError>,
    conflicts: &mut Vec<ValueId>,
    root_rank: &dyn Fn(ValueId) -> usize,
) {
    let mut unify = |maps: &mut HashMap<ValueId, Vec<usize>>, group: &[ValueId]| match unify_group(
        k, maps, group,
    ) {
        Ok(c) => *changed |= c,
        Err(e) => *err = Some(e),
    };
    let mut local = false;
    let mut nested: Vec<&Block> = vec![];
    for inst in &b.insts {
        let res = inst.results.first().copied();
        match &inst.op {
            Op::Binary { lhs, rhs, .. } | Op::Cmp { lhs, rhs, .. } => {
                unify(maps, &[*lhs, *rhs, res.unwrap_or(*lhs)])
            }
            Op::Unary { src, .. } | Op::Cast { src } | Op::Broadcast { src } => {
                unify(maps, &[*src, res.unwrap_or(*src)])
            }
            Op::Select { cond, a, b: bb } => unify(maps, &[*cond, *a, *bb, res.unwrap_or(*a)]),
            Op::AddPtr { ptr, offset } => unify(maps, &[*ptr, *offset, res.unwrap_or(*ptr)]),
            Op::Load { ptr, mask, other } => {
                let mut g = vec![*ptr];
                g.extend(mask.iter().chain(other.iter()).copied());
                g.extend(res);
                unify(maps, &g);
            }
            Op::Store { ptr, value, mask } | Op::AtomicAdd { ptr, value, mask } => {
                let mut g = vec![*ptr, *value];
                g.extend(mask.iter().copied());
                unify(maps, &g);
            }
            Op::ExpandDims { src, axis } => {
                let Some(r) = res else { continue };
                if let Some(rm) = maps.get(&r).cloned() {
                    let mut sm = rm.clone();
                    sm.remove(*axis);
                    if k.ty(*src).rank() > 0 {
                        match maps.get(src) {
                            None => {
                                maps.insert(*src, sm);
                                local = true;
                            }
                            // The operand already lives along another dimension: convert it.
                            Some(have) if *have != sm && !conflicts.contains(&r) => {
                                conflicts.push(r)
                            }
                            Some(_) => {}
                        }
                    }
                } else if let Some(sm) = maps.get(src).cloned() {
                    let free: Vec<usize> = (0..root_rank(r)).filter(|d| !sm.contains(d)).collect();
                    if free.len() == 1 {
                        let mut rm = sm.clone();
                        rm.insert(*axis, free[0]);
                        maps.insert(r, rm);
                        local = true;
                    }
                }
            }
            Op::Reduce { src, axis, .. } => {
                let Some(r) = res else { continue };
                if let Some(sm) = maps.get(src).cloned() {
                    let mut rm = sm.clone();
                    rm.remove(*axis);
                    if k.ty(r).rank() > 0 && !maps.contains_key(&r) {
                        maps.insert(r, rm);
                        local = true;
                    }
                } else if let Some(rm) = maps.get(&r).cloned() {
                    let free: Vec<usize> = (0..root_rank(r)).filter(|d| !rm.contains(d)).collect();
                    if free.len() == 1 {
                        let mut sm = rm.clone();
                        sm.insert(*axis, free[0]);
                        maps.insert(*src, sm);
                        local = true;
                    }
                }
            }
            Op::For { inits, body, .. } => {
                for (j, init) in inits.iter().enumerate() {
                    let mut g = vec![*init, body.args[j + 1], inst.results[j]];
                    if let Some(Op::Yield { values }) = body.insts.last().map(|i| &i.op) {
                        g.push(values[j]);
                    }
                    unify(maps, &g);
                }
                nested.push(body);
            }
            Op::If {
                then_block,
                else_block,
                ..
            } => {
                for (j, r) in inst.results.iter().enumerate() {
                    let mut g = vec![*r];
                    for blk in [then_block, else_block] {
                        if let Some(Op::Yield { values }) = blk.insts.last().map(|i| &i.op) {
                            g.push(values[j]);
                        }
                    }
                    unify(maps, &g);
                }
                nested.push(then_block);
                nested.push(else_block);
            }
            _ => {}
        }
    }
    *changed |= local;
    for nb in nested {
        propagate(k, nb, maps, changed, err, conflicts, root_rank);
    }
}

/// Gives every member of `group` (ignoring scalars) the dimension map of the first member that
/// has one. Returns whether anything changed.
fn unify_group(
    k: &Kernel,
    maps: &mut HashMap<ValueId, Vec<usize>>,
    group: &[ValueId],
) -> Result<bool, IrError> {
    let group: Vec<ValueId> = group
        .iter()
        .copied()
        .filter(|v| k.ty(*v).rank() > 0)
        .collect();
    let Some(m) = group.iter().find_map(|v| maps.get(v).cloned()) else {
        return Ok(false);
    };
    let mut changed = false;
    for v in &group {
        match maps.get(v) {
            Some(x) if *x != m => crate::ir_bail!(
                "kernel `{}`: a tile is used along two different dimensions ({:?} and {:?}); build it twice",
                k.name,
                x,
                m
            ),
            Some(_) => {}
            None => {
                maps.insert(*v, m.clone());
                changed = true;
            }
        }
    }
    Ok(changed)
}
