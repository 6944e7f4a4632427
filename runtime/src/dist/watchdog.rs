//! [`Watchdog`]: a bound on how long an NCCL collective may wait.
//!
//! NCCL blocks in a collective whose peer died or hangs (a stopped process, a wedged GPU), and
//! so does the stream synchronisation behind it; unlike the TCP communicator's sockets it has
//! no per-call deadline. The watchdog is armed when a collective is queued and disarmed once it
//! is known to be complete. A thread looks at it every [`TICK`]; past the group's collective
//! timeout (`LEXP_DIST_TIMEOUT_S`, [`super::RendezvousConfig`]) it reports the rank, the
//! collective and the time waited, and ends the process, so that the launcher (`--gpus`, or
//! torchrun) stops the other workers: a hang becomes an error in bounded time.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How often the watchdog's thread looks.
pub const TICK: Duration = Duration::from_millis(500);

/// What the watchdog does on a timeout (by default: print `message` and exit with status 1).
pub type OnTimeout = Box<dyn Fn(String) + Send>;

/// The oldest collective not yet known complete: when it was queued and what it is.
#[derive(Debug, Default)]
struct Armed(Option<(Instant, String)>);

/// See the [module docs](self).
pub struct Watchdog {
    armed: Arc<Mutex<Armed>>,
}

impl Watchdog {
    /// A watchdog of rank `rank` that ends the process when a collective waits longer than
    /// `timeout`.
    ///
    /// It ends it with `_exit(1)`, not `std::process::exit`: the main thread is blocked inside
    /// the CUDA driver or NCCL, and running their exit handlers under it crashed the process
    /// (SIGSEGV, then a core dump of a GPU process that took minutes) in the two-GPU check.
    pub fn start(rank: usize, timeout: Duration) -> Watchdog {
        Watchdog::with_action(
            rank,
            timeout,
            Box::new(|message| {
                use std::io::Write;
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{message}");
                let _ = err.flush();
                // SAFETY: `_exit` ends the process at once without running exit handlers,
                // which is the point (see above); nothing here relies on them.
                unsafe { libc::_exit(1) }
            }),
        )
    }

    /// [`Watchdog::start`] with another action on a timeout (tests).
    pub fn with_action(rank: usize, timeout: Duration, action: OnTimeout) -> Watchdog {
        let armed = Arc::new(Mutex::new(Armed::default()));
        let weak = Arc::downgrade(&armed);
        let spawned = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || watch(weak, rank, timeout, action));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the NCCL watchdog (collectives are unbounded): {e}");
        }
        Watchdog { armed }
    }

    /// A collective described by `what` was queued. The clock keeps running from the oldest
    /// collective not yet disarmed.
    pub fn arm(&self, what: impl FnOnce() -> String) {
        if let Ok(mut a) = self.armed.lock() {
            if a.0.is_none() {
                a.0 = Some((Instant::now(), what()));
            }
        }
    }

    /// Every collective queued so far is complete.
    pub fn disarm(&self) {
        if let Ok(mut a) = self.armed.lock() {
            a.0 = None;
        }
    }
}

/// The message for a collective armed at `since` that is overdue at `now`, if it is.
fn overdue(armed: &Armed, now: Instant, rank: usize, timeout: Duration) -> Option<String> {
    let (since, what) = armed.0.as_ref()?;
    let waited = now.saturating_duration_since(*since);
    (waited > timeout).then(|| {
        format!(
            "rank {rank}: {what} has not completed after {:.1} s (collective timeout {:.0} s, \
             LEXP_DIST_TIMEOUT_S): a peer is dead or hung; this worker stops",
            waited.as_secs_f64(),
            timeout.as_secs_f64()
        )
    })
}

fn watch(armed: Weak<Mutex<Armed>>, rank: usize, timeout: Duration, action: OnTimeout) {
    loop {
        std::thread::sleep(TICK);
        let Some(armed) = armed.upgrade() else {
            return; // the communicator is gone
        };
        let message = match armed.lock() {
            Ok(a) => overdue(&a, Instant::now(), rank, timeout),
            Err(_) => return,
        };
        if let Some(m) = message {
            action(m);
            if let Ok(mut a) = armed.lock() {
                a.0 = None; // reported once (the default action does not return)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn overdue_only_past_the_timeout_of_the_oldest_armed_collective() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let idle = Armed(None);
        assert!(overdue(&idle, t0 + Duration::from_secs(99), 0, timeout).is_none());
        let a = Armed(Some((t0, "all-reduce #3".into())));
        assert!(overdue(&a, t0 + Duration::from_secs(9), 1, timeout).is_none());
        let m = overdue(&a, t0 + Duration::from_secs(11), 1, timeout).unwrap();
        assert!(
            m.starts_with("rank 1: all-reduce #3 has not completed after 11.0 s"),
            "{m}"
        );
        assert!(m.contains("LEXP_DIST_TIMEOUT_S"), "{m}");
    }

    #[test]
    fn fires_once_when_armed_too_long_and_never_when_disarmed_in_time() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let w = Watchdog::with_action(
            2,
            Duration::from_millis(300),
            Box::new(move |m| {
                let _ = tx.lock().map(|t| t.send(m));
            }),
        );
        w.arm(|| "first".into());
        w.disarm();
        assert!(
            rx.recv_timeout(Duration::from_millis(1500)).is_err(),
            "disarmed in time"
        );
        w.arm(|| "second".into());
        w.arm(|| "third".into()); // the clock runs from the oldest
        let m = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a timeout report");
        assert!(m.starts_with("rank 2: second has not completed"), "{m}");
        assert!(
            rx.recv_timeout(Duration::from_millis(1500)).is_err(),
            "reported once"
        );
    }
}
