use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k<T>(x: Tensor<T, 1>, y: TensorMut<T, 1>) {
    let i = range::<128>();
    y.store([i], x.load([i]));
}

fn main() {}
