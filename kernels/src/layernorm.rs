//! LayerNorm forward and backward over the last dimension, for any row length.
//!
//! Forward saves the per-row mean and reciprocal standard deviation (f32) for the backward.
//! The mean and the variance are computed in two passes (`sum(x)`, then `sum((x - mean)^2)`),
//! which stays accurate when |mean| >> std; the repeated reads of a row normally hit L2.

use lexp_macros::kernel;

/// `y = (x - mean) * rstd * w + b` per row; writes `mean` and `rstd = 1/sqrt(var + eps)`.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [1024]),
    warps = 4,
    grid = [x.dim(0)],
    require = [
        y.dim(0) == x.dim(0), y.dim(1) == x.dim(1), w.dim(0) == x.dim(1), b.dim(0) == x.dim(1),
        mean.dim(0) == x.dim(0), rstd.dim(0) == x.dim(0)
    ]
)]
pub fn layernorm_fwd<T, const BLOCK: usize>(
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
    let mut acc = zeros::<f32, BLOCK>();
    for c in (0..n).step_by(BLOCK) {
        let cols = c + range::<BLOCK>();
        acc += x.load([row, cols]).cast::<f32>();
    }
    let mu = acc.sum(0) / nf;
    let mut acc2 = zeros::<f32, BLOCK>();
    for c in (0..n).step_by(BLOCK) {
        let cols = c + range::<BLOCK>();
        let d = select(cols < n, x.load([row, cols]).cast::<f32>() - mu, 0.0);
        acc2 += d * d;
    }
    let rs = rsqrt(acc2.sum(0) / nf + eps);
    mean.store([row], mu);
    rstd.store([row], rs);
    for c in (0..n).step_by(BLOCK) {
        let cols = c + range::<BLOCK>();
        let xhat = (x.load([row, cols]).cast::<f32>() - mu) * rs;
        y.store(
            [row, cols],
            xhat * w.load([cols]).cast::<f32>() + b.load([cols]).cast::<f32>(),
        );
    }
}

/// Input gradient: `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * w`.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [1024]),
    warps = 4,
    grid = [x.dim(0)],
    require = [
        dy.dim(0) == x.dim(0), dy.dim(1) == x.dim(1), dx.dim(0) == x.dim(0), dx.dim(1) == x.dim(1),
        w.dim(0) == x.dim(1), mean.dim(0) == x.dim(0), rstd.dim(0) == x.dim(0)
    ]
)]
pub fn layernorm_bwd_dx<T, const BLOCK: usize>(
    x: Tensor<T, 2>,
    w: Tensor<T, 1>,
    dy: Tensor<T, 2>,
    mean: Tensor<f32, 1>,
    rstd: Tensor<f32, 1>,
    dx: TensorMut<T, 2>,
) {
    let row = program_id(0);
    let n = x.dim(1);
    let nf = n.cast::<f32>();
    let mu = mean.load([row]);
    let rs = rstd.load([row]);
    let mut a1 = zeros::<f32, BLOCK>();
    let mut a2 = zeros::<f32, BLOCK>();
    for c in (0..n).step_by(BLOCK) {
        let cols = c + range::<BLOCK>();
        let xhat = (x.load([row, cols]).cast::<f32>() - mu) * rs;
        let g = dy.load([row, cols]).cast::<f32>() * w.load([cols]).cast::<f32>();
        a1 += g;
        a2 += g * xhat;
    }
    let c1 = a1.sum(0) / nf;
    let c2 = a2.sum(0) / nf;
    for c in (0..n).step_by(BLOCK) {
        let cols = c + range::<BLOCK>();
        let xhat = (x.load([row, cols]).cast::<f32>() - mu) * rs;
        let g = dy.load([row, cols]).cast::<f32>() * w.load([cols]).cast::<f32>();
        dx.store([row, cols], rs * (g - c1 - xhat * c2));
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
