//! `nbd`: reading a 1 GiB raw disk through `imgsafe serve` and through `qemu-nbd`, with
//! the same NBD clients (qemu-img convert to a file, nbdcopy to null:).

use super::util::{self, fmt_samples, median, output_dir, timed, Server};
use super::{print_comparison, Ctx, Outcome, Row, RAW_SIZE};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::Command;

/// Timed runs per server and client (the median is reported).
const ROUNDS: usize = 3;

/// Run the group.
pub fn run(ctx: &mut Ctx) -> Result<()> {
    let raw = ctx.raw_image()?;
    util::warm_page_cache(&raw)?;
    println!(
        "page cache: warm (the image is read once before any timing; every run reads it warm)"
    );
    let out = output_dir(ctx.dir(), 2 * RAW_SIZE)?;
    println!(
        "copies go to {} and are removed after each run",
        out.path().display()
    );

    let imgsafe = start_imgsafe(ctx, &raw, "nbd-imgsafe");
    let qemu = start_qemu_nbd(ctx, &raw, "nbd-qemu", "raw");
    let sides = [("imgsafe", &imgsafe), ("qemu-nbd", &qemu)];
    let target = out.path().join("copy.raw");

    // An untimed first copy from each server, checked against the image itself: a
    // server that reads wrong data makes every number below meaningless.
    for (name, side) in sides {
        if let Ok(server) = side {
            match verify_copy(server, &target, &raw) {
                Ok(()) => println!("{name}: a full copy is byte-identical to the image"),
                Err(e) => println!("{name}: WRONG DATA: {e:#}"),
            }
        }
    }

    let what = "qemu-img convert 1 GiB raw -> file";
    let times = time_rounds(&sides, |s| qemu_img_convert(s, &target), || remove(&target));
    push(ctx, "nbd", what, times);
    let what = "nbdcopy 1 GiB -> null: (1 connection)";
    let times = time_rounds(&sides, |s| nbdcopy(s, &["--connections=1"]), || Ok(()));
    push(ctx, "nbd", what, times);
    let what = "nbdcopy 1 GiB -> null: (default: multi-conn if offered)";
    let times = time_rounds(&sides, |s| nbdcopy(s, &[]), || Ok(()));
    push(ctx, "nbd", what, times);
    for (name, side) in sides {
        if let Ok(s) = side {
            println!(
                "{name}: multi-conn offered: {}",
                offers_multi_conn(s).unwrap_or_else(|e| format!("unknown ({e:#})"))
            );
        }
    }
    Ok(())
}

/// Start `imgsafe serve IMAGE --socket S` (the format is probed, as users run it).
pub(super) fn start_imgsafe(ctx: &Ctx, image: &Path, tag: &str) -> Result<Server, String> {
    let socket = ctx.dir().join(format!("{tag}.sock"));
    let mut cmd = Command::new(&ctx.imgsafe);
    cmd.arg("serve").arg(image).arg("--socket").arg(&socket);
    Server::start(
        "imgsafe",
        cmd,
        &socket,
        &ctx.dir().join(format!("{tag}.log")),
    )
    .map_err(|e| format!("{e:#}"))
}

/// Start `qemu-nbd -r -t -f FORMAT -k S IMAGE`.
pub(super) fn start_qemu_nbd(
    ctx: &Ctx,
    image: &Path,
    tag: &str,
    format: &str,
) -> Result<Server, String> {
    let socket = ctx.dir().join(format!("{tag}.sock"));
    let mut cmd = crate::tool("qemu-nbd", "qemu-utils").map_err(|e| format!("{e:#}"))?;
    cmd.args(["-r", "-t", "-f", format, "-k"])
        .arg(&socket)
        .arg(image);
    Server::start(
        "qemu-nbd",
        cmd,
        &socket,
        &ctx.dir().join(format!("{tag}.log")),
    )
    .map_err(|e| format!("{e:#}"))
}

