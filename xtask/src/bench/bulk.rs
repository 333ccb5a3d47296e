//! `bulk`: copying data out, where the bulk data path (the host reading mapped files
//! from the image) should show: `cp` of one large random file against
//! `guestfish --ro -a IMG -m DEVICE copy-out`, on ext4, xfs, ext4 in an LVM linear LV on
//! a partition (mapped through device-mapper) and btrfs (streamed: its FIEMAP is not a
//! device offset), and on ext4 against imgsafe's own stream through the guest
//! (`IMGSAFE_BULK=0`); `IMGSAFE_BENCH_BULK_LAYOUTS=ext4,xfs` picks layouts (empty: none),
//! `IMGSAFE_BENCH_OUT=DIR` puts the copies in DIR (a tmpfs, say); and `cp -r` of a tree
//! of many small files against `virt-tar-out IMG /dir - | tar -x` (as `guestfish --ro -m /dev/sda tar-out`,
//! since virt-tar-out's `-i` needs an inspectable OS), with imgsafe's own tar stream
//! (`imgsafe cp IMG:/dir - | tar -x`) beside it.
//!
//! Every side runs once per round, interleaved (A B C A B C), so a machine whose speed
//! drifts moves all of them; each copy is checked against the tree the image was made
//! from. Sizes and rounds can be made small for a smoke run:
//! `IMGSAFE_BENCH_ROUNDS=1 IMGSAFE_BENCH_BULK_MIB=16 IMGSAFE_BENCH_SMALL_FILES=200`.

use super::e2e::{self, same_tree};
use super::util::{env_num, fmt_samples, median, timed, SplitMix, MIB};
use super::{print_comparison, Ctx, Outcome, Row};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Rounds by default (`IMGSAFE_BENCH_ROUNDS` overrides).
const ROUNDS: usize = 3;
/// Size of the large file by default, MiB (`IMGSAFE_BENCH_BULK_MIB`).
const BIG_MIB: u64 = 512;
/// Small files in the tree by default (`IMGSAFE_BENCH_SMALL_FILES`).
const SMALL_FILES: usize = 20_000;
/// Size of each small file.
const SMALL_SIZE: usize = 1024;
/// Small files per directory.
const PER_DIR: usize = 200;

/// How a side runs once into a fresh DEST.
type RunInto<'a> = Box<dyn Fn(&Path) -> Result<()> + 'a>;

/// One side of a comparison: a name and how to run it once into a fresh DEST.
struct Side<'a> {
    name: String,
    run: RunInto<'a>,
    samples: Vec<f64>,
    failed: Option<String>,
}

impl<'a> Side<'a> {
    fn new(name: &str, run: impl Fn(&Path) -> Result<()> + 'a) -> Self {
        Side {
            name: name.to_string(),
            run: Box::new(run),
            samples: Vec::new(),
            failed: None,
        }
    }

    fn outcome(&self) -> Outcome {
        match (&self.failed, median(&self.samples)) {
            (Some(why), _) => Outcome::Skipped(why.clone()),
            (None, Some(m)) => Outcome::Secs(m),
            (None, None) => Outcome::Skipped("not measured".into()),
        }
    }
}

/// Run every side `rounds` times, interleaved, each into a fresh directory under `out`
/// checked by `check` and removed after.
fn interleaved(
    sides: &mut [Side<'_>],
    rounds: usize,
    out: &Path,
    check: &dyn Fn(&Path) -> Result<()>,
) {
    for _ in 0..rounds {
        for s in sides.iter_mut().filter(|s| s.failed.is_none()) {
            let dest = out.join("dest");
            let _ = e2e::remove_tree(&dest);
            let r = std::fs::create_dir_all(&dest)
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    let t = Instant::now();
                    (s.run)(&dest).map(|()| t.elapsed().as_secs_f64())
                })
                .and_then(|secs| check(&dest).map(|()| secs));
            let _ = e2e::remove_tree(&dest);
            match r {
                Ok(secs) => s.samples.push(secs),
                Err(e) => {
                    println!("  {}: failed: {e:#}", s.name);
                    s.failed = Some(format!("{} failed: {e:#}", s.name));
                }
            }
        }
    }
    for s in sides.iter().filter(|s| s.failed.is_none()) {
        println!("  {}: {} s", s.name, fmt_samples(&s.samples));
    }
}

