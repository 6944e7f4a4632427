//! cuBLAS baselines for benchmarks: row-major GEMM and PEFT-style LoRA forward/backward, on
//! the same context and stream as a [`CudaDevice`].
//!
//! [`Blas`] wraps a cuBLAS handle bound to the device's one stream, so cuBLAS calls are ordered
//! with lexp's own kernels, copies and timing events (see [`crate::time_ms`]). cuBLAS is loaded
//! at run time through cudarc like the driver: the crate builds without it, and
//! [`Blas::new`] reports a missing `libcublas.so` as [`BlasError::Unavailable`], with the
//! command that makes it visible, instead of panicking.
//!
//! All tensors are contiguous row-major [`DeviceTensor`]s; cuBLAS is column-major, so
//! [`Blas::gemm`] computes `Cᵀ = op(B)ᵀ·op(A)ᵀ` on the same memory (a row-major matrix is its
//! transpose in column-major order), which needs no copies.
//!
//! The LoRA baselines ([`lora_forward_baseline`], [`lora_backward_baseline`]) issue the same
//! GEMMs as PEFT's `lora.Linear` under PyTorch autograd, with the scaling folded into GEMM
//! `alpha`s and the final add a separate bandwidth-bound kernel (lexp's `axpby`, which runs at
//! copy bandwidth like PyTorch's add; `cublasAxpyEx` on bf16 reaches about half of it, which
//! would make the baseline slower than PEFT itself). The `*_fused_add` variants fold the add
//! into the last GEMM's `beta` instead.

