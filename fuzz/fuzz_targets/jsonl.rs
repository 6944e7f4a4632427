//! cargo-fuzz target `jsonl`: `targets::jsonl` (see `fuzz/README.md`).
#![no_main]

#[path = "../../runtime/tests/fuzz_parsers/targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::let_caught_panics_unwind();
    // `Ok` and clean errors are both fine; a panic, hang or huge allocation is the finding.
    let _ = targets::jsonl(targets::Fixtures::bundled(), data);
});
