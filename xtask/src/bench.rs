//! `cargo xtask bench [nbd|formats|e2e|warm|bulk]...`: imgsafe against its peers, in the same run,
//! on the same files.
//!
//! Benchmarks print numbers and ratios; they never pass or fail on a time. Every number
//! is the median of a few runs measured here and now, next to the same measurement of a
//! peer (qemu-nbd, libguestfs), so the ratio means something on whatever machine runs it.
//! A group whose imgsafe side does not work yet (or whose peer is not installed) says so
//! and why, and the other groups still run.

mod bulk;
mod e2e;
mod formats;
mod nbd;
mod util;
mod warm;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use util::{ratio, WorkDir, GIB};

/// The groups, in the order a full run takes them.
const GROUPS: [&str; 5] = ["nbd", "formats", "e2e", "warm", "bulk"];

/// Run the benchmarks named in `args` (all when empty).
pub fn run(args: &[String]) -> Result<()> {
    let groups = select_groups(args)?;
    let started = std::time::Instant::now();
    let imgsafe = crate::build_imgsafe(true)?;
    let work = WorkDir::create(crate::root().join("target").join("bench"))?;
    let mut ctx = Ctx {
        imgsafe,
        work,
        raw: None,
        rows: Vec::new(),
    };
    print_environment();
    for g in &groups {
        println!("\n=== {g} ===");
        let result = match *g {
            "nbd" => nbd::run(&mut ctx),
            "formats" => formats::run(&mut ctx),
            "e2e" => e2e::run(&mut ctx),
            "warm" => warm::run(&mut ctx),
            "bulk" => bulk::run(&mut ctx),
            _ => unreachable!("select_groups only returns known groups"),
        };
        if let Err(e) = result {
            println!("{g}: stopped: {e:#}");
            ctx.rows
                .push(Row::skipped(g, "(whole group)", &format!("{e:#}")));
        }
    }
    print_summary(&ctx.rows);
    println!(
        "\nbench took {:.0} s; work files under {} removed",
        started.elapsed().as_secs_f64(),
        ctx.work.path().display()
    );
    Ok(())
}

/// The groups `args` names, in run order; all of them when `args` is empty.
fn select_groups(args: &[String]) -> Result<Vec<&'static str>> {
    if let Some(bad) = args.iter().find(|a| !GROUPS.contains(&a.as_str())) {
        bail!(
            "unknown benchmark group {bad:?}: usage: cargo xtask bench [{}]...",
            GROUPS.join("|")
        );
    }
    Ok(GROUPS
        .iter()
        .copied()
        .filter(|g| args.is_empty() || args.iter().any(|a| a == g))
        .collect())
}

/// State shared by the groups of one run.
pub struct Ctx {
    /// The release imgsafe binary.
    pub imgsafe: PathBuf,
    /// target/bench/, removed at the end.
    pub work: WorkDir,
    /// The 1 GiB synthetic raw disk, made once for nbd and formats.
    raw: Option<PathBuf>,
    /// Summary rows, in the order measured.
    pub rows: Vec<Row>,
}

/// Size of the synthetic raw disk the nbd and formats groups read.
pub const RAW_SIZE: u64 = GIB;

impl Ctx {
    /// The 1 GiB raw disk image (mostly data, some holes), made on first use.
    pub fn raw_image(&mut self) -> Result<PathBuf> {
        if let Some(p) = &self.raw {
            return Ok(p.clone());
        }
        let path = self.work.path().join("disk.raw");
        let t = std::time::Instant::now();
        let data = util::make_raw_image(&path, RAW_SIZE)?;
        println!(
            "made {} ({} MiB virtual, {} MiB data, the rest holes) in {:.1} s",
            path.display(),
            RAW_SIZE >> 20,
            data >> 20,
            t.elapsed().as_secs_f64()
        );
        self.raw = Some(path.clone());
        Ok(path)
    }

    /// The work directory.
    pub fn dir(&self) -> &Path {
        self.work.path()
    }
}

/// A measured (or skipped) side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Median seconds.
    Secs(f64),
    /// Not measured, and why.
    Skipped(String),
}

impl Outcome {
    fn cell(&self) -> String {
        match self {
            Outcome::Secs(s) => format!("{s:.3} s"),
            Outcome::Skipped(_) => "skipped".to_string(),
        }
    }
}

/// One line of the final summary: imgsafe and a peer doing the same job.
#[derive(Debug, Clone)]
pub struct Row {
    /// The group ("nbd", ...).
    pub group: &'static str,
    /// What was timed.
    pub what: String,
    /// imgsafe's median.
    pub imgsafe: Outcome,
    /// The peer's name ("qemu-nbd", "virt-ls").
    pub peer: String,
    /// The peer's median.
    pub peer_time: Outcome,
}

