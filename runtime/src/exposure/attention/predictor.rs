//! The attention block predictor (DESIGN.md §7, attention step 2): per layer and head a
//! low-rank scorer on block-pooled queries and keys,
//!
//! `score(qb, kb) = (q̄_qb·Wq)·(k̄_kb·Wk) + bias[bucket(qb, kb)]`,
//!
//! where `q̄` is the mean of the block's (scaled) queries, `k̄` the mean of the block's keys,
//! `Wq`, `Wk` are `[head_dim, r]` and the bias is learned per head over a few buckets of the
//! key block's distance to the diagonal (plus one bucket for the sequence's first block). The
//! predicted mass of a row is the softmax of its scores over the causal key blocks.
//!
//! Why this shape: the log of a block's attention mass is a log-sum-exp of `q·k` over the block,
//! which the pooled product approximates up to a per-block spread; `Wq·Wkᵀ` starts as a
//! Johnson–Lindenstrauss projection (`Wq = Wk = G/√r`, so the initial score is `≈ q̄·k̄`) and
//! training corrects the rest. What pooling cannot see — that a model's heads put mass near the
//! diagonal and on the first tokens whatever the content — the distance bias carries with a
//! handful of numbers. [`PredictorConfig::distance_bias`] switches it off to measure it (see
//! `bench/results/2026-11-29-devbox-attention-predictor.txt`).
//!
//! Training: cross-entropy between the softmax of a row's scores and the exact pooled mass
//! ([`super::maps`]), rows weighted by their queries, plain Adam in f32 on CPU.

use super::maps::{causal_range, head_slice, BlockMaps};
use crate::data::SplitMix64;
use crate::exposure::predictor::{softmax_inplace, Param};
use crate::model::AttentionInput;
use serde::{Deserialize, Serialize};

/// Buckets of the distance bias: diagonal, 1, 2, 3–4, 5–8, 9–16, 17–32, 33+ blocks before the
/// diagonal, and the sequence's first block (when it is not on the diagonal).
pub const BUCKETS: usize = 9;

/// The bias bucket of key block `kb` in a row whose diagonal starts at `lo`.
pub fn bucket(kb: usize, lo: usize) -> usize {
    if kb >= lo {
        return 0;
    }
    if kb == 0 {
        return BUCKETS - 1;
    }
    match lo - kb {
        1 => 1,
        2 => 2,
        3..=4 => 3,
        5..=8 => 4,
        9..=16 => 5,
        17..=32 => 6,
        _ => 7,
    }
}

/// Settings of a [`LayerPredictor`] and its training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictorConfig {
    /// Rank `r` of `Wq` and `Wk`, per head.
    pub rank: usize,
    /// Adam learning rate.
    pub lr: f32,
    /// Sequences (of one head) per Adam step; more are sampled down.
    pub batch_seqs: usize,
    /// Learn the per-head distance bias.
    pub distance_bias: bool,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            rank: 16,
            lr: 1e-2,
            batch_seqs: 64,
            distance_bias: true,
        }
    }
}

/// Per sequence and head: the block means `[blocks, head_dim]` of `x` (`[T, heads·head_dim]`),
/// indexed `s·heads + h`.
pub fn pool(x: &[f32], cu_seqlens: &[i32], heads: usize, d: usize, block: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for w in cu_seqlens.windows(2) {
        let (lo, hi) = (w[0].max(0) as usize, w[1].max(0) as usize);
        for h in 0..heads {
            let xs = head_slice(x, heads, d, h, lo, hi.max(lo));
            let mut pooled = Vec::with_capacity((hi - lo).div_ceil(block) * d);
            for chunk in xs.chunks(block * d) {
                let n = (chunk.len() / d) as f32;
                let mut mean = vec![0.0f32; d];
                for row in chunk.chunks(d) {
                    mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
                }
                pooled.extend(mean.iter().map(|m| m / n));
            }
            out.push(pooled);
        }
    }
    out
}

/// One sequence of one head as training data: pooled queries and keys, and per query block its
/// causal key-block masses and its query count.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadSeq {
    /// `[query blocks, d]`.
    pub q: Vec<f32>,
    /// `[key blocks, d]`.
    pub k: Vec<f32>,
    /// Per query block `(lo, hi)` ([`causal_range`]).
    pub ranges: Vec<(usize, usize)>,
    /// Per query block its queries.
    pub weights: Vec<f32>,
    /// Query block after query block, `hi` masses each.
    pub mass: Vec<f32>,
}

