use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<f32, 1>) {
    let mut acc = zeros::<f32, 128>();
    for j in (0..4).step_by(0) {
        acc += 1.0;
    }
    y.store([range::<128>()], acc);
}

fn main() {}
