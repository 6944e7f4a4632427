use lexp_macros::kernel;

#[kernel(grid = [cdiv(z.dim(0), 128)])]
fn k(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let i = program_id(0) * 128 + range::<128>();
    y.store([i], x.load([i]));
}

fn main() {}
