//! Deterministic shuffling and the held-out eval split.
//!
//! Randomness comes from [`SplitMix64`], written out here rather than taken from `rand`, whose
//! seeded generators are not promised to give the same stream across versions: a seed must
//! name the same split and the same epoch orders forever, on every machine.

use std::collections::HashSet;

use super::{DataError, Result};

/// SplitMix64 (Steele, Lea, Flood 2014; the seeding generator of `java.util.SplittableRandom`
/// and of xoshiro): tiny, fast, and good enough for shuffling.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Stream of [`split_eval`] / [`split_eval_grouped`]; epoch `e` uses stream `e`.
const SPLIT_STREAM: u64 = u64::MAX;

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// An independent generator for sub-stream `stream` of `seed` (e.g. one per epoch).
    pub fn for_stream(seed: u64, stream: u64) -> Self {
        let mut mixer = SplitMix64::new(seed ^ stream.wrapping_mul(GOLDEN).rotate_left(17));
        SplitMix64::new(mixer.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` without modulo bias (rejection sampling); `n` must be non-zero.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0, "below(0)");
        let n = n.max(1);
        // Values under `threshold` would make the low residues more likely: reject them.
        let threshold = n.wrapping_neg() % n;
        loop {
            let r = self.next_u64();
            if r >= threshold {
                return r % n;
            }
        }
    }

    /// Fisher–Yates shuffle of `items` in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            // `i + 1` fits in u64 and the result is at most `i`, so both casts are lossless.
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The training order of `epoch`: `indices` shuffled by `seed`'s stream for that epoch.
/// Deterministic per `(seed, epoch)` and always a permutation of `indices`.
pub fn epoch_order(indices: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
    let mut order = indices.to_vec();
    SplitMix64::for_stream(seed, epoch).shuffle(&mut order);
    order
}

/// How much to hold out for evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EvalSize {
    /// A fraction in `[0, 1)`, rounded to the nearest count (at least one when positive and
    /// there are two or more to choose from).
    Fraction(f64),
    /// An exact count.
    Count(usize),
}

/// A train/eval partition of example indices, each list ascending (file order): the split is
/// a set, and per-epoch order comes from [`epoch_order`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Indices to train on.
    pub train: Vec<usize>,
    /// Held-out indices.
    pub eval: Vec<usize>,
}

/// Holds out `size` of `n` examples, chosen by `seed`. Disjoint, covering `0..n`, and the same
/// for the same `(n, size, seed)`.
pub fn split_eval(n: usize, size: EvalSize, seed: u64) -> Result<Split> {
    let k = eval_count(size, n, "examples")?;
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::for_stream(seed, SPLIT_STREAM).shuffle(&mut order);
    let mut eval = order[..k].to_vec();
    let mut train = order[k..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    Ok(Split { train, eval })
}

/// Holds out whole groups: `groups[i]` is example `i`'s group (e.g. [`Example::group`], the
/// prompt's hash), and `size` counts **groups**, so that no prompt is in both halves (E2E has
/// several references per meaning representation; splitting them would leak).
///
/// [`Example::group`]: super::Example::group
pub fn split_eval_grouped(groups: &[u64], size: EvalSize, seed: u64) -> Result<Split> {
    let mut seen = HashSet::new();
    let mut distinct: Vec<u64> = groups.iter().copied().filter(|g| seen.insert(*g)).collect();
    let k = eval_count(size, distinct.len(), "groups")?;
    SplitMix64::for_stream(seed, SPLIT_STREAM).shuffle(&mut distinct);
    let held: HashSet<u64> = distinct[..k].iter().copied().collect();
    let (eval, train): (Vec<usize>, Vec<usize>) =
        (0..groups.len()).partition(|&i| held.contains(&groups[i]));
    Ok(Split { train, eval })
}

/// The number held out of `n` (examples or groups, named by `what` in errors).
fn eval_count(size: EvalSize, n: usize, what: &str) -> Result<usize> {
    let k = match size {
        EvalSize::Fraction(f) => {
            if !(0.0..1.0).contains(&f) {
                return Err(DataError::InvalidSplit(format!(
                    "fraction {f} is not in [0, 1)"
                )));
            }
            // In range: 0 <= f * n < n, so the cast cannot overflow.
            let k = (f * n as f64).round() as usize;
            if f > 0.0 && k == 0 && n >= 2 {
                1
            } else {
                k
            }
        }
        EvalSize::Count(c) => c,
    };
    if k > 0 && k >= n {
        return Err(DataError::InvalidSplit(format!(
            "holding out {k} of {n} {what} leaves nothing to train on"
        )));
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // First outputs for seed 1234567 (the Rosetta Code "Pseudo-random numbers/Splitmix64"
        // vector), re-checked with a direct Python transcription of the reference C code.
        let mut r = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821,
            ]
        );
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut hits = [0usize; 7];
        for _ in 0..7000 {
            hits[r.below(7) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let idx: Vec<usize> = (10..60).collect();
        let a = epoch_order(&idx, 42, 0);
        assert_eq!(a, epoch_order(&idx, 42, 0));
        assert_ne!(a, idx);
        assert_ne!(a, epoch_order(&idx, 42, 1));
        assert_ne!(a, epoch_order(&idx, 43, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, idx);
    }

    #[test]
    fn split_sizes_and_errors() {
        let s = split_eval(100, EvalSize::Fraction(0.1), 3).unwrap();
        assert_eq!((s.train.len(), s.eval.len()), (90, 10));
        assert_eq!(split_eval(100, EvalSize::Fraction(0.1), 3).unwrap(), s);
        assert_ne!(split_eval(100, EvalSize::Fraction(0.1), 4).unwrap(), s);
        assert_eq!(
            split_eval(10, EvalSize::Fraction(0.01), 3)
                .unwrap()
                .eval
                .len(),
            1
        );
        assert_eq!(
            split_eval(10, EvalSize::Count(0), 3).unwrap().train.len(),
            10
        );
        assert_eq!(
            split_eval(0, EvalSize::Fraction(0.5), 3).unwrap(),
            Split::default()
        );
        for bad in [
            EvalSize::Fraction(1.0),
            EvalSize::Fraction(-0.1),
            EvalSize::Fraction(f64::NAN),
            EvalSize::Count(10),
        ] {
            assert!(
                matches!(split_eval(10, bad, 0), Err(DataError::InvalidSplit(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn grouped_split_keeps_groups_together() {
        let groups: Vec<u64> = (0..60).map(|i| i / 6).collect();
        let s = split_eval_grouped(&groups, EvalSize::Count(3), 9).unwrap();
        assert_eq!(s.eval.len(), 18);
        assert_eq!(s.train.len(), 42);
        let eval_groups: HashSet<u64> = s.eval.iter().map(|&i| groups[i]).collect();
        assert_eq!(eval_groups.len(), 3);
        assert!(s.train.iter().all(|&i| !eval_groups.contains(&groups[i])));
    }
}
