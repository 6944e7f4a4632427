//! Checkpoints of a run, written so that a kill at any moment loses nothing finished.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding the trainable parameters
//! ([`crate::peft::PeftParams::save`]: LoRA in PEFT format, `adapter_config.json` and
//! `adapter_model.safetensors`; BitFit and Houlsby in their own files), the optimizer state
//! (`optimizer.safetensors`) and `trainer_state.json` (step, position, and the size and FNV-1a
//! checksum of every other file). It is built under a temporary name, every file fsynced, then
//! renamed into place, so a checkpoint directory either is complete or does not exist; a
//! resume also re-checks the checksums and skips (with a warning) any checkpoint that fails.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File names inside a checkpoint directory.
pub const STATE_FILE: &str = "trainer_state.json";
/// The optimizer state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// `trainer_state.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Steps the run will take in all.
    pub total_steps: usize,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// Fingerprint of the training and eval examples (token ids and masks).
    pub data_fingerprint: String,
    /// lexp version that wrote it.
    pub lexp_version: String,
    /// Steps skipped so far for a non-finite loss or gradient norm (0 in checkpoints written
    /// before the field existed).
    #[serde(default)]
    pub skipped_steps: usize,
    /// Of those, how many immediately precede this checkpoint: a resume continues the count
    /// toward [`super::TrainConfig::max_bad_steps`] exactly as an uninterrupted run would.
    #[serde(default)]
    pub bad_in_a_row: usize,
    /// Size and FNV-1a 64 checksum of every other file of the checkpoint.
    pub files: BTreeMap<String, FileSum>,
}

/// Size and checksum of one file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileSum {
    /// Bytes.
    pub bytes: u64,
    /// FNV-1a 64, hex.
    pub fnv1a64: String,
}

/// FNV-1a 64 of `bytes`: a fast, dependency-free checksum (catches truncation and bit rot,
/// not adversaries).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The size and checksum of `path`.
pub fn file_sum(path: &Path) -> std::io::Result<FileSum> {
    let bytes = fs::read(path)?;
    Ok(FileSum {
        bytes: bytes.len() as u64,
        fnv1a64: format!("{:016x}", fnv1a64(&bytes)),
    })
}

/// fsyncs a directory so that renames into it are durable (a no-op where directories cannot
/// be opened, as on some platforms).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename, fsync of the directory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir);
    Ok(())
}

/// The directory of the checkpoint after `step` steps.
pub fn checkpoint_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Fills `dir` with `write`'s files, then completes it with `trainer_state.json` (checksums
/// of everything `write` wrote) and moves it into place as `checkpoint_dir(root, state.step)`
/// with one rename. An older checkpoint of the same step is replaced.
pub fn commit_checkpoint(
    root: &Path,
    mut state: TrainerState,
    write: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    fs::create_dir_all(root).map_err(|e| io("cannot create", root, e))?;
    let final_dir = checkpoint_dir(root, state.step);
    let tmp = root.join(format!(
        ".step-{:08}.tmp-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io("cannot clear", &tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
    write(&tmp)?;
    fault_pause();
    let mut files = BTreeMap::new();
    let entries = fs::read_dir(&tmp).map_err(|e| io("cannot list", &tmp, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io("cannot list", &tmp, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == STATE_FILE {
            continue;
        }
        let path = entry.path();
        // The writers already fsynced their files; re-open to be sure of what is on disk.
        files.insert(
            name,
            file_sum(&path).map_err(|e| io("cannot read", &path, e))?,
        );
    }
    state.files = files;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?;
    write_file_atomic(&tmp.join(STATE_FILE), &json)
        .map_err(|e| io("cannot write", &tmp.join(STATE_FILE), e))?;
    sync_dir(&tmp);
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(|e| io("cannot replace", &final_dir, e))?;
    }
    fs::rename(&tmp, &final_dir).map_err(|e| io("cannot move into place", &final_dir, e))?;
    sync_dir(root);
    Ok(final_dir)
}

/// Environment variable of a fault-injection hook: when set to a number of milliseconds, each
/// checkpoint write pauses that long with its files written but before its state file and
/// rename, so that a test can kill the process inside a checkpoint write deterministically
/// (`runtime/tests/finetune_cli.rs`). Unset in normal use.
pub const FAULT_PAUSE_ENV: &str = "LEXP_FAULT_CHECKPOINT_PAUSE_MS";

fn fault_pause() {
    if let Some(ms) = std::env::var(FAULT_PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!("{FAULT_PAUSE_ENV}: pausing {ms} ms inside a checkpoint write");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Reads and verifies the checkpoint in `dir`: its state file parses and every file it lists
/// has the recorded size and checksum.
pub fn verify_checkpoint(dir: &Path) -> Result<TrainerState, String> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path)
        .map_err(|e| format!("cannot read {}: {e}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a trainer state: {e}", state_path.display()))?;
    for (name, want) in &state.files {
        let path = dir.join(name);
        let got = file_sum(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if &got != want {
            return Err(format!(
                "{} does not match its checksum ({} bytes, {} recorded as {} bytes, {})",
                path.display(),
                got.bytes,
                got.fnv1a64,
                want.bytes,
                want.fnv1a64
            ));
        }
    }
    Ok(state)
}

/// Checkpoint directories under `root`, newest (highest step) first.
pub fn list_checkpoints(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|a| std::cmp::Reverse(a.0));
    found
}

/// The newest checkpoint under `root` that verifies, with its state; broken ones are reported
/// through `tracing` and skipped.
pub fn latest_valid(root: &Path) -> Option<(PathBuf, TrainerState)> {
    for (_, dir) in list_checkpoints(root) {
        match verify_checkpoint(&dir) {
            Ok(state) => return Some((dir, state)),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e}", dir.display()),
        }
    }
    None
}

/// Removes all but the newest `keep` checkpoints (and leftovers of interrupted writes).
pub fn prune(root: &Path, keep: usize) {
    for (_, dir) in list_checkpoints(root).into_iter().skip(keep.max(1)) {
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!("cannot remove old checkpoint {}: {e}", dir.display());
        }
    }
    for e in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainerState {
        TrainerState {
            step,
            total_steps: 10,
            tokens_seen: 0,
            data_fingerprint: "x".into(),
            lexp_version: "0".into(),
            skipped_steps: 0,
            bad_in_a_row: 0,
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn commit_verify_corrupt_and_prune() {
        let root = std::env::temp_dir().join(format!("lexp-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for step in [1, 2, 3] {
            commit_checkpoint(&root, state(step), |d| {
                fs::write(d.join("a.bin"), vec![step as u8; 100]).map_err(|e| e.to_string())
            })
            .unwrap();
        }
        let (dir, s) = latest_valid(&root).unwrap();
        assert_eq!(s.step, 3);
        assert_eq!(s.files["a.bin"].bytes, 100);
        // Corrupt the newest: the resume falls back to step 2.
        fs::write(dir.join("a.bin"), vec![9u8; 100]).unwrap();
        assert!(verify_checkpoint(&dir).unwrap_err().contains("checksum"));
        assert_eq!(latest_valid(&root).unwrap().1.step, 2);
        // A half-written checkpoint (temporary name) is ignored and pruned.
        fs::create_dir_all(root.join(".step-00000004.tmp-1")).unwrap();
        assert_eq!(list_checkpoints(&root).len(), 3);
        prune(&root, 2);
        let left: Vec<usize> = list_checkpoints(&root).iter().map(|c| c.0).collect();
        assert_eq!(left, vec![3, 2]);
        assert!(!root.join(".step-00000004.tmp-1").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
