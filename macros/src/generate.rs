//! What `#[kernel]` expands to: a module named after the kernel holding every variant's IR and
//! PTX, a typed launcher and an interpreter entry.

use crate::attr::{KernelAttr, ParamKind, Signature};
use crate::lower::{self, VariantParams};
use crate::ptx_cache;
use lexp_compiler::dtype::Storage;
use lexp_compiler::ir::printer;
use lexp_compiler::{passes, target};
use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{Error, Expr, ItemFn};

/// Options for tests: leave PTX and IR text out of the expansion so snapshots stay readable.
#[derive(Clone, Copy, Default)]
pub struct Options {
    pub elide_artifacts: bool,
}

struct Built {
    symbol: String,
    params: Vec<(String, String)>,
    align: usize,
    ir: String,
    ptx80: String,
    ptx90: String,
    smem: usize,
    dynamic_smem: bool,
    threads: usize,
    has_dot: bool,
    /// Tensor maps of the sm_90 PTX.
    tma: Vec<lexp_compiler::launch::TmaMap>,
}

/// Expands one kernel.
pub fn expand(attr: KernelAttr, f: ItemFn, opts: Options) -> syn::Result<TokenStream> {
    let sig = crate::attr::signature(&f)?;
    let name = f.sig.ident.to_string();
    let variants = enumerate_variants(&attr, &sig)?;
    let mut built = vec![];
    for v in &variants {
        // Tensor-core kernels stream their operands with 16-byte `cp.async` copies: they are
        // compiled for 16-byte aligned tensors only, and the launcher says so for others.
        if v.align == 0 && built.iter().any(|b: &Built| b.has_dot) {
            continue;
        }
        built.push(build_variant(&name, &sig, &f, &attr, v)?);
    }
    Ok(emit(&attr, &sig, &f, &built, opts))
}

/// Every combination of the listed values, times the two alignment classes.
fn enumerate_variants(attr: &KernelAttr, sig: &Signature) -> syn::Result<Vec<VariantParams>> {
    let mut elems: Vec<Option<Storage>> = vec![None];
    if let Some(tp) = &sig.type_param {
        let (_, vals) = attr.variants.iter().find(|(n, _)| n == tp).ok_or_else(|| {
            Error::new_spanned(
                tp,
                format!("list the element types of `{tp}` in `variants({tp} = [..])`"),
            )
        })?;
        elems = vals
            .iter()
            .map(|e| {
                let name = match e {
                    Expr::Path(p) => p.path.get_ident().map(|i| i.to_string()),
                    _ => None,
                };
                name.as_deref().and_then(Storage::from_name).map(Some).ok_or_else(|| {
                    Error::new_spanned(
                        e,
                        format!(
                            "unsupported element type `{}`: element types are bf16, f16, f32 or i32",
                            quote!(#e)
                        ),
                    )
                })
            })
            .collect::<syn::Result<_>>()?;
    }
    for (n, _) in &attr.variants {
        if Some(n) != sig.type_param.as_ref() && !sig.consts.contains(n) {
            return Err(Error::new_spanned(
                n,
                format!("`{n}` is not a generic parameter of this kernel"),
            ));
        }
    }
    let mut combos: Vec<Vec<(String, usize)>> = vec![vec![]];
    for c in &sig.consts {
        let (_, vals) = attr.variants.iter().find(|(n, _)| n == c).ok_or_else(|| {
            Error::new_spanned(
                c,
                format!("list the values of `{c}` in `variants({c} = [..])`"),
            )
        })?;
        let mut next = vec![];
        for combo in &combos {
            for v in vals {
                let val = match v {
                    Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Int(i),
                        ..
                    }) => i.base10_parse::<usize>()?,
                    other => {
                        return Err(Error::new_spanned(
                            other,
                            "const values must be integer literals",
                        ))
                    }
                };
                // Pipeline depths and programs per multiprocessor are counts and `tma`,
                // `pingpong` switches, not tile sizes.
                let is_param =
                    |a: &crate::attr::Count| matches!(a, crate::attr::Count::Param(p) if p == c);
                let exempt = is_param(&attr.stages)
                    || is_param(&attr.tma)
                    || is_param(&attr.pingpong)
                    || is_param(&attr.ctas);
                if !val.is_power_of_two() && !exempt {
                    return Err(Error::new_spanned(
                        v,
                        format!("`{c} = {val}`: tile sizes must be powers of two"),
                    ));
                }
                let mut c2 = combo.clone();
                c2.push((c.to_string(), val));
                next.push(c2);
            }
        }
        combos = next;
    }
    let mut kept = vec![];
    for consts in combos {
        let mut keep = true;
        for cond in &attr.only {
            keep &= crate::attr::eval_const(cond, &consts)? != 0;
        }
        if keep {
            kept.push(consts);
        }
    }
    if kept.is_empty() {
        return Err(Error::new(
            proc_macro2::Span::call_site(),
            "`only` leaves no variant to compile",
        ));
    }
    let combos = kept;
    let mut out = vec![];
    for elem in &elems {
        for consts in &combos {
            for align in [16, 0] {
                out.push(VariantParams {
                    elem: *elem,
                    consts: consts.clone(),
                    align,
                });
            }
        }
    }
    Ok(out)
}

