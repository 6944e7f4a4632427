//! A launch-level profiler on CUDA events: which kernels a piece of work runs, how long each
//! takes on the GPU, and how much of the wall time the GPU spends idle.
//!
//! Every [`CudaDevice`](crate::CudaDevice) owns one [`Profiler`], off by default (then it costs
//! one atomic load per launch). While it is on ([`Profiler::start`] .. [`Profiler::stop`]),
//! each DSL kernel launch and each cuBLAS GEMM is bracketed by a pair of events on the device's
//! stream and recorded with its name (the variant's symbol, or the GEMM's shape) and, for
//! GEMMs, its arithmetic. [`Profiler::stop`] waits for the stream and returns the spans;
//! [`summarize`] aggregates them by name into a [`Profile`].
//!
//! Events serialise nothing that the single stream does not already serialise, so the kernels
//! run as they do unprofiled; each pair adds a few microseconds of host work per launch, which
//! shows up in the wall time (the profile says how much time the GPU was busy, not how fast the
//! unprofiled step is; time it without the profiler).

use crate::{DeviceError, Result};
use cudarc::driver::{sys, CudaEvent, CudaStream};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One recorded launch.
struct Span {
    name: String,
    flops: f64,
    start: CudaEvent,
    end: CudaEvent,
}

/// The per-device profiler (see the [module docs](self)).
#[derive(Default)]
pub struct Profiler {
    on: AtomicBool,
    spans: Mutex<Vec<Span>>,
}

impl std::fmt::Debug for Profiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiler")
            .field("on", &self.on.load(Ordering::Relaxed))
            .finish()
    }
}

/// One launch's measured time.
#[derive(Clone, Debug, PartialEq)]
pub struct Timed {
    /// The kernel's name.
    pub name: String,
    /// Floating-point operations (0 when not known).
    pub flops: f64,
    /// GPU time between its two events, ms.
    pub ms: f64,
}

impl Profiler {
    /// Drops what was recorded and starts recording.
    pub fn start(&self) {
        if let Ok(mut s) = self.spans.lock() {
            s.clear();
        }
        self.on.store(true, Ordering::Release);
    }

    /// True while recording.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Runs `launch` (which queues work on `stream`) between two recorded events when the
    /// profiler is on; just runs it otherwise. An event that cannot be created or recorded
    /// drops this span with a warning rather than failing the launch.
    pub fn span<T>(
        &self,
        stream: &Arc<CudaStream>,
        name: impl FnOnce() -> String,
        flops: f64,
        launch: impl FnOnce() -> T,
    ) -> T {
        if !self.is_on() {
            return launch();
        }
        let event = || {
            stream
                .context()
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        };
        let start = event().and_then(|e| e.record(stream).map(|_| e));
        let r = launch();
        let end = event().and_then(|e| e.record(stream).map(|_| e));
        match (start, end) {
            (Ok(start), Ok(end)) => {
                if let Ok(mut s) = self.spans.lock() {
                    s.push(Span {
                        name: name(),
                        flops,
                        start,
                        end,
                    });
                }
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!("profiler: dropping a span: {e}"),
        }
        r
    }

    /// Stops recording, waits for the recorded work and returns each launch's time, in
    /// launch order.
    pub fn stop(&self) -> Result<Vec<Timed>> {
        self.on.store(false, Ordering::Release);
        let spans = match self.spans.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => {
                return Err(DeviceError::InvalidArgument(
                    "profiler lock poisoned".into(),
                ))
            }
        };
        spans
            .into_iter()
            .map(|s| {
                s.end
                    .synchronize()
                    .and_then(|_| s.start.elapsed_ms(&s.end))
                    .map(|ms| Timed {
                        name: s.name,
                        flops: s.flops,
                        ms: f64::from(ms),
                    })
                    .map_err(|e| DeviceError::driver("reading a profiler event", e))
            })
            .collect()
    }
}

/// One kernel (by name) over a profiled piece of work.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KernelStat {
    /// Variant symbol (DSL kernels) or `cublas gemm MxNxK[ x batch]`.
    pub name: String,
    /// Launches.
    pub launches: usize,
    /// Total GPU time, ms.
    pub total_ms: f64,
    /// Share of the summed GPU time of all kernels.
    pub share: f64,
    /// Achieved TFLOP/s (GEMMs; `None` where the arithmetic is not known).
    pub tflops: Option<f64>,
}

