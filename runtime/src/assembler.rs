//! Ahead-of-load assembly: PTX to a cubin with NVIDIA's `ptxas`, cached on disk (opt-in).
//!
//! By default the driver compiles each module's PTX when it is loaded and keeps the result in
//! its own JIT cache (`~/.nv/ComputeCache`), so the machine code depends on the driver. With
//! `$LEXP_PTXAS` naming a `ptxas`, the runtime assembles every module with it and hands the
//! driver the cubin: the same SASS on every machine with that `ptxas`, whose release is part of
//! the cache key and of the benchmark reports ([`crate::CudaDevice::module_code`]).
//!
//! This was built to test whether the driver's JIT cache made later processes' kernels slower
//! (the MLP products at 25% density measured 1.19 ms in later processes against 1.02 in the
//! first, `bench/results/2026-11-30-h200-tma/call73`). It did not: cubins loaded from this
//! cache were exactly as slow (1.19 ms), and freshly assembled ones as fast as freshly
//! JIT-compiled PTX (1.02 ms), with ptxas 13.0 or 12.8 (`bench/results/2026-11-30-h200-timing`,
//! call 74). The runtime therefore leaves modules to the driver unless asked.
//!
//! `$LEXP_PTXAS` is a path (`ptxas` searches `PATH`); unset or `off`, nothing is assembled.
//! Cubins are kept under `cubin/` of lexp's cache root
//! ([`crate::train::embedded::cache_root`]: `$LEXP_CACHE`, else `$XDG_CACHE_HOME/lexp`, else
//! `~/.cache/lexp`), one file per (ptxas release, target, PTX), written atomically. Any
//! failure (an assembler that does not run, a PTX it rejects, an unwritable cache, a cubin the
//! driver refuses) leaves the module to the driver's JIT, with a warning: assembling is a
//! reproducibility measure, never a new way to fail.

use crate::train::state::{fnv1a64, write_file_atomic};
use std::path::{Path, PathBuf};
use std::process::Command;
use tracing::{debug, warn};

/// Why a module could not be assembled (the caller falls back to the driver's JIT).
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// `ptxas` could not be started or its output could not be read or written.
    #[error("running {path}: {source}")]
    Io {
        /// The assembler or file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `ptxas` rejected the PTX.
    #[error("{path} failed for {target}: {log}")]
    Rejected {
        /// The assembler.
        path: String,
        /// The `-arch` it was given.
        target: String,
        /// Its standard error.
        log: String,
    },
}

/// A `ptxas` and the cache of what it assembled.
#[derive(Debug, Clone)]
pub struct Assembler {
    ptxas: PathBuf,
    /// The last line of `ptxas --version` (its release), part of every cache key.
    version: String,
    cache: Option<PathBuf>,
}

impl Assembler {
    /// The assembler `$LEXP_PTXAS` names (see the module documentation); `None` when it is
    /// unset, `off`, or does not answer `--version` (then with a warning).
    pub fn from_env() -> Option<Assembler> {
        let named = std::env::var_os("LEXP_PTXAS")?;
        if named == "off" {
            debug!("LEXP_PTXAS=off: modules are left to the driver's JIT");
            return None;
        }
        let cache = crate::train::embedded::cache_root().join("cubin");
        let found = Assembler::at(Path::new(&named), Some(cache));
        if found.is_none() {
            warn!(
                path = %Path::new(&named).display(),
                "LEXP_PTXAS does not run `--version`: modules are left to the driver's JIT"
            );
        }
        found
    }

    /// The assembler at `ptxas` caching into `cache` (`None`: no disk cache), if it runs.
    pub fn at(ptxas: &Path, cache: Option<PathBuf>) -> Option<Assembler> {
        let out = Command::new(ptxas).arg("--version").output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text.lines().last()?.trim().to_string();
        debug!(path = %ptxas.display(), %version, "assembling modules with ptxas");
        Some(Assembler {
            ptxas: ptxas.to_path_buf(),
            version,
            cache,
        })
    }

    /// The assembler's release line, e.g. `Build cuda_13.0.r13.0/compiler.36424714_0`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The cubin of `ptx` for `target` (a `-arch` value such as `sm_90a`), from the cache or
    /// assembled now (and then cached).
    pub fn cubin(&self, ptx: &str, target: &str) -> Result<Vec<u8>, AssembleError> {
        let key = format!(
            "{:016x}",
            fnv1a64(format!("{}\n{target}\n{ptx}", self.version).as_bytes())
        );
        let cached = self
            .cache
            .as_ref()
            .map(|d| d.join(format!("{target}-{key}.cubin")));
        if let Some(bytes) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
            return Ok(bytes);
        }
        let bytes = self.assemble(ptx, target, &key)?;
        if let Some(path) = cached {
            let stored = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| write_file_atomic(&path, &bytes));
            if let Err(e) = stored {
                warn!(path = %path.display(), error = %e, "cannot cache the cubin");
            }
        }
        Ok(bytes)
    }

    fn assemble(&self, ptx: &str, target: &str, key: &str) -> Result<Vec<u8>, AssembleError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| AssembleError::Io { path, source }
        };
        // Unique per call: two devices of one process may assemble the same PTX at once.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lexp-ptxas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let input = dir.join(format!("{key}-{call}.ptx"));
        let output = dir.join(format!("{key}-{call}.cubin"));
        std::fs::write(&input, ptx).map_err(io(&input))?;
        let run = Command::new(&self.ptxas)
            .args(["-O3", "-arch", target, "-o"])
            .arg(&output)
            .arg(&input)
            .output()
            .map_err(io(&self.ptxas));
        let result = run.and_then(|out| {
            if out.status.success() {
                std::fs::read(&output).map_err(io(&output))
            } else {
                Err(AssembleError::Rejected {
                    path: self.ptxas.display().to_string(),
                    target: target.to_string(),
                    log: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
        });
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&output);
        result
    }
}

/// `-arch` for a device of compute capability `major.minor` running PTX of `arch`: the
/// architecture-specific target (`sm_90a`) for Hopper's PTX, the device's own otherwise.
pub fn target(arch: lexp_compiler::launch::Arch, major: u32, minor: u32) -> String {
    match arch {
        lexp_compiler::launch::Arch::Sm90 => "sm_90a".to_string(),
        lexp_compiler::launch::Arch::Sm80 => format!("sm_{major}{minor}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_ptx_architecture() {
        use lexp_compiler::launch::Arch;
        assert_eq!(target(Arch::Sm90, 9, 0), "sm_90a");
        assert_eq!(target(Arch::Sm80, 8, 6), "sm_86");
        assert_eq!(target(Arch::Sm80, 12, 0), "sm_120");
    }

    #[test]
    fn missing_assembler_is_none() {
        assert!(Assembler::at(Path::new("/nonexistent/ptxas"), None).is_none());
    }
}
