//! The LoRA branch at memory bandwidth, for when the frozen projection runs on its own (cuBLAS,
//! with its epilogues). The branch is skinny products only (RUNTIME.md §2.6):
//!
//! ```text
//! forward:  u  = x·Aᵀ            (lora_down,   w = A  [r, in])
//!           y += s·u·Bᵀ           (lora_expand, w = Bᵀ [r, out])
//! backward: du = s·dy·B           (lora_down,   w = Bᵀ [r, out])
//!           dx += du·A            (lora_expand, w = A  [r, in])
//!           dB += s·dyᵀ·u, dA += duᵀ·x   (lora_wgrad + lora_wgrad_reduce)
//! ```
//!
//! Every one of them is a pass over a `[tokens, features]` activation with a rank of 4–16 on
//! the other side, so its time is the bytes it moves: `lora_down` and `lora_wgrad` read their
//! input once, `lora_expand` reads and writes its output once. cuBLAS runs such shapes
//! (`4096 x 2048 x 4`) at a fraction of the bandwidth (25 µs where 32 MB take 8 µs on an H200):
//! a LoRA step at OPT-1.3B, 4 x 1024 tokens, spent 6.1 of its 49.7 ms of kernels in them
//! (`bench/results/2026-11-30-h200-lora-branch/call49/profile-cublas.txt`).
//!
//! Both kernels take the rank-side matrix as `w [r, features]` (rows of `features`, 16-byte
//! aligned): `A` as PEFT stores it, `B` transposed ([`transpose_b`], once per step; PEFT's
//! `B [out, r]` has rows of `r` elements, too narrow for the tensor cores' 16-byte operands).
//! `lora_down` pads the rank to `R = 16` by its bounds masks and stores `u` as `[tokens, rp]`
//! with `rp` a multiple of 8 (16-byte rows), its padding columns written as zeros;
//! `lora_expand` reads only the first `r` columns.

use lexp_macros::kernel;

/// `u[M, rp] = T(s · x[M, K] · w[r, K]ᵀ)` for `r <= rp <= R`; the columns `r..rp` are zero.
/// One program per `BM` rows streams the whole `K` extent through the `cp.async` pipeline.
/// At 2048 tokens (rank 16) it takes 7.7–9.8 µs in every configuration, 16-row programs
/// included (0.0077–0.0086 ms against 0.0080–0.0087 for 32 rows, call 129): a fixed cost, not
/// idle multiprocessors, so the 16-row variants stay out. 256-wide K steps halve the loop's
/// trips (each a wait on its stage and a barrier; 4 stages of them fit shared memory): 0.0080
/// / 0.0086 ms against 0.0083 / 0.0089 for 128-wide steps in 8 stages at 4096 tokens, rank 4,
/// and 0.0076 / 0.0080 against 0.0080 / 0.0080 at 2048, rank 16 (call 134, two processes), so
/// they are the first configuration, the one the engine launches.
#[kernel(
    variants(T = [bf16, f16], BM = [32, 64], BK = [256, 128, 64], R = [16], S = [4, 8], W = [4]),
    only = [BK < 256 || S == 4],
    warps = W,
    stages = S,
    grid = [cdiv(x.dim(0), BM)],
    require = [w.dim(1) == x.dim(1), w.dim(0) <= u.dim(1), u.dim(1) <= R, u.dim(0) == x.dim(0)]
)]
pub fn lora_down<
    T,
    const BM: usize,
    const BK: usize,
    const R: usize,
    const S: usize,
    const W: usize,
>(
    x: Tensor<T, 2>,
    w: Tensor<T, 2>,
    s: f32,
    u: TensorMut<T, 2>,
) {
    let rows = program_id(0).cast::<i64>() * BM + range::<BM>();
    let ranks = range::<R>();
    let mut acc = zeros::<f32, BM, R>();
    for k in (0..x.dim(1)).step_by(BK) {
        let ks = k + range::<BK>();
        acc = dot(x.load([rows, ks]), w.load([ranks, ks]).t(), acc);
    }
    u.store([rows, ranks], (acc * s).cast::<T>());
}

