//! Walks a kernel body (a Rust subset) and builds tile IR for one variant.
//!
//! Values are SSA: `let` binds, assignment rebinds. A `for` loop carries every outer variable
//! its body assigns; an `if`/`else` yields every outer variable either branch assigns. Anything
//! outside the subset is a compile error spanning the offending tokens.

use crate::attr::{Param, ParamKind, Signature};
use lexp_compiler::dtype::{DType, Storage};
use lexp_compiler::ir::{BinOp, Builder, CmpPred, ConstValue, Kernel, ReduceKind, UnOp, ValueId};
use quote::ToTokens;
use std::collections::HashMap;
use syn::{Error, Expr, Stmt};

type R<T> = syn::Result<T>;

/// The compile-time parameters of one variant.
#[derive(Clone, Debug)]
pub struct VariantParams {
    /// The element type bound to the type parameter.
    pub elem: Option<Storage>,
    /// Const parameters' values.
    pub consts: Vec<(String, usize)>,
    /// Alignment class (16 or 0), see `lexp_compiler::launch::Variant::align`.
    pub align: usize,
}

#[derive(Clone, Debug)]
struct TensorB {
    name: String,
    ptr: ValueId,
    dims: Vec<ValueId>,
    /// Strides of all but the last dimension (the last has stride 1 by contract).
    strides: Vec<ValueId>,
    mutable: bool,
}

#[derive(Clone, Debug)]
enum Binding {
    Val(ValueId),
    Tensor(TensorB),
}

struct Lower<'a> {
    b: Builder,
    scopes: Vec<HashMap<String, Binding>>,
    v: &'a VariantParams,
    type_param: Option<String>,
}

/// Builds the IR of `body` for variant `v`.
pub fn lower(
    name: &str,
    sig: &Signature,
    body: &syn::Block,
    warps: usize,
    v: &VariantParams,
) -> R<Kernel> {
    let mut l = Lower {
        b: Builder::new(name, warps),
        scopes: vec![HashMap::new()],
        v,
        type_param: sig.type_param.as_ref().map(|t| t.to_string()),
    };
    for p in &sig.params {
        l.add_param(p);
    }
    l.block_stmts(&body.stmts)?;
    l.b.finish()
        .map_err(|e| Error::new(body.brace_token.span.join(), e.0))
}

/// The element type of a tensor parameter in variant `v`.
pub fn elem_of(kind: &ParamKind, v: &VariantParams) -> Option<Storage> {
    match kind {
        ParamKind::Tensor { elem, .. } => elem.or(v.elem),
        ParamKind::Scalar(_) => None,
    }
}

