//! The seam through which MLP exposure (DESIGN.md §7, MLP) reaches the CPU model: a
//! [`MlpHook`] sees each layer's ReLU activations (the *exposer* profiles them) and may
//! restrict `fc1`'s output to kept neuron blocks per row group (the *dynamic-aware operator*'s
//! semantics, [`MlpMask`]).
//!
//! Zeroing the activations outside the kept blocks is exactly what the block-sparse operators
//! compute: `fc1` evaluated only on kept (group, block) pairs with bias + ReLU fused, `fc2`
//! reducing over the kept blocks, and the backward's input gradients on kept blocks only (the
//! ReLU backward of a zeroed activation is zero). So the CPU model with a mask is the reference
//! the GPU operators are tested against, and the fallback that trains with exposure anywhere.

/// Kept neuron blocks of one layer's MLP, per row group of the packed batch.
///
/// Rows `g·group .. (g+1)·group` form group `g` (the last group may be short); neurons
/// `b·block .. (b+1)·block` form block `b`. `keep[g · num_blocks + b]` says whether group `g`
/// computes block `b`.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpMask {
    /// Rows per token group.
    pub group: usize,
    /// Neurons per block.
    pub block: usize,
    /// Blocks per row (`ffn / block`).
    pub num_blocks: usize,
    /// `[groups, num_blocks]`, row-major.
    pub keep: Vec<bool>,
}

impl MlpMask {
    /// A mask keeping everything, for `rows` rows and `ffn` neurons.
    pub fn dense(rows: usize, ffn: usize, group: usize, block: usize) -> MlpMask {
        let num_blocks = ffn / block;
        MlpMask {
            group,
            block,
            num_blocks,
            keep: vec![true; rows.div_ceil(group) * num_blocks],
        }
    }

    /// Number of row groups.
    pub fn groups(&self) -> usize {
        self.keep.len() / self.num_blocks.max(1)
    }

    /// Whether group `g` keeps block `b`.
    pub fn keeps(&self, g: usize, b: usize) -> bool {
        self.keep[g * self.num_blocks + b]
    }

    /// Share of (group, block) pairs kept.
    pub fn density(&self) -> f64 {
        if self.keep.is_empty() {
            return 1.0;
        }
        self.keep.iter().filter(|&&k| k).count() as f64 / self.keep.len() as f64
    }

    /// Zeroes the activations (`[rows, ffn]`) of the blocks a row's group does not keep.
    ///
    /// # Panics
    /// If the mask was made for a different shape (a programming error, not an input error).
    pub fn apply(&self, act: &mut [f32], rows: usize) {
        let ffn = self.num_blocks * self.block;
        assert_eq!(act.len(), rows * ffn, "MlpMask::apply: activation shape");
        assert_eq!(
            self.groups(),
            rows.div_ceil(self.group),
            "MlpMask::apply: groups"
        );
        for (r, row) in act.chunks_mut(ffn).enumerate() {
            let g = r / self.group;
            for (b, blk) in row.chunks_mut(self.block).enumerate() {
                if !self.keeps(g, b) {
                    blk.fill(0.0);
                }
            }
        }
    }
}

/// Per-layer MLP exposure: observation (the exposer) and block selection (the operator).
///
/// Both methods have do-nothing defaults, so a profiler implements only
/// [`observe`](Self::observe) and a sparse run only [`select`](Self::select).
pub trait MlpHook: Sync {
    /// The kept blocks of `layer` for this batch, given `fc1`'s input `ffn_in` (`[rows, H]`),
    /// or `None` to run the layer dense.
    fn select(&self, layer: usize, ffn_in: &[f32], rows: usize) -> Option<MlpMask> {
        let _ = (layer, ffn_in, rows);
        None
    }

    /// Sees `layer`'s dense ReLU output `act` (`[rows, F]`, before any mask) with `fc1`'s input
    /// and the mask [`select`](Self::select) returned (if any).
    fn observe(
        &self,
        layer: usize,
        ffn_in: &[f32],
        act: &[f32],
        rows: usize,
        mask: Option<&MlpMask>,
    ) {
        let _ = (layer, ffn_in, act, rows, mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_zeroes_exactly_the_dropped_blocks() {
        // 3 rows in groups of 2, 4 neurons in blocks of 2.
        let mask = MlpMask {
            group: 2,
            block: 2,
            num_blocks: 2,
            keep: vec![true, false, false, true],
        };
        let mut act: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        mask.apply(&mut act, 3);
        assert_eq!(act, vec![1., 2., 0., 0., 5., 6., 0., 0., 0., 0., 11., 12.]);
        assert_eq!(mask.density(), 0.5);
        assert_eq!(MlpMask::dense(3, 4, 2, 2).density(), 1.0);
    }
}
