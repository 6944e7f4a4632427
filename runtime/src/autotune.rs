//! Autotuning: the macro compiles a few tile configurations per kernel; the runtime times them
//! once per (device, kernel, element type, shape bucket) and remembers the fastest on disk.
//!
//! The cache is a small text file, one line per choice: `key<TAB>NAME=VALUE,NAME=VALUE`. It is
//! written atomically (a temporary file, then a rename), so a crash never leaves half a cache;
//! a line that does not parse is skipped with a warning, never trusted. The default location is
//! `$LEXP_AUTOTUNE_CACHE`, else `$XDG_CACHE_HOME/lexp/autotune.tsv`, else
//! `~/.cache/lexp/autotune.tsv`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One tile configuration: `(constant name, value)` pairs, as `launch_with` takes them.
pub type Config = Vec<(&'static str, usize)>;

/// Why tuning failed.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    /// No candidate configuration was given.
    #[error("autotune `{0}`: no candidate configurations")]
    NoCandidates(String),
    /// Every candidate failed to run.
    #[error("autotune `{key}`: every candidate failed; last error: {last}")]
    AllFailed { key: String, last: String },
    /// The cache file could not be written.
    #[error("autotune cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
}

/// The shape bucket of a launch: every extent rounded up to a power of two (`4096x2048`), so
/// that nearby shapes share a tuning result.
pub fn shape_bucket(dims: &[usize]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.max(&1).next_power_of_two().to_string())
        .collect();
    parts.join("x")
}

/// The cache key of a launch.
pub fn key(device: &str, kernel: &str, dtype: &str, dims: &[usize]) -> String {
    format!("{device}|{kernel}|{dtype}|{}", shape_bucket(dims))
}

/// Remembers the fastest configuration per key, in memory and (optionally) on disk.
pub struct Autotuner {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Vec<(String, usize)>>>,
}

fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LEXP_AUTOTUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("lexp").join("autotune.tsv"))
}

fn parse(text: &str, path: &Path) -> BTreeMap<String, Vec<(String, usize)>> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = line.split_once('\t').and_then(|(k, cfg)| {
            let pairs: Option<Vec<(String, usize)>> = if cfg.is_empty() {
                Some(vec![])
            } else {
                cfg.split(',')
                    .map(|p| {
                        p.split_once('=')
                            .and_then(|(n, v)| v.parse().ok().map(|v| (n.to_string(), v)))
                    })
                    .collect()
            };
            pairs.map(|p| (k.to_string(), p))
        });
        match parsed {
            Some((k, p)) => {
                out.insert(k, p);
            }
            None => tracing::warn!(
                "{}:{}: unreadable autotune entry skipped",
                path.display(),
                i + 1
            ),
        }
    }
    out
}

impl Autotuner {
    /// A tuner backed by the default cache file (see the module doc).
    pub fn new() -> Autotuner {
        Autotuner::with_path(default_path())
    }

    /// A tuner backed by `path` (`None`: memory only).
    pub fn with_path(path: Option<PathBuf>) -> Autotuner {
        let entries = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => parse(&text, p),
                Err(_) => BTreeMap::new(),
            },
            None => BTreeMap::new(),
        };
        Autotuner {
            path,
            entries: Mutex::new(entries),
        }
    }

    /// The cached choice for `key`, mapped back onto one of `candidates`.
    pub fn cached(&self, key: &str, candidates: &[Config]) -> Option<Config> {
        let entries = self.entries.lock().ok()?;
        let want = entries.get(key)?;
        candidates
            .iter()
            .find(|c| {
                c.len() == want.len()
                    && c.iter()
                        .zip(want)
                        .all(|((n, v), (wn, wv))| n == wn && v == wv)
            })
            .cloned()
    }

    /// The fastest of `candidates` for `key`: from the cache, else by calling `time` on each
    /// (it returns a duration, e.g. the median of timed launches; an error skips that
    /// candidate), then remembered and written to the cache file.
    pub fn choose<E: std::fmt::Display>(
        &self,
        key: &str,
        candidates: &[Config],
        mut time: impl FnMut(&Config) -> Result<f64, E>,
    ) -> Result<Config, TuneError> {
        if candidates.is_empty() {
            return Err(TuneError::NoCandidates(key.to_string()));
        }
        if let Some(c) = self.cached(key, candidates) {
            return Ok(c);
        }
        let mut best: Option<(f64, &Config)> = None;
        let mut last = String::new();
        for c in candidates {
            match time(c) {
                Ok(t) if best.map(|(b, _)| t < b).unwrap_or(true) => best = Some((t, c)),
                Ok(_) => {}
                Err(e) => last = e.to_string(),
            }
        }
        let Some((t, chosen)) = best else {
            return Err(TuneError::AllFailed {
                key: key.to_string(),
                last,
            });
        };
        tracing::info!("autotune {key}: {chosen:?} ({t:.4})");
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                key.to_string(),
                chosen.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            );
        }
        self.save()?;
        Ok(chosen.clone())
    }

    /// Writes the cache file atomically.
    fn save(&self) -> Result<(), TuneError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let fail = |message: String| TuneError::Cache {
            path: path.clone(),
            message,
        };
        let text: String = match self.entries.lock() {
            Ok(entries) => entries
                .iter()
                .map(|(k, cfg)| {
                    let c: Vec<String> = cfg.iter().map(|(n, v)| format!("{n}={v}")).collect();
                    format!("{k}\t{}\n", c.join(","))
                })
                .collect(),
            Err(_) => return Err(fail("cache lock poisoned".into())),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| fail(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| fail(e.to_string()))
    }
}

