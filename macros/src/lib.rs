//! `#[kernel]`: lexp's tile DSL.
//!
//! A kernel is an ordinary Rust function in a small subset of Rust: one *program* computes one
//! tile; values are tiles with compile-time shapes; tensors are indexed with `.load([..])` and
//! `.store([..], v)`, bounds-masked automatically. At expansion time the macro builds the tile
//! IR of every variant listed in `variants(..)`, runs the compiler (`lexp-compiler`, with LLVM)
//! and embeds the PTX; see `attr.rs` for the arguments, `lower.rs` for the accepted subset and
//! `generate.rs` for what is generated.

mod attr;
mod generate;
mod lower;
mod ptx_cache;
#[cfg(test)]
mod tests;

use proc_macro::TokenStream;

/// Compiles a tile kernel. See the crate documentation.
#[proc_macro_attribute]
pub fn kernel(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(attr.into(), item.into(), generate::Options::default()).into()
}

fn expand(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
    opts: generate::Options,
) -> proc_macro2::TokenStream {
    let r = syn::parse2::<attr::KernelAttr>(attr)
        .and_then(|a| syn::parse2::<syn::ItemFn>(item).map(|f| (a, f)))
        .and_then(|(a, f)| generate::expand(a, f, opts));
    match r {
        Ok(ts) => ts,
        Err(e) => e.to_compile_error(),
    }
}
