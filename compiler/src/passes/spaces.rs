//! Dimension *spaces*: which tiles of a kernel share one root layout.
//!
//! A kernel without `dot` has one space: every tile is a projection of one blocked root
//! (COMPILER.md §1.6). A GEMM has at least three: the `[M, K]` and `[K, N]` operand tiles and
//! the `[M, N]` accumulator, and tiles of different spaces must not be forced into one layout.
//! A space is a connected component of the graph whose edges are the ops that require their
//! operands and results to share a layout (element-wise ops, loads and stores with their
//! pointers and masks, loop-carried values, expand/reduce between ranks). `dot` (between its
//! operands and its result), `trans` and `convert` are not edges.
//!
//! Two rewrites, only in kernels that contain a `dot`, keep spaces apart:
//! - [`split_index_chains`]: every consumer of a cheap index computation (ranges, constants,
//!   splats and element-wise integer math on them, their bound comparisons, expands and
//!   broadcasts: `pid * BM + range`, `rows < M`) gets its own copy of the computation, as Triton
//!   rematerialises it, so that an index used by tiles of two spaces does not join them.
//! - [`convert_dot_stores`]: a store of an accumulator-space value gets a `convert` in front, so
//!   the store runs in a coalesced blocked layout (COMPILER.md §5, through shared memory).

use crate::ir::{Block, Inst, Kernel, Op, Type, ValueId};
use std::collections::{HashMap, HashSet};

/// Union-find over value ids.
pub struct Components {
    parent: Vec<u32>,
}

impl Components {
    fn new(n: usize) -> Self {
        Components {
            parent: (0..n as u32).collect(),
        }
    }

    /// The representative of `v`'s component.
    pub fn find(&mut self, v: ValueId) -> u32 {
        let mut x = v.0;
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = p;
        }
        x
    }

    fn union(&mut self, a: ValueId, b: ValueId) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb) as usize] = ra.min(rb);
        }
    }
}

/// Whether the kernel has a `dot` anywhere.
pub fn has_dot(k: &Kernel) -> bool {
    let mut found = false;
    k.walk(&mut |i| found |= matches!(i.op, Op::Dot { .. }));
    found
}

/// The components of `k`'s tiles (scalars are never joined). Store and atomic edges are left out
/// when `with_stores` is false.
pub fn components(k: &Kernel, with_stores: bool) -> Components {
    let mut c = Components::new(k.types.len());
    let tile = |v: ValueId| k.ty(v).rank() > 0;
    k.walk(&mut |inst| {
        let res = inst.results.first().copied();
        let mut group: Vec<ValueId> = vec![];
        match &inst.op {
            Op::Binary { lhs, rhs, .. } | Op::Cmp { lhs, rhs, .. } => {
                group = vec![*lhs, *rhs];
                group.extend(res);
            }
            Op::Unary { src, .. }
            | Op::Cast { src }
            | Op::Broadcast { src }
            | Op::ExpandDims { src, .. }
            | Op::Reduce { src, .. } => {
                group = vec![*src];
                group.extend(res);
            }
            Op::Select { cond, a, b } => {
                group = vec![*cond, *a, *b];
                group.extend(res);
            }
            Op::AddPtr { ptr, offset } => {
                group = vec![*ptr, *offset];
                group.extend(res);
            }
            Op::Load { ptr, mask, other } => {
                group = vec![*ptr];
                group.extend(mask.iter().chain(other.iter()).copied());
                group.extend(res);
            }
            Op::Store { ptr, value, mask } | Op::AtomicAdd { ptr, value, mask } if with_stores => {
                group = vec![*ptr, *value];
                group.extend(mask.iter().copied());
            }
            Op::Dot { acc, .. } => {
                group = vec![*acc];
                group.extend(res);
            }
            Op::For { inits, body, .. } => {
                let yields = match body.insts.last().map(|i| &i.op) {
                    Some(Op::Yield { values }) => values.clone(),
                    _ => vec![],
                };
                for (j, init) in inits.iter().enumerate() {
                    let mut g = vec![*init, body.args[j + 1], inst.results[j]];
                    g.extend(yields.get(j).copied());
                    join(&mut c, &g, &tile);
                }
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
                            g.extend(values.get(j).copied());
                        }
                    }
                    join(&mut c, &g, &tile);
                }
            }
            _ => {}
        }
        join(&mut c, &group, &tile);
    });
    c
}

fn join(c: &mut Components, group: &[ValueId], tile: &impl Fn(ValueId) -> bool) {
    let tiles: Vec<ValueId> = group.iter().copied().filter(|v| tile(*v)).collect();
    for w in tiles.windows(2) {
        c.union(w[0], w[1]);
    }
}

/// Component representatives that hold a `dot` accumulator.
pub fn accumulator_components(k: &Kernel, c: &mut Components) -> HashSet<u32> {
    let mut accs = vec![];
    k.walk(&mut |i| {
        if let Op::Dot { acc, .. } = &i.op {
            accs.push(*acc);
        }
    });
    accs.into_iter().map(|v| c.find(v)).collect()
}

