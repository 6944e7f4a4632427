//! `lexp finetune --workers N`: data-parallel fine-tuning in real worker processes on the CPU
//! (issue 9, acceptance 4), on the bundled opt-tiny model and E2E slice with a small
//! micro-batch budget, so that every optimizer step splits into several micro-batches and
//! every worker computes a real share of it.
//!
//! - Two workers log the same per-step losses as one process (within 1e-5 relative: only the
//!   f32 summation order of the gradients differs), and only rank 0 writes files.
//! - A worker killed with SIGKILL makes the launcher exit non-zero within 60 s, naming the
//!   worker and the signal; `--resume` with a different number of workers (3) continues from
//!   rank 0's last checkpoint and ends on the one-process loss curve.

use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LEXP: &str = env!("CARGO_BIN_EXE_lexp");
/// Optimizer steps of the test runs.
const STEPS: usize = 16;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default")
}

/// A directory of one test, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("lexp-dp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The run of these tests into `out`: 8 examples per step packed into micro-batches of at
/// most 128 tokens (5–6 per step), with `extra` arguments.
fn finetune(tmp: &TempDir, out: &Path, extra: &[&str]) -> Command {
    let text = fs::read_to_string(assets().join("e2e/eval.jsonl")).unwrap();
    let eval = tmp.join("eval.jsonl");
    let small: String = text.lines().take(10).map(|l| format!("{l}\n")).collect();
    fs::write(&eval, small).unwrap();
    let mut cmd = Command::new(LEXP);
    cmd.arg("finetune")
        .arg("--model")
        .arg(assets().join("opt-tiny"))
        .arg("--data")
        .arg(assets().join("e2e/train.jsonl"))
        .arg("--eval-data")
        .arg(&eval)
        .args([
            "--batch",
            "8",
            "--micro-batch-tokens",
            "128",
            "--max-seq-len",
            "128",
        ])
        .args(["--max-steps", &STEPS.to_string(), "--save-every", "2"])
        .args(["--device", "cpu", "--output"])
        .arg(out)
        .args(extra)
        .env("LEXP_CACHE", tmp.join("cache"))
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RUST_LOG")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdin(Stdio::null());
    cmd
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "run failed:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// `(step, loss, targets)` of the records of `kind` (`train`, `eval`) in `run`'s metrics.
fn records(run: &Path, kind: &str) -> Vec<(u64, f64, u64)> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == kind)
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"].as_f64().unwrap(),
                r["targets"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The train records of `run`.
fn losses(run: &Path) -> Vec<(u64, f64, u64)> {
    records(run, "train")
}

/// The eval records of `run`.
fn evals(run: &Path) -> Vec<(u64, f64, u64)> {
    records(run, "eval")
}

fn assert_close_losses(reference: &Path, run: &Path) {
    let (want, got) = (losses(reference), losses(run));
    assert_eq!(
        want.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=STEPS as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        got.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>(),
        want.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>(),
        "steps or targets differ"
    );
    for ((step, a, _), (_, b, _)) in want.iter().zip(&got) {
        let rel = ((a - b) / a).abs();
        assert!(
            rel <= 1e-5,
            "step {step}: loss {b} vs one process {a} (rel {rel:e})"
        );
    }
    // Not trivially equal: the adapter trains (the loss moves over the run).
    assert!(want.iter().any(|r| (r.1 - want[0].1).abs() > 1e-3));
}

/// The one-process reference run.
fn reference(tmp: &TempDir) -> PathBuf {
    let dir = tmp.join("one");
    run_ok(finetune(tmp, &dir, &[]));
    dir
}

#[test]
fn two_workers_match_one_process_and_only_rank_zero_writes() {
    let tmp = TempDir::new("match");
    let one = reference(&tmp);
    let two = tmp.join("two");
    let err = run_ok(finetune(&tmp, &two, &["--workers", "2"]));
    assert!(err.contains("launching 2 data-parallel workers"), "{err}");
    assert!(err.contains("data parallel: rank 0 of 2"), "{err}");
    assert_close_losses(&one, &two);
    // Rank 0's files, once: the same set as one process writes.
    let names = |d: &Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&two), names(&one));
    assert_eq!(
        names(&two.join("checkpoints")),
        names(&one.join("checkpoints"))
    );
    // Each step logged once (a second writer would duplicate lines).
    assert_eq!(losses(&two).len(), STEPS);
    // The evaluations, shared between the workers and reduced: the same targets, the same
    // mean up to the f64 summation order (and the adapter's f32 differences).
    let (ev1, ev2) = (evals(&one), evals(&two));
    assert_eq!(ev1.len(), 2, "{ev1:?}");
    assert_eq!(
        ev2.iter().map(|e| (e.0, e.2)).collect::<Vec<_>>(),
        ev1.iter().map(|e| (e.0, e.2)).collect::<Vec<_>>()
    );
    for (a, b) in ev1.iter().zip(&ev2) {
        assert!(((a.1 - b.1) / a.1).abs() < 1e-5, "eval {a:?} vs {b:?}");
    }
}

