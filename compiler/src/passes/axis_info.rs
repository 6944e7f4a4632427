//! Axis analysis (COMPILER.md §1.6): for every integer, pointer and mask tile, per dimension,
//! the length of runs of +1 steps (`contig`), the largest power of two dividing the first
//! value of every run (`div`; bytes for pointers), and the length of runs of equal values
//! (`cst`). The layout pass reads these facts to pick vector widths that are provably
//! contiguous, aligned and uniformly masked.

use crate::dtype::DType;
use crate::ir::{BinOp, Block, CmpPred, ConstValue, Kernel, Op, ValueId};
use std::collections::HashMap;

/// Facts about one value, per dimension (one entry for a scalar).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AxisInfo {
    pub contig: Vec<u64>,
    pub div: Vec<u64>,
    pub cst: Vec<u64>,
}

/// The largest divisor tracked.
pub const MAX_DIV: u64 = 1 << 30;

fn pow2_div(x: i64) -> u64 {
    if x == 0 {
        MAX_DIV
    } else {
        (1u64 << x.unsigned_abs().trailing_zeros()).min(MAX_DIV)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl AxisInfo {
    fn unknown(n: usize) -> AxisInfo {
        AxisInfo {
            contig: vec![1; n],
            div: vec![1; n],
            cst: vec![1; n],
        }
    }
    fn uniform(shape: &[usize], div: u64) -> AxisInfo {
        let n = shape.len().max(1);
        AxisInfo {
            contig: vec![1; n],
            div: vec![div; n],
            cst: if shape.is_empty() {
                vec![1]
            } else {
                shape.iter().map(|d| *d as u64).collect()
            },
        }
    }
}

/// Runs the analysis over the whole kernel.
pub fn analyze(k: &Kernel) -> HashMap<ValueId, AxisInfo> {
    let mut info = HashMap::new();
    for a in &k.args {
        info.insert(
            a.value,
            AxisInfo {
                contig: vec![1],
                div: vec![a.div.max(1)],
                cst: vec![1],
            },
        );
    }
    block(k, &k.body, &mut info);
    info
}

fn block(k: &Kernel, b: &Block, info: &mut HashMap<ValueId, AxisInfo>) {
    for inst in &b.insts {
        for nb in inst.op.blocks() {
            for a in &nb.args {
                let ty = k.ty(*a);
                info.insert(*a, AxisInfo::unknown(ty.rank().max(1)));
            }
            // The induction variable is `lo + i*step`: divisible by what divides both.
            if let Op::For { lo, step, .. } = &inst.op {
                let d = |v: &ValueId| info.get(v).map(|i| i.div[0]).unwrap_or(1);
                let div = gcd(d(lo), d(step));
                info.insert(
                    nb.args[0],
                    AxisInfo {
                        contig: vec![1],
                        div: vec![div],
                        cst: vec![1],
                    },
                );
            }
            block(k, nb, info);
        }
        let Some(&res) = inst.results.first() else {
            continue;
        };
        let ty = k.ty(res);
        let n = ty.rank().max(1);
        let get = |v: &ValueId| {
            info.get(v)
                .cloned()
                .unwrap_or_else(|| AxisInfo::unknown(k.ty(*v).rank().max(1)))
        };
        let r = match &inst.op {
            Op::Range { n } => AxisInfo {
                contig: vec![*n as u64],
                div: vec![MAX_DIV],
                cst: vec![1],
            },
            Op::Const { value } => {
                let d = match value {
                    ConstValue::Int(i) => pow2_div(*i),
                    ConstValue::Float(_) => 1,
                };
                AxisInfo::uniform(&ty.shape, d)
            }
            Op::ProgramId { .. } => AxisInfo::uniform(&[], 1),
            Op::Splat { src } => AxisInfo::uniform(&ty.shape, get(src).div[0]),
            // The same values, elsewhere.
            Op::ConvertLayout { src } => get(src),
            Op::ExpandDims { src, axis } => {
                let mut s = get(src);
                if k.ty(*src).rank() == 0 {
                    s = AxisInfo::unknown(0);
                }
                s.contig.insert(*axis, 1);
                s.div.insert(*axis, *s.div.first().unwrap_or(&1));
                s.cst.insert(*axis, 1);
                s
            }
            Op::Broadcast { src } => {
                let mut s = get(src);
                let sshape = &k.ty(*src).shape;
                for d in 0..n {
                    if sshape[d] == 1 && ty.shape[d] != 1 {
                        s.contig[d] = 1;
                        s.cst[d] = ty.shape[d] as u64;
                    }
                }
                s
            }
            Op::Cast { src } => {
                let s = get(src);
                if ty.dtype.is_int() {
                    s
                } else {
                    AxisInfo::unknown(n)
                }
            }
            Op::Binary { op, lhs, rhs } => {
                let (a, b) = (get(lhs), get(rhs));
                let mut r = AxisInfo::unknown(n);
                for d in 0..n {
                    match op {
                        BinOp::Add => {
                            r.contig[d] =
                                gcd(a.contig[d], b.cst[d]).max(gcd(b.contig[d], a.cst[d]));
                            r.div[d] = gcd(a.div[d], b.div[d]);
                            r.cst[d] = gcd(a.cst[d], b.cst[d]);
                        }
                        BinOp::Sub => {
                            r.contig[d] = gcd(a.contig[d], b.cst[d]);
                            r.div[d] = gcd(a.div[d], b.div[d]);
                            r.cst[d] = gcd(a.cst[d], b.cst[d]);
                        }
                        BinOp::Mul => {
                            r.div[d] = (a.div[d].saturating_mul(b.div[d])).min(MAX_DIV);
                            r.cst[d] = gcd(a.cst[d], b.cst[d]);
                        }
                        BinOp::And | BinOp::Or | BinOp::Max | BinOp::Min => {
                            r.cst[d] = gcd(a.cst[d], b.cst[d]);
                        }
                        BinOp::Div | BinOp::Rem => {}
                    }
                }
                r
            }
            Op::Cmp { pred, lhs, rhs } => {
                let (a, b) = (get(lhs), get(rhs));
                let mut r = AxisInfo::unknown(n);
                for d in 0..n {
                    // `x < y` is uniform over runs where x is constant, or over aligned pieces of a
                    // contiguous run of x when y is constant there and aligned.
                    let from_contig = if matches!(pred, CmpPred::Lt | CmpPred::Ge) {
                        gcd(a.contig[d], gcd(a.div[d], b.div[d])).min(b.cst[d])
                    } else {
                        1
                    };
                    r.cst[d] = gcd(a.cst[d], b.cst[d]).max(from_contig);
                }
                r
            }
            Op::Select { cond, a, b } => {
                let (c, x, y) = (get(cond), get(a), get(b));
                let mut r = AxisInfo::unknown(n);
                for d in 0..n {
                    r.cst[d] = gcd(c.cst[d], gcd(x.cst[d], y.cst[d]));
                }
                r
            }
            Op::AddPtr { ptr, offset } => {
                let (p, o) = (get(ptr), get(offset));
                let elem = match ty.dtype {
                    DType::Ptr(s) => s.bytes() as u64,
                    _ => 1,
                };
                let mut r = AxisInfo::unknown(n);
                for d in 0..n {
                    r.contig[d] = o.contig[d];
                    r.div[d] = gcd(p.div[d], o.div[d].saturating_mul(elem).min(MAX_DIV));
                    r.cst[d] = gcd(p.cst[d], o.cst[d]);
                }
                r
            }
            _ => AxisInfo::unknown(n),
        };
        info.insert(res, r);
    }
}
