//! The pure parts of [`super`]: the epilogues, the row-major to cuBLASLt argument mapping with
//! its checks, pointer alignments and the plan cache's key. Nothing here
//! touches the GPU (unit-tested on the CPU in `cublaslt_tests.rs`).

use crate::buffer::DeviceTensor;
use crate::cublas::{strided_args, BlasError, BlasResult, MatLayout, StridedGemm};
use cudarc::cublaslt::sys::cublasLtEpilogue_t;
use lexp_compiler::dtype::Storage;

/// What [`BlasLt::matmul`](super::BlasLt::matmul) applies to `alpha·op(A)·op(B) + beta·C` before storing D.
#[derive(Debug)]
pub enum Epilogue<'a> {
    /// Nothing: a plain GEMM through cuBLASLt (the layers' input gradients).
    None,
    /// `+ bias`, `bias` of D's type with one element per column of D.
    Bias(&'a DeviceTensor),
    /// `relu(… + bias)`.
    ReluBias(&'a DeviceTensor),
}

/// The kind of an [`Epilogue`], without its buffers (part of a [`PlanKey`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EpilogueKind {
    /// [`Epilogue::None`].
    None,
    /// [`Epilogue::Bias`].
    Bias,
    /// [`Epilogue::ReluBias`].
    ReluBias,
}

impl EpilogueKind {
    pub(crate) fn sys(self) -> cublasLtEpilogue_t {
        match self {
            EpilogueKind::None => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            EpilogueKind::Bias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            EpilogueKind::ReluBias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
        }
    }

    /// Short name for errors and profiles.
    pub fn name(self) -> &'static str {
        match self {
            EpilogueKind::None => "none",
            EpilogueKind::Bias => "bias",
            EpilogueKind::ReluBias => "relu(bias)",
        }
    }
}

impl Epilogue<'_> {
    /// The kind and the bias (none for [`Epilogue::None`]).
    pub(crate) fn parts(&self) -> (EpilogueKind, Option<&DeviceTensor>) {
        match self {
            Epilogue::None => (EpilogueKind::None, None),
            Epilogue::Bias(b) => (EpilogueKind::Bias, Some(b)),
            Epilogue::ReluBias(b) => (EpilogueKind::ReluBias, Some(b)),
        }
    }
}

/// One column-major cuBLASLt matrix layout: `rows × cols`, leading dimension `ld`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtLayout {
    /// Rows as stored (column-major).
    pub rows: usize,
    /// Columns as stored.
    pub cols: usize,
    /// Elements between the starts of consecutive columns.
    pub ld: usize,
}

/// The checked cuBLASLt arguments of a row-major `D = op(A)·op(B) (+ C)`: the column-major
/// GEMM (cuBLASLt's A is the row-major B's buffer and its B the row-major A's, see
/// [`Blas::gemm`](crate::cublas::Blas::gemm)) and the stored layout of each operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtArgs {
    /// Transpose cuBLASLt's A (row-major `trans_b`).
    pub transa: bool,
    /// Transpose cuBLASLt's B (row-major `trans_a`).
    pub transb: bool,
    /// Column-major `m` (row-major `N`, the bias length).
    pub m: usize,
    /// Column-major `n` (row-major `M`).
    pub n: usize,
    /// Inner extent.
    pub k: usize,
    /// cuBLASLt's A: the row-major B's buffer.
    pub a: LtLayout,
    /// cuBLASLt's B: the row-major A's buffer.
    pub b: LtLayout,
    /// C (D's layout when C is D).
    pub c: LtLayout,
    /// D.
    pub d: LtLayout,
}

/// Checks a row-major `D[M,N] = op(A)·op(B) + C` with epilogue `kind` and maps it to cuBLASLt's
/// column-major arguments. Each layout comes with its tensor's element count; `c` is `None`
/// when C is D itself. `bias` is the bias's element count (must be `N`; `None` without a
/// bias). Single matrices only
/// (no batch).
#[allow(clippy::too_many_arguments)]
pub fn lt_args(
    a: (&MatLayout, usize),
    b: (&MatLayout, usize),
    c: Option<(&MatLayout, usize)>,
    d: (&MatLayout, usize),
    trans_a: bool,
    trans_b: bool,
    kind: EpilogueKind,
    bias: Option<usize>,
) -> BlasResult<LtArgs> {
    let g: StridedGemm = strided_args(a.0, a.1, b.0, b.1, d.0, d.1, 1, trans_a, trans_b)?;
    let (rows, cols) = (d.0.rows, d.0.cols);
    let c_ld = match c {
        None => g.ldc,
        Some((lc, numel)) => {
            if (lc.rows, lc.cols) != (rows, cols) {
                return Err(BlasError::Shape(format!(
                    "`c` is {}x{} but `d` is {rows}x{cols}",
                    lc.rows, lc.cols
                )));
            }
            if lc.ld < cols.max(1) || lc.ld > i32::MAX as usize {
                return Err(BlasError::Shape(format!(
                    "`c`: row stride {} is outside {cols}..=i32::MAX",
                    lc.ld
                )));
            }
            match lc.end(1) {
                Some(end) if end <= numel => lc.ld.max(1),
                _ => {
                    return Err(BlasError::Shape(format!(
                        "`c`: {rows}x{cols} at offset {} with row stride {} exceeds a tensor \
                         of {numel}",
                        lc.offset, lc.ld
                    )))
                }
            }
        }
    };
    if let Some(bias) = bias.filter(|&b| b != cols) {
        return Err(BlasError::Shape(format!(
            "{} epilogue: the bias has {bias} elements but `d` has {cols} columns",
            kind.name()
        )));
    }
    let stored = |t: bool, r: usize, c: usize, ld: usize| {
        let (rows, cols) = if t { (c, r) } else { (r, c) };
        LtLayout { rows, cols, ld }
    };
    Ok(LtArgs {
        transa: g.transa,
        transb: g.transb,
        m: g.m,
        n: g.n,
        k: g.k,
        a: stored(g.transa, g.m, g.k, g.lda),
        b: stored(g.transb, g.k, g.n, g.ldb),
        c: LtLayout {
            rows: g.m,
            cols: g.n,
            ld: c_ld,
        },
        d: LtLayout {
            rows: g.m,
            cols: g.n,
            ld: g.ldc,
        },
    })
}

/// The alignment cuBLASLt may assume of a pointer: its largest power-of-two divisor, at most
/// 256 bytes (the default every algorithm may assume unless told less).
pub fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// What a cached plan is valid for: the arguments, element types, epilogue, and the
/// alignment of the A, B, C, D and bias pointers (cuBLASLt's heuristic picks algorithms
/// by them; the pointers themselves change from call to call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlanKey {
    /// Shapes and layouts.
    pub args: LtArgs,
    /// Element type of A and B.
    pub ab: Storage,
    /// Element type of C and D.
    pub cd: Storage,
    /// The epilogue.
    pub epilogue: EpilogueKind,
    /// Alignments (bytes) of cuBLASLt's A, B, C, D and the bias.
    pub align: [u32; 5],
}
