//! Parser for the text form of tile IR (the inverse of [`super::printer`]).
//!
//! Tests start from small IR texts; the generated interpreter entry of every kernel parses its
//! embedded IR. Everything after `//` on a line is a comment. Errors name the line.

use super::{
    BinOp, Block, Builder, CmpPred, ConstValue, IrError, Kernel, Op, ReduceKind, Type, UnOp,
    ValueId,
};
use crate::dtype::DType;
use std::collections::HashMap;

/// Parses one kernel.
pub fn parse(text: &str) -> Result<Kernel, IrError> {
    let lines: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("").trim().to_string()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let mut p = Parser {
        lines,
        pos: 0,
        names: HashMap::new(),
        b: Builder::new("", 1),
    };
    p.header()?;
    p.block_until_close()?;
    if p.pos != p.lines.len() {
        return Err(p.err("text after the kernel's closing `}`"));
    }
    p.b.finish()
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Val(String),
    Word(String),
    Str(String),
    Punct(char),
}

fn lex(line: &str) -> Result<Vec<Tok>, String> {
    let cs: Vec<char> = line.chars().collect();
    let mut i = 0;
    let mut out = vec![];
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '%' {
            let s = i + 1;
            i += 1;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_') {
                i += 1;
            }
            out.push(Tok::Val(cs[s..i].iter().collect()));
        } else if c == '"' {
            let s = i + 1;
            i += 1;
            while i < cs.len() && cs[i] != '"' {
                i += 1;
            }
            out.push(Tok::Str(cs[s..i].iter().collect()));
            i += 1;
        } else if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' || c == '<' {
            let s = i;
            let mut depth = 0;
            while i < cs.len() {
                let d = cs[i];
                if d == '<' {
                    depth += 1;
                } else if d == '>' && depth > 0 {
                    depth -= 1;
                } else if !(d.is_alphanumeric() || d == '_' || d == '-' || d == '.' || d == '+') {
                    break;
                }
                i += 1;
            }
            out.push(Tok::Word(cs[s..i].iter().collect()));
        } else if "(),:={}[]@".contains(c) {
            out.push(Tok::Punct(c));
            i += 1;
        } else {
            return Err(format!("unexpected character `{c}`"));
        }
    }
    Ok(out)
}

struct Parser {
    lines: Vec<(usize, String)>,
    pos: usize,
    names: HashMap<String, ValueId>,
    b: Builder,
}

struct Line {
    toks: Vec<Tok>,
    i: usize,
}

impl Line {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i)
    }
    fn next(&mut self) -> Result<Tok, String> {
        let t = self
            .toks
            .get(self.i)
            .cloned()
            .ok_or("unexpected end of line")?;
        self.i += 1;
        Ok(t)
    }
    fn word(&mut self) -> Result<String, String> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => Err(format!("expected a word, found {t:?}")),
        }
    }
    fn val(&mut self) -> Result<String, String> {
        match self.next()? {
            Tok::Val(v) => Ok(v),
            t => Err(format!("expected a %value, found {t:?}")),
        }
    }
    fn punct(&mut self, c: char) -> Result<(), String> {
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            t => Err(format!("expected `{c}`, found {t:?}")),
        }
    }
    fn eat_punct(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn eat_word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Word(x)) if x == w) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn int(&mut self) -> Result<usize, String> {
        let w = self.word()?;
        w.parse()
            .map_err(|_| format!("expected an integer, found `{w}`"))
    }
    fn ty(&mut self) -> Result<Type, String> {
        let w = self.word()?;
        let dtype = DType::parse(&w).ok_or(format!("unknown dtype `{w}`"))?;
        let mut shape = vec![];
        if self.eat_punct('[') {
            loop {
                shape.push(self.int()?);
                if self.eat_punct(']') {
                    break;
                }
                self.punct(',')?;
            }
        }
        Ok(Type { dtype, shape })
    }
    fn types(&mut self) -> Result<Vec<Type>, String> {
        let mut v = vec![self.ty()?];
        while self.eat_punct(',') {
            v.push(self.ty()?);
        }
        Ok(v)
    }
    fn done(&self) -> Result<(), String> {
        match self.peek() {
            None => Ok(()),
            Some(t) => Err(format!("unexpected {t:?} at end of line")),
        }
    }
}

