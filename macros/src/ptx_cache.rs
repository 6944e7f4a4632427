//! A cache of generated PTX keyed by a hash of the compiled IR (with its layouts), the target
//! and the compiler version, so that rebuilding the kernels crate after editing one kernel
//! only runs LLVM for that kernel's variants.
//!
//! The cache lives in `target/lexp-ptx-cache/` next to the build (found from
//! `CARGO_TARGET_DIR`, else the workspace's `target/`), one file per entry. `LEXP_PTX_CACHE=0`
//! turns it off. A corrupt or unreadable entry is regenerated, never trusted: the file holds the
//! key it was written for and is checked.

use lexp_compiler::codegen;
use lexp_compiler::ir::IrError;
use lexp_compiler::passes::Compiled;
use lexp_compiler::target::Target;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

fn cache_dir() -> Option<PathBuf> {
    if std::env::var("LEXP_PTX_CACHE")
        .map(|v| v == "0")
        .unwrap_or(false)
    {
        return None;
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => {
            // The kernels crate sits one level below the workspace root.
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
            manifest.parent()?.join("target")
        }
    };
    Some(target.join("lexp-ptx-cache"))
}

/// The PTX of `c` for `target` with entry `symbol`, from the cache or freshly generated.
pub fn ptx(c: &Compiled, target: &Target, symbol: &str) -> Result<String, IrError> {
    let key = format!(
        "{}\n{}\n{}\n{}\n{}",
        lexp_compiler::VERSION,
        target.name,
        symbol,
        c.stages
            .iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        c.kernel.num_warps
    );
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    let file =
        cache_dir().map(|d| d.join(format!("{symbol}-{}-{:016x}.ptx", target.name, h.finish())));
    let header = format!("// lexp-ptx-cache {:016x}\n", h.finish());
    if let Some(f) = &file {
        if let Ok(text) = std::fs::read_to_string(f) {
            if let Some(ptx) = text.strip_prefix(&header) {
                return Ok(ptx.to_string());
            }
        }
    }
    let lowered = codegen::lower(c, target, symbol)?;
    if let Some(f) = &file {
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
            // Write to a temporary name, then rename: a concurrent reader never sees half a file.
            let tmp = f.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, format!("{header}{}", lowered.ptx)).is_ok() {
                let _ = std::fs::rename(&tmp, f);
            }
        }
    }
    Ok(lowered.ptx)
}