/// Time `client` against every server for [`ROUNDS`] rounds (`IMGSAFE_BENCH_ROUNDS`
/// overrides), alternating which server
/// goes first so slow drift (page cache, CPU frequency) is shared; `cleanup` runs after
/// every run. A server that could not start, or a run that fails, gives `Skipped`.
pub(super) fn time_rounds(
    sides: &[(&str, &Result<Server, String>)],
    client: impl Fn(&Server) -> Result<Command>,
    cleanup: impl Fn() -> Result<()>,
) -> Vec<Outcome> {
    let mut samples: Vec<Result<Vec<f64>, String>> = sides
        .iter()
        .map(|(_, s)| s.as_ref().map(|_| Vec::new()).map_err(Clone::clone))
        .collect();
    let rounds = util::env_num("IMGSAFE_BENCH_ROUNDS", ROUNDS)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (Ok(server), Ok(got)) = (sides[i].1, &mut samples[i]) else {
                continue;
            };
            let run = client(server).and_then(|mut c| timed(&mut c));
            let cleaned = cleanup();
            match (run, cleaned) {
                (Ok(t), Ok(())) => got.push(t.secs),
                (Err(e), _) | (_, Err(e)) => samples[i] = Err(format!("{e:#}")),
            }
        }
    }
    sides
        .iter()
        .zip(samples)
        .map(|((name, _), s)| match s {
            Ok(v) => {
                println!("  {name}: {} s", fmt_samples(&v));
                median(&v)
                    .map(Outcome::Secs)
                    .unwrap_or_else(|| Outcome::Skipped("no samples".into()))
            }
            Err(why) => Outcome::Skipped(why),
        })
        .collect()
}

/// Record and print one imgsafe-vs-peer comparison from [`time_rounds`]' two outcomes.
pub(super) fn push(ctx: &mut Ctx, group: &'static str, what: &str, mut times: Vec<Outcome>) {
    let peer_time = times
        .pop()
        .unwrap_or_else(|| Outcome::Skipped("not run".into()));
    let imgsafe = times
        .pop()
        .unwrap_or_else(|| Outcome::Skipped("not run".into()));
    let row = Row {
        group,
        what: what.to_string(),
        imgsafe,
        peer: "qemu-nbd".into(),
        peer_time,
    };
    print_comparison(&row);
    ctx.rows.push(row);
}

/// `qemu-img convert -f raw -O raw URI target`: qemu's own NBD client, sequential-ish
/// reads with block status (holes are skipped by both servers' allocation maps).
pub(super) fn qemu_img_convert(server: &Server, target: &Path) -> Result<Command> {
    let mut c = crate::tool("qemu-img", "qemu-utils")?;
    c.args(["convert", "-f", "raw", "-O", "raw", &server.uri()])
        .arg(target);
    Ok(c)
}

/// `nbdcopy [extra] URI null:`: libnbd's parallel reader, no write cost.
fn nbdcopy(server: &Server, extra: &[&str]) -> Result<Command> {
    let mut c = crate::tool("nbdcopy", "libnbd-bin")?;
    c.args(extra).arg(server.uri()).arg("null:");
    Ok(c)
}

/// Copy the whole export once (untimed) and compare it with `expected`.
pub(super) fn verify_copy(server: &Server, target: &Path, expected: &Path) -> Result<()> {
    timed(&mut qemu_img_convert(server, target)?)?;
    let diff = util::first_difference(target, expected);
    remove(target)?;
    match diff? {
        None => Ok(()),
        Some(d) => anyhow::bail!(
            "{} differs from {}: {d}",
            target.display(),
            expected.display()
        ),
    }
}

/// Remove a copy (absent is fine: a failed run may not have made it).
pub(super) fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("{}: cannot remove", path.display()))
        }
        _ => Ok(()),
    }
}

/// What nbdinfo says about multi-conn (why nbdcopy's default differs between servers).
fn offers_multi_conn(server: &Server) -> Result<String> {
    let mut c = crate::tool("nbdinfo", "libnbd-bin")?;
    c.arg(server.uri());
    let t = timed(&mut c)?;
    let text = String::from_utf8_lossy(&t.stdout);
    Ok(text
        .lines()
        .find_map(|l| l.trim().strip_prefix("can_multi_conn:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "not reported".into()))
}
