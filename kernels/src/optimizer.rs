//! The optimizer step on the device: AdamW over a flat f32 parameter tensor and its state.
//!
//! Element-wise, one program per `BLOCK` elements; `param`, `m` and `v` are updated in place
//! (each element read and written by the same thread). The step's scalars come from the host,
//! computed as `torch.optim.AdamW` computes them (RUNTIME.md 2.10). Gradient clipping by global
//! norm is the `grad_scale` argument: the norm comes from [`crate::sum_squares`]'s partial sums,
//! and the host turns it into `torch.nn.utils.clip_grad_norm_`'s coefficient (1 when the norm is
//! under the limit).

use lexp_macros::kernel;

/// One AdamW step in torch's order (f32), on the gradient scaled by `grad_scale` (the clipping
/// coefficient: `g = grad * grad_scale`): `param *= 1 - lr*weight_decay`;
/// `m += (1 - beta1)(g - m)`; `v = beta2*v + (1 - beta2)*g^2`;
/// `param -= (lr / bias_correction1) * m / (sqrt(v) / bias_correction2_sqrt + eps)`, with
/// `bias_correction1 = 1 - beta1^t` and `bias_correction2_sqrt = sqrt(1 - beta2^t)`. The
/// gradient may be stored as `T` (the variant follows its type); the rest is f32.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [1024]),
    warps = 4,
    grid = [cdiv(param.dim(0), BLOCK)],
    require = [grad.dim(0) == param.dim(0), m.dim(0) == param.dim(0), v.dim(0) == param.dim(0)]
)]
pub fn adamw<T, const BLOCK: usize>(
    param: TensorMut<f32, 1>,
    grad: Tensor<T, 1>,
    grad_scale: f32,
    m: TensorMut<f32, 1>,
    v: TensorMut<f32, 1>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2_sqrt: f32,
) {
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    let g = grad.load([i]).cast::<f32>() * grad_scale;
    let m0 = m.load([i]);
    let m1 = m0 + (1.0 - beta1) * (g - m0);
    let v1 = beta2 * v.load([i]) + (1.0 - beta2) * g * g;
    let p = param.load([i]) * (1.0 - lr * weight_decay);
    let denom = sqrt(v1) / bias_correction2_sqrt + eps;
    param.store([i], p - (lr / bias_correction1) * (m1 / denom));
    m.store([i], m1);
    v.store([i], v1);
}

/// The scalars of one [`adamw`] launch, as `torch.optim.AdamW` defines them:
/// `bias_correction1 = 1 - beta1^t`, `bias_correction2_sqrt = sqrt(1 - beta2^t)`, and the
/// clipping scale of the gradient. The runtime's optimizer (`AdamW::kernel_scalars`) and the
/// reference (`reference::adamw`) both take this.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    /// Learning rate of the step.
    pub lr: f32,
    /// `β1`.
    pub beta1: f32,
    /// `β2`.
    pub beta2: f32,
    /// Added to the bias-corrected `√v`.
    pub eps: f32,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f32,
    /// `1 − β1^t`.
    pub bias_correction1: f32,
    /// `√(1 − β2^t)`.
    pub bias_correction2_sqrt: f32,
    /// The gradient's scale (the clipping coefficient; 1 for none).
    pub grad_scale: f32,
}

impl AdamwStep {
    /// The scalars of step `t` (1-based) for the given hyperparameters (bias corrections in
    /// f64 from the f32 values, no clipping).
    pub fn at(lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, t: u32) -> Self {
        let t = t as i32;
        AdamwStep {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            bias_correction1: (1.0 - f64::from(beta1).powi(t)) as f32,
            bias_correction2_sqrt: (1.0 - f64::from(beta2).powi(t)).sqrt() as f32,
            grad_scale: 1.0,
        }
    }
}
