//! Thin wrappers over the launches the GPU model issues: cuBLAS GEMMs on matrices inside
//! buffers, the DSL kernels on prefixes of capacity-sized buffers, row copies and partial
//! uploads/downloads. Each turns its error into a [`ModelError::Device`] naming the operation.

use crate::buffer::DeviceTensor;
use crate::checkpoint::OptConfig;
use crate::cublas::{Blas, Mat, MatLayout, MatMut};
use crate::cublaslt::Epilogue;
use crate::device::CudaDevice;
use crate::model::ModelError;
use lexp_compiler::launch::{LaunchError, TensorArg};
use lexp_kernels as k;
use std::sync::OnceLock;

/// The environment variable that turns the fused cuBLASLt epilogues off (`=1`): the layers
/// then run plain cuBLAS GEMMs followed by the element-wise bias/ReLU/residual kernels, the
/// path before the fusion (for A/B timing and as a fallback).
pub const NO_LT_EPILOGUES_ENV: &str = "LEXP_NO_LT_EPILOGUES";

/// True unless [`NO_LT_EPILOGUES_ENV`] is `1`; read once per process.
pub fn lt_epilogues() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var(NO_LT_EPILOGUES_ENV).as_deref() != Ok("1");
        tracing::debug!(on, "cuBLASLt epilogues");
        on
    })
}

/// Result of the GPU model's operations.
pub type R<T = ()> = Result<T, ModelError>;

/// Maps any displayable error to [`ModelError::Device`] prefixed with `what`.
pub fn dev_err<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> ModelError {
    let what = what.into();
    move |e| ModelError::Device(format!("{what}: {e}"))
}

pub(super) fn launch_err(e: LaunchError) -> ModelError {
    ModelError::Device(e.to_string())
}

/// The first `dims`-product elements of `t`, as a kernel argument of `dims`.
pub fn arg(t: &DeviceTensor, dims: &[usize]) -> R<TensorArg> {
    t.offset_arg(0, dims).map_err(dev_err("kernel argument"))
}

/// `dims` elements of `t` starting at element `offset`.
pub fn arg_at(t: &DeviceTensor, offset: usize, dims: &[usize]) -> R<TensorArg> {
    t.offset_arg(offset, dims)
        .map_err(dev_err("kernel argument"))
}

/// A dense `rows × cols` matrix at the start of `t`.
pub fn dense(t: &DeviceTensor, rows: usize, cols: usize) -> Mat<'_> {
    Mat::new(t, MatLayout::dense(rows, cols))
}

/// A dense `rows × cols` output matrix at the start of `t`.
pub fn dense_mut(t: &mut DeviceTensor, rows: usize, cols: usize) -> MatMut<'_> {
    MatMut::new(t, MatLayout::dense(rows, cols))
}

/// `c = alpha·op(a)·op(b) + beta·c` (one matrix).
#[allow(clippy::too_many_arguments)]
pub fn mm(
    blas: &Blas,
    a: Mat<'_>,
    b: Mat<'_>,
    c: MatMut<'_>,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> R {
    blas.gemm_strided_batched(a, b, c, 1, trans_a, trans_b, alpha, beta)
        .map_err(dev_err("GEMM"))
}

/// `d = epilogue(x·op(w) + beta·c)` in one cuBLASLt GEMM ([`crate::cublaslt`]): `c` another
/// matrix of `d`'s shape, or `None` for `d` itself (not read when `beta == 0`). `Ok(false)`,
/// with nothing queued, when cuBLASLt has no algorithm for it: the caller runs the unfused
/// ops instead.
#[allow(clippy::too_many_arguments)]
pub fn mm_fused(
    blas: &Blas,
    x: Mat<'_>,
    w: Mat<'_>,
    c: Option<Mat<'_>>,
    d: MatMut<'_>,
    trans_w: bool,
    beta: f32,
    epilogue: Epilogue<'_>,
) -> R<bool> {
    blas.lt()
        .and_then(|lt| lt.try_matmul(x, w, c, d, (false, trans_w), (1.0, beta), epilogue))
        .map_err(dev_err("fused GEMM"))
}

