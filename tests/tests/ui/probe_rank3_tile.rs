use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(y: TensorMut<f32, 1>) {
    let t = range::<16>().expand(0).expand(0);
    y.store([range::<16>()], t.sum(0).sum(0).cast::<f32>());
}

fn main() {}
