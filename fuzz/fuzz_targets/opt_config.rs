//! cargo-fuzz target `opt_config`: `targets::opt_config` (see `fuzz/README.md`).
#![no_main]

#[path = "../../runtime/tests/fuzz_parsers/targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // `Ok` and clean errors are both fine; a panic, hang or huge allocation is the finding.
    let _ = targets::opt_config(targets::Fixtures::bundled(), data);
});
