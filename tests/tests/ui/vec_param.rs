use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Vec<f32>, y: TensorMut<f32, 1>) {
    let i = range::<128>();
    y.store([i], 0.0);
}

fn main() {}
