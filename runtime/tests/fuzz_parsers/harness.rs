//! The fuzzing loop and its guards: every input runs under `catch_unwind` (a panic is a
//! failure, reported with the input as hex and its seed), its wall time is measured (over
//! [`HANG`] is a failure; a watchdog aborts the process with the target and seed if one runs
//! past [`WATCHDOG`]), and a `#[global_allocator]` wrapper records the largest single
//! allocation of each input (over [`ALLOC_CAP`] is a failure; over [`ALLOC_DENY`] the
//! allocation is refused, which aborts the process after printing the target and seed).
//!
//! Settings: `LEXP_FUZZ_SECS` (seconds per target, default 5), `LEXP_FUZZ_ITERS` (inputs per
//! target at most, default 200000), `LEXP_FUZZ_SEED` (base seed, default fixed so that CI runs
//! are reproducible), `LEXP_FUZZ_REPLAY` (an input seed: run only that input, after saving it).
//! `LEXP_FUZZ_CORPUS_OUT=DIR` writes each target's seed corpus, encoded as the target takes it,
//! to `DIR/TARGET/` (a starting corpus for `cargo fuzz run TARGET DIR/TARGET`).
//! A failing input is also written to
//! `$CARGO_TARGET_TMPDIR/fuzz-failures/TARGET-SEED.bin`, ready for
//! `cargo +nightly fuzz run TARGET FILE` in `fuzz/`.

use super::mutate::{Kind, Mutator};
use lexp_runtime::data::SplitMix64;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// A single allocation larger than this fails the input ("unbounded allocation").
pub const ALLOC_CAP: usize = 256 << 20;
/// A single allocation larger than this is refused outright, to protect the machine.
pub const ALLOC_DENY: usize = 2 << 30;
/// One input running longer than this fails the target (a hang).
pub const HANG: Duration = Duration::from_secs(2);
/// One input running longer than this aborts the process from the watchdog.
pub const WATCHDOG: Duration = Duration::from_secs(30);

thread_local! {
    /// Largest single allocation on this thread since the last reset.
    static MAX_ALLOC: Cell<usize> = const { Cell::new(0) };
    /// The target and input seed running on this thread (for the allocator's and the
    /// watchdog's last words).
    static CURRENT: Cell<(&'static str, u64)> = const { Cell::new(("", 0)) };
    /// Set while an input runs: the panic hook keeps the message instead of printing it.
    static CAPTURE: Cell<bool> = const { Cell::new(false) };
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Set while the allocator reports, so that its own allocations pass through.
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator, watching the size of every allocation.
pub struct CapAlloc;

impl CapAlloc {
    fn check(size: usize) -> bool {
        // `try_with`: thread-locals may be gone while a thread exits.
        let _ = MAX_ALLOC.try_with(|m| m.set(m.get().max(size)));
        if size <= ALLOC_DENY || REPORTING.try_with(Cell::get).unwrap_or(true) {
            return true;
        }
        let _ = REPORTING.try_with(|r| r.set(true));
        let (target, seed) = CURRENT.try_with(Cell::get).unwrap_or(("?", 0));
        say(format_args!(
            "fuzz target `{target}`: {} asked for a single allocation of {size} bytes (over \
             {ALLOC_DENY}): refused, the process will abort",
            Label(seed)
        ));
        let _ = REPORTING.try_with(|r| r.set(false));
        false
    }
}

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer (which
// `GlobalAlloc` allows for any allocation failure).
unsafe impl GlobalAlloc for CapAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::check(layout.size()) {
            System.alloc(layout)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::check(layout.size()) {
            System.alloc_zeroed(layout)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::check(new_size) {
            System.realloc(ptr, layout, new_size)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// Runs `f` with the allocation peak of this thread measured: its result and the largest
/// single allocation it made.
pub fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    MAX_ALLOC.with(|m| m.set(0));
    let out = f();
    (out, MAX_ALLOC.with(Cell::get))
}

/// Settings from the environment.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Time per target.
    pub time: Duration,
    /// Inputs per target at most.
    pub iters: u64,
    /// Base seed.
    pub seed: u64,
    /// Run only the input of this seed.
    pub replay: Option<u64>,
}

impl Settings {
    /// `LEXP_FUZZ_SECS`, `LEXP_FUZZ_ITERS`, `LEXP_FUZZ_SEED`, with their defaults.
    pub fn from_env() -> Settings {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
                Err(_) => default,
            }
        }
        let secs: f64 = var("LEXP_FUZZ_SECS", 5.0);
        assert!(secs.is_finite() && secs >= 0.0, "LEXP_FUZZ_SECS={secs}");
        Settings {
            time: Duration::from_secs_f64(secs),
            iters: var("LEXP_FUZZ_ITERS", 200_000),
            seed: var("LEXP_FUZZ_SEED", 0x5eed_1e40_f022_0001),
            replay: std::env::var("LEXP_FUZZ_REPLAY").ok().map(|v| {
                let v = v.trim();
                v.strip_prefix("0x")
                    .map_or_else(|| v.parse(), |h| u64::from_str_radix(h, 16))
                    .unwrap_or_else(|_| panic!("LEXP_FUZZ_REPLAY={v:?} is not a seed"))
            }),
        }
    }

    /// Inputs a target must at least have run in the time given: 20 per second (an input
    /// taking 50 ms on average is a parser too slow for its input, or a broken loop), capped
    /// by `iters`.
    pub fn min_inputs(&self) -> u64 {
        ((self.time.as_secs_f64() * 20.0) as u64).min(self.iters)
    }
}

/// One target to fuzz: a name, its seed corpus (lists of parts of the given kinds), how the
/// parts become the target's input bytes, and the target itself.
pub struct Target<'a> {
    /// The name (also the cargo-fuzz target's).
    pub name: &'static str,
    /// Kind of each part.
    pub kinds: Vec<Kind>,
    /// Valid inputs, each one list of parts.
    pub corpus: Vec<Vec<Vec<u8>>>,
    /// Parts → input bytes.
    pub encode: fn(&[Vec<u8>]) -> Vec<u8>,
    /// The target.
    pub run: &'a (dyn Fn(&[u8]) -> Result<(), String> + Sync),
}

/// What a fuzzing run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Mutated inputs run.
    pub executed: u64,
    /// Of those, accepted.
    pub ok: u64,
    /// Of those, rejected with an error.
    pub err: u64,
    /// Distinct error messages, with digits blanked (a rough count of the checks reached),
    /// each with how often it occurred.
    pub errors: BTreeMap<String, u64>,
    /// Slowest input.
    pub slowest: Duration,
    /// Largest single allocation of any input.
    pub max_alloc: usize,
    /// Wall time of the run.
    pub wall: Duration,
}

