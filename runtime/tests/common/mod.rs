//! What several integration tests share: where `../shared` (fixture models and data) is, and
//! skipping a test without it.
#![allow(dead_code)] // each test binary uses a part

pub mod gpu;

use std::path::{Path, PathBuf};

/// `../shared` beside the checkout, or `$LEXP_SHARED_DIR`.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("LEXP_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// Whether `../shared` (the fixtures and data) is here. Without it (a checkout without the
/// shared folder, as in CI) a test is skipped with a message; `LEXP_REQUIRE_SHARED=1` makes
/// its absence a failure instead (the test then fails when it opens the missing files).
pub fn shared_available() -> bool {
    let dir = shared_dir();
    let here = dir.join("fixtures").is_dir();
    let required = std::env::var("LEXP_REQUIRE_SHARED").as_deref() == Ok("1");
    if !here && !required {
        eprintln!("skipped: no shared fixtures at {}", dir.display());
    }
    here || required
}

/// Returns from the calling test when `../shared` is absent ([`shared_available`]).
#[macro_export]
macro_rules! skip_without_shared {
    () => {
        if !common::shared_available() {
            return;
        }
    };
}

/// Stops a run after `after` steps (as SIGINT would).
pub struct StopAfter {
    /// Steps before the stop.
    pub after: usize,
    /// Steps seen.
    pub steps: usize,
}

impl lexp_runtime::train::Observer for StopAfter {
    fn step(&mut self, _: &lexp_runtime::train::metrics::Record, _: usize, _: usize, _: f64) {
        self.steps += 1;
    }
    fn should_stop(&mut self) -> bool {
        self.steps >= self.after
    }
}