fn build_variant(
    name: &str,
    sig: &Signature,
    f: &ItemFn,
    attr: &KernelAttr,
    v: &VariantParams,
) -> syn::Result<Built> {
    let mut params = vec![];
    let mut symbol = name.to_string();
    if let (Some(tp), Some(e)) = (&sig.type_param, v.elem) {
        params.push((tp.to_string(), e.name().to_string()));
        symbol.push_str(&format!("_{}", e.name()));
    }
    for (n, val) in &v.consts {
        params.push((n.clone(), val.to_string()));
        symbol.push_str(&format!("_{val}"));
    }
    symbol.push_str(&format!("_a{}", v.align));
    let warps = attr.warps.resolve(&v.consts)?;
    if !warps.is_power_of_two() || warps > 32 {
        return Err(Error::new_spanned(
            &f.sig.ident,
            format!("variant {symbol}: warps = {warps} must be a power of two, at most 32"),
        ));
    }
    let stages = attr.stages.resolve(&v.consts)?.max(1);
    let mut kernel = lower::lower(&symbol, sig, &f.block, warps, v)?;
    kernel.num_stages = stages;
    let switch = |count: &crate::attr::Count, name: &str| match count.resolve(&v.consts)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(Error::new_spanned(
            &f.sig.ident,
            format!("variant {symbol}: {name} = {other} must be 0 or 1"),
        )),
    };
    kernel.tma = switch(&attr.tma, "tma")?;
    kernel.pingpong = switch(&attr.pingpong, "pingpong")?;
    kernel.min_ctas = attr.ctas.resolve(&v.consts)?.max(1);
    let ir = printer::print(&kernel);
    // Errors of the later stages have no source spans: point at the kernel's name, and name
    // the variant unless the message already does.
    let at = |e: lexp_compiler::ir::IrError| {
        let msg = if e.0.contains(&symbol) {
            e.0
        } else {
            format!("variant {symbol}: {}", e.0)
        };
        Error::new_spanned(&f.sig.ident, msg)
    };
    let has_dot = passes::spaces::has_dot(&kernel);
    let compiled = passes::compile(kernel, &target::SM90).map_err(at)?;
    let smem = compiled.smem.total;
    let dynamic_smem = compiled.smem.dynamic;
    let tma = compiled.pipeline.maps.clone();
    let ptx80 = ptx_cache::ptx(&compiled, &target::SM80, &symbol).map_err(at)?;
    let ptx90 = ptx_cache::ptx(&compiled, &target::SM90, &symbol).map_err(at)?;
    Ok(Built {
        symbol,
        params,
        align: v.align,
        ir,
        ptx80,
        ptx90,
        smem,
        dynamic_smem,
        threads: warps * 32,
        has_dot,
        tma,
    })
}

