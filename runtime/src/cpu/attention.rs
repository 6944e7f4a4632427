//! Varlen causal multi-head self-attention over a packed batch (RUNTIME.md §2.3), forward
//! and backward in the flash form: the forward keeps only `O` and the per-row logsumexp `L`,
//! the backward recomputes `P = exp(S − L)`.
//!
//! `q`, `k`, `v` are `[T, nh·hd]` with head `h` in columns `h·hd..(h+1)·hd`; `q` is already
//! scaled (OPT scales the projected q by `hd^-0.5`), so the scores are `S = q·kᵀ`. Key `j` is
//! visible to query `i` iff both lie in the same segment `[cu_seqlens[b], cu_seqlens[b+1])` and
//! `j ≤ i`.
//!
//! Work is split over (segment, head) pairs with rayon. Each pair gathers its head into
//! contiguous `[len, hd]` copies and walks the queries in blocks of 128 (`Q_BLOCK`) rows: a block
//! of rows `r0..r1` only sees keys `0..r1`, so the products skip most of the masked upper
//! triangle and the score buffer is `[Q_BLOCK, len]`, not `[len, len]`. Per-pair buffers come
//! from the per-thread scratch of `shared::scratch`, reused across pairs and calls (it keeps
//! the largest size seen: about `(7·hd + 2·Q_BLOCK)·len` floats for the backward, 5.6 MB per
//! thread at `len = 2048, hd = 64`), and results are written straight into the outputs.
//!
//! [`attention_fwd_masked`] / [`attention_bwd_masked`] also drop key blocks: a [`KeyBlocks`]
//! mask keeps, per (segment, query block, head), a list of key blocks (block-sparse flash
//! attention's semantics, module `key_blocks`). The query tiles then follow the mask's query
//! blocks (cut to at most `Q_BLOCK` rows); a tile whose kept blocks are the whole causal
//! prefix runs exactly as without a mask, any other gathers its kept keys and values into
//! contiguous buffers (and scatters their gradients back), so the products shrink with the
//! density. The diagonal blocks are always kept and come last, so within a tile query
//! `r0 + ii` sees all but the last `b − 1 − ii` selected keys, as in the dense case.

use gemm::Parallelism;
use rayon::prelude::*;

use super::error::check_len;
use super::fastmath;
use super::key_blocks::{key_ranges, KeyBlocks};
use super::matmul::{auto_parallelism, matmul_with};
use super::shared::{scratch, SharedOut};
use super::CpuError;

/// Query rows per block inside one (segment, head) pair.
const Q_BLOCK: usize = 128;

/// What [`attention_fwd`] saves for the backward.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSaved {
    /// Logsumexp of each query row's (masked) scores, laid out `[nh, T]`: head `h`, token `t`
    /// is at `h·T + t`.
    pub lse: Vec<f32>,
}

/// Attention forward: returns `o [T, nh·hd]` (`o = softmax(q·kᵀ + M)·v` per head and segment)
/// and the per-row logsumexp.
///
/// # Errors
/// [`CpuError`] if `cu_seqlens` is not `[0, …, T]` non-decreasing, or a buffer is not
/// `[T, nh·hd]`.
pub fn attention_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[i32],
    nh: usize,
    hd: usize,
) -> Result<(Vec<f32>, AttentionSaved), CpuError> {
    attention_fwd_masked(q, k, v, cu_seqlens, nh, hd, None)
}

