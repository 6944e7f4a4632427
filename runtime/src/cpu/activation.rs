//! ReLU and the element-wise helpers of a training step (RUNTIME.md §2.4). Slices of at least
//! 32 768 (`PAR_MIN_LEN`) elements are processed on the rayon pool, shorter ones serially.

use rayon::prelude::*;

use super::PAR_MIN_LEN;

/// Elements per rayon task.
const TASK_LEN: usize = 1 << 13;

/// Applies `f` to every element, in parallel for long slices.
fn map_inplace(x: &mut [f32], f: impl Fn(&mut f32) + Sync + Send) {
    if x.len() < PAR_MIN_LEN {
        x.iter_mut().for_each(f);
    } else {
        x.par_chunks_mut(TASK_LEN)
            .for_each(|c| c.iter_mut().for_each(&f));
    }
}

/// Applies `f` to every pair `(x[i], y[i])`, in parallel for long slices.
fn zip_inplace(x: &mut [f32], y: &[f32], f: impl Fn(&mut f32, f32) + Sync + Send) {
    if x.len() < PAR_MIN_LEN {
        x.iter_mut().zip(y).for_each(|(a, &b)| f(a, b));
    } else {
        x.par_chunks_mut(TASK_LEN)
            .zip(y.par_chunks(TASK_LEN))
            .for_each(|(xc, yc)| xc.iter_mut().zip(yc).for_each(|(a, &b)| f(a, b)));
    }
}

/// `max(x, 0)` element-wise, as a new buffer (NaN stays NaN, as in PyTorch).
pub fn relu(x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    map_inplace(&mut y, |v| {
        if *v < 0.0 {
            *v = 0.0
        }
    });
    y
}

/// ReLU backward in place: `dy ← dy ⊙ [y > 0]`, the mask taken from the forward output `y`
/// (zero where `y ≤ 0`, matching PyTorch's zero gradient at exactly 0).
///
/// # Panics
/// If `dy.len() != y.len()`.
pub fn relu_bwd_inplace(dy: &mut [f32], y: &[f32]) {
    assert_eq!(
        dy.len(),
        y.len(),
        "relu_bwd_inplace: dy and y differ in length"
    );
    zip_inplace(dy, y, |d, yv| {
        if yv <= 0.0 {
            *d = 0.0
        }
    });
}

/// `x[rows, cols] += bias` broadcast over rows.
///
/// # Panics
/// If `x` is not `[rows, cols]` or `bias` not `[cols]`.
pub fn add_bias_inplace(x: &mut [f32], rows: usize, cols: usize, bias: &[f32]) {
    assert_eq!(
        x.len(),
        rows * cols,
        "add_bias_inplace: x is not [{rows},{cols}]"
    );
    assert_eq!(bias.len(), cols, "add_bias_inplace: bias is not [{cols}]");
    if cols == 0 {
        return;
    }
    let add = |row: &mut [f32]| row.iter_mut().zip(bias).for_each(|(a, &b)| *a += b);
    if x.len() < PAR_MIN_LEN {
        x.chunks_exact_mut(cols).for_each(add);
    } else {
        let rows_per_task = (TASK_LEN / cols).max(1);
        x.par_chunks_mut(rows_per_task * cols)
            .for_each(|c| c.chunks_exact_mut(cols).for_each(add));
    }
}

/// `x += y` element-wise (residual adds, gradient accumulation).
///
/// # Panics
/// If `x.len() != y.len()`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_inplace: x and y differ in length");
    zip_inplace(x, y, |a, b| *a += b);
}

/// `x *= s` element-wise.
pub fn scale_inplace(x: &mut [f32], s: f32) {
    map_inplace(x, |v| *v *= s);
}

/// `Σ_rows x` of `x [rows, cols]`, accumulated in f64 (a bias gradient: the adjoint of
/// [`add_bias_inplace`]).
///
/// # Panics
/// If `x` is not `[rows, cols]`.
pub fn column_sums(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        rows * cols,
        "column_sums: x is not [{rows},{cols}]"
    );
    let mut acc = vec![0.0f64; cols];
    for row in x.chunks_exact(cols.max(1)) {
        acc.iter_mut()
            .zip(row)
            .for_each(|(a, &v)| *a += f64::from(v));
    }
    acc.into_iter().map(|a| a as f32).collect()
}

/// `√(2/π)`, the constant of GELU's tanh approximation.
const GELU_K: f32 = 0.797_884_6;
/// The cubic coefficient of GELU's tanh approximation.
const GELU_C: f32 = 0.044_715;

/// GELU, tanh approximation (`gelu_new`): `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (GELU_K * (x + GELU_C * x * x * x)).tanh())
}

/// The derivative of [`gelu_tanh`] at `x`.
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let t = (GELU_K * (x + GELU_C * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)
}
