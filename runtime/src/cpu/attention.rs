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

use gemm::Parallelism;
use rayon::prelude::*;

use super::error::check_len;
use super::fastmath;
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
    let t = tokens(q, nh, hd)?;
    let width = nh * hd;
    check_len("attention k [T, nh·hd]", k.len(), t * width)?;
    check_len("attention v [T, nh·hd]", v.len(), t * width)?;
    let pairs = pairs(&segments(cu_seqlens, t)?, nh);
    let mm = Mm::for_pairs(pairs.len());
    let mut o = vec![0.0f32; t * width];
    let mut lse = vec![0.0f32; nh * t];
    let (o_out, lse_out) = (SharedOut::new(&mut o), SharedOut::new(&mut lse));

    pairs.par_iter().for_each(|&(start, len, h)| {
        let head = Head {
            start,
            len,
            h,
            hd,
            width,
        };
        let lh_len = len * hd;
        scratch(4 * lh_len + len + Q_BLOCK.min(len) * len, |buf| {
            let (qh, buf) = head.gather(q, buf);
            let (kh, buf) = head.gather(k, buf);
            let (vh, buf) = head.gather(v, buf);
            let (oh, buf) = buf.split_at_mut(lh_len);
            let (lh, s) = buf.split_at_mut(len);
            for r0 in (0..len).step_by(Q_BLOCK) {
                let r1 = (r0 + Q_BLOCK).min(len);
                let (b, kv) = (r1 - r0, r1);
                let s = &mut s[..b * kv];
                let q_blk = &qh[r0 * hd..r1 * hd];
                mm.run(s, q_blk, &kh[..kv * hd], (b, hd, kv), (false, true), 0.0);
                for (ii, row) in s.chunks_exact_mut(kv).enumerate() {
                    let (vis, masked) = row.split_at_mut(r0 + ii + 1);
                    let mx = fastmath::max(vis);
                    let sum = fastmath::exp_shift_sum(vis, mx);
                    let inv = (1.0 / sum) as f32;
                    vis.iter_mut().for_each(|x| *x *= inv);
                    masked.fill(0.0);
                    lh[r0 + ii] = (mx as f64 + sum.ln()) as f32;
                }
                let o_blk = &mut oh[r0 * hd..r1 * hd];
                mm.run(o_blk, s, &vh[..kv * hd], (b, kv, hd), (false, false), 0.0);
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
    let t = tokens(q, nh, hd)?;
    let width = nh * hd;
    check_len("attention k [T, nh·hd]", k.len(), t * width)?;
    check_len("attention v [T, nh·hd]", v.len(), t * width)?;
    check_len("attention o [T, nh·hd]", o.len(), t * width)?;
    check_len("attention d_o [T, nh·hd]", d_o.len(), t * width)?;
    check_len("attention saved lse [nh, T]", saved.lse.len(), nh * t)?;
    let pairs = pairs(&segments(cu_seqlens, t)?, nh);
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

    pairs.par_iter().for_each(|&(start, len, h)| {
        let head = Head {
            start,
            len,
            h,
            hd,
            width,
        };
        let lse = &saved.lse[h * t + start..h * t + start + len];
        let lh_len = len * hd;
        let blk = Q_BLOCK.min(len) * len;
        scratch(7 * lh_len + len + 2 * blk, |buf| {
            let (qh, buf) = head.gather(q, buf);
            let (kh, buf) = head.gather(k, buf);
            let (vh, buf) = head.gather(v, buf);
            let (doh, buf) = head.gather(d_o, buf);
            let (dqh, buf) = buf.split_at_mut(lh_len);
            let (dkh, buf) = buf.split_at_mut(lh_len);
            let (dvh, buf) = buf.split_at_mut(lh_len);
            let (d, buf) = buf.split_at_mut(len);
            let (p, dp) = buf.split_at_mut(blk);
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
            for r0 in (0..len).step_by(Q_BLOCK) {
                let r1 = (r0 + Q_BLOCK).min(len);
                let (b, kv) = (r1 - r0, r1);
                let (p, dp) = (&mut p[..b * kv], &mut dp[..b * kv]);
                let (q_blk, do_blk) = (&qh[r0 * hd..r1 * hd], &doh[r0 * hd..r1 * hd]);
                let (k_pre, v_pre) = (&kh[..kv * hd], &vh[..kv * hd]);
                // P = exp(S − L), zero where masked.
                mm.run(p, q_blk, k_pre, (b, hd, kv), (false, true), 0.0);
                for (ii, row) in p.chunks_exact_mut(kv).enumerate() {
                    let i = r0 + ii;
                    let (vis, masked) = row.split_at_mut(i + 1);
                    fastmath::exp_shift_scale(vis, lse[i], 1.0);
                    masked.fill(0.0);
                }
                // dV[0..kv] += Pᵀ·dO_blk
                mm.run(
                    &mut dvh[..kv * hd],
                    p,
                    do_blk,
                    (kv, b, hd),
                    (true, false),
                    1.0,
                );
                // dP = dO_blk·V[0..kv]ᵀ;  dS = P⊙(dP − D), in place of P.
                mm.run(dp, do_blk, v_pre, (b, hd, kv), (false, true), 0.0);
                let rows = p.chunks_exact_mut(kv).zip(dp.chunks_exact(kv));
                for ((prow, dprow), &di) in rows.zip(&d[r0..r1]) {
                    prow.iter_mut().zip(dprow).for_each(|(x, &y)| *x *= y - di);
                }
                // dQ_blk = dS·K[0..kv];  dK[0..kv] += dSᵀ·Q_blk
                mm.run(
                    &mut dqh[r0 * hd..r1 * hd],
                    p,
                    k_pre,
                    (b, kv, hd),
                    (false, false),
                    0.0,
                );
                mm.run(
                    &mut dkh[..kv * hd],
                    p,
                    q_blk,
                    (kv, b, hd),
                    (true, false),
                    1.0,
                );
            }
            for (out, g) in outs.iter().zip([&*dqh, &*dkh, &*dvh]) {
                // SAFETY: as in the forward, each pair is the only writer of its block.
                unsafe { head.scatter(out, g) };
            }
        });
    });
    Ok((dq, dk, dv))
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

/// The (start, len, head) work items, empty segments dropped, longest first so that rayon
/// starts the most expensive pairs early.
fn pairs(segs: &[(usize, usize)], nh: usize) -> Vec<(usize, usize, usize)> {
    let mut pairs: Vec<_> = segs
        .iter()
        .filter(|&&(_, len)| len > 0)
        .flat_map(|&(start, len)| (0..nh).map(move |h| (start, len, h)))
        .collect();
    pairs.sort_by_key(|&(start, len, h)| (std::cmp::Reverse(len), start, h));
    pairs
}
