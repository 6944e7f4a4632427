//! The arguments of `#[kernel(...)]` and the kernel's signature.
//!
//! ```text
//! #[kernel(
//!     variants(T = [bf16, f16, f32], BLOCK = [1024]),   // instantiated compile-time parameters
//!     warps = 4,                                         // warps per program (or a const parameter)
//!     stages = 3,                                        // cp.async pipeline depth of `dot` loops
//!     tma = 1,                                           // sm_90a: stream them with TMA (0/1 or a const parameter)
//!     only = [W == 8 || BN == 128],                      // keep only variants where all hold
//!     grid = [cdiv(y.dim(0), BLOCK)],                    // programs along x (, y, z)
//!     require = [x.dim(0) == y.dim(0)],                  // checked by the launcher
//! )]
//! pub fn axpby<T, const BLOCK: usize>(a: f32, x: Tensor<T, 1>, b: f32, y: TensorMut<T, 1>) { .. }
//! ```

use lexp_compiler::dtype::Storage;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Error, Expr, FnArg, GenericParam, ItemFn, Meta, Pat, Token, Type};

/// Parsed `#[kernel(...)]` arguments.
pub struct KernelAttr {
    /// `(parameter name, values)`: `T` values are dtype names, const values integers.
    pub variants: Vec<(syn::Ident, Vec<Expr>)>,
    pub warps: Count,
    /// Pipeline depth for `dot` operands streamed in loops (1: off).
    pub stages: Count,
    /// 1: on sm_90a, stream `dot` operands with TMA where they qualify (0: `cp.async`).
    pub tma: Count,
    /// 1: on sm_90a, ping-pong the two warpgroups of an 8-warp kernel through the MMAs of its
    /// pipelined loops (0: off).
    pub pingpong: Count,
    /// Programs per multiprocessor the code must fit (ptxas's register budget; default 1).
    pub ctas: Count,
    pub grid: Vec<Expr>,
    pub require: Vec<Expr>,
    /// Compile-time filters on the const parameters: a combination is compiled only if every
    /// one holds (so a cartesian `variants(..)` can leave out tile shapes that do not fit).
    pub only: Vec<Expr>,
}

impl Parse for KernelAttr {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let metas = Punctuated::<Meta, Token![,]>::parse_terminated(input)?;
        let mut attr = KernelAttr {
            variants: vec![],
            warps: Count::Lit(4),
            stages: Count::Lit(1),
            tma: Count::Lit(0),
            pingpong: Count::Lit(0),
            ctas: Count::Lit(1),
            grid: vec![],
            require: vec![],
            only: vec![],
        };
        let mut have_grid = false;
        for m in metas {
            match &m {
                Meta::List(l) if l.path.is_ident("variants") => {
                    let items = l.parse_args_with(Punctuated::<syn::MetaNameValue, Token![,]>::parse_terminated)?;
                    for nv in items {
                        let name = nv.path.get_ident().cloned().ok_or_else(|| Error::new_spanned(&nv.path, "expected a parameter name"))?;
                        let values = match &nv.value {
                            Expr::Array(a) => a.elems.iter().cloned().collect(),
                            other => vec![other.clone()],
                        };
                        if values.is_empty() {
                            return Err(Error::new_spanned(&nv.value, "a parameter needs at least one value"));
                        }
                        attr.variants.push((name, values));
                    }
                }
                Meta::NameValue(nv) if nv.path.is_ident("warps") => {
                    attr.warps = Count::parse(&nv.value, "warps")?;
                    if let Count::Lit(w) = attr.warps {
                        if !w.is_power_of_two() || w > 32 {
                            return Err(Error::new_spanned(&nv.value, "`warps` must be a power of two, at most 32"));
                        }
                    }
                }
                Meta::NameValue(nv) if nv.path.is_ident("stages") => {
                    attr.stages = Count::parse(&nv.value, "stages")?;
                    if let Count::Lit(s) = attr.stages {
                        if !(1..=8).contains(&s) {
                            return Err(Error::new_spanned(&nv.value, "`stages` must be 1 to 8"));
                        }
                    }
                }
                Meta::NameValue(nv) if nv.path.is_ident("tma") => {
                    attr.tma = Count::parse(&nv.value, "tma")?;
                    if let Count::Lit(t) = attr.tma {
                        if t > 1 {
                            return Err(Error::new_spanned(&nv.value, "`tma` must be 0 or 1"));
                        }
                    }
                }
                Meta::NameValue(nv) if nv.path.is_ident("pingpong") => {
                    attr.pingpong = Count::parse(&nv.value, "pingpong")?;
                    if let Count::Lit(t) = attr.pingpong {
                        if t > 1 {
                            return Err(Error::new_spanned(
                                &nv.value,
                                "`pingpong` must be 0 or 1",
                            ));
                        }
                    }
                }
                Meta::NameValue(nv) if nv.path.is_ident("ctas") => {
                    attr.ctas = Count::parse(&nv.value, "ctas")?;
                    if let Count::Lit(0) = attr.ctas {
                        return Err(Error::new_spanned(&nv.value, "`ctas` must be at least 1"));
                    }
                }
                Meta::NameValue(nv) if nv.path.is_ident("only") => {
                    let Expr::Array(a) = &nv.value else {
                        return Err(Error::new_spanned(&nv.value, "expected `[condition, ...]`"));
                    };
                    attr.only = a.elems.iter().cloned().collect();
                }
                Meta::NameValue(nv) if nv.path.is_ident("grid") || nv.path.is_ident("require") => {
                    let Expr::Array(a) = &nv.value else {
                        return Err(Error::new_spanned(&nv.value, "expected `[expr, ...]`"));
                    };
                    let exprs: Vec<Expr> = a.elems.iter().cloned().collect();
                    if nv.path.is_ident("grid") {
                        if exprs.is_empty() || exprs.len() > 3 {
                            return Err(Error::new_spanned(&nv.value, "`grid` takes 1 to 3 expressions"));
                        }
                        attr.grid = exprs;
                        have_grid = true;
                    } else {
                        attr.require = exprs;
                    }
                }
                other => {
                    return Err(Error::new_spanned(
                        other,
                        "unknown #[kernel] argument; expected `variants(..)`, `warps = N`, `stages = N`, `tma = 0|1`, `pingpong = 0|1`, `ctas = N`, `only = [..]`, `grid = [..]` or `require = [..]`",
                    ))
                }
            }
        }
        if !have_grid {
            return Err(Error::new(
                input.span(),
                "#[kernel] needs `grid = [..]`: how many programs to launch",
            ));
        }
        Ok(attr)
    }
}