/// `d = x·op(w)` (one matrix, alpha 1, beta 0) through cuBLASLt without an epilogue, as the
/// forward's fused GEMMs run; plain cuBLAS when the epilogues are off
/// ([`NO_LT_EPILOGUES_ENV`]) or cuBLASLt has no algorithm. The layers' input-gradient
/// products run here (OPT-1.3B's at 779–830 TFLOP/s in call 94, against 755–813 through
/// `cublasGemmEx` in call 89: another run, not an A/B).
pub fn mm_lt(
    blas: &Blas,
    x: Mat<'_>,
    w: Mat<'_>,
    (d, dl): (&mut DeviceTensor, MatLayout),
    trans_w: bool,
) -> R {
    if lt_epilogues()
        && mm_fused(
            blas,
            x,
            w,
            None,
            MatMut::new(d, dl),
            trans_w,
            0.0,
            Epilogue::None,
        )?
    {
        return Ok(());
    }
    mm(blas, x, w, MatMut::new(d, dl), false, trans_w, 1.0, 0.0)
}

/// [`mm`] over `batch` matrices (the heads of one packed sequence).
#[allow(clippy::too_many_arguments)]
pub fn mm_batched(
    blas: &Blas,
    a: Mat<'_>,
    b: Mat<'_>,
    c: MatMut<'_>,
    batch: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
) -> R {
    blas.gemm_strided_batched(a, b, c, batch, trans_a, trans_b, alpha, 0.0)
        .map_err(dev_err("attention GEMM"))
}

/// `y = LN(x)` over rows of `x [rows, h]` into `y` (row stride `y_ld`), writing the f32
/// `mean` and `rstd` of each row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm(
    dev: &CudaDevice,
    x: &DeviceTensor,
    (w, b): (&DeviceTensor, &DeviceTensor),
    (y, y_ld): (&DeviceTensor, usize),
    mean: &DeviceTensor,
    rstd: &DeviceTensor,
    rows: usize,
    h: usize,
) -> R {
    k::layernorm_fwd::launch_with(
        dev,
        &[("BLOCK", k::layernorm::row_block(h))],
        &k::layernorm_fwd::Args {
            x: &arg(x, &[rows, h])?,
            w: &w.as_arg(),
            b: &b.as_arg(),
            y: &mat_arg(y, &MatLayout::at(0, rows, h, y_ld))?,
            mean: &arg(mean, &[rows])?,
            rstd: &arg(rstd, &[rows])?,
            eps: OptConfig::LAYER_NORM_EPS,
        },
    )
    .map_err(launch_err)
}

/// `dx = LN_backward(dy) + beta·dx` for the LayerNorm of `x` with weight `w` and saved
/// statistics (`beta = 1`: added onto the gradient already in `dx`; `0`: `dx` not read).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    dev: &CudaDevice,
    x: &DeviceTensor,
    w: &DeviceTensor,
    dy: &DeviceTensor,
    mean: &DeviceTensor,
    rstd: &DeviceTensor,
    (dx, beta): (&DeviceTensor, f32),
    rows: usize,
    h: usize,
) -> R {
    k::layernorm_bwd_dx::launch_with(
        dev,
        &[("BLOCK", k::layernorm::row_block(h))],
        &k::layernorm_bwd_dx::Args {
            x: &arg(x, &[rows, h])?,
            w: &w.as_arg(),
            dy: &arg(dy, &[rows, h])?,
            mean: &arg(mean, &[rows])?,
            rstd: &arg(rstd, &[rows])?,
            beta,
            dx: &arg(dx, &[rows, h])?,
        },
    )
    .map_err(launch_err)
}

/// `dst[..n] = src[..n]` rounded from f32 to `dst`'s type (the `convert` DSL kernel).
pub fn convert(dev: &CudaDevice, src: &DeviceTensor, dst: &DeviceTensor, n: usize) -> R {
    let (x, y) = (arg(src, &[n])?, arg(dst, &[n])?);
    k::convert::launch(dev, &k::convert::Args { x: &x, y: &y }).map_err(launch_err)
}