/// `y[M, N] += s · u[M, ..r] · w[r, N]` in place (f32 sum, rounded once), `r <= u.dim(1)`.
/// A rank of 4–16 is too little work for tensor cores to matter: as `r` rank-1 updates on
/// CUDA cores the `y` tile stays in one blocked layout, read and written with 16-byte
/// accesses, and any alignment works. (A first version with a `dot` over the padded rank,
/// adding `y` to its accumulator, took the time of cuBLAS's call, 24 µs at 4096 x 2048 on the
/// H200; this one 17 µs, call 49.)
#[kernel(
    variants(T = [bf16, f16], BM = [16, 32], BN = [128, 256]),
    only = [BM * BN <= 4096],
    warps = 4,
    grid = [cdiv(y.dim(0), BM) * cdiv(y.dim(1), BN)],
    require = [u.dim(0) == y.dim(0), w.dim(0) <= u.dim(1), w.dim(1) == y.dim(1)]
)]
pub fn lora_expand<T, const BM: usize, const BN: usize>(
    u: Tensor<T, 2>,
    w: Tensor<T, 2>,
    s: f32,
    y: TensorMut<T, 2>,
) {
    let np_n = cdiv(y.dim(1), BN);
    let rows = (program_id(0) / np_n) * BM + range::<BM>();
    let cols = (program_id(0) % np_n) * BN + range::<BN>();
    let mut acc = y.load([rows, cols]).cast::<f32>();
    for j in (0..w.dim(0)).step_by(1) {
        let uj = u.load([rows, j]).cast::<f32>() * s;
        acc = acc + uj.expand(1) * w.load([j, cols]).cast::<f32>().expand(0);
    }
    y.store([rows, cols], acc.cast::<T>());
}

/// Every LoRA module's `B [rows_m, r]` (at element `offs[m]` of the flat `x`) transposed to
/// `Bᵀ [r, rows_m]` at the same offset of `y`, in one launch for all modules (`P` programs
/// per module, each a strided loop over its elements; one element per lane, a gather): the
/// `Bᵀ` that [`lora_down`] and [`lora_expand`] take. Lanes past a module's end address
/// nothing (their index is sent out of bounds), so neighbouring slots are never touched.
#[kernel(
    variants(T = [bf16, f16, f32], BLOCK = [1024], P = [4]),
    warps = 4,
    grid = [offs.dim(0) * P],
    require = [rows.dim(0) == offs.dim(0), y.dim(0) == x.dim(0), r > 0]
)]
pub fn transpose_b<T, const BLOCK: usize, const P: usize>(
    x: Tensor<T, 1>,
    offs: Tensor<i32, 1>,
    rows: Tensor<i32, 1>,
    r: usize,
    y: TensorMut<T, 1>,
) {
    let m = program_id(0) / P;
    let p = program_id(0) % P;
    let off = offs.load([m]).cast::<i64>();
    let n = rows.load([m]).cast::<i64>();
    let end = n * r;
    for i0 in (p.cast::<i64>() * BLOCK..end).step_by(BLOCK * P) {
        // y[j, c] (i = j * n + c) is x[c, j] (c * r + j).
        let i = i0 + range::<BLOCK>();
        let j = i / n;
        let c = i % n;
        let inside = i < end;
        let src = select(inside, off + c * r + j, x.dim(0));
        let dst = select(inside, off + i, y.dim(0));
        y.store([dst], x.load([src]));
    }
}

