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
        /// Mean loss over the step's targets (nats).
        loss: f64,
        /// Learning rate used.
        lr: f32,
        /// Gradient norm before clipping.
        grad_norm: f32,
        /// Tokens in the step.
        tokens: usize,
        /// Loss targets in the step.
        targets: usize,
        /// Wall time of the step.
        seconds: f64,
    },
    /// An evaluation of the held-out set after `step` optimizer steps.
    Eval {
        /// Optimizer steps done (0: before training).
        step: usize,
        /// Mean loss over the eval targets (nats).
        loss: f64,
        /// Eval targets.
        targets: usize,
    },
}

impl Record {
    /// The step this record belongs to.
    pub fn step(&self) -> usize {
        match self {
            Record::Train { step, .. } | Record::Eval { step, .. } => *step,
        }
    }
}

/// Appends records to `metrics.jsonl`, one flushed line each, so a killed run keeps every
/// finished step.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    records: Vec<Record>,
}

impl MetricsLog {
    /// Opens `path` for a run that has done `done_steps` steps: records of later steps (written
    /// by a run that was killed after its last checkpoint) are dropped, so the file always
    /// describes the trajectory being continued.
    pub fn open(path: &Path, done_steps: usize) -> std::io::Result<MetricsLog> {
        let mut records = Vec::new();
        if done_steps > 0 {
            if let Ok(text) = std::fs::read_to_string(path) {
                records = text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Record>(l).ok())
                    .filter(|r| r.step() <= done_steps)
                    .collect();
            }
        }
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
            file,
            records,
        })
    }

    /// Appends `record`.
    pub fn push(&mut self, record: Record) -> std::io::Result<()> {
        let line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
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
