//! Matrix products through the `gemm` crate: the general [`matmul`], the `nn.Linear` forward
//! [`linear`], and [`col_sum`] for bias gradients (RUNTIME.md §2.1).

use gemm::Parallelism;
use rayon::prelude::*;

/// Products with fewer multiply-adds than this run single-threaded: splitting them over rayon
/// costs more than it saves.
const PAR_MIN_FLOPS: usize = 1 << 18;

/// The parallelism for an `m×k·k×n` product: rayon (all threads of the current pool) when it
/// is big enough to pay for it and more than one thread is available, else single-threaded.
pub(crate) fn auto_parallelism(m: usize, k: usize, n: usize) -> Parallelism {
    let work = m.saturating_mul(k).saturating_mul(n);
    if work >= PAR_MIN_FLOPS && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `out[m,n] = alpha·op(a)·op(b) + beta·out`, row-major, f32 with f32 accumulation.
///
/// `op(a)` is `[m,k]`: `a` is stored `[m,k]`, or `[k,m]` and transposed if `ta`. `op(b)` is
/// `[k,n]`: `b` is stored `[k,n]`, or `[n,k]` and transposed if `tb`. With `beta == 0` the old
/// contents of `out` are never read (NaN or garbage in `out` do not propagate). Large products
/// run on the rayon pool, small ones on the calling thread.
///
/// # Panics
/// If `a.len() != m·k`, `b.len() != k·n` or `out.len() != m·n` (callers are internal, so a
/// mismatch is a bug).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
) {
    matmul_with(
        out,
        a,
        b,
        m,
        k,
        n,
        ta,
        tb,
        alpha,
        beta,
        auto_parallelism(m, k, n),
    );
}

/// [`matmul`] with an explicit parallelism (callers already inside a rayon loop pass
/// [`Parallelism::None`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_with(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
    par: Parallelism,
) {
    assert_eq!(
        a.len(),
        m * k,
        "matmul: a has {} elements, expected m·k = {m}·{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "matmul: b has {} elements, expected k·n = {k}·{n}",
        b.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "matmul: out has {} elements, expected m·n = {m}·{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == 0.0 {
        // The product contributes nothing (and must not turn inf·0 in a or b into NaN).
        if beta == 0.0 {
            out.fill(0.0);
        } else if beta != 1.0 {
            out.iter_mut().for_each(|o| *o *= beta);
        }
        return;
    }
    // Element (i, p) of op(a) is at i·lhs_rs + p·lhs_cs; element (p, j) of op(b) at
    // p·rhs_rs + j·rhs_cs; all strides are in elements.
    let (lhs_rs, lhs_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rhs_rs, rhs_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above guarantee that every element addressed through these strides
    // lies inside `a`, `b` and `out`; `out` is borrowed mutably, so it aliases neither input.
    // `gemm` computes dst := alpha_g·dst + beta_g·lhs·rhs, so our (alpha, beta) swap places;
    // with `read_dst == false` it never reads dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            lhs_cs,
            lhs_rs,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// `nn.Linear` forward: `x[rows,in_f]·wᵀ + bias`, with `w` stored `[out_f,in_f]` and `bias`
/// `[out_f]`; returns `[rows,out_f]`.
///
/// # Panics
/// If a slice length does not match the dimensions.
pub fn linear(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out_f: usize,
    in_f: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = match bias {
        Some(b) => {
            assert_eq!(
                b.len(),
                out_f,
                "linear: bias has {} elements, expected {out_f}",
                b.len()
            );
            let mut out = Vec::with_capacity(rows * out_f);
            for _ in 0..rows {
                out.extend_from_slice(b);
            }
            out
        }
        None => vec![0.0; rows * out_f],
    };
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    matmul(&mut out, x, w, rows, in_f, out_f, false, true, 1.0, beta);
    out
}

/// Rows per rayon task of [`col_sum`].
const COL_SUM_ROWS: usize = 64;

/// Column sums of `x[rows,cols]` (the sum over rows, e.g. a bias gradient `Σ_rows dY`),
/// accumulated in f64 and rounded once.
///
/// # Panics
/// If `x.len() != rows·cols`.
pub fn col_sum(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        rows * cols,
        "col_sum: x has {} elements, expected {rows}·{cols}",
        x.len()
    );
    if cols == 0 {
        return Vec::new();
    }
    let add_rows = |mut acc: Vec<f64>, block: &[f32]| {
        for row in block.chunks_exact(cols) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        acc
    };
    let sums = if x.len() < super::PAR_MIN_LEN {
        add_rows(vec![0.0; cols], x)
    } else {
        x.par_chunks(COL_SUM_ROWS * cols)
            .fold(|| vec![0.0f64; cols], add_rows)
            .reduce(
                || vec![0.0f64; cols],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    };
    sums.into_iter().map(|s| s as f32).collect()
}