use crate::buffer::DeviceTensor;
use crate::cublaslt::BlasLt;
use crate::device::CudaDevice;
use crate::error::DeviceError;
use cudarc::cublas::sys::{
    self as cusys, cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cublasStatus_t,
    cudaDataType_t,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaStream;
use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::LaunchError;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use thiserror::Error;
use tracing::{debug, info, trace};

/// Why a cuBLAS baseline operation failed.
#[derive(Debug, Error)]
pub enum BlasError {
    /// `libcublas.so` could not be loaded (or a cuBLAS handle could not be created); the message
    /// says how to make the library visible to the loader.
    #[error("cuBLAS unavailable: {0}")]
    Unavailable(String),
    /// cuBLAS refused a call; `context` names the operation.
    #[error("cuBLAS error while {context}: {status}")]
    Cublas {
        /// What was being done (`"GEMM 67x45x33 (NT)"`).
        context: String,
        /// cuBLAS's status name and description.
        status: String,
    },
    /// A tensor's dims do not fit the operation; the message names the tensor.
    #[error("shape error: {0}")]
    Shape(String),
    /// A tensor's element type is not supported by the operation; the message names the tensor.
    #[error("dtype error: {0}")]
    DType(String),
    /// An argument or call order outside what the operation accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A device-layer operation (allocation, binding the context) failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl From<BlasError> for DeviceError {
    /// Lets closures timed by [`crate::time_ms`] return `BlasError`.
    fn from(e: BlasError) -> DeviceError {
        match e {
            BlasError::Device(e) => e,
            BlasError::Unavailable(message) => DeviceError::Driver {
                context: "loading cuBLAS".into(),
                message,
            },
            BlasError::Cublas { context, status } => DeviceError::Driver {
                context,
                message: status,
            },
            BlasError::Shape(m) | BlasError::DType(m) => DeviceError::Shape(m),
            BlasError::InvalidArgument(m) => DeviceError::InvalidArgument(m),
        }
    }
}

/// Result of a cuBLAS baseline operation.
pub type BlasResult<T> = std::result::Result<T, BlasError>;

/// `"CUBLAS_STATUS_INVALID_VALUE (an invalid value was used as an argument)"`.
fn describe(status: cublasStatus_t) -> String {
    // SAFETY: only called with a status returned by a cuBLAS call, so the library is loaded;
    // the returned string is static inside libcublas.
    let text = unsafe {
        let p = cusys::cublasGetStatusString(status);
        if p.is_null() {
            None
        } else {
            Some(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    };
    match text {
        Some(t) => format!("{status:?} ({t})"),
        None => format!("{status:?}"),
    }
}

/// Turns a cuBLAS status into a result, naming the operation on failure.
fn check(status: cublasStatus_t, context: impl FnOnce() -> String) -> BlasResult<()> {
    match status {
        cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(BlasError::Cublas {
            context: context(),
            status: describe(s),
        }),
    }
}

/// How to make `libcublas` visible: a shell line for the pip wheels PyTorch ships it in.
///
/// The loader path is read when a program starts, so this has to happen before the program
/// (the test binary, `lexp`) runs.
pub const CUBLAS_HINT: &str = "make libcublas visible to the loader before starting the program. \
If it comes with PyTorch's pip wheels (nvidia-cublas-cu12: site-packages/nvidia/cublas/lib; \
nvidia-cublas for CUDA 13: site-packages/nvidia/cu13/lib), run: \
export LD_LIBRARY_PATH=$(python3 -c \"import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) \
for d in nvidia.__path__ for p in glob.glob(d + '/**/libcublas.so*', recursive=True)})))\"):$LD_LIBRARY_PATH \
; with a CUDA toolkit, add its lib64 directory (e.g. /usr/local/cuda/lib64) to LD_LIBRARY_PATH";

/// Directories, below `patterns` (each component a name or `*`), that hold a `libcublas.so*`.
fn find_cublas_dirs(patterns: &[PathBuf]) -> Vec<PathBuf> {
    find_dirs_holding(patterns, "libcublas.so")
}

/// Directories, below `patterns` (each component a name or `*`), that hold a file whose name
/// starts with `prefix` (`"libcublas.so"`, `"libcublasLt.so"`).
pub(crate) fn find_dirs_holding(patterns: &[PathBuf], prefix: &str) -> Vec<PathBuf> {
    fn expand(base: PathBuf, rest: &[std::ffi::OsString], out: &mut Vec<PathBuf>) {
        let Some((first, tail)) = rest.split_first() else {
            out.push(base);
            return;
        };
        if first.to_str() == Some("*") {
            let Ok(entries) = std::fs::read_dir(&base) else {
                return;
            };
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            for p in names.into_iter().filter(|p| p.is_dir()) {
                expand(p, tail, out);
            }
        } else {
            let p = base.join(first);
            if p.exists() {
                expand(p, tail, out);
            }
        }
    }
    let mut dirs = Vec::new();
    for pattern in patterns {
        let comps: Vec<std::ffi::OsString> = pattern
            .components()
            .skip(1)
            .map(|c| c.as_os_str().to_os_string())
            .collect();
        let root = pattern
            .components()
            .next()
            .map(|c| PathBuf::from(c.as_os_str()))
            .unwrap_or_default();
        let mut found = Vec::new();
        expand(root, &comps, &mut found);
        for dir in found {
            if holds(&dir, prefix) && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// True when `dir` holds a file whose name starts with `prefix` (`libcublas.so` does not
/// match `libcublasLt.so.13`).
fn holds(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
    })
}

/// Where CUDA toolkits and PyTorch's pip wheels usually put `libcublas` (and `libcublasLt`).
pub(crate) fn usual_cublas_places() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    prefixes.extend(
        ["/usr", "/usr/local", "/opt/*", "/opt/*/.venv", "/opt/conda"]
            .iter()
            .map(PathBuf::from),
    );
    let mut places = vec![
        PathBuf::from("/usr/local/cuda/lib64"),
        PathBuf::from("/usr/local/cuda/targets/*/lib"),
        PathBuf::from("/usr/local/*/lib64"),
    ];
    for prefix in prefixes {
        for packages in ["site-packages", "dist-packages"] {
            places.push(prefix.join("lib/*").join(packages).join("nvidia/*/lib"));
        }
    }
    places
}

/// The error for a missing `libcublas`: what was searched, where a copy was seen, the fix.
fn missing_library_message(detail: Option<&str>) -> String {
    let mut names = cudarc::get_lib_name_candidates("cublas");
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let mut msg = format!(
        "libcublas could not be loaded (searched the loader path for {})",
        names.join(", ")
    );
    if let Some(d) = detail {
        msg.push_str(&format!(": {d}"));
    }
    let seen = find_cublas_dirs(&usual_cublas_places());
    match seen.first() {
        Some(dir) => msg.push_str(&format!(
            "; a copy is in {}: export LD_LIBRARY_PATH={}:$LD_LIBRARY_PATH before starting \
             the program (in general: {CUBLAS_HINT})",
            dir.display(),
            dir.display()
        )),
        None => msg.push_str(&format!("; {CUBLAS_HINT}")),
    }
    msg
}

/// The text of a caught panic.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

/// The cuBLAS element type of a tensor type usable in [`Blas::gemm`] and [`Blas::axpy`].
fn data_type(dtype: Storage) -> Option<cudaDataType_t> {
    match dtype {
        Storage::BF16 => Some(cudaDataType_t::CUDA_R_16BF),
        Storage::F16 => Some(cudaDataType_t::CUDA_R_16F),
        Storage::F32 => Some(cudaDataType_t::CUDA_R_32F),
        Storage::I32 => None,
    }
}

/// Checks the element types of a GEMM: `a` and `b` of one type (bf16, f16 or f32), `c` of that
/// type or f32 (f32 accumulation in every case). Returns the cuBLAS types of (`a`/`b`, `c`).
pub(crate) fn gemm_types(
    a: Storage,
    b: Storage,
    c: Storage,
) -> BlasResult<(cudaDataType_t, cudaDataType_t)> {
    let ab = match data_type(a) {
        Some(t) => t,
        None => {
            return Err(BlasError::DType(format!(
                "GEMM input `a` is {}; expected bf16, f16 or f32",
                a.name()
            )))
        }
    };
    if b != a {
        return Err(BlasError::DType(format!(
            "GEMM input `b` is {} but `a` is {}; both inputs must have one type",
            b.name(),
            a.name()
        )));
    }
    if c != a && c != Storage::F32 {
        return Err(BlasError::DType(format!(
            "GEMM output `c` is {}; with {} inputs it must be {} or f32",
            c.name(),
            a.name(),
            a.name()
        )));
    }
    let ct = data_type(c).ok_or_else(|| BlasError::DType("GEMM output `c` is i32".into()))?;
    Ok((ab, ct))
}

/// The extents of a 2-D tensor named `name`, or a shape error.
fn dims2(name: &str, dims: &[usize]) -> BlasResult<(usize, usize)> {
    match dims {
        [r, c] => Ok((*r, *c)),
        _ => Err(BlasError::Shape(format!(
            "`{name}` must be a 2-D row-major matrix, got dims {dims:?}"
        ))),
    }
}

/// Checks the dims of a row-major GEMM `c[M,N] = op(a)·op(b)` and returns `(M, N, K)`.
///
/// `a` is stored `[M,K]` (`[K,M]` when `trans_a`), `b` `[K,N]` (`[N,K]` when `trans_b`), `c`
/// `[M,N]`; each extent must fit cuBLAS's 32-bit `int`.
fn gemm_dims(
    a: &[usize],
    b: &[usize],
    c: &[usize],
    trans_a: bool,
    trans_b: bool,
) -> BlasResult<(usize, usize, usize)> {
    let (a0, a1) = dims2("a", a)?;
    let (b0, b1) = dims2("b", b)?;
    let (c0, c1) = dims2("c", c)?;
    let (m, k) = if trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if trans_b { (b1, b0) } else { (b0, b1) };
    let op = |t: bool, name: &str| {
        if t {
            format!("{name}ᵀ")
        } else {
            name.to_string()
        }
    };
    if kb != k {
        return Err(BlasError::Shape(format!(
            "inner dims differ: {} is {m}x{k} (`a` stored {a:?}) but {} is {kb}x{n} (`b` stored \
             {b:?})",
            op(trans_a, "a"),
            op(trans_b, "b")
        )));
    }
    if (c0, c1) != (m, n) {
        return Err(BlasError::Shape(format!(
            "`c` is {c:?} but {}·{} is [{m}, {n}]",
            op(trans_a, "a"),
            op(trans_b, "b")
        )));
    }
    for (name, v) in [("M", m), ("N", n), ("K", k)] {
        if v > i32::MAX as usize {
            return Err(BlasError::Shape(format!(
                "GEMM extent {name} = {v} exceeds cuBLAS's 32-bit limit"
            )));
        }
    }
    Ok((m, n, k))
}

/// The arguments of one column-major `cublasGemmEx` call that computes a row-major GEMM.
///
/// Row-major `C[M,N] = op(A)·op(B)` is column-major `Cᵀ[N,M] = op(B)ᵀ·op(A)ᵀ`: cuBLAS's first
/// operand is B's buffer, its second A's, and its `m`, `n` are the row-major `N`, `M`. A
/// row-major buffer read column-major is the transpose, so each operand's transpose flag
/// carries over unchanged, and every leading dimension is the stored row length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColMajorGemm {
    /// Transpose cuBLAS's first operand (B's buffer).
    transa: bool,
    /// Transpose cuBLAS's second operand (A's buffer).
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    /// Leading dimension of B's buffer (its stored row length).
    lda: usize,
    /// Leading dimension of A's buffer (its stored row length).
    ldb: usize,
    ldc: usize,
}

/// Maps a row-major GEMM of `(M, N, K)` to its column-major cuBLAS call (see [`ColMajorGemm`]).
/// Leading dimensions are at least 1, as cuBLAS requires even for empty matrices.
fn col_major_args(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> ColMajorGemm {
    ColMajorGemm {
        transa: trans_b,
        transb: trans_a,
        m: n,
        n: m,
        k,
        lda: (if trans_b { k } else { n }).max(1),
        ldb: (if trans_a { m } else { k }).max(1),
        ldc: n.max(1),
    }
}

fn op(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// Where a matrix lies inside a [`DeviceTensor`] (in elements): `rows × cols`, row `i` starting
/// at `offset + i·ld`, and in a batched GEMM matrix `b` of the batch `b·batch_stride` further.
///
/// This is how [`Blas::gemm_strided_batched`] reads sub-matrices in place: one head of a
/// packed `[T, 3H]` q/k/v buffer is `rows = L, cols = hd, ld = 3H` at column offset `h·hd`,
/// and the heads of a batch are `batch_stride = hd` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatLayout {
    /// Element index of `[0, 0]` of the first matrix.
    pub offset: usize,
    /// Rows of each matrix as stored.
    pub rows: usize,
    /// Columns of each matrix as stored.
    pub cols: usize,
    /// Elements between the starts of consecutive rows (at least `cols`).
    pub ld: usize,
    /// Elements between the starts of consecutive matrices of a batch.
    pub batch_stride: usize,
}

impl MatLayout {
    /// A contiguous `rows × cols` matrix at element 0 (batches back to back).
    pub fn dense(rows: usize, cols: usize) -> MatLayout {
        MatLayout {
            offset: 0,
            rows,
            cols,
            ld: cols,
            batch_stride: rows * cols,
        }
    }

    /// A `rows × cols` matrix at `offset` with row stride `ld` (no batch stride).
    pub fn at(offset: usize, rows: usize, cols: usize, ld: usize) -> MatLayout {
        MatLayout {
            offset,
            rows,
            cols,
            ld,
            batch_stride: 0,
        }
    }

    /// The same layout with matrices `stride` elements apart in a batch.
    pub fn batched(self, stride: usize) -> MatLayout {
        MatLayout {
            batch_stride: stride,
            ..self
        }
    }

    /// One past the last element any of `batch` matrices touches (0 when they are empty), or
    /// `None` on overflow.
    pub(crate) fn end(&self, batch: usize) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 || batch == 0 {
            return Some(0);
        }
        let last_batch = (batch - 1).checked_mul(self.batch_stride)?;
        let last_row = (self.rows - 1).checked_mul(self.ld)?;
        self.offset
            .checked_add(last_batch)?
            .checked_add(last_row)?
            .checked_add(self.cols)
    }

    /// True when the `batch` matrices share no element: stacked blocks, or blocks side by side
    /// inside one row stride (the heads of a `[T, H]` buffer).
    fn batches_disjoint(&self, batch: usize) -> bool {
        if batch <= 1 || self.rows == 0 || self.cols == 0 {
            return true;
        }
        let block = (self.rows - 1)
            .saturating_mul(self.ld)
            .saturating_add(self.cols);
        let stacked = self.batch_stride >= block;
        let side_by_side = self.batch_stride >= self.cols
            && (batch - 1)
                .saturating_mul(self.batch_stride)
                .saturating_add(self.cols)
                <= self.ld;
        stacked || side_by_side
    }
}

/// A matrix (or a batch of them) inside a tensor, read by a GEMM.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    /// The tensor holding it.
    pub tensor: &'a DeviceTensor,
    /// Where it lies in the tensor.
    pub layout: MatLayout,
}

impl<'a> Mat<'a> {
    /// `layout` inside `tensor`.
    pub fn new(tensor: &'a DeviceTensor, layout: MatLayout) -> Mat<'a> {
        Mat { tensor, layout }
    }
}

/// A matrix (or a batch of them) inside a tensor, written by a GEMM.
#[derive(Debug)]
pub struct MatMut<'a> {
    /// The tensor holding it.
    pub tensor: &'a mut DeviceTensor,
    /// Where it lies in the tensor.
    pub layout: MatLayout,
}

impl<'a> MatMut<'a> {
    /// `layout` inside `tensor`.
    pub fn new(tensor: &'a mut DeviceTensor, layout: MatLayout) -> MatMut<'a> {
        MatMut { tensor, layout }
    }
}

/// The checked arguments of one column-major strided-batched GEMM (see [`ColMajorGemm`] for
/// the row-major to column-major mapping; here every leading dimension is the layout's `ld`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StridedGemm {
    /// Transpose cuBLAS's first operand (B's buffer).
    pub(crate) transa: bool,
    /// Transpose cuBLAS's second operand (A's buffer).
    pub(crate) transb: bool,
    /// Column-major `m` (the row-major `N`).
    pub(crate) m: usize,
    /// Column-major `n` (the row-major `M`).
    pub(crate) n: usize,
    /// Inner extent.
    pub(crate) k: usize,
    /// Leading dimension and batch stride of B's buffer (cuBLAS's first operand).
    pub(crate) lda: usize,
    pub(crate) stride_a: usize,
    /// Leading dimension and batch stride of A's buffer (cuBLAS's second operand).
    pub(crate) ldb: usize,
    pub(crate) stride_b: usize,
    /// Leading dimension and batch stride of the output.
    pub(crate) ldc: usize,
    pub(crate) stride_c: usize,
}

/// Checks the layouts of a row-major batched GEMM `c_i = op(a_i)·op(b_i)` against the element
/// counts of their tensors and maps it to cuBLAS's column-major call.
///
/// `a` is stored `M×K` (`K×M` when `trans_a`), `b` `K×N` (`N×K` when `trans_b`), `c` `M×N`;
/// every `ld` is at least its `cols`; every element of every batch lies inside its tensor; the
/// batches of `c` do not overlap (they would race); extents fit cuBLAS's 32-bit `int`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn strided_args(
    la: &MatLayout,
    a_numel: usize,
    lb: &MatLayout,
    b_numel: usize,
    lc: &MatLayout,
    c_numel: usize,
    batch: usize,
    trans_a: bool,
    trans_b: bool,
) -> BlasResult<StridedGemm> {
    let dims = |l: &MatLayout| vec![l.rows, l.cols];
    let (m, n, k) = gemm_dims(&dims(la), &dims(lb), &dims(lc), trans_a, trans_b)?;
    for (name, l, numel) in [("a", la, a_numel), ("b", lb, b_numel), ("c", lc, c_numel)] {
        if l.ld < l.cols.max(1) {
            return Err(BlasError::Shape(format!(
                "`{name}`: row stride {} is less than its {} columns",
                l.ld, l.cols
            )));
        }
        if l.ld > i32::MAX as usize {
            return Err(BlasError::Shape(format!(
                "`{name}`: row stride {} exceeds cuBLAS's 32-bit limit",
                l.ld
            )));
        }
        match l.end(batch) {
            Some(end) if end <= numel => {}
            end => {
                return Err(BlasError::Shape(format!(
                    "`{name}`: {batch} matrices of {}x{} (offset {}, row stride {}, batch stride \
                     {}) reach element {} of a tensor of {numel}",
                    l.rows,
                    l.cols,
                    l.offset,
                    l.ld,
                    l.batch_stride,
                    end.map_or_else(|| "beyond usize".to_string(), |e| e.to_string())
                )))
            }
        }
    }
    if !lc.batches_disjoint(batch) {
        return Err(BlasError::Shape(format!(
            "`c`: the {batch} output matrices of {}x{} (row stride {}, batch stride {}) overlap",
            lc.rows, lc.cols, lc.ld, lc.batch_stride
        )));
    }
    if batch > i32::MAX as usize {
        return Err(BlasError::Shape(format!(
            "batch {batch} exceeds cuBLAS's 32-bit limit"
        )));
    }
    Ok(StridedGemm {
        transa: trans_b,
        transb: trans_a,
        m: n,
        n: m,
        k,
        lda: lb.ld.max(1),
        stride_a: lb.batch_stride,
        ldb: la.ld.max(1),
        stride_b: la.batch_stride,
        ldc: lc.ld.max(1),
        stride_c: lc.batch_stride,
    })
}

