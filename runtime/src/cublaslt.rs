//! cuBLASLt GEMMs with fused epilogues, on the same context and stream as a [`Blas`] handle:
//! the GPU engine's bias adds, residual adds and forward ReLU run inside the GEMM that produces
//! their input instead of as separate element-wise kernels.
//!
//! One call ([`BlasLt::matmul`]) computes, row-major like [`Blas::gemm_strided_batched`]:
//!
//! ```text
//! D = epilogue(alpha·op(A)·op(B) + beta·C)      C: another matrix, or D itself in place
//! None:        nothing           (a plain GEMM: the layers' input gradients)
//! Bias:        + bias            (one value per column of D)
//! ReluBias:    relu(… + bias)
//! ```
//!
//! Rounding: on the H200 (cuBLASLt 130100) some algorithms round `alpha·op(A)·op(B) + beta·C`
//! to D's type before adding the bias (single elements up to two half-ulps off at 37x53x29,
//! `runtime/tests/gpu_cublaslt.rs`), which is what the unfused GEMM + bias kernel does too.
//! Row-major `D[M,N]` is column-major `Dᵀ[N,M] = op(B)ᵀ·op(A)ᵀ` on the same memory (the
//! mapping of [`Blas::gemm`]), so cuBLASLt's per-row bias is a per-column bias here.
//!
//! The ReLU-mask epilogues (RELU_AUX_BIAS, DRELU) were tried and removed: the DRELU GEMM ran
//! at 355 TFLOP/s on OPT-1.3B's fc2 input gradient, and its output failed the wrapper's GPU
//! test (`bench/results/2026-11-29-h200-gpu-cublaslt-tests-*`).
//!
//! Descriptors, layouts and the heuristic's algorithm are cached per [`PlanKey`] (shapes,
//! types, epilogue, pointer alignments), so a warm training step makes no heuristic query:
//! each call only sets the bias pointer on its cached descriptor and launches.
//! libcublasLt is loaded at run time through cudarc, like libcublas; a missing library is a
//! [`BlasError::Unavailable`] that says how to make it visible.
//!
//! [`Blas`]: crate::cublas::Blas
//! [`Blas::gemm`]: crate::cublas::Blas::gemm
//! [`Blas::gemm_strided_batched`]: crate::cublas::Blas::gemm_strided_batched

use crate::buffer::DeviceTensor;
use crate::cublas::{
    find_dirs_holding, gemm_types, panic_text, usual_cublas_places, BlasError, BlasResult, Mat,
    MatLayout, MatMut, CUBLAS_HINT,
};
use crate::error::DeviceError;
use crate::profile::Profiler;
use cudarc::cublaslt::sys::{
    self as lt, cublasComputeType_t, cublasLtMatmulDescAttributes_t as Desc,
    cublasLtMatmulPreferenceAttributes_t as Pref, cublasStatus_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, CudaStream};
use lexp_compiler::dtype::Storage;
use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use tracing::{debug, info, trace, warn};

/// Bytes of the workspace cuBLASLt's kernels may use (NVIDIA's recommendation for Hopper),
/// allocated once per handle.
pub const WORKSPACE_BYTES: usize = 32 << 20;

mod args;
pub use args::*;

