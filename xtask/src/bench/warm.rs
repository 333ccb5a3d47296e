//! `warm`: commands restored from the saved appliance, against the same command booted
//! cold (`IMGSAFE_WARM=0`) and against virt-ls; many at once; and peak memory.
//!
//! Timings are medians of [`ROUNDS`] runs, imgsafe and its peer interleaved (A B A B),
//! so a machine whose speed drifts moves both, each run after a short pause
//! ([`SETTLE`]). Peak memory is the largest single
//! process of a command's tree (`ru_maxrss` from `wait4`, which for imgsafe covers the
//! QEMU it waited for).

use super::e2e;
use super::util::{fmt_samples, median};
use super::{print_comparison, Ctx, Outcome, Row};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Timed runs of each single command.
const ROUNDS: usize = 5;
/// Commands started at once in the concurrency measurement.
const CONCURRENT: usize = 8;
/// Rounds of the concurrency measurement.
const CONCURRENT_ROUNDS: usize = 3;
/// Pause before every timed run. Right after virt-ls (or any big process) exits, the
/// next command on these machines starts measurably slower (exec, file lookups and QEMU
/// start-up take two to four times as long for a second or two); a user does not run
/// the two in the same second, so each run, imgsafe's and virt-ls's alike, starts on a
/// settled machine.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// One finished run: wall seconds and peak RSS in KiB.
struct Run {
    secs: f64,
    max_rss_kib: u64,
}

/// Spawn `cmd` (stdout and stderr to files in `dir`), return it running.
fn spawn(cmd: &mut Command, dir: &Path, tag: &str) -> Result<std::process::Child> {
    let out = std::fs::File::create(dir.join(format!("{tag}.out")))?;
    let err = std::fs::File::create(dir.join(format!("{tag}.err")))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot run {}", super::util::describe(cmd)))
}

/// Wait for `child` with wait4, for its peak RSS; a failure is an error with stderr.
fn reap(child: std::process::Child, dir: &Path, tag: &str, started: Instant) -> Result<Run> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid out-pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = started.elapsed().as_secs_f64();
    std::mem::forget(child);
    if rc != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let err = std::fs::read_to_string(dir.join(format!("{tag}.err"))).unwrap_or_default();
        bail!(
            "{tag} failed (status {status}): {}",
            super::util::stderr_summary(&err)
        );
    }
    Ok(Run {
        secs,
        max_rss_kib: usage.ru_maxrss as u64,
    })
}

