//! Longer contexts than the checkpoint learned: [`OptModel::extend_positions`] grows OPT's
//! learned position table so that the model can be fine-tuned (and evaluated) on sequences of
//! 4k–16k tokens.
//!
//! OPT's `embed_positions` has `P + 2` rows: two offset rows fairseq never reads for real
//! tokens, then position `p` at row `p + 2` (RUNTIME.md §1.2). Extension to `N ≥ P` positions
//! keeps the two offset rows and fills position `p` of the new table by *linear
//! interpolation* of the learned rows ([`PositionExtension::Interpolate`]): it reads old position
//! `x = p·(P − 1)/(N − 1)`, i.e. `(1 − f)·row[⌊x⌋] + f·row[⌊x⌋ + 1]` with `f = x − ⌊x⌋`. The first
//! and last positions keep their learned rows, and every new position lies between two learned
//! neighbours, so the model never sees an embedding outside the learned manifold (position
//! interpolation; extrapolating a learned table has nothing to extrapolate from). The price is
//! that the positions the checkpoint knew now read slightly compressed rows, which the
//! fine-tuning adapts to; `N = P` leaves the table as it was.
//!
//! Only the in-memory model changes: LoRA adapters do not touch the position table, so the
//! exported PEFT adapter is unaffected. A merged checkpoint written from such a run would need
//! the extended table (and `max_position_embeddings = N` in its `config.json`); none is
//! written today.

use super::OptModel;
use crate::checkpoint::HostMatrix;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// How new rows of the position table are made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionExtension {
    /// Linear interpolation of the learned rows over the longer range (module docs).
    #[default]
    Interpolate,
}

impl FromStr for PositionExtension {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "interpolate" => Ok(PositionExtension::Interpolate),
            other => Err(format!(
                "unknown position extension {other:?}: the only one is `interpolate`"
            )),
        }
    }
}

impl fmt::Display for PositionExtension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PositionExtension::Interpolate => f.write_str("interpolate"),
        }
    }
}

/// Why the position table cannot be extended as asked.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PositionError {
    /// The requested size is below the learned one (the table only grows).
    #[error(
        "cannot shrink the position table from {learned} to {requested} positions; \
         ask for at least {learned}"
    )]
    Shrink {
        /// `max_position_embeddings` of the checkpoint.
        learned: usize,
        /// The requested number of positions.
        requested: usize,
    },
    /// Interpolation needs two learned positions.
    #[error("the checkpoint has {learned} learned position(s); interpolation needs at least 2")]
    TooFewLearned {
        /// `max_position_embeddings` of the checkpoint.
        learned: usize,
    },
    /// The table does not have `max_position_embeddings + 2` rows.
    #[error("embed_positions has {rows} rows, the config implies {expected}")]
    Shape {
        /// Rows of the table.
        rows: usize,
        /// `max_position_embeddings + 2`.
        expected: usize,
    },
}

/// Rows of `embed_positions` before position 0 (fairseq's offset).
const OFFSET_ROWS: usize = 2;

impl OptModel {
    /// Extends the position table to `positions` positions by `how` and sets
    /// `max_position_embeddings` to match (no-op when it already has that many).
    ///
    /// # Errors
    /// [`PositionError`] if `positions` is below the learned size, the checkpoint has fewer than
    /// two learned positions, or the table's shape disagrees with the config.
    pub fn extend_positions(
        &mut self,
        positions: usize,
        how: PositionExtension,
    ) -> Result<(), PositionError> {
        let learned = self.config.max_position_embeddings;
        let table = &self.weights.embed_positions;
        if table.rows != learned + OFFSET_ROWS {
            return Err(PositionError::Shape {
                rows: table.rows,
                expected: learned + OFFSET_ROWS,
            });
        }
        if positions < learned {
            return Err(PositionError::Shrink {
                learned,
                requested: positions,
            });
        }
        if positions == learned {
            return Ok(());
        }
        let extended = match how {
            PositionExtension::Interpolate => interpolate_positions(table, positions)?,
        };
        tracing::info!("position table extended from {learned} to {positions} positions ({how})");
        self.weights.embed_positions = extended;
        self.config.max_position_embeddings = positions;
        Ok(())
    }
}

