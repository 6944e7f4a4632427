use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<i32, 1>) {
    let r = range::<65536>();
    let t = r.expand(1) + r.expand(0);
    y.store([range::<16>()], 1);
}

fn main() {}