fn run_one(cmd: &mut Command, dir: &Path, tag: &str) -> Result<Run> {
    std::thread::sleep(SETTLE);
    let started = Instant::now();
    let child = spawn(cmd, dir, tag)?;
    reap(child, dir, tag, started)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Run the group.
pub fn run(ctx: &mut Ctx) -> Result<()> {
    let tree = ctx.dir().join("warm-tree");
    e2e::make_tree(&tree)?;
    let image = ctx.dir().join("warm.img");
    let mut mke2fs = crate::tool("mke2fs", "e2fsprogs")?;
    mke2fs
        .args(["-q", "-F", "-t", "ext4", "-L", "bench-root", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("64M");
    super::util::timed(&mut mke2fs)?;
    super::util::warm_page_cache(&image)?;
    let logs = ctx.dir().join("warm-logs");
    std::fs::create_dir_all(&logs)?;
    let cache = ctx.dir().join("warm-cache");
    let img = image.display().to_string();
    let bin = ctx.imgsafe.clone();
    let imgsafe = |warm: bool, args: &[&str]| {
        let mut c = Command::new(&bin);
        c.env("XDG_CACHE_HOME", &cache)
            .env("IMGSAFE_WARM", if warm { "1" } else { "0" })
            .args(args);
        c
    };

    // The first command builds the appliance and saves the state; then one -v run of
    // each kind shows the stages.
    run_one(&mut imgsafe(true, &["ls", &img, "/etc"]), &logs, "first")?;
    for (warm, name) in [(true, "warm"), (false, "cold (IMGSAFE_WARM=0)")] {
        run_one(
            &mut imgsafe(warm, &["-v", "ls", &img, "/etc"]),
            &logs,
            "stages",
        )?;
        println!("imgsafe -v ls, {name}:");
        for line in std::fs::read_to_string(logs.join("stages.err"))?.lines() {
            if !line.contains(" qemu: ") {
                println!("  {line}");
            }
        }
    }
    let accel = if std::fs::read_to_string(logs.join("stages.err"))?.contains("using TCG") {
        e2e::Accel::Tcg
    } else {
        e2e::Accel::Kvm
    };
    let guestfs = e2e::prepare_guestfs(&image, accel);

    // Single commands, interleaved: warm, cold, virt-ls.
    let mut warm_runs = Vec::new();
    let mut cold_runs = Vec::new();
    let mut guestfs_runs = Vec::new();
    let mut guestfs_error = None;
    for _ in 0..ROUNDS {
        warm_runs.push(run_one(
            &mut imgsafe(true, &["ls", &img, "/etc"]),
            &logs,
            "warm",
        )?);
        cold_runs.push(run_one(
            &mut imgsafe(false, &["ls", &img, "/etc"]),
            &logs,
            "cold",
        )?);
        if let Ok(g) = &guestfs {
            match g
                .command("virt-ls", &image, &["/etc"])
                .and_then(|mut c| run_one(&mut c, &logs, "virt-ls"))
            {
                Ok(r) => guestfs_runs.push(r),
                Err(e) => {
                    guestfs_error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
    }
    let secs = |runs: &[Run]| runs.iter().map(|r| r.secs).collect::<Vec<f64>>();
    let rss = |runs: &[Run]| {
        runs.iter()
            .map(|r| r.max_rss_kib as f64)
            .collect::<Vec<f64>>()
    };
    println!("  imgsafe ls (warm): {} s", fmt_samples(&secs(&warm_runs)));
    println!("  imgsafe ls (cold): {} s", fmt_samples(&secs(&cold_runs)));
    let outcome = |runs: &[Run], skipped: Option<String>| match (median(&secs(runs)), skipped) {
        (Some(m), None) => Outcome::Secs(m),
        (_, Some(why)) => Outcome::Skipped(why),
        (None, None) => Outcome::Skipped("not measured".into()),
    };
    let guestfs_skip = match (&guestfs, guestfs_error) {
        (Err(why), _) => Some(why.clone()),
        (_, Some(e)) => Some(e),
        _ => None,
    };
    if guestfs_skip.is_none() {
        println!("  virt-ls: {} s", fmt_samples(&secs(&guestfs_runs)));
    }
    let warm_median = median(&secs(&warm_runs)).unwrap_or(f64::NAN);
    record(
        ctx,
        "ls /etc, warm",
        "virt-ls",
        outcome(&warm_runs, None),
        outcome(&guestfs_runs, guestfs_skip.clone()),
    );
    record(
        ctx,
        "ls /etc, warm",
        "imgsafe cold (IMGSAFE_WARM=0)",
        outcome(&warm_runs, None),
        outcome(&cold_runs, None),
    );

    // Many at once.
    let mut walls = Vec::new();
    let mut each_rss = Vec::new();
    for round in 0..CONCURRENT_ROUNDS {
        std::thread::sleep(SETTLE);
        let started = Instant::now();
        let children: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                spawn(
                    &mut imgsafe(true, &["ls", &img, "/etc"]),
                    &logs,
                    &format!("c{round}-{i}"),
                )
            })
            .collect::<Result<_>>()?;
        for (i, c) in children.into_iter().enumerate() {
            each_rss.push(reap(c, &logs, &format!("c{round}-{i}"), started)?.max_rss_kib as f64);
        }
        walls.push(started.elapsed().as_secs_f64());
    }
    let wall = median(&walls).unwrap_or(f64::NAN);
    println!(
        "{CONCURRENT} warm ls at once: wall {} s, median {wall:.3} s = {:.2}x one warm ls ({warm_median:.3} s); all succeeded",
        fmt_samples(&walls),
        wall / warm_median
    );

    // Peak memory.
    let rss_warm = median(&rss(&warm_runs)).unwrap_or(f64::NAN);
    let rss_cold = median(&rss(&cold_runs)).unwrap_or(f64::NAN);
    let rss_many = median(&each_rss).unwrap_or(f64::NAN);
    let rss_many_max = each_rss.iter().copied().fold(0.0, f64::max);
    println!(
        "peak RSS (largest process, median): warm ls {:.0} MiB, cold ls {:.0} MiB, each of {CONCURRENT} at once {:.0} MiB (max {:.0} MiB)",
        mib(rss_warm as u64),
        mib(rss_cold as u64),
        mib(rss_many as u64),
        mib(rss_many_max as u64)
    );
    if let Some(rss_guestfs) = median(&rss(&guestfs_runs)) {
        println!(
            "peak RSS virt-ls {:.0} MiB: warm imgsafe ls / virt-ls = {:.2}",
            mib(rss_guestfs as u64),
            rss_warm / rss_guestfs
        );
    }
    Ok(())
}

fn record(ctx: &mut Ctx, what: &str, peer: &str, imgsafe: Outcome, peer_time: Outcome) {
    let row = Row {
        group: "warm",
        what: what.to_string(),
        imgsafe,
        peer: peer.to_string(),
        peer_time,
    };
    print_comparison(&row);
    ctx.rows.push(row);
}