/// A count given as a literal or as the name of a const variant parameter (so autotuning
/// configurations can vary it).
#[derive(Clone, Debug)]
pub enum Count {
    Lit(usize),
    Param(syn::Ident),
}

impl Count {
    fn parse(e: &Expr, what: &str) -> syn::Result<Count> {
        match e {
            Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Int(i),
                ..
            }) => Ok(Count::Lit(i.base10_parse()?)),
            Expr::Path(p) if p.path.get_ident().is_some() => Ok(Count::Param(
                p.path
                    .get_ident()
                    .cloned()
                    .ok_or_else(|| Error::new_spanned(p, "expected a name"))?,
            )),
            other => Err(Error::new_spanned(
                other,
                format!("`{what}` must be an integer literal or a const parameter"),
            )),
        }
    }

    /// The value in a variant with const parameters `consts`.
    pub fn resolve(&self, consts: &[(String, usize)]) -> syn::Result<usize> {
        match self {
            Count::Lit(v) => Ok(*v),
            Count::Param(id) => consts
                .iter()
                .find(|(n, _)| id == n)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    Error::new_spanned(
                        id,
                        format!("`{id}` is not a const parameter listed in `variants(..)`"),
                    )
                }),
        }
    }
}

/// Evaluates an `only` condition (integer literals, const parameters, `+ - * / %`,
/// comparisons, `&& || !`, parentheses) for one combination of const values.
pub fn eval_const(e: &Expr, consts: &[(String, usize)]) -> syn::Result<i64> {
    use syn::BinOp as B;
    Ok(match e {
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(i),
            ..
        }) => i.base10_parse()?,
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Bool(b),
            ..
        }) => b.value as i64,
        Expr::Paren(p) => eval_const(&p.expr, consts)?,
        Expr::Path(p) => {
            let id = p
                .path
                .get_ident()
                .ok_or_else(|| Error::new_spanned(p, "expected a const parameter"))?;
            consts
                .iter()
                .find(|(n, _)| id == n)
                .map(|(_, v)| *v as i64)
                .ok_or_else(|| Error::new_spanned(p, format!("`{id}` is not a const parameter")))?
        }
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Not(_)) => {
            (eval_const(&u.expr, consts)? == 0) as i64
        }
        Expr::Binary(b) => {
            let (x, y) = (eval_const(&b.left, consts)?, eval_const(&b.right, consts)?);
            match b.op {
                B::Add(_) => x + y,
                B::Sub(_) => x - y,
                B::Mul(_) => x * y,
                B::Div(_) | B::Rem(_) if y == 0 => {
                    return Err(Error::new_spanned(b, "division by zero"))
                }
                B::Div(_) => x / y,
                B::Rem(_) => x % y,
                B::Eq(_) => (x == y) as i64,
                B::Ne(_) => (x != y) as i64,
                B::Lt(_) => (x < y) as i64,
                B::Le(_) => (x <= y) as i64,
                B::Gt(_) => (x > y) as i64,
                B::Ge(_) => (x >= y) as i64,
                B::And(_) => (x != 0 && y != 0) as i64,
                B::Or(_) => (x != 0 || y != 0) as i64,
                _ => return Err(Error::new_spanned(b, "unsupported operator in `only`")),
            }
        }
        other => {
            return Err(Error::new_spanned(
                other,
                "unsupported expression in `only`",
            ))
        }
    })
}