/// A cuBLAS handle on a [`CudaDevice`]'s context and stream.
///
/// Every call is queued on [`CudaDevice::stream`], so it is ordered with the device's kernels,
/// copies and timing events, and returns before the GPU has run it. Math mode is cuBLAS's
/// default; the workspace is the handle's own [`crate::cublaslt::WORKSPACE_BYTES`] buffer, set
/// with `cublasSetWorkspace` (PyTorch does the same): with cuBLAS's default pool a GEMM
/// captured into a CUDA graph may run another, workspace-free algorithm than the same GEMM
/// launched directly, so graph-replayed and direct timings would differ.
pub struct Blas {
    blas: CudaBlas,
    /// The workspace set on the handle (kept alive with it).
    _workspace: cudarc::driver::CudaSlice<u8>,
    stream: Arc<CudaStream>,
    version: i32,
    profiler: Arc<crate::profile::Profiler>,
    /// The cuBLASLt handle on the same stream, created at the first [`Blas::lt`] (or the
    /// message of why it could not be).
    lt: OnceLock<Result<BlasLt, String>>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas")
            .field("version", &self.version)
            .finish()
    }
}

impl Blas {
    /// Loads cuBLAS and creates a handle bound to `dev`'s stream.
    ///
    /// Fails with [`BlasError::Unavailable`] when `libcublas.so` cannot be loaded (the message
    /// names the library names searched, a directory where a copy was seen if any, and the
    /// `LD_LIBRARY_PATH` line that makes it visible) or the handle cannot be created; it never
    /// panics for either.
    pub fn new(dev: &CudaDevice) -> BlasResult<Blas> {
        // SAFETY: only tries `dlopen` on the candidate library names; nothing is called.
        if !unsafe { cusys::is_culib_present() } {
            return Err(BlasError::Unavailable(missing_library_message(None)));
        }
        let stream = dev.stream().clone();
        let created = catch_unwind(AssertUnwindSafe(|| {
            let blas = CudaBlas::new(stream.clone())?;
            let mut version = 0;
            // SAFETY: the handle is valid; `version` is a valid out-pointer.
            unsafe { cusys::cublasGetVersion_v2(*blas.handle(), &mut version) }.result()?;
            Ok::<_, cudarc::cublas::result::CublasError>((blas, version))
        }));
        let (blas, version) = match created {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                return Err(BlasError::Unavailable(format!(
                    "creating a cuBLAS handle failed: {}",
                    describe(e.0)
                )))
            }
            Err(payload) => {
                return Err(BlasError::Unavailable(missing_library_message(Some(
                    panic_text(payload.as_ref()),
                ))))
            }
        };
        let workspace = stream
            .alloc_zeros::<u8>(crate::cublaslt::WORKSPACE_BYTES)
            .map_err(|e| {
                BlasError::Device(DeviceError::driver("allocating the cuBLAS workspace", e))
            })?;
        {
            use cudarc::driver::DevicePtr;
            let (ptr, _sync) = workspace.device_ptr(&stream);
            // SAFETY: the handle is valid; the buffer is WORKSPACE_BYTES long, on the handle's
            // stream, and lives as long as the handle (both are fields of the `Blas`).
            unsafe {
                cusys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut c_void,
                    crate::cublaslt::WORKSPACE_BYTES,
                )
            }
            .result()
            .map_err(|e| {
                BlasError::Unavailable(format!(
                    "setting the cuBLAS workspace failed: {}",
                    describe(e.0)
                ))
            })?;
        }
        info!(version, device = dev.name(), "cuBLAS handle created");
        Ok(Blas {
            blas,
            _workspace: workspace,
            stream,
            version,
            profiler: dev.profiler().clone(),
            lt: OnceLock::new(),
        })
    }

    /// The cuBLASLt handle on this handle's stream (GEMMs with fused epilogues), created at the
    /// first call with its workspace; later calls return the same one. Fails with
    /// [`BlasError::Unavailable`] (every time) when `libcublasLt` cannot be loaded or the
    /// handle or its workspace cannot be created.
    pub fn lt(&self) -> BlasResult<&BlasLt> {
        self.lt
            .get_or_init(|| {
                BlasLt::new(&self.stream, self.profiler.clone()).map_err(|e| match e {
                    BlasError::Unavailable(m) => m,
                    e => e.to_string(),
                })
            })
            .as_ref()
            .map_err(|m| BlasError::Unavailable(m.clone()))
    }

    /// cuBLAS's version number (`major * 10000 + minor * 100 + patch`, e.g. `130100`).
    pub fn version(&self) -> i32 {
        self.version
    }

    /// The stream cuBLAS work is queued on (the device's).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cudarc handle, for cuBLAS calls this type does not wrap.
    pub fn raw(&self) -> &CudaBlas {
        &self.blas
    }

    /// Refuses a tensor that lives on another stream (another device or context).
    fn same_stream(&self, name: &str, t: &DeviceTensor) -> BlasResult<()> {
        if t.slice().stream().cu_stream() == self.stream.cu_stream() {
            Ok(())
        } else {
            Err(BlasError::InvalidArgument(format!(
                "`{name}` was allocated on another device or stream than this cuBLAS handle"
            )))
        }
    }

    /// Makes the context current on the calling thread (cuBLAS uses the current context).
    fn bind(&self) -> BlasResult<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| BlasError::Device(DeviceError::driver("binding the context", e)))
    }

    /// Row-major `c[M,N] = alpha·op(a)·op(b) + beta·c`, f32 accumulation (`CUBLAS_COMPUTE_32F`).
    ///
    /// `a` is stored `[M,K]` (`[K,M]` when `trans_a`, i.e. `op(a) = aᵀ`), `b` `[K,N]` (`[N,K]`
    /// when `trans_b`), `c` `[M,N]`, all contiguous row-major. `a` and `b` are bf16, f16 or
    /// f32 (both the same), `c` is that type or f32. `alpha` and `beta` are f32; with
    /// `beta == 0` the old contents of `c` are not read (NaNs in it do not propagate).
    /// Queues one cuBLAS launch (none when `M` or `N` is 0) and returns without waiting.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: &DeviceTensor,
        b: &DeviceTensor,
        c: &mut DeviceTensor,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> BlasResult<()> {
        let (ab_type, c_type) = gemm_types(a.dtype(), b.dtype(), c.dtype())?;
        let (m, n, k) = gemm_dims(a.dims(), b.dims(), c.dims(), trans_a, trans_b)?;
        self.same_stream("a", a)?;
        self.same_stream("b", b)?;
        self.same_stream("c", c)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let cm = col_major_args(m, n, k, trans_a, trans_b);
        let flag = |t: bool| if t { 'T' } else { 'N' };
        trace!(m, n, k, trans_a, trans_b, alpha, beta, ?cm, "cuBLAS GEMM");
        self.bind()?;
        // SAFETY: the dims were checked against each buffer's extent (so cuBLAS reads and
        // writes inside the allocations with these leading dimensions), every extent fits an
        // i32, the types are a combination cublasGemmEx supports with CUBLAS_COMPUTE_32F,
        // alpha and beta are f32 host values (the handle's default host pointer mode), and `c`
        // is borrowed mutably so it aliases neither input.
        let name = || format!("cublas gemm {m}x{n}x{k} {}{}", flag(trans_a), flag(trans_b));
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        let status = self.profiler.span(&self.stream, name, flops, || unsafe {
            cusys::cublasGemmEx(
                *self.blas.handle(),
                op(cm.transa),
                op(cm.transb),
                cm.m as i32,
                cm.n as i32,
                cm.k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                b.device_ptr() as *const c_void,
                ab_type,
                cm.lda as i32,
                a.device_ptr() as *const c_void,
                ab_type,
                cm.ldb as i32,
                (&beta as *const f32).cast::<c_void>(),
                c.device_ptr() as *mut c_void,
                c_type,
                cm.ldc as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        });
        check(status, || {
            format!(
                "GEMM {m}x{n}x{k} ({}{}) of {} into {}",
                flag(trans_a),
                flag(trans_b),
                a.dtype().name(),
                c.dtype().name()
            )
        })
    }

    /// Row-major `c_i = alpha·op(a_i)·op(b_i) + beta·c_i` for `i < batch`, f32 accumulation
    /// (`cublasGemmStridedBatchedEx`, or `cublasGemmEx` for one matrix), on matrices that lie
    /// anywhere inside their tensors ([`MatLayout`]: offset, row stride, batch stride).
    ///
    /// Same conventions as [`Blas::gemm`]: `a` is stored `M×K` (`K×M` when `trans_a`), `b`
    /// `K×N` (`N×K` when `trans_b`), `c` `M×N`; `a` and `b` bf16, f16 or f32 (one type), `c`
    /// that type or f32; with `beta == 0` the old `c` is not read. Checked before anything is
    /// queued: every element of every batch inside its tensor, row strides at least the
    /// column counts, output batches that do not overlap, 32-bit extents. A batch stride of 0
    /// reuses one matrix for every batch (only for inputs: output batches would overlap).
    /// Queues one launch (none when a dimension or `batch` is 0) and returns without waiting.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_strided_batched(
        &self,
        a: Mat<'_>,
        b: Mat<'_>,
        c: MatMut<'_>,
        batch: usize,
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    ) -> BlasResult<()> {
        let (ab_type, c_type) = gemm_types(a.tensor.dtype(), b.tensor.dtype(), c.tensor.dtype())?;
        let g = strided_args(
            &a.layout,
            a.tensor.numel(),
            &b.layout,
            b.tensor.numel(),
            &c.layout,
            c.tensor.numel(),
            batch,
            trans_a,
            trans_b,
        )?;
        self.same_stream("a", a.tensor)?;
        self.same_stream("b", b.tensor)?;
        self.same_stream("c", c.tensor)?;
        if g.m == 0 || g.n == 0 || batch == 0 {
            return Ok(());
        }
        let ptr = |t: &DeviceTensor, l: &MatLayout| {
            t.device_ptr() + (l.offset * t.dtype().bytes()) as u64
        };
        let (pa, pb) = (ptr(a.tensor, &a.layout), ptr(b.tensor, &b.layout));
        let pc = ptr(c.tensor, &c.layout);
        trace!(?g, batch, alpha, beta, "cuBLAS strided-batched GEMM");
        self.bind()?;
        let handle = *self.blas.handle();
        let alpha_p = (&alpha as *const f32).cast::<c_void>();
        let beta_p = (&beta as *const f32).cast::<c_void>();
        // SAFETY: `strided_args` checked that every matrix of every batch lies inside its
        // tensor with these leading dimensions and strides, that the output batches do not
        // overlap and that all extents fit an i32; the types are a combination cuBLAS supports
        // with CUBLAS_COMPUTE_32F; alpha and beta are f32 host values; `c` is borrowed mutably,
        // so it aliases neither input.
        let name = || {
            let t = |x: bool| if x { 'T' } else { 'N' };
            let b = if batch > 1 {
                format!(" x{batch}")
            } else {
                String::new()
            };
            format!(
                "cublas gemm {}x{}x{}{b} {}{}",
                g.n,
                g.m,
                g.k,
                t(trans_a),
                t(trans_b)
            )
        };
        let flops = 2.0 * g.m as f64 * g.n as f64 * g.k as f64 * batch as f64;
        let status = self.profiler.span(&self.stream, name, flops, || unsafe {
            if batch == 1 {
                cusys::cublasGemmEx(
                    handle,
                    op(g.transa),
                    op(g.transb),
                    g.m as i32,
                    g.n as i32,
                    g.k as i32,
                    alpha_p,
                    pb as *const c_void,
                    ab_type,
                    g.lda as i32,
                    pa as *const c_void,
                    ab_type,
                    g.ldb as i32,
                    beta_p,
                    pc as *mut c_void,
                    c_type,
                    g.ldc as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            } else {
                cusys::cublasGemmStridedBatchedEx(
                    handle,
                    op(g.transa),
                    op(g.transb),
                    g.m as i32,
                    g.n as i32,
                    g.k as i32,
                    alpha_p,
                    pb as *const c_void,
                    ab_type,
                    g.lda as i32,
                    g.stride_a as i64,
                    pa as *const c_void,
                    ab_type,
                    g.ldb as i32,
                    g.stride_b as i64,
                    beta_p,
                    pc as *mut c_void,
                    c_type,
                    g.ldc as i32,
                    g.stride_c as i64,
                    batch as i32,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        });
        check(status, || {
            format!(
                "batched GEMM {}x{}x{} x{batch} ({}{}) of {} into {}",
                g.n,
                g.m,
                g.k,
                if trans_a { 'T' } else { 'N' },
                if trans_b { 'T' } else { 'N' },
                a.tensor.dtype().name(),
                c.tensor.dtype().name()
            )
        })
    }

    /// `y += alpha·x` element-wise (`cublasAxpyEx`, f32 arithmetic), for `x` and `y` of the same
    /// type (bf16, f16 or f32) and element count; dims may differ. One cuBLAS launch.
    ///
    /// Slow on 16-bit types: measured on an H200 (cuBLAS 13.1) at 16384 x 4096 bf16, 0.21 ms
    /// where PyTorch's add (and lexp's `axpby`) take 0.096 ms, i.e. about half the copy
    /// bandwidth; the LoRA baselines therefore do their add with lexp's `axpby` kernel.
    pub fn axpy(&self, alpha: f32, x: &DeviceTensor, y: &mut DeviceTensor) -> BlasResult<()> {
        let t = match data_type(x.dtype()) {
            Some(t) => t,
            None => {
                return Err(BlasError::DType(format!(
                    "axpy input `x` is {}; expected bf16, f16 or f32",
                    x.dtype().name()
                )))
            }
        };
        if y.dtype() != x.dtype() {
            return Err(BlasError::DType(format!(
                "axpy output `y` is {} but `x` is {}",
                y.dtype().name(),
                x.dtype().name()
            )));
        }
        if x.numel() != y.numel() {
            return Err(BlasError::Shape(format!(
                "axpy of `x` {:?} into `y` {:?}: element counts differ",
                x.dims(),
                y.dims()
            )));
        }
        self.same_stream("x", x)?;
        self.same_stream("y", y)?;
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both buffers hold `n` elements of type `t` with unit stride; alpha is an f32
        // host value; f32 execution is supported for 16BF/16F/32F vectors; `y` is borrowed
        // mutably so it does not alias `x`.
        let status = unsafe {
            cusys::cublasAxpyEx_64(
                *self.blas.handle(),
                n as i64,
                (&alpha as *const f32).cast::<c_void>(),
                cudaDataType_t::CUDA_R_32F,
                x.device_ptr() as *const c_void,
                t,
                1,
                y.device_ptr() as *mut c_void,
                t,
                1,
                cudaDataType_t::CUDA_R_32F,
            )
        };
        check(status, || {
            format!("axpy of {n} {} elements", x.dtype().name())
        })
    }
}

/// `y += s·x` with lexp's element-wise `axpby` kernel (`y = s·x + 1·y`, f32 arithmetic): the
/// separate add of the LoRA baselines, standing in for PyTorch's element-wise add (both run at
/// about the device's copy bandwidth).
fn add_scaled(dev: &CudaDevice, s: f32, x: &DeviceTensor, y: &mut DeviceTensor) -> BlasResult<()> {
    let n = y.numel();
    if n == 0 {
        return Ok(());
    }
    let xv = x.view(&[n])?;
    let yv = y.view(&[n])?;
    lexp_kernels::axpby::launch(
        dev,
        &lexp_kernels::axpby::Args {
            a: s,
            x: &xv,
            b: 1.0,
            y: &yv,
        },
    )
    .map_err(|e: LaunchError| BlasError::Device(e.into()))
}

/// Refuses a device whose stream is not the one `blas` queues on.
fn same_device(dev: &CudaDevice, blas: &Blas) -> BlasResult<()> {
    if dev.stream().cu_stream() == blas.stream.cu_stream() {
        Ok(())
    } else {
        Err(BlasError::InvalidArgument(
            "the cuBLAS handle was created on another device than the one given".into(),
        ))
    }
}

/// Sizes of one LoRA linear layer applied to `m` rows (tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    /// Rows of `x` (batch × sequence).
    pub m: usize,
    /// `in_features` of the layer (columns of `x`).
    pub in_features: usize,
    /// `out_features` of the layer (columns of `y`).
    pub out_features: usize,
    /// LoRA rank `r`.
    pub rank: usize,
}

impl LoraShape {
    /// Multiply-add FLOPs (2 per multiply-add) of the forward pass: `x·Wᵀ`, `x·Aᵀ`, `t·Bᵀ`.
    pub fn forward_flops(&self) -> f64 {
        let (m, i, o, r) = self.f64s();
        2.0 * (m * o * i + m * r * i + m * o * r)
    }

    /// Multiply-add FLOPs of the backward pass: `dy·W`, `dBᵀ`, `dt`, `dA`, `dt·A` (no `dW`:
    /// the base weight is frozen).
    pub fn backward_flops(&self) -> f64 {
        let (m, i, o, r) = self.f64s();
        2.0 * (m * i * o + o * m * r + m * o * r + r * m * i + m * r * i)
    }

    fn f64s(&self) -> (f64, f64, f64, f64) {
        (
            self.m as f64,
            self.in_features as f64,
            self.out_features as f64,
            self.rank as f64,
        )
    }
}

/// Checks that tensor `name` is a `dtype` tensor of `dims` (pure: takes the tensor's type and
/// dims).
fn expect_tensor(
    name: &str,
    got_dtype: Storage,
    got_dims: &[usize],
    dtype: Storage,
    dims: [usize; 2],
) -> BlasResult<()> {
    if got_dtype != dtype {
        return Err(BlasError::DType(format!(
            "`{name}` is {}; expected {}",
            got_dtype.name(),
            dtype.name()
        )));
    }
    if got_dims != dims {
        return Err(BlasError::Shape(format!(
            "`{name}` has dims {got_dims:?}; expected {dims:?}"
        )));
    }
    Ok(())
}

/// The frozen base weight and the LoRA adapter of a PEFT `lora.Linear`, as stored by PyTorch.
#[derive(Clone, Copy, Debug)]
pub struct LoraWeights<'a> {
    /// `base_layer.weight`, `[out_features, in_features]`.
    pub w: &'a DeviceTensor,
    /// `lora_A.weight`, `[rank, in_features]`.
    pub lora_a: &'a DeviceTensor,
    /// `lora_B.weight`, `[out_features, rank]`.
    pub lora_b: &'a DeviceTensor,
    /// `scaling` (`lora_alpha / r`, or `lora_alpha / √r` with rsLoRA).
    pub scale: f32,
}