/// One layer's q/k/v LoRA branches folded into the spare room of its fused projection
/// `W [rows, ld]` (the runtime's `QkvFold`): `[x | u]·[W | s·B]ᵀ` is the base product plus
/// every branch's `s·u·Bᵀ` in one GEMM (the K-concatenation), and the room's rows hold the
/// `A`s that compute `u` (one `lora_down` for all targets). Per slot `m` of `RP` columns, a
/// row of `offs` (`A`'s and `B`'s element offsets in the flat parameters `x`, the first of its
/// `n` output rows, the slot `j`, the rank `r_m`), this writes
///
/// - rows `rows + j·RP ..+ RP`, columns `0..k`: `A [r_m, k]`, the rows past it zero;
/// - columns `k + j·RP ..+ RP` of every row `0..rows`: `s·B [n, r_m]` in the target's own
///   output rows and zero everywhere else (so other slots' `u` columns add nothing there).
///
/// A slot of rank 0 is written as zeros: the runtime pads the fold's K to a multiple of 64
/// with such slots. Whole blocks are rewritten each time, so nothing a previous layout left
/// in them counts. `P` programs per slot, one element per lane (a scatter) like
/// [`transpose_b`]: the first `PA` write `A`, the others `s·B`, each block in one pass at
/// OPT-1.3B's sizes (a program that looped over both took 10 µs a layer, its passes queued
/// behind each other's memory latency).
#[kernel(
    variants(T = [bf16, f16], RP = [8, 16], BLOCK = [1024], P = [64], PA = [16]),
    warps = 4,
    grid = [offs.dim(0) * P],
    require = [offs.dim(1) == 5, k <= ld]
)]
#[allow(clippy::too_many_arguments)]
pub fn lora_fold<T, const RP: usize, const BLOCK: usize, const P: usize, const PA: usize>(
    x: Tensor<T, 1>,
    offs: Tensor<i32, 2>,
    k: usize,
    n: usize,
    rows: usize,
    ld: usize,
    s: f32,
    y: TensorMut<T, 1>,
) {
    let m = program_id(0) / P;
    let p = (program_id(0) % P).cast::<i64>();
    let a_off = offs.load([m, 0]).cast::<i64>();
    let b_off = offs.load([m, 1]).cast::<i64>();
    let first = offs.load([m, 2]).cast::<i64>();
    let slot = offs.load([m, 3]).cast::<i64>() * RP;
    let r = offs.load([m, 4]).cast::<i64>();
    if p < PA {
        // A into the room's rows; lanes past the block address nothing.
        let na = RP * k;
        for i0 in (p * BLOCK..na).step_by(BLOCK * PA) {
            let i = i0 + range::<BLOCK>();
            let row = i / k;
            let src = select(row < r, a_off + i, x.dim(0));
            let dst = select(i < na, (rows + slot + row) * ld + i % k, y.dim(0));
            y.store([dst], x.load([src]));
        }
    } else {
        // s·B into the room's columns, zero outside the target's rows.
        let nb = rows * RP;
        for i0 in ((p - PA) * BLOCK..nb).step_by(BLOCK * (P - PA)) {
            let i = i0 + range::<BLOCK>();
            let row = i / RP;
            let c = i % RP;
            let own = (row >= first) & (row < first + n) & (c < r);
            let src = select(own, b_off + (row - first) * r + c, x.dim(0));
            let dst = select(i < nb, row * ld + k + slot + c, y.dim(0));
            y.store([dst], (x.load([src]).cast::<f32>() * s).cast::<T>());
        }
    }
}

/// The weight gradients of a LoRA branch, first half: per chunk of tokens `c` (of
/// `C = part.dim(0) / Q` equal chunks, each a multiple of `BK`), `part[c·Q + q, j] =
/// Σ_{m in c} b[m, q] · a[m, j]` for `a [M, rp]` (the saved `u` or `du`, rank side) and
/// `b [M, Q]` (`dy` or `x`); `part` is `[C·Q, rp]`.
/// [`lora_wgrad_reduce`] then sums the chunks in a fixed order: a split-K without atomics, so
/// the gradients are the same on every run (cuBLAS's `4 x 2048 x 4096` takes 27 µs for what
/// is one 16 MB read).
#[kernel(
    variants(T = [bf16, f16], BQ = [128, 64], BK = [64, 128], R = [16], S = [4], W = [4]),
    warps = W,
    stages = S,
    grid = [cdiv(b.dim(1), BQ), part.dim(0) / b.dim(1).max(1)],
    require = [a.dim(0) == b.dim(0), a.dim(1) <= R, b.dim(1) > 0, part.dim(0) % b.dim(1) == 0, part.dim(1) == a.dim(1)]
)]
pub fn lora_wgrad<
    T,
    const BQ: usize,
    const BK: usize,
    const R: usize,
    const S: usize,
    const W: usize,
