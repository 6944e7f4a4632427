//! `lexp finetune` / `lexp eval` driven as a user drives them: the real binary on the bundled
//! opt-tiny model and E2E slice, with small settings so that the file runs in seconds.
//!
//! - A run killed (SIGKILL) at pseudo-random moments and resumed each time ends with exactly
//!   the loss curve, adapter and optimizer state of an uninterrupted run; a corrupted newest
//!   checkpoint is skipped with a warning and the run still ends the same.
//! - Bad inputs (missing or corrupt safetensors, a config that does not fit the weights, a
//!   malformed or truncated JSONL line, over-long sequences, impossible settings, no GPU, an
//!   existing run directory, a resume with other settings, a missing adapter) fail with a
//!   non-zero exit and a message naming the file, line, tensor or setting at fault, and leave
//!   existing files untouched.
//! - A full disk while checkpointing (a real file-size limit, `prlimit --fsize`) stops the run
//!   with an error naming the file; the previous checkpoint stays intact and `--resume`
//!   continues from it.

use lexp_runtime::checkpoint::SafeTensors;
use lexp_runtime::data::SplitMix64;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LEXP: &str = env!("CARGO_BIN_EXE_lexp");
/// Optimizer steps of the test runs.
const STEPS: usize = 10;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default")
}

fn model_dir() -> PathBuf {
    assets().join("opt-tiny")
}

fn train_data() -> PathBuf {
    assets().join("e2e/train.jsonl")
}

/// A directory of one test, removed when the test ends (also when it fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("lexp-finetune-cli-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// The first 10 lines of the bundled eval slice, as a small eval file.
    fn eval_file(&self) -> PathBuf {
        let text = fs::read_to_string(assets().join("e2e/eval.jsonl")).unwrap();
        let small: String = text.lines().take(10).map(|l| format!("{l}\n")).collect();
        let path = self.join("eval.jsonl");
        fs::write(&path, small).unwrap();
        path
    }

    /// A copy of the bundled model directory.
    fn model_copy(&self, name: &str) -> PathBuf {
        let dir = self.join(name);
        fs::create_dir_all(&dir).unwrap();
        for e in fs::read_dir(model_dir()).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        dir
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `lexp ARGS` with a private cache and no backtraces or colours in its messages.
fn lexp(tmp: &TempDir, args: &[String]) -> Command {
    let mut cmd = Command::new(LEXP);
    cmd.args(args)
        .env("LEXP_CACHE", tmp.join("cache"))
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// The small fine-tuning run of these tests ([`STEPS`] steps), into `out`, with `extra`
/// arguments.
fn finetune_args(
    model: &Path,
    train: &Path,
    eval: &Path,
    out: &Path,
    extra: &[&str],
) -> Vec<String> {
    finetune_steps(model, train, eval, out, STEPS, extra)
}

/// [`finetune_args`] with `steps` optimizer steps.
fn finetune_steps(
    model: &Path,
    train: &Path,
    eval: &Path,
    out: &Path,
    steps: usize,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "finetune",
        "--model",
        &model.display().to_string(),
        "--data",
        &train.display().to_string(),
        "--eval-data",
        &eval.display().to_string(),
        "--batch",
        "4",
        "--max-steps",
        &steps.to_string(),
        "--save-every",
        "2",
        "--device",
        "cpu",
        "--output",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Removes ANSI colour sequences (in case the log formatter colours despite `NO_COLOR`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn stderr_of(out: &Output) -> String {
    strip_ansi(&String::from_utf8_lossy(&out.stderr))
}

/// Runs `cmd` and asserts that it fails cleanly: exit code 1 (an error, not a panic or a
/// signal), no panic message, and every one of `needles` in stderr. Returns stderr.
fn expect_failure(mut cmd: Command, needles: &[&str]) -> String {
    let out = cmd.output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean failure:\n{err}"
    );
    assert!(!err.contains("panicked"), "panic:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}:\n{err}");
    }
    err
}

fn expect_success(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let err = stderr_of(&out);
    assert!(out.status.success(), "run failed:\n{err}");
    assert!(!err.contains("panicked"), "panic:\n{err}");
    err
}

/// The records of `metrics.jsonl`, without the wall times of the steps.
fn metrics(run: &Path) -> Vec<Value> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// Asserts that two runs logged the same curve: train steps 1..=STEPS with bitwise equal
/// losses (and learning rates, gradient norms, token counts), and the same evals.
fn assert_same_metrics(reference: &Path, run: &Path) {
    let (want, got) = (metrics(reference), metrics(run));
    let train = |m: &[Value]| -> Vec<(u64, f64)> {
        m.iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
            .collect()
    };
    let (tw, tg) = (train(&want), train(&got));
    assert_eq!(
        tw.iter().map(|t| t.0).collect::<Vec<_>>(),
        (1..=STEPS as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        tg.iter().map(|t| t.0).collect::<Vec<_>>(),
        tw.iter().map(|t| t.0).collect::<Vec<_>>()
    );
    for ((step, a), (_, b)) in tw.iter().zip(&tg) {
        assert!(
            a.to_bits() == b.to_bits(),
            "step {step}: loss {b:e} of the resumed run differs from {a:e} (uninterrupted)"
        );
    }
    assert_eq!(got, want, "metrics.jsonl records differ");
}

/// Asserts that two safetensors files hold the same tensors, bit for bit.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (a, b) = (SafeTensors::read(a).unwrap(), SafeTensors::read(b).unwrap());
    let names = |s: &SafeTensors| s.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b));
    assert!(!a.is_empty());
    for ta in a.tensors() {
        let tb = b.get(ta.name()).unwrap();
        assert_eq!(
            (ta.dtype(), ta.shape()),
            (tb.dtype(), tb.shape()),
            "{}",
            ta.name()
        );
        assert!(ta.bytes() == tb.bytes(), "tensor {} differs", ta.name());
    }
}

