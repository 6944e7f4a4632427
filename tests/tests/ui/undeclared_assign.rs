use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let i = range::<128>();
    total = x.load([i]);
    y.store([i], total);
}

fn main() {}