>(
    a: Tensor<T, 2>,
    b: Tensor<T, 2>,
    part: TensorMut<f32, 2>,
) {
    let qs = program_id(0).cast::<i64>() * BQ + range::<BQ>();
    let ranks = range::<R>();
    let c = program_id(1).cast::<i64>();
    let chunks = part.dim(0) / b.dim(1);
    let chunk = cdiv(cdiv(b.dim(0), chunks), BK) * BK;
    let m0 = c * chunk;
    let mut acc = zeros::<f32, BQ, R>();
    for m in (m0..m0 + chunk).step_by(BK) {
        let ms = m + range::<BK>();
        acc = dot(b.load([ms, qs]).t(), a.load([ms, ranks]), acc);
    }
    // Rows past Q would land in the next chunk's rows: send them out of bounds (masked).
    let prow = select(qs < b.dim(1), c * b.dim(1) + qs, part.dim(0));
    part.store([prow, ranks], acc);
}

/// The weight gradients of a LoRA branch, second half: `g += s · Σ_c part[c, q, j]` over the
/// chunks (at most `CH`, all loaded at once and summed in a fixed order), for the partial sums
/// of [`lora_wgrad`] viewed as `[C, Q·rp]`, into one module's gradient `g`, which is `[Q, r]`
/// (`dB`, `tr = 0`) or `[r, Q]` (`dA`, `tr = 1`).
#[kernel(
    variants(BLOCK = [128], CH = [16]),
    warps = 4,
    grid = [cdiv(g.dim(0), BLOCK)],
    require = [
        q > 0, r > 0, rp >= r, g.dim(0) as i64 == q * r, part.dim(1) as i64 == q * rp,
        part.dim(0) <= CH
    ]
)]
pub fn lora_wgrad_reduce<const BLOCK: usize, const CH: usize>(
    part: Tensor<f32, 2>,
    q: usize,
    r: usize,
    rp: usize,
    tr: usize,
    s: f32,
    g: TensorMut<f32, 1>,
) {
    // Lanes follow `part`'s rows (`qi`, then `j`), so that its loads are coalesced; `dA`'s
    // transposed stores scatter instead (`g` is `part`'s `1/C` size, and read once).
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    let qi = i / r;
    let j = i % r;
    let sums = part.load([range::<CH>(), qi * rp + j]).sum(0);
    let gi = select(i < q * r, select(tr == 1, j * q + qi, i), g.dim(0));
    g.store([gi], g.load([gi]) + sums * s);
}

/// Two [`lora_wgrad`] passes in one launch: `part` holds pair 0's `[C·Q, rp]` partial sums of
/// `b0ᵀ·a0` and then pair 1's of `b1ᵀ·a1` (blocks 0 and 1 of [`lora_wgrad_reduce_many`]),
/// both pairs over the same `M` tokens and `Q` features (a LoRA layer's `dB` pass over `dy`
/// and its `dA` pass over `x`). Each program streams both pairs' chunk in one loop, two
/// products per step, so the launch between the passes, with the second pass's ramp-up
/// behind the first's tail, is gone. The bytes in flight per stage double, so the variants
/// hold fewer stages than [`lora_wgrad`]'s.
#[kernel(
    variants(T = [bf16, f16], BQ = [128, 64], BK = [64], R = [16], S = [2, 3], W = [4]),
    warps = W,
    stages = S,
    grid = [cdiv(b0.dim(1), BQ), part.dim(0) / (2 * b0.dim(1).max(1))],
    require = [
        a0.dim(0) == b0.dim(0), a1.dim(0) == b0.dim(0), b1.dim(0) == b0.dim(0),
        b1.dim(1) == b0.dim(1), a0.dim(1) <= R, a1.dim(1) == a0.dim(1), b0.dim(1) > 0,
        part.dim(0) % (2 * b0.dim(1)) == 0, part.dim(1) == a0.dim(1)
    ]
)]
pub fn lora_wgrad_pair<
    T,
    const BQ: usize,
    const BK: usize,
    const R: usize,
    const S: usize,
    const W: usize,
