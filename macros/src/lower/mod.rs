//! Walks a kernel body (a Rust subset) and builds tile IR for one variant.
//!
//! Values are SSA: `let` binds, assignment rebinds. A `for` loop carries every outer variable
//! its body assigns; an `if`/`else` yields every outer variable either branch assigns. Anything
//! outside the subset is a compile error spanning the offending tokens.
//!
//! Statements and control flow are here; values, literals and operators in `expr.rs`; the
//! DSL's functions and methods in `call.rs`; tensor access (`load`, `store`, indexing) in
//! `tensor.rs`.

mod call;
mod expr;
mod tensor;

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
    pub(super) fn add_param(&mut self, p: &Param) {
        let name = p.name.to_string();
        match &p.kind {
            ParamKind::Scalar(dt) => {
                let v = self.b.arg(&name, *dt, 1);
                self.bind(&name, Binding::Val(v));
            }
            ParamKind::Tensor { rank, mutable, .. } => {
                let st = elem_of(&p.kind, self.v).unwrap_or(Storage::F32);
                // Index tensors (i32: block lists) are read by scalar loads only; they never carry
                // the 16-byte assumption, in any variant.
                let aligned = self.v.align >= 16 && st != Storage::I32;
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

    pub(super) fn bind(&mut self, name: &str, b: Binding) {
        if let Some(s) = self.scopes.last_mut() {
            s.insert(name.to_string(), b);
        }
    }

    pub(super) fn lookup(&self, name: &str) -> Option<&Binding> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    /// Rebinds an existing variable where it was defined.
    pub(super) fn assign(&mut self, name: &str, v: ValueId, span: &impl ToTokens) -> R<()> {
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

    pub(super) fn block_stmts(&mut self, stmts: &[Stmt]) -> R<()> {
        for s in stmts {
            self.stmt(s)?;
        }
        Ok(())
    }

    pub(super) fn stmt(&mut self, s: &Stmt) -> R<()> {
        match s {
            Stmt::Local(local) => {
                if let Some(stmts) = grouped_ids(local)? {
                    for st in &stmts {
                        self.stmt(st)?;
                    }
                    return Ok(());
                }
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

    pub(super) fn stmt_expr(&mut self, e: &Expr) -> R<()> {
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
    pub(super) fn assigned_outer(&self, block: &syn::Block) -> Vec<String> {
        let mut names = vec![];
        collect_assigned(&block.stmts, &mut names);
        names
            .into_iter()
            .filter(|n| matches!(self.lookup(n), Some(Binding::Val(_))))
            .collect()
    }

    pub(super) fn for_loop(&mut self, f: &syn::ExprForLoop) -> R<()> {
        if let Some(rewritten) = block_list_loop(f)? {
            return self.for_loop(&rewritten);
        }
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

    pub(super) fn if_stmt(&mut self, i: &syn::ExprIf) -> R<()> {
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
    pub(super) fn expr(e: &Expr, out: &mut Vec<String>) {
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

/// Block-list iteration: `for (j, b) in blocks(counts, indices, g) { .. }` visits the entries
/// `j < counts[g]` of row `g` of a device-side block list with `b = indices[g, j]`, and is
/// written as the plain loop `for j in 0..counts.load([g]) { let b = indices.load([g, j]); .. }`.
/// With a fourth argument, `for (j, part, b) in blocks(counts, indices, g, PARTS)` visits each
/// block in `PARTS` consecutive parts (`part` in `0..PARTS`), as one flat loop of
/// `counts[g] * PARTS` iterations, which the pipeliner streams without a break between blocks.
/// The trip count is run-time data (no recompilation per pattern), and the pipeliner
/// prefetches `indices[g, j]` with the tiles it addresses. `None` for any other loop.
fn block_list_loop(f: &syn::ExprForLoop) -> R<Option<syn::ExprForLoop>> {
    let Expr::Call(c) = strip_paren(&f.expr) else {
        return Ok(None);
    };
    let Expr::Path(p) = &*c.func else {
        return Ok(None);
    };
    if !p.path.is_ident("blocks") {
        return Ok(None);
    }
    let args: Vec<&Expr> = c.args.iter().collect();
    if args.len() != 3 && args.len() != 4 {
        return Err(Error::new_spanned(
            c,
            "write `for (j, block) in blocks(counts, indices, group)` or `for (j, part, block) in blocks(counts, indices, group, PARTS)`",
        ));
    }
    let want = args.len() - 1;
    let names: Vec<&syn::Pat> = match &*f.pat {
        syn::Pat::Tuple(t) if t.elems.len() == want => t.elems.iter().collect(),
        other => {
            return Err(Error::new_spanned(
                other,
                if want == 2 {
                    "this block-list loop binds `(entry, block)`"
                } else {
                    "this block-list loop binds `(entry, part, block)`"
                },
            ))
        }
    };
    let (counts, indices, group) = (args[0], args[1], args[2]);
    let stmts = &f.body.stmts;
    let rewritten: syn::ExprForLoop = if want == 2 {
        let (j, b) = (names[0], names[1]);
        syn::parse_quote! {
            for #j in 0..#counts.load([#group]) {
                let #b = #indices.load([#group, #j]);
                #(#stmts)*
            }
        }
    } else {
        let (j, part, b) = (names[0], names[1], names[2]);
        let parts = args[3];
        syn::parse_quote! {
            for __lexp_step in 0..#counts.load([#group]) * (#parts) {
                let #j = __lexp_step / (#parts);
                let #part = __lexp_step % (#parts);
                let #b = #indices.load([#group, #j]);
                #(#stmts)*
            }
        }
    };
    Ok(Some(rewritten))
}

/// Program-id swizzling for L2 reuse (COMPILER.md §4.4, Triton's grouped ordering):
/// `let (pid_m, pid_n) = grouped(pid, tiles_m, tiles_n, G);` maps a linear program id so that
/// consecutive programs sweep a `G x tiles_n` panel of the output (operand panels are re-read
/// from L2), written as the plain integer statements. `None` for any other `let`.
fn grouped_ids(local: &syn::Local) -> R<Option<Vec<Stmt>>> {
    let Some(init) = &local.init else {
        return Ok(None);
    };
    let Expr::Call(c) = strip_paren(&init.expr) else {
        return Ok(None);
    };
    let Expr::Path(p) = &*c.func else {
        return Ok(None);
    };
    if !p.path.is_ident("grouped") {
        return Ok(None);
    }
    let args: Vec<&Expr> = c.args.iter().collect();
    let syn::Pat::Tuple(t) = &local.pat else {
        return Err(Error::new_spanned(
            &local.pat,
            "write `let (pid_m, pid_n) = grouped(pid, tiles_m, tiles_n, G);`",
        ));
    };
    if args.len() != 4 || t.elems.len() != 2 {
        return Err(Error::new_spanned(
            local,
            "write `let (pid_m, pid_n) = grouped(pid, tiles_m, tiles_n, G);`",
        ));
    }
    let (pid, tiles_m, tiles_n, g) = (args[0], args[1], args[2], args[3]);
    let (pm, pn) = (&t.elems[0], &t.elems[1]);
    let block: syn::Block = syn::parse_quote! {{
        let __lexp_per_group = (#tiles_n) * (#g);
        let __lexp_first_m = ((#pid) / __lexp_per_group) * (#g);
        let __lexp_group_size = min((#tiles_m) - __lexp_first_m, #g);
        let #pm = __lexp_first_m + ((#pid) % __lexp_per_group) % __lexp_group_size;
        let #pn = ((#pid) % __lexp_per_group) / __lexp_group_size;
    }};
    Ok(Some(block.stmts))
}