/// Puts a `convert` in front of every stored value that lives in an accumulator space.
pub fn convert_dot_stores(k: &mut Kernel) {
    let mut c = components(k, false);
    let accs = accumulator_components(k, &mut c);
    let mut targets = HashSet::new();
    k.walk(&mut |i| {
        if let Op::Store { value, .. } | Op::AtomicAdd { value, .. } = &i.op {
            if k.ty(*value).rank() > 0 && accs.contains(&c.find(*value)) {
                targets.insert(*value);
            }
        }
    });
    if targets.is_empty() {
        return;
    }
    fn walk(b: &mut Block, targets: &HashSet<ValueId>, types: &mut Vec<Type>) {
        let mut out = Vec::with_capacity(b.insts.len());
        for mut inst in std::mem::take(&mut b.insts) {
            for nb in inst.op.blocks_mut() {
                walk(nb, targets, types);
            }
            if let Op::Store { value, .. } | Op::AtomicAdd { value, .. } = &mut inst.op {
                if targets.contains(value) {
                    types.push(types[value.0 as usize].clone());
                    let cv = ValueId(types.len() as u32 - 1);
                    out.push(Inst {
                        results: vec![cv],
                        op: Op::ConvertLayout { src: *value },
                    });
                    *value = cv;
                }
            }
            out.push(inst);
        }
        b.insts = out;
    }
    let mut types = std::mem::take(&mut k.types);
    walk(&mut k.body, &targets, &mut types);
    k.types = types;
}

/// Clones cheap 1-D index chains per `expand_dims` use (see the module doc).
pub fn split_index_chains(k: &mut Kernel) {
    // Defining op of every value, to walk chains backwards.
    let mut defs: HashMap<ValueId, Op> = HashMap::new();
    k.walk(&mut |i| {
        for r in &i.results {
            defs.insert(*r, i.op.clone());
        }
    });
    let mut types = std::mem::take(&mut k.types);
    split_block(&mut k.body, &defs, &mut types);
    k.types = types;
    // The originals are dead now; copies made inside loops go back out where invariant.
    super::canonicalize::dce(k);
    super::canonicalize::licm(k);
}

/// Whether tile `v` is computed only from ranges, constants and scalars.
fn cheap(v: ValueId, defs: &HashMap<ValueId, Op>, types: &[Type]) -> bool {
    if types[v.0 as usize].rank() == 0 {
        return true;
    }
    match defs.get(&v) {
        Some(Op::Range { .. }) | Some(Op::Const { .. }) | Some(Op::Splat { .. }) => true,
        Some(
            op @ (Op::Binary { .. }
            | Op::Cmp { .. }
            | Op::Unary { .. }
            | Op::Cast { .. }
            | Op::ExpandDims { .. }
            | Op::Broadcast { .. }),
        ) => op.operands().iter().all(|o| cheap(*o, defs, types)),
        _ => false,
    }
}

/// Emits a copy of the tile part of `v`'s chain into `out`; returns the copy's id.
fn clone_chain(
    v: ValueId,
    defs: &HashMap<ValueId, Op>,
    types: &mut Vec<Type>,
    out: &mut Vec<Inst>,
    memo: &mut HashMap<ValueId, ValueId>,
) -> ValueId {
    if types[v.0 as usize].rank() == 0 {
        return v;
    }
    if let Some(c) = memo.get(&v) {
        return *c;
    }
    let mut op = defs[&v].clone();
    let ops = op.operands();
    let mut sub = HashMap::new();
    // Below an expand, a fresh copy: one 1-D index may be expanded along both dimensions.
    let mut fresh = HashMap::new();
    let expand = matches!(op, Op::ExpandDims { .. });
    for o in ops {
        let m = if expand { &mut fresh } else { &mut *memo };
        let c = clone_chain(o, defs, types, out, m);
        sub.insert(o, c);
    }
    op.map_operands(&mut |o| sub.get(&o).copied().unwrap_or(o));
    types.push(types[v.0 as usize].clone());
    let nv = ValueId(types.len() as u32 - 1);
    out.push(Inst {
        results: vec![nv],
        op,
    });
    memo.insert(v, nv);
    nv
}

fn split_block(b: &mut Block, defs: &HashMap<ValueId, Op>, types: &mut Vec<Type>) {
    let mut out = Vec::with_capacity(b.insts.len());
    for mut inst in std::mem::take(&mut b.insts) {
        for nb in inst.op.blocks_mut() {
            split_block(nb, defs, types);
        }
        let is_cheap = inst
            .results
            .first()
            .is_some_and(|r| types[r.0 as usize].rank() > 0 && cheap(*r, defs, types));
        if !is_cheap {
            // A consumer: give it private copies of its cheap tile operands.
            let mut memo = HashMap::new();
            let ops = inst.op.operands();
            let mut sub = HashMap::new();
            for o in ops {
                if types[o.0 as usize].rank() > 0 && cheap(o, defs, types) {
                    let c = clone_chain(o, defs, types, &mut out, &mut memo);
                    sub.insert(o, c);
                }
            }
            inst.op
                .map_operands(&mut |o| sub.get(&o).copied().unwrap_or(o));
        }
        out.push(inst);
    }
    b.insts = out;
}
