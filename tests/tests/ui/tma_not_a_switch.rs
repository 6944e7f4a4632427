use lexp_macros::kernel;

#[kernel(grid = [1], tma = 2)]
fn k(y: TensorMut<f32, 1>) {
    y.store([range::<128>()], 0.0);
}

fn main() {}
