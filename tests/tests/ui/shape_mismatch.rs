use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let a = x.load([range::<64>()]);
    let b = x.load([range::<128>()]);
    y.store([range::<128>()], a + b);
}

fn main() {}