/// Run `cmd`, failing with its stderr unless it succeeds.
fn ok(cmd: &mut Command) -> Result<()> {
    timed(cmd).map(|_| ())
}

/// `producer | tar -x -C dest`, both checked.
fn into_tar(mut producer: Command, dest: &Path) -> Result<()> {
    let mut p = producer
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the tar producer")?;
    let stdout = p.stdout.take().context("no stdout")?;
    let tar = crate::tool("tar", "tar")?
        .arg("-xf")
        .arg("-")
        .arg("-C")
        .arg(dest)
        .stdin(stdout)
        .output()?;
    let pout = p.wait_with_output()?;
    if !pout.status.success() {
        bail!(
            "producer failed: {}",
            String::from_utf8_lossy(&pout.stderr).trim()
        );
    }
    if !tar.status.success() {
        bail!(
            "tar -x failed: {}",
            String::from_utf8_lossy(&tar.stderr).trim()
        );
    }
    Ok(())
}

fn record(ctx: &mut Ctx, what: &str, mine: &Side<'_>, peer: &Side<'_>) {
    let row = Row {
        group: "bulk",
        what: what.to_string(),
        imgsafe: mine.outcome(),
        peer: peer.name.clone(),
        peer_time: peer.outcome(),
    };
    print_comparison(&row);
    ctx.rows.push(row);
}

/// An ext4 image of `tree` of `mib` MiB (mke2fs -d).
fn make_ext4(tree: &Path, image: &Path, mib: u64) -> Result<()> {
    let mut c = crate::tool("mke2fs", "e2fsprogs")?;
    c.args(["-q", "-F", "-t", "ext4", "-N", "60000", "-d"])
        .arg(tree)
        .arg(image)
        .arg(format!("{mib}M"));
    ok(&mut c)
}

/// [`make_ext4`], then the image read once into the page cache for the timed runs.
fn ext4(tree: &Path, image: &Path, mib: u64) -> Result<()> {
    make_ext4(tree, image, mib)?;
    super::util::warm_page_cache(image)
}

/// An xfs image of the large-file tree (`etc/hostname`, `big.bin`), from an mkfs.xfs
/// protofile (xfs has no `-d DIR`), with two allocation groups each larger than the
/// `file_mib` MiB file. mkfs.xfs 6.1 writes a protofile's file as one run from its first
/// extent, so a file that needs extents in two groups overwrites the next group's
/// headers (xfs_repair then finds garbage in the log and btrees); inside one group the
/// free space is a single extent and the image is sound.
fn xfs(tree: &Path, image: &Path, file_mib: u64) -> Result<()> {
    let ag_mib = (file_mib + file_mib / 4 + 64).max(300);
    std::fs::File::create(image)?.set_len(2 * ag_mib * MIB)?;
    let proto = image.with_extension("proto");
    let file = |name: &str| -> Result<String> {
        let p = tree.join(name);
        let shown = p.display().to_string();
        if shown.contains(char::is_whitespace) {
            bail!("{shown}: a protofile cannot name a path with spaces");
        }
        Ok(shown)
    };
    std::fs::write(
        &proto,
        format!(
            "/dev/null\n0 0\nd--755 0 0\netc d--755 0 0\nhostname ---644 0 0 {}\n$\nbig.bin ---644 0 0 {}\n$\n",
            file("etc/hostname")?,
            file("big.bin")?
        ),
    )?;
    let mut c = crate::tool("mkfs.xfs", "xfsprogs")?;
    c.args(["-q", "-f", "-d", "agcount=2", "-p"])
        .arg(&proto)
        .arg(image);
    ok(&mut c)?;
    super::util::warm_page_cache(image)
}

