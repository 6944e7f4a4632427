//! Snapshots of what `#[kernel]` generates for real kernels (PTX and IR text elided: they have
//! their own snapshots in `tests/`), and checks that misuse becomes a spanned error.

use crate::generate::Options;
use quote::ToTokens;

/// Expands every `#[kernel]` function of a source file, pretty-printed.
fn expand_file(src: &str, only: &str) -> String {
    let file: syn::File = syn::parse_str(src).expect("kernel source parses");
    for item in file.items {
        let syn::Item::Fn(mut f) = item else { continue };
        if f.sig.ident != only {
            continue;
        }
        let pos = f
            .attrs
            .iter()
            .position(|a| a.path().is_ident("kernel"))
            .expect("has #[kernel]");
        let attr = f.attrs.remove(pos);
        let args = match attr.meta {
            syn::Meta::List(l) => l.tokens,
            _ => proc_macro2::TokenStream::new(),
        };
        let out = crate::expand(
            args,
            f.into_token_stream(),
            Options {
                elide_artifacts: true,
            },
        );
        let file: syn::File = syn::parse2(out).expect("expansion parses as a file");
        return prettyplease::unparse(&file);
    }
    panic!("no kernel `{only}`");
}

#[test]
fn expansion_of_axpby() {
    insta::assert_snapshot!(expand_file(
        include_str!("../../kernels/src/elementwise.rs"),
        "axpby"
    ));
}

#[test]
fn expansion_of_softmax() {
    insta::assert_snapshot!(expand_file(
        include_str!("../../kernels/src/row_softmax.rs"),
        "softmax"
    ));
}

#[test]
fn unsupported_syntax_is_a_spanned_error_not_a_panic() {
    let attr: proc_macro2::TokenStream = syn::parse_quote!(variants(BLOCK = [64]), grid = [1]);
    let item: proc_macro2::TokenStream = syn::parse_quote! {
        fn k<const BLOCK: usize>(x: TensorMut<f32, 1>) {
            while true {}
        }
    };
    let out = crate::expand(
        attr,
        item,
        Options {
            elide_artifacts: true,
        },
    )
    .to_string();
    assert!(out.contains("compile_error"), "{out}");
    assert!(out.contains("unsupported statement"), "{out}");
}

#[test]
fn a_branch_that_returns_needs_no_yield() {
    // The `else` returns early; the `if` still produces `v` from the other branch.
    let attr: proc_macro2::TokenStream = syn::parse_quote!(grid = [1]);
    let item: proc_macro2::TokenStream = syn::parse_quote! {
        fn k(n: i32, y: TensorMut<f32, 1>) {
            let mut v = 0.0;
            if n > 4 {
                v = 1.0;
            } else {
                return;
            }
            y.store([range::<128>()], v);
        }
    };
    let out = crate::expand(
        attr,
        item,
        Options {
            elide_artifacts: true,
        },
    )
    .to_string();
    assert!(!out.contains("compile_error"), "{out}");
}

#[test]
fn constant_folding_of_overflowing_integers_does_not_panic() {
    // i64::MIN / -1, % -1, negation and abs wrap as the GPU does instead of panicking.
    let attr: proc_macro2::TokenStream = syn::parse_quote!(grid = [1]);
    for e in [
        quote::quote!((-9223372036854775807 - 1) / -1),
        quote::quote!((-9223372036854775807 - 1) % -1),
        quote::quote!(-(-9223372036854775807 - 1)),
        quote::quote!(abs(-9223372036854775807 - 1)),
    ] {
        let item: proc_macro2::TokenStream = syn::parse_quote! {
            fn k(y: TensorMut<i32, 1>) {
                let a = #e;
                y.store([range::<128>()], a.cast::<i32>());
            }
        };
        let out = crate::expand(
            attr.clone(),
            item,
            Options {
                elide_artifacts: true,
            },
        )
        .to_string();
        assert!(!out.contains("compile_error"), "{e}: {out}");
    }
}

#[test]
fn only_conditions_evaluate_over_the_constants() {
    let consts = vec![("W".to_string(), 8usize), ("BN".to_string(), 256usize)];
    let eval = |t: &str| crate::attr::eval_const(&syn::parse_str(t).unwrap(), &consts).unwrap();
    assert_eq!(eval("W == 8 || BN == 128"), 1);
    assert_eq!(eval("W == 4 && BN == 256"), 0);
    assert_eq!(eval("(128 + BN) * 64 * 2 * 4 <= 200 * 1024"), 1);
    assert_eq!(eval("!(BN % 128 == 0)"), 0);
    let err = crate::attr::eval_const(&syn::parse_str("X == 1").unwrap(), &consts)
        .expect_err("unknown name");
    assert!(err.to_string().contains("`X` is not a const parameter"));
}