/// `dst[..n] = src[src_off..src_off + n]` rounded from f32 to `dst`'s type.
pub fn convert_from(
    dev: &CudaDevice,
    (src, src_off): (&DeviceTensor, usize),
    dst: &DeviceTensor,
    n: usize,
) -> R {
    let (x, y) = (arg_at(src, src_off, &[n])?, arg(dst, &[n])?);
    k::convert::launch(dev, &k::convert::Args { x: &x, y: &y }).map_err(launch_err)
}

/// `x[r, c] += bias[c]` in place on `x [rows, cols]`; with `relu`, then `x = max(x, 0)`.
pub fn bias_add(
    dev: &CudaDevice,
    x: &DeviceTensor,
    bias: &DeviceTensor,
    rows: usize,
    cols: usize,
    relu: bool,
) -> R {
    let x = arg(x, &[rows, cols])?;
    let bias = bias.as_arg();
    if relu {
        k::bias_relu::launch(dev, &k::bias_relu::Args { x: &x, bias: &bias })
    } else {
        k::bias_add::launch(dev, &k::bias_add::Args { x: &x, bias: &bias })
    }
    .map_err(launch_err)
}

/// `y = x + bias + res` over `[rows, cols]`.
#[allow(clippy::too_many_arguments)]
pub fn bias_residual(
    dev: &CudaDevice,
    x: &DeviceTensor,
    bias: &DeviceTensor,
    res: &DeviceTensor,
    y: &DeviceTensor,
    rows: usize,
    cols: usize,
) -> R {
    k::bias_residual::launch(
        dev,
        &k::bias_residual::Args {
            x: &arg(x, &[rows, cols])?,
            bias: &bias.as_arg(),
            res: &arg(res, &[rows, cols])?,
            y: &arg(y, &[rows, cols])?,
        },
    )
    .map_err(launch_err)
}

/// Inverted dropout of `x [rows, cols]` in place from the f32 uniforms at the start of `u`:
/// `mask = u >= p ? 1/(1−p) : 0` written at element `m_off` of `mask`, and `x ⊙= mask`.
#[allow(clippy::too_many_arguments)]
pub fn dropout_mask(
    dev: &CudaDevice,
    x: &DeviceTensor,
    u: &DeviceTensor,
    mask: &DeviceTensor,
    m_off: usize,
    rows: usize,
    cols: usize,
    p: f32,
) -> R {
    k::dropout_mask::launch(
        dev,
        &k::dropout_mask::Args {
            x: &arg(x, &[rows, cols])?,
            u: &arg(u, &[rows, cols])?,
            mask: &arg_at(mask, m_off, &[rows, cols])?,
            p,
        },
    )
    .map_err(launch_err)
}

/// `x ⊙= m` over `x [rows, cols]` (at its start), `m` at element `m_off` (a saved mask).
pub fn mul_inplace(
    dev: &CudaDevice,
    x: &DeviceTensor,
    m: &DeviceTensor,
    m_off: usize,
    rows: usize,
    cols: usize,
) -> R {
    k::mul_inplace::launch(
        dev,
        &k::mul_inplace::Args {
            x: &arg(x, &[rows, cols])?,
            m: &arg_at(m, m_off, &[rows, cols])?,
        },
    )
    .map_err(launch_err)
}

/// `out[off .. off + n] += Σ_rows dy` (f32) for `dy` a `[t, n]` view, as the GEMM `1ᵀ·dy` with
/// `ones` (at least `t` ones): a bias gradient, accumulated like LoRA's `dA`, `dB`.
pub fn column_sums(
    blas: &Blas,
    ones: &DeviceTensor,
    dy: Mat<'_>,
    out: &mut DeviceTensor,
    (off, n): (usize, usize),
    t: usize,
) -> R {
    let ones = Mat::new(ones, MatLayout::at(0, 1, t, t));
    let out = MatMut::new(out, MatLayout::at(off, 1, n, n));
    mm(blas, ones, dy, out, false, false, 1.0, 1.0)
}

