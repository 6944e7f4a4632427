use lexp_macros::kernel;

#[kernel(grid = [1], warps = 1)]
fn k(y: TensorMut<f32, 1>) {
    let i = range::<16384>();
    y.store([i], 1.0);
}

fn main() {}