/// A cached matmul: descriptor, layouts and the algorithm the heuristic chose.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 4],
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Plan {
    /// The layouts to pass for A, B, C, D: D's for C when they are the same layout, so that
    /// an in-place call (C = D) passes one descriptor for both, as cuBLASLt asks.
    fn call_layouts(&self, key: &PlanKey) -> [lt::cublasLtMatrixLayout_t; 4] {
        let [la, lb, lc, ld] = self.layouts;
        let lc = if key.args.c == key.args.d { ld } else { lc };
        [la, lb, lc, ld]
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by cuBLASLt for this plan and is destroyed once;
        // failures cannot be reported from a drop and leak at worst.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt::cublasLtMatrixLayoutDestroy(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

/// The handle and the plan cache, used under one lock.
struct State {
    handle: lt::cublasLtHandle_t,
    /// `None` for a key the heuristic has no algorithm for.
    plans: HashMap<PlanKey, Option<Plan>>,
    /// Heuristic queries made so far (one per key).
    queries: u64,
}

/// A cuBLASLt handle on a stream, with its workspace and plan cache (see the module docs).
/// Made by [`Blas::lt`](crate::cublas::Blas::lt).
pub struct BlasLt {
    state: Mutex<State>,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    profiler: Arc<Profiler>,
    version: usize,
}

// SAFETY: the raw cuBLASLt handles are only used under the `state` lock (one thread at a
// time); cuBLASLt handles and descriptors may move between threads.
unsafe impl Send for BlasLt {}
// SAFETY: see `Send`: every use of the handles goes through the mutex.
unsafe impl Sync for BlasLt {}

impl std::fmt::Debug for BlasLt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlasLt")
            .field("version", &self.version)
            .finish()
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        state.plans.clear();
        // SAFETY: the handle was created by `cublasLtCreate` and is destroyed once.
        unsafe {
            let _ = lt::cublasLtDestroy(state.handle);
        }
    }
}

