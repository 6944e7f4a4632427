//! Packing examples into token-budgeted micro-batches (RUNTIME §5.3, DESIGN 6).
//!
//! A [`PackedBatch`] is one token stream: sequences back to back, `cu_seqlens` marking their
//! boundaries for varlen attention, positions restarting at 0 per sequence (OPT adds 2 when
//! indexing its position table), and targets already shifted so that position `t` is scored
//! against token `t + 1` of the same sequence. Nothing is padded: a batch is as long as the
//! sequences it holds, at most the budget.

use super::{DataError, Example, Result};

/// The target value of positions that are not scored (HF's ignore index).
pub const IGNORE_INDEX: i32 = -100;

/// One packed micro-batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedBatch {
    /// Token ids of all sequences, concatenated.
    pub input_ids: Vec<u32>,
    /// Position of each token within its own sequence (0-based; OPT's embedding row is `p + 2`).
    pub position_ids: Vec<u32>,
    /// Next-token target of each position, or [`IGNORE_INDEX`]: `input_ids[t + 1]` when `t + 1`
    /// is in the same sequence and in its loss mask. The last token of every sequence (and
    /// every prompt position but the last) is ignored.
    pub targets: Vec<i32>,
    /// `[0, l0, l0 + l1, …, total]` (int32, as flash-attention's varlen kernels take them).
    pub cu_seqlens: Vec<i32>,
    /// Which examples (indices into the slice given to [`pack`]) are in the batch, in order.
    pub examples: Vec<usize>,
}

