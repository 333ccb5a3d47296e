//! `-v`: one line per stage on stderr, each with its timing, in the order the stages
//! run; stdout carries only the command's own output.

mod support;

use support::*;

/// One `imgsafe: [  1.234s] name: 0.567s detail` line, parsed.
#[derive(Debug)]
struct StageLine {
    since_start: f64,
    name: String,
    took: f64,
}

/// The line as a stage with its timing, or None for any other line (notes, warnings).
fn parse_stage(line: &str) -> Option<StageLine> {
    let rest = line.strip_prefix("imgsafe: [")?;
    let (since_start, rest) = rest.split_once("] ")?;
    let (name, rest) = rest.split_once(": ")?;
    let took = rest.split_whitespace().next()?.strip_suffix('s')?;
    Some(StageLine {
        since_start: since_start.trim().strip_suffix('s')?.parse().ok()?,
        name: name.to_string(),
        took: took.parse().ok()?,
    })
}

#[test]
fn verbose_prints_each_stage_with_its_timing_in_order_and_leaves_stdout_alone() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let img = ext4_image(src.path(), "16M");

    // A cold boot (warm starts have their own stages, see tests/warm.rs).
    let out = imgsafe()
        .env("IMGSAFE_WARM", "0")
        .args(["-v", "ls", &img.arg(), "/"])
        .output()
        .unwrap();

    assert_eq!(ok_stdout(&out), "deep\netc\nhome\nlost+found\n");
    let err = stderr(&out);
    let stages: Vec<StageLine> = err.lines().filter_map(parse_stage).collect();
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    let want = [
        "decode",
        "appliance",
        "boot",
        "probe",
        "mount",
        "ls",
        "shutdown",
    ];
    // Each expected stage once, in this order (others, e.g. "appliance build" on a
    // first run, may come between).
    let found: Vec<&str> = names.iter().copied().filter(|n| want.contains(n)).collect();
    assert_eq!(found, want, "{err}");
    for pair in stages.windows(2) {
        assert!(
            pair[0].since_start <= pair[1].since_start,
            "clock went back: {pair:?}\n{err}"
        );
    }
    for s in &stages {
        assert!(
            s.took >= 0.0 && s.took <= s.since_start + 0.001,
            "{s:?}\n{err}"
        );
    }
    img.assert_unchanged();
}
