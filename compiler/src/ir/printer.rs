//! Deterministic text form of tile IR.
//!
//! Values are renumbered `%0, %1, ..` in definition order (arguments first), so two kernels that
//! differ only in value numbering print the same. An optional annotation callback appends a
//! `// ...` comment to the line defining a value (the layout pass prints layouts this way); the
//! parser ignores comments.

use super::{BinOp, Block, CmpPred, ConstValue, Kernel, Op, ReduceKind, UnOp, ValueId};
use std::collections::HashMap;
use std::fmt::Write;

/// Prints `kernel` without annotations.
pub fn print(kernel: &Kernel) -> String {
    print_annotated(kernel, &|_| None)
}

/// Prints `kernel`, appending `// note` to lines whose first result `note` returns `Some` for.
pub fn print_annotated(kernel: &Kernel, note: &dyn Fn(ValueId) -> Option<String>) -> String {
    let mut p = Printer {
        kernel,
        names: HashMap::new(),
        out: String::new(),
        note,
    };
    p.kernel_header();
    p.block_body(&kernel.body, 1);
    p.out.push_str("}\n");
    p.out
}

struct Printer<'a> {
    kernel: &'a Kernel,
    names: HashMap<ValueId, usize>,
    out: String,
    note: &'a dyn Fn(ValueId) -> Option<String>,
}

/// IR spelling of a binary op.
pub fn binop_name(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "add",
        BinOp::Sub => "sub",
        BinOp::Mul => "mul",
        BinOp::Div => "div",
        BinOp::Rem => "rem",
        BinOp::Max => "max",
        BinOp::Min => "min",
        BinOp::And => "and",
        BinOp::Or => "or",
    }
}

/// IR spelling of a unary op.
pub fn unop_name(op: UnOp) -> &'static str {
    match op {
        UnOp::Neg => "neg",
        UnOp::Not => "not",
        UnOp::Abs => "abs",
        UnOp::Exp => "exp",
        UnOp::Exp2 => "exp2",
        UnOp::Log => "log",
        UnOp::Log2 => "log2",
        UnOp::Sqrt => "sqrt",
        UnOp::Rsqrt => "rsqrt",
        UnOp::Tanh => "tanh",
    }
}

/// IR spelling of a comparison.
pub fn pred_name(p: CmpPred) -> &'static str {
    match p {
        CmpPred::Lt => "lt",
        CmpPred::Le => "le",
        CmpPred::Gt => "gt",
        CmpPred::Ge => "ge",
        CmpPred::Eq => "eq",
        CmpPred::Ne => "ne",
    }
}

/// IR spelling of a reduction.
pub fn reduce_name(k: ReduceKind) -> &'static str {
    match k {
        ReduceKind::Sum => "sum",
        ReduceKind::Max => "max",
        ReduceKind::Min => "min",
    }
}

/// IR spelling of a constant (floats keep a `.` or exponent; infinities as `inf`/`-inf`).
pub fn const_text(v: ConstValue) -> String {
    match v {
        ConstValue::Int(i) => i.to_string(),
        ConstValue::Float(x) if x.is_nan() => "nan".into(),
        ConstValue::Float(x) if x.is_infinite() => {
            if x > 0.0 {
                "inf".into()
            } else {
                "-inf".into()
            }
        }
        ConstValue::Float(x) => format!("{x:?}"),
    }
}