/// Training sequences of one layer, per head, at most `cap` per head (reservoir sampling
/// beyond it).
#[derive(Clone, Debug)]
pub struct AttnLabels {
    /// Per head.
    pub heads: Vec<Vec<HeadSeq>>,
    cap: usize,
    seen: u64,
    rng: SplitMix64,
}

impl AttnLabels {
    /// An empty set for `heads` heads.
    pub fn new(heads: usize, cap: usize, seed: u64) -> AttnLabels {
        AttnLabels {
            heads: vec![Vec::new(); heads],
            cap: cap.max(1),
            seen: 0,
            rng: SplitMix64::new(seed),
        }
    }

    /// Sequences held per head.
    pub fn len(&self) -> usize {
        self.heads.first().map_or(0, Vec::len)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds every sequence of a batch: its queries and keys, and its exact maps.
    pub fn push(&mut self, input: &AttentionInput<'_>, maps: &BlockMaps) {
        let (heads, d) = (input.heads, input.head_dim);
        let lay = &maps.layout;
        let pq = pool(input.q, input.cu_seqlens, heads, d, lay.q_block);
        let pk = pool(input.k, input.cu_seqlens, heads, d, lay.k_block);
        let mut first_row = 0;
        for (s, &len) in lay.lens.iter().enumerate() {
            let nqb = len.div_ceil(lay.q_block);
            self.seen += 1;
            let slot = if self.len() < self.cap {
                None
            } else {
                let j = (self.rng.next_u64() % self.seen) as usize;
                if j >= self.cap {
                    first_row += nqb * heads;
                    continue;
                }
                Some(j)
            };
            for h in 0..heads {
                let mut seq = HeadSeq {
                    q: pq[s * heads + h].clone(),
                    k: pk[s * heads + h].clone(),
                    ranges: Vec::with_capacity(nqb),
                    weights: Vec::with_capacity(nqb),
                    mass: Vec::new(),
                };
                for qb in 0..nqb {
                    let r = first_row + qb * heads + h;
                    seq.ranges.push(lay.range(r));
                    seq.weights.push(lay.queries(r) as f32);
                    seq.mass.extend_from_slice(maps.row(r));
                }
                match slot {
                    None => self.heads[h].push(seq),
                    Some(j) => self.heads[h][j] = seq,
                }
            }
            first_row += nqb * heads;
        }
    }
}

/// One head's scorer.
#[derive(Clone, Debug)]
struct HeadScorer {
    wq: Param,
    wk: Param,
    bias: Param,
}

/// Gradients of one head's parameters.
struct Grads {
    wq: Vec<f32>,
    wk: Vec<f32>,
    bias: Vec<f32>,
}

/// One layer's scorers, one per head (see the module docs).
#[derive(Clone, Debug)]
pub struct LayerPredictor {
    /// Width of a head.
    pub head_dim: usize,
    /// Settings.
    pub config: PredictorConfig,
    heads: Vec<HeadScorer>,
    t: i32,
}

/// `[n, d]·[d, r]`.
fn project(x: &[f32], w: &[f32], d: usize, r: usize) -> Vec<f32> {
    let n = x.len() / d.max(1);
    let mut out = vec![0.0f32; n * r];
    for i in 0..n {
        for c in 0..d {
            let v = x[i * d + c];
            for (o, wv) in out[i * r..(i + 1) * r]
                .iter_mut()
                .zip(&w[c * r..(c + 1) * r])
            {
                *o += v * wv;
            }
        }
    }
    out
}

impl LayerPredictor {
    /// Fresh scorers for `heads` heads of width `head_dim` (see the module docs for the init).
    pub fn new(heads: usize, head_dim: usize, config: PredictorConfig, seed: u64) -> Self {
        let r = config.rank.max(1);
        let mut rng = SplitMix64::new(seed);
        let heads = (0..heads)
            .map(|_| {
                // Uniform with unit variance, scaled by 1/√r: E[W·Wᵀ] = I.
                let a = 3f32.sqrt() / (r as f32).sqrt();
                let g: Vec<f32> = (0..head_dim * r)
                    .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a)
                    .collect();
                HeadScorer {
                    wq: Param::new(g.clone()),
                    wk: Param::new(g),
                    bias: Param::new(vec![0.0; BUCKETS]),
                }
            })
            .collect();
        LayerPredictor {
            head_dim,
            config,
            heads,
            t: 0,
        }
    }