/// [`attention_fwd`] restricted to the kept key blocks of `mask` (`None`: dense causal). A
/// dropped block's scores are −∞: the softmax normalises over the kept causal keys.
///
/// # Errors
/// As [`attention_fwd`], and [`CpuError::KeyBlocks`] if `mask` does not fit the batch
/// ([`KeyBlocks`] says what it must satisfy).
pub fn attention_fwd_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[i32],
    nh: usize,
    hd: usize,
    mask: Option<&KeyBlocks<'_>>,
) -> Result<(Vec<f32>, AttentionSaved), CpuError> {
    let t = tokens(q, nh, hd)?;
    let width = nh * hd;
    check_len("attention k [T, nh·hd]", k.len(), t * width)?;
    check_len("attention v [T, nh·hd]", v.len(), t * width)?;
    let segs = segments(cu_seqlens, t)?;
    let rows = mask.map(|m| m.rows_of(&segs, nh)).transpose()?;
    let pairs = pairs(&segs, nh);
    let mm = Mm::for_pairs(pairs.len());
    let mut o = vec![0.0f32; t * width];
    let mut lse = vec![0.0f32; nh * t];
    let (o_out, lse_out) = (SharedOut::new(&mut o), SharedOut::new(&mut lse));

    pairs.par_iter().for_each(|&(seg, start, len, h)| {
        let head = Head {
            start,
            len,
            h,
            hd,
            width,
        };
        let tiles = tiles(len, h, mask.zip(rows.as_ref().map(|r| r[seg])));
        let lh_len = len * hd;
        // Room for the gathered keys and values of a sparse tile, when there is a mask.
        let sel = if mask.is_some() { 2 * lh_len } else { 0 };
        scratch(4 * lh_len + len + Q_BLOCK.min(len) * len + sel, |buf| {
            let (qh, buf) = head.gather(q, buf);
            let (kh, buf) = head.gather(k, buf);
            let (vh, buf) = head.gather(v, buf);
            let (oh, buf) = buf.split_at_mut(lh_len);
            let (lh, buf) = buf.split_at_mut(len);
            let (s, buf) = buf.split_at_mut(Q_BLOCK.min(len) * len);
            let (ksel, vsel) = buf.split_at_mut(sel / 2);
            let mut ranges = Vec::new();
            for tile in &tiles {
                let (r0, r1) = (tile.r0, tile.r1);
                let b = r1 - r0;
                let (kk, vv, kv) = if tile.dense(&mut ranges) {
                    (&kh[..r1 * hd], &vh[..r1 * hd], r1)
                } else {
                    let kv = gather_ranges(kh, &ranges, hd, ksel);
                    gather_ranges(vh, &ranges, hd, vsel);
                    (&ksel[..kv * hd], &vsel[..kv * hd], kv)
                };
                let s = &mut s[..b * kv];
                let q_blk = &qh[r0 * hd..r1 * hd];
                mm.run(s, q_blk, kk, (b, hd, kv), (false, true), 0.0);
                for (ii, row) in s.chunks_exact_mut(kv).enumerate() {
                    // The tile's last keys are the diagonal, always kept: query `r0 + ii` sees
                    // all but the last `b − 1 − ii` selected keys.
                    let (vis, masked) = row.split_at_mut(kv + 1 + ii - b);
                    let mx = fastmath::max(vis);
                    let sum = fastmath::exp_shift_sum(vis, mx);
                    let inv = (1.0 / sum) as f32;
                    vis.iter_mut().for_each(|x| *x *= inv);
                    masked.fill(0.0);
                    lh[r0 + ii] = (mx as f64 + sum.ln()) as f32;
                }
                let o_blk = &mut oh[r0 * hd..r1 * hd];
                mm.run(o_blk, s, vv, (b, kv, hd), (false, false), 0.0);
            }
            // SAFETY: pairs are distinct (segment, head) combinations, so no other task writes
            // this pair's block of `o` or range of `lse`, and nothing reads them until
            // `for_each` returns.
            unsafe {
                head.scatter(&o_out, oh);
                lse_out.write(h * t + start, lh);
            }
        });
    });
    Ok((o, AttentionSaved { lse }))
}

/// Attention backward: `(dq, dk, dv)`, each `[T, nh·hd]`, w.r.t. the (scaled) `q`, `k`, `v`,
/// given the forward's `o`, its gradient `d_o` and `saved`:
/// `D = rowsum(dO⊙O)`, `P = exp(S − L)`, `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P⊙(dP − D)`,
/// `dQ = dS·K`, `dK = dSᵀ·Q`.
///
/// # Errors
/// [`CpuError`] if `cu_seqlens` is not `[0, …, T]` non-decreasing, or a buffer does not have
/// the shape of its forward counterpart.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    d_o: &[f32],
    saved: &AttentionSaved,
    cu_seqlens: &[i32],
    nh: usize,
    hd: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), CpuError> {
    attention_bwd_masked(q, k, v, o, d_o, saved, cu_seqlens, nh, hd, None)
}

