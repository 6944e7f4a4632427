//! cargo-fuzz target `opt_config`: `targets::opt_config` (see `fuzz/README.md`).
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
    // `Ok` and clean errors are both fine; a panic, hang or huge allocation is the finding.
    let _ = targets::opt_config(fixtures(), data);
});