>(
    a0: Tensor<T, 2>,
    b0: Tensor<T, 2>,
    a1: Tensor<T, 2>,
    b1: Tensor<T, 2>,
    part: TensorMut<f32, 2>,
) {
    let q = b0.dim(1);
    let qs = program_id(0).cast::<i64>() * BQ + range::<BQ>();
    let ranks = range::<R>();
    let c = program_id(1).cast::<i64>();
    let chunks = part.dim(0) / (2 * q);
    let chunk = cdiv(cdiv(b0.dim(0), chunks), BK) * BK;
    let m0 = c * chunk;
    let mut acc0 = zeros::<f32, BQ, R>();
    let mut acc1 = zeros::<f32, BQ, R>();
    for m in (m0..m0 + chunk).step_by(BK) {
        let ms = m + range::<BK>();
        acc0 = dot(b0.load([ms, qs]).t(), a0.load([ms, ranks]), acc0);
        acc1 = dot(b1.load([ms, qs]).t(), a1.load([ms, ranks]), acc1);
    }
    // Rows past Q would land in the next chunk's rows: send them out of bounds (masked).
    let inside = qs < q;
    part.store([select(inside, c * q + qs, part.dim(0)), ranks], acc0);
    part.store(
        [select(inside, (chunks + c) * q + qs, part.dim(0)), ranks],
        acc1,
    );
}

/// [`lora_wgrad_reduce`] for several modules in one launch (the LoRA fold's q/k/v: a layer's
/// `dB` passes and its shared `dA` passes, four reduces in one at rank 4 on q and v). `part`
/// is `[blocks·C, Q·w]`: block `b`, rows `b·C ..+ C`, is one [`lora_wgrad`] pass's `[C·Q, w]`.
/// Module `m` (a row of `mods`: block, column shift, `tr`, element offset of its gradient in
/// `g`, and 1 when scaled by `s`) adds `(s or 1) · Σ_c part[b·C + c, qi·w + shift + j]` to its
/// gradient, `[Q, r]` (`tr = 0`) or `[r, Q]` (`tr = 1`). Chunks summed in a fixed order, as
/// in [`lora_wgrad_reduce`]. With `acc = 0` the sums replace the gradients instead (a backward
/// that writes its gradients, as autograd's first one does, needs no zeroing launch before it).
#[kernel(
    variants(BLOCK = [128], CH = [16]),
    warps = 4,
    grid = [cdiv(n as usize, BLOCK), mods.dim(0)],
    require = [
        mods.dim(1) == 5, chunks <= CH as i64, q > 0, r > 0, n == q * r, acc <= 1,
        part.dim(1) as i64 == q * w
    ]
)]
#[allow(clippy::too_many_arguments)]
pub fn lora_wgrad_reduce_many<const BLOCK: usize, const CH: usize>(
    part: Tensor<f32, 2>,
    mods: Tensor<i32, 2>,
    q: usize,
    r: usize,
    w: usize,
    n: usize,
    chunks: usize,
    s: f32,
    acc: usize,
    g: TensorMut<f32, 1>,
) {
    let m = program_id(1);
    let i = program_id(0).cast::<i64>() * BLOCK + range::<BLOCK>();
    let blk = mods.load([m, 0]).cast::<i64>();
    let shift = mods.load([m, 1]).cast::<i64>();
    let tr = mods.load([m, 2]);
    let off = mods.load([m, 3]).cast::<i64>();
    let scale = select(mods.load([m, 4]) == 1, s, 1.0);
    // Lanes follow `part`'s rows, as in `lora_wgrad_reduce`.
    let qi = i / r;
    let j = i % r;
    let c = range::<CH>().cast::<i64>();
    let rows = select(c < chunks, blk * chunks + c, part.dim(0));
    let sums = part.load([rows, qi * w + shift + j]).sum(0);
    let gi = select(i < n, off + select(tr == 1, j * q + qi, i), g.dim(0));
    let prior = select(acc == 1, g.load([gi]), 0.0);
    g.store([gi], prior + sums * scale);
}
