//! Plain-Rust CPU references for the matmul family: dense matmul, the block-sparse products of
//! a sparse FFN (output-sparse, reduction-sparse, both) and the LoRA forward and backward.
//!
//! Same conventions as [`reference`](mod@crate::reference): inputs are `f32` slices holding
//! values already rounded to the kernel's storage type, arithmetic is `f64`, results are `f32`
//! *not* rounded to the storage type (except where a kernel stores an intermediate in the
//! storage type and reuses it: the LoRA functions take the rounding function for that). Tensors
//! are row-major. On malformed input the functions never panic: a missing element (slice too
//! short, index out of range, negative block id) reads as 0 and the output always has the shape
//! that the dimension arguments give.
//!
//! # Block lists
//!
//! The block-sparse products take, per *row group* (`bm` consecutive token rows; row `r` is in
//! group `g = r / bm`), a list of active neuron blocks of `bs` neurons each:
//! - `counts: &[i32]`, one per group: how many entries of the group's list are valid;
//! - `indices: &[i32]`, row-major `[groups, max_blocks]`: entries `j < counts[g]` of row `g`
//!   are block ids, the rest are padding and ignored.
//!
//! A *compact* activation `[M, max_blocks * bs]` holds, in slot `j` (columns `j*bs .. j*bs+bs`)
//! of row `r`, the `bs` neurons of block `indices[g, j]`. A count above `max_blocks` is taken
//! as `max_blocks` (the kernel's grid bound), a negative one (or a group missing from
//! `counts`) as 0; entries missing from a too-short `indices` are skipped (their slots are
//! not written).

fn f(x: f32) -> f64 {
    x as f64
}

/// Element `[r, c]` of a row-major slice with `cols` columns as f64; 0 when `c >= cols` or the
/// element is past the end of the slice.
fn at(x: &[f32], cols: usize, r: usize, c: usize) -> f64 {
    if c >= cols {
        return 0.0;
    }
    r.checked_mul(cols)
        .and_then(|i| i.checked_add(c))
        .and_then(|i| x.get(i))
        .copied()
        .map(f)
        .unwrap_or(0.0)
}

/// Element `[r, c]` of a row-major `rows x cols` slice, 0 outside the shape or the slice.
fn at2(x: &[f32], rows: usize, cols: usize, r: usize, c: usize) -> f64 {
    if r >= rows {
        return 0.0;
    }
    at(x, cols, r, c)
}

/// `rows * cols`, saturating (so that absurd dims make an allocation fail, not an overflow
/// panic in debug builds).
fn numel(rows: usize, cols: usize) -> usize {
    rows.saturating_mul(cols)
}

/// The valid entries of group `g`'s block list: `indices[g, j]` for `j < counts[g]` (clamped to
/// `0..=max_blocks`), each as `Some(block)` or `None` when the id is negative.
fn group_blocks<'a>(
    counts: &[i32],
    indices: &'a [i32],
    max_blocks: usize,
    g: usize,
) -> impl Iterator<Item = (usize, Option<usize>)> + 'a {
    let count = counts
        .get(g)
        .map(|&c| usize::try_from(c).unwrap_or(0).min(max_blocks))
        .unwrap_or(0);
    let start = g.saturating_mul(max_blocks);
    let row = indices.get(start..).unwrap_or(&[]);
    row.iter()
        .take(count)
        .map(|&b| usize::try_from(b).ok())
        .enumerate()
}

/// Row group of row `r` (`r / bm`), `None` when `bm == 0`.
fn group_of(r: usize, bm: usize) -> Option<usize> {
    r.checked_div(bm)
}

/// `op(A) · op(B)` in f64, `[m, n]`.
fn matmul_f64(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f64> {
    let mut c = vec![0.0f64; numel(m, n)];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if trans_a {
                    at2(a, k, m, p, i)
                } else {
                    at2(a, m, k, i, p)
                };
                let bv = if trans_b {
                    at2(b, n, k, j, p)
                } else {
                    at2(b, k, n, p, j)
                };
                s += av * bv;
            }
            c[i * n + j] = s;
        }
    }
    c
}