/// The environment variable that puts the LoRA branch back on cuBLAS (`=1`): its skinny
/// products as cuBLAS GEMMs (two forward, four backward) instead of the DSL's `lora_down`,
/// `lora_expand` and `lora_wgrad`, the path before those kernels (for A/B timing and as a
/// fallback).
pub const LORA_CUBLAS_ENV: &str = "LEXP_LORA_CUBLAS";

/// True unless [`LORA_CUBLAS_ENV`] is `1`; read once per process.
pub fn lora_kernels() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var(LORA_CUBLAS_ENV).as_deref() != Ok("1");
        tracing::debug!(on, "LoRA branch kernels");
        on
    })
}

/// A matrix inside a buffer (offset, row stride) as a 2-D kernel argument; refused when any
/// of its elements lies outside the buffer.
pub fn mat_arg(t: &DeviceTensor, l: &MatLayout) -> R<TensorArg> {
    let fits = l.end(1).is_some_and(|end| end <= t.numel());
    if !fits || l.ld < l.cols {
        return Err(ModelError::Device(format!(
            "kernel argument: a {}x{} matrix at element {} with row stride {} does not fit a \
             tensor of {} elements",
            l.rows,
            l.cols,
            l.offset,
            l.ld,
            t.numel()
        )));
    }
    let mut a = arg_at(t, l.offset, &[0])?;
    a.dims = vec![l.rows, l.cols];
    a.strides = vec![l.ld, 1];
    Ok(a)
}

/// `u = T(s · x · wᵀ)` (the down product of a LoRA branch, `w [r, K]`, `u [M, rp]` at `ul`
/// with its padding columns zeroed; `lexp_kernels::lora_down`). `u` may lie in the tensor of
/// `x` or `w` (the LoRA fold keeps `u` beside LN1's output and `du` beside `dqkv`), in columns
/// they do not cover.
pub fn lora_down(
    dev: &CudaDevice,
    x: Mat<'_>,
    w: Mat<'_>,
    s: f32,
    (u, ul): (&DeviceTensor, MatLayout),
) -> R {
    k::lora_down::launch(
        dev,
        &k::lora_down::Args {
            x: &mat_arg(x.tensor, &x.layout)?,
            w: &mat_arg(w.tensor, &w.layout)?,
            s,
            u: &mat_arg(u, &ul)?,
        },
    )
    .map_err(launch_err)
}

/// `y += s · u · w` in place (the expand of a LoRA branch, `u [M, rp]`, `w [r, N]`;
/// `lexp_kernels::lora_expand`).
pub fn lora_expand(dev: &CudaDevice, u: Mat<'_>, w: Mat<'_>, s: f32, y: MatMut<'_>) -> R {
    k::lora_expand::launch(
        dev,
        &k::lora_expand::Args {
            u: &mat_arg(u.tensor, &u.layout)?,
            w: &mat_arg(w.tensor, &w.layout)?,
            s,
            y: &mat_arg(y.tensor, &y.layout)?,
        },
    )
    .map_err(launch_err)
}

/// Token chunks of the LoRA weight-gradient split-K ([`lora_wgrad`]): enough programs to
/// fill the GPU at a few thousand tokens, few enough that the reduction stays small (the
/// fold's backward at 4, 8 and 16 chunks: 16 fastest from 4096 tokens, 8 about 1% faster at 2048,
/// `bench/results/2026-12-02-h200-lora-pair-swizzle/call120`).
pub const LORA_WGRAD_CHUNKS: usize = 16;

