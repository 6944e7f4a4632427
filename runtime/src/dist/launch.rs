//! The local launcher of `lexp finetune --workers N` (`--gpus N`): starts N copies of a
//! program with torchrun's variables, streams rank 0's output, and supervises them: when a
//! worker exits with an error or by a signal, the others get a short grace period to report
//! their own errors, then are killed, and the launch fails naming the worker — never a
//! silent hang.

use super::DistError;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of a non-zero rank's stderr kept to show when it fails.
const TAIL_LINES: usize = 40;

/// What to launch.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The worker program (the current executable).
    pub program: PathBuf,
    /// Its arguments (without the launcher's own flags).
    pub args: Vec<OsString>,
    /// Number of workers.
    pub workers: usize,
    /// One GPU per worker: `CUDA_VISIBLE_DEVICES` selects entry `LOCAL_RANK` of the visible
    /// devices.
    pub gpus: bool,
    /// How long the others may take to exit on their own after a worker failed.
    pub grace: Duration,
}

/// How a launch failed: the first worker that failed, and the exit code to pass on.
#[derive(Clone, Debug)]
pub struct LaunchFailure {
    /// The first failed worker's rank.
    pub worker: usize,
    /// `worker K exited with …` for it and every other failed worker.
    pub message: String,
    /// Exit code for the launcher (the worker's, or 1 after a signal).
    pub code: i32,
    /// Every worker exited with status 130: they stopped together after a stop request
    /// (SIGINT/SIGTERM), rank 0 having written a checkpoint; not a crash.
    pub interrupted: bool,
}

/// A port on 127.0.0.1 that was free a moment ago (bound with port 0 and released).
pub fn free_port() -> Result<u16, DistError> {
    let l = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| DistError::Launch(format!("cannot find a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| DistError::Launch(format!("cannot find a free port: {e}")))
}

/// `args` without the launcher flags `flags` (`--flag N` and `--flag=N`).
pub fn strip_flags(args: &[OsString], flags: &[&str]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if flags.iter().any(|f| s == *f) {
            skip_next = true;
            continue;
        }
        if flags.iter().any(|f| s.starts_with(&format!("{f}="))) {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// "exited with status 3" / "was killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = match s {
                1 => " (SIGHUP)",
                2 => " (SIGINT)",
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            format!("was killed by signal {s}{name}")
        }
        _ => format!("exited ({status})"),
    }
}

/// The `CUDA_VISIBLE_DEVICES` of GPU worker `local_rank`: that entry of the visible devices
/// when the variable is set, else the index itself.
fn cuda_device(local_rank: usize) -> String {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .nth(local_rank)
            .map(|d| d.trim().to_string())
            .unwrap_or_else(|| local_rank.to_string()),
        _ => local_rank.to_string(),
    }
}

/// Set by the launcher in every worker: its own pid ([`exit_with_launcher`]).
pub const LAUNCHER_PID_VAR: &str = "LEXP_LAUNCHER_PID";

