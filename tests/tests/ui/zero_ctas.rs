use lexp_macros::kernel;

#[kernel(grid = [1], ctas = 0)]
fn k(y: TensorMut<f32, 1>) {
    y.store([range::<128>()], 0.0);
}

fn main() {}
