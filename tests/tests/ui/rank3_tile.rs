use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<i32, 1>) {
    let t = range::<16>().expand(0).expand(0);
    y.store([range::<16>()], 1);
}

fn main() {}