    fn rank(&self) -> usize {
        self.config.rank.max(1)
    }

    /// Predicted masses of one sequence of head `h`: per query block, a softmax over its causal
    /// key blocks, query block after query block.
    fn seq_probs(&self, h: usize, q: &[f32], k: &[f32], ranges: &[(usize, usize)]) -> Vec<f32> {
        let (d, r) = (self.head_dim, self.rank());
        let hs = &self.heads[h];
        let a = project(q, &hs.wq.w, d, r);
        let b = project(k, &hs.wk.w, d, r);
        let mut out = Vec::new();
        for (qb, &(lo, hi)) in ranges.iter().enumerate() {
            let start = out.len();
            let aq = &a[qb * r..(qb + 1) * r];
            for kb in 0..hi {
                let dot: f32 = aq
                    .iter()
                    .zip(&b[kb * r..(kb + 1) * r])
                    .map(|(x, y)| x * y)
                    .sum();
                let bias = if self.config.distance_bias {
                    hs.bias.w[bucket(kb, lo)]
                } else {
                    0.0
                };
                out.push(dot + bias);
            }
            softmax_inplace(&mut out[start..]);
        }
        out
    }

    /// Predicted masses for a batch, laid out as [`BlockMaps`] of the same batch (one entry per
    /// causal block of every (sequence, query block, head) row).
    pub fn predict(&self, input: &AttentionInput<'_>, q_block: usize, k_block: usize) -> Vec<f32> {
        let (heads, d) = (input.heads, input.head_dim);
        let pq = pool(input.q, input.cu_seqlens, heads, d, q_block);
        let pk = pool(input.k, input.cu_seqlens, heads, d, k_block);
        let lens: Vec<usize> = input
            .cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]).max(0) as usize)
            .collect();
        let mut out = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            let ranges: Vec<(usize, usize)> = (0..len.div_ceil(q_block))
                .map(|qb| causal_range(qb, len, q_block, k_block))
                .collect();
            let per: Vec<Vec<f32>> = (0..heads)
                .map(|h| self.seq_probs(h, &pq[s * heads + h], &pk[s * heads + h], &ranges))
                .collect();
            let mut at = vec![0usize; heads];
            for &(_, hi) in &ranges {
                for h in 0..heads {
                    out.extend_from_slice(&per[h][at[h]..at[h] + hi]);
                    at[h] += hi;
                }
            }
        }
        out
    }

    /// Weighted cross-entropy minus the labels' entropy (the KL divergence, ≥ 0) of head `h` on
    /// `seqs`, and its gradients.
    fn loss_grads(&self, h: usize, seqs: &[&HeadSeq]) -> (f64, Grads) {
        let (d, r) = (self.head_dim, self.rank());
        let hs = &self.heads[h];
        let mut g = Grads {
            wq: vec![0.0; d * r],
            wk: vec![0.0; d * r],
            bias: vec![0.0; BUCKETS],
        };
        let total_w: f64 = seqs
            .iter()
            .flat_map(|s| &s.weights)
            .map(|&w| w as f64)
            .sum();
        if total_w <= 0.0 {
            return (0.0, g);
        }
        let mut loss = 0.0f64;
        for seq in seqs {
            let a = project(&seq.q, &hs.wq.w, d, r);
            let b = project(&seq.k, &hs.wk.w, d, r);
            let p = self.seq_probs(h, &seq.q, &seq.k, &seq.ranges);
            let (mut da, mut db) = (vec![0.0f32; a.len()], vec![0.0f32; b.len()]);
            let mut at = 0;
            for (qb, &(lo, hi)) in seq.ranges.iter().enumerate() {
                let w = seq.weights[qb] as f64 / total_w;
                for kb in 0..hi {
                    let (pv, mv) = (p[at + kb] as f64, seq.mass[at + kb] as f64);
                    if mv > 0.0 {
                        loss += w * mv * (mv.ln() - pv.max(1e-30).ln());
                    }
                    let gz = (w * (pv - mv)) as f32;
                    for c in 0..r {
                        da[qb * r + c] += gz * b[kb * r + c];
                        db[kb * r + c] += gz * a[qb * r + c];
                    }
                    if self.config.distance_bias {
                        g.bias[bucket(kb, lo)] += gz;
                    }
                }
                at += hi;
            }
            // dW = Xᵀ·dProjection.
            for (x, dp, gw) in [(&seq.q, &da, &mut g.wq), (&seq.k, &db, &mut g.wk)] {
                for (i, row) in x.chunks(d).enumerate() {
                    for c in 0..d {
                        let v = row[c];
                        for (o, dv) in gw[c * r..(c + 1) * r]
                            .iter_mut()
                            .zip(&dp[i * r..(i + 1) * r])
                        {
                            *o += v * dv;
                        }
                    }
                }
            }
        }
        (loss, g)
    }

    /// Mean KL divergence (labels ‖ prediction) over `labels`' rows, weighted by queries.
    pub fn loss(&self, labels: &AttnLabels) -> f64 {
        let n = labels.heads.len().min(self.heads.len()).max(1);
        (0..labels.heads.len().min(self.heads.len()))
            .map(|h| {
                let seqs: Vec<&HeadSeq> = labels.heads[h].iter().collect();
                self.loss_grads(h, &seqs).0
            })
            .sum::<f64>()
            / n as f64
    }

    /// `steps` Adam steps of every head on `labels` (each step on up to `batch_seqs` sequences
    /// drawn with `rng`); the mean KL of the last step over the heads.
    pub fn fit(&mut self, labels: &AttnLabels, steps: usize, rng: &mut SplitMix64) -> f32 {
        let mut last = 0.0f64;
        let heads = labels.heads.len().min(self.heads.len());
        for _ in 0..steps {
            self.t += 1;
            let mut sum = 0.0;
            for h in 0..heads {
                let all = &labels.heads[h];
                if all.is_empty() {
                    continue;
                }
                let seqs: Vec<&HeadSeq> = if all.len() <= self.config.batch_seqs {
                    all.iter().collect()
                } else {
                    (0..self.config.batch_seqs)
                        .map(|_| &all[rng.below(all.len() as u64) as usize])
                        .collect()
                };
                let (l, g) = self.loss_grads(h, &seqs);
                sum += l;
                let (lr, t) = (self.config.lr, self.t);
                let hs = &mut self.heads[h];
                hs.wq.adam(&g.wq, lr, t);
                hs.wk.adam(&g.wk, lr, t);
                if self.config.distance_bias {
                    hs.bias.adam(&g.bias, lr, t);
                }
            }
            last = sum / heads.max(1) as f64;
        }
        last as f32
    }
}