impl Lower<'_> {
    fn add_param(&mut self, p: &Param) {
        let name = p.name.to_string();
        match &p.kind {
            ParamKind::Scalar(dt) => {
                let v = self.b.arg(&name, *dt, 1);
                self.bind(&name, Binding::Val(v));
            }
            ParamKind::Tensor { rank, mutable, .. } => {
                let st = elem_of(&p.kind, self.v).unwrap_or(Storage::F32);
                let aligned = self.v.align >= 16;
                let per16 = (16 / st.bytes()) as u64;
                let ptr = self.b.arg(
                    &name,
                    DType::Ptr(st),
                    if aligned { 16 } else { st.bytes() as u64 },
                );
                let mut dims = vec![];
                for d in 0..*rank {
                    let div = if aligned && d == rank - 1 { per16 } else { 1 };
                    dims.push(self.b.arg(&format!("{name}.dim{d}"), DType::I64, div));
                }
                let mut strides = vec![];
                for d in 0..rank - 1 {
                    strides.push(self.b.arg(
                        &format!("{name}.stride{d}"),
                        DType::I64,
                        if aligned { per16 } else { 1 },
                    ));
                }
                self.bind(
                    &name,
                    Binding::Tensor(TensorB {
                        name: name.clone(),
                        ptr,
                        dims,
                        strides,
                        mutable: *mutable,
                    }),
                );
            }
        }
    }

    fn bind(&mut self, name: &str, b: Binding) {
        if let Some(s) = self.scopes.last_mut() {
            s.insert(name.to_string(), b);
        }
    }

    fn lookup(&self, name: &str) -> Option<&Binding> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    /// Rebinds an existing variable where it was defined.
    fn assign(&mut self, name: &str, v: ValueId, span: &impl ToTokens) -> R<()> {
        for s in self.scopes.iter_mut().rev() {
            if let Some(b) = s.get_mut(name) {
                return match b {
                    Binding::Val(_) => {
                        *b = Binding::Val(v);
                        Ok(())
                    }
                    Binding::Tensor(_) => Err(Error::new_spanned(
                        span,
                        "cannot assign to a tensor parameter",
                    )),
                };
            }
        }
        Err(Error::new_spanned(
            span,
            format!("assignment to undeclared variable `{name}`; declare it with `let mut`"),
        ))
    }

    fn block_stmts(&mut self, stmts: &[Stmt]) -> R<()> {
        for s in stmts {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> R<()> {
        match s {
            Stmt::Local(local) => {
                let name = match &local.pat {
                    syn::Pat::Ident(pi) => pi.ident.to_string(),
                    syn::Pat::Type(pt) => {
                        return Err(Error::new_spanned(
                            &pt.ty,
                            "type annotations are not supported in a #[kernel]: types are inferred; convert with `.cast::<T>()`",
                        ))
                    }
                    other => {
                        return Err(Error::new_spanned(
                            other,
                            "only `let name = ...` is supported (no patterns)",
                        ))
                    }
                };
                let init = local
                    .init
                    .as_ref()
                    .ok_or_else(|| Error::new_spanned(local, "a `let` needs a value"))?;
                if init.diverge.is_some() {
                    return Err(Error::new_spanned(local, "`let ... else` is not supported"));
                }
                let v = self.expr(&init.expr)?;
                self.bind(&name, Binding::Val(v));
                Ok(())
            }
            Stmt::Expr(e, _) => self.stmt_expr(e),
            Stmt::Item(i) => Err(Error::new_spanned(
                i,
                "items inside a kernel are not supported",
            )),
            Stmt::Macro(m) => Err(Error::new_spanned(
                m,
                "macros inside a kernel are not supported",
            )),
        }
    }

    fn stmt_expr(&mut self, e: &Expr) -> R<()> {
        match e {
            Expr::Assign(a) => {
                let name = ident_of(&a.left)?;
                let v = self.expr(&a.right)?;
                self.assign(&name, v, &a.left)
            }
            Expr::Binary(b) if compound_op(&b.op).is_some() => {
                let name = ident_of(&b.left)?;
                let op = compound_op(&b.op).unwrap_or(BinOp::Add);
                let cur = self.expr(&b.left)?;
                let rhs = self.expr(&b.right)?;
                let v = ir(self.b.binary(op, cur, rhs), e)?;
                self.assign(&name, v, &b.left)
            }
            Expr::ForLoop(f) => self.for_loop(f),
            Expr::If(i) => self.if_stmt(i),
            Expr::Return(r) => {
                if r.expr.is_some() {
                    return Err(Error::new_spanned(
                        r,
                        "kernels return nothing: use `return;`",
                    ));
                }
                self.b.ret();
                Ok(())
            }
            Expr::MethodCall(_) | Expr::Call(_) => {
                self.expr_opt(e)?;
                Ok(())
            }
            Expr::Block(b) => {
                self.scopes.push(HashMap::new());
                let r = self.block_stmts(&b.block.stmts);
                self.scopes.pop();
                r
            }
            other => Err(Error::new_spanned(
                other,
                "unsupported statement in a #[kernel] (loops are `for i in lo..hi`; `while` and `loop` are not supported)",
            )),
        }
    }

    /// Variables of enclosing scopes that `block` assigns, in order of first assignment.
    fn assigned_outer(&self, block: &syn::Block) -> Vec<String> {
        let mut names = vec![];
        collect_assigned(&block.stmts, &mut names);
        names
            .into_iter()
            .filter(|n| matches!(self.lookup(n), Some(Binding::Val(_))))
            .collect()
    }

    fn for_loop(&mut self, f: &syn::ExprForLoop) -> R<()> {
        let var = match &*f.pat {
            syn::Pat::Ident(pi) => pi.ident.to_string(),
            other => return Err(Error::new_spanned(other, "loop variable must be a name")),
        };
        let (range, step) = match &*f.expr {
            Expr::MethodCall(m) if m.method == "step_by" && m.args.len() == 1 => {
                (strip_paren(&m.receiver), Some(&m.args[0]))
            }
            other => (strip_paren(other), None),
        };
        let Expr::Range(r) = range else {
            return Err(Error::new_spanned(
                &f.expr,
                "loops must be `for i in lo..hi` or `for i in (lo..hi).step_by(s)`",
            ));
        };
        if matches!(r.limits, syn::RangeLimits::Closed(_)) {
            return Err(Error::new_spanned(r, "use a half-open range `lo..hi`"));
        }
        let (Some(lo), Some(hi)) = (&r.start, &r.end) else {
            return Err(Error::new_spanned(r, "a loop range needs both bounds"));
        };
        let lo = self.scalar_int(lo)?;
        let hi = self.scalar_int(hi)?;
        let step = match step {
            Some(s) => {
                if let Ok(v) = self.static_int(s) {
                    if v == 0 {
                        return Err(Error::new_spanned(s, "`step_by(0)` never advances"));
                    }
                }
                self.scalar_int(s)?
            }
            None => self.b.const_int(1, DType::I32),
        };
        // All three bounds in one integer type (i64 if any is i64).
        let dt = [lo, hi, step]
            .iter()
            .map(|v| self.b.ty(*v).dtype)
            .max_by_key(|d| d.bytes())
            .unwrap_or(DType::I32);
        let lo = ir(self.b.cast(lo, dt), &f.expr)?;
        let hi = ir(self.b.cast(hi, dt), &f.expr)?;
        let step = ir(self.b.cast(step, dt), &f.expr)?;
        let carried = self.assigned_outer(&f.body);
        let inits: Vec<ValueId> = carried
            .iter()
            .map(|n| self.val(n))
            .collect::<Option<_>>()
            .unwrap_or_default();
        let mut types = vec![self.b.ty(lo).clone()];
        types.extend(inits.iter().map(|v| self.b.ty(*v).clone()));
        let args = self.b.begin_block(&types);
        self.scopes.push(HashMap::new());
        self.bind(&var, Binding::Val(args[0]));
        // Inside the body the carried variables are the block arguments.
        let saved: Vec<(String, ValueId)> =
            carried.iter().cloned().zip(inits.iter().copied()).collect();
        for (n, a) in carried.iter().zip(&args[1..]) {
            self.assign(n, *a, &f.body)?;
        }
        self.block_stmts(&f.body.stmts)?;
        let yields: Vec<ValueId> = carried
            .iter()
            .map(|n| self.val(n))
            .collect::<Option<_>>()
            .unwrap_or_default();
        for (y, i) in yields.iter().zip(&inits) {
            if self.b.ty(*y) != self.b.ty(*i) {
                return Err(Error::new_spanned(
                    &f.body,
                    format!(
                        "a loop-carried variable changes type in the loop ({} -> {})",
                        self.b.ty(*i),
                        self.b.ty(*y)
                    ),
                ));
            }
        }
        self.b.yield_(yields);
        self.scopes.pop();
        for (n, v) in &saved {
            self.assign(n, *v, &f.body)?;
        }
        let body = ir(self.b.end_block(), &f.body)?;
        let results = ir(self.b.for_loop(lo, hi, step, inits, body), f)?;
        for (n, r) in carried.iter().zip(results) {
            self.assign(n, r, &f.body)?;
        }
        Ok(())
    }

    fn if_stmt(&mut self, i: &syn::ExprIf) -> R<()> {
        let cond = self.expr(&i.cond)?;
        let mut carried = self.assigned_outer(&i.then_branch);
        if let Some((_, e)) = &i.else_branch {
            if let Expr::Block(b) = &**e {
                for n in self.assigned_outer(&b.block) {
                    if !carried.contains(&n) {
                        carried.push(n);
                    }
                }
            } else {
                return Err(Error::new_spanned(
                    e,
                    "`else if` is not supported; nest an `if` in the `else` block",
                ));
            }
        }
        let before: Vec<ValueId> = carried
            .iter()
            .map(|n| self.val(n))
            .collect::<Option<_>>()
            .unwrap_or_default();
        let mut blocks = vec![];
        for branch in [
            Some(&i.then_branch),
            i.else_branch.as_ref().map(|(_, e)| match &**e {
                Expr::Block(b) => &b.block,
                _ => &i.then_branch,
            }),
        ] {
            self.b.begin_block(&[]);
            self.scopes.push(HashMap::new());
            if let Some(blk) = branch {
                self.block_stmts(&blk.stmts)?;
            }
            let ys: Vec<ValueId> = carried
                .iter()
                .map(|n| self.val(n))
                .collect::<Option<_>>()
                .unwrap_or_default();
            for ((n, y), b) in carried.iter().zip(&ys).zip(&before) {
                if self.b.ty(*y) != self.b.ty(*b) {
                    return Err(Error::new_spanned(
                        branch.map(|b| b as &dyn ToTokens).unwrap_or(i as &dyn ToTokens),
                        format!("`{n}` changes type in this branch ({} -> {}); cast it to keep one type", self.b.ty(*b), self.b.ty(*y)),
                    ));
                }
            }
            // A branch that ends in `return` yields nothing: control never reaches its end.
            if !self.b.ends_with_return() {
                self.b.yield_(ys);
            }
            self.scopes.pop();
            for (n, v) in carried.iter().zip(&before) {
                self.assign(n, *v, i)?;
            }
            blocks.push(ir(self.b.end_block(), i)?);
        }
        let types = before.iter().map(|v| self.b.ty(*v).clone()).collect();
        let else_block = blocks.pop().unwrap_or_default();
        let then_block = blocks.pop().unwrap_or_default();
        let results = ir(self.b.if_(cond, then_block, else_block, types), &i.cond)?;
        for (n, r) in carried.iter().zip(results) {
            self.assign(n, r, i)?;
        }
        Ok(())
    }

    fn val(&self, name: &str) -> Option<ValueId> {
        match self.lookup(name) {
            Some(Binding::Val(v)) => Some(*v),
            _ => None,
        }
    }

    fn scalar_int(&mut self, e: &Expr) -> R<ValueId> {
        let v = self.expr(e)?;
        let t = self.b.ty(v);
        if !t.shape.is_empty() || !matches!(t.dtype, DType::I32 | DType::I64) {
            return Err(Error::new_spanned(
                e,
                format!("expected a scalar integer, found {t}"),
            ));
        }
        Ok(v)
    }

    fn expr(&mut self, e: &Expr) -> R<ValueId> {
        self.expr_opt(e)?
            .ok_or_else(|| Error::new_spanned(e, "this expression has no value"))
    }

    fn const_param(&self, name: &str) -> Option<usize> {
        self.v
            .consts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// A compile-time integer: a literal or a const parameter.
    fn static_int(&self, e: &Expr) -> R<usize> {
        match strip_paren(e) {
            Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Int(i),
                ..
            }) => i.base10_parse(),
            Expr::Path(p) => self.const_of_path(&p.path, e),
            other => Err(Error::new_spanned(
                other,
                "expected a literal or a const parameter",
            )),
        }
    }

    /// A compile-time integer in generic position (`range::<BLOCK>()`, `zeros::<f32, 64>()`).
    fn static_generic(&self, g: &syn::GenericArgument) -> R<usize> {
        match g {
            syn::GenericArgument::Const(e) => self.static_int(e),
            syn::GenericArgument::Type(syn::Type::Path(p)) => self.const_of_path(&p.path, g),
            other => Err(Error::new_spanned(
                other,
                "expected a literal or a const parameter",
            )),
        }
    }

    /// The value of the const parameter a path names.
    fn const_of_path(&self, path: &syn::Path, span: &impl ToTokens) -> R<usize> {
        path.get_ident()
            .and_then(|i| self.const_param(&i.to_string()))
            .ok_or_else(|| Error::new_spanned(span, "expected a literal or a const parameter"))
    }

    fn dtype_of(&self, t: &syn::Type) -> R<DType> {
        if let syn::Type::Path(p) = t {
            if let Some(id) = p.path.get_ident() {
                let s = id.to_string();
                if Some(&s) == self.type_param.as_ref() {
                    return self
                        .v
                        .elem
                        .map(|e| e.dtype())
                        .ok_or_else(|| Error::new_spanned(t, "type parameter without a value"));
                }
                if let Some(d) = DType::parse(&s) {
                    if !matches!(d, DType::Ptr(_)) {
                        return Ok(d);
                    }
                }
            }
        }
        Err(Error::new_spanned(
            t,
            "expected a dtype: f32, f16, bf16, i32, i64, i1 or the type parameter",
        ))
    }

    fn expr_opt(&mut self, e: &Expr) -> R<Option<ValueId>> {
        Ok(Some(match e {
            Expr::Paren(p) => return self.expr_opt(&p.expr),
            Expr::Group(g) => return self.expr_opt(&g.expr),
            Expr::Lit(l) => match &l.lit {
                syn::Lit::Int(i) => {
                    let v: i64 = i.base10_parse()?;
                    let dt = if i32::try_from(v).is_ok() {
                        DType::I32
                    } else {
                        DType::I64
                    };
                    self.b.const_int(v, dt)
                }
                syn::Lit::Float(f) => self.b.const_float(f.base10_parse::<f64>()?, DType::F32),
                syn::Lit::Bool(b) => self.b.const_int(b.value as i64, DType::I1),
                other => return Err(Error::new_spanned(other, "unsupported literal")),
            },
            Expr::Path(p) if float_constant(&p.path).is_some() => self
                .b
                .const_float(float_constant(&p.path).unwrap_or(0.0), DType::F32),
            Expr::Path(p) => {
                let id = p
                    .path
                    .get_ident()
                    .ok_or_else(|| Error::new_spanned(p, "unsupported path"))?
                    .to_string();
                if let Some(c) = self.const_param(&id) {
                    self.b.const_int(c as i64, DType::I32)
                } else {
                    match self.lookup(&id) {
                        Some(Binding::Val(v)) => *v,
                        Some(Binding::Tensor(_)) => {
                            return Err(Error::new_spanned(
                                p,
                                "a tensor is not a value: use `.load([..])` or `.dim(i)`",
                            ))
                        }
                        None => {
                            return Err(Error::new_spanned(
                                p,
                                format!("unknown name `{id}` in a #[kernel]"),
                            ))
                        }
                    }
                }
            }
            Expr::Unary(u) => {
                let x = self.expr(&u.expr)?;
                let op = match u.op {
                    syn::UnOp::Neg(_) => UnOp::Neg,
                    syn::UnOp::Not(_) => UnOp::Not,
                    _ => return Err(Error::new_spanned(u, "unsupported unary operator")),
                };
                ir(self.b.unary(op, x), e)?
            }
            Expr::Binary(b) => {
                if compound_op(&b.op).is_some() {
                    return Err(Error::new_spanned(b, "compound assignment is a statement"));
                }
                let x = self.expr(&b.left)?;
                let y = self.expr(&b.right)?;
                let r = match b.op {
                    syn::BinOp::Add(_) => self.b.binary(BinOp::Add, x, y),
                    syn::BinOp::Sub(_) => self.b.binary(BinOp::Sub, x, y),
                    syn::BinOp::Mul(_) => self.b.binary(BinOp::Mul, x, y),
                    syn::BinOp::Div(_) => self.b.binary(BinOp::Div, x, y),
                    syn::BinOp::Rem(_) => self.b.binary(BinOp::Rem, x, y),
                    syn::BinOp::BitAnd(_) | syn::BinOp::And(_) => self.b.binary(BinOp::And, x, y),
                    syn::BinOp::BitOr(_) | syn::BinOp::Or(_) => self.b.binary(BinOp::Or, x, y),
                    syn::BinOp::Lt(_) => self.b.cmp(CmpPred::Lt, x, y),
                    syn::BinOp::Le(_) => self.b.cmp(CmpPred::Le, x, y),
                    syn::BinOp::Gt(_) => self.b.cmp(CmpPred::Gt, x, y),
                    syn::BinOp::Ge(_) => self.b.cmp(CmpPred::Ge, x, y),
                    syn::BinOp::Eq(_) => self.b.cmp(CmpPred::Eq, x, y),
                    syn::BinOp::Ne(_) => self.b.cmp(CmpPred::Ne, x, y),
                    _ => {
                        return Err(Error::new_spanned(
                            b.op,
                            "unsupported operator in a #[kernel]",
                        ))
                    }
                };
                ir(r, e)?
            }
            Expr::Call(c) => return self.call(c),
            Expr::MethodCall(m) => return self.method(m),
            Expr::If(_) | Expr::ForLoop(_) => {
                return Err(Error::new_spanned(
                    e,
                    "`if` and `for` are statements in a #[kernel], not values",
                ))
            }
            Expr::Index(i) => {
                return Err(Error::new_spanned(
                    i,
                    "indexing is not supported: use `tensor.load([..])`",
                ))
            }
            Expr::Closure(c) => {
                return Err(Error::new_spanned(
                    c,
                    "closures are not supported in a #[kernel]",
                ))
            }
            other => {
                return Err(Error::new_spanned(
                    other,
                    "unsupported expression in a #[kernel]",
                ))
            }
        }))
    }

    fn nargs(&self, c: &impl ToTokens, args: usize, want: usize, what: &str) -> R<()> {
        if args != want {
            return Err(Error::new_spanned(
                c,
                format!("`{what}` takes {want} argument(s), got {args}"),
            ));
        }
        Ok(())
    }

    fn call(&mut self, c: &syn::ExprCall) -> R<Option<ValueId>> {
        let Expr::Path(p) = &*c.func else {
            return Err(Error::new_spanned(&c.func, "unsupported call"));
        };
        let seg = p
            .path
            .segments
            .last()
            .ok_or_else(|| Error::new_spanned(p, "unsupported call"))?;
        let name = seg.ident.to_string();
        let generics: Vec<&syn::GenericArgument> = match &seg.arguments {
            syn::PathArguments::AngleBracketed(a) => a.args.iter().collect(),
            _ => vec![],
        };
        let args: Vec<&Expr> = c.args.iter().collect();
        let unary = |n: &str| -> Option<UnOp> {
            Some(match n {
                "exp" => UnOp::Exp,
                "exp2" => UnOp::Exp2,
                "log" | "ln" => UnOp::Log,
                "log2" => UnOp::Log2,
                "sqrt" => UnOp::Sqrt,
                "rsqrt" => UnOp::Rsqrt,
                "tanh" => UnOp::Tanh,
                "abs" => UnOp::Abs,
                _ => return None,
            })
        };
        Ok(Some(match name.as_str() {
            "program_id" => {
                self.nargs(c, args.len(), 1, "program_id")?;
                let axis = self.static_int(args[0])?;
                ir(self.b.program_id(axis), c)?
            }
            "range" => {
                self.nargs(c, args.len(), 0, "range")?;
                let g = generics
                    .first()
                    .ok_or_else(|| Error::new_spanned(c, "write `range::<N>()`"))?;
                let n = self.static_generic(g)?;
                ir(self.b.range(n), c)?
            }
            "zeros" | "full" => {
                let (dt, shape) = self.tile_type(c, &generics)?;
                let value = if name == "zeros" {
                    self.nargs(c, args.len(), 0, "zeros")?;
                    ConstValue::Int(0)
                } else {
                    self.nargs(c, args.len(), 1, "full")?;
                    match strip_paren(args[0]) {
                        Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Float(f),
                            ..
                        }) => ConstValue::Float(f.base10_parse()?),
                        Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Int(i),
                            ..
                        }) => ConstValue::Int(i.base10_parse()?),
                        Expr::Unary(syn::ExprUnary {
                            op: syn::UnOp::Neg(_),
                            expr,
                            ..
                        }) => match &**expr {
                            Expr::Lit(syn::ExprLit {
                                lit: syn::Lit::Float(f),
                                ..
                            }) => ConstValue::Float(-f.base10_parse::<f64>()?),
                            Expr::Lit(syn::ExprLit {
                                lit: syn::Lit::Int(i),
                                ..
                            }) => ConstValue::Int(-i.base10_parse::<i64>()?),
                            other => {
                                return Err(Error::new_spanned(other, "`full` takes a literal"))
                            }
                        },
                        Expr::Path(p) if p.path.is_ident("NEG_INFINITY") => {
                            ConstValue::Float(f64::NEG_INFINITY)
                        }
                        other => {
                            return Err(Error::new_spanned(
                                other,
                                "`full` takes a literal (or NEG_INFINITY)",
                            ))
                        }
                    }
                };
                let value = if dt.is_float() {
                    ConstValue::Float(value.as_f64())
                } else {
                    value
                };
                self.b
                    .full(value, lexp_compiler::ir::Type::tile(dt, &shape))
            }
            "max" | "min" => {
                self.nargs(c, args.len(), 2, &name)?;
                let (x, y) = (self.expr(args[0])?, self.expr(args[1])?);
                ir(
                    self.b.binary(
                        if name == "max" {
                            BinOp::Max
                        } else {
                            BinOp::Min
                        },
                        x,
                        y,
                    ),
                    c,
                )?
            }
            "select" => {
                self.nargs(c, args.len(), 3, "select")?;
                let (m, x, y) = (
                    self.expr(args[0])?,
                    self.expr(args[1])?,
                    self.expr(args[2])?,
                );
                ir(self.b.select(m, x, y), c)?
            }
            "cdiv" => {
                self.nargs(c, args.len(), 2, "cdiv")?;
                let (x, y) = (self.expr(args[0])?, self.expr(args[1])?);
                let one = self.b.const_int(1, DType::I32);
                let t = ir(self.b.binary(BinOp::Add, x, y), c)?;
                let t = ir(self.b.binary(BinOp::Sub, t, one), c)?;
                ir(self.b.binary(BinOp::Div, t, y), c)?
            }
            "relu" => {
                self.nargs(c, args.len(), 1, "relu")?;
                let x = self.expr(args[0])?;
                let z = self.b.const_float(0.0, DType::F32);
                let z = ir(self.b.cast(z, self.b.ty(x).dtype), c)?;
                ir(self.b.binary(BinOp::Max, x, z), c)?
            }
            "sigmoid" => {
                self.nargs(c, args.len(), 1, "sigmoid")?;
                let x = self.expr(args[0])?;
                let n = ir(self.b.unary(UnOp::Neg, x), c)?;
                let e = ir(self.b.unary(UnOp::Exp, n), c)?;
                let one = self.b.const_float(1.0, DType::F32);
                let d = ir(self.b.binary(BinOp::Add, one, e), c)?;
                ir(self.b.binary(BinOp::Div, one, d), c)?
            }
            n if unary(n).is_some() => {
                self.nargs(c, args.len(), 1, n)?;
                let x = self.expr(args[0])?;
                ir(self.b.unary(unary(n).unwrap_or(UnOp::Exp), x), c)?
            }
            _ => {
                return Err(Error::new_spanned(
                    &c.func,
                    format!("unknown function `{name}` in a #[kernel]"),
                ))
            }
        }))
    }

    fn tile_type(
        &self,
        c: &impl ToTokens,
        generics: &[&syn::GenericArgument],
    ) -> R<(DType, Vec<usize>)> {
        let Some((first, dims)) = generics.split_first() else {
            return Err(Error::new_spanned(
                c,
                "write `zeros::<f32, N>()` or `zeros::<f32, R, C>()`",
            ));
        };
        let dt = match first {
            syn::GenericArgument::Type(t) => self.dtype_of(t)?,
            other => return Err(Error::new_spanned(other, "expected a dtype")),
        };
        let shape = dims
            .iter()
            .map(|g| self.static_generic(g))
            .collect::<R<Vec<_>>>()?;
        if shape.is_empty() || shape.len() > 2 || shape.iter().any(|d| !d.is_power_of_two()) {
            return Err(Error::new_spanned(
                c,
                "tile shapes are 1 or 2 power-of-two extents",
            ));
        }
        let max = lexp_compiler::ir::builder::MAX_TILE_ELEMENTS;
        if shape.iter().product::<usize>() > max {
            return Err(Error::new_spanned(
                c,
                format!("tiles have at most {max} elements"),
            ));
        }
        Ok((dt, shape))
    }

    fn method(&mut self, m: &syn::ExprMethodCall) -> R<Option<ValueId>> {
        let name = m.method.to_string();
        // Tensor methods first.
        if let Expr::Path(p) = &*m.receiver {
            if let Some(id) = p.path.get_ident() {
                if let Some(Binding::Tensor(t)) = self.lookup(&id.to_string()).cloned() {
                    return self.tensor_method(&t, m);
                }
            }
        }
        let args: Vec<&Expr> = m.args.iter().collect();
        let x = self.expr(&m.receiver)?;
        let unary = match name.as_str() {
            "exp" => Some(UnOp::Exp),
            "exp2" => Some(UnOp::Exp2),
            "ln" | "log" => Some(UnOp::Log),
            "log2" => Some(UnOp::Log2),
            "sqrt" => Some(UnOp::Sqrt),
            "rsqrt" => Some(UnOp::Rsqrt),
            "tanh" => Some(UnOp::Tanh),
            "abs" => Some(UnOp::Abs),
            _ => None,
        };
        if let Some(op) = unary {
            self.nargs(m, args.len(), 0, &name)?;
            return Ok(Some(ir(self.b.unary(op, x), m)?));
        }
        Ok(Some(match name.as_str() {
            "cast" => {
                let t = m
                    .turbofish
                    .as_ref()
                    .and_then(|t| t.args.first())
                    .ok_or_else(|| Error::new_spanned(m, "write `.cast::<T>()`"))?;
                let syn::GenericArgument::Type(t) = t else {
                    return Err(Error::new_spanned(t, "expected a dtype"));
                };
                let dt = self.dtype_of(t)?;
                ir(self.b.cast(x, dt), m)?
            }
            "max" | "min" => {
                self.nargs(m, args.len(), 1, &name)?;
                let y = self.expr(args[0])?;
                ir(
                    self.b.binary(
                        if name == "max" {
                            BinOp::Max
                        } else {
                            BinOp::Min
                        },
                        x,
                        y,
                    ),
                    m,
                )?
            }
            "sum" | "reduce_max" | "reduce_min" => {
                self.nargs(m, args.len(), 1, &name)?;
                let axis = self.static_int(args[0])?;
                let kind = match name.as_str() {
                    "sum" => ReduceKind::Sum,
                    "reduce_max" => ReduceKind::Max,
                    _ => ReduceKind::Min,
                };
                ir(self.b.reduce(x, axis, kind), m)?
            }
            "expand" => {
                self.nargs(m, args.len(), 1, "expand")?;
                let axis = self.static_int(args[0])?;
                ir(self.b.expand_dims(x, axis), m)?
            }
            _ => {
                return Err(Error::new_spanned(
                    &m.method,
                    format!("unknown method `.{name}()` in a #[kernel]"),
                ))
            }
        }))
    }

    fn tensor_method(&mut self, t: &TensorB, m: &syn::ExprMethodCall) -> R<Option<ValueId>> {
        let name = m.method.to_string();
        let args: Vec<&Expr> = m.args.iter().collect();
        match name.as_str() {
            "dim" => {
                self.nargs(m, args.len(), 1, "dim")?;
                let d = self.static_int(args[0])?;
                let v = t.dims.get(d).copied().ok_or_else(|| {
                    Error::new_spanned(args[0], format!("`{}` has {} dimensions", t.name, t.dims.len()))
                })?;
                Ok(Some(v))
            }
            "load" | "load_or" => {
                self.nargs(m, args.len(), if name == "load" { 1 } else { 2 }, &name)?;
                let (ptr, mask) = self.address(t, args[0])?;
                let other = if name == "load_or" { Some(self.expr(args[1])?) } else { None };
                Ok(Some(ir(self.b.load(ptr, Some(mask), other), m)?))
            }
            "store" | "atomic_add" => {
                self.nargs(m, args.len(), 2, &name)?;
                if !t.mutable {
                    return Err(Error::new_spanned(
                        &m.receiver,
                        format!("`{}` is read-only: declare it `TensorMut` to {name} into it", t.name),
                    ));
                }
                let (ptr, mask) = self.address(t, args[0])?;
                let v = self.expr(args[1])?;
                let r = if name == "store" { self.b.store(ptr, v, Some(mask)) } else { self.b.atomic_add(ptr, v, Some(mask)) };
                ir(r, m)?;
                Ok(None)
            }
            _ => Err(Error::new_spanned(
                &m.method,
                format!("unknown tensor method `.{name}()`: tensors have `.dim(i)`, `.load`, `.load_or`, `.store`, `.atomic_add`"),
            )),
        }
    }

    /// Pointer tile and bounds mask of `tensor[indices]` with outer-product indexing: each index
    /// is a scalar or a 1-D tile, and the result has one dimension per 1-D index, in order.
    fn address(&mut self, t: &TensorB, idx: &Expr) -> R<(ValueId, ValueId)> {
        let Expr::Array(a) = strip_paren(idx) else {
            return Err(Error::new_spanned(
                idx,
                "index a tensor with `[i0, i1, ..]`, one index per dimension",
            ));
        };
        if a.elems.len() != t.dims.len() {
            return Err(Error::new_spanned(
                a,
                format!(
                    "`{}` has {} dimension(s) but {} index(es) were given",
                    t.name,
                    t.dims.len(),
                    a.elems.len()
                ),
            ));
        }
        let mut vals = vec![];
        for e in &a.elems {
            let v = self.expr(e)?;
            let ty = self.b.ty(v).clone();
            if ty.rank() > 1 || !matches!(ty.dtype, DType::I32 | DType::I64) {
                return Err(Error::new_spanned(
                    e,
                    format!("an index must be a scalar or 1-D integer tile, found {ty}"),
                ));
            }
            vals.push((v, e));
        }
        let tiles = vals
            .iter()
            .filter(|(v, _)| self.b.ty(*v).rank() == 1)
            .count();
        if tiles > 2 {
            return Err(Error::new_spanned(a, "at most two indices may be tiles"));
        }
        let mut k = 0;
        let mut off: Option<ValueId> = None;
        let mut mask: Option<ValueId> = None;
        let last = t.dims.len() - 1;
        for (d, (v, e)) in vals.iter().enumerate() {
            let mut v = *v;
            if self.b.ty(v).rank() == 1 {
                if tiles == 2 {
                    v = ir(self.b.expand_dims(v, 1 - k), *e)?;
                }
                k += 1;
            }
            let v64 = ir(self.b.cast(v, DType::I64), *e)?;
            let inb = ir(self.b.cmp(CmpPred::Lt, v64, t.dims[d]), *e)?;
            mask = Some(match mask {
                None => inb,
                Some(m) => ir(self.b.binary(BinOp::And, m, inb), *e)?,
            });
            let term = if d == last {
                v64
            } else {
                ir(self.b.binary(BinOp::Mul, v64, t.strides[d]), *e)?
            };
            off = Some(match off {
                None => term,
                Some(o) => ir(self.b.binary(BinOp::Add, o, term), *e)?,
            });
        }
        let (Some(off), Some(mask)) = (off, mask) else {
            return Err(Error::new_spanned(a, "empty index"));
        };
        let ptr = ir(self.b.addptr(t.ptr, off), a)?;
        Ok((ptr, mask))
    }
}

