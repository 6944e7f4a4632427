use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<f32, 1>) {
    println!("hello");
    y.store([range::<128>()], 0.0);
}

fn main() {}
