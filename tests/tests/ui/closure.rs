use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let i = range::<128>();
    let double = |v| v * 2.0;
    y.store([i], x.load([i]));
}

fn main() {}
