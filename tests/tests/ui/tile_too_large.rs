use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<f32, 1>) {
    let t = zeros::<f32, 65536, 65536>();
    y.store([range::<16>()], 1.0);
}

fn main() {}