/// [`attention_bwd`] of [`attention_fwd_masked`] with the same `mask`: exact for the masked
/// forward (dropped blocks have `P = 0` and get no gradient).
///
/// # Errors
/// As [`attention_bwd`], and [`CpuError::KeyBlocks`] if `mask` does not fit the batch.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn attention_bwd_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    d_o: &[f32],
    saved: &AttentionSaved,
    cu_seqlens: &[i32],
    nh: usize,
    hd: usize,
    mask: Option<&KeyBlocks<'_>>,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>), CpuError> {
    let t = tokens(q, nh, hd)?;
    let width = nh * hd;
    check_len("attention k [T, nh·hd]", k.len(), t * width)?;
    check_len("attention v [T, nh·hd]", v.len(), t * width)?;
    check_len("attention o [T, nh·hd]", o.len(), t * width)?;
    check_len("attention d_o [T, nh·hd]", d_o.len(), t * width)?;
    check_len("attention saved lse [nh, T]", saved.lse.len(), nh * t)?;
    let segs = segments(cu_seqlens, t)?;
    let rows = mask.map(|m| m.rows_of(&segs, nh)).transpose()?;
    let pairs = pairs(&segs, nh);
    let mm = Mm::for_pairs(pairs.len());
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; t * width],
        vec![0.0f32; t * width],
        vec![0.0f32; t * width],
    );
    let outs = [
        SharedOut::new(&mut dq),
        SharedOut::new(&mut dk),
        SharedOut::new(&mut dv),
    ];

    pairs.par_iter().for_each(|&(seg, start, len, h)| {
        let head = Head {
            start,
            len,
            h,
            hd,
            width,
        };
        let tiles = tiles(len, h, mask.zip(rows.as_ref().map(|r| r[seg])));
        let lse = &saved.lse[h * t + start..h * t + start + len];
        let lh_len = len * hd;
        let blk = Q_BLOCK.min(len) * len;
        // Gathered keys and values of a sparse tile and their gradients, when there is a mask.
        let sel = if mask.is_some() { 4 * lh_len } else { 0 };
        scratch(7 * lh_len + len + 2 * blk + sel, |buf| {
            let (qh, buf) = head.gather(q, buf);
            let (kh, buf) = head.gather(k, buf);
            let (vh, buf) = head.gather(v, buf);
            let (doh, buf) = head.gather(d_o, buf);
            let (dqh, buf) = buf.split_at_mut(lh_len);
            let (dkh, buf) = buf.split_at_mut(lh_len);
            let (dvh, buf) = buf.split_at_mut(lh_len);
            let (d, buf) = buf.split_at_mut(len);
            let (p, buf) = buf.split_at_mut(blk);
            let (dp, buf) = buf.split_at_mut(blk);
            let (ksel, buf) = buf.split_at_mut(sel / 4);
            let (vsel, buf) = buf.split_at_mut(sel / 4);
            let (dksel, dvsel) = buf.split_at_mut(sel / 4);
            // D_i = rowsum(dO ⊙ O), reading the rows of `o` in place.
            for (i, di) in d.iter_mut().enumerate() {
                let (dor, orow) = (&doh[i * hd..(i + 1) * hd], head.row(o, i));
                *di = dor
                    .iter()
                    .zip(orow)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum::<f64>() as f32;
            }
            dkh.fill(0.0);
            dvh.fill(0.0);
            let mut ranges = Vec::new();
            for tile in &tiles {
                let (r0, r1) = (tile.r0, tile.r1);
                let b = r1 - r0;
                let dense = tile.dense(&mut ranges);
                let (kk, vv, kv) = if dense {
                    (&kh[..r1 * hd], &vh[..r1 * hd], r1)
                } else {
                    let kv = gather_ranges(kh, &ranges, hd, ksel);
                    gather_ranges(vh, &ranges, hd, vsel);
                    (&ksel[..kv * hd], &vsel[..kv * hd], kv)
                };
                let (p, dp) = (&mut p[..b * kv], &mut dp[..b * kv]);
                let (q_blk, do_blk) = (&qh[r0 * hd..r1 * hd], &doh[r0 * hd..r1 * hd]);
                // P = exp(S − L), zero where masked (the last `b − 1 − ii` keys of row `ii`).
                mm.run(p, q_blk, kk, (b, hd, kv), (false, true), 0.0);
                for (ii, row) in p.chunks_exact_mut(kv).enumerate() {
                    let (vis, masked) = row.split_at_mut(kv + 1 + ii - b);
                    fastmath::exp_shift_scale(vis, lse[r0 + ii], 1.0);
                    masked.fill(0.0);
                }
                // dV[keys] += Pᵀ·dO_blk (into the prefix in place, or gathered then added).
                let (dv_keys, beta) = if dense {
                    (&mut dvh[..kv * hd], 1.0)
                } else {
                    (&mut dvsel[..kv * hd], 0.0)
                };
                mm.run(dv_keys, p, do_blk, (kv, b, hd), (true, false), beta);
                // dP = dO_blk·V[keys]ᵀ;  dS = P⊙(dP − D), in place of P.
                mm.run(dp, do_blk, vv, (b, hd, kv), (false, true), 0.0);
                let rows = p.chunks_exact_mut(kv).zip(dp.chunks_exact(kv));
                for ((prow, dprow), &di) in rows.zip(&d[r0..r1]) {
                    prow.iter_mut().zip(dprow).for_each(|(x, &y)| *x *= y - di);
                }
                // dQ_blk = dS·K[keys];  dK[keys] += dSᵀ·Q_blk
                let dq_blk = &mut dqh[r0 * hd..r1 * hd];
                mm.run(dq_blk, p, kk, (b, kv, hd), (false, false), 0.0);
                let dk_keys = if dense {
                    &mut dkh[..kv * hd]
                } else {
                    &mut dksel[..kv * hd]
                };
                mm.run(dk_keys, p, q_blk, (kv, b, hd), (true, false), beta);
                if !dense {
                    add_ranges(dkh, &ranges, hd, dksel);
                    add_ranges(dvh, &ranges, hd, dvsel);
                }
            }
            for (out, g) in outs.iter().zip([&*dqh, &*dkh, &*dvh]) {
                // SAFETY: as in the forward, each pair is the only writer of its block.
                unsafe { head.scatter(out, g) };
            }
        });
    });
    Ok((dq, dk, dv))
}