/// The pid of the worker with `RANK=rank` among the children of `parent`.
fn worker_pid(parent: u32, rank: usize) -> Option<u32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces): state, ppid, ...
        let after = &stat[stat.rfind(')')? + 2..];
        let ppid: u32 = after.split(' ').nth(1)?.parse().ok()?;
        if ppid != parent {
            continue;
        }
        let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn killed_worker_stops_the_launcher_and_resume_continues_with_other_worker_count() {
    let tmp = TempDir::new("kill");
    let one = reference(&tmp);
    let dir = tmp.join("dp");
    let mut launcher = finetune(&tmp, &dir, &["--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for rank 0's first checkpoint, then SIGKILL worker 1.
    let t0 = Instant::now();
    let first = dir.join("checkpoints/step-00000002/trainer_state.json");
    while !first.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the run ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = worker_pid(launcher.id(), 1).expect("worker 1 is a child of the launcher");
    let killed_at = Instant::now();
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = launcher.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        took < Duration::from_secs(60),
        "the launcher took {took:?}:\n{err}"
    );
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("worker 1 was killed by signal 9 (SIGKILL)"),
        "{err}"
    );
    // Rank 0 saw its peer vanish and said so (its error names rank 1).
    assert!(err.contains("rank 1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let done = losses(&dir).len();
    assert!(
        done < STEPS,
        "the kill came too late to test a resume ({done} steps done)"
    );

    // Resume with three workers: from rank 0's last checkpoint to the end, on the
    // one-process curve.
    let err = run_ok(finetune(&tmp, &dir, &["--workers", "3", "--resume"]));
    assert!(err.contains("resumed from"), "{err}");
    assert_close_losses(&one, &dir);
}

#[test]
fn torchrun_variables_are_checked_before_anything_runs() {
    let tmp = TempDir::new("env");
    let out = finetune(&tmp, &tmp.join("x"), &[])
        .env("RANK", "2")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("RANK=\"2\" is invalid") && err.contains("below WORLD_SIZE=2"),
        "{err}"
    );
    // A worker whose rank 0 never comes: a clear error at the join deadline.
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t0 = Instant::now();
    let out = finetune(&tmp, &tmp.join("y"), &[])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("LEXP_DIST_JOIN_TIMEOUT_S", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert!(err.contains("joining the data-parallel group"), "{err}");
    assert!(err.contains("rank 1") && err.contains("rank 0"), "{err}");
    assert!(!tmp.join("y").exists(), "a failed worker wrote files");
    // The launcher flag inside a worker, and zero workers, are refused.
    for (env, flag, needle) in [
        (true, "2", "given to a worker of a distributed run"),
        (false, "0", "must be at least 1"),
    ] {
        let mut cmd = finetune(&tmp, &tmp.join("z"), &["--workers", flag]);
        if env {
            cmd.env("RANK", "0")
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string());
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn sigterm_to_the_launcher_stops_every_worker_after_the_same_step() {
    let tmp = TempDir::new("term");
    let one = reference(&tmp);
    let dir = tmp.join("dp");
    let mut launcher = finetune(&tmp, &dir, &["--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while losses_so_far(&dir) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the run ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = Command::new("kill")
        .args(["-TERM", &launcher.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("all 2 workers stopped after the same step"),
        "{err}"
    );
    let done = losses(&dir).len();
    assert!(done < STEPS, "the stop came too late ({done} steps)");
    // The checkpoint of the agreed step, written once by rank 0.
    assert!(
        err.contains(&format!("stopped by a signal after step {done}")),
        "{err}"
    );
    assert!(dir
        .join(format!("checkpoints/step-{done:08}/trainer_state.json"))
        .exists());
    // One process resumes it: data parallelism leaves nothing in the checkpoint.
    let err = run_ok(finetune(&tmp, &dir, &["--resume"]));
    assert!(err.contains("resumed from"), "{err}");
    assert_close_losses(&one, &dir);
}

/// Train records in `run`'s metrics so far (0 before the file exists).
fn losses_so_far(run: &Path) -> usize {
    fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("\"kind\":\"train\""))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn workers_exit_when_the_launcher_is_killed() {
    let tmp = TempDir::new("orphan");
    let dir = tmp.join("dp");
    let mut launcher = finetune(&tmp, &dir, &["--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while losses_so_far(&dir) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the run ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pids: Vec<u32> = (0..2)
        .map(|r| worker_pid(launcher.id(), r).unwrap())
        .collect();
    launcher.kill().unwrap(); // SIGKILL: the launcher cannot stop its workers itself
    launcher.wait().unwrap();
    let alive = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(false)
    };
    let killed_at = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "orphaned workers still run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        losses_so_far(&dir) < STEPS,
        "the run finished before the test killed it"
    );
}
