//! LayerNorm forward and backward over the last dimension, for any row length.
//!
//! Forward saves the per-row mean and reciprocal standard deviation (f32) for the backward.
//!
//! Statistics use shifted data, `x - x[row, 0]`: both moments from one pass, with no
//! cancellation when |mean| >> std. A row of at most `BLOCK` elements is read once into
//! registers (one read and one write of memory); the runtime picks the smallest `BLOCK` that
//! holds the row ([`row_block`]), so no lane idles on a masked half of the tile. Longer rows loop in `CHUNK`-wide tiles: one
//! pass for the moments, a second that normalises (its read normally hits L2).

use lexp_macros::kernel;

/// The `BLOCK` of [`layernorm_fwd`] / [`layernorm_bwd_dx`] for rows of `n` elements: the
/// smallest compiled one that holds the row, else the largest (rows past it loop in chunks).
pub fn row_block(n: usize) -> usize {
    [1024, 2048, 4096]
        .into_iter()
        .find(|&b| n <= b)
        .unwrap_or(4096)
}

/// `y = (x - mean) * rstd * w + b` per row; writes `mean` and `rstd = 1/sqrt(var + eps)`.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [4096, 2048, 1024], CHUNK = [1024]),
    warps = 4,
    grid = [x.dim(0)],
    require = [
        y.dim(0) == x.dim(0), y.dim(1) == x.dim(1), w.dim(0) == x.dim(1), b.dim(0) == x.dim(1),
        mean.dim(0) == x.dim(0), rstd.dim(0) == x.dim(0)
    ]
)]
pub fn layernorm_fwd<T, const BLOCK: usize, const CHUNK: usize>(
    x: Tensor<T, 2>,
    w: Tensor<T, 1>,
    b: Tensor<T, 1>,
    y: TensorMut<T, 2>,
    mean: TensorMut<f32, 1>,
    rstd: TensorMut<f32, 1>,
    eps: f32,
) {
    let row = program_id(0);
    let n = x.dim(1);
    let nf = n.cast::<f32>();
    if n <= BLOCK {
        let cols = range::<BLOCK>();
        // Shifted moments: the two sums do not depend on each other. Lanes past the row's end
        // read `shift` itself, so their `d` is exactly 0 without a per-element select.
        let shift = x.load([row, 0]);
        let d = x.load_or([row, cols], shift).cast::<f32>() - shift.cast::<f32>();
        let m1 = d.sum(0) / nf;
        let var = max((d * d).sum(0) / nf - m1 * m1, 0.0);
        let mu = shift + m1;
        let rs = rsqrt(var + eps);
        mean.store([row], mu);
        rstd.store([row], rs);
        // `x - mean = d - m1`: only `d` stays live through the reductions (few registers,
        // many rows in flight per multiprocessor).
        y.store(
            [row, cols],
            (d - m1) * rs * w.load([cols]).cast::<f32>() + b.load([cols]).cast::<f32>(),
        );
        return;
    }
    // Statistics of `x - shift` with `shift` = the row's first element: one pass for both
    // moments, without the cancellation of raw sums when |mean| >> std.
    let shift = x.load([row, 0]).cast::<f32>();
    let mut s1 = zeros::<f32, CHUNK>();
    let mut s2 = zeros::<f32, CHUNK>();
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let d = select(cols < n, x.load([row, cols]).cast::<f32>() - shift, 0.0);
        s1 += d;
        s2 += d * d;
    }
    let m1 = s1.sum(0) / nf;
    let mu = shift + m1;
    let var = max(s2.sum(0) / nf - m1 * m1, 0.0);
    let rs = rsqrt(var + eps);
    mean.store([row], mu);
    rstd.store([row], rs);
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let xhat = (x.load([row, cols]).cast::<f32>() - mu) * rs;
        y.store(
            [row, cols],
            xhat * w.load([cols]).cast::<f32>() + b.load([cols]).cast::<f32>(),
        );
    }
}

