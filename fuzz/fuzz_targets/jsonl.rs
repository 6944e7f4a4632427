//! cargo-fuzz target `jsonl`: `targets::jsonl` (see `fuzz/README.md`).
#![no_main]

#[path = "../../runtime/tests/fuzz_parsers/targets.rs"]
mod targets;

use std::sync::OnceLock;

fn fixtures() -> &'static targets::Fixtures {
    static FX: OnceLock<targets::Fixtures> = OnceLock::new();
    FX.get_or_init(|| {
        targets::Fixtures::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/default"
        )))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::let_caught_panics_unwind();
    // `Ok` and clean errors are both fine; a panic, hang or huge allocation is the finding.
    let _ = targets::jsonl(fixtures(), data);
});