/// How one input ended, when it did not end well.
enum Failure {
    Panic(String),
    Slow(Duration),
    Alloc(usize),
}

/// The watchdog's view of the inputs in flight: target, seed and start (ms since `EPOCH`,
/// 0 when idle) per running target.
struct Slot {
    name: &'static str,
    seed: AtomicU64,
    started_ms: AtomicU64,
}

static SLOTS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn start_guards() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = now_ms();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAPTURE.with(Cell::get) {
                let msg = match info.payload().downcast_ref::<&str>() {
                    Some(s) => (*s).to_owned(),
                    None => info
                        .payload()
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "(non-string payload)".into()),
                };
                let at = info
                    .location()
                    .map_or(String::new(), |l| format!(" at {l}"));
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{msg}{at}")));
            } else {
                previous(info);
            }
        }));
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = now_ms();
            for s in SLOTS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let started = s.started_ms.load(Ordering::Relaxed);
                if started != 0 && now - started > WATCHDOG.as_millis() as u64 {
                    say(format_args!(
                        "fuzz target `{}`: {} has run for over {WATCHDOG:?} (a hang): aborting",
                        s.name,
                        Label(s.seed.load(Ordering::Relaxed))
                    ));
                    std::process::abort();
                }
            }
        });
    });
}

/// Runs `target` on its corpus (every entry must be accepted), then on mutated inputs until
/// the time or the input budget of `settings` is spent. Panics, naming the input (hex, seed,
/// and a file with its bytes), on the first crash, hang or oversized allocation.
pub fn fuzz(target: &Target<'_>, settings: Settings) -> Report {
    start_guards();
    let slot = Arc::new(Slot {
        name: target.name,
        seed: AtomicU64::new(0),
        started_ms: AtomicU64::new(0),
    });
    SLOTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(slot.clone());
    let start = Instant::now();
    let mut report = Report::default();

    let run_one = |seed: u64, input: &[u8], report: &mut Report| -> Result<(), String> {
        CURRENT.with(|c| c.set((target.name, seed)));
        slot.seed.store(seed, Ordering::Relaxed);
        slot.started_ms.store(now_ms(), Ordering::Relaxed);
        CAPTURE.with(|c| c.set(true));
        let t0 = Instant::now();
        let (result, peak) =
            peak_alloc(|| std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input))));
        let elapsed = t0.elapsed();
        CAPTURE.with(|c| c.set(false));
        slot.started_ms.store(0, Ordering::Relaxed);
        report.slowest = report.slowest.max(elapsed);
        report.max_alloc = report.max_alloc.max(peak);
        let failure = match result {
            Err(_) => Some(Failure::Panic(
                PANIC_MESSAGE
                    .with(|m| m.borrow_mut().take())
                    .unwrap_or_default(),
            )),
            Ok(_) if elapsed > HANG => Some(Failure::Slow(elapsed)),
            Ok(_) if peak > ALLOC_CAP => Some(Failure::Alloc(peak)),
            Ok(outcome) => return outcome,
        };
        fail(target.name, seed, input, failure.expect("a failure"))
    };

    let corpus_out = std::env::var_os("LEXP_FUZZ_CORPUS_OUT").map(std::path::PathBuf::from);
    for (i, parts) in target.corpus.iter().enumerate() {
        let input = (target.encode)(parts);
        if let Some(dir) = &corpus_out {
            let file = dir.join(target.name).join(format!("seed-{i}"));
            let saved = save(&file, &input);
            assert_eq!(saved, file.display().to_string(), "corpus entry {i}");
        }
        if let Err(e) = run_one(Label::corpus(i), &input, &mut report) {
            panic!(
                "fuzz target `{}`: corpus entry {i} is rejected: {e}",
                target.name
            );
        }
    }

    let mutator = Mutator::new(&target.corpus, &target.kinds);
    if let Some(seed) = settings.replay {
        let input = (target.encode)(&mutator.input(seed));
        let file = failure_file(target.name, seed);
        let saved = save(&file, &input);
        say(format_args!(
            "fuzz target `{}`: replaying seed {seed:#018x} ({} bytes, saved to {saved})",
            target.name,
            input.len()
        ));
        report.executed = 1;
        let outcome = run_one(seed, &input, &mut report);
        say(format_args!(
            "fuzz target `{}`: seed {seed:#018x} gave {outcome:?} in {:.1?}",
            target.name, report.slowest
        ));
        return report;
    }
    let base = SplitMix64::for_stream(settings.seed, fnv(target.name)).next_u64();
    let deadline = start + settings.time;
    while report.executed < settings.iters && Instant::now() < deadline {
        let seed = SplitMix64::for_stream(base, report.executed).next_u64();
        let input = (target.encode)(&mutator.input(seed));
        report.executed += 1;
        match run_one(seed, &input, &mut report) {
            Ok(()) => report.ok += 1,
            Err(e) => {
                report.err += 1;
                let key: String = e
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .take(200)
                    .collect();
                *report.errors.entry(key).or_default() += 1;
            }
        }
    }
    report.wall = start.elapsed();
    SLOTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|s| !Arc::ptr_eq(s, &slot));
    say(format_args!(
        "fuzz target `{}`: {} inputs in {:.1?} ({} accepted, {} rejected, {} distinct errors), \
         slowest {:.1?}, largest allocation {} KiB",
        target.name,
        report.executed,
        report.wall,
        report.ok,
        report.err,
        report.errors.len(),
        report.slowest,
        report.max_alloc >> 10
    ));
    report
}

