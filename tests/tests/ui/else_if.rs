use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(n: i32, y: TensorMut<f32, 1>) {
    let i = range::<128>();
    let mut v = 0.0;
    if n > 4 {
        v = 1.0;
    } else if n > 2 {
        v = 2.0;
    }
    y.store([i], v);
}

fn main() {}