/// The kernel family of a recorded name: the DSL kernel's name without its variant suffix
/// (`layernorm_fwd_bf16_1024_a16` → `layernorm_fwd`), or `cublas gemm`.
pub fn group_of(name: &str) -> &str {
    if name.starts_with("cublas gemm") {
        return "cublas gemm";
    }
    for dt in ["_bf16", "_f16", "_f32", "_i32"] {
        if let Some(i) = name.find(dt) {
            return &name[..i];
        }
    }
    name
}

/// A profiled piece of work.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Profile {
    /// Wall time of the work (host clock), ms.
    pub wall_ms: f64,
    /// Sum of the kernels' GPU times, ms.
    pub kernel_ms: f64,
    /// `1 − kernel_ms / wall_ms`: the time the GPU did not run a recorded kernel (host work,
    /// copies, synchronisation, launch gaps), as a share of the wall time.
    pub idle_share: f64,
    /// Launches recorded.
    pub launches: usize,
    /// Per kernel family ([`group_of`]), the largest total first.
    pub groups: Vec<KernelStat>,
    /// Per kernel, the largest total first.
    pub kernels: Vec<KernelStat>,
}

/// Aggregates `timed` launches by name and by family; `wall_ms` is the work's wall time.
pub fn summarize(timed: &[Timed], wall_ms: f64) -> Profile {
    let kernel_ms: f64 = timed.iter().map(|t| t.ms).sum();
    Profile {
        wall_ms,
        kernel_ms,
        idle_share: if wall_ms > 0.0 {
            (1.0 - kernel_ms / wall_ms).max(0.0)
        } else {
            0.0
        },
        launches: timed.len(),
        groups: aggregate(timed, kernel_ms, |n| group_of(n)),
        kernels: aggregate(timed, kernel_ms, |n| n),
    }
}

/// Per `key(name)`: launches, time, share of `kernel_ms`, TFLOP/s; the largest total first.
fn aggregate<'a>(
    timed: &'a [Timed],
    kernel_ms: f64,
    key: impl Fn(&'a str) -> &'a str,
) -> Vec<KernelStat> {
    let mut by: HashMap<&str, (usize, f64, f64)> = HashMap::new();
    for t in timed {
        let e = by.entry(key(&t.name)).or_default();
        e.0 += 1;
        e.1 += t.ms;
        e.2 += t.flops;
    }
    let mut out: Vec<KernelStat> = by
        .into_iter()
        .map(|(name, (n, ms, flops))| KernelStat {
            name: name.to_string(),
            launches: n,
            total_ms: ms,
            share: if kernel_ms > 0.0 { ms / kernel_ms } else { 0.0 },
            tflops: (flops > 0.0 && ms > 0.0).then(|| flops / (ms * 1e-3) / 1e12),
        })
        .collect();
    out.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms).then(a.name.cmp(&b.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_aggregates_by_name_largest_first() {
        let t = |name: &str, flops: f64, ms: f64| Timed {
            name: name.into(),
            flops,
            ms,
        };
        let p = summarize(
            &[
                t("layernorm", 0.0, 0.5),
                t("cublas gemm 8x8x8", 2e9, 1.0),
                t("layernorm", 0.0, 0.5),
                t("cublas gemm 8x8x8", 2e9, 1.0),
            ],
            4.0,
        );
        assert_eq!(p.launches, 4);
        assert_eq!(p.kernel_ms, 3.0);
        assert!((p.idle_share - 0.25).abs() < 1e-12);
        assert_eq!(p.kernels[0].name, "cublas gemm 8x8x8");
        assert_eq!(p.kernels[0].launches, 2);
        assert!((p.kernels[0].share - 2.0 / 3.0).abs() < 1e-12);
        assert!((p.kernels[0].tflops.unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(p.kernels[1].tflops, None);
        assert_eq!(p.groups[0].name, "cublas gemm");
    }

    #[test]
    fn families_drop_the_variant_suffix() {
        assert_eq!(group_of("layernorm_fwd_bf16_1024_a16"), "layernorm_fwd");
        assert_eq!(group_of("flash_fwd_f16_64_128_128_2_8_a16"), "flash_fwd");
        assert_eq!(group_of("cublas gemm 4096x6144x2048 NT"), "cublas gemm");
        assert_eq!(group_of("odd"), "odd");
    }

    #[test]
    fn an_idle_profiler_just_runs_the_work() {
        let p = Profiler::default();
        assert!(!p.is_on());
        assert_eq!(p.stop().unwrap(), vec![]);
    }
}
