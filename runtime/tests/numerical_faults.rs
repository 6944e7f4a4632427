//! Numerical faults in a fine-tuning run (issue 10, acceptance 3: "NaN in a batch").
//!
//! A wrapper around [`CpuEngine`] poisons chosen optimizer steps: a NaN loss, or an infinite
//! gradient element with a finite loss. The tests train on the bundled opt-tiny model and E2E
//! slice and check that a bad step is skipped (the adapter and optimizer state of the
//! checkpoint after it are byte-identical to those before it), counted in `metrics.jsonl`,
//! and that the run goes on and finishes; that `max_bad_steps` bad steps in a row stop the run
//! with [`TrainError::NonFinite`]; that the count in a row survives a resume; and that a loss
//! spike is flagged in the metrics (and trained on).

use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::data::PackedBatch;
use lexp_runtime::model::{DropoutRng, Result as ModelResult, StepOutput};
use lexp_runtime::peft::PeftParams;
use lexp_runtime::train::{self, CpuEngine, Engine, Observer, TrainConfig, TrainError};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default")
}

/// How a poisoned step goes bad.
#[derive(Clone, Copy, Debug)]
enum Poison {
    /// The loss is NaN (so is everything derived from it).
    NanLoss,
    /// One gradient element is +inf; the loss stays finite.
    InfGrad,
    /// The loss is 10 times what it is (the gradients are untouched): a spike.
    Spike,
}

/// [`CpuEngine`] with poisoned steps. Each optimizer step of these runs is one micro-batch
/// (asserted through `calls`), so call `i` (0-based, counted from `first_step`) is step `i + 1`.
struct Faulty {
    inner: CpuEngine,
    poison: BTreeMap<usize, Poison>,
    calls: usize,
}

impl Faulty {
    fn new(model: &OptModel, first_step: usize, poison: &[(usize, Poison)]) -> Faulty {
        Faulty {
            inner: CpuEngine::new(model.clone()),
            poison: poison.iter().copied().collect(),
            calls: first_step,
        }
    }
}

impl Engine for Faulty {
    fn name(&self) -> String {
        "faulty cpu".into()
    }

    fn model(&self) -> &OptModel {
        self.inner.model()
    }

    fn loss_and_grads(
        &mut self,
        lora: &PeftParams,
        batch: &PackedBatch,
        grad_scale: f32,
        rng: Option<DropoutRng>,
    ) -> ModelResult<StepOutput> {
        let mut out = self.inner.loss_and_grads(lora, batch, grad_scale, rng)?;
        self.calls += 1;
        match self.poison.get(&self.calls) {
            Some(Poison::NanLoss) => out.loss_sum = f64::NAN,
            Some(Poison::Spike) => out.loss_sum *= 10.0,
            Some(Poison::InfGrad) => {
                let mut flat = out.grads.flat_mut();
                let last = flat.len() - 1;
                let g = &mut flat[last];
                let mid = g.len() / 2;
                g[mid] = f32::INFINITY;
            }
            None => {}
        }
        Ok(out)
    }

    fn eval_loss(
        &mut self,
        lora: Option<&PeftParams>,
        batch: &PackedBatch,
    ) -> ModelResult<(f64, usize)> {
        self.inner.eval_loss(lora, batch)
    }
}

