use lexp_macros::kernel;

#[kernel(variants(T = [bf16]), grid = [counts.dim(0)])]
fn k<T>(counts: Tensor<i32, 1>, indices: Tensor<i32, 2>, y: TensorMut<f32, 1>) {
    let g = program_id(0);
    for b in blocks(counts, indices, g) {
        y.store([g], b.cast::<f32>());
    }
}

fn main() {}
