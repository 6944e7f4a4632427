use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let i = range::<128>();
    let v = x[i];
    y.store([i], v);
}

fn main() {}
