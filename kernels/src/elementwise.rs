//! Element-wise kernels over flat tensors: one program handles `BLOCK` consecutive elements,
//! each thread a 16-byte vector (or two) of them. Arithmetic is f32 whatever the storage type.

use lexp_macros::kernel;

/// `y = a * x + b * y`.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048]),
    warps = 4,
    grid = [cdiv(y.dim(0), BLOCK)],
    require = [x.dim(0) == y.dim(0)]
)]
pub fn axpby<T, const BLOCK: usize>(a: f32, x: Tensor<T, 1>, b: f32, y: TensorMut<T, 1>) {
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    let xv = x.load([i]).cast::<f32>();
    let yv = y.load([i]).cast::<f32>();
    y.store([i], a * xv + b * yv);
}

/// `y = x` rounded from f32 to `T` (round to nearest even): e.g. the f32 logit gradients of the
/// loss rounded to bf16 for the `dz·E` GEMM.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048]),
    warps = 4,
    grid = [cdiv(y.dim(0), BLOCK)],
    require = [x.dim(0) == y.dim(0)]
)]
pub fn convert<T, const BLOCK: usize>(x: Tensor<f32, 1>, y: TensorMut<T, 1>) {
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    y.store([i], x.load([i]));
}

/// `y = max(x, 0)`.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048]),
    warps = 4,
    grid = [cdiv(y.dim(0), BLOCK)],
    require = [x.dim(0) == y.dim(0)]
)]
pub fn relu<T, const BLOCK: usize>(x: Tensor<T, 1>, y: TensorMut<T, 1>) {
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    y.store([i], relu(x.load([i])));
}

/// ReLU backward from the forward output: `dx = dy` where `y > 0`, else 0.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048]),
    warps = 4,
    grid = [cdiv(dx.dim(0), BLOCK)],
    require = [y.dim(0) == dx.dim(0), dy.dim(0) == dx.dim(0)]
)]
pub fn relu_bwd<T, const BLOCK: usize>(y: Tensor<T, 1>, dy: Tensor<T, 1>, dx: TensorMut<T, 1>) {
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    let keep = y.load([i]).cast::<f32>() > 0.0;
    dx.store([i], select(keep, dy.load([i]).cast::<f32>(), 0.0));
}

/// GELU, tanh approximation: `y = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048]),
    warps = 4,
    grid = [cdiv(y.dim(0), BLOCK)],
    require = [x.dim(0) == y.dim(0)]
)]
pub fn gelu<T, const BLOCK: usize>(x: Tensor<T, 1>, y: TensorMut<T, 1>) {
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    let v = x.load([i]).cast::<f32>();
    let u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
    y.store([i], 0.5 * v * (1.0 + tanh(u)));
}

/// GELU (tanh approximation) backward: `dx = dy * gelu'(x)`.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [2048]),
    warps = 4,
    grid = [cdiv(dx.dim(0), BLOCK)],
    require = [x.dim(0) == dx.dim(0), dy.dim(0) == dx.dim(0)]
)]
pub fn gelu_bwd<T, const BLOCK: usize>(x: Tensor<T, 1>, dy: Tensor<T, 1>, dx: TensorMut<T, 1>) {
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    let v = x.load([i]).cast::<f32>();
    let t = tanh(0.7978845608028654 * (v + 0.044715 * v * v * v));
    let du = 0.7978845608028654 * (1.0 + 0.134145 * v * v);
    let d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du;
    dx.store([i], dy.load([i]).cast::<f32>() * d);
}