/// What a kernel parameter is.
#[derive(Clone, Debug)]
pub enum ParamKind {
    /// `f32`, `i32` or `usize` (passed as i64).
    Scalar(lexp_compiler::dtype::DType),
    /// `Tensor<E, RANK>` or `TensorMut<E, RANK>`; `elem` is `None` for the type parameter.
    Tensor {
        elem: Option<Storage>,
        rank: usize,
        mutable: bool,
    },
}

/// One kernel parameter.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: syn::Ident,
    pub kind: ParamKind,
}

/// The kernel's signature: its type parameter (at most one), const parameters and parameters.
pub struct Signature {
    pub type_param: Option<syn::Ident>,
    pub consts: Vec<syn::Ident>,
    pub params: Vec<Param>,
}

/// Reads the function's generics and parameters.
pub fn signature(f: &ItemFn) -> syn::Result<Signature> {
    let mut type_param = None;
    let mut consts = vec![];
    for g in &f.sig.generics.params {
        match g {
            GenericParam::Type(t) => {
                if type_param.is_some() {
                    return Err(Error::new_spanned(
                        t,
                        "a kernel takes at most one element-type parameter",
                    ));
                }
                type_param = Some(t.ident.clone());
            }
            GenericParam::Const(c) => {
                if !matches!(&c.ty, Type::Path(p) if p.path.is_ident("usize")) {
                    return Err(Error::new_spanned(
                        &c.ty,
                        "const parameters of a kernel must be `usize`",
                    ));
                }
                consts.push(c.ident.clone());
            }
            GenericParam::Lifetime(l) => {
                return Err(Error::new_spanned(l, "kernels take no lifetimes"))
            }
        }
    }
    if f.sig.output != syn::ReturnType::Default {
        return Err(Error::new_spanned(
            &f.sig.output,
            "a kernel returns nothing: it writes its outputs through TensorMut",
        ));
    }
    let mut params = vec![];
    for a in &f.sig.inputs {
        let FnArg::Typed(pt) = a else {
            return Err(Error::new_spanned(a, "kernels take no `self`"));
        };
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(Error::new_spanned(&pt.pat, "expected a parameter name"));
        };
        let kind = param_kind(&pt.ty, type_param.as_ref())?;
        params.push(Param {
            name: pi.ident.clone(),
            kind,
        });
    }
    Ok(Signature {
        type_param,
        consts,
        params,
    })
}

/// Parses a dtype name used as a storage type (`bf16`, `f16`, `f32`, `i32`).
pub fn storage_of(ty: &Type) -> Option<Storage> {
    match ty {
        Type::Path(p) => p
            .path
            .get_ident()
            .and_then(|i| Storage::from_name(&i.to_string())),
        _ => None,
    }
}

fn param_kind(ty: &Type, type_param: Option<&syn::Ident>) -> syn::Result<ParamKind> {
    use lexp_compiler::dtype::DType;
    let Type::Path(p) = ty else {
        return Err(Error::new_spanned(ty, "unsupported parameter type"));
    };
    let seg = p
        .path
        .segments
        .last()
        .ok_or_else(|| Error::new_spanned(ty, "unsupported parameter type"))?;
    let name = seg.ident.to_string();
    match name.as_str() {
        "f32" => return Ok(ParamKind::Scalar(DType::F32)),
        "i32" => return Ok(ParamKind::Scalar(DType::I32)),
        "usize" | "i64" => return Ok(ParamKind::Scalar(DType::I64)),
        "Tensor" | "TensorMut" => {}
        _ => {
            return Err(Error::new_spanned(
                ty,
                "unsupported parameter type: use f32, i32, usize, Tensor<E, RANK> or TensorMut<E, RANK>",
            ))
        }
    }
    let syn::PathArguments::AngleBracketed(args) = &seg.arguments else {
        return Err(Error::new_spanned(ty, "expected `Tensor<E, RANK>`"));
    };
    let args: Vec<_> = args.args.iter().collect();
    if args.len() != 2 {
        return Err(Error::new_spanned(ty, "expected `Tensor<E, RANK>`"));
    }
    let elem = match args[0] {
        syn::GenericArgument::Type(t) => {
            if matches!(t, Type::Path(tp) if Some(&tp.path.segments[0].ident) == type_param && tp.path.segments.len() == 1)
            {
                None
            } else {
                Some(storage_of(t).ok_or_else(|| {
                    Error::new_spanned(
                        t,
                        "element type must be bf16, f16, f32, i32 or the type parameter",
                    )
                })?)
            }
        }
        other => return Err(Error::new_spanned(other, "expected an element type")),
    };
    let rank = match args[1] {
        syn::GenericArgument::Const(Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(i),
            ..
        })) => i.base10_parse::<usize>()?,
        other => {
            return Err(Error::new(
                other.span(),
                "expected a literal rank (1, 2 or 3)",
            ))
        }
    };
    if !(1..=3).contains(&rank) {
        return Err(Error::new_spanned(args[1], "tensor rank must be 1, 2 or 3"));
    }
    Ok(ParamKind::Tensor {
        elem,
        rank,
        mutable: name == "TensorMut",
    })
}
