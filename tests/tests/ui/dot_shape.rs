use lexp_macros::kernel;

#[kernel(variants(T = [bf16]), grid = [1])]
fn k<T>(a: Tensor<T, 2>, b: Tensor<T, 2>, c: TensorMut<f32, 2>) {
    let r = range::<8>();
    let k = range::<16>();
    let acc = dot(a.load([r, k]), b.load([k, r]), 0.0);
    c.store([r, r], acc);
}

fn main() {}
