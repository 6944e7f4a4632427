//! The software pipeliner (COMPILER.md §4.1): finds the loads of a loop that only feed `dot`
//! operands and whose addresses do not depend on the loop-carried values, and marks them for
//! streaming: codegen copies them with `cp.async` into a ring of `num_stages` shared-memory
//! slots, `num_stages - 1` iterations ahead, and the `dot` reads the current slot with
//! `ldmatrix`. The loads themselves are never executed into registers.
//!
//! A load qualifies when
//! - it sits directly in a `for` body and its value is used only as a `dot` operand (directly or
//!   through `trans`);
//! - its elements are 16-bit and its pointer tile moves 16 bytes per access (the aligned
//!   variant: `cp.async` copies 16-byte chunks; a partial chunk would need the register path);
//! - its fill value is 0 (`cp.async` can only zero-fill);
//! - the pointer and mask are computed in the body from the induction variable, loop-invariant
//!   values and scalar loads (a block list's index) only: no loop-carried value, no tile load.
//!
//! Everything else keeps the register path: load, then stage through shared memory in `dot`.
//!
//! A streamed load whose address does not depend on the induction variable (a flash-attention
//! kernel's query tile, say: written inside the loop so that it is streamed, but the same tile at
//! every iteration) is *resident*: it gets one slot, copied once per execution of the loop, in a
//! commit group of its own before the ring's prologue, and every iteration reads that slot.
//! Streaming it would copy the same tile again each iteration and take `num_stages` slots.

use super::layouts::LayoutPlan;
use crate::ir::{Block, ConstValue, Kernel, Op, ValueId};
use crate::layout::shared::SharedLayout;
use std::collections::{HashMap, HashSet};

/// One streamed load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedLoad {
    /// The load's result (the tile as stored: before any `trans`).
    pub load: ValueId,
    pub ptr: ValueId,
    pub mask: Option<ValueId>,
    /// Layout of one slot.
    pub shared: SharedLayout,
    /// Byte offset of slot 0 (set by the shared-memory plan); slot `s` is at
    /// `offset + s * shared.bytes()`.
    pub offset: usize,
    /// The address is loop-invariant: one slot at `offset`, filled once before the loop's first
    /// iteration and read by every iteration (see the module doc).
    pub resident: bool,
}

impl StagedLoad {
    /// Slots this load takes: 1 when resident, the loop's stages otherwise.
    pub fn slots(&self, stages: usize) -> usize {
        if self.resident {
            1
        } else {
            stages
        }
    }
}

/// One pipelined loop, identified by its induction variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelinedLoop {
    pub iv: ValueId,
    pub stages: usize,
    pub loads: Vec<StagedLoad>,
    /// Values of the body that the copies need (re-emitted for the prefetched iteration).
    pub slice: HashSet<ValueId>,
    /// `dot`s of the body whose result is only carried to the next iteration's `dot` (the
    /// plain K-loop accumulation) and whose operands are both streamed slots. With asynchronous MMAs (`wgmma`) these stay in flight across
    /// the iteration boundary: codegen then waits for all but the last group at the end of
    /// each iteration, prefetches one tile less far ahead so that no slot is overwritten while
    /// an MMA may still read it, and waits for everything after the loop.
    pub async_dots: Vec<ValueId>,
    /// Set when the ring's copies are TMA bulk tensor copies ([`super::tma`]) instead of
    /// `cp.async`.
    pub tma: Option<super::tma::TmaLoop>,
}

/// Every pipelined loop of a kernel.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PipelinePlan {
    pub loops: Vec<PipelinedLoop>,
    /// The tensor maps the TMA loops copy through, in the order the kernel takes them (after
    /// its ordinary parameters, sm_90a only).
    pub maps: Vec<crate::launch::TmaMap>,
    /// The `atomic_add`s the TMA performs as bulk reductions (sm_90a only).
    pub reduces: Vec<super::tma::TmaReduce>,
}

impl PipelinePlan {
    /// The loop whose induction variable is `iv`.
    pub fn for_iv(&self, iv: ValueId) -> Option<&PipelinedLoop> {
        self.loops.iter().find(|l| l.iv == iv)
    }

    /// The streamed load producing `v`, with its loop.
    pub fn staged(&self, v: ValueId) -> Option<(&PipelinedLoop, &StagedLoad)> {
        self.loops
            .iter()
            .find_map(|l| l.loads.iter().find(|s| s.load == v).map(|s| (l, s)))
    }

