//! Values: variables, literals, compile-time integers and dtypes, operators.

use super::*;

impl Lower<'_> {
    pub(super) fn val(&self, name: &str) -> Option<ValueId> {
        match self.lookup(name) {
            Some(Binding::Val(v)) => Some(*v),
            _ => None,
        }
    }

    pub(super) fn scalar_int(&mut self, e: &Expr) -> R<ValueId> {
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

    pub(super) fn expr(&mut self, e: &Expr) -> R<ValueId> {
        self.expr_opt(e)?
            .ok_or_else(|| Error::new_spanned(e, "this expression has no value"))
    }

    pub(super) fn const_param(&self, name: &str) -> Option<usize> {
        self.v
            .consts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// A compile-time integer: a literal or a const parameter.
    pub(super) fn static_int(&self, e: &Expr) -> R<usize> {
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
    pub(super) fn static_generic(&self, g: &syn::GenericArgument) -> R<usize> {
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
    pub(super) fn const_of_path(&self, path: &syn::Path, span: &impl ToTokens) -> R<usize> {
        path.get_ident()
            .and_then(|i| self.const_param(&i.to_string()))
            .ok_or_else(|| Error::new_spanned(span, "expected a literal or a const parameter"))
    }

    pub(super) fn dtype_of(&self, t: &syn::Type) -> R<DType> {
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

    pub(super) fn expr_opt(&mut self, e: &Expr) -> R<Option<ValueId>> {
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
}