fn to_f32(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

/// Dense matmul `C[M, N] = op(A) · op(B)`: `C[i, j] = Σ_p op(A)[i, p] · op(B)[p, j]`.
///
/// `A` is stored `[M, K]`, or `[K, M]` when `trans_a` (then `op(A) = Aᵀ`); `B` is stored
/// `[K, N]`, or `[N, K]` when `trans_b` (as a torch `Linear` weight: `x · Wᵀ` is
/// `matmul(x, w, m, k, n, false, true)`).
pub fn matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f32> {
    to_f32(matmul_f64(a, b, m, k, n, trans_a, trans_b))
}

/// The output buffer of an output-sparse product: `init` (the output's previous contents,
/// `rows x cols`), missing elements 0.
fn start_from(init: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let len = numel(rows, cols);
    let mut out = vec![0.0f32; len];
    let n = init.len().min(len);
    out[..n].copy_from_slice(&init[..n]);
    out
}

/// Output-sparse product (the FFN up-projection restricted to active blocks), compact output
/// `[M, max_blocks * bs]`.
///
/// `x` is `[M, K]`, `w` is `[N, K]` (torch `Linear` weight, `N = num_blocks * bs` neurons).
/// For row `r` of group `g = r / bm` and slot `j < counts[g]` with block `b = indices[g, j]`:
///
/// `out[r, j*bs + c] = Σ_k x[r, k] · w[b*bs + c, k]` for `c < bs`.
///
/// Slots `j >= counts[g]` are not written by the kernel: they keep their value from `init`
/// (the output's previous contents, `[M, max_blocks * bs]`).
#[allow(clippy::too_many_arguments)]
pub fn sparse_out(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    counts: &[i32],
    indices: &[i32],
    max_blocks: usize,
    bm: usize,
    bs: usize,
    init: &[f32],
) -> Vec<f32> {
    let width = numel(max_blocks, bs);
    let mut out = start_from(init, m, width);
    for r in 0..m {
        let Some(g) = group_of(r, bm) else { continue };
        for (j, block) in group_blocks(counts, indices, max_blocks, g) {
            for c in 0..bs {
                let wr = block.and_then(|b| b.checked_mul(bs)?.checked_add(c));
                let s: f64 = match wr {
                    Some(wr) => (0..k).map(|p| at(x, k, r, p) * at2(w, n, k, wr, p)).sum(),
                    None => 0.0,
                };
                out[r * width + j * bs + c] = s as f32;
            }
        }
    }
    out
}

/// Reduction-sparse product (the FFN down-projection over the active blocks only), `[M, N]`.
///
/// `h` is compact `[M, max_blocks * bs]` (see the module docs), `w2` is `[N, F]` (torch
/// `fc2.weight`: `[out, ffn]`, `F = num_blocks * bs`). For row `r` of group `g = r / bm`:
///
/// `out[r, n] = Σ_{j < counts[g]} Σ_{c < bs} h[r, j*bs + c] · w2[n, indices[g, j]*bs + c]`.
///
/// A group with count 0 gives rows of zeros (every element is written).
#[allow(clippy::too_many_arguments)]
pub fn sparse_red(
    h: &[f32],
    w2: &[f32],
    m: usize,
    n: usize,
    f_width: usize,
    counts: &[i32],
    indices: &[i32],
    max_blocks: usize,
    bm: usize,
    bs: usize,
) -> Vec<f32> {
    let width = numel(max_blocks, bs);
    let mut out = vec![0.0f32; numel(m, n)];
    for r in 0..m {
        let Some(g) = group_of(r, bm) else { continue };
        for o in 0..n {
            let mut s = 0.0f64;
            for (j, block) in group_blocks(counts, indices, max_blocks, g) {
                let Some(base) = block.and_then(|b| b.checked_mul(bs)) else {
                    continue;
                };
                for c in 0..bs {
                    let col = base.saturating_add(c);
                    s += at(h, width, r, j * bs + c) * at2(w2, n, f_width, o, col);
                }
            }
            out[r * n + o] = s as f32;
        }
    }
    out
}

/// Product sparse on both sides (a sparse hidden-to-hidden layer): compact input, compact
/// output `[M, max_out * bs]`.
///
/// `h` is compact `[M, max_in * bs]` laid out by the *input* list (`counts_i`, `indices_i`,
/// `max_in`), `w` is `[F_out, F_in]` (torch `Linear` weight). For row `r` of group
/// `g = r / bm` and output slot `j < counts_o[g]` with block `ob = indices_o[g, j]`:
///
/// `out[r, j*bs + c] = Σ_{e < counts_i[g]} Σ_{u < bs} h[r, e*bs + u] · w[ob*bs + c, indices_i[g, e]*bs + u]`.
///
/// Output slots `j >= counts_o[g]` keep their value from `init` (`[M, max_out * bs]`); an
/// input count of 0 makes the written slots 0.
#[allow(clippy::too_many_arguments)]
pub fn sparse_both(
    h: &[f32],
    w: &[f32],
    m: usize,
    f_out: usize,
    f_in: usize,
    counts_o: &[i32],
    indices_o: &[i32],
    max_out: usize,
    counts_i: &[i32],
    indices_i: &[i32],
    max_in: usize,
    bm: usize,
    bs: usize,
    init: &[f32],
) -> Vec<f32> {
    let width_o = numel(max_out, bs);
    let width_i = numel(max_in, bs);
    let mut out = start_from(init, m, width_o);
    for r in 0..m {
        let Some(g) = group_of(r, bm) else { continue };
        for (j, oblock) in group_blocks(counts_o, indices_o, max_out, g) {
            for c in 0..bs {
                let mut s = 0.0f64;
                if let Some(wr) = oblock.and_then(|b| b.checked_mul(bs)?.checked_add(c)) {
                    for (e, iblock) in group_blocks(counts_i, indices_i, max_in, g) {
                        let Some(base) = iblock.and_then(|b| b.checked_mul(bs)) else {
                            continue;
                        };
                        for u in 0..bs {
                            let col = base.saturating_add(u);
                            s += at(h, width_i, r, e * bs + u) * at2(w, f_out, f_in, wr, col);
                        }
                    }
                }
                out[r * width_o + j * bs + c] = s as f32;
            }
        }
    }
    out
}

/// LoRA linear forward (PEFT shapes), returning `(y [M, N], xa [M, r])`.
///
/// `x` is `[M, K]`, `w` `[N, K]` (out, in), `bias` `[N]` (optional), `a` (lora A) `[r, K]`,
/// `b` (lora B) `[N, r]`, `s` the LoRA scale (`alpha / r`):
///
/// - `xa = round(s · x · Aᵀ)`: the scaled rank-`r` activation, rounded to the storage type by
///   `round` (the kernel stores it in bf16/f16 and both the rest of the forward and the
///   backward reuse the rounded values);
/// - `y = x · Wᵀ + bias + xa · Bᵀ`, in f64 from the rounded `xa`, not rounded.
#[allow(clippy::too_many_arguments)]
pub fn lora_fwd(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    s: f32,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    round: impl Fn(f64) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    let xa: Vec<f32> = matmul_f64(x, a, m, k, r, false, true)
        .into_iter()
        .map(|v| round(f(s) * v))
        .collect();
    let dense = matmul_f64(x, w, m, k, n, false, true);
    let low = matmul_f64(&xa, b, m, r, n, false, true);
    let y = dense
        .iter()
        .zip(&low)
        .enumerate()
        .map(|(i, (d, l))| {
            let bv = bias
                .and_then(|bias| bias.get(i % n.max(1)))
                .copied()
                .map(f)
                .unwrap_or(0.0);
            (d + bv + l) as f32
        })
        .collect();
    (y, xa)
}

/// LoRA linear backward for the input, returning `(dx [M, K], u [M, r])`.
///
/// `dy` is `[M, N]`, `w` `[N, K]`, `a` `[r, K]`, `b` `[N, r]`, `s` the LoRA scale:
///
/// - `u = round(s · dy · B)`: the scaled rank-`r` gradient, rounded to the storage type by
///   `round` (stored by the kernel and reused for `dA`, see [`lora_grad_a`]);
/// - `dx = dy · W + u · A`, in f64 from the rounded `u`, not rounded.
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd_dx(
    dy: &[f32],
    w: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    round: impl Fn(f64) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    let u: Vec<f32> = matmul_f64(dy, b, m, n, r, false, false)
        .into_iter()
        .map(|v| round(f(s) * v))
        .collect();
    let dense = matmul_f64(dy, w, m, n, k, false, false);
    let low = matmul_f64(&u, a, m, r, k, false, false);
    let dx = dense
        .iter()
        .zip(&low)
        .map(|(d, l)| (d + l) as f32)
        .collect();
    (dx, u)
}

/// Gradient of lora A, `[r, K]`: `dA = uᵀ · x`, with `u [M, r]` from [`lora_bwd_dx`] (the scale
/// is already in `u`) and `x [M, K]` the forward input.
pub fn lora_grad_a(u: &[f32], x: &[f32], m: usize, k: usize, r: usize) -> Vec<f32> {
    matmul(u, x, r, m, k, true, false)
}

/// Gradient of lora B, `[N, r]`: `dB = dyᵀ · xa`, with `dy [M, N]` and `xa [M, r]` from
/// [`lora_fwd`] (the scale is already in `xa`).
pub fn lora_grad_b(dy: &[f32], xa: &[f32], m: usize, n: usize, r: usize) -> Vec<f32> {
    matmul(dy, xa, n, m, r, true, false)
}

/// The down product of a LoRA branch (`lexp_kernels::lora_down`): `u [M, rp] = round(s · x ·
/// wᵀ)` for `x [M, K]` and `w [r, K]`, its columns `r..rp` zero (the padding the kernel
/// writes).
#[allow(clippy::too_many_arguments)]
pub fn lora_down(
    x: &[f32],
    w: &[f32],
    s: f32,
    m: usize,
    k: usize,
    r: usize,
    rp: usize,
    round: impl Fn(f64) -> f32,
) -> Vec<f32> {
    let p = matmul_f64(x, w, m, k, r, false, true);
    let mut u = vec![0.0f32; m * rp];
    for i in 0..m {
        for j in 0..r {
            u[i * rp + j] = round(f(s) * p[i * r + j]);
        }
    }
    u
}

/// The expand of a LoRA branch (`lexp_kernels::lora_expand`): `y0 + s · u[:, ..r] · w` for
/// `y0 [M, N]`, `u [M, rp]` (only its first `r` columns count) and `w [r, N]`, in f64, not
/// rounded.
#[allow(clippy::too_many_arguments)]
pub fn lora_expand(
    y0: &[f32],
    u: &[f32],
    w: &[f32],
    s: f32,
    m: usize,
    n: usize,
    r: usize,
    rp: usize,
) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for c in 0..n {
            let p: f64 = (0..r).map(|j| f(u[i * rp + j]) * f(w[j * n + c])).sum();
            y[i * n + c] = (f(y0[i * n + c]) + f(s) * p) as f32;
        }
    }
    y
}