/// Input gradient: `dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + beta * dx` with
/// `g = dy * w`. With `beta = 1` it adds onto the residual stream's gradient already in `dx`
/// (the decoder layer's `g += LN_backward(..)`, one pass instead of a separate add); with
/// `beta = 0` the old `dx` is not read.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [4096, 2048, 1024], CHUNK = [1024]),
    warps = 4,
    grid = [x.dim(0)],
    require = [
        dy.dim(0) == x.dim(0), dy.dim(1) == x.dim(1), dx.dim(0) == x.dim(0), dx.dim(1) == x.dim(1),
        w.dim(0) == x.dim(1), mean.dim(0) == x.dim(0), rstd.dim(0) == x.dim(0)
    ]
)]
pub fn layernorm_bwd_dx<T, const BLOCK: usize, const CHUNK: usize>(
    x: Tensor<T, 2>,
    w: Tensor<T, 1>,
    dy: Tensor<T, 2>,
    mean: Tensor<f32, 1>,
    rstd: Tensor<f32, 1>,
    beta: f32,
    dx: TensorMut<T, 2>,
) {
    let row = program_id(0);
    let n = x.dim(1);
    let nf = n.cast::<f32>();
    let mu = mean.load([row]);
    let rs = rstd.load([row]);
    if n <= BLOCK {
        let cols = range::<BLOCK>();
        let xhat = (x.load([row, cols]).cast::<f32>() - mu) * rs;
        let g = dy.load([row, cols]).cast::<f32>() * w.load([cols]).cast::<f32>();
        let c1 = g.sum(0) / nf;
        let c2 = (g * xhat).sum(0) / nf;
        let v = rs * (g - c1 - xhat * c2);
        if beta != 0.0 {
            dx.store([row, cols], v + dx.load([row, cols]).cast::<f32>() * beta);
            return;
        }
        dx.store([row, cols], v);
        return;
    }
    let mut a1 = zeros::<f32, CHUNK>();
    let mut a2 = zeros::<f32, CHUNK>();
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let xhat = (x.load([row, cols]).cast::<f32>() - mu) * rs;
        let g = dy.load([row, cols]).cast::<f32>() * w.load([cols]).cast::<f32>();
        a1 += g;
        a2 += g * xhat;
    }
    let c1 = a1.sum(0) / nf;
    let c2 = a2.sum(0) / nf;
    for c in (0..n).step_by(CHUNK) {
        let cols = c + range::<CHUNK>();
        let xhat = (x.load([row, cols]).cast::<f32>() - mu) * rs;
        let g = dy.load([row, cols]).cast::<f32>() * w.load([cols]).cast::<f32>();
        let v = rs * (g - c1 - xhat * c2);
        if beta != 0.0 {
            dx.store([row, cols], v + dx.load([row, cols]).cast::<f32>() * beta);
        } else {
            dx.store([row, cols], v);
        }
    }
}

/// Parameter gradients: `dw += sum_rows(dy * xhat)`, `db += sum_rows(dy)`, accumulated
/// atomically in f32 (zero `dw` and `db` first). Programs tile columns by `BC` (axis 0) and
/// rows by `CHUNK` (axis 1).
#[kernel(
    variants(T = [bf16, f16, f32], BR = [16], BC = [64], CHUNK = [256]),
    warps = 4,
    grid = [cdiv(x.dim(1), BC), cdiv(x.dim(0), CHUNK)],
    require = [
        dy.dim(0) == x.dim(0), dy.dim(1) == x.dim(1), mean.dim(0) == x.dim(0),
        rstd.dim(0) == x.dim(0), dw.dim(0) == x.dim(1), db.dim(0) == x.dim(1)
    ]
)]
pub fn layernorm_bwd_params<T, const BR: usize, const BC: usize, const CHUNK: usize>(
    x: Tensor<T, 2>,
    dy: Tensor<T, 2>,
    mean: Tensor<f32, 1>,
    rstd: Tensor<f32, 1>,
    dw: TensorMut<f32, 1>,
    db: TensorMut<f32, 1>,
) {
    let cols = program_id(0) * BC + range::<BC>();
    let r0 = program_id(1).cast::<i64>() * CHUNK;
    let mut aw = zeros::<f32, BR, BC>();
    let mut ab = zeros::<f32, BR, BC>();
    for r in (r0..r0 + CHUNK).step_by(BR) {
        let rows = r + range::<BR>();
        let g = dy.load([rows, cols]).cast::<f32>();
        let mu = mean.load([rows]).expand(1);
        let rs = rstd.load([rows]).expand(1);
        let xhat = (x.load([rows, cols]).cast::<f32>() - mu) * rs;
        aw += g * xhat;
        ab += g;
    }
    dw.atomic_add([cols], aw.sum(0));
    db.atomic_add([cols], ab.sum(0));
}
