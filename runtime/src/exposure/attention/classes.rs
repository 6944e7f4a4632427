//! Head classes (DESIGN.md §7, attention step 1): what kind of attention a head does, read off
//! its block-pooled maps ([`super::maps`]).
//!
//! A head's statistics ([`HeadStats`]) sum over its rows (every query token weighs the same):
//! - `local`: mass on the diagonal key blocks and the `window` blocks before them (what the
//!   selection always keeps);
//! - `sink`: mass on the sequence's first key block when it is not local;
//! - per distance `δ ≥ 1` before the diagonal (beyond the window, the first block excluded):
//!   the mass there, and how many queries could attend at that distance (the uniform baseline).
//!
//! The rules, in order ([`ClassRules`] holds the thresholds):
//! 1. **sink**: `sink ≥ sink_min`, or `sink ≥ sink_share_min` and `local + sink ≥ covered_min`
//!    (attention parks on the first tokens, the rest is local: the StreamingLLM pattern);
//! 2. **local**: `local ≥ local_min`;
//! 3. **strided**: the mass beyond the window is at least `rest_min` of the total, and for some
//!    period `p ∈ 2..=max_period` and phase `c`, the distances `δ ≡ c (mod p)` hold at least
//!    `strided_share` of it and `strided_lift` times what uniform attention over the available
//!    distances would put there (the class with the highest `share · lift` is the one tested);
//! 4. **broad**: everything else (content-dependent attention the predictor must find).

use serde::{Deserialize, Serialize};

/// The class of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadClass {
    /// Mass on the diagonal and the blocks just before it.
    Local,
    /// Much mass on the sequence's first block.
    Sink,
    /// Mass at periodic distances.
    Strided {
        /// Period in key blocks.
        period: usize,
    },
    /// Spread out, content-dependent.
    Broad,
}

/// Thresholds of the rules (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassRules {
    /// Key blocks before the diagonal counted as local.
    pub window: usize,
    /// Sink share that alone makes a sink head.
    pub sink_min: f64,
    /// Sink share that, with local + sink ≥ `covered_min`, makes a sink head.
    pub sink_share_min: f64,
    /// See `sink_share_min`.
    pub covered_min: f64,
    /// Local share of a local head.
    pub local_min: f64,
    /// Share of the mass beyond local and sink needed to look for strides.
    pub rest_min: f64,
    /// Largest period tried, in key blocks.
    pub max_period: usize,
    /// Share of the far mass on one residue class.
    pub strided_share: f64,
    /// Over the uniform baseline's share of that residue class.
    pub strided_lift: f64,
}

impl Default for ClassRules {
    fn default() -> Self {
        ClassRules {
            window: 1,
            sink_min: 0.4,
            sink_share_min: 0.2,
            covered_min: 0.85,
            local_min: 0.7,
            rest_min: 0.3,
            max_period: 8,
            strided_share: 0.5,
            strided_lift: 1.8,
        }
    }
}

/// Mass sums of one head over many rows (module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadStats {
    /// Queries counted.
    pub weight: f64,
    /// Query-weighted local mass.
    pub local: f64,
    /// Query-weighted sink mass.
    pub sink: f64,
    /// Query-weighted mass per distance `δ` beyond the window (index `δ`).
    pub far: Vec<f64>,
    /// Queries that could attend at distance `δ`.
    pub avail: Vec<f64>,
}

impl HeadStats {
    /// Adds one row: its masses over causal key blocks `0 .. hi`, its diagonal start `lo`, its
    /// query count `weight`, and the local `window`.
    pub fn add_row(&mut self, mass: &[f32], lo: usize, weight: f64, window: usize) {
        self.weight += weight;
        for (kb, &m) in mass.iter().enumerate() {
            let m = m as f64 * weight;
            if kb + window >= lo {
                self.local += m;
            } else if kb == 0 {
                self.sink += m;
            } else {
                let dist = lo - kb;
                if self.far.len() <= dist {
                    self.far.resize(dist + 1, 0.0);
                    self.avail.resize(dist + 1, 0.0);
                }
                self.far[dist] += m;
                self.avail[dist] += weight;
            }
        }
    }

    /// Local share of the mass.
    pub fn local_share(&self) -> f64 {
        self.local / self.weight.max(1e-300)
    }

    /// Sink share of the mass.
    pub fn sink_share(&self) -> f64 {
        self.sink / self.weight.max(1e-300)
    }