/// Asserts that `run` ended with the adapter and optimizer state of `reference`.
fn assert_same_result(reference: &Path, run: &Path) {
    assert_same_metrics(reference, run);
    let adapter = "adapter/adapter_model.safetensors";
    assert_same_tensors(&reference.join(adapter), &run.join(adapter));
    let last = format!("checkpoints/step-{STEPS:08}/optimizer.safetensors");
    assert_same_tensors(&reference.join(&last), &run.join(&last));
}

/// Steps of the checkpoints in `run` (complete ones only: they are renamed into place).
fn checkpoint_steps(run: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

/// An uninterrupted run into `tmp/name`; returns its directory and wall time.
fn reference_run(tmp: &TempDir, eval: &Path, name: &str) -> (PathBuf, Duration) {
    let dir = tmp.join(name);
    let t0 = Instant::now();
    let err = expect_success(lexp(
        tmp,
        &finetune_args(&model_dir(), &train_data(), eval, &dir, &[]),
    ));
    let took = t0.elapsed();
    assert!(!err.contains("resumed from"), "{err}");
    // The bar is hidden (stderr is not a terminal): evals and progress print as plain lines.
    assert!(err.contains("eval after step 0: loss"), "{err}");
    assert!(
        err.contains(&format!("eval after step {STEPS}: loss")),
        "{err}"
    );
    assert!(
        err.contains(&format!("step {STEPS}/{STEPS}: loss")),
        "{err}"
    );
    (dir, took)
}

/// What one start of the interrupted run did.
struct Start {
    killed: bool,
    /// The checkpoint step it should have resumed from.
    resume_step: Option<usize>,
}

/// Starts the run in `dir` (with `--resume` unless `first`), SIGKILLs it after `delay` if it
/// is still running, and checks that it said where it resumed from.
fn start_and_maybe_kill(
    tmp: &TempDir,
    eval: &Path,
    dir: &Path,
    first: bool,
    (delay, after_checkpoint): (Duration, bool),
    log: &Path,
) -> Start {
    let resume_step = checkpoint_steps(dir).last().copied();
    let extra: &[&str] = if first { &[] } else { &["--resume"] };
    let mut child = lexp(
        tmp,
        &finetune_args(&model_dir(), &train_data(), eval, dir, extra),
    )
    .stdout(Stdio::null())
    .stderr(fs::File::create(log).unwrap())
    .spawn()
    .unwrap();
    // With `after_checkpoint`, the delay counts from the first checkpoint this start writes
    // (so that the next start resumes strictly inside the run however slow the machine is);
    // otherwise from the start.
    let mut deadline = (!after_checkpoint).then(|| Instant::now() + delay);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        match deadline {
            Some(d) if Instant::now() >= d => break None,
            Some(_) => {}
            None => {
                if checkpoint_steps(dir).last().copied() > resume_step {
                    deadline = Some(Instant::now() + delay);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let killed = status.is_none();
    if killed {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let err = strip_ansi(&fs::read_to_string(log).unwrap());
    if let Some(status) = status {
        assert!(status.success(), "a resumed run failed:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    // The line after the start message says whether (and from where) the run resumed.
    let lines: Vec<&str> = err.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.starts_with("training ")) {
        if let Some(next) = lines.get(i + 1) {
            match resume_step {
                Some(k) => {
                    let want = format!("step-{k:08} (step {k})");
                    assert!(
                        next.starts_with("resumed from ") && next.ends_with(&want),
                        "expected a resume from step {k}:\n{err}"
                    );
                }
                None => assert!(!next.starts_with("resumed"), "{err}"),
            }
        }
    }
    if !killed && resume_step.is_some() {
        assert!(err.contains("resumed from"), "{err}");
    }
    Start {
        killed,
        resume_step,
    }
}

/// Kills a run at pseudo-random moments (0.2 s to the duration of an uninterrupted run after
/// each start; every other start 0–0.3 s after it writes its first new checkpoint, so that
/// resumes from inside the run happen however loaded the machine is), resuming it each time, until it finishes by itself; then compares it with the
/// uninterrupted run. Runs are repeated in fresh directories until, over all of them, at
/// least 3 starts were killed mid-run and 2 resumed from a checkpoint strictly inside the run
/// (a start whose delay outlasts it finishes early); every finished run must match.
#[test]
fn killed_and_resumed_run_gives_the_same_loss_curve() {
    let tmp = TempDir::new("kill");
    let eval = tmp.eval_file();
    let (reference, took) = reference_run(&tmp, &eval, "reference");
    let mut rng = SplitMix64::new(0x6b69_6c6c);
    let (lo, hi) = (0.2, took.as_secs_f64().max(0.3));
    let (mut kills, mut resumes_mid_run, mut history) = (0, 0, Vec::new());
    for attempt in 0..8 {
        if kills >= 3 && resumes_mid_run >= 2 {
            break;
        }
        let dir = tmp.join(&format!("killed-{attempt}"));
        let mut finished = false;
        for start in 0..40 {
            let u = rng.next_u64() as f64 / 2f64.powi(64);
            // Every other start is killed shortly after its first new checkpoint, the others
            // anywhere (checkpoint writes included).
            let after_checkpoint = start % 2 == 1;
            let delay = if after_checkpoint {
                0.3 * u
            } else {
                lo + u * (hi - lo)
            };
            let log = tmp.join(&format!("attempt-{attempt}-start-{start}.log"));
            let first = start == 0;
            let s = start_and_maybe_kill(
                &tmp,
                &eval,
                &dir,
                first,
                (Duration::from_secs_f64(delay), after_checkpoint),
                &log,
            );
            history.push(format!(
                "attempt {attempt} start {start}: delay {delay:.2} s{}, resume from {:?}, {}",
                if after_checkpoint {
                    " after a new checkpoint"
                } else {
                    ""
                },
                s.resume_step,
                if s.killed { "killed" } else { "finished" }
            ));
            resumes_mid_run += usize::from(s.resume_step.is_some_and(|k| k > 0 && k < STEPS));
            if !s.killed {
                finished = true;
                break;
            }
            kills += 1;
        }
        let text = history.join("\n");
        assert!(finished, "the run never finished:\n{text}");
        assert_same_result(&reference, &dir);
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{}", history.join("\n"));
    assert!(
        kills >= 3 && resumes_mid_run >= 2,
        "{kills} kills, {resumes_mid_run} resumes mid-run:\n{}",
        history.join("\n")
    );
}

/// A run killed inside a checkpoint write (held open for 300 ms by the fault-injection pause of
/// `lexp_runtime::train::state::FAULT_PAUSE_ENV`, so the kill lands there every time), at the
/// writes of steps 2, 6 and 8 in three starts, each resuming from the last complete
/// checkpoint: the half-written checkpoint never gets its final name, and the final resume
/// ends with the uninterrupted run's result.
#[test]
fn killed_inside_a_checkpoint_write_resumes_to_the_same_result() {
    let tmp = TempDir::new("kill-in-write");
    let eval = tmp.eval_file();
    let (reference, _) = reference_run(&tmp, &eval, "reference");
    let dir = tmp.join("run");
    // Steps of the checkpoints being written (`.step-0000000N.tmp-PID`).
    let half_written = |dir: &Path| -> Vec<usize> {
        fs::read_dir(dir.join("checkpoints"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let rest = n.strip_prefix(".step-")?;
                let (step, _) = rest.split_once(".tmp-")?;
                step.parse().ok()
            })
            .collect()
    };
    for (start, target) in [2usize, 6, 8].into_iter().enumerate() {
        let extra: &[&str] = if start == 0 { &[] } else { &["--resume"] };
        let mut child = lexp(
            &tmp,
            &finetune_args(&model_dir(), &train_data(), &eval, &dir, extra),
        )
        .env(lexp_runtime::train::state::FAULT_PAUSE_ENV, "300")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !half_written(&dir).contains(&target) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "start {start}: the run ended before writing step {target}"
            );
            assert!(
                Instant::now() < deadline,
                "start {start}: no write of step {target}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let complete = checkpoint_steps(&dir);
        assert!(
            !complete.contains(&target) && half_written(&dir).contains(&target),
            "start {start}: step {target} complete {complete:?}"
        );
        assert_eq!(complete.last().copied(), (target > 2).then_some(target - 2));
    }
    // Resume without the pause: from the last complete checkpoint to the end.
    let err = expect_success(lexp(
        &tmp,
        &finetune_args(&model_dir(), &train_data(), &eval, &dir, &["--resume"]),
    ));
    assert!(err.contains("resumed from"), "{err}");
    assert_same_result(&reference, &dir);
}

#[test]
fn corrupt_newest_checkpoint_is_skipped() {
    let tmp = TempDir::new("corrupt");
    let eval = tmp.eval_file();
    let (reference, _) = reference_run(&tmp, &eval, "reference");
    let run = tmp.join("run");
    expect_success(lexp(
        &tmp,
        &finetune_args(&model_dir(), &train_data(), &eval, &run, &[]),
    ));
    assert_eq!(checkpoint_steps(&run), vec![STEPS - 2, STEPS]);
    let newest = run.join(format!(
        "checkpoints/step-{STEPS:08}/adapter_model.safetensors"
    ));
    let mut bytes = fs::read(&newest).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 64..n - 32] {
        *b ^= 0x5a;
    }
    fs::write(&newest, bytes).unwrap();
    let err = expect_success(lexp(
        &tmp,
        &finetune_args(&model_dir(), &train_data(), &eval, &run, &["--resume"]),
    ));
    assert!(
        err.contains("skipping checkpoint")
            && err.contains(&format!("step-{STEPS:08}"))
            && err.contains("adapter_model.safetensors does not match its checksum"),
        "{err}"
    );
    let k = STEPS - 2;
    assert!(err.contains(&format!("step-{k:08} (step {k})")), "{err}");
    // Steps 9 and 10 were trained again, to the same result.
    assert!(
        err.contains(&format!("step {STEPS}/{STEPS}: loss")),
        "{err}"
    );
    assert_same_result(&reference, &run);
}

/// Every file under `dir` with its bytes (to show that a refused command changed nothing).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// A failing `lexp finetune` of the model in `model` (2 steps) into `tmp/out`; asserts that
/// stderr holds `needles` and that no output directory was created.
fn expect_model_error(tmp: &TempDir, model: &Path, needles: &[&str]) -> String {
    let eval = tmp.eval_file();
    let out = tmp.join("out");
    let args = finetune_steps(model, &eval, &eval, &out, 2, &[]);
    let err = expect_failure(lexp(tmp, &args), needles);
    assert!(!out.exists(), "a failed start created {}", out.display());
    err
}

#[test]
fn missing_model_safetensors_is_named() {
    let tmp = TempDir::new("missing-weights");
    let model = tmp.model_copy("model");
    fs::remove_file(model.join("model.safetensors")).unwrap();
    expect_model_error(
        &tmp,
        &model,
        &[&format!(
            "{}: no model.safetensors.index.json or model.safetensors",
            model.display()
        )],
    );
}

#[test]
fn truncated_model_safetensors_names_file_and_tensor() {
    let tmp = TempDir::new("truncated-weights");
    let model = tmp.model_copy("model");
    let file = model.join("model.safetensors");
    let len = fs::metadata(&file).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = expect_model_error(
        &tmp,
        &model,
        &[&format!("{}: tensor `model.decoder.", file.display())],
    );
    assert!(err.contains("exceed the file's data section"), "{err}");
    // Shorter than the header length itself.
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(4)
        .unwrap();
    expect_model_error(
        &tmp,
        &model,
        &[&format!("{}: file is 4 bytes", file.display())],
    );
}

#[test]
fn huge_safetensors_header_length_is_refused() {
    let tmp = TempDir::new("huge-header");
    let model = tmp.model_copy("model");
    let file = model.join("model.safetensors");
    let mut bytes = fs::read(&file).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 47).to_le_bytes());
    fs::write(&file, bytes).unwrap();
    expect_model_error(
        &tmp,
        &model,
        &[&format!(
            "{}: header length {} exceeds",
            file.display(),
            1u64 << 47
        )],
    );
}

#[test]
fn config_that_does_not_fit_the_weights_names_a_tensor() {
    let tmp = TempDir::new("config-mismatch");
    let model = tmp.model_copy("model");
    let config = fs::read_to_string(model.join("config.json")).unwrap();
    let weights = model.join("model.safetensors").display().to_string();
    let cases = [
        (
            "\"hidden_size\": 192",
            "\"hidden_size\": 195",
            "tensor `model.decoder.embed_positions.weight`: shape [1026, 192] does not match the config (expected [1026, 195])",
        ),
        (
            "\"ffn_dim\": 768",
            "\"ffn_dim\": 700",
            "tensor `model.decoder.layers.0.fc1.weight`: shape [768, 192] does not match the config (expected [700, 192])",
        ),
        (
            "\"num_hidden_layers\": 4",
            "\"num_hidden_layers\": 5",
            "missing tensor `model.decoder.layers.4.",
        ),
        (
            "\"num_hidden_layers\": 4",
            "\"num_hidden_layers\": 3",
            "tensor `model.decoder.layers.3.",
        ),
    ];
    for (from, to, needle) in cases {
        assert!(config.contains(from));
        fs::write(model.join("config.json"), config.replace(from, to)).unwrap();
        expect_model_error(&tmp, &model, &[&format!("{weights}: {needle}")]);
    }
}

/// The first `n` lines of the bundled training data with line 3 replaced by `line3`.
fn train_with_line3(tmp: &TempDir, n: usize, line3: &str) -> PathBuf {
    let text = fs::read_to_string(train_data()).unwrap();
    let mut lines: Vec<&str> = text.lines().take(n).collect();
    lines[2] = line3;
    let path = tmp.join("train.jsonl");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn malformed_jsonl_line_is_named() {
    let tmp = TempDir::new("bad-jsonl");
    let eval = tmp.eval_file();
    let out = tmp.join("out");
    for (line, why) in [
        (
            r#"{"prompt": 5}"#,
            "field `prompt` must be a string, found a number",
        ),
        (r#"{"prompt": "a", "completion": "#, "not valid JSON"),
        ("name[Alimentum] is not JSON", "not valid JSON"),
        (r#"{"foo": "bar"}"#, "no known fields"),
    ] {
        let train = train_with_line3(&tmp, 20, line);
        let args = finetune_steps(&model_dir(), &train, &eval, &out, 2, &[]);
        expect_failure(lexp(&tmp, &args), &[&format!("train.jsonl:3: {why}")]);
        assert!(!out.exists());
    }
    let missing = tmp.join("missing.jsonl");
    let args = finetune_steps(&model_dir(), &missing, &eval, &out, 2, &[]);
    expect_failure(
        lexp(&tmp, &args),
        &[&format!("cannot read {}", missing.display())],
    );
}

#[test]
fn overlong_sequences_are_truncated_with_a_warning() {
    let tmp = TempDir::new("long");
    let eval = tmp.eval_file();
    let long = serde_json::json!({
        "prompt": "name[Alimentum], area[city centre]\n",
        "completion": "Alimentum is a restaurant near the river in the city centre. ".repeat(150),
    });
    let train = train_with_line3(&tmp, 20, &long.to_string());
    // Longer than the model's 1024 positions without --max-positions: refused, naming the flag.
    let out = tmp.join("out");
    let args = finetune_steps(
        &model_dir(),
        &train,
        &eval,
        &out,
        2,
        &["--max-seq-len", "2048"],
    );
    expect_failure(
        lexp(&tmp, &args),
        &[
            "--max-seq-len 2048 is longer than the model's 1024 learned positions",
            "--max-positions 2048",
        ],
    );
    assert!(!out.exists());
    // With the table interpolated to 2048 positions, the sequence (about 2.5k tokens) is kept
    // up to 2048 tokens, past the learned 1024.
    let args = finetune_steps(
        &model_dir(),
        &train,
        &eval,
        &out,
        2,
        &["--max-seq-len", "2048", "--max-positions", "2048"],
    );
    let err = expect_success(lexp(&tmp, &args));
    assert!(err.contains("train.jsonl:3: truncated from "), "{err}");
    assert!(err.contains(" to 2048 tokens"), "{err}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    let run: Value =
        serde_json::from_str(&fs::read_to_string(out.join("run_config.json")).unwrap()).unwrap();
    assert_eq!(run["max_positions"], 2048, "{run}");
    // --max-positions alone sets the sequence limit; a shorter --max-seq-len truncates.
    let out = tmp.join("out-1500");
    let args = finetune_steps(
        &model_dir(),
        &train,
        &eval,
        &out,
        2,
        &["--max-positions", "4096", "--max-seq-len", "1500"],
    );
    let err = expect_success(lexp(&tmp, &args));
    assert!(err.contains(" to 1500 tokens"), "{err}");
    // Above --max-positions, or a table that would shrink.
    for (extra, why) in [
        (
            &["--max-positions", "1500", "--max-seq-len", "2048"][..],
            "--max-seq-len 2048 is longer than --max-positions 1500",
        ),
        (
            &["--max-positions", "512"][..],
            "--max-positions 512 is below the model's 1024 learned positions",
        ),
    ] {
        let out = tmp.join("out-refused");
        let args = finetune_steps(&model_dir(), &train, &eval, &out, 2, extra);
        expect_failure(lexp(&tmp, &args), &[why]);
        assert!(!out.exists());
    }
    // Longer than --max-seq-len.
    let out = tmp.join("out-64");
    let args = finetune_steps(
        &model_dir(),
        &train,
        &eval,
        &out,
        2,
        &["--max-seq-len", "64", "--micro-batch-tokens", "512"],
    );
    let err = expect_success(lexp(&tmp, &args));
    assert!(err.contains("train.jsonl:3: truncated from "), "{err}");
    assert!(err.contains(" to 64 tokens"), "{err}");
    // A sequence length that no micro-batch can hold.
    let out = tmp.join("out-bad");
    let args = finetune_steps(
        &model_dir(),
        &train,
        &eval,
        &out,
        2,
        &[
            "--max-seq-len",
            "2048",
            "--max-positions",
            "2048",
            "--micro-batch-tokens",
            "1024",
        ],
    );
    expect_failure(
        lexp(&tmp, &args),
        &["invalid settings: the micro-batch token budget (1024) must hold the longest sequence (2048 tokens)"],
    );
    assert!(!out.exists());
}

#[test]
fn device_choice_without_gpu() {
    let tmp = TempDir::new("device");
    let eval = tmp.eval_file();
    let gpu = lexp_runtime::CudaDevice::new(0).is_ok();
    let out = tmp.join("out");
    let mut args = finetune_steps(&model_dir(), &eval, &eval, &out, 1, &[]);
    let device = args.iter().position(|a| a == "--device").unwrap() + 1;
    args[device] = "cuda".into();
    if gpu {
        // The GPU engine runs opt-tiny, with dropout too.
        let err = expect_success(lexp(&tmp, &args));
        assert!(err.contains("device: cuda"), "{err}");
        std::fs::remove_dir_all(&out).unwrap();
        let mut with_dropout = args.clone();
        with_dropout.extend(["--lora-dropout".to_string(), "0.1".to_string()]);
        let err = expect_success(lexp(&tmp, &with_dropout));
        assert!(err.contains("device: cuda"), "{err}");
        std::fs::remove_dir_all(&out).unwrap();
    } else {
        expect_failure(lexp(&tmp, &args), &["--device cuda: no usable CUDA GPU"]);
    }
    assert!(!out.exists());
    args[device] = "auto".into();
    let err = expect_success(lexp(&tmp, &args));
    if gpu {
        assert!(err.contains("device: cuda"), "{err}");
    } else {
        assert!(err.contains("device: cpu"), "{err}");
        assert!(
            err.contains("no usable GPU (") && err.contains("); training on the CPU"),
            "{err}"
        );
    }
}

#[test]
fn existing_run_is_refused_without_loss() {
    let tmp = TempDir::new("existing");
    let eval = tmp.eval_file();
    let out = tmp.join("run");
    let args = |extra: &[&str]| finetune_steps(&model_dir(), &train_data(), &eval, &out, 2, extra);
    expect_success(lexp(&tmp, &args(&[])));
    let before = snapshot(&out);
    assert!(before
        .iter()
        .any(|(p, b)| p.ends_with("metrics.jsonl") && !b.is_empty()));
    expect_failure(
        lexp(&tmp, &args(&[])),
        &[&format!(
            "{} already holds a run; pass --resume",
            out.display()
        )],
    );
    assert!(
        snapshot(&out) == before,
        "a refused start changed the run directory"
    );
    expect_failure(
        lexp(&tmp, &args(&["--resume", "--lr", "0.001"])),
        &[
            &format!("{} holds a run with different settings", out.display()),
            "lr: saved 0.0005, requested 0.001",
        ],
    );
    assert!(
        snapshot(&out) == before,
        "a refused resume changed the run directory"
    );
    // Resuming the finished run (eval cadence may differ) redoes nothing: same metrics (the
    // final eval is not logged twice), same adapter.
    let err = expect_success(lexp(&tmp, &args(&["--resume", "--eval-every", "1"])));
    assert!(err.contains("step-00000002 (step 2)"), "{err}");
    let after = snapshot(&out);
    for name in ["metrics.jsonl", "adapter/adapter_model.safetensors"] {
        let file = |s: &[(PathBuf, Vec<u8>)]| s.iter().find(|(p, _)| p.ends_with(name)).cloned();
        assert!(file(&after) == file(&before), "{name} changed");
    }
}

#[test]
fn eval_windows_beyond_the_learned_positions_need_max_positions() {
    let tmp = TempDir::new("eval-positions");
    let text = tmp.join("text.txt");
    let words = "the restaurant near the river serves cheap food in the city centre. ";
    fs::write(&text, words.repeat(200)).unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        let model = model_dir().display().to_string();
        let data = text.display().to_string();
        let mut a = vec!["eval", "--model", &model, "--data", &data];
        a.extend(extra);
        a.into_iter().map(String::from).collect()
    };
    expect_failure(
        lexp(&tmp, &args(&["--text-windows", "1500"])),
        &[
            "--text-windows 1500 is longer than the model's 1024 learned positions",
            "--max-positions 1500",
        ],
    );
    let out = lexp(
        &tmp,
        &args(&["--text-windows", "1500", "--max-positions", "1500"]),
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("loss "), "{stdout}");
}

#[test]
fn eval_names_a_missing_adapter_file() {
    let tmp = TempDir::new("eval-adapter");
    let eval = tmp.eval_file();
    let model = model_dir().display().to_string();
    let eval_args = |adapter: &Path| -> Vec<String> {
        [
            "eval",
            "--model",
            &model,
            "--data",
            &eval.display().to_string(),
            "--adapter",
            &adapter.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let missing = tmp.join("no-such-adapter");
    expect_failure(
        lexp(&tmp, &eval_args(&missing)),
        &[&format!(
            "{}: no such file",
            missing.join("adapter_config.json").display()
        )],
    );
    // A directory with the config but not the weights.
    let half = tmp.join("half-adapter");
    fs::create_dir_all(&half).unwrap();
    let run = tmp.join("run");
    expect_success(lexp(
        &tmp,
        &finetune_steps(&model_dir(), &eval, &eval, &run, 1, &[]),
    ));
    fs::copy(
        run.join("adapter/adapter_config.json"),
        half.join("adapter_config.json"),
    )
    .unwrap();
    expect_failure(
        lexp(&tmp, &eval_args(&half)),
        &[&format!(
            "{}: no such file",
            half.join("adapter_model.safetensors").display()
        )],
    );
    // The whole adapter evaluates.
    let out = lexp(&tmp, &eval_args(&run.join("adapter")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("eval.jsonl: 10 examples") && stdout.contains("perplexity"),
        "{stdout}"
    );
}

/// SIGINT mid-run: the run finishes its step, writes a checkpoint of exactly the steps it
/// logged, exits with status 130 and says how to continue; `--resume` then ends with the
/// uninterrupted run's metrics, adapter and optimizer state.
#[test]
fn sigint_stops_after_a_step_with_a_checkpoint() {
    signal_stops_after_a_step_with_a_checkpoint("INT");
}

/// SIGTERM (what `kill` and job schedulers send) behaves as SIGINT.
#[test]
fn sigterm_stops_after_a_step_with_a_checkpoint() {
    signal_stops_after_a_step_with_a_checkpoint("TERM");
}

/// Sends `SIG<signal>` after two logged steps and checks the clean stop and the resume.
fn signal_stops_after_a_step_with_a_checkpoint(signal: &str) {
    let tmp = TempDir::new(&format!("sig{}", signal.to_lowercase()));
    let eval = tmp.eval_file();
    let (reference, _) = reference_run(&tmp, &eval, "reference");
    let dir = tmp.join("interrupted");
    // No periodic checkpoints: the one after the signal is the only one before the end.
    let mut args = finetune_args(&model_dir(), &train_data(), &eval, &dir, &[]);
    let every = args.iter().position(|a| a == "--save-every").unwrap() + 1;
    args[every] = "0".into();
    let child = lexp(&tmp, &args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for two logged steps, then interrupt.
    let t0 = Instant::now();
    let trained = |dir: &Path| {
        let text = fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(r#""kind":"train""#))
            .count()
    };
    while trained(&dir) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run did not start training"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args([format!("-{signal}").as_str(), &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped by a signal after step"), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let logged = trained(&dir);
    assert!(logged < STEPS, "the signal came after the run ended: {err}");
    assert_eq!(checkpoint_steps(&dir), vec![logged], "{err}");
    let resumed = expect_success(lexp(&tmp, &[args, vec!["--resume".into()]].concat()));
    assert!(resumed.contains(&format!("(step {logged})")), "{resumed}");
    assert_same_result(&reference, &dir);
}

/// Copies the directory tree `from` to `to`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Disk full while checkpointing, with a real limit: the resumed run is spawned under
/// `prlimit --fsize` (RLIMIT_FSIZE, SIGXFSZ ignored so that the write fails with EFBIG as a
/// full disk fails with ENOSPC) below the size of `optimizer.safetensors`, so its first
/// checkpoint cannot be written. It stops with an error naming the file; the previous
/// checkpoint is untouched and verifies; a resume without the limit ends with exactly the
/// uninterrupted run's result.
#[test]
fn disk_full_while_checkpointing_keeps_the_previous_checkpoint() {
    let tmp = TempDir::new("disk-full");
    let eval = tmp.eval_file();
    let keep = ["--keep-checkpoints", "100"];
    let reference = tmp.join("reference");
    let args = finetune_args(&model_dir(), &train_data(), &eval, &reference, &keep);
    expect_success(lexp(&tmp, &args));
    assert_eq!(checkpoint_steps(&reference), vec![2, 4, 6, 8, 10]);
    // The state of a run killed after its checkpoint of step 4.
    let dir = tmp.join("run");
    copy_tree(&reference, &dir);
    for step in [6, 8, 10] {
        fs::remove_dir_all(dir.join(format!("checkpoints/step-{step:08}"))).unwrap();
    }
    fs::remove_dir_all(dir.join("adapter")).unwrap();
    for f in ["summary.json", "loss_curve.png"] {
        fs::remove_file(dir.join(f)).unwrap();
    }
    let step4 = dir.join("checkpoints/step-00000004");
    let before = snapshot(&step4);
    let ck = |name: &str| fs::metadata(step4.join(name)).unwrap().len();
    let (adapter, optimizer) = (ck("adapter_model.safetensors"), ck("optimizer.safetensors"));
    let metrics_len = fs::metadata(dir.join("metrics.jsonl")).unwrap().len();
    assert!(adapter < optimizer && metrics_len < adapter);
    let limit = (adapter + optimizer) / 2;

    // Resume under the file-size limit.
    let args = finetune_args(
        &model_dir(),
        &train_data(),
        &eval,
        &dir,
        &[&keep[..], &["--resume"]].concat(),
    );
    let base = lexp(&tmp, &[]);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"trap '' XFSZ; exec prlimit --fsize="$0" -- "$@""#)
        .arg(limit.to_string())
        .arg(LEXP)
        .args(&args)
        .stdin(Stdio::null());
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let err = expect_failure(
        cmd,
        &[
            "checkpoint not written (the previous one is intact)",
            ".step-00000006.tmp-",
            "optimizer.safetensors",
            "File too large",
        ],
    );
    assert!(
        err.contains("(step 4)"),
        "did not resume from step 4:\n{err}"
    );
    assert_eq!(checkpoint_steps(&dir), vec![2, 4], "{err}");
    assert_eq!(snapshot(&step4), before, "the previous checkpoint changed");
    let state = lexp_runtime::train::state::verify_checkpoint(&step4).unwrap();
    assert_eq!(state.step, 4);
    assert!(!dir.join("adapter").exists());

    // Space again: the resume continues from step 4 to the uninterrupted result.
    let resumed = expect_success(lexp(&tmp, &args));
    assert!(resumed.contains("(step 4)"), "{resumed}");
    assert_same_result(&reference, &dir);
    assert_eq!(checkpoint_steps(&dir), vec![2, 4, 6, 8, 10]);
    // The half-written checkpoint of the failed run was cleared.
    let leftovers: Vec<_> = fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A JSONL file cut off in the middle of its last line (a copy that ran out of space, a
/// partial download): a clean error naming that line, not a silently shorter data set.
#[test]
fn truncated_jsonl_names_its_last_line() {
    let tmp = TempDir::new("truncated-jsonl");
    let eval = tmp.eval_file();
    let out = tmp.join("out");
    let text = fs::read_to_string(train_data()).unwrap();
    let lines: Vec<&str> = text.lines().take(20).collect();
    let mut cut = lines.join("\n");
    cut.truncate(cut.len() - lines[19].len() / 2);
    let train = tmp.join("train.jsonl");
    fs::write(&train, &cut).unwrap();
    let args = finetune_steps(&model_dir(), &train, &eval, &out, 2, &[]);
    expect_failure(lexp(&tmp, &args), &["train.jsonl:20: not valid JSON"]);
    assert!(!out.exists());
    // The same lines complete (no final newline) train.
    fs::write(&train, lines.join("\n")).unwrap();
    expect_success(lexp(&tmp, &args));
}