/// `g += scale · bᵀ·a` for one LoRA module's gradient (`a [M, rp]` the saved `u` or `du`,
/// `b [M, Q]`), through the `[chunks·Q, rp]` f32 scratch `part`; `g` is the `Q·r` gradient
/// at element `g_off` of `grads`, `[Q, r]` (`dB`) or, `transposed`, `[r, Q]` (`dA`). Split
/// over [`LORA_WGRAD_CHUNKS`] token chunks, summed in order: deterministic
/// (`lexp_kernels::lora_wgrad`, `lora_wgrad_reduce`).
#[allow(clippy::too_many_arguments)]
pub fn lora_wgrad(
    dev: &CudaDevice,
    a: Mat<'_>,
    b: Mat<'_>,
    part: &DeviceTensor,
    r: usize,
    scale: f32,
    (grads, g_off, transposed): (&DeviceTensor, usize, bool),
) -> R {
    let q = b.layout.cols;
    let rp = a.layout.cols;
    lora_wgrad_pass(dev, a, b, (part, 0))?;
    k::lora_wgrad_reduce::launch(
        dev,
        &k::lora_wgrad_reduce::Args {
            part: &arg_at(part, 0, &[LORA_WGRAD_CHUNKS, q * rp])?,
            q: q as i64,
            r: r as i64,
            rp: rp as i64,
            tr: transposed as i64,
            s: scale,
            g: &arg_at(grads, g_off, &[q * r])?,
        },
    )
    .map_err(launch_err)
}

/// The first half of [`lora_wgrad`]: the `[chunks·Q, W]` partial sums of `bᵀ·a` (`a [M, W]`,
/// `W` at most 16, `b [M, Q]`) at element `off` of `part`, to be reduced later (the LoRA
/// fold reduces a layer's passes in one [`lora_wgrad_reduce_many`] launch).
pub fn lora_wgrad_pass(
    dev: &CudaDevice,
    a: Mat<'_>,
    b: Mat<'_>,
    (part, off): (&DeviceTensor, usize),
) -> R {
    let (q, w) = (b.layout.cols, a.layout.cols);
    k::lora_wgrad::launch(
        dev,
        &k::lora_wgrad::Args {
            a: &mat_arg(a.tensor, &a.layout)?,
            b: &mat_arg(b.tensor, &b.layout)?,
            part: &arg_at(part, off, &[LORA_WGRAD_CHUNKS * q, w])?,
        },
    )
    .map_err(launch_err)
}

/// Two [`lora_wgrad_pass`]es in one launch (`lexp_kernels::lora_wgrad_pair`): the partial
/// sums of `b0ᵀ·a0` at element `off` of `part` and those of `b1ᵀ·a1` right after them (two
/// consecutive blocks for [`lora_wgrad_reduce_many`]). Both pairs span the same tokens and
/// features (`b0`, `b1 [M, Q]`) with equally wide rank sides.
pub fn lora_wgrad_pair(
    dev: &CudaDevice,
    (a0, b0): (Mat<'_>, Mat<'_>),
    (a1, b1): (Mat<'_>, Mat<'_>),
    (part, off): (&DeviceTensor, usize),
) -> R {
    let (q, w) = (b0.layout.cols, a0.layout.cols);
    k::lora_wgrad_pair::launch(
        dev,
        &k::lora_wgrad_pair::Args {
            a0: &mat_arg(a0.tensor, &a0.layout)?,
            b0: &mat_arg(b0.tensor, &b0.layout)?,
            a1: &mat_arg(a1.tensor, &a1.layout)?,
            b1: &mat_arg(b1.tensor, &b1.layout)?,
            part: &arg_at(part, off, &[2 * LORA_WGRAD_CHUNKS * q, w])?,
        },
    )
    .map_err(launch_err)
}

/// Whether [`lora_wgrad_reduce_many`] adds its sums to the gradients or writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// `g += sums`: the engine's micro-batches accumulate into gradients zeroed once per step.
    Accumulate,
    /// `g = sums`: a backward that owns its gradients (as autograd's first backward writes
    /// them) and so needs no zeroing launch.
    Overwrite,
}

