//! The seam through which attention exposure (DESIGN.md §7, attention) reaches the model: an
//! [`AttentionHook`] sees each layer's queries and keys (the *exposer* profiles them, the
//! *predictor* scores blocks from them) and may restrict every (sequence, query block, head) to
//! a list of kept key blocks ([`AttentionMask`], the block-sparse flash attention's semantics).
//!
//! A kept block is computed exactly; a dropped block's scores are −∞ (its probabilities are 0
//! and it gets no gradient). The softmax normalises over the kept keys only. Given the mask, the
//! backward is exact. So the CPU attention with a mask is the reference the block-sparse GPU
//! kernels are tested against, and the fallback that trains with attention exposure anywhere.
//!
//! Blocks are counted from each sequence's first token: query block `qb` holds positions
//! `qb·q_block .. (qb+1)·q_block` of its sequence, key block `kb` positions
//! `kb·k_block .. (kb+1)·k_block`. The GPU kernels take `q_block = 128`, `k_block = 128`
//! ([`GPU_Q_BLOCK`], [`GPU_K_BLOCK`]).

use std::fmt;

/// Query rows per block of the GPU's block-sparse flash attention.
pub const GPU_Q_BLOCK: usize = 128;
/// Keys per block of the GPU's block-sparse flash attention.
pub const GPU_K_BLOCK: usize = 128;

/// Kept key blocks per (sequence, query block, head) of one layer's attention.
///
/// Rows are ordered sequence-major, then query block, then head: row
/// [`row`](Self::row)`(s, qb, h)`. Row `r` keeps the key blocks
/// `keys[offsets[r] .. offsets[r + 1]]`, ascending and sequence-relative.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionMask {
    /// Query rows per block.
    pub q_block: usize,
    /// Keys per block.
    pub k_block: usize,
    /// Attention heads.
    pub heads: usize,
    /// Sequence lengths, in packing order (from `cu_seqlens`).
    pub lens: Vec<usize>,
    /// `[rows + 1]` start of each row in `keys`.
    pub offsets: Vec<usize>,
    /// Kept key-block ids, row after row.
    pub keys: Vec<u32>,
}

/// Why an [`AttentionMask`] does not fit a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskError(pub String);

impl fmt::Display for MaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attention mask: {}", self.0)
    }
}

impl std::error::Error for MaskError {}

impl AttentionMask {
    /// The mask whose row `(s, qb, h)` keeps the causal key blocks `kb` with
    /// `keep(s, qb, h, kb)`, plus always the *diagonal* blocks (those holding the block's own
    /// positions), so that every query sees at least itself.
    pub fn from_fn(
        cu_seqlens: &[i32],
        heads: usize,
        q_block: usize,
        k_block: usize,
        mut keep: impl FnMut(usize, usize, usize, usize) -> bool,
    ) -> AttentionMask {
        let lens = seq_lens(cu_seqlens);
        let (mut offsets, mut keys) = (vec![0], vec![]);
        for (s, &len) in lens.iter().enumerate() {
            for qb in 0..len.div_ceil(q_block) {
                let (diag_lo, diag_hi) = diagonal(qb, len, q_block, k_block);
                for h in 0..heads {
                    for kb in 0..diag_hi {
                        if kb >= diag_lo || keep(s, qb, h, kb) {
                            keys.push(kb as u32);
                        }
                    }
                    offsets.push(keys.len());
                }
            }
        }
        AttentionMask {
            q_block,
            k_block,
            heads,
            lens,
            offsets,
            keys,
        }
    }

    /// The mask keeping every causal block: dense causal attention.
    pub fn dense(cu_seqlens: &[i32], heads: usize, q_block: usize, k_block: usize) -> Self {
        AttentionMask::from_fn(cu_seqlens, heads, q_block, k_block, |_, _, _, _| true)
    }

    /// Number of rows (sequence, query block, head).
    pub fn num_rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The row of sequence `s`, query block `qb`, head `h`.
    ///
    /// # Panics
    /// If `s` or `qb` is out of range (a programming error).
    pub fn row(&self, s: usize, qb: usize, h: usize) -> usize {
        let before: usize = self.lens[..s]
            .iter()
            .map(|l| l.div_ceil(self.q_block))
            .sum();
        assert!(qb < self.lens[s].div_ceil(self.q_block), "query block");
        (before + qb) * self.heads + h
    }

