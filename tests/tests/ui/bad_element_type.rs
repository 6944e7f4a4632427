use lexp_macros::kernel;

#[kernel(variants(T = [f32, f64]), grid = [1])]
fn k<T>(y: TensorMut<T, 1>) {
    y.store([range::<128>()], 1.0);
}

fn main() {}