/// Writes a line to the process's stderr, past the test harness's output capture (which is
/// lost when the process aborts, and hides the per-target summaries).
fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// Reports a failing input: its seed, its first 4 KiB as hex, and the file holding all of it.
fn fail(name: &str, seed: u64, input: &[u8], failure: Failure) -> ! {
    let what = match failure {
        Failure::Panic(msg) => format!("panicked: {msg}"),
        Failure::Slow(t) => format!("took {t:.2?} (a hang: over {HANG:?})"),
        Failure::Alloc(n) => format!("made a single allocation of {n} bytes (over {ALLOC_CAP})"),
    };
    let saved = save(&failure_file(name, seed), input);
    let hex: String = input
        .iter()
        .take(4096)
        .map(|b| format!("{b:02x}"))
        .collect();
    panic!(
        "fuzz target `{name}`: {} ({} bytes) {what}\n  input saved to {saved}\n  hex{}: {hex}",
        Label(seed),
        input.len(),
        if input.len() > 4096 {
            " (first 4096 bytes)"
        } else {
            ""
        },
    );
}

/// Where the input of `seed` for target `name` is saved.
fn failure_file(name: &str, seed: u64) -> std::path::PathBuf {
    let stem = match Label(seed).corpus_entry() {
        Some(i) => format!("corpus-{i}"),
        None => format!("{seed:016x}"),
    };
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-failures")
        .join(format!("{name}-{stem}.bin"))
}

/// What an input is, from the number the guards know it by: the seed of a mutated input, or
/// (in the top 2^20 values, which a seed hits with probability 2^-44) a corpus entry.
#[derive(Clone, Copy)]
struct Label(u64);

impl Label {
    const CORPUS: u64 = u64::MAX - (1 << 20);

    fn corpus(i: usize) -> u64 {
        u64::MAX - i as u64
    }

    fn corpus_entry(self) -> Option<u64> {
        (self.0 > Self::CORPUS).then(|| u64::MAX - self.0)
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.corpus_entry() {
            Some(i) => write!(f, "corpus entry {i}"),
            None => write!(f, "input seed {:#018x}", self.0),
        }
    }
}

/// Writes `input` to `file`; returns the path, or why it could not be written.
fn save(file: &std::path::Path, input: &[u8]) -> String {
    file.parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(file, input))
        .map_or_else(
            |e| format!("(not saved: {e})"),
            |()| file.display().to_string(),
        )
}

/// FNV-1a of a name: each target gets its own stream of seeds.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
