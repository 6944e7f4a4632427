//! CPU references of causal self-attention over packed sequences, forward and backward, in
//! the layout of the flash-attention kernels: q, k and v are the column blocks of one `[T, 3H]`
//! tensor (head `h` at columns `h·hd` of each block), sequences are given by `cu_seqlens`.
//! Direct f64 formulas over materialised scores: no tiling, no online softmax.
//!
//! The `_masked` forms take a [`Keep`] predicate: key `j` is visible to query `i` (both
//! positions inside sequence `s`) under head `h` iff `j <= i` and `keep(s, h, i, j)`; the
//! softmax normalises over the visible keys (block-sparse attention's semantics).

/// Which causal keys a query keeps: `keep(sequence, head, query position, key position)`,
/// positions counted from the sequence's first token.
pub type Keep<'a> = &'a dyn Fn(usize, usize, usize, usize) -> bool;

const ALL: Keep<'static> = &|_, _, _, _| true;

/// The shapes shared by the attention references.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape<'a> {
    /// Sequence boundaries: `0 = c0 < c1 < ... = T`.
    pub cu_seqlens: &'a [usize],
    /// Heads.
    pub nh: usize,
    /// Head dimension.
    pub hd: usize,
    /// Softmax scale (`hd^-0.5` in OPT).
    pub scale: f64,
}

impl AttnShape<'_> {
    fn h(&self) -> usize {
        self.nh * self.hd
    }

    fn tokens(&self) -> usize {
        self.cu_seqlens.last().copied().unwrap_or(0)
    }

    /// `(token, head)` pairs' column in the `[T, 3H]` tensor for block `b` (0 q, 1 k, 2 v).
    fn at(&self, t: usize, b: usize, head: usize, d: usize) -> usize {
        t * 3 * self.h() + b * self.h() + head * self.hd + d
    }

    /// Probabilities `P[i][j]` (`j <= i`, 0 where `keep` drops the key) of sequence
    /// `seq = [c0, c1)` and head `head`, and the natural log-sum-exp of each row's kept scores.
    fn probs(
        &self,
        qkv: &[f32],
        (seq, c0, c1): (usize, usize, usize),
        head: usize,
        keep: Keep,
    ) -> (Vec<Vec<f64>>, Vec<f64>) {
        let mut p = Vec::with_capacity(c1 - c0);
        let mut lse = Vec::with_capacity(c1 - c0);
        for i in c0..c1 {
            let s: Vec<f64> = (c0..=i)
                .map(|j| {
                    if !keep(seq, head, i - c0, j - c0) {
                        return f64::NEG_INFINITY;
                    }
                    let dot: f64 = (0..self.hd)
                        .map(|d| {
                            f64::from(qkv[self.at(i, 0, head, d)])
                                * f64::from(qkv[self.at(j, 1, head, d)])
                        })
                        .sum();
                    dot * self.scale
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            p.push(s.iter().map(|v| (v - m).exp() / z).collect());
            lse.push(m + z.ln());
        }
        (p, lse)
    }
}

/// Forward: `o [T, H]` and `lse2 [nh, T]`, the base-2 log-sum-exp of each row's scores
/// (`log2 Σ_j exp(scale · q_i·k_j)`), which is what the kernel keeps.
pub fn attention_fwd(qkv: &[f32], sh: AttnShape) -> (Vec<f32>, Vec<f32>) {
    attention_fwd_masked(qkv, sh, ALL)
}

/// [`attention_fwd`] over the keys `keep` retains (module doc).
pub fn attention_fwd_masked(qkv: &[f32], sh: AttnShape, keep: Keep) -> (Vec<f32>, Vec<f32>) {
    let (t, h) = (sh.tokens(), sh.h());
    let mut o = vec![0f32; t * h];
    let mut lse2 = vec![0f32; sh.nh * t];
    for (seq, w) in sh.cu_seqlens.windows(2).enumerate() {
        let (c0, c1) = (w[0], w[1]);
        for head in 0..sh.nh {
            let (p, lse) = sh.probs(qkv, (seq, c0, c1), head, keep);
            for i in c0..c1 {
                lse2[head * t + i] = (lse[i - c0] * std::f64::consts::LOG2_E) as f32;
                for d in 0..sh.hd {
                    let v: f64 = (c0..=i)
                        .map(|j| p[i - c0][j - c0] * f64::from(qkv[sh.at(j, 2, head, d)]))
                        .sum();
                    o[i * h + head * sh.hd + d] = v as f32;
                }
            }
        }
    }
    (o, lse2)
}

/// Backward: from `d_o [T, H]`, the gradient `dqkv [T, 3H]` of the attention input
/// (`dS = P ⊙ (dP − rowsum(P ⊙ dP))`, `dq = scale·dS·k`, `dk = scale·dSᵀ·q`, `dv = Pᵀ·dO`).
pub fn attention_bwd(qkv: &[f32], d_o: &[f32], sh: AttnShape) -> Vec<f32> {
    attention_bwd_masked(qkv, d_o, sh, ALL)
}

/// [`attention_bwd`] over the keys `keep` retains (module doc): dropped keys get no gradient.
pub fn attention_bwd_masked(qkv: &[f32], d_o: &[f32], sh: AttnShape, keep: Keep) -> Vec<f32> {
    let (t, h) = (sh.tokens(), sh.h());
    let mut g = vec![0f64; t * 3 * h];
    for (seq, w) in sh.cu_seqlens.windows(2).enumerate() {
        let (c0, c1) = (w[0], w[1]);
        for head in 0..sh.nh {
            let (p, _) = sh.probs(qkv, (seq, c0, c1), head, keep);
            let dout = |i: usize, d: usize| f64::from(d_o[i * h + head * sh.hd + d]);
            for i in c0..c1 {
                let pi = &p[i - c0];
                let dp: Vec<f64> = (c0..=i)
                    .map(|j| {
                        (0..sh.hd)
                            .map(|d| dout(i, d) * f64::from(qkv[sh.at(j, 2, head, d)]))
                            .sum()
                    })
                    .collect();
                let delta: f64 = pi.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in c0..=i {
                    let pij = pi[j - c0];
                    let ds = pij * (dp[j - c0] - delta) * sh.scale;
                    for d in 0..sh.hd {
                        g[sh.at(i, 0, head, d)] += ds * f64::from(qkv[sh.at(j, 1, head, d)]);
                        g[sh.at(j, 1, head, d)] += ds * f64::from(qkv[sh.at(i, 0, head, d)]);
                        g[sh.at(j, 2, head, d)] += pij * dout(i, d);
                    }
                }
            }
        }
    }
    g.into_iter().map(|v| v as f32).collect()
}