/// `"CUBLAS_STATUS_NOT_SUPPORTED (the functionality requested is not supported)"`.
fn describe(status: cublasStatus_t) -> String {
    // SAFETY: only called with a status a cuBLASLt call returned, so the library is loaded;
    // the string is static inside it.
    let text = unsafe {
        let p = lt::cublasLtGetStatusString(status);
        (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
    };
    match text {
        Some(t) => format!("{status:?} ({t})"),
        None => format!("{status:?}"),
    }
}

fn check(status: cublasStatus_t, context: impl FnOnce() -> String) -> BlasResult<()> {
    match status {
        cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(BlasError::Cublas {
            context: context(),
            status: describe(s),
        }),
    }
}

/// The error for a missing `libcublasLt`: the names searched, a directory holding a copy if
/// one is seen, and the fix.
pub fn missing_lt_message(detail: Option<&str>) -> String {
    let mut names = cudarc::get_lib_name_candidates("cublasLt");
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let mut msg = format!(
        "libcublasLt could not be loaded (searched the loader path for {})",
        names.join(", ")
    );
    if let Some(d) = detail {
        msg.push_str(&format!(": {d}"));
    }
    match find_dirs_holding(&usual_cublas_places(), "libcublasLt.so").first() {
        Some(dir) => msg.push_str(&format!(
            "; a copy is in {}: export LD_LIBRARY_PATH={}:$LD_LIBRARY_PATH before starting \
             the program (libcublasLt ships next to libcublas; in general: {CUBLAS_HINT})",
            dir.display(),
            dir.display()
        )),
        None => msg.push_str(&format!(
            "; libcublasLt ships next to libcublas: {CUBLAS_HINT}"
        )),
    }
    msg
}

/// The cuBLASLt type of a GEMM operand type.
fn lt_type(s: Storage) -> Option<cudaDataType_t> {
    match s {
        Storage::BF16 => Some(cudaDataType_t::CUDA_R_16BF),
        Storage::F16 => Some(cudaDataType_t::CUDA_R_16F),
        Storage::F32 => Some(cudaDataType_t::CUDA_R_32F),
        Storage::I32 => None,
    }
}

/// Sets one descriptor attribute from a plain value.
///
/// # Safety
/// `desc` is a live descriptor and `T` the attribute's documented type.
unsafe fn set_desc<T>(desc: lt::cublasLtMatmulDesc_t, attr: Desc, v: &T) -> cublasStatus_t {
    lt::cublasLtMatmulDescSetAttribute(
        desc,
        attr,
        (v as *const T).cast::<c_void>(),
        std::mem::size_of::<T>(),
    )
}

/// Sets one preference attribute from a plain value.
///
/// # Safety
/// `pref` is a live preference descriptor and `T` the attribute's documented type.
unsafe fn set_pref<T>(pref: lt::cublasLtMatmulPreference_t, attr: Pref, v: &T) -> cublasStatus_t {
    lt::cublasLtMatmulPreferenceSetAttribute(
        pref,
        attr,
        (v as *const T).cast::<c_void>(),
        std::mem::size_of::<T>(),
    )
}

impl BlasLt {
    /// Loads cuBLASLt, creates a handle and allocates its [`WORKSPACE_BYTES`] workspace on
    /// `stream`. A missing library is [`BlasError::Unavailable`] (never a panic).
    pub fn new(stream: &Arc<CudaStream>, profiler: Arc<Profiler>) -> BlasResult<BlasLt> {
        // SAFETY: only tries `dlopen` on the candidate names; nothing is called.
        if !unsafe { lt::is_culib_present() } {
            return Err(BlasError::Unavailable(missing_lt_message(None)));
        }
        let bind = |e| BlasError::Device(DeviceError::driver("binding the context", e));
        stream.context().bind_to_thread().map_err(bind)?;
        let created = catch_unwind(AssertUnwindSafe(|| {
            let mut handle = std::ptr::null_mut();
            // SAFETY: `handle` is a valid out-pointer; the version call has no arguments.
            let status = unsafe { lt::cublasLtCreate(&mut handle) };
            (status, handle, unsafe { lt::cublasLtGetVersion() })
        }));
        let (handle, version) = match created {
            Ok((cublasStatus_t::CUBLAS_STATUS_SUCCESS, h, v)) => (h, v),
            Ok((s, _, _)) => {
                return Err(BlasError::Unavailable(format!(
                    "creating a cuBLASLt handle failed: {}",
                    describe(s)
                )))
            }
            Err(payload) => {
                return Err(BlasError::Unavailable(missing_lt_message(Some(
                    panic_text(payload.as_ref()),
                ))))
            }
        };
        let state = State {
            handle,
            plans: HashMap::new(),
            queries: 0,
        };
        // Made before the allocation so that a failure below still destroys the handle.
        let workspace = match stream.alloc_zeros::<u8>(WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created above, destroyed once.
                unsafe { lt::cublasLtDestroy(handle) };
                return Err(BlasError::Device(DeviceError::driver(
                    "allocating the cuBLASLt workspace",
                    e,
                )));
            }
        };
        info!(version, "cuBLASLt handle created");
        Ok(BlasLt {
            state: Mutex::new(state),
            stream: stream.clone(),
            workspace,
            profiler,
            version,
        })
    }

    /// cuBLASLt's version number (e.g. `130100`).
    pub fn version(&self) -> usize {
        self.version
    }

    /// Keys cached so far (with or without an algorithm), and heuristic queries made so far
    /// (one per key): a warm training step adds to neither.
    pub fn cache_stats(&self) -> (usize, u64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.plans.len(), s.queries)
    }

    fn same_stream(&self, name: &str, t: &DeviceTensor) -> BlasResult<()> {
        if t.slice().stream().cu_stream() == self.stream.cu_stream() {
            Ok(())
        } else {
            Err(BlasError::InvalidArgument(format!(
                "`{name}` was allocated on another device or stream than this cuBLASLt handle"
            )))
        }
    }

    /// Row-major `d = epilogue(alpha·op(a)·op(b) + beta·c)`, f32 accumulation and epilogue,
    /// one rounding to `d`'s type (see the module docs for the epilogues).
    ///
    /// Conventions of [`Blas::gemm_strided_batched`](crate::cublas::Blas::gemm_strided_batched)
    /// for `a`, `b`, `d` (one matrix each, anywhere inside their tensors); `c` of `d`'s shape
    /// and type, or `None` for `d` itself (in place; not read when `beta == 0`). `a` and `b`
    /// bf16, f16 or f32 (one type), `c`/`d` that type or f32, the bias of `d`'s type. Checked
    /// before anything is queued; `M` or `N` of 0 queues nothing, `K` of 0 is refused. The
    /// first call for a [`PlanKey`] queries cuBLASLt's heuristic; later ones reuse its choice.
    /// When cuBLASLt has no algorithm for the call, fails with the `CUBLAS_STATUS_NOT_SUPPORTED`
    /// [`BlasError::Cublas`] ([`BlasLt::try_matmul`] reports that case instead).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        a: Mat<'_>,
        b: Mat<'_>,
        c: Option<Mat<'_>>,
        d: MatMut<'_>,
        trans: (bool, bool),
        scale: (f32, f32),
        epilogue: Epilogue<'_>,
    ) -> BlasResult<()> {
        let kind = epilogue.parts().0;
        let shape = (a.layout.rows, a.layout.cols, d.layout.cols);
        match self.try_matmul(a, b, c, d, trans, scale, epilogue)? {
            true => Ok(()),
            false => Err(BlasError::Cublas {
                context: format!(
                    "cuBLASLt GEMM (a {}x{}, d with {} columns) with the {} epilogue",
                    shape.0,
                    shape.1,
                    shape.2,
                    kind.name()
                ),
                status: describe(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED),
            }),
        }
    }

    /// [`BlasLt::matmul`], returning `Ok(false)` (having queued nothing) when cuBLASLt's
    /// heuristic has no algorithm for the call (remembered: asked once per [`PlanKey`], with
    /// one warning), so that the caller can fall back to an unfused path.
    #[allow(clippy::too_many_arguments)]
    pub fn try_matmul(
        &self,
        a: Mat<'_>,
        b: Mat<'_>,
        c: Option<Mat<'_>>,
        d: MatMut<'_>,
        (trans_a, trans_b): (bool, bool),
        (alpha, beta): (f32, f32),
        epilogue: Epilogue<'_>,
    ) -> BlasResult<bool> {
        let (ab, cd) = (a.tensor.dtype(), d.tensor.dtype());
        gemm_types(ab, b.tensor.dtype(), cd)?;
        let (kind, bias) = epilogue.parts();
        for (name, t) in [("c", c.map(|c| c.tensor)), ("bias", bias)] {
            if let Some(t) = t.filter(|t| t.dtype() != cd) {
                return Err(BlasError::DType(format!(
                    "cuBLASLt GEMM `{name}` is {} but `d` is {}",
                    t.dtype().name(),
                    cd.name()
                )));
            }
        }
        let args = lt_args(
            (&a.layout, a.tensor.numel()),
            (&b.layout, b.tensor.numel()),
            c.as_ref().map(|c| (&c.layout, c.tensor.numel())),
            (&d.layout, d.tensor.numel()),
            trans_a,
            trans_b,
            kind,
            bias.map(DeviceTensor::numel),
        )?;
        self.same_stream("a", a.tensor)?;
        self.same_stream("b", b.tensor)?;
        self.same_stream("d", d.tensor)?;
        for (name, t) in [("c", c.map(|c| c.tensor)), ("bias", bias)] {
            if let Some(t) = t {
                self.same_stream(name, t)?;
            }
        }
        let flag = |t: bool| if t { 'T' } else { 'N' };
        let (m, n, k) = (args.n, args.m, args.k);
        let what = || {
            format!(
                "cuBLASLt GEMM {m}x{n}x{k} ({}{}) of {} into {} with the {} epilogue",
                flag(trans_a),
                flag(trans_b),
                ab.name(),
                cd.name(),
                kind.name()
            )
        };
        if m == 0 || n == 0 {
            return Ok(true);
        }
        if k == 0 {
            return Err(BlasError::Shape(format!(
                "{}: K = 0 is not supported",
                what()
            )));
        }
        let ptr = |t: &DeviceTensor, l: &MatLayout| {
            t.device_ptr() + (l.offset * t.dtype().bytes()) as u64
        };
        let (pa, pb, pd) = (
            ptr(a.tensor, &a.layout),
            ptr(b.tensor, &b.layout),
            ptr(d.tensor, &d.layout),
        );
        let pc = c.map_or(pd, |c| ptr(c.tensor, &c.layout));
        let pbias = bias.map_or(0, DeviceTensor::device_ptr);
        // cuBLASLt's A is the row-major B's buffer and its B the row-major A's.
        let key = PlanKey {
            args,
            ab,
            cd,
            epilogue: kind,
            align: [pb, pa, pc, pd, pbias].map(alignment),
        };
        let bind = |e| BlasError::Device(DeviceError::driver("binding the context", e));
        self.stream.context().bind_to_thread().map_err(bind)?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let handle = state.handle;
        if !state.plans.contains_key(&key) {
            let plan = self.plan(handle, &key, pbias, &what)?;
            state.queries += 1;
            state.plans.insert(key, plan);
        }
        let plan = match state.plans.get(&key) {
            Some(Some(p)) => p,
            Some(None) => return Ok(false),
            None => return Err(BlasError::InvalidArgument(format!("{}: no plan", what()))),
        };
        trace!(?key, alpha, beta, "cuBLASLt GEMM");
        // SAFETY: the descriptor is live and the attributes take device pointers.
        unsafe { self.set_pointers(plan.desc, pbias) }.map_or(Ok(()), |s| {
            check(s, || format!("{}: setting pointers", what()))
        })?;
        let (ws, _sync) = {
            use cudarc::driver::DevicePtr;
            self.workspace.device_ptr(&self.stream)
        };
        let [la, lb, lc, ld] = plan.call_layouts(&key);
        let name = || {
            format!(
                "cublas gemm {m}x{n}x{k} {}{} lt {}",
                flag(trans_a),
                flag(trans_b),
                kind.name()
            )
        };
        // Named like cuBLAS's GEMMs (the profile groups them as `cublas gemm`), `lt` and the
        // epilogue marking the fused ones.
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        // SAFETY: `lt_args` checked every matrix against its tensor's extent with these
        // layouts and the bias length; the plan's layouts and descriptor were
        // made from the same key; alpha and beta are f32 host values (the default pointer
        // mode, f32 scale type); `d` is borrowed mutably, so it aliases no input except C
        // when C is D (in place, same layout, which cuBLASLt allows); the workspace holds
        // WORKSPACE_BYTES, the size the heuristic was told.
        let status = self.profiler.span(&self.stream, name, flops, || unsafe {
            lt::cublasLtMatmul(
                handle,
                plan.desc,
                (&alpha as *const f32).cast::<c_void>(),
                pb as *const c_void,
                la,
                pa as *const c_void,
                lb,
                (&beta as *const f32).cast::<c_void>(),
                pc as *const c_void,
                lc,
                pd as *mut c_void,
                ld,
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as lt::cudaStream_t,
            )
        });
        check(status, what).map(|()| true)
    }

    /// Sets the bias pointer on `desc`; the failing status if any.
    ///
    /// # Safety
    /// `desc` is a live matmul descriptor.
    unsafe fn set_pointers(
        &self,
        desc: lt::cublasLtMatmulDesc_t,
        bias: u64,
    ) -> Option<cublasStatus_t> {
        let s = set_desc(desc, Desc::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias);
        (s != cublasStatus_t::CUBLAS_STATUS_SUCCESS).then_some(s)
    }

    /// Creates the descriptor and layouts of `key` and asks the heuristic for an algorithm
    /// (with the current bias pointer set: the heuristic reads its alignment);
    /// `None` when it has none (`CUBLAS_STATUS_NOT_SUPPORTED` or no result).
    ///
    /// The heuristic's first choice is kept: timing its top eight on each plan's first call
    /// and keeping the fastest was tried, and the OPT-1.3B 4 x 1024 step took 43.76 ms with
    /// it against 43.70 without, same run
    /// (`bench/results/2026-11-30-h200-lora-fold/call94`).
    fn plan(
        &self,
        handle: lt::cublasLtHandle_t,
        key: &PlanKey,
        bias: u64,
        what: &dyn Fn() -> String,
    ) -> BlasResult<Option<Plan>> {
        let err = |step: &str| {
            let step = step.to_string();
            move |s| BlasError::Cublas {
                context: format!("{}: {step}", what()),
                status: describe(s),
            }
        };
        let res = |s: cublasStatus_t| match s {
            cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
            s => Err(s),
        };
        let (abt, cdt) = match (lt_type(key.ab), lt_type(key.cd)) {
            (Some(x), Some(y)) => (x, y),
            _ => return Err(BlasError::DType(format!("{}: i32 operands", what()))),
        };
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            layouts: [std::ptr::null_mut(); 4],
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let a = &key.args;
        // SAFETY: out-pointers are valid; every attribute gets a value of its documented
        // type (i32 transposes, u32 epilogue, u64 workspace bytes, u32
        // alignments); handles are destroyed by `Plan`'s drop if a later step fails.
        unsafe {
            res(lt::cublasLtMatmulDescCreate(
                &mut plan.desc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cudaDataType_t::CUDA_R_32F,
            ))
            .map_err(err("creating the descriptor"))?;
            for (i, (l, t)) in [(a.a, abt), (a.b, abt), (a.c, cdt), (a.d, cdt)]
                .into_iter()
                .enumerate()
            {
                res(lt::cublasLtMatrixLayoutCreate(
                    &mut plan.layouts[i],
                    t,
                    l.rows as u64,
                    l.cols as u64,
                    l.ld as i64,
                ))
                .map_err(err("creating a layout"))?;
            }
            let d = plan.desc;
            res(set_desc(
                d,
                Desc::CUBLASLT_MATMUL_DESC_TRANSA,
                &(a.transa as i32),
            ))
            .map_err(err("setting transa"))?;
            res(set_desc(
                d,
                Desc::CUBLASLT_MATMUL_DESC_TRANSB,
                &(a.transb as i32),
            ))
            .map_err(err("setting transb"))?;
            res(set_desc(
                d,
                Desc::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &(key.epilogue.sys() as u32),
            ))
            .map_err(err("setting the epilogue"))?;
            if let Some(s) = self.set_pointers(d, bias) {
                return Err(err("setting pointers")(s));
            }
            let mut pref = std::ptr::null_mut();
            res(lt::cublasLtMatmulPreferenceCreate(&mut pref))
                .map_err(err("creating the preference"))?;
            let mut heuristic: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let mut found = 0;
            let mut status = set_pref(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(WORKSPACE_BYTES as u64),
            );
            let aligns = [
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            for (attr, v) in aligns.into_iter().zip(key.align) {
                if status == cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    status = set_pref(pref, attr, &v);
                }
            }
            // Split-K partial sums only in f32 (or none): the default also allows reducing
            // them in place or in the output type, bf16. (This did not change the 1.3–1.7 ulp
            // errors the wrapper's GPU test saw at 37x53x29; see `tests/gpu_cublaslt.rs`.)
            if status == cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                let f32_only =
                    lt::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
                status = set_pref(
                    pref,
                    Pref::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    &f32_only,
                );
            }
            if status == cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                let [la, lb, lc, ld] = plan.call_layouts(key);
                status = lt::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    plan.desc,
                    la,
                    lb,
                    lc,
                    ld,
                    pref,
                    1,
                    &mut heuristic,
                    &mut found,
                );
            }
            let _ = lt::cublasLtMatmulPreferenceDestroy(pref);
            let unsupported = cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
            if status == unsupported
                || (status == cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && (found == 0 || heuristic.state == unsupported))
            {
                warn!(?key, "cuBLASLt has no algorithm for {}", what());
                return Ok(None);
            }
            res(status).map_err(err("querying the heuristic"))?;
            res(heuristic.state).map_err(err("the heuristic's algorithm"))?;
            plan.algo = heuristic.algo;
        }
        debug!(?key, "cuBLASLt plan created");
        Ok(Some(plan))
    }
}

#[cfg(test)]
#[path = "cublaslt_tests.rs"]
mod tests;
