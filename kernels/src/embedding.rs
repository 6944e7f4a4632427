//! OPT's input embedding: a token row plus a learned position row, gathered by id.
//!
//! One program per output row and `BC`-wide column tile: it loads the row's token id and
//! position id (scalars), then one tile of each table. Ids are not range-checked here (a load
//! masks only indices past the end): the runtime validates them on the host before launching.

use lexp_macros::kernel;

/// `y[r, :] = tok[ids[r], :] + pos[pos_ids[r] + 2, :]` (OPT's position offset 2 applied here;
/// f32 sum, one rounding to `T`). Programs: rows (axis 0) x `BC`-wide column tiles (axis 1).
#[kernel(
    variants(T = [bf16, f16, f32], BC = [1024]),
    warps = 4,
    grid = [ids.dim(0), cdiv(tok.dim(1), BC)],
    require = [
        pos.dim(1) == tok.dim(1), pos_ids.dim(0) == ids.dim(0), y.dim(0) == ids.dim(0),
        y.dim(1) == tok.dim(1)
    ]
)]
pub fn embedding_fwd<T, const BC: usize>(
    tok: Tensor<T, 2>,
    pos: Tensor<T, 2>,
    ids: Tensor<i32, 1>,
    pos_ids: Tensor<i32, 1>,
    y: TensorMut<T, 2>,
) {
    let r = program_id(0);
    let cols = program_id(1) * BC + range::<BC>();
    let t = ids.load([r]);
    let p = pos_ids.load([r]) + 2;
    let v = tok.load([t, cols]).cast::<f32>() + pos.load([p, cols]).cast::<f32>();
    y.store([r, cols], v);
}
