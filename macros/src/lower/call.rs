//! The DSL's functions (`program_id`, `range`, `zeros`, `max`, `exp`, ...) and tile methods
//! (`.cast`, `.sum`, `.expand`, ...).

use super::*;

impl Lower<'_> {
    pub(super) fn nargs(&self, c: &impl ToTokens, args: usize, want: usize, what: &str) -> R<()> {
        if args != want {
            return Err(Error::new_spanned(
                c,
                format!("`{what}` takes {want} argument(s), got {args}"),
            ));
        }
        Ok(())
    }

    pub(super) fn call(&mut self, c: &syn::ExprCall) -> R<Option<ValueId>> {
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
            "dot" => {
                self.nargs(c, args.len(), 3, "dot")?;
                let (a, b, acc) = (
                    self.expr(args[0])?,
                    self.expr(args[1])?,
                    self.expr(args[2])?,
                );
                ir(self.b.dot(a, b, acc), c)?
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

    pub(super) fn tile_type(
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

    pub(super) fn method(&mut self, m: &syn::ExprMethodCall) -> R<Option<ValueId>> {
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
            "t" => {
                self.nargs(m, args.len(), 0, "t")?;
                ir(self.b.trans(x), m)?
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
}