/// Query rows `r0..r1` of one (segment, head) pair, processed together, and the kept key
/// blocks of the mask row they belong to (`None`: no mask).
struct Tile<'m> {
    r0: usize,
    r1: usize,
    kept: Option<&'m [u32]>,
    k_block: usize,
}

impl Tile<'_> {
    /// Whether the tile attends to the whole causal prefix `0..r1` of keys; if not, fills
    /// `ranges` with the key positions it keeps.
    fn dense(&self, ranges: &mut Vec<(usize, usize)>) -> bool {
        self.kept
            .is_none_or(|kept| key_ranges(kept, self.k_block, self.r1, ranges))
    }
}

/// The tiles of a `len`-row pair of head `h`: blocks of [`Q_BLOCK`] rows without a mask; with
/// `(mask, first row of the segment)`, the mask's query blocks, each cut into pieces of at most
/// [`Q_BLOCK`] rows (which bounds the score buffer at `[Q_BLOCK, len]`).
fn tiles<'m>(len: usize, h: usize, mask: Option<(&KeyBlocks<'m>, usize)>) -> Vec<Tile<'m>> {
    let Some((m, first)) = mask else {
        return (0..len)
            .step_by(Q_BLOCK)
            .map(|r0| Tile {
                r0,
                r1: (r0 + Q_BLOCK).min(len),
                kept: None,
                k_block: 1,
            })
            .collect();
    };
    let mut tiles = Vec::new();
    for qb in 0..len.div_ceil(m.q_block) {
        let kept = m.kept(first + qb * m.heads + h);
        let end = ((qb + 1) * m.q_block).min(len);
        for r0 in (qb * m.q_block..end).step_by(Q_BLOCK) {
            tiles.push(Tile {
                r0,
                r1: (r0 + Q_BLOCK).min(end),
                kept: Some(kept),
                k_block: m.k_block,
            });
        }
    }
    tiles
}

/// Copies the rows in `ranges` of the `[len, hd]` matrix `src` to the front of `dst`,
/// contiguous; returns how many rows.
fn gather_ranges(src: &[f32], ranges: &[(usize, usize)], hd: usize, dst: &mut [f32]) -> usize {
    let mut n = 0;
    for &(a, b) in ranges {
        dst[n * hd..(n + b - a) * hd].copy_from_slice(&src[a * hd..b * hd]);
        n += b - a;
    }
    n
}

/// Adds the contiguous rows of `src` to the rows in `ranges` of `dst` (the inverse of
/// [`gather_ranges`]).
fn add_ranges(dst: &mut [f32], ranges: &[(usize, usize)], hd: usize, src: &[f32]) {
    let mut n = 0;
    for &(a, b) in ranges {
        let rows = &src[n * hd..(n + b - a) * hd];
        dst[a * hd..b * hd]
            .iter_mut()
            .zip(rows)
            .for_each(|(x, &y)| *x += y);
        n += b - a;
    }
}

/// Products inside one (segment, head) pair.
#[derive(Clone, Copy)]
struct Mm {
    /// At least as many pairs as threads: the pairs already fill the pool, so the products run
    /// single-threaded; otherwise they may use rayon themselves.
    many_pairs: bool,
}