/// One layer's q/k/v LoRA branches folded into its projection's room
/// (`lexp_kernels::lora_fold`): `y0` (`W [rows + room, ld]`, flat) with, per slot
/// `[a_off, b_off, first, j, r]`, `A [r, k]` (at `a_off` of `x`) in rows `rows + j·rp ..+ rp`
/// (zero past `r`) and `round(s·B)` (`B [n, r]` at `b_off`) in columns `k + j·rp ..+ rp` of
/// rows `first..first + n`, zero in those columns' other rows (a slot of rank 0 is all zeros);
/// everything else kept.
pub fn lora_fold(
    x: &[f32],
    targets: &[[usize; 5]],
    (rp, k, n): (usize, usize, usize),
    (rows, ld): (usize, usize),
    s: f32,
    y0: &[f32],
    round: impl Fn(f64) -> f32,
) -> Vec<f32> {
    let mut y = y0.to_vec();
    for &[a_off, b_off, first, j, r] in targets {
        for i in 0..rp {
            for c in 0..k {
                y[(rows + j * rp + i) * ld + c] = if i < r { x[a_off + i * k + c] } else { 0.0 };
            }
        }
        for row in 0..rows {
            for c in 0..rp {
                let own = row >= first && row < first + n && c < r;
                y[row * ld + k + j * rp + c] = match own {
                    true => round(f(s) * f(x[b_off + (row - first) * r + c])),
                    false => 0.0,
                };
            }
        }
    }
    y
}

