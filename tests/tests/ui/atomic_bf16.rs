use lexp_macros::kernel;

#[kernel(grid = [1])]
fn k(x: Tensor<bf16, 1>, y: TensorMut<bf16, 1>) {
    let i = range::<128>();
    y.atomic_add([i], x.load([i]));
}

fn main() {}
