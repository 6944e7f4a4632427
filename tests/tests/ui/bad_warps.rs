use lexp_macros::kernel;

#[kernel(warps = 3, grid = [1])]
fn k(y: TensorMut<f32, 1>) {
    y.store([range::<128>()], 0.0);
}

fn main() {}
