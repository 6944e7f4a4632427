use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let i = range::<128>();
    y.store([i], x.load([i]) % 2.0);
}

fn main() {}