/// In a worker started by [`launch`]: a thread that exits this process (status 1, with a
/// message) when the launcher is gone (killed with SIGKILL, it could not stop its workers),
/// seen as this process's parent changing. Does nothing outside such a worker.
pub fn exit_with_launcher() {
    let Some(launcher) = std::env::var(LAUNCHER_PID_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    else {
        return;
    };
    if std::os::unix::process::parent_id() != launcher {
        return; // not started by that launcher (e.g. the variable leaked into a shell)
    }
    let spawned = std::thread::Builder::new()
        .name("launcher-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if std::os::unix::process::parent_id() != launcher {
                eprintln!("the launcher (pid {launcher}) is gone; this worker stops");
                std::process::exit(1);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch the launcher: {e}");
    }
}

/// A started worker.
struct Worker {
    child: Child,
    status: Option<ExitStatus>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
}

/// Starts `spec.workers` workers and waits for them. `Ok` when all exit with status 0;
/// otherwise the failure (after the others have exited or been killed). `stop` is polled: when
/// it turns true (the launcher got SIGTERM), each worker gets SIGTERM once and the launcher
/// keeps supervising (workers stop after an agreed step and checkpoint).
pub fn launch(
    spec: &LaunchSpec,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Result<(), LaunchFailure>, DistError> {
    if spec.workers == 0 {
        return Err(DistError::Launch("--workers must be at least 1".into()));
    }
    let port = free_port()?;
    let mut workers: Vec<Worker> = Vec::with_capacity(spec.workers);
    for rank in 0..spec.workers {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", spec.workers.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", spec.workers.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            // NVLink multicast stays off in every worker (KINDS.md; issue 9).
            .env("NCCL_NVLS_ENABLE", "0")
            .env(LAUNCHER_PID_VAR, std::process::id().to_string())
            .stdin(Stdio::null());
        if spec.gpus {
            cmd.env("CUDA_VISIBLE_DEVICES", cuda_device(rank));
        }
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut workers);
                return Err(DistError::Launch(format!(
                    "cannot start worker {rank} ({}): {e}",
                    spec.program.display()
                )));
            }
        };
        let tail = child.stderr.take().map(|err| {
            let tail = Arc::new(Mutex::new(VecDeque::new()));
            let keep = Arc::clone(&tail);
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                    if let Ok(mut t) = keep.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            });
            tail
        });
        workers.push(Worker {
            child,
            status: None,
            tail,
        });
    }
    tracing::debug!(
        "started {} workers, rendezvous on 127.0.0.1:{port}",
        spec.workers
    );

    let mut failed: Vec<usize> = Vec::new();
    let mut give_up_at: Option<Instant> = None;
    let mut forwarded = false;
    loop {
        if !forwarded && stop.load(std::sync::atomic::Ordering::Relaxed) {
            forwarded = true;
            for w in workers.iter().filter(|w| w.status.is_none()) {
                terminate(w.child.id());
            }
        }
        // Workers found exited in this round; one killed by a signal is named first (it is the
        // cause, the others' errors are its consequence).
        let mut now_failed: Vec<usize> = Vec::new();
        for (rank, w) in workers.iter_mut().enumerate() {
            if w.status.is_some() {
                continue;
            }
            match w.child.try_wait() {
                Ok(Some(st)) => {
                    w.status = Some(st);
                    if !st.success() {
                        now_failed.push(rank);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    kill_all(&mut workers);
                    return Err(DistError::Launch(format!(
                        "cannot wait for worker {rank}: {e}"
                    )));
                }
            }
        }
        now_failed.sort_by_key(|&r| {
            workers[r]
                .status
                .map_or(1, |s| u8::from(s.code().is_some()))
        });
        failed.extend(now_failed);
        if workers.iter().all(|w| w.status.is_some()) {
            break;
        }
        if !failed.is_empty() {
            let at = *give_up_at.get_or_insert_with(|| Instant::now() + spec.grace);
            if Instant::now() >= at {
                kill_all(&mut workers);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(&first) = failed.first() else {
        return Ok(Ok(()));
    };
    let mut lines = Vec::new();
    for (i, &rank) in failed.iter().enumerate() {
        let w = &workers[rank];
        let how = w
            .status
            .map(describe)
            .unwrap_or_else(|| "did not exit".into());
        lines.push(format!(
            "{}worker {rank} {how}",
            if i == 0 { "" } else { "then " }
        ));
    }
    for (rank, w) in workers.iter().enumerate() {
        if !failed.contains(&rank) && w.status.is_some_and(|s| s.signal() == Some(9)) {
            lines.push(format!("worker {rank} was killed by the launcher"));
        }
    }
    let mut message = lines.join("; ");
    for &rank in &failed {
        if let Some(tail) = &workers[rank].tail {
            if let Ok(t) = tail.lock() {
                if !t.is_empty() {
                    message.push_str(&format!("\n--- last lines of worker {rank}'s stderr ---\n"));
                    message.push_str(&t.iter().cloned().collect::<Vec<_>>().join("\n"));
                }
            }
        }
    }
    let code = workers[first]
        .status
        .and_then(|s| s.code())
        .filter(|&c| c != 0)
        .unwrap_or(1);
    let interrupted = workers
        .iter()
        .all(|w| w.status.and_then(|s| s.code()) == Some(130));
    Ok(Err(LaunchFailure {
        worker: first,
        message,
        code,
        interrupted,
    }))
}

/// SIGKILLs every worker still running and reaps them.
fn kill_all(workers: &mut [Worker]) {
    for w in workers.iter_mut().filter(|w| w.status.is_none()) {
        let _ = w.child.kill();
        w.status = w.child.wait().ok();
    }
}

/// Sends SIGTERM to `pid` (through `kill(1)`: the runtime has no libc binding of its own).
fn terminate(pid: u32) {
    let r = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = r {
        tracing::warn!("cannot forward SIGTERM to worker pid {pid}: {e}");
    }
}

/// Whether `arg` names one of `flags`.
pub fn has_flag(args: &[OsString], flags: &[&str]) -> bool {
    args.iter().any(|a| {
        let s = a.to_string_lossy();
        flags
            .iter()
            .any(|f| s == *f || s.starts_with(&format!("{f}=")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsStr::new).map(OsStr::to_os_string).collect()
    }

    #[test]
    fn launcher_flags_are_stripped() {
        let args = os(&[
            "finetune",
            "--workers",
            "2",
            "--batch",
            "4",
            "--gpus=3",
            "--output",
            "x",
        ]);
        assert_eq!(
            strip_flags(&args, &["--workers", "--gpus"]),
            os(&["finetune", "--batch", "4", "--output", "x"])
        );
        assert!(has_flag(&args, &["--output"]));
        assert!(!has_flag(&args, &["-o"]));
    }

    fn sh(script: &str, workers: usize) -> Result<(), LaunchFailure> {
        let spec = LaunchSpec {
            program: "/bin/sh".into(),
            args: os(&["-c", script]),
            workers,
            gpus: false,
            grace: Duration::from_secs(2),
        };
        launch(&spec, &std::sync::atomic::AtomicBool::new(false)).unwrap()
    }

    #[test]
    fn all_workers_succeeding_is_success_and_they_see_torchrun_variables() {
        let script = r#"test "$WORLD_SIZE" = 3 && test "$RANK" = "$LOCAL_RANK" \
            && test "$NCCL_NVLS_ENABLE" = 0 && test "$MASTER_ADDR" = 127.0.0.1 \
            && test "$MASTER_PORT" -gt 0"#;
        sh(script, 3).unwrap();
    }

    #[test]
    fn a_failing_worker_stops_the_others_and_is_named() {
        // Worker 1 fails at once; the others would sleep for a minute.
        let t0 = Instant::now();
        let script = r#"if [ "$RANK" = 1 ]; then echo "rank one broke" >&2; exit 7; fi; sleep 60"#;
        let f = sh(script, 3).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        assert_eq!((f.worker, f.code, f.interrupted), (1, 7, false));
        assert!(
            f.message.starts_with("worker 1 exited with status 7"),
            "{}",
            f.message
        );
        assert!(f.message.contains("rank one broke"), "{}", f.message);
        assert!(
            f.message.contains("killed by the launcher"),
            "{}",
            f.message
        );
    }

    #[test]
    fn workers_stopping_together_after_a_signal_are_an_interruption() {
        let f = sh("exit 130", 2).unwrap_err();
        assert!(f.interrupted && f.code == 130, "{f:?}");
        let f = sh(r#"if [ "$RANK" = 1 ]; then exit 130; fi; exit 1"#, 2).unwrap_err();
        assert!(!f.interrupted, "{f:?}");
    }

    #[test]
    fn a_worker_killed_by_a_signal_is_named() {
        let script = r#"if [ "$RANK" = 1 ]; then kill -9 $$; fi; sleep 60"#;
        let f = sh(script, 2).unwrap_err();
        assert_eq!(f.worker, 1);
        assert!(
            f.message
                .starts_with("worker 1 was killed by signal 9 (SIGKILL)"),
            "{}",
            f.message
        );
    }
}
