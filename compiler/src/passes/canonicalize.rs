//! Canonicalisation: constant folding, common-subexpression elimination, dead-code elimination
//! and loop-invariant code motion.
//!
//! The macro emits straightforward IR (every `x.load([rows, cols])` rebuilds its offsets and
//! bounds masks, every literal is its own constant); this pass makes it small and regular before
//! layouts are chosen, so that the analyses and the generated code see each fact once.

use crate::dtype::DType;
use crate::ir::{BinOp, Block, CmpPred, ConstValue, Inst, Kernel, Op, UnOp, ValueId};
use std::collections::{HashMap, HashSet};

/// Runs all canonicalisations until nothing changes (at most a few rounds).
pub fn canonicalize(k: &mut Kernel) {
    for _ in 0..4 {
        let before = crate::ir::printer::print(k);
        fold_constants(k);
        cse(k);
        licm(k);
        dce(k);
        if crate::ir::printer::print(k) == before {
            break;
        }
    }
}

fn substitute(block: &mut Block, subst: &HashMap<ValueId, ValueId>) {
    if subst.is_empty() {
        return;
    }
    for inst in &mut block.insts {
        inst.op.map_operands(&mut |v| *subst.get(&v).unwrap_or(&v));
        for b in inst.op.blocks_mut() {
            substitute(b, subst);
        }
    }
}

/// Evaluates ops whose operands are constants, and simplifies `x + 0`, `x * 1`, `x - 0`,
/// `x / 1`, casts to the same type and selects on a constant condition.
pub fn fold_constants(k: &mut Kernel) {
    let mut consts: HashMap<ValueId, ConstValue> = HashMap::new();
    let mut subst = HashMap::new();
    let types = k.types.clone();
    fold_block(&mut k.body, &types, &mut consts, &mut subst);
    substitute(&mut k.body, &subst);
}

fn fold_block(
    block: &mut Block,
    types: &[crate::ir::Type],
    consts: &mut HashMap<ValueId, ConstValue>,
    subst: &mut HashMap<ValueId, ValueId>,
) {
    for inst in &mut block.insts {
        inst.op.map_operands(&mut |v| *subst.get(&v).unwrap_or(&v));
        for b in inst.op.blocks_mut() {
            fold_block(b, types, consts, subst);
        }
        let Some(&res) = inst.results.first() else {
            continue;
        };
        let rty = &types[res.0 as usize];
        let c = |v: &ValueId| consts.get(v).copied();
        let folded: Option<ConstValue> = match &inst.op {
            Op::Const { value } => {
                consts.insert(res, *value);
                None
            }
            Op::Splat { src } | Op::Broadcast { src } | Op::ExpandDims { src, .. } => c(src),
            Op::Cast { src } => c(src).map(|v| cast_const(v, rty.dtype)),
            Op::Unary { op, src } => c(src).and_then(|v| fold_unary(*op, v, rty.dtype)),
            Op::Binary { op, lhs, rhs } => {
                match (c(lhs), c(rhs)) {
                    (Some(a), Some(b)) => fold_binary(*op, a, b, rty.dtype),
                    (a, b) => {
                        // Identities: keep the other operand.
                        let is = |x: Option<ConstValue>, v: f64| {
                            x.map(|x| x.as_f64() == v).unwrap_or(false)
                        };
                        let keep = match op {
                            BinOp::Add if is(b, 0.0) => Some(*lhs),
                            BinOp::Add if is(a, 0.0) => Some(*rhs),
                            BinOp::Sub if is(b, 0.0) => Some(*lhs),
                            BinOp::Mul if is(b, 1.0) => Some(*lhs),
                            BinOp::Mul if is(a, 1.0) => Some(*rhs),
                            BinOp::Div if is(b, 1.0) => Some(*lhs),
                            _ => None,
                        };
                        if let Some(v) = keep {
                            subst.insert(res, v);
                        }
                        None
                    }
                }
            }
            Op::Cmp { pred, lhs, rhs } => match (c(lhs), c(rhs)) {
                (Some(a), Some(b)) => Some(ConstValue::Int(fold_cmp(*pred, a, b) as i64)),
                _ => None,
            },
            Op::Select { cond, a, b } => {
                if let Some(cv) = c(cond) {
                    subst.insert(res, if cv.as_f64() != 0.0 { *a } else { *b });
                }
                None
            }
            _ => None,
        };
        if let Some(v) = folded {
            inst.op = Op::Const { value: v };
            consts.insert(res, v);
        }
    }
}

fn cast_const(v: ConstValue, to: DType) -> ConstValue {
    match to {
        DType::I1 => ConstValue::Int((v.as_f64() != 0.0) as i64),
        DType::I32 => ConstValue::Int(v.as_f64() as i64 as i32 as i64),
        DType::I64 => ConstValue::Int(v.as_f64() as i64),
        DType::F32 | DType::F16 | DType::BF16 => {
            ConstValue::Float(crate::dtype::round_to(to, v.as_f64() as f32) as f64)
        }
        DType::Ptr(_) => v,
    }
}

fn fold_unary(op: UnOp, v: ConstValue, dtype: DType) -> Option<ConstValue> {
    match (op, v) {
        (UnOp::Neg, ConstValue::Int(i)) => Some(ConstValue::Int(i.wrapping_neg())),
        (UnOp::Neg, ConstValue::Float(x)) => Some(ConstValue::Float(-x)),
        (UnOp::Not, ConstValue::Int(i)) => Some(ConstValue::Int((i == 0) as i64)),
        (UnOp::Abs, ConstValue::Int(i)) => Some(ConstValue::Int(i.wrapping_abs())),
        (UnOp::Abs, ConstValue::Float(x)) => Some(ConstValue::Float(x.abs())),
        // Transcendentals are left to the target: the GPU's approximations and the
        // interpreter's must see the same inputs.
        _ => {
            let _ = dtype;
            None
        }
    }
}