/// Several LoRA weight-gradient reduces (`lexp_kernels::lora_wgrad_reduce_many`): `g0` with,
/// per module `[block, shift, tr, off, scaled]`, `(s or 1) · Σ_c part[(block·C + c)·Q·w +
/// qi·w + shift + j]` added to `g[off + i]`, `i` over its `Q·r` gradient (`[Q, r]`, or
/// `[r, Q]` when `tr = 1`), in f64.
#[allow(clippy::too_many_arguments)]
pub fn lora_wgrad_reduce_many(
    part: &[f32],
    mods: &[[usize; 5]],
    (q, r, w, chunks): (usize, usize, usize, usize),
    s: f32,
    g0: &[f32],
) -> Vec<f32> {
    let mut g = g0.to_vec();
    for &[block, shift, tr, off, scaled] in mods {
        let scale = if scaled == 1 { f(s) } else { 1.0 };
        for i in 0..q * r {
            let (qi, j) = if tr == 1 {
                (i % q, i / q)
            } else {
                (i / r, i % r)
            };
            let sum: f64 = (0..chunks)
                .map(|c| f(part[(block * chunks + c) * q * w + qi * w + shift + j]))
                .sum();
            g[off + i] = (f(g[off + i]) + scale * sum) as f32;
        }
    }
    g
}

/// The checks of `lora_wgrad_pair`: its two blocks of partial sums as the LoRA fold reduces
/// them with `lora_wgrad_reduce_many` into one gradient buffer `[dB [q, r] | dA [r, q]]`.
pub struct PairCase;

impl PairCase {
    /// The reduce's module rows (`[block, shift, tr, offset, scaled]`, i32): `dB` from block 0,
    /// scaled by `s`; `dA` from block 1, transposed, after `dB`.
    pub fn mods_i32(q: usize, r: usize) -> [i32; 10] {
        [0, 0, 0, 0, 1, 1, 0, 1, (q * r) as i32, 0]
    }

    /// `[s·dyᵀ·u | duᵀ·x]` for `dy`, `x [m, q]` and the compact rank sides `u`, `du [m, r]`.
    pub fn want(
        (dy, u): (&[f32], &[f32]),
        (du, x): (&[f32], &[f32]),
        (m, q, r): (usize, usize, usize),
        s: f32,
    ) -> Vec<f32> {
        let mut g: Vec<f32> = lora_grad_b(dy, u, m, q, r).iter().map(|v| s * v).collect();
        g.extend(lora_grad_a(du, x, m, q, r));
        g
    }
}