/// A btrfs image of `tree` of `mib` MiB (mkfs.btrfs -r).
fn btrfs(tree: &Path, image: &Path, mib: u64) -> Result<()> {
    std::fs::File::create(image)?.set_len(mib * MIB)?;
    let mut c = crate::tool("mkfs.btrfs", "btrfs-progs")?;
    c.args(["-q", "-f", "-r"]).arg(tree).arg(image);
    ok(&mut c)?;
    super::util::warm_page_cache(image)
}

/// A disk of `mib` MiB as LVM tools make it: an MBR partition holding a PV, VG `VG`,
/// one linear LV `LV` over all of it (made by libguestfs in its appliance, `-N lvfs`),
/// whose contents are then replaced by an ext4 image of `tree` made on the host: one
/// linear LV on a fresh PV is one contiguous range, at the partition's start plus the
/// PV's first extent. Returns the LV's device name for guestfish.
fn lvm(g: &e2e::Guestfs, tree: &Path, image: &Path, mib: u64) -> Result<&'static str> {
    const LV: &str = "/dev/VG/LV";
    let spec = format!("{}=lvfs:{LV}:ext4:{mib}M", image.display());
    ok(g.bare("guestfish")?.args(["-N", &spec, "exit"]))?;
    let query = |cmd: &[&str]| -> Result<String> {
        let mut c = g.bare("guestfish")?;
        c.args(["--ro", "--format=raw", "-a"]).arg(image).arg("run");
        c.arg(":").args(cmd);
        Ok(String::from_utf8_lossy(&timed(&mut c)?.stdout).into_owned())
    };
    let field = |text: &str, key: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {key} in guestfish's answer {text:?}"))
    };
    let part_start = field(&query(&["part-list", "/dev/sda"])?, "part_start")?;
    let pe_start = field(&query(&["pvs-full"])?, "pe_start")?;
    let lv_size: u64 = query(&["blockdev-getsize64", LV])?
        .trim()
        .parse()
        .context("blockdev-getsize64 answer")?;
    if !lv_size.is_multiple_of(MIB) {
        bail!("LV of {lv_size} bytes is not whole MiB");
    }
    let fs = image.with_extension("lv.img");
    make_ext4(tree, &fs, lv_size / MIB)?;
    {
        use std::io::{Seek, SeekFrom};
        let mut from = std::fs::File::open(&fs)?;
        let mut to = std::fs::OpenOptions::new().write(true).open(image)?;
        to.seek(SeekFrom::Start(part_start + pe_start))?;
        std::io::copy(&mut from, &mut to)?;
    }
    std::fs::remove_file(&fs)?;
    super::util::warm_page_cache(image)?;
    Ok(LV)
}

/// One untimed `imgsafe cp -v SRC DEST`: the seconds of its copy stage as it reports
/// them (after boot, probe and mount), and what it says about how the file was read.
fn copy_stage(cmd: &mut Command, src: &str, dest: &Path) -> Result<(f64, String)> {
    std::fs::create_dir_all(dest)?;
    let out = timed(cmd.arg("cp").arg("-v").arg(src).arg(dest))?;
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("] cp: "))
        .context("cp -v printed no copy stage")?;
    let rest = line.split("] cp: ").nth(1).unwrap_or_default();
    let secs = rest
        .split('s')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("unreadable copy stage {line:?}"))?;
    let how = rest
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map_or_else(String::new, |(h, _)| h.to_string());
    Ok((secs, how))
}

