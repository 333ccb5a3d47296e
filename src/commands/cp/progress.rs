//! A one-line progress bar on stderr for long copies.

use crate::terminal::human_size;
use std::io::Write;
use std::time::{Duration, Instant};

/// Copies smaller than this finish too fast for a bar to help.
pub const THRESHOLD: u64 = 8 << 20;
/// Redraw at most this often.
const INTERVAL: Duration = Duration::from_millis(100);
/// Width of the bar itself, in characters.
const BAR: usize = 24;

/// Bytes copied so far out of a known total; drawn only when enabled.
pub struct Progress {
    enabled: bool,
    total: u64,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    /// A bar for `total` bytes, shown only if `wanted` (stderr is a terminal) and the
    /// total is above [`THRESHOLD`].
    pub fn new(wanted: bool, total: u64) -> Self {
        Progress {
            enabled: wanted && total > THRESHOLD,
            total,
            done: 0,
            started: Instant::now(),
            last_draw: None,
        }
    }

    /// Count `n` more bytes, redrawing if the last draw is old enough.
    pub fn add(&mut self, n: u64) {
        self.done = self.done.saturating_add(n);
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last_draw
            .is_some_and(|t| now.duration_since(t) < INTERVAL)
        {
            return;
        }
        self.last_draw = Some(now);
        let text = line(self.done, self.total, now.duration_since(self.started));
        // A failed write to stderr must not fail the copy.
        let _ = write!(std::io::stderr(), "\r\x1b[K{text}");
    }

    /// Erase the bar (also done on drop, so an error message starts on a clean line).
    pub fn finish(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
        self.last_draw = None;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The text of the bar: `[#####.....]  12.0 MiB / 100.0 MiB  12%  4.0 MiB/s`.
fn line(done: u64, total: u64, elapsed: Duration) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (frac * BAR as f64) as usize;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        (done as f64 / secs) as u64
    } else {
        0
    };
    format!(
        "[{}{}] {} / {}  {:3}%  {}/s",
        "#".repeat(filled),
        ".".repeat(BAR - filled),
        human_size(done),
        human_size(total),
        (frac * 100.0) as u32,
        human_size(rate)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_fraction_sizes_and_rate() {
        let text = line(12 << 20, 96 << 20, Duration::from_secs(3));

        assert_eq!(
            text,
            "[###.....................] 12.0 MiB / 96.0 MiB   12%  4.0 MiB/s"
        );
    }

    #[test]
    fn small_copies_get_no_bar() {
        let p = Progress::new(true, THRESHOLD);

        assert!(!p.enabled);
    }

    #[test]
    fn done_is_counted_even_when_not_drawn() {
        let mut p = Progress::new(false, 100);

        p.add(40);
        p.add(2);

        assert_eq!(p.done, 42);
    }
}