/// `NEG_INFINITY`, `INFINITY` (optionally `f32::`-qualified).
fn float_constant(p: &syn::Path) -> Option<f64> {
    let last = p.segments.last()?.ident.to_string();
    let qualified_ok =
        p.segments.len() == 1 || (p.segments.len() == 2 && p.segments[0].ident == "f32");
    match last.as_str() {
        "NEG_INFINITY" if qualified_ok => Some(f64::NEG_INFINITY),
        "INFINITY" if qualified_ok => Some(f64::INFINITY),
        _ => None,
    }
}

/// Turns a builder error into a compile error spanning `span`.
fn ir<T>(r: Result<T, lexp_compiler::ir::IrError>, span: &impl ToTokens) -> R<T> {
    r.map_err(|e| Error::new_spanned(span, e.0))
}

fn strip_paren(e: &Expr) -> &Expr {
    match e {
        Expr::Paren(p) => strip_paren(&p.expr),
        Expr::Group(g) => strip_paren(&g.expr),
        other => other,
    }
}

fn ident_of(e: &Expr) -> R<String> {
    match strip_paren(e) {
        Expr::Path(p) if p.path.get_ident().is_some() => Ok(p
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_default()),
        other => Err(Error::new_spanned(
            other,
            "only plain variables can be assigned",
        )),
    }
}