fn fold_binary(op: BinOp, a: ConstValue, b: ConstValue, dtype: DType) -> Option<ConstValue> {
    use ConstValue::*;
    let r = match (a, b) {
        (Int(x), Int(y)) => Int(match op {
            BinOp::Add => x.wrapping_add(y),
            BinOp::Sub => x.wrapping_sub(y),
            BinOp::Mul => x.wrapping_mul(y),
            BinOp::Div if y != 0 => x.wrapping_div(y),
            BinOp::Rem if y != 0 => x.wrapping_rem(y),
            BinOp::Max => x.max(y),
            BinOp::Min => x.min(y),
            BinOp::And => x & y,
            BinOp::Or => x | y,
            _ => return None,
        }),
        _ => {
            let (x, y) = (a.as_f64() as f32, b.as_f64() as f32);
            Float(match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div => x / y,
                BinOp::Max => x.max(y),
                BinOp::Min => x.min(y),
                _ => return None,
            } as f64)
        }
    };
    Some(cast_const(r, dtype))
}

fn fold_cmp(p: CmpPred, a: ConstValue, b: ConstValue) -> bool {
    let (x, y) = (a.as_f64(), b.as_f64());
    match p {
        CmpPred::Lt => x < y,
        CmpPred::Le => x <= y,
        CmpPred::Gt => x > y,
        CmpPred::Ge => x >= y,
        CmpPred::Eq => x == y,
        CmpPred::Ne => x != y,
    }
}

/// Replaces a pure op by an earlier identical one that dominates it.
pub fn cse(k: &mut Kernel) {
    let mut subst = HashMap::new();
    let types = k.types.clone();
    cse_block(&mut k.body, &types, &mut HashMap::new(), &mut subst);
    substitute(&mut k.body, &subst);
}

fn cse_block(
    block: &mut Block,
    types: &[crate::ir::Type],
    seen: &mut HashMap<String, ValueId>,
    subst: &mut HashMap<ValueId, ValueId>,
) {
    for inst in &mut block.insts {
        inst.op.map_operands(&mut |v| *subst.get(&v).unwrap_or(&v));
        if inst.op.is_pure() && inst.results.len() == 1 {
            let r = inst.results[0];
            let key = format!("{:?} {}", inst.op, types[r.0 as usize]);
            match seen.get(&key) {
                Some(prev) => {
                    subst.insert(r, *prev);
                }
                None => {
                    seen.insert(key, r);
                }
            }
        }
        for b in inst.op.blocks_mut() {
            // Values defined inside a nested block do not dominate what follows it.
            let mut inner = seen.clone();
            cse_block(b, types, &mut inner, subst);
        }
    }
}

/// Removes pure ops whose results are never used.
pub fn dce(k: &mut Kernel) {
    loop {
        let mut used = HashSet::new();
        collect_uses(&k.body, &mut used);
        let mut removed = false;
        remove_dead(&mut k.body, &used, &mut removed);
        if !removed {
            break;
        }
    }
}

fn collect_uses(b: &Block, used: &mut HashSet<ValueId>) {
    for inst in &b.insts {
        used.extend(inst.op.operands());
        for nb in inst.op.blocks() {
            collect_uses(nb, used);
        }
    }
}

fn remove_dead(b: &mut Block, used: &HashSet<ValueId>, removed: &mut bool) {
    let before = b.insts.len();
    b.insts.retain(|i| {
        !(i.op.is_pure() && !i.results.is_empty() && i.results.iter().all(|r| !used.contains(r)))
    });
    *removed |= b.insts.len() != before;
    for inst in &mut b.insts {
        for nb in inst.op.blocks_mut() {
            remove_dead(nb, used, removed);
        }
    }
}

/// Hoists pure ops out of `for` bodies when all their operands are defined outside the loop.
pub fn licm(k: &mut Kernel) {
    hoist_in_block(&mut k.body);
}

fn hoist_in_block(block: &mut Block) {
    let mut out: Vec<Inst> = Vec::with_capacity(block.insts.len());
    for mut inst in std::mem::take(&mut block.insts) {
        for b in inst.op.blocks_mut() {
            hoist_in_block(b);
        }
        if let Op::For { body, .. } = &mut inst.op {
            let mut inside: HashSet<ValueId> = body.args.iter().copied().collect();
            let mut kept = vec![];
            for bi in std::mem::take(&mut body.insts) {
                let invariant = bi.op.is_pure()
                    && bi.op.blocks().is_empty()
                    && bi.op.operands().iter().all(|v| !inside.contains(v));
                if invariant {
                    out.push(bi);
                } else {
                    inside.extend(bi.results.iter().copied());
                    defined_in(&bi, &mut inside);
                    kept.push(bi);
                }
            }
            body.insts = kept;
        }
        out.push(inst);
    }
    block.insts = out;
}

fn defined_in(inst: &Inst, set: &mut HashSet<ValueId>) {
    for b in inst.op.blocks() {
        set.extend(b.args.iter().copied());
        for i in &b.insts {
            set.extend(i.results.iter().copied());
            defined_in(i, set);
        }
    }
}
