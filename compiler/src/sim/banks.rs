//! Shared-memory bank-conflict model: 32 banks of 4 bytes, bank = `(addr / 4) % 32`.
//!
//! One warp instruction is served in phases: 4-byte accesses in one phase of 32 lanes, 8-byte
//! in two phases of 16, 16-byte accesses (and `cp.async` 16) in four phases of 8, `ldmatrix` in
//! one phase per 8x8 matrix (its eight 16-byte row addresses). A phase takes as many wavefronts
//! as the most distinct 4-byte words any one bank must deliver; identical words are broadcast.

use std::collections::{HashMap, HashSet};

/// Wavefronts of one phase: `(byte address, width in bytes)` per participating lane.
pub fn phase_wavefronts(accesses: &[(usize, usize)]) -> usize {
    let mut words: HashMap<usize, HashSet<usize>> = HashMap::new();
    for &(addr, width) in accesses {
        for w in 0..width.div_ceil(4) {
            let word = addr / 4 + w;
            words.entry(word % 32).or_default().insert(word);
        }
    }
    words.values().map(|s| s.len()).max().unwrap_or(0)
}

/// Wavefronts per phase of a warp-wide access of `width` bytes per lane (4, 8 or 16) at the
/// given per-lane byte addresses.
pub fn vector_access(addrs: &[usize; 32], width: usize) -> Vec<usize> {
    let lanes_per_phase = 128 / width.clamp(4, 16);
    addrs
        .chunks(lanes_per_phase)
        .map(|ch| phase_wavefronts(&ch.iter().map(|a| (*a, width)).collect::<Vec<_>>()))
        .collect()
}

/// Wavefronts per matrix of an `ldmatrix.x{num}`: lanes `8q .. 8q+7` give matrix `q`'s rows.
pub fn ldmatrix(addrs: &[usize; 32], num: usize) -> Vec<usize> {
    (0..num)
        .map(|q| {
            phase_wavefronts(
                &addrs[8 * q..8 * q + 8]
                    .iter()
                    .map(|a| (*a, 16))
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_basics() {
        let linear: [usize; 32] = std::array::from_fn(|l| 4 * l);
        assert_eq!(vector_access(&linear, 4), vec![1]);
        let same: [usize; 32] = [0; 32];
        assert_eq!(vector_access(&same, 4), vec![1], "broadcast");
        let strided: [usize; 32] = std::array::from_fn(|l| 128 * l);
        assert_eq!(vector_access(&strided, 4), vec![32], "every lane in bank 0");
        let v16: [usize; 32] = std::array::from_fn(|l| 16 * l);
        assert_eq!(vector_access(&v16, 16), vec![1, 1, 1, 1]);
    }
}
