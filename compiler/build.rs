//! Hashes the compiler's own sources into `LEXP_COMPILER_SOURCE_HASH`, so that the PTX cache of
//! `#[kernel]` (keyed by IR, target and this hash) is invalidated by any change to the compiler.

use std::hash::{Hash, Hasher};
use std::path::Path;

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                visit(&p, files);
            } else if p.extension().map(|x| x == "rs").unwrap_or(false) {
                files.push(p);
            }
        }
    }
}

fn main() {
    let mut files = vec![];
    visit(Path::new("src"), &mut files);
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in &files {
        f.hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    println!("cargo:rerun-if-changed=src");
    println!(
        "cargo:rustc-env=LEXP_COMPILER_SOURCE_HASH={:016x}",
        h.finish()
    );
}
