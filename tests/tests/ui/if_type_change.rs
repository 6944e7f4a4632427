use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(n: i32, y: TensorMut<i32, 1>) {
    let mut v = 0;
    if n > 4 {
        v = 1.5;
    }
    y.store([range::<128>()], v);
}

fn main() {}
