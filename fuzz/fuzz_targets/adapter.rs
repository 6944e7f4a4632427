//! cargo-fuzz target `adapter`: `targets::adapter` (see `fuzz/README.md`).
#![no_main]

#[path = "../../runtime/tests/fuzz_parsers/targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // `Ok` and clean errors are both fine; a panic, hang or huge allocation is the finding.
    let _ = targets::adapter(targets::Fixtures::bundled(), data);
});