/// A case of the fold's reduce (`lora_wgrad_reduce_many`) for the kernel checks, laid out as
/// the fold lays out q and v at rank `r` (`rp = r` rounded up to 8): blocks of partial sums
/// `[blocks·chunks, q·16]` (from `fill`), two `dB` (`[q, r]`, scaled) from blocks 0 and 1, and
/// two `dA` (`[r, q]`) from the shared passes over their `du` side by side (slot `j` at column
/// `j·rp`: block `2 + j·rp / 16`, shift `j·rp % 16`), into a gradient buffer `g0` (from `fill`)
/// with a gap and a tail that no module names.
pub struct ReduceManyCase {
    /// Partial sums.
    pub part: Vec<f32>,
    /// `[block, shift, tr, offset, scaled]` per module.
    pub mods: Vec<[usize; 5]>,
    /// The gradients before.
    pub g0: Vec<f32>,
    /// `(q, r, w, chunks)`.
    pub dims: (usize, usize, usize, usize),
    /// Blocks of `part`.
    pub blocks: usize,
}

impl ReduceManyCase {
    /// The case for `q` rows, rank `r` (at most 16), `chunks` chunks.
    pub fn new(q: usize, r: usize, chunks: usize, mut fill: impl FnMut(usize) -> Vec<f32>) -> Self {
        let (w, n, rp) = (16, q * r, r.div_ceil(8) * 8);
        let blocks = 2 + (2 * rp).div_ceil(w);
        let da = |j: usize, off: usize| [2 + j * rp / w, j * rp % w, 1, off, 0];
        ReduceManyCase {
            part: fill(blocks * chunks * q * w),
            mods: vec![
                [0, 0, 0, 0, 1],
                [1, 0, 0, n + 3, 1],
                da(0, 2 * n + 3),
                da(1, 3 * n + 3),
            ],
            g0: fill(4 * n + 5),
            dims: (q, r, w, chunks),
            blocks,
        }
    }

    /// The gradients after, with scale `s`.
    pub fn want(&self, s: f32) -> Vec<f32> {
        lora_wgrad_reduce_many(&self.part, &self.mods, self.dims, s, &self.g0)
    }

    /// The modules as the kernel's `mods` rows (flat, 5 per module).
    pub fn mods_i32(&self) -> Vec<i32> {
        self.mods.iter().flatten().map(|&v| v as i32).collect()
    }
}

/// A q/v LoRA fold case for the kernel checks (`lora_fold`): hidden size `k` (the `H` of the
/// fold), rank `r`, q in slot 0 and v in slot 1 (their `A [r, k]` and `B [k, r]` behind gaps
/// in the flat parameters `x`) and an empty slot 2 (rank 0, the K padding); the weight `y0`
/// (`[3k + 3·rp + 8, ld]`, `ld = k + 3·rp + 8`) holds random values in `W [3k, k]` and the
/// sentinel 7 in the room, which the parts the fold does not write must keep.
pub struct FoldCase {
    /// Flat adapter parameters.
    pub x: Vec<f32>,
    /// `[A offset, B offset, first output row, slot, rank]` per slot.
    pub targets: Vec<[usize; 5]>,
    /// The weight before the fold.
    pub y0: Vec<f32>,
    /// `(rp, k, n)` as [`lora_fold`] takes them (`n = k`).
    pub dims: (usize, usize, usize),
    /// `(rows, ld)`: `W`'s rows (`3k`) and the row stride.
    pub rows_ld: (usize, usize),
}

impl FoldCase {
    /// The case at `k`, `r`, with random values from `fill(n)` (`n` values each call).
    pub fn new(k: usize, r: usize, mut fill: impl FnMut(usize) -> Vec<f32>) -> FoldCase {
        let rp = r.div_ceil(8) * 8;
        let (rows, ld, gap) = (3 * k, k + 3 * rp + 8, 8);
        let per = r * k + gap + k * r + gap;
        let x = fill(2 * per);
        let w = fill(rows * k);
        let mut y0 = vec![7.0f32; (rows + 3 * rp + 8) * ld];
        for (i, row) in w.chunks(k).enumerate() {
            y0[i * ld..i * ld + k].copy_from_slice(row);
        }
        let targets = vec![
            [0, r * k + gap, 0, 0, r],
            [per, per + r * k + gap, 2 * k, 1, r],
            [0, 0, 0, 2, 0],
        ];
        FoldCase {
            x,
            targets,
            y0,
            dims: (rp, k, k),
            rows_ld: (rows, ld),
        }
    }

    /// The weight after the fold with scale `s`, values rounded by `round`.
    pub fn want(&self, s: f32, round: impl Fn(f64) -> f32) -> Vec<f32> {
        lora_fold(
            &self.x,
            &self.targets,
            self.dims,
            self.rows_ld,
            s,
            &self.y0,
            round,
        )
    }

