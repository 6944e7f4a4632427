use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let n = x.len();
    y.store([range::<128>()], 0.0);
}

fn main() {}