impl Row {
    /// A row where nothing could be measured.
    pub fn skipped(group: &'static str, what: &str, why: &str) -> Row {
        Row {
            group,
            what: what.to_string(),
            imgsafe: Outcome::Skipped(why.to_string()),
            peer: "-".to_string(),
            peer_time: Outcome::Skipped(why.to_string()),
        }
    }

    /// `peer / imgsafe` when both were measured.
    pub fn ratio(&self) -> Option<f64> {
        match (&self.imgsafe, &self.peer_time) {
            (Outcome::Secs(a), Outcome::Secs(b)) => ratio(*a, *b),
            _ => None,
        }
    }
}

/// The one line each comparison prints as soon as it is measured.
pub fn print_comparison(row: &Row) {
    let side = |o: &Outcome| match o {
        Outcome::Secs(s) => format!("{s:.3} s"),
        Outcome::Skipped(why) => format!("skipped ({why})"),
    };
    let r = row
        .ratio()
        .map(|r| {
            format!(
                ", ratio {}/imgsafe = {r:.2} (>1 means imgsafe faster)",
                row.peer
            )
        })
        .unwrap_or_default();
    println!(
        "{}: imgsafe {}, {} {}{r}",
        row.what,
        side(&row.imgsafe),
        row.peer,
        side(&row.peer_time)
    );
}

/// Accelerator and machine facts that change what the numbers mean.
fn print_environment() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("machine: {cores} cores");
    match std::env::var("IMGSAFE_ACCEL") {
        Ok(v) => println!("IMGSAFE_ACCEL={v} (set by you; passed through)"),
        Err(_) => println!("IMGSAFE_ACCEL not set: imgsafe chooses (KVM if usable, else TCG, which it says on stderr)"),
    }
}

/// The final table, one row per comparison.
fn print_summary(rows: &[Row]) {
    println!("\n=== summary (medians; ratio = peer/imgsafe, >1 means imgsafe faster) ===");
    let header = [
        "group",
        "benchmark",
        "imgsafe",
        "peer",
        "peer time",
        "ratio",
    ];
    let body: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.group.to_string(),
                r.what.clone(),
                r.imgsafe.cell(),
                r.peer.clone(),
                r.peer_time.cell(),
                r.ratio()
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &body {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.len());
        }
    }
    let print_line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    print_line(&header.map(String::from));
    for line in &body {
        print_line(line);
    }
    for (why, which) in skip_reasons(rows) {
        println!("  skipped ({}): {why}", which.join(", "));
    }
}

/// Each distinct reason a side was skipped, with the sides it covers (one reason, such
/// as a missing package, usually covers several rows).
fn skip_reasons(rows: &[Row]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for r in rows {
        for (side, o) in [("imgsafe", &r.imgsafe), (r.peer.as_str(), &r.peer_time)] {
            let Outcome::Skipped(why) = o else { continue };
            let label = format!("{} {} / {side}", r.group, r.what);
            match out.iter_mut().find(|(w, _)| w == why) {
                Some((_, which)) => which.push(label),
                None => out.push((why.clone(), vec![label])),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_argument_selects_every_group() {
        let groups = select_groups(&[]).unwrap();

        assert_eq!(groups, GROUPS.to_vec());
    }

    #[test]
    fn named_groups_run_in_the_fixed_order() {
        let groups = select_groups(&args(&["e2e", "nbd"])).unwrap();

        assert_eq!(groups, vec!["nbd", "e2e"]);
    }

    #[test]
    fn unknown_group_is_an_error_naming_it() {
        let err = select_groups(&args(&["disk"])).unwrap_err();

        assert!(err.to_string().contains("\"disk\""), "{err}");
    }

    #[test]
    fn one_skip_reason_is_listed_once_for_all_its_rows() {
        let missing = Outcome::Skipped("virt-ls not found".into());
        let rows: Vec<Row> = ["ls", "cat"]
            .iter()
            .map(|w| Row {
                group: "e2e",
                what: w.to_string(),
                imgsafe: Outcome::Secs(1.0),
                peer: "virt".into(),
                peer_time: missing.clone(),
            })
            .collect();

        let reasons = skip_reasons(&rows);

        assert_eq!(
            reasons,
            vec![(
                "virt-ls not found".to_string(),
                vec!["e2e ls / virt".to_string(), "e2e cat / virt".to_string()]
            )]
        );
    }

    #[test]
    fn row_ratio_needs_both_sides() {
        let row = Row {
            group: "nbd",
            what: "x".into(),
            imgsafe: Outcome::Secs(2.0),
            peer: "qemu-nbd".into(),
            peer_time: Outcome::Skipped("missing".into()),
        };

        let r = row.ratio();

        assert_eq!(r, None);
    }

    #[test]
    fn row_ratio_is_peer_over_imgsafe() {
        let row = Row {
            group: "nbd",
            what: "x".into(),
            imgsafe: Outcome::Secs(2.0),
            peer: "qemu-nbd".into(),
            peer_time: Outcome::Secs(1.0),
        };

        let r = row.ratio();

        assert_eq!(r, Some(0.5));
    }
}