impl Default for Autotuner {
    fn default() -> Self {
        Autotuner::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands() -> Vec<Config> {
        vec![
            vec![("BLOCK", 1024)],
            vec![("BLOCK", 2048)],
            vec![("BLOCK", 4096)],
        ]
    }

    #[test]
    fn picks_the_fastest_times_once_and_persists() {
        let dir = std::env::temp_dir().join(format!("lexp-autotune-{}", std::process::id()));
        let path = dir.join("cache.tsv");
        let _ = std::fs::remove_file(&path);
        let tuner = Autotuner::with_path(Some(path.clone()));
        let key = key("H200", "softmax", "bf16", &[30000, 4096]);
        assert_eq!(key, "H200|softmax|bf16|32768x4096");
        let mut calls = 0;
        let timings = [3.0, 1.0, 2.0];
        let got = tuner
            .choose(&key, &cands(), |c| {
                calls += 1;
                Ok::<f64, String>(timings[cands().iter().position(|x| x == c).unwrap_or(0)])
            })
            .unwrap();
        assert_eq!(got, vec![("BLOCK", 2048)]);
        assert_eq!(calls, 3);
        // Cached: no more timing, in this tuner and in a new one reading the file.
        let again = tuner
            .choose(&key, &cands(), |_| -> Result<f64, String> {
                panic!("timed again")
            })
            .unwrap();
        assert_eq!(again, got);
        let fresh = Autotuner::with_path(Some(path.clone()));
        assert_eq!(fresh.cached(&key, &cands()), Some(got));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failing_candidates_are_skipped_and_all_failing_is_an_error() {
        let tuner = Autotuner::with_path(None);
        let got = tuner
            .choose("k", &cands(), |c| {
                if c[0].1 == 1024 {
                    Err("launch failed".to_string())
                } else {
                    Ok(c[0].1 as f64)
                }
            })
            .unwrap();
        assert_eq!(got, vec![("BLOCK", 2048)]);
        let err = tuner
            .choose("k2", &cands(), |_| Err::<f64, _>("no GPU"))
            .unwrap_err();
        assert!(err.to_string().contains("no GPU"), "{err}");
        assert!(tuner.choose::<String>("k3", &[], |_| Ok(1.0)).is_err());
    }

    #[test]
    fn a_corrupt_cache_line_is_skipped_not_trusted() {
        let dir = std::env::temp_dir().join(format!("lexp-autotune-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.tsv");
        std::fs::write(&path, "good\tBLOCK=4096\nbroken line\nbad\tBLOCK=x\n").unwrap();
        let tuner = Autotuner::with_path(Some(path));
        assert_eq!(tuner.cached("good", &cands()), Some(vec![("BLOCK", 4096)]));
        assert_eq!(tuner.cached("bad", &cands()), None);
        // A cached value that is not a candidate any more is ignored (kernels were recompiled).
        assert_eq!(tuner.cached("good", &[vec![("BLOCK", 1024)]]), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