/// Reduces `blocks` [`lora_wgrad_pass`]es of `[chunks·q, w]` each (block `b` at element
/// `b·chunks·q·w` of `part`) into the gradients the rows of `mods` name
/// (`lexp_kernels::lora_wgrad_reduce_many`: block, column shift, transposed, offset in
/// `grads`, scaled by `s`), in one launch.
pub fn lora_wgrad_reduce_many(
    dev: &CudaDevice,
    (part, blocks): (&DeviceTensor, usize),
    (q, r, w): (usize, usize, usize),
    mods: &TensorArg,
    s: f32,
    (grads, write): (&DeviceTensor, GradWrite),
) -> R {
    k::lora_wgrad_reduce_many::launch(
        dev,
        &k::lora_wgrad_reduce_many::Args {
            part: &arg_at(part, 0, &[blocks * LORA_WGRAD_CHUNKS, q * w])?,
            mods,
            q: q as i64,
            r: r as i64,
            w: w as i64,
            n: (q * r) as i64,
            chunks: LORA_WGRAD_CHUNKS as i64,
            s,
            acc: (write == GradWrite::Accumulate) as i64,
            g: &grads.as_arg(),
        },
    )
    .map_err(launch_err)
}

/// Writes every LoRA module's `Bᵀ [r, rows_m]` into `dst` at the offset its `B [rows_m, r]`
/// has in `src` (`offs`, `rows`: i32 per module), in one launch (`lexp_kernels::transpose_b`).
pub fn transpose_b(
    dev: &CudaDevice,
    src: &DeviceTensor,
    (offs, rows): (&DeviceTensor, &DeviceTensor),
    r: usize,
    dst: &DeviceTensor,
) -> R {
    k::transpose_b::launch(
        dev,
        &k::transpose_b::Args {
            x: &src.as_arg(),
            offs: &offs.as_arg(),
            rows: &rows.as_arg(),
            r: r as i64,
            y: &dst.as_arg(),
        },
    )
    .map_err(launch_err)
}

/// `y += x` over the first `n` elements.
pub fn add(dev: &CudaDevice, x: &DeviceTensor, y: &DeviceTensor, n: usize) -> R {
    k::axpby::launch(
        dev,
        &k::axpby::Args {
            a: 1.0,
            x: &arg(x, &[n])?,
            b: 1.0,
            y: &arg(y, &[n])?,
        },
    )
    .map_err(launch_err)
}

/// `d = d ⊙ [y > 0]` in place over the first `n` elements (`y` the ReLU output).
pub fn relu_bwd(dev: &CudaDevice, y: &DeviceTensor, d: &DeviceTensor, n: usize) -> R {
    let dv = arg(d, &[n])?;
    k::relu_bwd::launch(
        dev,
        &k::relu_bwd::Args {
            y: &arg(y, &[n])?,
            dy: &dv,
            dx: &dv,
        },
    )
    .map_err(launch_err)
}

