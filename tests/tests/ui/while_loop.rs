use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<f32, 1>) {
    let mut i = 0;
    while i < 4 {
        i += 1;
    }
    y.store([i], 1.0);
}

fn main() {}