/// Gradients written by [`lora_backward_baseline`].
#[derive(Debug)]
pub struct LoraGrads<'a> {
    /// `dx`, `[m, in_features]`.
    pub dx: &'a mut DeviceTensor,
    /// `lora_A.weight.grad`, `[rank, in_features]` (overwritten, not accumulated).
    pub d_lora_a: &'a mut DeviceTensor,
    /// `lora_B.weight.grad`, `[out_features, rank]` (overwritten, not accumulated).
    pub d_lora_b: &'a mut DeviceTensor,
}

/// Preallocated intermediates of the LoRA baselines, so that a timed call only queues
/// launches.
#[derive(Debug)]
pub struct LoraWorkspace {
    shape: LoraShape,
    dtype: Storage,
    /// `t = x·Aᵀ`, `[m, r]`: the activation PEFT's autograd saves for the backward pass.
    t: DeviceTensor,
    /// `u = t·Bᵀ`, `[m, out]` (unused by the fused-add forward).
    u: DeviceTensor,
    /// `dt = s·dy·B`, `[m, r]`.
    dt: DeviceTensor,
    /// `dt·A`, `[m, in]` (unused by the fused-add backward).
    dx_lora: DeviceTensor,
    /// Whether a forward pass has written `t`.
    has_t: bool,
}