impl Printer<'_> {
    fn def(&mut self, v: ValueId) -> String {
        let n = self.names.len();
        self.names.insert(v, n);
        format!("%{n}")
    }

    fn v(&self, v: ValueId) -> String {
        match self.names.get(&v) {
            Some(n) => format!("%{n}"),
            None => format!("%undef{}", v.0),
        }
    }

    fn kernel_header(&mut self) {
        let mut args = vec![];
        for a in &self.kernel.args {
            let name = self.def(a.value);
            let ty = self.kernel.ty(a.value);
            let div = if a.div > 1 {
                format!(" div {}", a.div)
            } else {
                String::new()
            };
            args.push(format!("{name}: {ty} \"{}\"{div}", a.name));
        }
        let stages = if self.kernel.num_stages > 1 {
            format!(" stages {}", self.kernel.num_stages)
        } else {
            String::new()
        };
        let tma = if self.kernel.tma { " tma" } else { "" };
        let pingpong = if self.kernel.pingpong {
            " pingpong"
        } else {
            ""
        };
        let ctas = if self.kernel.min_ctas > 1 {
            format!(" ctas {}", self.kernel.min_ctas)
        } else {
            String::new()
        };
        let _ = writeln!(
            self.out,
            "kernel @{}({}) warps {}{stages}{tma}{pingpong}{ctas} {{",
            self.kernel.name,
            args.join(", "),
            self.kernel.num_warps
        );
    }

    fn indent(&mut self, depth: usize) {
        for _ in 0..depth {
            self.out.push_str("  ");
        }
    }

    fn block_body(&mut self, block: &Block, depth: usize) {
        for inst in &block.insts {
            self.indent(depth);
            let results: Vec<String> = inst.results.iter().map(|r| self.def(*r)).collect();
            let lhs = if results.is_empty() {
                String::new()
            } else {
                format!("{} = ", results.join(", "))
            };
            let ty = inst
                .results
                .first()
                .map(|r| self.kernel.ty(*r).to_string())
                .unwrap_or_default();
            let line = match &inst.op {
                Op::ProgramId { axis } => format!("{lhs}program_id {axis} : {ty}"),
                Op::Const { value } => format!("{lhs}const {} : {ty}", const_text(*value)),
                Op::Range { n } => format!("{lhs}range {n} : {ty}"),
                Op::Splat { src } => format!("{lhs}splat {} : {ty}", self.v(*src)),
                Op::ExpandDims { src, axis } => {
                    format!("{lhs}expand_dims {}, {axis} : {ty}", self.v(*src))
                }
                Op::ConvertLayout { src } => format!("{lhs}convert {} : {ty}", self.v(*src)),
                Op::Broadcast { src } => format!("{lhs}broadcast {} : {ty}", self.v(*src)),
                Op::Binary { op, lhs: a, rhs: b } => {
                    format!(
                        "{lhs}{} {}, {} : {ty}",
                        binop_name(*op),
                        self.v(*a),
                        self.v(*b)
                    )
                }
                Op::Cmp {
                    pred,
                    lhs: a,
                    rhs: b,
                } => {
                    format!(
                        "{lhs}cmp {} {}, {} : {ty}",
                        pred_name(*pred),
                        self.v(*a),
                        self.v(*b)
                    )
                }
                Op::Unary { op, src } => format!("{lhs}{} {} : {ty}", unop_name(*op), self.v(*src)),
                Op::Select { cond, a, b } => {
                    format!(
                        "{lhs}select {}, {}, {} : {ty}",
                        self.v(*cond),
                        self.v(*a),
                        self.v(*b)
                    )
                }
                Op::Cast { src } => format!("{lhs}cast {} : {ty}", self.v(*src)),
                Op::Trans { src } => format!("{lhs}trans {} : {ty}", self.v(*src)),
                Op::Dot { a, b, acc } => format!(
                    "{lhs}dot {}, {}, {} : {ty}",
                    self.v(*a),
                    self.v(*b),
                    self.v(*acc)
                ),
                Op::AddPtr { ptr, offset } => {
                    format!("{lhs}addptr {}, {} : {ty}", self.v(*ptr), self.v(*offset))
                }
                Op::Load { ptr, mask, other } => {
                    let mut s = format!("{lhs}load {}", self.v(*ptr));
                    if let Some(m) = mask {
                        let _ = write!(s, " mask {}", self.v(*m));
                    }
                    if let Some(o) = other {
                        let _ = write!(s, " other {}", self.v(*o));
                    }
                    format!("{s} : {ty}")
                }
                Op::Store { ptr, value, mask } | Op::AtomicAdd { ptr, value, mask } => {
                    let name = if matches!(inst.op, Op::Store { .. }) {
                        "store"
                    } else {
                        "atomic_add"
                    };
                    let mut s = format!("{name} {}, {}", self.v(*ptr), self.v(*value));
                    if let Some(m) = mask {
                        let _ = write!(s, " mask {}", self.v(*m));
                    }
                    s
                }
                Op::Reduce { src, axis, kind } => {
                    format!(
                        "{lhs}reduce {} {}, {axis} : {ty}",
                        reduce_name(*kind),
                        self.v(*src)
                    )
                }
                Op::Yield { values } => {
                    let vs: Vec<String> = values.iter().map(|v| self.v(*v)).collect();
                    if vs.is_empty() {
                        "yield".to_string()
                    } else {
                        format!("yield {}", vs.join(", "))
                    }
                }
                Op::Return => "return".to_string(),
                Op::For {
                    lo,
                    hi,
                    step,
                    inits,
                    body,
                } => {
                    let iv = self.def(body.args[0]);
                    let mut s = format!(
                        "{lhs}for {iv} = {} to {} step {}",
                        self.v(*lo),
                        self.v(*hi),
                        self.v(*step)
                    );
                    if !inits.is_empty() {
                        let carried: Vec<String> = body.args[1..]
                            .iter()
                            .zip(inits)
                            .map(|(a, i)| {
                                let init = self.v(*i);
                                format!("{} = {init}", self.def(*a))
                            })
                            .collect();
                        let _ = write!(s, " iter({})", carried.join(", "));
                        let tys: Vec<String> = inst
                            .results
                            .iter()
                            .map(|r| self.kernel.ty(*r).to_string())
                            .collect();
                        let _ = write!(s, " : {}", tys.join(", "));
                    }
                    self.out.push_str(&s);
                    self.out.push_str(" {\n");
                    self.block_body(body, depth + 1);
                    self.indent(depth);
                    self.out.push_str("}\n");
                    continue;
                }
                Op::If {
                    cond,
                    then_block,
                    else_block,
                } => {
                    let mut s = format!("{lhs}if {}", self.v(*cond));
                    if !inst.results.is_empty() {
                        let tys: Vec<String> = inst
                            .results
                            .iter()
                            .map(|r| self.kernel.ty(*r).to_string())
                            .collect();
                        let _ = write!(s, " : {}", tys.join(", "));
                    }
                    self.out.push_str(&s);
                    self.out.push_str(" {\n");
                    self.block_body(then_block, depth + 1);
                    self.indent(depth);
                    self.out.push_str("} else {\n");
                    self.block_body(else_block, depth + 1);
                    self.indent(depth);
                    self.out.push_str("}\n");
                    continue;
                }
            };
            self.out.push_str(&line);
            if let Some(n) = inst.results.first().and_then(|r| (self.note)(*r)) {
                let _ = write!(self.out, "  // {n}");
            }
            self.out.push('\n');
        }
    }
}
