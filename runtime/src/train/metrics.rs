//! The run's metrics: one JSON object per line in `metrics.jsonl` (train steps and evals),
//! and the loss-curve PNG drawn from them.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// An optimizer step.
    Train {
        /// 1-based optimizer step.
        step: usize,
        /// 0-based epoch.
        epoch: usize,
        /// Mean loss over the step's targets (nats); `null` in the file when not finite.
        #[serde(deserialize_with = "null_as_nan")]
        loss: f64,
        /// Learning rate used.
        lr: f32,
        /// Gradient norm before clipping; `null` in the file when not finite.
        #[serde(deserialize_with = "null_as_nan")]
        grad_norm: f32,
        /// Tokens in the step.
        tokens: usize,
        /// Loss targets in the step.
        targets: usize,
        /// Wall time of the step.
        seconds: f64,
        /// The loss or gradient norm was not finite: the step was skipped (no update).
        #[serde(default, skip_serializing_if = "is_false")]
        skipped: bool,
        /// Steps of the run skipped so far, this one included (absent when 0).
        #[serde(default, skip_serializing_if = "is_zero")]
        skipped_total: usize,
        /// The loss was over [`SPIKE_FACTOR`] times the mean of the previous
        /// [`SPIKE_WINDOW`] finite losses.
        #[serde(default, skip_serializing_if = "is_false")]
        loss_spike: bool,
    },
    /// An evaluation of the held-out set after `step` optimizer steps.
    Eval {
        /// Optimizer steps done (0: before training).
        step: usize,
        /// Mean loss over the eval targets (nats).
        loss: f64,
        /// Eval targets.
        targets: usize,
        /// With MLP exposure: the same eval with every MLP dense (`loss` is the sparse one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dense_loss: Option<f64>,
    },
    /// A dense probe of MLP exposure's guard (DESIGN.md §7, MLP step 6).
    Probe(crate::exposure::guard::ProbeReport),
}

/// A loss over this many times the recent mean is reported as a spike.
pub const SPIKE_FACTOR: f64 = 3.0;
/// Finite losses the spike check averages (it starts once it has this many).
pub const SPIKE_WINDOW: usize = 20;

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// serde_json writes a non-finite float as `null`; read it back as NaN (so that the line of a
/// skipped step survives a resume).
fn null_as_nan<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + num_nan::Nan,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_else(T::nan))
}

mod num_nan {
    /// Float types with a NaN.
    pub trait Nan {
        fn nan() -> Self;
    }
    impl Nan for f32 {
        fn nan() -> Self {
            f32::NAN
        }
    }
    impl Nan for f64 {
        fn nan() -> Self {
            f64::NAN
        }
    }
}

/// Detects loss spikes: a finite loss over [`SPIKE_FACTOR`] times the mean of the last
/// [`SPIKE_WINDOW`] finite losses of trained (not skipped) steps.
#[derive(Clone, Debug, Default)]
pub struct SpikeDetector {
    recent: std::collections::VecDeque<f64>,
}

impl SpikeDetector {
    /// A detector primed with the trained steps of `records` (a resume rebuilds it from the
    /// kept metrics, so it flags the same steps as an uninterrupted run).
    pub fn from_records(records: &[Record]) -> SpikeDetector {
        let mut d = SpikeDetector::default();
        for r in records {
            if let Record::Train {
                loss,
                skipped: false,
                ..
            } = r
            {
                d.observe(*loss);
            }
        }
        d
    }

    /// Whether `loss` is a spike against the losses seen so far; then remembers it (if finite).
    pub fn observe(&mut self, loss: f64) -> bool {
        if !loss.is_finite() {
            return false;
        }
        let spike = self.recent.len() == SPIKE_WINDOW && {
            let mean = self.recent.iter().sum::<f64>() / SPIKE_WINDOW as f64;
            loss > SPIKE_FACTOR * mean
        };
        if self.recent.len() == SPIKE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(loss);
        spike
    }
}

impl Record {
    /// The step this record belongs to.
    pub fn step(&self) -> usize {
        match self {
            Record::Train { step, .. } | Record::Eval { step, .. } => *step,
            Record::Probe(p) => p.step,
        }
    }
}

/// The records of `path` of steps up to `done_steps` (none for a new run or a missing file).
fn kept_records(path: &Path, done_steps: usize) -> Vec<Record> {
    if done_steps == 0 {
        return Vec::new();
    }
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Record>(l).ok())
                .filter(|r| r.step() <= done_steps)
                .collect()
        })
        .unwrap_or_default()
}

/// Appends records to `metrics.jsonl`, one flushed line each, so a killed run keeps every
/// finished step.
pub struct MetricsLog {
    path: PathBuf,
    /// `None` for a data-parallel rank other than 0 ([`MetricsLog::read_only`]).
    file: Option<std::fs::File>,
    records: Vec<Record>,
}

impl MetricsLog {
    /// Opens `path` for a run that has done `done_steps` steps: records of later steps (written
    /// by a run that was killed after its last checkpoint) are dropped, so the file always
    /// describes the trajectory being continued.
    pub fn open(path: &Path, done_steps: usize) -> std::io::Result<MetricsLog> {
        let records = kept_records(path, done_steps);
        // Rewrite the kept prefix atomically, then append to it.
        let mut text = String::new();
        for r in &records {
            text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        crate::train::state::write_file_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file: Some(file),
            records,
        })
    }

    /// The records of `path` up to `done_steps` (as [`open`](Self::open) keeps them), in a
    /// log that never writes: a data-parallel rank other than 0 keeps the same records as
    /// rank 0 (resume bookkeeping, spike detection) while rank 0 alone writes the file.
    pub fn read_only(path: &Path, done_steps: usize) -> MetricsLog {
        MetricsLog {
            path: path.to_path_buf(),
            file: None,
            records: kept_records(path, done_steps),
        }
    }

    /// Appends `record`.
    pub fn push(&mut self, record: Record) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            let line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
            writeln!(file, "{line}")?;
            file.flush()?;
        }
        self.records.push(record);
        Ok(())
    }

    /// Everything logged so far (kept and new).
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