/// Run the group.
pub fn run(ctx: &mut Ctx) -> Result<()> {
    let rounds: usize = env_num("IMGSAFE_BENCH_ROUNDS", ROUNDS)?;
    let big_mib: u64 = env_num("IMGSAFE_BENCH_BULK_MIB", BIG_MIB)?;
    let small_files: usize = env_num("IMGSAFE_BENCH_SMALL_FILES", SMALL_FILES)?;

    let big_tree = ctx.dir().join("bulk-big");
    // An /etc for the `ls` that e2e::prepare_imgsafe runs first.
    std::fs::create_dir_all(big_tree.join("etc"))?;
    std::fs::write(big_tree.join("etc/hostname"), "bulk\n")?;
    let big_file = big_tree.join("big.bin");
    let mut rng = SplitMix::new(0xb01c);
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big_file)?);
        let mut chunk = vec![0u8; MIB as usize];
        for _ in 0..big_mib {
            rng.fill(&mut chunk);
            f.write_all(&chunk)?;
        }
        f.flush()?;
    }
    let big_image = ctx.dir().join("bulk-big.img");
    ext4(&big_tree, &big_image, big_mib + big_mib / 8 + 64)?;
    println!(
        "made {} (ext4 holding a {big_mib} MiB random file)",
        big_image.display()
    );

    let small_root = ctx.dir().join("bulk-small");
    let small_tree = small_root.join("tree");
    for i in 0..small_files {
        let dir = small_tree.join(format!("d{:03}", i / PER_DIR));
        if i % PER_DIR == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let mut b = vec![0u8; SMALL_SIZE];
        rng.fill(&mut b);
        std::fs::write(dir.join(format!("f{i:05}")), &b)?;
    }
    let small_image = ctx.dir().join("bulk-small.img");
    let small_mib = (small_files * 8192 / MIB as usize) as u64 + 64;
    ext4(&small_root, &small_image, small_mib)?;
    println!(
        "made {} (ext4 holding /tree: {small_files} files of {SMALL_SIZE} bytes)",
        small_image.display()
    );

    let (ready, accel) = e2e::prepare_imgsafe(ctx, &big_image);
    if let Err(why) = ready {
        bail!("{why}");
    }
    let guestfs = e2e::prepare_guestfs(&big_image, accel);
    let (bin, cache) = (ctx.imgsafe.clone(), e2e::appliance_cache(ctx));
    let imgsafe = |bulk: bool| {
        let mut c = e2e::imgsafe_command(&bin, &cache);
        if !bulk {
            c.env("IMGSAFE_BULK", "0");
        }
        c
    };
    // Where the copies land: IMGSAFE_BENCH_OUT=/dev/shm/x keeps the destination disk's
    // own metadata speed (the same for every side) from hiding the tools' cost.
    let out = std::env::var_os("IMGSAFE_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ctx.dir().join("bulk-out"));
    std::fs::create_dir_all(&out)?;

    // One large file, on each layout.
    let big_check = |dest: &Path| -> Result<()> {
        match super::util::first_difference(&big_file, &dest.join("big.bin"))? {
            None => Ok(()),
            Some(d) => bail!("big.bin differs: {d}"),
        }
    };
    let fs_mib = big_mib + big_mib / 8 + 64;
    let wanted =
        std::env::var("IMGSAFE_BENCH_BULK_LAYOUTS").unwrap_or_else(|_| "ext4,xfs,lvm,btrfs".into());
    // An empty list measures only the tree copy.
    for layout in wanted.split(',').filter(|l| !l.is_empty()) {
        let (image, device, label) = match layout {
            "ext4" => (big_image.clone(), "/dev/sda", "ext4"),
            "xfs" => {
                let i = ctx.dir().join("bulk-big-xfs.img");
                xfs(&big_tree, &i, big_mib)?;
                (i, "/dev/sda", "xfs")
            }
            "btrfs" => {
                let i = ctx.dir().join("bulk-big-btrfs.img");
                btrfs(&big_tree, &i, fs_mib.max(128))?;
                (i, "/dev/sda", "btrfs, streamed through the guest")
            }
            "lvm" => {
                let Ok(g) = &guestfs else {
                    println!("LVM layout skipped: it is made with libguestfs, which is not usable");
                    continue;
                };
                let i = ctx.dir().join("bulk-big-lvm.img");
                let dev = lvm(g, &big_tree, &i, fs_mib + 16)?;
                (i, dev, "ext4 on an LVM linear LV on a partition")
            }
            other => bail!(
                "IMGSAFE_BENCH_BULK_LAYOUTS: unknown layout {other:?} (ext4, xfs, lvm, btrfs)"
            ),
        };
        let src = format!("{}:/big.bin", image.display());
        let mut sides = vec![
            Side::new("imgsafe cp", |d: &Path| {
                ok(imgsafe(true).arg("cp").arg(&src).arg(d))
            }),
            Side::new("guestfish copy-out", |d: &Path| match &guestfs {
                Ok(g) => ok(&mut g.command_on(
                    "guestfish",
                    &image,
                    device,
                    &["copy-out", "/big.bin", &d.display().to_string()],
                )?),
                Err(why) => bail!("{why}"),
            }),
        ];
        // The guest stream, once, on the first layout only: it does not depend on it.
        if layout == "ext4" {
            sides.push(Side::new("imgsafe cp, IMGSAFE_BULK=0", |d: &Path| {
                ok(imgsafe(false).arg("cp").arg(&src).arg(d))
            }));
        }
        println!("cp of a {big_mib} MiB file on {label}, {rounds} rounds:");
        interleaved(&mut sides, rounds, &out, &big_check);
        let what = format!("cp {big_mib} MiB file, {layout}");
        record(ctx, &what, &sides[0], &sides[1]);
        if let Some(stream) = sides.get(2) {
            record(ctx, &what, &sides[0], stream);
        }
        if let Some(m) = median(&sides[0].samples) {
            println!(
                "  imgsafe cp on {label}: {:.0} MiB/s over the whole command (start-up included)",
                big_mib as f64 / m
            );
        }
        match copy_stage(&mut imgsafe(true), &src, &out.join("dest")) {
            Ok((secs, mapped)) => println!(
                "  imgsafe cp on {label}, copy stage of one more run (cp -v): {secs:.3} s, {:.0} MiB/s after start-up, {mapped}",
                big_mib as f64 / secs
            ),
            Err(e) => println!("  imgsafe cp -v on {label}: {e:#}"),
        }
        let _ = e2e::remove_tree(&out.join("dest"));
        if image != big_image {
            std::fs::remove_file(&image)?;
        }
    }

    // Many small files.
    let src = format!("{}:/tree", small_image.display());
    let small_check = |dest: &Path| same_tree(&small_tree, &dest.join("tree"));
    let guestfs_small = e2e::prepare_guestfs(&small_image, accel);
    let mut sides = vec![
        Side::new("imgsafe cp -r", |d: &Path| {
            ok(imgsafe(true).arg("cp").arg(&src).arg(d.join("tree")))
        }),
        Side::new("virt-tar-out | tar -x", |d: &Path| match &guestfs_small {
            Ok(g) => into_tar(
                g.command("guestfish", &small_image, &["tar-out", "/tree", "-"])?,
                &{
                    let t = d.join("tree");
                    std::fs::create_dir_all(&t)?;
                    t
                },
            ),
            Err(why) => bail!("{why}"),
        }),
        Side::new("imgsafe cp - | tar -x", |d: &Path| {
            let mut c = imgsafe(true);
            c.arg("cp").arg(&src).arg("-");
            into_tar(c, d)
        }),
    ];
    println!("cp -r of {small_files} small files, {rounds} rounds:");
    interleaved(&mut sides, rounds, &out, &small_check);
    let what = format!("cp -r {small_files} files");
    record(ctx, &what, &sides[0], &sides[1]);
    record(
        ctx,
        &format!("{what}, imgsafe as tar"),
        &sides[2],
        &sides[1],
    );
    Ok(())
}
