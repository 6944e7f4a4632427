use lexp_macros::kernel;

#[kernel(grid = [x.dim(0)])]
fn k(x: Tensor<f32, 2>, y: TensorMut<f32, 2>) {
    let row = program_id(0);
    let cols = range::<128>();
    y.store([row, cols], x.load([cols]));
}

fn main() {}
