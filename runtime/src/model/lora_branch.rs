//! The LoRA branch of one adapted projection (RUNTIME.md §2.6):
//! `y += s·(drop(x)·Aᵀ)·Bᵀ` forward, and `dA`, `dB`, `dx += s·((dy·B)·A) ⊙ mask` backward.

use crate::cpu::matmul::matmul;
use crate::peft::LoraModule;

/// What the forward keeps for the backward of one branch.
#[derive(Debug, Clone)]
pub struct BranchSaved {
    /// The dropout mask applied to the branch's input (`None` without dropout: the input
    /// itself is then the dropped input, and the caller still holds it).
    pub mask: Option<Vec<f32>>,
    /// `u = drop(x)·Aᵀ`, `[T, r]`.
    pub u: Vec<f32>,
}

/// Gradients of one branch's parameters.
#[derive(Debug, Clone)]
pub struct BranchGrads {
    /// `dA`, `[r, in]`.
    pub a: Vec<f32>,
    /// `dB`, `[out, r]`.
    pub b: Vec<f32>,
}

/// Adds the branch to `y` (`[rows, out]`) for input `x` (`[rows, in]`); `mask` is the
/// dropout mask of `x`, if any. Returns what the backward needs.
pub fn forward(
    module: &LoraModule,
    scale: f32,
    x: &[f32],
    rows: usize,
    mask: Option<Vec<f32>>,
    y: &mut [f32],
) -> BranchSaved {
    let (r, in_f) = (module.a.rows, module.a.cols);
    let out_f = module.b.rows;
    let mut u = vec![0.0; rows * r];
    match &mask {
        Some(m) => {
            let xd: Vec<f32> = x.iter().zip(m).map(|(x, m)| x * m).collect();
            matmul(
                &mut u,
                &xd,
                &module.a.data,
                rows,
                in_f,
                r,
                false,
                true,
                1.0,
                0.0,
            );
        }
        None => matmul(
            &mut u,
            x,
            &module.a.data,
            rows,
            in_f,
            r,
            false,
            true,
            1.0,
            0.0,
        ),
    }
    matmul(
        y,
        &u,
        &module.b.data,
        rows,
        r,
        out_f,
        false,
        true,
        scale,
        1.0,
    );
    BranchSaved { mask, u }
}

/// Backward of the branch for output gradient `dy` (`[rows, out]`) and the same input `x`
/// the forward saw: returns `dA`, `dB` and adds the branch's share of the input gradient to
/// `dx` (`[rows, in]`).
pub fn backward(
    module: &LoraModule,
    scale: f32,
    x: &[f32],
    rows: usize,
    saved: &BranchSaved,
    dy: &[f32],
    dx: &mut [f32],
) -> BranchGrads {
    let (r, in_f) = (module.a.rows, module.a.cols);
    let out_f = module.b.rows;
    let mut db = vec![0.0; out_f * r];
    matmul(
        &mut db, dy, &saved.u, out_f, rows, r, true, false, scale, 0.0,
    );
    let mut du = vec![0.0; rows * r];
    matmul(
        &mut du,
        dy,
        &module.b.data,
        rows,
        out_f,
        r,
        false,
        false,
        scale,
        0.0,
    );
    let mut da = vec![0.0; r * in_f];
    match &saved.mask {
        Some(m) => {
            let xd: Vec<f32> = x.iter().zip(m).map(|(x, m)| x * m).collect();
            matmul(&mut da, &du, &xd, r, rows, in_f, true, false, 1.0, 0.0);
            let mut dxd = vec![0.0; rows * in_f];
            matmul(
                &mut dxd,
                &du,
                &module.a.data,
                rows,
                r,
                in_f,
                false,
                false,
                1.0,
                0.0,
            );
            dx.iter_mut()
                .zip(dxd.iter().zip(m))
                .for_each(|(dx, (g, m))| *dx += g * m);
        }
        None => {
            matmul(&mut da, &du, x, r, rows, in_f, true, false, 1.0, 0.0);
            matmul(
                dx,
                &du,
                &module.a.data,
                rows,
                r,
                in_f,
                false,
                false,
                1.0,
                1.0,
            );
        }
    }
    BranchGrads { a: da, b: db }
}
