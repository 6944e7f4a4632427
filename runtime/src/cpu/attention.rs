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
//! contiguous `[len, hd]` copies and walks the queries in blocks of [`Q_BLOCK`] rows: a block
//! of rows `r0..r1` only sees keys `0..r1`, so the products skip most of the masked upper
//! triangle and the score buffer is `[Q_BLOCK, len]`, not `[len, len]`.

use gemm::Parallelism;
use rayon::prelude::*;

use super::error::check_len;
use super::matmul::{auto_parallelism, matmul_with};
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
    let segs = segments(cu_seqlens, t)?;
    let pairs = pairs(&segs, nh);
    let many = pairs.len() >= rayon::current_num_threads();

    let results: Vec<(Vec<f32>, Vec<f32>)> = pairs
        .par_iter()
        .map(|&(start, len, h)| {
            let par = |m, k, n| inner_parallelism(many, m, k, n);
            let qh = gather(q, start, len, h, hd, width);
            let kh = gather(k, start, len, h, hd, width);
            let vh = gather(v, start, len, h, hd, width);
            let mut oh = vec![0.0f32; len * hd];
            let mut lse = vec![0.0f32; len];
            let mut s = vec![0.0f32; Q_BLOCK.min(len) * len];
            for r0 in (0..len).step_by(Q_BLOCK) {
                let r1 = (r0 + Q_BLOCK).min(len);
                let (b, kv) = (r1 - r0, r1);
                let s = &mut s[..b * kv];
                let q_blk = &qh[r0 * hd..r1 * hd];
                matmul_with(
                    s,
                    q_blk,
                    &kh[..kv * hd],
                    b,
                    hd,
                    kv,
                    false,
                    true,
                    1.0,
                    0.0,
                    par(b, hd, kv),
                );
                for (ii, row) in s.chunks_exact_mut(kv).enumerate() {
                    let (vis, masked) = row.split_at_mut(r0 + ii + 1);
                    let mx = vis.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    let mut sum = 0.0f64;
                    for x in vis.iter_mut() {
                        *x = (*x - mx).exp();
                        sum += *x as f64;
                    }
                    let inv = (1.0 / sum) as f32;
                    vis.iter_mut().for_each(|x| *x *= inv);
                    masked.fill(0.0);
                    lse[r0 + ii] = (mx as f64 + sum.ln()) as f32;
                }
                let o_blk = &mut oh[r0 * hd..r1 * hd];
                matmul_with(
                    o_blk,
                    s,
                    &vh[..kv * hd],
                    b,
                    kv,
                    hd,
                    false,
                    false,
                    1.0,
                    0.0,
                    par(b, kv, hd),
                );
            }
            (oh, lse)
        })
        .collect();

    let mut o = vec![0.0f32; t * width];
    let mut lse = vec![0.0f32; nh * t];
    for (&(start, len, h), (oh, lh)) in pairs.iter().zip(&results) {
        scatter(&mut o, oh, start, len, h, hd, width);
        lse[h * t + start..h * t + start + len].copy_from_slice(lh);
    }
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
    let segs = segments(cu_seqlens, t)?;
    let pairs = pairs(&segs, nh);
    let many = pairs.len() >= rayon::current_num_threads();

    let results: Vec<[Vec<f32>; 3]> = pairs
        .par_iter()
        .map(|&(start, len, h)| {
            let par = |m, k, n| inner_parallelism(many, m, k, n);
            let qh = gather(q, start, len, h, hd, width);
            let kh = gather(k, start, len, h, hd, width);
            let vh = gather(v, start, len, h, hd, width);
            let oh = gather(o, start, len, h, hd, width);
            let doh = gather(d_o, start, len, h, hd, width);
            let lse = &saved.lse[h * t + start..h * t + start + len];
            let d: Vec<f32> = doh
                .chunks_exact(hd.max(1))
                .zip(oh.chunks_exact(hd.max(1)))
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .map(|(&x, &y)| x as f64 * y as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            let (mut dq, mut dk, mut dv) = (
                vec![0.0f32; len * hd],
                vec![0.0f32; len * hd],
                vec![0.0f32; len * hd],
            );
            let cap = Q_BLOCK.min(len) * len;
            let (mut p, mut dp) = (vec![0.0f32; cap], vec![0.0f32; cap]);
            for r0 in (0..len).step_by(Q_BLOCK) {
                let r1 = (r0 + Q_BLOCK).min(len);
                let (b, kv) = (r1 - r0, r1);
                let (p, dp) = (&mut p[..b * kv], &mut dp[..b * kv]);
                let (q_blk, do_blk) = (&qh[r0 * hd..r1 * hd], &doh[r0 * hd..r1 * hd]);
                let (k_pre, v_pre) = (&kh[..kv * hd], &vh[..kv * hd]);
                // P = exp(S − L), zero where masked.
                matmul_with(
                    p,
                    q_blk,
                    k_pre,
                    b,
                    hd,
                    kv,
                    false,
                    true,
                    1.0,
                    0.0,
                    par(b, hd, kv),
                );
                for (ii, row) in p.chunks_exact_mut(kv).enumerate() {
                    let i = r0 + ii;
                    let (vis, masked) = row.split_at_mut(i + 1);
                    vis.iter_mut().for_each(|x| *x = (*x - lse[i]).exp());
                    masked.fill(0.0);
                }
                // dV[0..kv] += Pᵀ·dO_blk
                matmul_with(
                    &mut dv[..kv * hd],
                    p,
                    do_blk,
                    kv,
                    b,
                    hd,
                    true,
                    false,
                    1.0,
                    1.0,
                    par(kv, b, hd),
                );
                // dP = dO_blk·V[0..kv]ᵀ;  dS = P⊙(dP − D), in place of P.
                matmul_with(
                    dp,
                    do_blk,
                    v_pre,
                    b,
                    hd,
                    kv,
                    false,
                    true,
                    1.0,
                    0.0,
                    par(b, hd, kv),
                );
                for (ii, (prow, dprow)) in
                    p.chunks_exact_mut(kv).zip(dp.chunks_exact(kv)).enumerate()
                {
                    let di = d[r0 + ii];
                    prow.iter_mut().zip(dprow).for_each(|(x, &y)| *x *= y - di);
                }
                // dQ_blk = dS·K[0..kv];  dK[0..kv] += dSᵀ·Q_blk
                matmul_with(
                    &mut dq[r0 * hd..r1 * hd],
                    p,
                    k_pre,
                    b,
                    kv,
                    hd,
                    false,
                    false,
                    1.0,
                    0.0,
                    par(b, kv, hd),
                );
                matmul_with(
                    &mut dk[..kv * hd],
                    p,
                    q_blk,
                    kv,
                    b,
                    hd,
                    true,
                    false,
                    1.0,
                    1.0,
                    par(kv, b, hd),
                );
            }
            [dq, dk, dv]
        })
        .collect();

    let mut grads = [
        vec![0.0f32; t * width],
        vec![0.0f32; t * width],
        vec![0.0f32; t * width],
    ];
    for (&(start, len, h), res) in pairs.iter().zip(&results) {
        for (g, r) in grads.iter_mut().zip(res) {
            scatter(g, r, start, len, h, hd, width);
        }
    }
    let [dq, dk, dv] = grads;
    Ok((dq, dk, dv))
}

/// Products inside one pair run single-threaded when there are at least as many pairs as
/// threads (the pairs already fill the pool), else they may use rayon themselves.
fn inner_parallelism(many_pairs: bool, m: usize, k: usize, n: usize) -> Parallelism {
    if many_pairs {
        Parallelism::None
    } else {
        auto_parallelism(m, k, n)
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

/// Rows `start..start+len` of head `h` of `src [T, width]` as a contiguous `[len, hd]` copy.
fn gather(src: &[f32], start: usize, len: usize, h: usize, hd: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len * hd);
    for r in start..start + len {
        out.extend_from_slice(&src[r * width + h * hd..r * width + (h + 1) * hd]);
    }
    out
}

/// The inverse of [`gather`]: writes `part [len, hd]` into head `h` of rows `start..` of `dst`.
fn scatter(
    dst: &mut [f32],
    part: &[f32],
    start: usize,
    len: usize,
    h: usize,
    hd: usize,
    width: usize,
) {
    if hd == 0 {
        return;
    }
    for (i, row) in part.chunks_exact(hd).enumerate().take(len) {
        let r = start + i;
        dst[r * width + h * hd..r * width + (h + 1) * hd].copy_from_slice(row);
    }
}
