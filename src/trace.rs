//! `-v`: each stage with its timing, on stderr.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static VERBOSE: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Turn stage tracing on or off (and start the clock).
pub fn set_verbose(on: bool) {
    START.get_or_init(Instant::now);
    VERBOSE.store(on, Ordering::Relaxed);
}

/// True when `-v` was given.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// A stage being timed; prints its duration when finished (if verbose).
pub struct Stage {
    name: &'static str,
    started: Instant,
}

/// Start timing a stage.
pub fn stage(name: &'static str) -> Stage {
    Stage {
        name,
        started: Instant::now(),
    }
}

impl Stage {
    /// End the stage, printing `imgsafe: [  1.234s] boot: 0.812s detail`.
    pub fn done(self, detail: &str) {
        if verbose() {
            let total = START.get_or_init(Instant::now).elapsed().as_secs_f64();
            let took = self.started.elapsed().as_secs_f64();
            let sep = if detail.is_empty() { "" } else { " " };
            eprintln!(
                "imgsafe: [{total:7.3}s] {}: {took:.3}s{sep}{detail}",
                self.name
            );
        }
    }
}

/// Print a verbose-only note.
pub fn note(msg: &str) {
    if verbose() {
        let total = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("imgsafe: [{total:7.3}s] {msg}");
    }
}
