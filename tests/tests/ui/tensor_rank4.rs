use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<f32, 4>, y: TensorMut<f32, 1>) {
    y.store([range::<128>()], 0.0);
}

fn main() {}
