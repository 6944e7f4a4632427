use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<i32, 1>) {
    let v: i32 = 1.5;
    y.store([range::<128>()], v);
}

fn main() {}