    /// The slots as the kernel's `offs` rows (flat, 5 per slot).
    pub fn offs(&self) -> Vec<i32> {
        self.targets.iter().flatten().map(|&v| v as i32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1), a multiple of 1/64 (exact in f32 and in sums).
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 33) % 128) as f32 / 64.0 - 1.0
            })
            .collect()
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = x[r * cols + c];
            }
        }
        t
    }

    fn close(got: &[f32], want: &[f32], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f(*g) - f(*w)).abs() <= tol * (1.0 + f(*w).abs()),
                "element {i}: {g} vs {w}\n{got:?}\nvs\n{want:?}"
            );
        }
    }

    #[test]
    fn matmul_known_answer() {
        // [1 2 3; 4 5 6] · [7 8; 9 10; 11 12] = [58 64; 139 154].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        assert_eq!(
            matmul(&a, &b, 2, 3, 2, false, false),
            vec![58.0, 64.0, 139.0, 154.0]
        );
        // Bᵀ · Aᵀ = (A · B)ᵀ.
        assert_eq!(
            matmul(&b, &a, 2, 3, 2, true, true),
            vec![58.0, 139.0, 64.0, 154.0]
        );
    }

    #[test]
    fn matmul_transposition_combos_agree() {
        let (m, k, n) = (3, 5, 4);
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let want = matmul(&a, &b, m, k, n, false, false);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        assert_eq!(matmul(&at, &b, m, k, n, true, false), want);
        assert_eq!(matmul(&a, &bt, m, k, n, false, true), want);
        assert_eq!(matmul(&at, &bt, m, k, n, true, true), want);
        // And against an explicit sum.
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| f(a[i * k + p]) * f(b[p * n + j])).sum();
                assert_eq!(f(want[i * n + j]), s);
            }
        }
    }

    /// Output-sparse with a hand-checked case: 2 groups of 1 row, bs 2, w = 4 neurons.
    #[test]
    fn sparse_out_hand_checked() {
        // w rows (neurons) 0..4 of K = 2: [1 0], [0 1], [1 1], [2 -1].
        let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, -1.0];
        let x = [3.0, 4.0, 1.0, 2.0];
        // Group 0: blocks [1, 0]; group 1: block [1], padding 0.
        let counts = [2, 1];
        let indices = [1, 0, 1, 99];
        let init = [-9.0; 8];
        let out = sparse_out(&x, &w, 2, 2, 4, &counts, &indices, 2, 1, 2, &init);
        // Row 0: block 1 -> [7, 2], block 0 -> [3, 4]; row 1: block 1 -> [3, 0], slot 1 kept.
        assert_eq!(out, vec![7.0, 2.0, 3.0, 4.0, 3.0, 0.0, -9.0, -9.0]);
    }

    #[test]
    fn sparse_out_count_zero_leaves_init() {
        let (m, k, n, bs, max_blocks) = (4, 3, 8, 2, 3);
        let x = data(m * k, 3);
        let w = data(n * k, 4);
        let init = data(m * max_blocks * bs, 5);
        let out = sparse_out(
            &x,
            &w,
            m,
            k,
            n,
            &[0, 0],
            &[7, -1, 3, 0, 0, 0],
            max_blocks,
            2,
            bs,
            &init,
        );
        assert_eq!(out, init);
    }

    /// The written slots equal the dense product's columns of the chosen blocks; padding
    /// (even out-of-range or negative ids) is ignored.
    #[test]
    fn sparse_out_matches_dense_columns() {
        let (m, k, bs, num_blocks, max_blocks, bm) = (6, 5, 2, 4, 3, 2);
        let n = num_blocks * bs;
        let x = data(m * k, 6);
        let w = data(n * k, 7);
        let counts = [3, 1, 2];
        let indices = [2, 0, 3, 1, -5, 1000, 3, 2, 77];
        let init = vec![0.5; m * max_blocks * bs];
        let out = sparse_out(
            &x, &w, m, k, n, &counts, &indices, max_blocks, bm, bs, &init,
        );
        let dense = matmul(&x, &w, m, k, n, false, true);
        let width = max_blocks * bs;
        for r in 0..m {
            let g = r / bm;
            for j in 0..max_blocks {
                for c in 0..bs {
                    let got = out[r * width + j * bs + c];
                    if j < counts[g] as usize {
                        let b = indices[g * max_blocks + j] as usize;
                        assert_eq!(got, dense[r * n + b * bs + c], "r {r} j {j} c {c}");
                    } else {
                        assert_eq!(got, 0.5, "r {r} j {j} c {c}");
                    }
                }
            }
        }
    }

    /// Scatters a compact `[M, max_blocks*bs]` activation into a dense `[M, F]` one (zeros in
    /// the inactive blocks).
    #[allow(clippy::too_many_arguments)]
    fn scatter(
        h: &[f32],
        m: usize,
        f_width: usize,
        counts: &[i32],
        indices: &[i32],
        max_blocks: usize,
        bm: usize,
        bs: usize,
    ) -> Vec<f32> {
        let mut dense = vec![0.0; m * f_width];
        for r in 0..m {
            let g = r / bm;
            for j in 0..counts[g] as usize {
                let b = indices[g * max_blocks + j] as usize;
                for c in 0..bs {
                    dense[r * f_width + b * bs + c] = h[r * max_blocks * bs + j * bs + c];
                }
            }
        }
        dense
    }

    #[test]
    fn sparse_red_equals_dense_matmul_of_scattered_h() {
        let (m, n, bs, num_blocks, max_blocks, bm) = (5, 3, 4, 5, 3, 2);
        let f_width = num_blocks * bs;
        let counts = [2, 3, 0];
        let indices = [4, 1, -1, 0, 2, 3, 9, 9, 9];
        let h = data(m * max_blocks * bs, 8);
        let w2 = data(n * f_width, 9);
        let out = sparse_red(
            &h, &w2, m, n, f_width, &counts, &indices, max_blocks, bm, bs,
        );
        let hd = scatter(&h, m, f_width, &counts, &indices, max_blocks, bm, bs);
        let want = matmul(&hd, &w2, m, f_width, n, false, true);
        close(&out, &want, 1e-6);
        // The last row (group 2, count 0) is zeros.
        assert_eq!(&out[4 * n..], &[0.0; 3]);
    }

    #[test]
    fn sparse_both_equals_sparse_out_of_scattered_h() {
        let (m, bs, bm) = (4, 2, 2);
        let (nb_in, nb_out) = (4, 3);
        let (f_in, f_out) = (nb_in * bs, nb_out * bs);
        let (counts_i, indices_i, max_in) = ([3, 1], [3, 0, 2, 1, -7, 50], 3);
        let (counts_o, indices_o, max_out) = ([2, 0], [2, 0, 1, 1], 2);
        let h = data(m * max_in * bs, 10);
        let w = data(f_out * f_in, 11);
        let init = data(m * max_out * bs, 12);
        let out = sparse_both(
            &h, &w, m, f_out, f_in, &counts_o, &indices_o, max_out, &counts_i, &indices_i, max_in,
            bm, bs, &init,
        );
        let hd = scatter(&h, m, f_in, &counts_i, &indices_i, max_in, bm, bs);
        let want = sparse_out(
            &hd, &w, m, f_in, f_out, &counts_o, &indices_o, max_out, bm, bs, &init,
        );
        close(&out, &want, 1e-6);
        // Group 1 has output count 0: its rows keep init.
        assert_eq!(&out[2 * max_out * bs..], &init[2 * max_out * bs..]);
    }

    #[test]
    fn lora_fwd_with_zero_scale_is_the_dense_product() {
        let (m, k, n, r) = (3, 4, 5, 2);
        let x = data(m * k, 13);
        let w = data(n * k, 14);
        let a = data(r * k, 15);
        let b = data(n * r, 16);
        let bias = data(n, 17);
        let (y, xa) = lora_fwd(&x, &w, None, &a, &b, 0.0, m, k, n, r, |v| v as f32);
        assert_eq!(y, matmul(&x, &w, m, k, n, false, true));
        assert_eq!(xa, vec![0.0; m * r]);
        let (yb, _) = lora_fwd(&x, &w, Some(&bias), &a, &b, 0.0, m, k, n, r, |v| v as f32);
        for i in 0..m * n {
            assert!((f(yb[i]) - f(y[i]) - f(bias[i % n])).abs() < 1e-6);
        }
    }

    #[test]
    fn lora_fwd_hand_checked_and_uses_rounded_xa() {
        // M = 1, K = 2, N = 1, r = 1: x = [1, 2], W = [[3, 4]], bias 0.5, A = [[1, 1]],
        // B = [[2]], s = 0.5: xa = 0.5 * 3 = 1.5, y = 11 + 0.5 + 1.5 * 2 = 14.5.
        let id = |v: f64| v as f32;
        let (y, xa) = lora_fwd(
            &[1.0, 2.0],
            &[3.0, 4.0],
            Some(&[0.5]),
            &[1.0, 1.0],
            &[2.0],
            0.5,
            1,
            2,
            1,
            1,
            id,
        );
        assert_eq!((y, xa), (vec![14.5], vec![1.5]));
        // Rounding xa down to an integer: xa = 1, y = 11 + 0.5 + 2 = 13.5.
        let (y, xa) = lora_fwd(
            &[1.0, 2.0],
            &[3.0, 4.0],
            Some(&[0.5]),
            &[1.0, 1.0],
            &[2.0],
            0.5,
            1,
            2,
            1,
            1,
            |v| v.floor() as f32,
        );
        assert_eq!((y, xa), (vec![13.5], vec![1.0]));
    }

    /// `dx`, `dA` and `dB` are the gradients of `L = Σ y · dy` through [`lora_fwd`] (no
    /// rounding), checked by central finite differences (L is linear in each of them, so the
    /// difference is exact up to f32 rounding of y).
    #[test]
    fn lora_backward_matches_finite_differences() {
        let (m, k, n, r, s) = (3, 4, 5, 2, 0.75f32);
        let x = data(m * k, 18);
        let w = data(n * k, 19);
        let a = data(r * k, 20);
        let b = data(n * r, 21);
        let bias = data(n, 22);
        let dy = data(m * n, 23);
        let id = |v: f64| v as f32;
        let loss = |x: &[f32], a: &[f32], b: &[f32]| -> f64 {
            let (y, _) = lora_fwd(x, &w, Some(&bias), a, b, s, m, k, n, r, id);
            y.iter().zip(&dy).map(|(y, d)| f(*y) * f(*d)).sum()
        };
        let (_, xa) = lora_fwd(&x, &w, Some(&bias), &a, &b, s, m, k, n, r, id);
        let (dx, u) = lora_bwd_dx(&dy, &w, &a, &b, s, m, k, n, r, id);
        let da = lora_grad_a(&u, &x, m, k, r);
        let db = lora_grad_b(&dy, &xa, m, n, r);
        assert_eq!((dx.len(), da.len(), db.len()), (m * k, r * k, n * r));
        let h = 0.25f32;
        let fd = |which: usize, i: usize| -> f64 {
            let (mut xp, mut ap, mut bp) = (x.clone(), a.clone(), b.clone());
            let (mut xm, mut am, mut bmn) = (x.clone(), a.clone(), b.clone());
            match which {
                0 => (xp[i] += h, xm[i] -= h),
                1 => (ap[i] += h, am[i] -= h),
                _ => (bp[i] += h, bmn[i] -= h),
            };
            (loss(&xp, &ap, &bp) - loss(&xm, &am, &bmn)) / (2.0 * f(h))
        };
        for (which, grad) in [(0, &dx), (1, &da), (2, &db)] {
            for (i, g) in grad.iter().enumerate() {
                let want = fd(which, i);
                assert!(
                    (f(*g) - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "gradient {which}, element {i}: {g} vs finite difference {want}"
                );
            }
        }
    }

    #[test]
    fn lora_bwd_dx_rounds_u() {
        // dy = [1], B = [[3]], s = 0.5: u = 1.5, rounded down to 1; W = [[2, 0]], A = [[1, 4]]:
        // dx = [2, 0] + 1 * [1, 4] = [3, 4].
        let (dx, u) = lora_bwd_dx(
            &[1.0],
            &[2.0, 0.0],
            &[1.0, 4.0],
            &[3.0],
            0.5,
            1,
            2,
            1,
            1,
            |v| v.floor() as f32,
        );
        assert_eq!((dx, u), (vec![3.0, 4.0], vec![1.0]));
    }

    #[test]
    fn malformed_input_does_not_panic() {
        // Short slices read as zeros; the output keeps the shape the dims give.
        assert_eq!(matmul(&[1.0], &[2.0], 2, 2, 2, false, false).len(), 4);
        assert_eq!(matmul(&[], &[], 0, 3, 0, true, true).len(), 0);
        // bm = 0, counts above max_blocks, short counts/indices, negative ids, short init.
        let out = sparse_out(&[1.0; 4], &[1.0; 8], 2, 2, 4, &[5], &[1], 2, 0, 2, &[]);
        assert_eq!(out, vec![0.0; 8]);
        let out = sparse_out(&[1.0; 4], &[1.0; 8], 2, 2, 4, &[5, -2], &[1], 2, 1, 2, &[]);
        assert_eq!(out, vec![2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let out = sparse_out(
            &[1.0; 4],
            &[1.0; 8],
            2,
            2,
            4,
            &[1],
            &[-3],
            1,
            2,
            2,
            &[7.0; 4],
        );
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0]);
        let out = sparse_red(&[1.0; 2], &[1.0; 2], 2, 1, 2, &[3], &[0, 1, 2], 3, 1, 1);
        assert_eq!(out, vec![2.0, 0.0]);
        let out = sparse_both(
            &[1.0],
            &[1.0],
            3,
            1,
            1,
            &[1, 1],
            &[i32::MAX],
            1,
            &[9],
            &[i32::MIN],
            1,
            2,
            1,
            &[],
        );
        assert_eq!(out, vec![0.0; 3]);
        let (y, xa) = lora_fwd(&[], &[], Some(&[]), &[], &[], 1.0, 2, 2, 0, 1, |v| v as f32);
        assert_eq!((y.len(), xa, 0), (0, vec![0.0, 0.0], 0));
        let (dx, u) = lora_bwd_dx(&[1.0], &[], &[], &[], 1.0, 1, 2, 3, 1, |v| v as f32);
        assert_eq!((dx, u), (vec![0.0, 0.0], vec![0.0]));
    }
}