fn doc_of(f: &ItemFn) -> Vec<String> {
    f.attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value().trim().to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn emit(
    attr: &KernelAttr,
    sig: &Signature,
    f: &ItemFn,
    built: &[Built],
    opts: Options,
) -> TokenStream {
    let vis = &f.vis;
    let name = &f.sig.ident;
    let name_str = name.to_string();
    let docs = doc_of(f);
    // The first paragraph of the doc comment, on one line.
    let first_doc = docs
        .iter()
        .take_while(|l| !l.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let variants = built.iter().map(|b| {
        let warps = b.threads as u32;
        let dynamic_smem = b.dynamic_smem;
        let symbol = &b.symbol;
        let pn = b.params.iter().map(|p| &p.0);
        let pv = b.params.iter().map(|p| &p.1);
        let align = b.align;
        let smem = b.smem as u32;
        let maps = b.tma.iter().map(|m| {
            let (param, rank, elem) = (m.param, m.rank, m.elem);
            let (rows, cols, swz, f32) = (m.box_rows, m.box_cols, m.swizzle, m.float32);
            quote! {
                ::lexp_compiler::launch::TmaMap {
                    param: #param, rank: #rank, elem: #elem,
                    box_rows: #rows, box_cols: #cols, swizzle: #swz, float32: #f32,
                }
            }
        });
        let (ir, p80, p90) = if opts.elide_artifacts {
            (
                format!("<{} bytes of IR>", b.ir.len()),
                format!("<{} bytes of PTX>", b.ptx80.len()),
                format!("<{} bytes of PTX>", b.ptx90.len()),
            )
        } else {
            (b.ir.clone(), b.ptx80.clone(), b.ptx90.clone())
        };
        quote! {
            ::lexp_compiler::launch::Variant {
                kernel: NAME,
                symbol: #symbol,
                params: &[#((#pn, #pv)),*],
                align: #align,
                threads: #warps,
                smem_bytes: #smem,
                dynamic_smem: #dynamic_smem,
                ir: #ir,
                ptx_sm80: #p80,
                ptx_sm90: #p90,
                tma: &[#(#maps),*],
            }
        }
    });
    let n_variants = built.len();

    // Compile-time constants and their listed values.
    let const_names: Vec<String> = sig.consts.iter().map(|c| c.to_string()).collect();
    let const_idents = &sig.consts;
    let const_values: Vec<Vec<usize>> = sig
        .consts
        .iter()
        .map(|c| {
            attr.variants
                .iter()
                .find(|(n, _)| n == c)
                .map(|(_, vals)| {
                    vals.iter()
                        .filter_map(|e| match e {
                            Expr::Lit(syn::ExprLit {
                                lit: syn::Lit::Int(i),
                                ..
                            }) => i.base10_parse().ok(),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let const_idx: Vec<usize> = (0..sig.consts.len()).collect();

    // Parameters.
    let mut dev_fields = vec![];
    let mut host_fields = vec![];
    let mut specs = vec![];
    let mut tensor_names = vec![];
    let mut push_dev = vec![];
    let mut push_host = vec![];
    let mut dims_params = vec![];
    let mut dims_args_dev = vec![];
    let mut dims_args_host = vec![];
    let mut tensor_index = 0usize;
    for p in &sig.params {
        let pn = &p.name;
        let pstr = pn.to_string();
        match &p.kind {
            ParamKind::Scalar(dt) => {
                let (ty, push) = match dt {
                    lexp_compiler::dtype::DType::F32 => (
                        quote!(f32),
                        quote!(::lexp_compiler::launch::KernelParam::F32(args.#pn)),
                    ),
                    lexp_compiler::dtype::DType::I32 => (
                        quote!(i32),
                        quote!(::lexp_compiler::launch::KernelParam::I32(args.#pn)),
                    ),
                    _ => (
                        quote!(i64),
                        quote!(::lexp_compiler::launch::KernelParam::I64(args.#pn)),
                    ),
                };
                dev_fields.push(quote!(pub #pn: #ty));
                host_fields.push(quote!(pub #pn: #ty));
                push_dev.push(quote!(params.push(#push);));
                push_host.push(quote!(params.push(#push);));
                dims_params.push(quote!(#pn: #ty));
                dims_args_dev.push(quote!(args.#pn));
                dims_args_host.push(quote!(args.#pn));
            }
            ParamKind::Tensor {
                elem,
                rank,
                mutable,
            } => {
                let elem_tok = match elem {
                    Some(e) => {
                        let id = format_ident!("{}", storage_variant(*e));
                        quote!(Some(::lexp_compiler::dtype::Storage::#id))
                    }
                    None => quote!(None),
                };
                specs.push(quote! {
                    ::lexp_compiler::launch::TensorSpec { name: #pstr, rank: #rank, elem: #elem_tok, mutable: #mutable }
                });
                dev_fields.push(quote!(pub #pn: &'a ::lexp_compiler::launch::TensorArg));
                host_fields.push(quote!(pub #pn: &'a mut ::lexp_compiler::interp::HostTensor));
                push_dev.push(quote!(::lexp_compiler::launch::push_tensor(&mut params, args.#pn);));
                let ti = tensor_index as u64;
                push_host.push(quote! {
                    let mut __view = views[#tensor_index].clone();
                    __view.ptr = #ti;
                    ::lexp_compiler::launch::push_tensor(&mut params, &__view);
                });
                dims_params.push(quote!(#pn: &dyn ::lexp_compiler::launch::Dims));
                dims_args_dev.push(quote!(args.#pn));
                dims_args_host.push(quote!(&views[#tensor_index]));
                tensor_names.push(pn.clone());
                tensor_index += 1;
            }
        }
    }
    let grid_exprs: Vec<TokenStream> = (0..3)
        .map(|i| match attr.grid.get(i) {
            Some(e) => quote!((#e) as u64),
            None => quote!(1u64),
        })
        .collect();
    let req_exprs = &attr.require;
    let req_strs: Vec<String> = attr
        .require
        .iter()
        .map(|e| tidy(&quote!(#e).to_string()))
        .collect();
    let n_tensors = tensor_names.len();
    // "x: [4, 8], y: [4, 9]": the shapes a failed requirement is about.
    let mut detail_parts = vec![];
    let mut detail_args = vec![];
    for p in &sig.params {
        if let ParamKind::Tensor { rank, .. } = &p.kind {
            let pn = &p.name;
            detail_parts.push(format!("{pn}: [{}]", vec!["{}"; *rank].join(", ")));
            for d in 0..*rank {
                detail_args.push(quote!(#pn.dim(#d)));
            }
        }
    }
    let detail_fmt = detail_parts.join(", ");
    let detail = quote!(format!(#detail_fmt #(, #detail_args)*));
    let details = vec![detail; attr.require.len()];
    let tidx = 0..n_tensors;
    let const_entries = const_names
        .iter()
        .zip(&const_values)
        .map(|(n, vals)| quote!((#n, &[#(#vals),*])));
    let doc_lines = docs.iter().map(|d| quote!(#[doc = #d]));

    quote! {
        #(#doc_lines)*
        ///
        /// Generated by `#[kernel]`: the compiled [`VARIANTS`], a typed launcher ([`launch`],
        /// [`launch_with`]) and an interpreter entry ([`interpret`]).
        #[allow(non_snake_case, clippy::all)]
        #vis mod #name {
            use super::*;

            /// Kernel name.
            pub const NAME: &str = #name_str;
            /// Every compiled variant (element type x constants x alignment class).
            pub static VARIANTS: [::lexp_compiler::launch::Variant; #n_variants] = [#(#variants),*];
            /// The kernel as `lexp kernels` lists it.
            pub static INFO: ::lexp_compiler::launch::KernelInfo =
                ::lexp_compiler::launch::KernelInfo { name: NAME, doc: #first_doc, variants: &VARIANTS };
            /// Compile-time constants and their compiled values (the first is the default).
            pub const CONSTS: &[(&str, &[usize])] = &[#(#const_entries),*];
            /// What the kernel expects of its tensor arguments.
            pub const TENSORS: &[::lexp_compiler::launch::TensorSpec] = &[#(#specs),*];

            /// Arguments for a launch on a device, in the kernel's order.
            pub struct Args<'a> { #(#dev_fields),* }
            /// Arguments for the interpreter, in the kernel's order.
            pub struct HostArgs<'a> { #(#host_fields),* }

            #[allow(unused_variables)]
            fn grid_of(consts: &[usize], #(#dims_params),*) -> [u64; 3] {
                #(let #const_idents: usize = consts[#const_idx];)*
                #[allow(unused_imports)]
                use ::lexp_compiler::launch::{cdiv, Dims as _};
                [#(#grid_exprs),*]
            }

            #[allow(unused_variables)]
            fn check_requirements(consts: &[usize], #(#dims_params),*) -> Result<(), ::lexp_compiler::launch::LaunchError> {
                #(let #const_idents: usize = consts[#const_idx];)*
                #[allow(unused_imports)]
                use ::lexp_compiler::launch::{cdiv, Dims as _};
                #(
                    if !(#req_exprs) {
                        return Err(::lexp_compiler::launch::LaunchError::Requirement {
                            kernel: NAME,
                            requirement: #req_strs,
                            detail: #details,
                        });
                    }
                )*
                Ok(())
            }

            /// Launches with the default constants.
            pub fn launch(l: &dyn ::lexp_compiler::launch::Launcher, args: &Args<'_>) -> Result<(), ::lexp_compiler::launch::LaunchError> {
                launch_with(l, &[], args)
            }

            /// Launches with the given constants (others default); checks shapes, strides,
            /// element types and alignment, picks the variant and computes the grid.
            pub fn launch_with(
                l: &dyn ::lexp_compiler::launch::Launcher,
                consts: &[(&str, usize)],
                args: &Args<'_>,
            ) -> Result<(), ::lexp_compiler::launch::LaunchError> {
                let tensors: [&::lexp_compiler::launch::TensorArg; #n_tensors] = [#(args.#tensor_names),*];
                let (variant, cv) = ::lexp_compiler::launch::select_variant(NAME, &VARIANTS, TENSORS, &tensors, CONSTS, consts, None)?;
                check_requirements(&cv, #(#dims_args_dev),*)?;
                let grid = ::lexp_compiler::launch::check_grid(NAME, grid_of(&cv, #(#dims_args_dev),*))?;
                let mut params = Vec::new();
                #(#push_dev)*
                l.launch(&::lexp_compiler::launch::LaunchSpec { variant, grid, params: &params })
            }

            /// Runs the kernel's IR in the interpreter on host tensors (same checks as a launch).
            pub fn interpret(consts: &[(&str, usize)], args: HostArgs<'_>) -> Result<(), ::lexp_compiler::launch::LaunchError> {
                let views: [::lexp_compiler::launch::TensorArg; #n_tensors] = [#(args.#tensor_names.as_arg()),*];
                let refs: [&::lexp_compiler::launch::TensorArg; #n_tensors] = [#(&views[#tidx]),*];
                let (variant, cv) = ::lexp_compiler::launch::select_variant(NAME, &VARIANTS, TENSORS, &refs, CONSTS, consts, Some(0))?;
                check_requirements(&cv, #(#dims_args_host),*)?;
                let grid = ::lexp_compiler::launch::check_grid(NAME, grid_of(&cv, #(#dims_args_host),*))?;
                let mut params = Vec::new();
                #(#push_host)*
                let mut tensors: [&mut ::lexp_compiler::interp::HostTensor; #n_tensors] = [#(args.#tensor_names),*];
                ::lexp_compiler::interp::run_variant(variant, grid, &params, &mut tensors)
            }
        }
    }
}

fn storage_variant(s: Storage) -> &'static str {
    match s {
        Storage::F16 => "F16",
        Storage::BF16 => "BF16",
        Storage::F32 => "F32",
        Storage::I32 => "I32",
    }
}

/// `x . dim (0)` (tokens printed by `quote`) to `x.dim(0)`, for messages.
fn tidy(s: &str) -> String {
    s.replace(" . ", ".")
        .replace(" (", "(")
        .replace("( ", "(")
        .replace(" )", ")")
        .replace(" ,", ",")
}