/// A small run: 4 examples per step, `steps` steps, a checkpoint after every step (all kept).
fn config(steps: usize, max_bad_steps: usize) -> TrainConfig {
    TrainConfig {
        model_dir: assets().join("opt-tiny"),
        train_files: vec![assets().join("e2e/train.jsonl")],
        eval_file: Some(assets().join("e2e/eval.jsonl")),
        eval_max_examples: 8,
        examples_per_step: 4,
        max_steps: steps,
        save_every: 1,
        keep_checkpoints: 100,
        lr: 1e-2,
        max_bad_steps,
        ..TrainConfig::default()
    }
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lexp-numfault-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn train_records(dir: &Path) -> Vec<Value> {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .collect()
}

/// The adapter and optimizer bytes of the checkpoint after `step` steps.
fn state_bytes(dir: &Path, step: usize) -> (Vec<u8>, Vec<u8>) {
    let ck = dir.join(format!("checkpoints/step-{step:08}"));
    (
        fs::read(ck.join("adapter_model.safetensors")).unwrap(),
        fs::read(ck.join("optimizer.safetensors")).unwrap(),
    )
}

fn trainer_state(dir: &Path, step: usize) -> Value {
    let p = dir.join(format!("checkpoints/step-{step:08}/trainer_state.json"));
    serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn a_bad_step_is_skipped_counted_and_the_run_finishes() {
    let cfg = config(7, 5);
    let model = cfg.load_model().unwrap();
    let dir = out_dir("skip");
    let poison = [(3, Poison::NanLoss), (5, Poison::InfGrad)];
    let mut engine = Faulty::new(&model, 0, &poison);
    let summary = train::run(&cfg, &dir, false, &mut engine, &mut train::Silent).unwrap();
    assert_eq!(summary.steps, 7);
    assert_eq!(engine.calls, 7, "one micro-batch per step");
    assert!(summary.eval_loss_end.is_finite());

    let recs = train_records(&dir);
    assert_eq!(recs.len(), 7);
    for r in &recs {
        let step = r["step"].as_u64().unwrap() as usize;
        let bad = poison.iter().any(|p| p.0 == step);
        assert_eq!(r["skipped"].as_bool().unwrap_or(false), bad, "{r}");
        let total = poison.iter().filter(|p| p.0 <= step).count();
        assert_eq!(
            r["skipped_total"].as_u64().unwrap_or(0) as usize,
            total,
            "{r}"
        );
    }
    // The NaN loss is written as null; the infinite gradient leaves a finite loss.
    assert!(recs[2]["loss"].is_null(), "{}", recs[2]);
    assert!(recs[4]["loss"].as_f64().unwrap().is_finite());
    assert!(recs[4]["grad_norm"].is_null(), "{}", recs[4]);
    // Skipped steps change nothing; good steps do.
    for step in 2..=7 {
        let same = state_bytes(&dir, step - 1) == state_bytes(&dir, step);
        assert_eq!(same, step == 3 || step == 5, "step {step}");
    }
    let st = trainer_state(&dir, 7);
    assert_eq!(st["skipped_steps"], 2);
    assert_eq!(st["bad_in_a_row"], 0);
    // Skipped steps are not trained on: tokens_seen counts the five good ones.
    let tokens: u64 = recs
        .iter()
        .filter(|r| r["skipped"].as_bool() != Some(true))
        .map(|r| r["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(st["tokens_seen"].as_u64().unwrap(), tokens);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn max_bad_steps_in_a_row_stop_the_run() {
    let cfg = config(8, 3);
    let model = cfg.load_model().unwrap();
    let dir = out_dir("stop");
    // Two bad, one good (the count restarts), then bad from step 4 on: the third in a row
    // is step 6.
    let poison: Vec<(usize, Poison)> = [1, 2, 4, 5, 6, 7, 8]
        .iter()
        .map(|&s| (s, Poison::NanLoss))
        .collect();
    let mut engine = Faulty::new(&model, 0, &poison);
    let err = train::run(&cfg, &dir, false, &mut engine, &mut train::Silent).unwrap_err();
    match &err {
        TrainError::NonFinite { step, in_a_row, .. } => {
            assert_eq!((*step, *in_a_row), (6, 3), "{err}");
        }
        other => panic!("expected NonFinite, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("step 6") && msg.contains("3 skipped steps in a row"),
        "{msg}"
    );
    assert!(msg.contains("--max-bad-steps"), "{msg}");
    let recs = train_records(&dir);
    assert_eq!(recs.len(), 6);
    assert_eq!(recs[5]["skipped_total"], 5);
    // The checkpoint before the stop is the one after step 5 and holds only step 3's update.
    assert_eq!(state_bytes(&dir, 5), state_bytes(&dir, 3));
    assert_ne!(state_bytes(&dir, 3), state_bytes(&dir, 2));
    let _ = fs::remove_dir_all(&dir);
}

/// Stops the run after `at` steps (as SIGINT does).
struct StopAt(usize, usize);

impl Observer for StopAt {
    fn step(&mut self, _: &train::metrics::Record, done: usize, _: usize, _: f64) {
        self.1 = done;
    }
    fn should_stop(&mut self) -> bool {
        self.1 >= self.0
    }
}

#[test]
fn the_count_in_a_row_survives_a_resume() {
    let cfg = config(8, 3);
    let model = cfg.load_model().unwrap();
    let dir = out_dir("resume");
    let poison: Vec<(usize, Poison)> = [3, 4, 5, 6].iter().map(|&s| (s, Poison::NanLoss)).collect();
    // Interrupted after step 4 (two bad in a row), then resumed: the third is step 5.
    let mut engine = Faulty::new(&model, 0, &poison);
    let err = train::run(&cfg, &dir, false, &mut engine, &mut StopAt(4, 0)).unwrap_err();
    assert!(
        matches!(err, TrainError::Interrupted { step: 4, .. }),
        "{err}"
    );
    assert_eq!(trainer_state(&dir, 4)["bad_in_a_row"], 2);
    let mut engine = Faulty::new(&model, 4, &poison);
    let err = train::run(&cfg, &dir, true, &mut engine, &mut train::Silent).unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::NonFinite {
                step: 5,
                in_a_row: 3,
                ..
            }
        ),
        "{err}"
    );
    // The metrics of the interrupted part were kept (null losses included) and continued.
    let recs = train_records(&dir);
    let steps: Vec<u64> = recs.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    assert_eq!(recs[4]["skipped_total"], 3);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_loss_spike_is_flagged() {
    use train::metrics::{SpikeDetector, SPIKE_FACTOR, SPIKE_WINDOW};
    let mut d = SpikeDetector::default();
    // Not before the window is full, however large.
    for i in 0..SPIKE_WINDOW {
        assert!(!d.observe(if i == 5 { 1e6 } else { 1.0 }));
    }
    let mut d = SpikeDetector::default();
    for i in 0..SPIKE_WINDOW {
        assert!(!d.observe(2.0 + (i % 3) as f64 * 0.1));
    }
    let mean = (0..SPIKE_WINDOW)
        .map(|i| 2.0 + (i % 3) as f64 * 0.1)
        .sum::<f64>()
        / SPIKE_WINDOW as f64;
    assert!(!d.observe(SPIKE_FACTOR * mean * 0.99));
    // The window moved by one (dropped a 2.0, added ~3x mean): recompute.
    let mut d2 = SpikeDetector::default();
    let mut hist: Vec<f64> = (0..SPIKE_WINDOW)
        .map(|i| 2.0 + (i % 3) as f64 * 0.1)
        .collect();
    for &l in &hist {
        d2.observe(l);
    }
    d2.observe(SPIKE_FACTOR * mean * 0.99);
    hist.remove(0);
    hist.push(SPIKE_FACTOR * mean * 0.99);
    let mean2 = hist.iter().sum::<f64>() / SPIKE_WINDOW as f64;
    assert!(d2.observe(SPIKE_FACTOR * mean2 * 1.01));
    assert!(
        !d.observe(f64::NAN),
        "non-finite losses are skipped steps, not spikes"
    );
}

#[test]
fn a_loss_spike_in_a_run_is_flagged_and_trained_on() {
    use train::metrics::SPIKE_WINDOW;
    let steps = SPIKE_WINDOW + 3;
    let mut cfg = config(steps, 5);
    cfg.save_every = 0;
    let model = cfg.load_model().unwrap();
    let dir = out_dir("spike");
    // One spike before the window is full (not flagged), one after it.
    let poison = [(4, Poison::Spike), (SPIKE_WINDOW + 2, Poison::Spike)];
    let mut engine = Faulty::new(&model, 0, &poison);
    train::run(&cfg, &dir, false, &mut engine, &mut train::Silent).unwrap();
    let recs = train_records(&dir);
    assert_eq!(recs.len(), steps);
    let flagged: Vec<u64> = recs
        .iter()
        .filter(|r| r["loss_spike"].as_bool() == Some(true))
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(flagged, vec![SPIKE_WINDOW as u64 + 2]);
    // A spike is reported, not skipped.
    assert!(recs.iter().all(|r| r.get("skipped").is_none()));
    let _ = fs::remove_dir_all(&dir);
}
