//! Choosing among cuBLASLt's algorithms by timing them: the heuristic ranks up to
//! [`CANDIDATES`] algorithms for a plan's shapes, and on the plan's first call each one runs on
//! that call's own operands (one warm-up, then [`RUNS`] timed runs between CUDA events) and
//! the fastest is kept for every later call of the plan. The heuristic's first choice is not
//! always the fastest on the engine's shapes (OPT-1.3B's q/k/v projection with the LoRA fold's
//! K of 2112 ran at 711–719 TFLOP/s where its other GEMMs reach 786–813).
//!
//! Timing needs a host synchronisation, so it only happens where one is allowed: not while the
//! stream is being captured into a CUDA graph (the engine captures a step only after running it
//! once directly, so its plans already exist). It also needs the call to be repeatable: an
//! in-place call (C = D with `beta != 0`) would add into D again on every run, so in-place
//! plans keep the heuristic's first choice. Off with `LEXP_LT_AUTOTUNE=0`.

use super::lt;
use cudarc::driver::{sys, CudaStream};
use std::ffi::c_void;
use std::sync::OnceLock;
use tracing::debug;

/// Algorithms asked of the heuristic.
pub const CANDIDATES: usize = 8;

/// Timed runs per candidate (after one untimed).
pub const RUNS: usize = 3;

/// The environment variable that turns the timing off (`=0`).
pub const AUTOTUNE_ENV: &str = "LEXP_LT_AUTOTUNE";

/// True unless [`AUTOTUNE_ENV`] is `0`; read once per process.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(AUTOTUNE_ENV).as_deref() != Ok("0"))
}

/// One call's arguments in cuBLASLt's order (its A is the row-major B), for timing.
pub struct Call {
    pub handle: lt::cublasLtHandle_t,
    pub desc: lt::cublasLtMatmulDesc_t,
    pub layouts: [lt::cublasLtMatrixLayout_t; 4],
    /// A, B, C, D device addresses.
    pub ptrs: [u64; 4],
    pub alpha: f32,
    pub beta: f32,
    /// Workspace address and bytes.
    pub workspace: (u64, usize),
}

/// True when `call` may be run repeatedly to time it: not in place with an accumulation, and
/// the stream not capturing.
pub fn may_time(call: &Call, stream: &CudaStream) -> bool {
    let [_, _, c, d] = call.ptrs;
    let in_place = c == d && call.beta != 0.0;
    let capturing = !matches!(
        stream.capture_status(),
        Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    );
    enabled() && !in_place && !capturing
}

/// The index of the fastest of `algos` for `call` (median of [`RUNS`] runs each), or `None`
/// when none ran; candidates that fail to launch are skipped.
///
/// # Safety
/// `call`'s handle, descriptor and layouts are live and describe the operands at its
/// pointers, which hold at least what the layouts span; the workspace holds its bytes.
pub unsafe fn fastest(
    call: &Call,
    algos: &[lt::cublasLtMatmulAlgo_t],
    stream: &CudaStream,
) -> Option<usize> {
    let ctx = stream.context();
    let event = || {
        ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    };
    let events: Vec<_> = (0..2 * RUNS).map(|_| event()).collect::<Option<_>>()?;
    let [la, lb, lc, ld] = call.layouts;
    let [pa, pb, pc, pd] = call.ptrs;
    let run = |algo: &lt::cublasLtMatmulAlgo_t| {
        lt::cublasLtMatmul(
            call.handle,
            call.desc,
            (&call.alpha as *const f32).cast::<c_void>(),
            pa as *const c_void,
            la,
            pb as *const c_void,
            lb,
            (&call.beta as *const f32).cast::<c_void>(),
            pc as *const c_void,
            lc,
            pd as *mut c_void,
            ld,
            algo,
            call.workspace.0 as *mut c_void,
            call.workspace.1,
            stream.cu_stream() as lt::cudaStream_t,
        ) == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS
    };
    let mut best: Option<(usize, f32)> = None;
    for (i, algo) in algos.iter().enumerate() {
        if !run(algo) {
            continue;
        }
        let mut ok = true;
        for pair in events.chunks_exact(2) {
            ok &= pair[0].record(stream).is_ok() && run(algo) && pair[1].record(stream).is_ok();
        }
        if !ok || stream.synchronize().is_err() {
            continue;
        }
        let mut times: Vec<f32> = events
            .chunks_exact(2)
            .filter_map(|p| p[0].elapsed_ms(&p[1]).ok())
            .collect();
        if times.len() != RUNS {
            continue;
        }
        times.sort_by(f32::total_cmp);
        let t = times[RUNS / 2];
        debug!(candidate = i, ms = t, "cuBLASLt algorithm timed");
        if best.is_none_or(|(_, b)| t < b) {
            best = Some((i, t));
        }
    }
    best.map(|(i, _)| i)
}