    /// `(period, share, lift)` of the residue class with the highest `share · lift` among those
    /// holding at least `min_share` of the far mass (the smallest period on ties; module docs).
    /// The product prefers the true period over its multiples (same lift at best, less share)
    /// and over its divisors (same share, less lift).
    pub fn best_stride(&self, max_period: usize, min_share: f64) -> Option<(usize, f64, f64)> {
        let far: f64 = self.far.iter().sum();
        let avail: f64 = self.avail.iter().sum();
        if far <= 0.0 || avail <= 0.0 {
            return None;
        }
        let mut best: Option<(usize, f64, f64)> = None;
        for p in 2..=max_period {
            for c in 0..p {
                let on = |v: &[f64]| {
                    v.iter()
                        .enumerate()
                        .filter(|(d, _)| d % p == c)
                        .map(|x| x.1)
                        .sum::<f64>()
                };
                let share = on(&self.far) / far;
                let base = on(&self.avail) / avail;
                if base <= 0.0 {
                    continue;
                }
                let lift = share / base;
                if share >= min_share && best.is_none_or(|b| share * lift > b.1 * b.2) {
                    best = Some((p, share, lift));
                }
            }
        }
        best
    }

    /// The head's class under `rules` (module docs).
    pub fn classify(&self, rules: &ClassRules) -> HeadClass {
        let (local, sink) = (self.local_share(), self.sink_share());
        if sink >= rules.sink_min
            || (sink >= rules.sink_share_min && local + sink >= rules.covered_min)
        {
            return HeadClass::Sink;
        }
        if local >= rules.local_min {
            return HeadClass::Local;
        }
        if 1.0 - local - sink >= rules.rest_min {
            if let Some((period, share, lift)) =
                self.best_stride(rules.max_period, rules.strided_share)
            {
                if share >= rules.strided_share && lift >= rules.strided_lift {
                    return HeadClass::Strided { period };
                }
            }
        }
        HeadClass::Broad
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;
    use crate::exposure::attention::maps::RowLayout;

    /// Stats of a synthetic head on one 2048-token sequence (q blocks 128, k blocks 64): each
    /// row's mass is `shape(kb, lo, hi)` (plus a little noise), normalised.
    fn head(shape: impl Fn(usize, usize, usize) -> f64, seed: u64) -> HeadStats {
        let layout = RowLayout::new(&[0, 2048], 1, 128, 64);
        let mut rng = SplitMix64::new(seed);
        let mut st = HeadStats::default();
        for r in 0..layout.rows() {
            let (lo, hi) = layout.range(r);
            let mut row: Vec<f64> = (0..hi)
                .map(|kb| {
                    shape(kb, lo, hi) + 0.002 * (rng.next_u64() >> 40) as f64 / (1u64 << 24) as f64
                })
                .collect();
            let s: f64 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
            let row: Vec<f32> = row.iter().map(|&v| v as f32).collect();
            st.add_row(&row, lo, layout.queries(r) as f64, 1);
        }
        st
    }

    #[test]
    fn synthetic_heads_of_each_kind_are_classified() {
        let rules = ClassRules::default();
        let local = head(|kb, lo, _| if kb + 1 >= lo { 1.0 } else { 0.01 }, 1);
        assert_eq!(local.classify(&rules), HeadClass::Local);
        let sink = head(
            |kb, lo, _| {
                if kb == 0 {
                    1.0
                } else if kb >= lo {
                    0.3
                } else {
                    0.005
                }
            },
            2,
        );
        assert_eq!(
            sink.classify(&rules),
            HeadClass::Sink,
            "{}",
            sink.sink_share()
        );
        // Every fourth block before the diagonal carries the mass.
        let strided = head(
            |kb, lo, _| {
                if kb >= lo {
                    0.3
                } else if (lo - kb) % 4 == 0 && kb > 0 {
                    1.0
                } else {
                    0.01
                }
            },
            3,
        );
        assert_eq!(strided.classify(&rules), HeadClass::Strided { period: 4 });
        // Mass on a content-dependent, non-periodic set of blocks.
        let mut rng = SplitMix64::new(4);
        let picks: Vec<f64> = (0..64)
            .map(|_| ((rng.next_u64() >> 40) as f64 / (1u64 << 24) as f64).powi(2))
            .collect();
        let broad = head(move |kb, _, _| picks[kb], 5);
        assert_eq!(broad.classify(&rules), HeadClass::Broad);
        // Shares add up.
        for st in [&local, &sink, &strided, &broad] {
            let far: f64 = st.far.iter().sum::<f64>() / st.weight;
            assert!((st.local_share() + st.sink_share() + far - 1.0).abs() < 1e-6);
        }
    }
}
