use lexp_macros::kernel;

#[kernel(variants(BLOCK = [1024, 1000]), grid = [cdiv(y.dim(0), BLOCK)])]
fn k<const BLOCK: usize>(x: Tensor<f32, 1>, y: TensorMut<f32, 1>) {
    let i = program_id(0) * BLOCK + range::<BLOCK>();
    y.store([i], x.load([i]));
}

fn main() {}
