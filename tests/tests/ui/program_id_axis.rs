use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<i32, 1>) {
    y.store([range::<16>()], program_id(257));
}

fn main() {}