    /// Text form for snapshots.
    pub fn print(&self) -> String {
        let mut s = String::new();
        for l in &self.loops {
            s.push_str(&format!("pipeline loop %{} stages {}\n", l.iv.0, l.stages));
            for ld in &l.loads {
                s.push_str(&format!(
                    "  {} %{} [{}x{}] swizzle {} slot {} bytes at {}\n",
                    if ld.resident { "resident" } else { "stream" },
                    ld.load.0,
                    ld.shared.rows,
                    ld.shared.cols,
                    ld.shared.swz,
                    ld.shared.bytes(),
                    ld.offset
                ));
            }
            if let Some(t) = &l.tma {
                for o in &t.operands {
                    s.push_str(&format!(
                        "  tma %{} map {} at ({})\n",
                        o.load.0,
                        o.map,
                        starts(&o.start)
                    ));
                }
                s.push_str(&format!("  mbarriers at {}\n", t.barriers));
            }
        }
        for r in &self.reduces {
            s.push_str(&format!(
                "tma reduce %{} map {} at ({}) [{}x{}] swizzle {} at {}\n",
                r.ptr.0,
                r.map,
                starts(&r.start),
                r.shared.rows,
                r.shared.cols,
                r.shared.swz,
                r.offset
            ));
        }
        for (i, m) in self.maps.iter().enumerate() {
            s.push_str(&format!(
                "tensor map {i}: param {} rank {} box {}x{} swizzle {}{}\n",
                m.param,
                m.rank,
                m.box_rows,
                m.box_cols,
                m.swizzle,
                if m.float32 { " f32" } else { "" }
            ));
        }
        s
    }
}

/// A TMA tile start for snapshots: per dimension, its scalars joined by `+` (`0` if none).
fn starts(start: &[Vec<ValueId>]) -> String {
    let at: Vec<String> = start
        .iter()
        .map(|v| {
            if v.is_empty() {
                "0".to_string()
            } else {
                let t: Vec<String> = v.iter().map(|x| format!("%{}", x.0)).collect();
                t.join("+")
            }
        })
        .collect();
    at.join(", ")
}

/// Finds the pipelined loops of `k` (offsets are filled in by the shared-memory plan).
pub fn plan(k: &Kernel, layouts: &LayoutPlan) -> PipelinePlan {
    let mut plan = PipelinePlan::default();
    if k.num_stages < 2 {
        return plan;
    }
    // Users of every value: (user's first result, user op).
    let mut uses: HashMap<ValueId, Vec<(Option<ValueId>, Op)>> = HashMap::new();
    let mut defs: HashMap<ValueId, Op> = HashMap::new();
    k.walk(&mut |i| {
        for o in i.op.operands() {
            uses.entry(o)
                .or_default()
                .push((i.results.first().copied(), i.op.clone()));
        }
        for r in &i.results {
            defs.insert(*r, i.op.clone());
        }
    });
    // `v` is used only as a dot operand, directly or through `trans`.
    fn feeds_dot(v: ValueId, uses: &HashMap<ValueId, Vec<(Option<ValueId>, Op)>>) -> bool {
        let us = uses.get(&v).map(Vec::as_slice).unwrap_or(&[]);
        !us.is_empty()
            && us.iter().all(|(r, op)| match op {
                Op::Dot { a, b, acc } => (*a == v || *b == v) && *acc != v,
                Op::Trans { .. } => r.is_some_and(|t| {
                    uses.get(&t).is_some_and(|u| {
                        !u.is_empty()
                            && u.iter().all(|(_, o)| {
                                matches!(o, Op::Dot { a, b, acc } if (*a == t || *b == t) && *acc != t)
                            })
                    })
                }),
                _ => false,
            })
    }
    walk_loops(&k.body, &mut |body| {
        let iv = body.args[0];
        let carried: HashSet<ValueId> = body.args[1..].iter().copied().collect();
        let local: HashMap<ValueId, &Op> = body
            .insts
            .iter()
            .flat_map(|i| i.results.iter().map(move |r| (*r, &i.op)))
            .collect();
        let mut loads = vec![];
        let mut slice = HashSet::new();
        for inst in &body.insts {
            let Op::Load { ptr, mask, other } = &inst.op else {
                continue;
            };
            let r = inst.results[0];
            let t = k.ty(r);
            if t.rank() != 2 || t.dtype.bytes() != 2 || !feeds_dot(r, &uses) {
                continue;
            }
            if layouts.vec.get(ptr).copied().unwrap_or(1) * 2 != 16 {
                continue;
            }
            let zero_fill = match other {
                None => true,
                Some(o) => {
                    matches!(
                        defs.get(o),
                        Some(Op::Const { value }) if value.as_f64() == 0.0
                    ) || matches!(
                        defs.get(o),
                        Some(Op::Const {
                            value: ConstValue::Int(0)
                        })
                    )
                }
            };
            if !zero_fill {
                continue;
            }
            let mut s = HashSet::new();
            let roots: Vec<ValueId> = std::iter::once(*ptr).chain(*mask).collect();
            let Some(moves) = address_slice(k, &roots, &local, &carried, iv, &mut s) else {
                continue;
            };
            slice.extend(s);
            loads.push(StagedLoad {
                load: r,
                ptr: *ptr,
                mask: *mask,
                shared: SharedLayout::choose(t.shape[0], t.shape[1], 2),
                offset: 0,
                resident: !moves,
            });
        }
        if !loads.is_empty() {
            // Only MMAs that read streamed slots may stay in flight: an operand staged from
            // registers goes through scratch that the next iteration overwrites.
            let streamed = |v: ValueId| {
                let src = crate::passes::smem::dot_source(k, v).0;
                loads.iter().any(|l: &StagedLoad| l.load == src)
            };
            let async_dots = accumulating_dots(body, &uses)
                .into_iter()
                .filter(|d| {
                    body.insts.iter().any(|i| {
                        matches!(&i.op, Op::Dot { a, b, .. }
                            if i.results[0] == *d && streamed(*a) && streamed(*b))
                    })
                })
                .collect();
            plan.loops.push(PipelinedLoop {
                iv,
                stages: k.num_stages,
                loads,
                slice,
                async_dots,
                tma: None,
            });
        }
    });
    plan
}