/// The table `[positions + 2, H]` whose offset rows are `table`'s and whose position `p` is
/// `table`'s (learned, `table.rows − 2` of them) read at `p·(P − 1)/(positions − 1)`, linearly
/// interpolated between the two neighbouring rows.
///
/// # Errors
/// [`PositionError::TooFewLearned`] if `table` has fewer than two learned positions, or
/// [`PositionError::Shrink`] if `positions` is below them.
pub fn interpolate_positions(
    table: &HostMatrix,
    positions: usize,
) -> Result<HostMatrix, PositionError> {
    let learned = table.rows.saturating_sub(OFFSET_ROWS);
    if learned < 2 {
        return Err(PositionError::TooFewLearned { learned });
    }
    if positions < learned {
        return Err(PositionError::Shrink {
            learned,
            requested: positions,
        });
    }
    let h = table.cols;
    let row = |r: usize| &table.data[r * h..(r + 1) * h];
    let mut data = Vec::with_capacity((positions + OFFSET_ROWS) * h);
    data.extend_from_slice(&table.data[..OFFSET_ROWS * h]);
    let stretch = (learned - 1) as f64 / (positions - 1) as f64;
    for p in 0..positions {
        let x = p as f64 * stretch;
        // `x ≤ P − 1`; the last position reads the last learned row exactly.
        let i = (x.floor() as usize).min(learned - 1);
        let f = x - i as f64;
        let lo = row(OFFSET_ROWS + i);
        if f == 0.0 {
            data.extend_from_slice(lo);
        } else {
            let hi = row(OFFSET_ROWS + i + 1);
            data.extend(
                lo.iter()
                    .zip(hi)
                    .map(|(&a, &b)| ((1.0 - f) * f64::from(a) + f * f64::from(b)) as f32),
            );
        }
    }
    Ok(HostMatrix {
        rows: positions + OFFSET_ROWS,
        cols: h,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{OptConfig, OptWeights};
    use std::path::Path;

    fn model(positions: usize) -> OptModel {
        let json = format!(
            r#"{{"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1, "ffn_dim": 16,
                "num_attention_heads": 2, "max_position_embeddings": {positions}}}"#
        );
        let config = OptConfig::from_json(&json, Path::new("test-config.json")).unwrap();
        let weights = OptWeights::random(&config, 3, 0.5);
        OptModel { config, weights }
    }

    #[test]
    fn endpoints_keep_their_rows_and_midpoints_average_their_neighbours() {
        // 5 learned positions stretched to 9: new position p reads old p/2, so even positions
        // are the learned rows and odd ones the means of two neighbours.
        let mut m = model(5);
        let old = m.weights.embed_positions.clone();
        m.extend_positions(9, PositionExtension::Interpolate)
            .unwrap();
        let new = &m.weights.embed_positions;
        assert_eq!((new.rows, new.cols), (11, 8));
        assert_eq!(m.config.max_position_embeddings, 9);
        assert_eq!(m.config.position_rows(), new.rows);
        let (o, n) = (
            |r: usize| &old.data[r * 8..][..8],
            |r: usize| &new.data[r * 8..][..8],
        );
        assert_eq!(n(0), o(0), "offset row 0");
        assert_eq!(n(1), o(1), "offset row 1");
        for p in 0..9 {
            if p % 2 == 0 {
                assert_eq!(n(p + 2), o(p / 2 + 2), "position {p}");
            } else {
                for (d, &v) in n(p + 2).iter().enumerate() {
                    let mean = (o(p / 2 + 2)[d] + o(p / 2 + 3)[d]) / 2.0;
                    assert!(
                        (v - mean).abs() < 1e-6,
                        "position {p}, dim {d}: {v} vs {mean}"
                    );
                }
            }
        }
    }

    #[test]
    fn uneven_stretch_interpolates_linearly_and_stays_between_neighbours() {
        let mut m = model(7);
        let old = m.weights.embed_positions.clone();
        m.extend_positions(100, PositionExtension::Interpolate)
            .unwrap();
        let new = &m.weights.embed_positions;
        assert_eq!(new.rows, 102);
        let (o, n) = (
            |r: usize| &old.data[r * 8..][..8],
            |r: usize| &new.data[r * 8..][..8],
        );
        assert_eq!(n(2), o(2), "first position");
        assert_eq!(n(101), o(8), "last position");
        // Position 40 reads old 40·6/99 = 2.4242…: 0.5758·row 2 + 0.4242·row 3.
        let f = 40.0 * 6.0 / 99.0 - 2.0;
        for d in 0..8 {
            let want = (1.0 - f) * f64::from(o(4)[d]) + f * f64::from(o(5)[d]);
            assert!((f64::from(n(42)[d]) - want).abs() < 1e-6);
        }
    }

    #[test]
    fn the_table_only_grows_and_equal_size_is_a_no_op() {
        let mut m = model(6);
        let before = m.clone();
        m.extend_positions(6, PositionExtension::Interpolate)
            .unwrap();
        assert_eq!(m, before);
        let e = m
            .extend_positions(4, PositionExtension::Interpolate)
            .unwrap_err();
        assert_eq!(
            e,
            PositionError::Shrink {
                learned: 6,
                requested: 4
            }
        );
        assert!(interpolate_positions(&HostMatrix::new(3, 2, vec![0.0; 6]).unwrap(), 8).is_err());
        assert_eq!("interpolate".parse(), Ok(PositionExtension::Interpolate));
        assert!("rope"
            .parse::<PositionExtension>()
            .unwrap_err()
            .contains("interpolate"));
    }
}