impl PackedBatch {
    /// Tokens in the stream.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Sequences in the stream.
    pub fn num_sequences(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Positions with a target: the loss's `N` for this batch (sum over every micro-batch of
    /// an optimizer step before dividing, RUNTIME §2.5).
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Length of the longest sequence (flash-attention's `max_seqlen`).
    pub fn max_seqlen(&self) -> usize {
        self.cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Appends one sequence. The caller has checked that it is non-empty, fits `i32`
    /// offsets, and has ids that fit `i32` targets.
    fn push(&mut self, index: usize, example: &Example) {
        for (t, &id) in example.ids.iter().enumerate() {
            let next = t + 1;
            let target = match (example.ids.get(next), example.loss_mask.get(next)) {
                (Some(&next_id), Some(true)) => next_id as i32,
                _ => IGNORE_INDEX,
            };
            self.input_ids.push(id);
            self.position_ids.push(t as u32);
            self.targets.push(target);
        }
        if self.cu_seqlens.is_empty() {
            self.cu_seqlens.push(0);
        }
        self.cu_seqlens.push(self.input_ids.len() as i32);
        self.examples.push(index);
    }
}

/// Packs `examples[order[0]], examples[order[1]], …` greedily, in that order, into batches of
/// at most `token_budget` tokens: a batch is closed when the next example does not fit. The
/// order is kept (shuffle it first with [`epoch_order`](super::epoch_order)), so the result is
/// deterministic. Errors: a zero or oversized budget, an index out of range, an empty example,
/// an example longer than the budget, or a token id beyond `i32`.
pub fn pack(
    examples: &[Example],
    order: &[usize],
    token_budget: usize,
) -> Result<Vec<PackedBatch>> {
    if token_budget == 0 || i32::try_from(token_budget).is_err() {
        return Err(DataError::InvalidBudget(token_budget));
    }
    let mut batches = Vec::new();
    let mut current = PackedBatch::default();
    for &index in order {
        let example = examples.get(index).ok_or(DataError::IndexOutOfRange {
            index,
            len: examples.len(),
        })?;
        let len = example.ids.len();
        if len == 0 {
            return Err(DataError::EmptyExample { index });
        }
        if len > token_budget {
            return Err(DataError::ExampleTooLong {
                index,
                len,
                budget: token_budget,
            });
        }
        if let Some(&id) = example.ids.iter().find(|&&id| i32::try_from(id).is_err()) {
            return Err(DataError::TokenIdTooLarge { id, index });
        }
        if current.num_tokens() + len > token_budget {
            batches.push(std::mem::take(&mut current));
        }
        current.push(index, example);
    }
    if current.num_sequences() > 0 {
        batches.push(current);
    }
    Ok(batches)
}

/// Fraction of the budget the batches fill: tokens / (batches × budget); 1.0 is no waste.
pub fn packing_efficiency(batches: &[PackedBatch], token_budget: usize) -> f64 {
    if batches.is_empty() || token_budget == 0 {
        return 0.0;
    }
    let tokens: usize = batches.iter().map(PackedBatch::num_tokens).sum();
    tokens as f64 / (batches.len() * token_budget) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Shape;

    fn example(prompt: &[u32], completion: &[u32]) -> Example {
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(completion);
        let mut loss_mask = vec![false; prompt.len()];
        loss_mask.resize(ids.len(), true);
        Example {
            ids,
            loss_mask,
            line: 1,
            shape: Shape::PreTokenized,
            group: 0,
        }
    }

    #[test]
    fn one_batch_layout() {
        let ex = [
            example(&[2, 10, 11], &[12, 2]),
            example(&[2, 20], &[21, 22, 2]),
        ];
        let b = pack(&ex, &[1, 0], 16).unwrap();
        assert_eq!(b.len(), 1);
        let b = &b[0];
        assert_eq!(b.input_ids, [2, 20, 21, 22, 2, 2, 10, 11, 12, 2]);
        assert_eq!(b.position_ids, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
        let i = IGNORE_INDEX;
        assert_eq!(b.targets, [i, 21, 22, 2, i, i, i, 12, 2, i]);
        assert_eq!(b.cu_seqlens, [0, 5, 10]);
        assert_eq!(b.examples, [1, 0]);
        assert_eq!(
            (b.num_sequences(), b.num_targets(), b.max_seqlen()),
            (2, 5, 5)
        );
    }

    #[test]
    fn budgets_are_respected_in_order() {
        let ex: Vec<Example> = [3usize, 4, 2, 5, 1, 4]
            .iter()
            .map(|&n| example(&[2], &vec![7; n]))
            .collect();
        let order: Vec<usize> = (0..ex.len()).collect();
        let batches = pack(&ex, &order, 8).unwrap();
        let cu: Vec<Vec<i32>> = batches.iter().map(|b| b.cu_seqlens.clone()).collect();
        // Lengths 4, 5, 3, 6, 2, 5: a batch closes when the next one would pass 8.
        assert_eq!(cu, [vec![0, 4], vec![0, 5, 8], vec![0, 6, 8], vec![0, 5]]);
        assert!(batches.iter().all(|b| b.num_tokens() <= 8));
        let flat: Vec<usize> = batches.iter().flat_map(|b| b.examples.clone()).collect();
        assert_eq!(flat, order);
        assert!((packing_efficiency(&batches, 8) - 25.0 / 32.0).abs() < 1e-12);
    }

    #[test]
    fn errors() {
        let ex = [example(&[2, 3, 4], &[5, 2]), example(&[], &[])];
        assert!(matches!(
            pack(&ex, &[0], 4),
            Err(DataError::ExampleTooLong {
                index: 0,
                len: 5,
                budget: 4
            })
        ));
        assert!(matches!(
            pack(&ex, &[1], 4),
            Err(DataError::EmptyExample { index: 1 })
        ));
        assert!(matches!(
            pack(&ex, &[2], 4),
            Err(DataError::IndexOutOfRange { index: 2, len: 2 })
        ));
        assert!(matches!(
            pack(&ex, &[0], 0),
            Err(DataError::InvalidBudget(0))
        ));
        let big = [example(&[2], &[u32::MAX])];
        assert!(matches!(
            pack(&big, &[0], 4),
            Err(DataError::TokenIdTooLarge { .. })
        ));
        assert!(pack(&ex, &[], 4).unwrap().is_empty());
    }
}