fn compound_op(op: &syn::BinOp) -> Option<BinOp> {
    Some(match op {
        syn::BinOp::AddAssign(_) => BinOp::Add,
        syn::BinOp::SubAssign(_) => BinOp::Sub,
        syn::BinOp::MulAssign(_) => BinOp::Mul,
        syn::BinOp::DivAssign(_) => BinOp::Div,
        _ => return None,
    })
}

fn collect_assigned(stmts: &[Stmt], out: &mut Vec<String>) {
    fn expr(e: &Expr, out: &mut Vec<String>) {
        match e {
            Expr::Assign(a) => {
                if let Ok(n) = ident_of(&a.left) {
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            }
            Expr::Binary(b) if compound_op(&b.op).is_some() => {
                if let Ok(n) = ident_of(&b.left) {
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            }
            Expr::ForLoop(f) => collect_assigned(&f.body.stmts, out),
            Expr::If(i) => {
                collect_assigned(&i.then_branch.stmts, out);
                if let Some((_, e)) = &i.else_branch {
                    expr(e, out);
                }
            }
            Expr::Block(b) => collect_assigned(&b.block.stmts, out),
            _ => {}
        }
    }
    for s in stmts {
        if let Stmt::Expr(e, _) = s {
            expr(e, out);
        }
    }
}