fn binop(w: &str) -> Option<BinOp> {
    Some(match w {
        "add" => BinOp::Add,
        "sub" => BinOp::Sub,
        "mul" => BinOp::Mul,
        "div" => BinOp::Div,
        "rem" => BinOp::Rem,
        "max" => BinOp::Max,
        "min" => BinOp::Min,
        "and" => BinOp::And,
        "or" => BinOp::Or,
        _ => return None,
    })
}

fn unop(w: &str) -> Option<UnOp> {
    Some(match w {
        "neg" => UnOp::Neg,
        "not" => UnOp::Not,
        "abs" => UnOp::Abs,
        "exp" => UnOp::Exp,
        "exp2" => UnOp::Exp2,
        "log" => UnOp::Log,
        "log2" => UnOp::Log2,
        "sqrt" => UnOp::Sqrt,
        "rsqrt" => UnOp::Rsqrt,
        "tanh" => UnOp::Tanh,
        _ => return None,
    })
}

fn pred(w: &str) -> Option<CmpPred> {
    Some(match w {
        "lt" => CmpPred::Lt,
        "le" => CmpPred::Le,
        "gt" => CmpPred::Gt,
        "ge" => CmpPred::Ge,
        "eq" => CmpPred::Eq,
        "ne" => CmpPred::Ne,
        _ => return None,
    })
}

fn parse_const(w: &str) -> Result<ConstValue, String> {
    if let Ok(i) = w.parse::<i64>() {
        return Ok(ConstValue::Int(i));
    }
    match w {
        "inf" => Ok(ConstValue::Float(f64::INFINITY)),
        "-inf" => Ok(ConstValue::Float(f64::NEG_INFINITY)),
        "nan" => Ok(ConstValue::Float(f64::NAN)),
        _ => w
            .parse::<f64>()
            .map(ConstValue::Float)
            .map_err(|_| format!("bad constant `{w}`")),
    }
}

impl Parser {
    fn err(&self, msg: &str) -> IrError {
        let line = self
            .lines
            .get(self.pos.min(self.lines.len().saturating_sub(1)))
            .map(|l| l.0)
            .unwrap_or(0);
        IrError(format!("IR line {line}: {msg}"))
    }

    fn line(&self) -> Result<Line, IrError> {
        let (_, text) = self
            .lines
            .get(self.pos)
            .ok_or_else(|| self.err("unexpected end of input"))?;
        lex(text)
            .map(|toks| Line { toks, i: 0 })
            .map_err(|e| self.err(&e))
    }

    fn get(&self, name: &str) -> Result<ValueId, String> {
        self.names
            .get(name)
            .copied()
            .ok_or(format!("use of undefined value %{name}"))
    }

    fn header(&mut self) -> Result<(), IrError> {
        let mut l = self.line()?;
        let r: Result<(), String> = (|| {
            if l.word()? != "kernel" {
                return Err("expected `kernel`".into());
            }
            l.punct('@')?;
            let name = l.word()?;
            let mut args = vec![];
            l.punct('(')?;
            if !l.eat_punct(')') {
                loop {
                    let v = l.val()?;
                    l.punct(':')?;
                    let ty = l.ty()?;
                    let aname = match l.next()? {
                        Tok::Str(s) => s,
                        t => return Err(format!("expected the argument's \"name\", found {t:?}")),
                    };
                    let div = if l.eat_word("div") {
                        l.int()? as u64
                    } else {
                        1
                    };
                    args.push((v, ty, aname, div));
                    if l.eat_punct(')') {
                        break;
                    }
                    l.punct(',')?;
                }
            }
            if !l.eat_word("warps") {
                return Err("expected `warps N`".into());
            }
            let warps = l.int()?;
            let stages = if l.eat_word("stages") { l.int()? } else { 1 };
            let tma = l.eat_word("tma");
            let pingpong = l.eat_word("pingpong");
            let ctas = if l.eat_word("ctas") { l.int()? } else { 1 };
            l.punct('{')?;
            l.done()?;
            self.b = Builder::new(&name, warps);
            self.b.set_stages(stages);
            self.b.set_tma(tma);
            self.b.set_pingpong(pingpong);
            self.b.set_min_ctas(ctas);
            for (v, ty, aname, div) in args {
                if !ty.shape.is_empty() {
                    return Err(format!("argument {aname} must be a scalar"));
                }
                let id = self.b.arg(&aname, ty.dtype, div);
                self.names.insert(v, id);
            }
            Ok(())
        })();
        r.map_err(|e| self.err(&e))?;
        self.pos += 1;
        Ok(())
    }