/// The `dot`s of `body` whose result is used only by the final `yield`, as a carried value used
/// only as that same `dot`'s accumulator.
fn accumulating_dots(
    body: &Block,
    uses: &HashMap<ValueId, Vec<(Option<ValueId>, Op)>>,
) -> Vec<ValueId> {
    let Some(Op::Yield { values }) = body.insts.last().map(|i| &i.op) else {
        return vec![];
    };
    let mut out = vec![];
    for inst in &body.insts {
        let Op::Dot { acc, .. } = &inst.op else {
            continue;
        };
        let r = inst.results[0];
        let Some(j) = values.iter().position(|v| *v == r) else {
            continue;
        };
        let only_yield = uses
            .get(&r)
            .is_some_and(|u| u.len() == 1 && matches!(u[0].1, Op::Yield { .. }));
        let carried = body.args.get(j + 1).copied();
        let acc_only = carried == Some(*acc)
            && uses.get(acc).is_some_and(|u| {
                u.len() == 1 && matches!(u[0].1, Op::Dot { .. }) && u[0].0 == Some(r)
            });
        if only_yield && acc_only && values.iter().filter(|v| **v == r).count() == 1 {
            out.push(r);
        }
    }
    out
}

/// Collects the body-local values `roots` depend on. `None` if any is loop-carried, a tile load
/// or another op that cannot be re-run ahead of time; otherwise whether the address depends on
/// the induction variable `iv` (false: the load is resident).
fn address_slice(
    k: &Kernel,
    roots: &[ValueId],
    local: &HashMap<ValueId, &Op>,
    carried: &HashSet<ValueId>,
    iv: ValueId,
    out: &mut HashSet<ValueId>,
) -> Option<bool> {
    let mut stack: Vec<ValueId> = roots.to_vec();
    let mut moves = false;
    while let Some(v) = stack.pop() {
        if carried.contains(&v) {
            return None;
        }
        if v == iv {
            moves = true;
            continue;
        }
        if out.contains(&v) {
            continue;
        }
        let Some(op) = local.get(&v) else {
            continue; // defined outside the loop: invariant
        };
        match op {
            Op::Load { .. } if k.ty(v).rank() > 0 => return None,
            Op::Dot { .. }
            | Op::For { .. }
            | Op::If { .. }
            | Op::Store { .. }
            | Op::AtomicAdd { .. }
            | Op::ConvertLayout { .. }
            | Op::Reduce { .. } => return None,
            _ => {}
        }
        out.insert(v);
        stack.extend(op.operands());
    }
    Some(moves)
}

fn walk_loops(b: &Block, f: &mut impl FnMut(&Block)) {
    for inst in &b.insts {
        if let Op::For { body, .. } = &inst.op {
            f(body);
        }
        for nb in inst.op.blocks() {
            walk_loops(nb, f);
        }
    }
}