impl LoraWorkspace {
    /// Allocates the intermediates for `shape` in `dtype` (bf16 or f16, the type of every
    /// tensor the LoRA baselines take).
    pub fn new(dev: &CudaDevice, dtype: Storage, shape: LoraShape) -> BlasResult<LoraWorkspace> {
        if !matches!(dtype, Storage::BF16 | Storage::F16) {
            return Err(BlasError::DType(format!(
                "LoRA baselines take bf16 or f16 tensors, not {}",
                dtype.name()
            )));
        }
        let LoraShape {
            m,
            in_features,
            out_features,
            rank,
        } = shape;
        debug!(
            ?shape,
            dtype = dtype.name(),
            "allocating the LoRA baseline workspace"
        );
        Ok(LoraWorkspace {
            shape,
            dtype,
            t: DeviceTensor::zeros(dev, dtype, &[m, rank])?,
            u: DeviceTensor::zeros(dev, dtype, &[m, out_features])?,
            dt: DeviceTensor::zeros(dev, dtype, &[m, rank])?,
            dx_lora: DeviceTensor::zeros(dev, dtype, &[m, in_features])?,
            has_t: false,
        })
    }

    /// The sizes this workspace was made for.
    pub fn shape(&self) -> LoraShape {
        self.shape
    }

    /// `t = x·Aᵀ` of the last forward pass, `[m, r]`.
    pub fn t(&self) -> &DeviceTensor {
        &self.t
    }

    /// Checks a tensor against this workspace's type and an expected shape.
    fn expect(&self, name: &str, t: &DeviceTensor, dims: [usize; 2]) -> BlasResult<()> {
        expect_tensor(name, t.dtype(), t.dims(), self.dtype, dims)
    }

    /// Checks the weights (`W`, `lora_A`, `lora_B`).
    fn expect_weights(&self, w: &LoraWeights<'_>) -> BlasResult<()> {
        let s = self.shape;
        self.expect("W", w.w, [s.out_features, s.in_features])?;
        self.expect("lora_A", w.lora_a, [s.rank, s.in_features])?;
        self.expect("lora_B", w.lora_b, [s.out_features, s.rank])?;
        if !w.scale.is_finite() {
            return Err(BlasError::InvalidArgument(format!(
                "LoRA scale is {}",
                w.scale
            )));
        }
        Ok(())
    }
}

fn forward(
    dev: &CudaDevice,
    blas: &Blas,
    ws: &mut LoraWorkspace,
    w: &LoraWeights<'_>,
    x: &DeviceTensor,
    y: &mut DeviceTensor,
    fused_add: bool,
) -> BlasResult<()> {
    same_device(dev, blas)?;
    let s = ws.shape;
    ws.expect_weights(w)?;
    ws.expect("x", x, [s.m, s.in_features])?;
    ws.expect("y", y, [s.m, s.out_features])?;
    // y = x·Wᵀ (base_layer)
    blas.gemm(x, w.w, y, false, true, 1.0, 0.0)?;
    // t = x·Aᵀ (lora_A; dropout is the identity at p = 0 and in eval)
    blas.gemm(x, w.lora_a, &mut ws.t, false, true, 1.0, 0.0)?;
    ws.has_t = true;
    if fused_add {
        // y = s·t·Bᵀ + y
        blas.gemm(&ws.t, w.lora_b, y, false, true, w.scale, 1.0)
    } else {
        // u = t·Bᵀ (lora_B), then y += s·u
        blas.gemm(&ws.t, w.lora_b, &mut ws.u, false, true, 1.0, 0.0)?;
        add_scaled(dev, w.scale, &ws.u, y)
    }
}

/// PEFT's `lora.Linear.forward` on cuBLAS: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, in 4 launches.
///
/// The launches are those of PEFT under PyTorch: `y = x·Wᵀ` (GEMM), `t = x·Aᵀ` (skinny GEMM,
/// `t` kept in `ws` for the backward pass as autograd keeps it), `u = t·Bᵀ` (skinny GEMM), and
/// `y += s·u` as a separate element-wise kernel (lexp's `axpby`, at copy bandwidth like
/// PyTorch's add). PyTorch runs that last step as two element-wise kernels (`u * scaling`,
/// then `result + ...`); one pass does both here, so this baseline is, if anything, faster than
/// PEFT. No bias, dropout off (p = 0). Measured on an H200 (cuBLAS 13.1, bf16, m = 16384,
/// 4096 -> 4096, r = 16; medians of 20): forward 0.882 ms, backward 0.960 ms; the fused-add
/// variants 0.852 / 0.931 ms; the same sequence in PyTorch 2.11 0.951 / 1.025 ms.
///
/// Every tensor is `ws`'s type; `x` is `[m, in]`, `y` (overwritten) `[m, out]`. Queues the work
/// on the device's stream and returns without waiting.
pub fn lora_forward_baseline(
    dev: &CudaDevice,
    blas: &Blas,
    ws: &mut LoraWorkspace,
    weights: &LoraWeights<'_>,
    x: &DeviceTensor,
    y: &mut DeviceTensor,
) -> BlasResult<()> {
    forward(dev, blas, ws, weights, x, y, false)
}

/// [`lora_forward_baseline`] with the add folded into the third GEMM (`alpha = s`,
/// `beta = 1` into `y`): 3 launches, the best plain cuBLAS does without a fused kernel.
pub fn lora_forward_fused_add(
    dev: &CudaDevice,
    blas: &Blas,
    ws: &mut LoraWorkspace,
    weights: &LoraWeights<'_>,
    x: &DeviceTensor,
    y: &mut DeviceTensor,
) -> BlasResult<()> {
    forward(dev, blas, ws, weights, x, y, true)
}

#[allow(clippy::too_many_arguments)]
fn backward(
    dev: &CudaDevice,
    blas: &Blas,
    ws: &mut LoraWorkspace,
    w: &LoraWeights<'_>,
    x: &DeviceTensor,
    dy: &DeviceTensor,
    grads: LoraGrads<'_>,
    fused_add: bool,
) -> BlasResult<()> {
    same_device(dev, blas)?;
    let s = ws.shape;
    ws.expect_weights(w)?;
    ws.expect("x", x, [s.m, s.in_features])?;
    ws.expect("dy", dy, [s.m, s.out_features])?;
    ws.expect("dx", grads.dx, [s.m, s.in_features])?;
    ws.expect("d_lora_a", grads.d_lora_a, [s.rank, s.in_features])?;
    ws.expect("d_lora_b", grads.d_lora_b, [s.out_features, s.rank])?;
    if !ws.has_t {
        return Err(BlasError::InvalidArgument(
            "the LoRA backward pass needs t = x·Aᵀ from a forward pass on this workspace; \
             run lora_forward_baseline first"
                .into(),
        ));
    }
    // Base layer: dx = dy·W (W is frozen: no dW).
    blas.gemm(dy, w.w, grads.dx, false, false, 1.0, 0.0)?;
    // lora_B: dB = (s·dy)ᵀ·t, dt = (s·dy)·B (the scaling folded into alpha).
    blas.gemm(dy, &ws.t, grads.d_lora_b, true, false, w.scale, 0.0)?;
    blas.gemm(dy, w.lora_b, &mut ws.dt, false, false, w.scale, 0.0)?;
    // lora_A: dA = dtᵀ·x, dx_lora = dt·A.
    blas.gemm(&ws.dt, x, grads.d_lora_a, true, false, 1.0, 0.0)?;
    if fused_add {
        blas.gemm(&ws.dt, w.lora_a, grads.dx, false, false, 1.0, 1.0)
    } else {
        blas.gemm(&ws.dt, w.lora_a, &mut ws.dx_lora, false, false, 1.0, 0.0)?;
        // Autograd accumulates the two contributions to x's gradient.
        add_scaled(dev, 1.0, &ws.dx_lora, grads.dx)
    }
}

/// The backward pass of PEFT's `lora.Linear` under PyTorch autograd, on cuBLAS, given `dy`:
/// 5 GEMMs and a separate add, 6 launches.
///
/// `dx = dy·W`; `dB = (s·dy)ᵀ·t`; `dt = (s·dy)·B`; `dA = dtᵀ·x`; `dx_lora = dt·A` into a
/// temporary; `dx += dx_lora` (lexp's `axpby`), the add autograd does when two branches feed
/// one input's gradient. The scaling is folded into the `alpha` of the two GEMMs that read
/// `dy` (autograd runs `dy * scaling` as its own element-wise kernel), so this is, if
/// anything, faster than PEFT. The base weight is frozen (no `dW`), as with PEFT. `t` is
/// the one saved by the last forward pass on `ws` (an error if there was none); gradients are
/// overwritten, not accumulated. Queues the work and returns without waiting.
pub fn lora_backward_baseline(
    dev: &CudaDevice,
    blas: &Blas,
    ws: &mut LoraWorkspace,
    weights: &LoraWeights<'_>,
    x: &DeviceTensor,
    dy: &DeviceTensor,
    grads: LoraGrads<'_>,
) -> BlasResult<()> {
    backward(dev, blas, ws, weights, x, dy, grads, false)
}