#[cfg(test)]
mod tests {
    use super::super::maps::block_maps;
    use super::*;

    fn random(n: usize, scale: f32, rng: &mut SplitMix64) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Queries and keys with planted structure: head 0 attends to a few "topic" keys, head 1
    /// mostly to the first block (a sink), plus noise.
    fn planted(t: usize, heads: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = SplitMix64::new(seed);
        let mut q = random(t * heads * d, 0.3, &mut rng);
        let mut k = random(t * heads * d, 0.3, &mut rng);
        // The same topic for every seed: held-out data comes from the same process.
        let topic = random(d, 1.0, &mut SplitMix64::new(1234));
        for i in 0..t {
            let w = heads * d;
            // Head 0: every third 16-key block carries the topic, queries look for it.
            if (i / 16) % 3 == 1 {
                for c in 0..d {
                    k[i * w + c] += 1.5 * topic[c];
                }
            }
            for c in 0..d {
                q[i * w + c] += 1.5 * topic[c];
            }
            // Head 1: the first 16 keys share a direction every query matches.
            if i < 16 {
                for c in 0..d {
                    k[i * w + d + c] += 2.0;
                }
            }
            for c in 0..d {
                q[i * w + d + c] += 0.5;
            }
        }
        (q, k)
    }

    fn param_mut(m: &mut LayerPredictor, h: usize, which: usize, i: usize) -> &mut f32 {
        let hs = &mut m.heads[h];
        match which {
            0 => &mut hs.wq.w[i],
            1 => &mut hs.wk.w[i],
            _ => &mut hs.bias.w[i],
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (heads, d, t) = (2, 6, 96);
        let cu = [0i32, 60, 96];
        let (q, k) = planted(t, heads, d, 5);
        let input = AttentionInput {
            q: &q,
            k: &k,
            cu_seqlens: &cu,
            heads,
            head_dim: d,
        };
        let maps = block_maps(&input, 16, 8);
        let mut labels = AttnLabels::new(heads, 100, 1);
        labels.push(&input, &maps);
        assert_eq!(labels.len(), 2);
        let cfg = PredictorConfig {
            rank: 3,
            ..Default::default()
        };
        let mut p = LayerPredictor::new(heads, d, cfg, 9);
        p.heads[1].bias.w = random(BUCKETS, 0.5, &mut SplitMix64::new(2));
        let h = 1;
        let seqs: Vec<&HeadSeq> = labels.heads[h].iter().collect();
        let (_, g) = p.loss_grads(h, &seqs);
        let eps = 1e-3f32;
        let check = |which: usize, i: usize, analytic: f32| {
            let mut plus = p.clone();
            let mut minus = p.clone();
            *param_mut(&mut plus, h, which, i) += eps;
            *param_mut(&mut minus, h, which, i) -= eps;
            let fd =
                (plus.loss_grads(h, &seqs).0 - minus.loss_grads(h, &seqs).0) / (2.0 * eps as f64);
            assert!(
                (fd - analytic as f64).abs() < 2e-3 + 0.02 * fd.abs(),
                "param {which}[{i}]: fd {fd} vs {analytic}"
            );
        };
        for i in [0, 4, 11, 17] {
            check(0, i, g.wq[i]);
            check(1, i, g.wk[i]);
        }
        for i in [0, 1, 2, BUCKETS - 1] {
            check(2, i, g.bias[i]);
        }
    }

    #[test]
    fn training_lowers_the_loss_and_predictions_are_row_softmaxes() {
        let (heads, d) = (2, 16);
        let train_cu: Vec<i32> = (0..=8).map(|i| i * 256).collect();
        let (q, k) = planted(2048, heads, d, 11);
        let input = AttentionInput {
            q: &q,
            k: &k,
            cu_seqlens: &train_cu,
            heads,
            head_dim: d,
        };
        let maps = block_maps(&input, 32, 16);
        let mut labels = AttnLabels::new(heads, 100, 1);
        labels.push(&input, &maps);
        let mut p = LayerPredictor::new(heads, d, PredictorConfig::default(), 3);
        let before = p.loss(&labels);
        let fitted = p.fit(&labels, 150, &mut SplitMix64::new(4));
        let after = p.loss(&labels);
        assert!(
            fitted.is_finite() && after < 0.5 * before,
            "{before} -> {after}"
        );
        // Held-out sequence from the same process: the loss falls there too.
        let (q2, k2) = planted(256, heads, d, 99);
        let cu2 = [0i32, 256];
        let input2 = AttentionInput {
            q: &q2,
            k: &k2,
            cu_seqlens: &cu2,
            heads,
            head_dim: d,
        };
        let maps2 = block_maps(&input2, 32, 16);
        let mut held = AttnLabels::new(heads, 10, 1);
        held.push(&input2, &maps2);
        let fresh = LayerPredictor::new(heads, d, PredictorConfig::default(), 3);
        let (lh, lf) = (p.loss(&held), fresh.loss(&held));
        assert!(lh < 0.7 * lf, "held-out {lf} -> {lh}");
        let pred = p.predict(&input2, 32, 16);
        assert_eq!(pred.len(), maps2.layout.entries());
        for r in 0..maps2.layout.rows() {
            let s: f32 = pred[maps2.layout.offsets[r]..maps2.layout.offsets[r + 1]]
                .iter()
                .sum();
            assert!((s - 1.0).abs() < 1e-4);
        }
        // Deterministic: same seed, same result.
        let mut p2 = LayerPredictor::new(heads, d, PredictorConfig::default(), 3);
        p2.fit(&labels, 150, &mut SplitMix64::new(4));
        assert_eq!(p2.predict(&input2, 32, 16), pred);
    }
}