    /// Parses instructions into the builder's current block up to a line `}` or `} else {`,
    /// which is left unconsumed... consumed: returns whether it was `} else {`.
    fn block_until_close(&mut self) -> Result<bool, IrError> {
        loop {
            let (_, text) = self
                .lines
                .get(self.pos)
                .cloned()
                .ok_or_else(|| self.err("missing `}`"))?;
            if text == "}" {
                self.pos += 1;
                return Ok(false);
            }
            if text == "} else {" {
                self.pos += 1;
                return Ok(true);
            }
            self.inst()?;
        }
    }

    fn inst(&mut self) -> Result<(), IrError> {
        let mut l = self.line()?;
        let mut results = vec![];
        if matches!(l.peek(), Some(Tok::Val(_))) {
            loop {
                results.push(l.val().map_err(|e| self.err(&e))?);
                if l.eat_punct('=') {
                    break;
                }
                l.punct(',').map_err(|e| self.err(&e))?;
            }
        }
        let kw = l.word().map_err(|e| self.err(&e))?;
        match kw.as_str() {
            "for" => return self.for_(l, results),
            "if" => return self.if_(l, results),
            _ => {}
        }
        let r: Result<(Op, Vec<Type>), String> = (|| {
            let v = |l: &mut Line| -> Result<ValueId, String> { self.get(&l.val()?) };
            let op = match kw.as_str() {
                "program_id" => Op::ProgramId {
                    axis: l.int()? as u8,
                },
                "const" => Op::Const {
                    value: parse_const(&l.word()?)?,
                },
                "range" => Op::Range { n: l.int()? },
                "splat" => Op::Splat { src: v(&mut l)? },
                "expand_dims" => {
                    let src = v(&mut l)?;
                    l.punct(',')?;
                    Op::ExpandDims {
                        src,
                        axis: l.int()?,
                    }
                }
                "convert" => Op::ConvertLayout { src: v(&mut l)? },
                "broadcast" => Op::Broadcast { src: v(&mut l)? },
                "cmp" => {
                    let w = l.word()?;
                    let pred = pred(&w).ok_or(format!("unknown comparison `{w}`"))?;
                    let lhs = v(&mut l)?;
                    l.punct(',')?;
                    Op::Cmp {
                        pred,
                        lhs,
                        rhs: v(&mut l)?,
                    }
                }
                "select" => {
                    let cond = v(&mut l)?;
                    l.punct(',')?;
                    let a = v(&mut l)?;
                    l.punct(',')?;
                    Op::Select {
                        cond,
                        a,
                        b: v(&mut l)?,
                    }
                }
                "cast" => Op::Cast { src: v(&mut l)? },
                "trans" => Op::Trans { src: v(&mut l)? },
                "dot" => {
                    let a = v(&mut l)?;
                    l.punct(',')?;
                    let b = v(&mut l)?;
                    l.punct(',')?;
                    Op::Dot {
                        a,
                        b,
                        acc: v(&mut l)?,
                    }
                }
                "addptr" => {
                    let ptr = v(&mut l)?;
                    l.punct(',')?;
                    Op::AddPtr {
                        ptr,
                        offset: v(&mut l)?,
                    }
                }
                "load" => {
                    let ptr = v(&mut l)?;
                    let mask = if l.eat_word("mask") {
                        Some(v(&mut l)?)
                    } else {
                        None
                    };
                    let other = if l.eat_word("other") {
                        Some(v(&mut l)?)
                    } else {
                        None
                    };
                    Op::Load { ptr, mask, other }
                }
                "store" | "atomic_add" => {
                    let ptr = v(&mut l)?;
                    l.punct(',')?;
                    let value = v(&mut l)?;
                    let mask = if l.eat_word("mask") {
                        Some(v(&mut l)?)
                    } else {
                        None
                    };
                    if kw == "store" {
                        Op::Store { ptr, value, mask }
                    } else {
                        Op::AtomicAdd { ptr, value, mask }
                    }
                }
                "reduce" => {
                    let kind = match l.word()?.as_str() {
                        "sum" => ReduceKind::Sum,
                        "max" => ReduceKind::Max,
                        "min" => ReduceKind::Min,
                        k => return Err(format!("unknown reduction `{k}`")),
                    };
                    let src = v(&mut l)?;
                    l.punct(',')?;
                    Op::Reduce {
                        src,
                        axis: l.int()?,
                        kind,
                    }
                }
                "yield" => {
                    let mut values = vec![];
                    if l.peek().is_some() {
                        values.push(v(&mut l)?);
                        while l.eat_punct(',') {
                            values.push(v(&mut l)?);
                        }
                    }
                    Op::Yield { values }
                }
                "return" => Op::Return,
                w => {
                    if let Some(op) = binop(w) {
                        let lhs = v(&mut l)?;
                        l.punct(',')?;
                        Op::Binary {
                            op,
                            lhs,
                            rhs: v(&mut l)?,
                        }
                    } else if let Some(op) = unop(w) {
                        Op::Unary {
                            op,
                            src: v(&mut l)?,
                        }
                    } else {
                        return Err(format!("unknown op `{w}`"));
                    }
                }
            };
            let types = if l.eat_punct(':') { l.types()? } else { vec![] };
            l.done()?;
            Ok((op, types))
        })();
        let (op, types) = r.map_err(|e| self.err(&e))?;
        if types.len() != results.len() {
            return Err(self.err(&format!(
                "{} results but {} types",
                results.len(),
                types.len()
            )));
        }
        let ids = self.b.push(op, types);
        for (n, id) in results.into_iter().zip(ids) {
            self.names.insert(n, id);
        }
        self.pos += 1;
        Ok(())
    }