impl Mm {
    fn for_pairs(pairs: usize) -> Self {
        Mm {
            many_pairs: pairs >= rayon::current_num_threads(),
        }
    }

    /// [`matmul_with`] with α = 1, shape `(m, k, n)` and transposes `(ta, tb)`.
    fn run(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        (ta, tb): (bool, bool),
        beta: f32,
    ) {
        let par = if self.many_pairs {
            Parallelism::None
        } else {
            auto_parallelism(m, k, n)
        };
        matmul_with(out, a, b, m, k, n, ta, tb, 1.0, beta, par);
    }
}

/// One (segment, head) pair's view of a `[T, width]` buffer: rows `start..start+len`,
/// columns `h·hd..(h+1)·hd`.
struct Head {
    start: usize,
    len: usize,
    h: usize,
    hd: usize,
    width: usize,
}

impl Head {
    /// Offset of row `i` of the pair's block in a `[T, width]` buffer.
    fn offset(&self, i: usize) -> usize {
        (self.start + i) * self.width + self.h * self.hd
    }

    /// Row `i` of the pair's block of `src`.
    fn row<'s>(&self, src: &'s [f32], i: usize) -> &'s [f32] {
        &src[self.offset(i)..self.offset(i) + self.hd]
    }

    /// Copies the pair's block of `src` into the front of `buf` as a contiguous `[len, hd]`
    /// matrix; returns it and the rest of `buf`.
    fn gather<'b>(&self, src: &[f32], buf: &'b mut [f32]) -> (&'b mut [f32], &'b mut [f32]) {
        let (dst, rest) = buf.split_at_mut(self.len * self.hd);
        for (i, d) in dst.chunks_exact_mut(self.hd.max(1)).enumerate() {
            d.copy_from_slice(self.row(src, i));
        }
        (dst, rest)
    }

    /// Writes a contiguous `[len, hd]` matrix into the pair's block of `out`.
    ///
    /// # Safety
    /// No other task may access this pair's block of `out` concurrently.
    unsafe fn scatter(&self, out: &SharedOut<'_>, part: &[f32]) {
        for (i, row) in part.chunks_exact(self.hd.max(1)).enumerate() {
            // SAFETY: forwarded from the caller.
            unsafe { out.write(self.offset(i), row) };
        }
    }
}

/// The number of tokens `T` of `q [T, nh·hd]`.
fn tokens(q: &[f32], nh: usize, hd: usize) -> Result<usize, CpuError> {
    let width = nh * hd;
    if width == 0 {
        check_len("attention q [T, nh·hd] with nh·hd = 0", q.len(), 0)?;
        return Ok(0);
    }
    let t = q.len() / width;
    check_len("attention q [T, nh·hd]", q.len(), t * width)?;
    Ok(t)
}

/// Validates `cu_seqlens` against `T` tokens and returns the segments as `(start, len)`.
fn segments(cu_seqlens: &[i32], t: usize) -> Result<Vec<(usize, usize)>, CpuError> {
    let (&first, &last) = match (cu_seqlens.first(), cu_seqlens.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(CpuError::CuSeqlensEmpty),
    };
    if first != 0 {
        return Err(CpuError::CuSeqlensStart { first });
    }
    for (i, w) in cu_seqlens.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(CpuError::CuSeqlensDecreasing {
                index: i + 1,
                prev: w[0],
                value: w[1],
            });
        }
    }
    if usize::try_from(last).ok() != Some(t) {
        return Err(CpuError::CuSeqlensEnd { last, tokens: t });
    }
    // Entries are non-negative and non-decreasing from here on, so the casts are lossless.
    Ok(cu_seqlens
        .windows(2)
        .map(|w| (w[0] as usize, (w[1] - w[0]) as usize))
        .collect())
}

/// The (segment, start, len, head) work items, empty segments dropped, longest first so that
/// rayon starts the most expensive pairs early.
fn pairs(segs: &[(usize, usize)], nh: usize) -> Vec<(usize, usize, usize, usize)> {
    let mut pairs: Vec<_> = segs
        .iter()
        .enumerate()
        .filter(|&(_, &(_, len))| len > 0)
        .flat_map(|(s, &(start, len))| (0..nh).map(move |h| (s, start, len, h)))
        .collect();
    pairs.sort_by_key(|&(_, start, len, h)| (std::cmp::Reverse(len), start, h));
    pairs
}