/// Copies `rows` rows of `width` elements from row `src_row` of `src` to row `dst_row` of
/// `dst` (same element type), on the device's stream.
pub fn copy_rows(
    dev: &CudaDevice,
    src: &DeviceTensor,
    src_row: usize,
    dst: &mut DeviceTensor,
    dst_row: usize,
    rows: usize,
    width: usize,
) -> R {
    let e = src.dtype().bytes();
    let (s0, d0, n) = (src_row * width * e, dst_row * width * e, rows * width * e);
    if src.dtype() != dst.dtype() || s0 + n > src.bytes() || d0 + n > dst.bytes() {
        return Err(ModelError::Device(format!(
            "row copy of {rows} rows out of range ({} -> {})",
            src.bytes(),
            dst.bytes()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let from = src.slice().slice(s0..s0 + n);
    let mut to = dst.slice_mut().slice_mut(d0..d0 + n);
    dev.stream()
        .memcpy_dtod(&from, &mut to)
        .map_err(dev_err("copying rows on the device"))
}

/// Writes `bytes` to the start of `t` (which may be larger), on the device's stream.
pub fn upload_prefix(dev: &CudaDevice, t: &mut DeviceTensor, bytes: &[u8]) -> R {
    if bytes.len() > t.bytes() {
        return Err(ModelError::Device(format!(
            "upload of {} bytes into a buffer of {}",
            bytes.len(),
            t.bytes()
        )));
    }
    if bytes.is_empty() {
        return Ok(());
    }
    let mut to = t.slice_mut().slice_mut(0..bytes.len());
    dev.stream()
        .memcpy_htod(bytes, &mut to)
        .map_err(dev_err("uploading the batch"))
}

/// Queues a download of the first `n` f32 values of `t` into `out` (valid once the stream
/// is synchronized).
pub fn download_f32(dev: &CudaDevice, t: &DeviceTensor, n: usize, out: &mut Vec<f32>) -> R {
    if n * 4 > t.bytes() {
        return Err(ModelError::Device(format!(
            "download of {n} values from a buffer of {} bytes",
            t.bytes()
        )));
    }
    let mut bytes = vec![0u8; n * 4];
    if n > 0 {
        let from = t.slice().slice(0..n * 4);
        dev.stream()
            .memcpy_dtoh(&from, bytes.as_mut_slice())
            .map_err(dev_err("downloading results"))?;
    }
    dev.synchronize().map_err(dev_err("finishing the step"))?;
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
    Ok(())
}

/// The tile configuration of the row-softmax kernels for rows of `cols` elements: the
/// 256-wide one for short sequences (fewer idle lanes), else the default 2048-wide one.
fn softmax_tile(cols: usize) -> &'static [(&'static str, usize)] {
    if cols <= 256 {
        &[("BLOCK", 256), ("CHUNK", 128)]
    } else {
        &[]
    }
}

/// Causal softmax of one sequence's scores, all heads: `s` f32 `[nh·L, L]` → `p` `[nh·L, L]`
/// (zeros above the diagonal) and the f32 log-sum-exp of each row.
pub fn causal_softmax(dev: &CudaDevice, s: &TensorArg, p: &TensorArg, lse: &TensorArg) -> R {
    let tile = softmax_tile(s.dim(1));
    k::causal_softmax::launch_with(dev, tile, &k::causal_softmax::Args { s, p, lse })
        .map_err(launch_err)
}

/// `ds = p ⊙ (dp − rowsum(p ⊙ dp))`, `dp` f32.
pub fn softmax_bwd(dev: &CudaDevice, p: &TensorArg, dp: &TensorArg, ds: &TensorArg) -> R {
    let tile = softmax_tile(p.dim(1));
    k::softmax_bwd::launch_with(dev, tile, &k::softmax_bwd::Args { p, dp, ds }).map_err(launch_err)
}

/// The xent kernel's vocabulary tile: 256 wide for small vocabularies, else the default 2048.
fn xent_tile(cols: usize) -> &'static [(&'static str, usize)] {
    if cols <= 2048 {
        &[("CHUNK", 256)]
    } else {
        &[]
    }
}

/// Cross-entropy of f32 logits `z [R, V]` against `targets [R]`: `loss [R]`, and `dz [R, V]`
/// (in its own type) becomes `scale·(softmax(z) − onehot)`.
pub fn xent(
    dev: &CudaDevice,
    z: &TensorArg,
    targets: &TensorArg,
    loss: &TensorArg,
    scale: f32,
    dz: &TensorArg,
) -> R {
    k::xent_fwd_bwd::launch_with(
        dev,
        xent_tile(z.dim(1)),
        &k::xent_fwd_bwd::Args {
            z,
            targets,
            loss,
            scale,
            dz,
        },
    )
    .map_err(launch_err)
}

/// `y[r] = tok[ids[r]] + pos[pos_ids[r] + 2]`.
pub fn embedding(
    dev: &CudaDevice,
    tok: &TensorArg,
    pos: &TensorArg,
    ids: &TensorArg,
    pos_ids: &TensorArg,
    y: &TensorArg,
) -> R {
    k::embedding_fwd::launch(
        dev,
        &k::embedding_fwd::Args {
            tok,
            pos,
            ids,
            pos_ids,
            y,
        },
    )
    .map_err(launch_err)
}