    fn for_(&mut self, mut l: Line, results: Vec<String>) -> Result<(), IrError> {
        let r: Result<_, String> = (|| {
            let iv = l.val()?;
            l.punct('=')?;
            let lo = self.get(&l.val()?)?;
            if !l.eat_word("to") {
                return Err("expected `to`".into());
            }
            let hi = self.get(&l.val()?)?;
            if !l.eat_word("step") {
                return Err("expected `step`".into());
            }
            let step = self.get(&l.val()?)?;
            let mut carried = vec![];
            if l.eat_word("iter") {
                l.punct('(')?;
                loop {
                    let a = l.val()?;
                    l.punct('=')?;
                    let init = self.get(&l.val()?)?;
                    carried.push((a, init));
                    if l.eat_punct(')') {
                        break;
                    }
                    l.punct(',')?;
                }
            }
            let types = if l.eat_punct(':') { l.types()? } else { vec![] };
            l.punct('{')?;
            l.done()?;
            if types.len() != carried.len() || results.len() != carried.len() {
                return Err("a `for` needs as many results, iter values and types".into());
            }
            Ok((iv, lo, hi, step, carried, types))
        })();
        let (iv, lo, hi, step, carried, types) = r.map_err(|e| self.err(&e))?;
        self.pos += 1;
        let mut arg_types = vec![self.b.ty(lo).clone()];
        arg_types.extend(types.iter().cloned());
        let args = self.b.begin_block(&arg_types);
        self.names.insert(iv, args[0]);
        for ((name, _), a) in carried.iter().zip(&args[1..]) {
            self.names.insert(name.clone(), *a);
        }
        if self.block_until_close()? {
            return Err(self.err("`else` after a `for` body"));
        }
        let body = self.b.end_block()?;
        let inits = carried.iter().map(|c| c.1).collect();
        let ids = self.b.push(
            Op::For {
                lo,
                hi,
                step,
                inits,
                body,
            },
            types,
        );
        for (n, id) in results.into_iter().zip(ids) {
            self.names.insert(n, id);
        }
        Ok(())
    }

    fn if_(&mut self, mut l: Line, results: Vec<String>) -> Result<(), IrError> {
        let r: Result<_, String> = (|| {
            let cond = self.get(&l.val()?)?;
            let types = if l.eat_punct(':') { l.types()? } else { vec![] };
            l.punct('{')?;
            l.done()?;
            Ok((cond, types))
        })();
        let (cond, types) = r.map_err(|e| self.err(&e))?;
        if types.len() != results.len() {
            return Err(self.err("an `if` needs as many results as types"));
        }
        self.pos += 1;
        self.b.begin_block(&[]);
        let has_else = self.block_until_close()?;
        let then_block = self.b.end_block()?;
        self.b.begin_block(&[]);
        if has_else {
            self.block_until_close()?;
        }
        let else_block: Block = self.b.end_block()?;
        let ids = self.b.push(
            Op::If {
                cond,
                then_block,
                else_block,
            },
            types,
        );
        for (n, id) in results.into_iter().zip(ids) {
            self.names.insert(n, id);
        }
        Ok(())
    }
}