    /// The kept key blocks of row `r`.
    pub fn kept(&self, r: usize) -> &[u32] {
        &self.keys[self.offsets[r]..self.offsets[r + 1]]
    }

    /// Kept blocks over the causal blocks dense attention visits (1.0 for a dense mask).
    pub fn density(&self) -> f64 {
        let causal = self.causal_blocks();
        if causal == 0 {
            1.0
        } else {
            self.keys.len() as f64 / causal as f64
        }
    }

    /// Number of (query block, key block, head) triples dense causal attention visits.
    pub fn causal_blocks(&self) -> usize {
        self.lens
            .iter()
            .map(|&len| {
                (0..len.div_ceil(self.q_block))
                    .map(|qb| diagonal(qb, len, self.q_block, self.k_block).1)
                    .sum::<usize>()
            })
            .sum::<usize>()
            * self.heads
    }

    /// Checks that the mask fits `cu_seqlens` and `heads`: one row per (sequence, query block,
    /// head), ids ascending and causal, the diagonal blocks present.
    ///
    /// # Errors
    /// [`MaskError`] naming the first row that breaks a rule.
    pub fn validate(&self, cu_seqlens: &[i32], heads: usize) -> Result<(), MaskError> {
        let lens = seq_lens(cu_seqlens);
        if lens != self.lens || heads != self.heads {
            return Err(MaskError(format!(
                "made for {} heads and sequence lengths {:?}, the batch has {heads} heads and {:?}",
                self.heads, self.lens, lens
            )));
        }
        if self.q_block == 0 || self.k_block == 0 {
            return Err(MaskError("zero block size".into()));
        }
        let rows: usize = lens.iter().map(|l| l.div_ceil(self.q_block)).sum::<usize>() * heads;
        if self.num_rows() != rows || self.offsets.first() != Some(&0) {
            return Err(MaskError(format!(
                "{} rows, the batch needs {rows}",
                self.num_rows()
            )));
        }
        if self.offsets.windows(2).any(|w| w[1] < w[0]) || self.offsets[rows] != self.keys.len() {
            return Err(MaskError(
                "offsets are not a running sum of the keys".into(),
            ));
        }
        for (s, &len) in lens.iter().enumerate() {
            for qb in 0..len.div_ceil(self.q_block) {
                let (lo, hi) = diagonal(qb, len, self.q_block, self.k_block);
                for h in 0..heads {
                    let kept = self.kept(self.row(s, qb, h));
                    let here = || format!("sequence {s}, query block {qb}, head {h}");
                    if kept.windows(2).any(|w| w[1] <= w[0]) {
                        return Err(MaskError(format!("{}: ids not ascending", here())));
                    }
                    if kept.last().is_some_and(|&k| k as usize >= hi) {
                        return Err(MaskError(format!(
                            "{}: a block past the causal range",
                            here()
                        )));
                    }
                    if !(lo..hi).all(|d| kept.contains(&(d as u32))) {
                        return Err(MaskError(format!(
                            "{}: a diagonal block is missing",
                            here()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The mask as the CPU attention takes it ([`crate::cpu::KeyBlocks`], same layout, arrays
    /// borrowed): `cpu` does not depend on `model`, so the mask lends its arrays.
    pub fn key_blocks(&self) -> crate::cpu::KeyBlocks<'_> {
        crate::cpu::KeyBlocks {
            q_block: self.q_block,
            k_block: self.k_block,
            heads: self.heads,
            offsets: &self.offsets,
            keys: &self.keys,
        }
    }

    /// Whether query position `i` of sequence `s` sees key position `j` under head `h` (causal
    /// and kept).
    pub fn visible(&self, s: usize, h: usize, i: usize, j: usize) -> bool {
        j <= i
            && self
                .kept(self.row(s, i / self.q_block, h))
                .binary_search(&((j / self.k_block) as u32))
                .is_ok()
    }
}

/// The lengths of the sequences of `cu_seqlens` (`[0, …, T]`, non-decreasing; a malformed
/// array gives lengths the batch check rejects elsewhere).
fn seq_lens(cu_seqlens: &[i32]) -> Vec<usize> {
    cu_seqlens
        .windows(2)
        .map(|w| (w[1] - w[0]).max(0) as usize)
        .collect()
}

/// `(lo, hi)`: query block `qb` of a `len`-token sequence sees key blocks `0..hi` causally, and
/// `lo..hi` hold its own positions (the diagonal).
fn diagonal(qb: usize, len: usize, q_block: usize, k_block: usize) -> (usize, usize) {
    let (first, end) = (qb * q_block, ((qb + 1) * q_block).min(len));
    (first / k_block, end.div_ceil(k_block))
}

/// What an [`AttentionHook`] sees of one layer: the scaled queries and the keys of a packed
/// batch, `[T, heads·head_dim]` each, head `h` in columns `h·head_dim ..`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionInput<'a> {
    /// Queries, already multiplied by `head_dim^-0.5` (so the scores are `q·kᵀ`).
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Sequence boundaries of the packed batch.
    pub cu_seqlens: &'a [i32],
    /// Attention heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Per-layer attention exposure: observation (the exposer) and block selection (the operator).
///
/// Both methods have do-nothing defaults, so a profiler implements only
/// [`observe`](Self::observe) and a sparse run only [`select`](Self::select).
pub trait AttentionHook: Sync {
    /// The kept key blocks of `layer` for this batch, or `None` to run the layer dense.
    fn select(&self, layer: usize, input: AttentionInput<'_>) -> Option<AttentionMask> {
        let _ = (layer, input);
        None
    }

    /// Sees `layer`'s queries and keys with the mask [`select`](Self::select) returned (if any).
    fn observe(&self, layer: usize, input: AttentionInput<'_>, mask: Option<&AttentionMask>) {
        let _ = (layer, input, mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_blocks_are_always_kept_and_density_counts_causal_blocks() {
        // One sequence of 300 tokens: query blocks of 128 (3), key blocks of 64 (5).
        let cu = [0, 300];
        let none = AttentionMask::from_fn(&cu, 2, 128, 64, |_, _, _, _| false);
        assert_eq!(none.num_rows(), 6);
        // qb 0 sees kb 0..2 (diag 0,1); qb 1: 0..4 (diag 2,3); qb 2: 0..5 (diag 4).
        assert_eq!(none.kept(none.row(0, 0, 1)), &[0, 1]);
        assert_eq!(none.kept(none.row(0, 1, 0)), &[2, 3]);
        assert_eq!(none.kept(none.row(0, 2, 0)), &[4]);
        let dense = AttentionMask::dense(&cu, 2, 128, 64);
        assert_eq!(dense.causal_blocks(), (2 + 4 + 5) * 2);
        assert_eq!(dense.density(), 1.0);
        assert!((none.density() - 5.0 / 11.0).abs() < 1e-12);
        dense.validate(&cu, 2).unwrap();
        none.validate(&cu, 2).unwrap();
        assert!(dense.visible(0, 1, 299, 0) && !none.visible(0, 1, 299, 0));
        assert!(!dense.visible(0, 0, 10, 11), "causal");
    }

    #[test]
    fn validate_names_the_broken_row() {
        let cu = [0, 100, 228];
        let mut m = AttentionMask::dense(&cu, 1, 64, 64);
        m.validate(&cu, 1).unwrap();
        // Sequence 1 (128 tokens), query block 1 keeps [0, 1]; drop its diagonal block 1.
        let r = m.row(1, 1, 0);
        let at = m.offsets[r] + 1;
        m.keys.remove(at);
        for o in &mut m.offsets[r + 1..] {
            *o -= 1;
        }
        let e = m.validate(&cu, 1).unwrap_err().to_string();
        assert!(
            e.contains("sequence 1, query block 1, head 0") && e.contains("diagonal"),
            "{e}"
        );
        assert!(m.validate(&cu, 2).is_err(), "head count");
    }
}
