//! The one place where text from the image or the guest is made safe for a terminal,
//! and how sizes are shown to people.
//!
//! A file name, label or message from the guest may hold bytes a terminal acts on: C0
//! controls (ESC starts escape sequences, BEL, LF, TAB, ...), DEL, and C1 controls —
//! U+0080..U+009F, which many terminals obey as 8-bit controls (U+009B is CSI, bytes
//! `c2 9b`) — or bytes that are not UTF-8 at all, which a terminal may decode as
//! anything. Each becomes `?`, as GNU `ls` shows names on a terminal (`ls -q`).

/// What a character or byte that must not reach a terminal is shown as.
pub const REPLACEMENT: char = '?';
/// Appended when text is cut to a length.
const ELLIPSIS: &str = "...";

/// `text` safe to print on a terminal (see the module doc).
pub fn printable(text: impl AsRef<[u8]>) -> String {
    printable_max(text, usize::MAX)
}

/// [`printable`], keeping at most `max_chars` characters (then `...`), so one message
/// stays one short line.
pub fn printable_max(text: impl AsRef<[u8]>, max_chars: usize) -> String {
    let mut out = String::new();
    let mut kept = 0usize;
    for chunk in text.as_ref().utf8_chunks() {
        let valid = chunk
            .valid()
            .chars()
            .map(|c| if c.is_control() { REPLACEMENT } else { c });
        // Every byte that is not UTF-8 is a character of its own on the screen.
        let invalid = chunk.invalid().iter().map(|_| REPLACEMENT);
        for c in valid.chain(invalid) {
            if kept == max_chars {
                out.push_str(ELLIPSIS);
                return out;
            }
            out.push(c);
            kept += 1;
        }
    }
    out
}

/// Human-readable size with binary units.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Human-readable size for a figure that is read, not watched: binary units with at
/// most one decimal, exact values without one (`1 MiB`, `1.5 GiB`). [`human_size`]
/// always keeps its decimal, so a progress bar's width holds still.
pub fn human_size_exact(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut div = 1u64;
    while unit + 1 < UNITS.len() && n / div >= 1024 {
        div *= 1024;
        unit += 1;
    }
    if n.is_multiple_of(div) {
        format!("{} {}", n / div, UNITS[unit])
    } else {
        format!("{:.1} {}", n as f64 / div as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_sizes_drop_the_decimal() {
        assert_eq!(human_size_exact(1 << 20), "1 MiB");
        assert_eq!(human_size_exact(1536), "1.5 KiB");
        assert_eq!(human_size_exact(100), "100 B");
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64.0 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn c0_del_and_c1_controls_become_question_marks() {
        let shown = printable(b"a\x1b]0;t\x07b\nc\td\x7fe\xc2\x9bf\xc2\x85g");

        assert_eq!(shown, "a?]0;t?b?c?d?e?f?g");
    }

    #[test]
    fn bytes_that_are_not_utf8_become_one_question_mark_each() {
        let shown = printable(b"ok\xff\xfe-\xe2\x82");

        assert_eq!(shown, "ok??-??");
    }

    #[test]
    fn printable_unicode_is_kept() {
        let shown = printable("día 東京 ü");

        assert_eq!(shown, "día 東京 ü");
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        let shown = printable_max("é".repeat(10), 4);

        assert_eq!(shown, "éééé...");
    }

    #[test]
    fn text_exactly_at_the_limit_is_not_cut() {
        let shown = printable_max("abcd", 4);

        assert_eq!(shown, "abcd");
    }
}