/// [`lora_backward_baseline`] with `dx += dt·A` done by the last GEMM's `beta = 1`: 5 launches.
pub fn lora_backward_fused_add(
    dev: &CudaDevice,
    blas: &Blas,
    ws: &mut LoraWorkspace,
    weights: &LoraWeights<'_>,
    x: &DeviceTensor,
    dy: &DeviceTensor,
    grads: LoraGrads<'_>,
) -> BlasResult<()> {
    backward(dev, blas, ws, weights, x, dy, grads, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row-major `op(a)·op(b)` in f64, `a` stored `[M,K]`/`[K,M]`, `b` `[K,N]`/`[N,K]`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_ref(
        a: &[f64],
        b: &[f64],
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for l in 0..k {
                    let av = if ta { a[l * m + i] } else { a[i * k + l] };
                    let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                    acc += av * bv;
                }
                c[i * n + j] = acc;
            }
        }
        c
    }

    /// BLAS's column-major GEMM semantics, on host slices (`c = op(a)·op(b)`, beta = 0).
    fn colmajor_gemm(g: &ColMajorGemm, a: &[f64], b: &[f64], c: &mut [f64]) {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0.0;
                for l in 0..g.k {
                    let av = if g.transa {
                        a[l + i * g.lda]
                    } else {
                        a[i + l * g.lda]
                    };
                    let bv = if g.transb {
                        b[j + l * g.ldb]
                    } else {
                        b[l + j * g.ldb]
                    };
                    acc += av * bv;
                }
                c[i + j * g.ldc] = acc;
            }
        }
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    fn random(n: usize, seed: &mut u64) -> Vec<f64> {
        (0..n).map(|_| lcg(seed)).collect()
    }

    #[test]
    fn column_major_mapping_computes_the_row_major_product() {
        let mut seed = 7;
        for &(m, n, k) in &[(3, 5, 4), (1, 7, 2), (6, 1, 3), (5, 4, 1), (67, 45, 33)] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = random(m * k, &mut seed);
                let b = random(k * n, &mut seed);
                let want = matmul_ref(&a, &b, m, n, k, ta, tb);
                let g = col_major_args(m, n, k, ta, tb);
                // BLAS's argument rules: lda >= rows of the first operand as stored, and so on.
                assert!(g.lda >= if g.transa { g.k } else { g.m });
                assert!(g.ldb >= if g.transb { g.n } else { g.k });
                assert!(g.ldc >= g.m);
                // cuBLAS's first operand is B's buffer, its second A's.
                let mut c = vec![f64::NAN; m * n];
                colmajor_gemm(&g, &b, &a, &mut c);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-12, "{m}x{n}x{k} ta={ta} tb={tb}");
                }
            }
        }
    }

    /// BLAS's column-major strided-batched GEMM semantics on host slices (`beta = 0`), with
    /// the buffers' base offsets applied.
    fn colmajor_strided(
        g: &StridedGemm,
        batch: usize,
        a: (&[f64], usize),
        b: (&[f64], usize),
        c: (&mut [f64], usize),
    ) {
        for bi in 0..batch {
            let (ao, bo, co) = (
                a.1 + bi * g.stride_a,
                b.1 + bi * g.stride_b,
                c.1 + bi * g.stride_c,
            );
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut acc = 0.0;
                    for l in 0..g.k {
                        let av = if g.transa {
                            a.0[ao + l + i * g.lda]
                        } else {
                            a.0[ao + i + l * g.lda]
                        };
                        let bv = if g.transb {
                            b.0[bo + j + l * g.ldb]
                        } else {
                            b.0[bo + l + j * g.ldb]
                        };
                        acc += av * bv;
                    }
                    c.0[co + i + j * g.ldc] = acc;
                }
            }
        }
    }

    #[test]
    fn strided_mapping_computes_per_head_attention_products() {
        // A packed [T, 3H] q/k/v buffer, a segment at row c0 of L rows, nh heads of hd:
        // S_h = Q_h·K_hᵀ into a dense [nh, L, L] buffer, then O_h = S_h·V_h into a [T, H]
        // buffer at the heads' column offsets: both against a per-head naive product.
        let (t, nh, hd, c0, len) = (11usize, 3usize, 4usize, 3usize, 5usize);
        let h = nh * hd;
        let mut seed = 3;
        let qkv = random(t * 3 * h, &mut seed);
        let head = |h0: usize, part: usize| -> Vec<f64> {
            (0..len)
                .flat_map(|i| {
                    let row = (c0 + i) * 3 * h + part * h + h0 * hd;
                    qkv[row..row + hd].to_vec()
                })
                .collect()
        };
        let q = MatLayout::at(c0 * 3 * h, len, hd, 3 * h).batched(hd);
        let k = MatLayout::at(c0 * 3 * h + h, len, hd, 3 * h).batched(hd);
        let v = MatLayout::at(c0 * 3 * h + 2 * h, len, hd, 3 * h).batched(hd);
        let s = MatLayout::dense(len, len);
        let n = qkv.len();
        let g = strided_args(&q, n, &k, n, &s, nh * len * len, nh, false, true).unwrap();
        let mut sbuf = vec![f64::NAN; nh * len * len];
        colmajor_strided(&g, nh, (&qkv, k.offset), (&qkv, q.offset), (&mut sbuf, 0));
        let o = MatLayout::at(c0 * h, len, hd, h).batched(hd);
        let g = strided_args(&s, sbuf.len(), &v, n, &o, t * h, nh, false, false).unwrap();
        let mut obuf = vec![0.0; t * h];
        colmajor_strided(&g, nh, (&qkv, v.offset), (&sbuf, 0), (&mut obuf, o.offset));
        for hh in 0..nh {
            let want_s = matmul_ref(&head(hh, 0), &head(hh, 1), len, len, hd, false, true);
            let got_s = &sbuf[hh * len * len..(hh + 1) * len * len];
            for (x, y) in got_s.iter().zip(&want_s) {
                assert!((x - y).abs() < 1e-12, "S head {hh}");
            }
            let want_o = matmul_ref(&want_s, &head(hh, 2), len, hd, len, false, false);
            for i in 0..len {
                for j in 0..hd {
                    let got = obuf[(c0 + i) * h + hh * hd + j];
                    assert!((got - want_o[i * hd + j]).abs() < 1e-12, "O head {hh}");
                }
            }
        }
        // Rows outside the segment are untouched.
        assert!(obuf[..c0 * h].iter().all(|&x| x == 0.0));
        // The transposed products of the backward (dK = dSᵀ·Q) map too.
        let g = strided_args(&s, sbuf.len(), &q, n, &o, t * h, nh, true, false).unwrap();
        colmajor_strided(&g, nh, (&qkv, q.offset), (&sbuf, 0), (&mut obuf, o.offset));
        for hh in 0..nh {
            let st = &sbuf[hh * len * len..(hh + 1) * len * len];
            let want = matmul_ref(st, &head(hh, 0), len, hd, len, true, false);
            for i in 0..len {
                for j in 0..hd {
                    let got = obuf[(c0 + i) * h + hh * hd + j];
                    assert!((got - want[i * hd + j]).abs() < 1e-12, "dK head {hh}");
                }
            }
        }
    }

    #[test]
    fn strided_args_refuse_what_does_not_fit() {
        let dense = MatLayout::dense(4, 5);
        let other = MatLayout::dense(5, 3);
        let out = MatLayout::dense(4, 3);
        // Fits exactly, batch 2 back to back.
        assert!(strided_args(&dense, 40, &other, 30, &out, 24, 2, false, false).is_ok());
        // One element short for the second batch of `b`.
        let e = strided_args(&dense, 40, &other, 29, &out, 24, 2, false, false).unwrap_err();
        assert!(
            e.to_string().contains("`b`") && e.to_string().contains("element 30"),
            "{e}"
        );
        // Row stride below the column count.
        let bad = MatLayout::at(0, 4, 5, 4);
        let e = strided_args(&bad, 40, &other, 30, &out, 24, 1, false, false).unwrap_err();
        assert!(e.to_string().contains("row stride"), "{e}");
        // Output batches that overlap (stride 1 between 3-wide matrices).
        let overlap = MatLayout::dense(4, 3).batched(1);
        let e = strided_args(&dense, 40, &other, 30, &overlap, 24, 2, false, false).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        // Side by side inside one row stride is fine; one column too many is not.
        let heads = MatLayout::at(0, 4, 3, 6).batched(3);
        assert!(strided_args(&dense, 40, &other, 30, &heads, 24, 2, false, false).is_ok());
        let heads = MatLayout::at(0, 4, 3, 5).batched(3);
        assert!(strided_args(&dense, 40, &other, 30, &heads, 24, 2, false, false).is_err());
        // Shared input (batch stride 0) is allowed.
        let shared = MatLayout::dense(5, 3).batched(0);
        assert!(strided_args(&dense, 40, &shared, 15, &out, 24, 2, false, false).is_ok());
        // Inner dims still checked.
        let e = strided_args(&dense, 40, &out, 24, &out, 24, 1, false, false).unwrap_err();
        assert!(e.to_string().contains("inner dims"), "{e}");
    }

    #[test]
    fn column_major_mapping_of_a_small_case() {
        // C[2,3] = A[2,4]·B[4,3]: cuBLAS computes Cᵀ[3,2] = Bᵀ·Aᵀ, lda = 3, ldb = 4, ldc = 3.
        let g = col_major_args(2, 3, 4, false, false);
        assert_eq!(
            g,
            ColMajorGemm {
                transa: false,
                transb: false,
                m: 3,
                n: 2,
                k: 4,
                lda: 3,
                ldb: 4,
                ldc: 3
            }
        );
        // A stored [4,2] (ᵀ), B stored [3,4] (ᵀ): the flags swap places with the operands.
        let g = col_major_args(2, 3, 4, true, true);
        assert_eq!(
            (g.transa, g.transb, g.lda, g.ldb, g.ldc),
            (true, true, 4, 2, 3)
        );
        // K = 0: leading dimensions stay >= 1.
        let g = col_major_args(2, 3, 0, false, true);
        assert_eq!((g.lda, g.ldb), (1, 1));
    }

    #[test]
    fn gemm_dims_accepts_every_transpose() {
        assert_eq!(
            gemm_dims(&[67, 33], &[33, 45], &[67, 45], false, false).unwrap(),
            (67, 45, 33)
        );
        assert_eq!(
            gemm_dims(&[67, 33], &[45, 33], &[67, 45], false, true).unwrap(),
            (67, 45, 33)
        );
        assert_eq!(
            gemm_dims(&[33, 67], &[33, 45], &[67, 45], true, false).unwrap(),
            (67, 45, 33)
        );
        assert_eq!(
            gemm_dims(&[33, 67], &[45, 33], &[67, 45], true, true).unwrap(),
            (67, 45, 33)
        );
    }

    #[test]
    fn gemm_dims_errors_name_the_tensor() {
        let e = gemm_dims(&[2, 3, 4], &[3, 4], &[2, 4], false, false).unwrap_err();
        assert!(
            matches!(e, BlasError::Shape(ref m) if m.contains("`a`")),
            "{e}"
        );
        let e = gemm_dims(&[2, 3], &[3], &[2, 4], false, false).unwrap_err();
        assert!(
            matches!(e, BlasError::Shape(ref m) if m.contains("`b`")),
            "{e}"
        );
        let e = gemm_dims(&[2, 3], &[4, 5], &[2, 5], false, false).unwrap_err();
        assert!(e.to_string().contains("inner dims"), "{e}");
        let e = gemm_dims(&[2, 3], &[3, 5], &[5, 2], false, false).unwrap_err();
        assert!(e.to_string().contains("`c`"), "{e}");
        // Without the transpose flag an [N,K] b does not fit.
        assert!(gemm_dims(&[2, 3], &[5, 3], &[2, 5], false, false).is_err());
        let big = i32::MAX as usize + 1;
        let e = gemm_dims(&[big, 1], &[1, 1], &[big, 1], false, false).unwrap_err();
        assert!(e.to_string().contains("32-bit"), "{e}");
    }

    #[test]
    fn gemm_types_checks_each_tensor() {
        use Storage::*;
        assert!(gemm_types(BF16, BF16, BF16).is_ok());
        assert!(gemm_types(BF16, BF16, F32).is_ok());
        assert!(gemm_types(F16, F16, F16).is_ok());
        assert!(gemm_types(F32, F32, F32).is_ok());
        let e = gemm_types(I32, I32, I32).unwrap_err();
        assert!(e.to_string().contains("`a`"), "{e}");
        let e = gemm_types(BF16, F16, BF16).unwrap_err();
        assert!(e.to_string().contains("`b`"), "{e}");
        let e = gemm_types(BF16, BF16, F16).unwrap_err();
        assert!(e.to_string().contains("`c`"), "{e}");
        let e = gemm_types(F32, F32, BF16).unwrap_err();
        assert!(e.to_string().contains("`c`"), "{e}");
    }

    #[test]
    fn lora_tensor_checks_name_the_tensor() {
        assert!(expect_tensor("lora_A", Storage::BF16, &[16, 64], Storage::BF16, [16, 64]).is_ok());
        let e =
            expect_tensor("lora_A", Storage::BF16, &[64, 16], Storage::BF16, [16, 64]).unwrap_err();
        assert!(
            matches!(e, BlasError::Shape(ref m) if m.contains("`lora_A`")),
            "{e}"
        );
        let e = expect_tensor("dy", Storage::F16, &[4, 4], Storage::BF16, [4, 4]).unwrap_err();
        assert!(
            matches!(e, BlasError::DType(ref m) if m.contains("`dy`")),
            "{e}"
        );
    }

    #[test]
    fn lora_flops() {
        let s = LoraShape {
            m: 2,
            in_features: 3,
            out_features: 5,
            rank: 1,
        };
        assert_eq!(s.forward_flops(), 2.0 * (30.0 + 6.0 + 10.0));
        assert_eq!(s.backward_flops(), 2.0 * (30.0 + 10.0 + 10.0 + 6.0 + 6.0));
    }

    #[test]
    fn errors_convert_for_time_ms() {
        let d: DeviceError = BlasError::Shape("x".into()).into();
        assert!(matches!(d, DeviceError::Shape(_)));
        let d: DeviceError = BlasError::Unavailable("no lib".into()).into();
        assert!(d.to_string().contains("cuBLAS") && d.to_string().contains("no lib"));
    }

    #[test]
    fn missing_library_message_says_how_to_fix_it() {
        let m = missing_library_message(Some("Unable to dynamically load"));
        assert!(m.contains("libcublas"), "{m}");
        assert!(m.contains("LD_LIBRARY_PATH"), "{m}");
        assert!(m.contains("Unable to dynamically load"), "{m}");
    }

    #[test]
    fn finds_cublas_below_wildcard_patterns() {
        let root = std::env::temp_dir().join(format!("lexp-cublas-test-{}", std::process::id()));
        let lib = root.join("lib/python3.12/site-packages/nvidia/cu13/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(root.join("lib/python3.12/site-packages/nvidia/cudnn/lib"))
            .unwrap();
        std::fs::write(lib.join("libcublas.so.13"), b"").unwrap();
        std::fs::write(
            root.join("lib/python3.12/site-packages/nvidia/cudnn/lib/libcublasLt.so.13"),
            b"",
        )
        .unwrap();
        let found = find_cublas_dirs(&[root.join("lib/*/site-packages/nvidia/*/lib")]);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, vec![lib]);
        assert!(find_cublas_dirs(&[PathBuf::from("/nonexistent/*/lib")]).is_empty());
    }

    #[test]
    fn blas_without_a_gpu_is_an_error_not_a_panic() {
        // Where there is no driver or GPU, the device fails first; where there is one, cuBLAS
        // may still be missing: either way an error, never a panic.
        match CudaDevice::new(0) {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(dev) => match Blas::new(&dev) {
                Ok(b) => assert!(b.version() > 0),
                Err(e) => assert!(matches!(e, BlasError::Unavailable(_)), "{e}"),
            },
        }
    }

    /// Relative L2 error of `got` against `want`.
    fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).powi(2))
            .sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den).sqrt()
    }

    /// Uploads `n` random values in `dtype` and returns the tensor and the rounded values.
    fn upload(
        dev: &CudaDevice,
        dtype: Storage,
        dims: &[usize],
        seed: &mut u64,
    ) -> (DeviceTensor, Vec<f64>) {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| lcg(seed) as f32).collect();
        let t = DeviceTensor::from_f32(dev, dtype, dims, &v).expect("upload");
        let rounded = t.to_f32_vec().expect("download");
        (t, rounded.into_iter().map(f64::from).collect())
    }

    fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        let mut t = vec![0.0; v.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = v[i * cols + j];
            }
        }
        t
    }

    /// On a GPU with libcublas: `gemm` against an f64 CPU product for NN, NT, TN, TT at
    /// 67x45x33, with alpha and beta, bf16/f16/f32; then axpy and both LoRA baselines against
    /// their CPU formulas. Run with `cargo test -p lexp-runtime --lib -- --ignored cublas`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas on the loader path"]
    fn gpu_gemm_and_lora_match_the_cpu() {
        let dev = CudaDevice::new(0).expect("a CUDA device");
        let blas = Blas::new(&dev).unwrap_or_else(|e| panic!("{e}"));
        println!("cuBLAS {} on {}", blas.version(), dev.name());
        let mut seed = 42;
        let (m, n, k) = (67, 45, 33);
        let cases = [
            (Storage::BF16, Storage::BF16, 1e-2),
            (Storage::BF16, Storage::F32, 1e-5),
            (Storage::F16, Storage::F16, 2e-3),
            (Storage::F32, Storage::F32, 1e-5),
        ];
        for (in_t, out_t, tol) in cases {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a_dims = if ta { [k, m] } else { [m, k] };
                let b_dims = if tb { [n, k] } else { [k, n] };
                let (a, av) = upload(&dev, in_t, &a_dims, &mut seed);
                let (b, bv) = upload(&dev, in_t, &b_dims, &mut seed);
                let (mut c, cv) = upload(&dev, out_t, &[m, n], &mut seed);
                let (alpha, beta) = (0.75f32, -1.25f32);
                blas.gemm(&a, &b, &mut c, ta, tb, alpha, beta)
                    .unwrap_or_else(|e| panic!("{e}"));
                let prod = matmul_ref(&av, &bv, m, n, k, ta, tb);
                let want: Vec<f64> = prod
                    .iter()
                    .zip(&cv)
                    .map(|(p, c0)| alpha as f64 * p + beta as f64 * c0)
                    .collect();
                let got = c.to_f32_vec().expect("download");
                let err = rel_l2(&got, &want);
                println!(
                    "gemm {}->{} ta={ta} tb={tb}: rel L2 {err:.2e}",
                    in_t.name(),
                    out_t.name()
                );
                assert!(err < tol, "{} ta={ta} tb={tb}: {err}", in_t.name());
                assert!(got.iter().all(|v| v.is_finite()));
            }
        }
        // beta = 0 must not read c: NaN-poisoned output comes back finite.
        let (a, av) = upload(&dev, Storage::BF16, &[m, k], &mut seed);
        let (b, bv) = upload(&dev, Storage::BF16, &[k, n], &mut seed);
        let mut c = DeviceTensor::poisoned(&dev, Storage::BF16, &[m, n]).unwrap();
        blas.gemm(&a, &b, &mut c, false, false, 1.0, 0.0).unwrap();
        let got = c.to_f32_vec().unwrap();
        assert!(rel_l2(&got, &matmul_ref(&av, &bv, m, n, k, false, false)) < 1e-2);
        // Shape errors name the tensor without launching anything.
        let e = blas
            .gemm(&a, &a, &mut c, false, false, 1.0, 0.0)
            .unwrap_err();
        assert!(e.to_string().contains("inner dims"), "{e}");

        // axpy.
        let (x, xv) = upload(&dev, Storage::BF16, &[m, n], &mut seed);
        let (mut y, yv) = upload(&dev, Storage::BF16, &[m, n], &mut seed);
        blas.axpy(-0.5, &x, &mut y).unwrap();
        let want: Vec<f64> = xv.iter().zip(&yv).map(|(x, y)| y - 0.5 * x).collect();
        assert!(rel_l2(&y.to_f32_vec().unwrap(), &want) < 1e-2);

        // LoRA, both variants, against the CPU formulas on the rounded inputs.
        let shape = LoraShape {
            m: 67,
            in_features: 45,
            out_features: 39,
            rank: 5,
        };
        let (mm, i, o, r) = (shape.m, shape.in_features, shape.out_features, shape.rank);
        let dt = Storage::BF16;
        let (x, xv) = upload(&dev, dt, &[mm, i], &mut seed);
        let (w, wv) = upload(&dev, dt, &[o, i], &mut seed);
        let (la, lav) = upload(&dev, dt, &[r, i], &mut seed);
        let (lb, lbv) = upload(&dev, dt, &[o, r], &mut seed);
        let (dy, dyv) = upload(&dev, dt, &[mm, o], &mut seed);
        let scale = 2.0f32;
        let sc = scale as f64;
        let weights = LoraWeights {
            w: &w,
            lora_a: &la,
            lora_b: &lb,
            scale,
        };
        // Forward: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
        let t_ref = matmul_ref(&xv, &lav, mm, r, i, false, true);
        let base = matmul_ref(&xv, &wv, mm, o, i, false, true);
        let lora = matmul_ref(&t_ref, &lbv, mm, o, r, false, true);
        let y_ref: Vec<f64> = base.iter().zip(&lora).map(|(b, l)| b + sc * l).collect();
        // Backward.
        let g: Vec<f64> = dyv.iter().map(|d| sc * d).collect();
        let dx_base = matmul_ref(&dyv, &wv, mm, i, o, false, false);
        let db_ref = matmul_ref(&transpose(&g, mm, o), &t_ref, o, r, mm, false, false);
        let dt_ref = matmul_ref(&g, &lbv, mm, r, o, false, false);
        let da_ref = matmul_ref(&dt_ref, &xv, r, i, mm, true, false);
        let dx_lora = matmul_ref(&dt_ref, &lav, mm, i, r, false, false);
        let dx_ref: Vec<f64> = dx_base.iter().zip(&dx_lora).map(|(a, b)| a + b).collect();
        for fused in [false, true] {
            let mut ws = LoraWorkspace::new(&dev, dt, shape).unwrap();
            let mut y = DeviceTensor::poisoned(&dev, dt, &[mm, o]).unwrap();
            let mut dx = DeviceTensor::poisoned(&dev, dt, &[mm, i]).unwrap();
            let mut da = DeviceTensor::poisoned(&dev, dt, &[r, i]).unwrap();
            let mut db = DeviceTensor::poisoned(&dev, dt, &[o, r]).unwrap();
            let e = lora_backward_baseline(
                &dev,
                &blas,
                &mut ws,
                &weights,
                &x,
                &dy,
                LoraGrads {
                    dx: &mut dx,
                    d_lora_a: &mut da,
                    d_lora_b: &mut db,
                },
            )
            .unwrap_err();
            assert!(e.to_string().contains("forward"), "{e}");
            if fused {
                lora_forward_fused_add(&dev, &blas, &mut ws, &weights, &x, &mut y).unwrap();
            } else {
                lora_forward_baseline(&dev, &blas, &mut ws, &weights, &x, &mut y).unwrap();
            }
            let grads = LoraGrads {
                dx: &mut dx,
                d_lora_a: &mut da,
                d_lora_b: &mut db,
            };
            if fused {
                lora_backward_fused_add(&dev, &blas, &mut ws, &weights, &x, &dy, grads).unwrap();
            } else {
                lora_backward_baseline(&dev, &blas, &mut ws, &weights, &x, &dy, grads).unwrap();
            }
            for (name, t, want) in [
                ("y", &y, &y_ref),
                ("dx", &dx, &dx_ref),
                ("dA", &da, &da_ref),
                ("dB", &db, &db_ref),
            ] {
                let err = rel_l2(&t.to_f32_vec().unwrap(), want);
                println!("lora fused_add={fused} {name}: rel L2 {err:.2e}");
                assert!(err < 2e-2, "{name} fused_add={fused}: {err}");
            }
        }
        // A tensor of the wrong shape is named.
        let mut ws = LoraWorkspace::new(&dev, dt, shape).unwrap();
        let mut y = DeviceTensor::zeros(&dev, dt, &[mm, o]).unwrap();
        let bad = LoraWeights {
            lora_a: &lb,
            ..weights
        };
        let e = lora_forward_baseline(&dev, &blas, &mut ws, &bad, &x, &mut y).unwrap_err();
        assert!(e.to_string().contains("`lora_A`"), "{e}");
    }

    /// On a GPU with libcublas: times the baselines at benchmark sizes (bf16) and prints them,
    /// as a sanity check against PyTorch's numbers. Run with
    /// `cargo test -p lexp-runtime --release --lib -- --ignored --nocapture gpu_baseline_speed`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas on the loader path"]
    fn gpu_baseline_speed() {
        let dev = CudaDevice::new(0).expect("a CUDA device");
        let blas = Blas::new(&dev).unwrap_or_else(|e| panic!("{e}"));
        let mut seed = 1;
        let dt = Storage::BF16;
        let rand = |dims: &[usize], seed: &mut u64| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|_| lcg(seed) as f32).collect();
            DeviceTensor::from_f32(&dev, dt, dims, &v).expect("upload")
        };
        // A Linear layer's GEMM: x[M,K]·W[N,K]ᵀ.
        let (m, n, k) = (16384, 8192, 2048);
        let x = rand(&[m, k], &mut seed);
        let w = rand(&[n, k], &mut seed);
        let mut y = DeviceTensor::zeros(&dev, dt, &[m, n]).unwrap();
        let t = crate::time_ms(&dev, 5, 20, || {
            blas.gemm(&x, &w, &mut y, false, true, 1.0, 0.0)
        })
        .unwrap();
        let flops = 2.0 * (m * n * k) as f64;
        println!(
            "gemm {m}x{n}x{k} bf16 NT: {:.3} ms median, {:.0} TFLOP/s",
            t.median(),
            flops / t.median() / 1e9
        );
        let shape = LoraShape {
            m: 16384,
            in_features: 4096,
            out_features: 4096,
            rank: 16,
        };
        let (mm, i, o, r) = (shape.m, shape.in_features, shape.out_features, shape.rank);
        let x = rand(&[mm, i], &mut seed);
        let w = rand(&[o, i], &mut seed);
        let la = rand(&[r, i], &mut seed);
        let lb = rand(&[o, r], &mut seed);
        let dy = rand(&[mm, o], &mut seed);
        let weights = LoraWeights {
            w: &w,
            lora_a: &la,
            lora_b: &lb,
            scale: 2.0,
        };
        let mut ws = LoraWorkspace::new(&dev, dt, shape).unwrap();
        let mut y = DeviceTensor::zeros(&dev, dt, &[mm, o]).unwrap();
        // The forward pass's launches one by one.
        let mut u = DeviceTensor::zeros(&dev, dt, &[mm, o]).unwrap();
        let names = [
            "y = x·Wᵀ",
            "t = x·Aᵀ",
            "u = t·Bᵀ",
            "y += s·u (cublasAxpyEx)",
            "y += s·u (lexp axpby)",
        ];
        for (step, name) in names.iter().enumerate() {
            let t = crate::time_ms(&dev, 5, 20, || match step {
                0 => blas.gemm(&x, &w, &mut y, false, true, 1.0, 0.0),
                1 => blas.gemm(&x, &la, &mut ws.t, false, true, 1.0, 0.0),
                2 => blas.gemm(&ws.t, &lb, &mut u, false, true, 1.0, 0.0),
                3 => blas.axpy(2.0, &u, &mut y),
                _ => add_scaled(&dev, 2.0, &u, &mut y),
            })
            .unwrap();
            println!("lora forward step {name}: {:.3} ms", t.median());
        }
        let mut dx = DeviceTensor::zeros(&dev, dt, &[mm, i]).unwrap();
        let mut da = DeviceTensor::zeros(&dev, dt, &[r, i]).unwrap();
        let mut db = DeviceTensor::zeros(&dev, dt, &[o, r]).unwrap();
        for fused in [false, true] {
            let fwd = crate::time_ms(&dev, 5, 20, || {
                if fused {
                    lora_forward_fused_add(&dev, &blas, &mut ws, &weights, &x, &mut y)
                } else {
                    lora_forward_baseline(&dev, &blas, &mut ws, &weights, &x, &mut y)
                }
            })
            .unwrap();
            let bwd = crate::time_ms(&dev, 5, 20, || {
                let grads = LoraGrads {
                    dx: &mut dx,
                    d_lora_a: &mut da,
                    d_lora_b: &mut db,
                };
                if fused {
                    lora_backward_fused_add(&dev, &blas, &mut ws, &weights, &x, &dy, grads)
                } else {
                    lora_backward_baseline(&dev, &blas, &mut ws, &weights, &x, &dy, grads)
                }
            })
            .unwrap();
            println!(
                "lora {mm}x{i}->{o} r={r} fused_add={fused}: forward {:.3} ms ({:.0} TFLOP/s), \
                 backward {:.3} ms ({:.0} TFLOP/s)",
                fwd.median(),
                shape.forward_flops() / fwd.median() / 1e9,
                bwd.median(),
                shape.backward_flops() / bwd.median() / 1e9
            );
        }
    }
}
