use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<i32, 1>) {
    let i = range::<128>();
    y.store([i], i << 2);
}

fn main() {}
