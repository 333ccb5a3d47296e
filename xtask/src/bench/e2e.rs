//! `e2e`: whole commands from a cold start (boot the appliance, mount, answer, tear
//! down) on a small ext4 image, next to libguestfs doing the same job (virt-ls, virt-cat,
//! virt-copy-out with LIBGUESTFS_BACKEND=direct).
//!
//! libguestfs is told which filesystem to mount (`-m /dev/sda`), as imgsafe finds it by
//! probing, so neither side pays for OS inspection. virt-copy-out has no `-m` (it is
//! `guestfish --ro -i copy-out`, and `-i` needs an inspectable OS), so its peer is that
//! same guestfish command with `-m /dev/sda` in place of `-i`.

use super::util::{fmt_samples, last_lines, median, timed, SplitMix, Timed, WorkDir, MIB};
use super::{print_comparison, Ctx, Outcome, Row};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Timed imgsafe runs per command (cold starts are noisier than copies).
const IMGSAFE_ROUNDS: usize = 5;
/// Timed libguestfs runs per command (each is several times slower).
const PEER_ROUNDS: usize = 3;
/// The file `cat` reads.
const OS_RELEASE: &str = "/etc/os-release";
/// The directory `cp` copies out.
const COPY_DIR: &str = "/data";
/// The peer of `imgsafe cp`: virt-copy-out's own command, with `-m` for `-i`.
const COPY_PEER: &str = "virt-copy-out (guestfish --ro -m copy-out)";
/// The Debian package with virt-ls, virt-cat and virt-copy-out (and guestfish).
const GUESTFS_PACKAGE: &str = "libguestfs-tools";

/// Run the group.
pub fn run(ctx: &mut Ctx) -> Result<()> {
    let tree = ctx.dir().join("e2e-tree");
    let data_bytes = make_tree(&tree)?;
    let image = ctx.dir().join("e2e.img");
    let mut mke2fs = crate::tool("mke2fs", "e2fsprogs")?;
    mke2fs
        .args(["-q", "-F", "-t", "ext4", "-L", "bench-root", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("64M");
    timed(&mut mke2fs)?;
    super::util::warm_page_cache(&image)?;
    println!(
        "made {} (64 MiB ext4 by mke2fs -d; {COPY_DIR} holds {:.1} MiB)",
        image.display(),
        data_bytes as f64 / MIB as f64
    );
    let out = WorkDir::create(ctx.dir().join("e2e-out"))?;
    let os_release = std::fs::read(tree.join("etc/os-release"))?;
    let expected_data = tree.join("data");

    let (imgsafe_ready, accel) = prepare_imgsafe(ctx, &image);
    let guestfs_setup = prepare_guestfs(&image, accel);
    let peer_ready = guestfs_setup.as_ref().map(|_| ()).map_err(Clone::clone);
    println!(
        "/dev/kvm: {}",
        if Path::new("/dev/kvm").exists() {
            "present"
        } else {
            "absent (both sides use TCG)"
        }
    );

    let img = image.display().to_string();
    let (bin, cache) = (ctx.imgsafe.clone(), appliance_cache(ctx));
    let imgsafe = |args: &[&str]| {
        let mut c = imgsafe_command(&bin, &cache);
        c.args(args);
        c
    };
    let guestfs = |name: &str, args: &[&str]| -> Result<Command> {
        match &guestfs_setup {
            Ok(g) => g.command(name, &image, args),
            Err(why) => bail!("{why}"),
        }
    };
    let lists_etc = |t: &Timed| -> Result<()> {
        if String::from_utf8_lossy(&t.stdout).contains("os-release") {
            Ok(())
        } else {
            bail!("the listing of /etc does not name os-release")
        }
    };
    let cats = |t: &Timed| -> Result<()> {
        if t.stdout == os_release {
            Ok(())
        } else {
            bail!(
                "printed {} bytes, not the {} bytes of {OS_RELEASE}",
                t.stdout.len(),
                os_release.len()
            )
        }
    };

    // ls
    let mine = measure(
        "imgsafe ls",
        &imgsafe_ready,
        IMGSAFE_ROUNDS,
        || Ok(imgsafe(&["ls", &img, "/etc"])),
        lists_etc,
        || Ok(()),
    );
    let theirs = measure(
        "virt-ls",
        &peer_ready,
        PEER_ROUNDS,
        || guestfs("virt-ls", &["/etc"]),
        lists_etc,
        || Ok(()),
    );
    record(ctx, "ls /etc", "virt-ls", mine, theirs);

    // cat
    let mine = measure(
        "imgsafe cat",
        &imgsafe_ready,
        IMGSAFE_ROUNDS,
        || Ok(imgsafe(&["cat", &img, OS_RELEASE])),
        cats,
        || Ok(()),
    );
    let theirs = measure(
        "virt-cat",
        &peer_ready,
        PEER_ROUNDS,
        || guestfs("virt-cat", &[OS_RELEASE]),
        cats,
        || Ok(()),
    );
    record(ctx, "cat /etc/os-release", "virt-cat", mine, theirs);

    // cp: imgsafe copies to a fresh DEST (DEST becomes the copy), copy-out into an
    // existing directory (DEST/data); both are checked file by file against the tree.
    let mine_dest = out.path().join("imgsafe");
    let source = format!("{img}:{COPY_DIR}");
    let mine = measure(
        "imgsafe cp",
        &imgsafe_ready,
        IMGSAFE_ROUNDS,
        || Ok(imgsafe(&["cp", &source, &mine_dest.display().to_string()])),
        |_| same_tree(&expected_data, &mine_dest),
        || remove_tree(&mine_dest),
    );
    let theirs_dest = out.path().join("guestfs");
    let theirs = measure(
        COPY_PEER,
        &peer_ready,
        PEER_ROUNDS,
        || {
            std::fs::create_dir_all(&theirs_dest)?;
            guestfs(
                "guestfish",
                &["copy-out", COPY_DIR, &theirs_dest.display().to_string()],
            )
        },
        |_| same_tree(&expected_data, &theirs_dest.join("data")),
        || remove_tree(&theirs_dest),
    );
    record(
        ctx,
        &format!("cp {COPY_DIR} ({:.1} MiB)", data_bytes as f64 / MIB as f64),
        COPY_PEER,
        mine,
        theirs,
    );
    Ok(())
}

/// Which accelerator imgsafe's `-v` run used, so libguestfs can be given the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Accel {
    /// Software emulation (imgsafe fell back to it, or IMGSAFE_ACCEL=tcg).
    Tcg,
    /// Hardware KVM.
    Kvm,
    /// imgsafe did not get as far as choosing.
    Unknown,
}

/// imgsafe's appliance cache for this run: private, so another imgsafe build running at
/// the same time (tests, a debug binary) cannot prune the entry this run boots from.
pub(super) fn appliance_cache(ctx: &Ctx) -> PathBuf {
    ctx.dir().join("cache")
}

/// The imgsafe binary with its appliance cache under `cache` (`$XDG_CACHE_HOME`).
pub(super) fn imgsafe_command(bin: &Path, cache: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("XDG_CACHE_HOME", cache);
    c
}

/// Build imgsafe's appliance (cached: a first build is not a cold start) and show one
/// `-v` run's stage breakdown. Err(why) when imgsafe's end-to-end path does not work.
pub(super) fn prepare_imgsafe(ctx: &Ctx, image: &Path) -> (Result<(), String>, Accel) {
    let cache = appliance_cache(ctx);
    let t = match timed(imgsafe_command(&ctx.imgsafe, &cache).arg("appliance")) {
        Ok(t) => t,
        Err(e) => {
            println!("imgsafe appliance failed, imgsafe side skipped: {e:#}");
            return (
                Err(format!("imgsafe appliance failed: {e:#}")),
                Accel::Unknown,
            );
        }
    };
    println!(
        "imgsafe: appliance built in {:.2} s into {} (once; every timed run uses the cache)",
        t.secs,
        cache.display()
    );
    let mut verbose = imgsafe_command(&ctx.imgsafe, &cache);
    verbose.arg("-v").arg("ls").arg(image).arg("/etc");
    match timed(&mut verbose) {
        Ok(t) => {
            println!(
                "imgsafe -v ls {} /etc: {:.3} s; stages:",
                image.display(),
                t.secs
            );
            for line in t.stderr.lines() {
                println!("  {line}");
            }
            let forced = std::env::var("IMGSAFE_ACCEL").ok();
            let accel = if t.stderr.contains("using TCG") {
                println!("imgsafe accelerator: TCG (imgsafe's fallback notice)");
                Accel::Tcg
            } else if let Some(v) = forced {
                println!("imgsafe accelerator: {v} (IMGSAFE_ACCEL)");
                if v.eq_ignore_ascii_case("tcg") {
                    Accel::Tcg
                } else {
                    Accel::Kvm
                }
            } else {
                println!("imgsafe accelerator: KVM (no TCG fallback notice)");
                Accel::Kvm
            };
            (Ok(()), accel)
        }
        Err(e) => {
            println!("imgsafe ls does not work yet, imgsafe side skipped: {e:#}");
            (Err(format!("imgsafe ls failed: {e:#}")), Accel::Unknown)
        }
    }
}

/// How libguestfs is run: the direct backend, on the whole disk as /dev/sda (the same
/// job as imgsafe's probe + mount, without libguestfs's OS inspection).
pub(super) struct Guestfs {
    /// LIBGUESTFS_BACKEND_SETTINGS to set (None: leave the environment's).
    settings: Option<&'static str>,
}

impl Guestfs {
    /// `NAME --format=raw -a IMAGE -m /dev/sda ARGS...` (guestfish also gets `--ro`: the
    /// virt-* tools are read-only by themselves, guestfish is not).
    pub(super) fn command(&self, name: &str, image: &Path, args: &[&str]) -> Result<Command> {
        self.command_on(name, image, "/dev/sda", args)
    }

    /// `NAME` with only the backend settings: for making images (`guestfish -N`).
    pub(super) fn bare(&self, name: &str) -> Result<Command> {
        let mut c = crate::tool(name, GUESTFS_PACKAGE)?;
        c.env("LIBGUESTFS_BACKEND", "direct");
        if let Some(s) = self.settings {
            c.env("LIBGUESTFS_BACKEND_SETTINGS", s);
        }
        Ok(c)
    }

    /// [`Guestfs::command`] mounting `device` (an LV, a partition) instead of /dev/sda.
    pub(super) fn command_on(
        &self,
        name: &str,
        image: &Path,
        device: &str,
        args: &[&str],
    ) -> Result<Command> {
        let mut c = self.bare(name)?;
        if name == "guestfish" {
            c.arg("--ro");
        }
        c.args(["--format=raw", "-a"])
            .arg(image)
            .args(["-m", device])
            .args(args);
        Ok(c)
    }
}

/// Check libguestfs is installed and warm its appliance cache with one untimed run.
/// It gets the accelerator imgsafe used: force_tcg when imgsafe ran under TCG, unless
/// LIBGUESTFS_BACKEND_SETTINGS is already set. When imgsafe's choice is unknown and
/// libguestfs's own KVM attempt fails (a /dev/kvm that QEMU cannot use), retry on TCG.
pub(super) fn prepare_guestfs(image: &Path, accel: Accel) -> Result<Guestfs, String> {
    if let Err(e) = crate::tool("virt-ls", GUESTFS_PACKAGE) {
        println!("libguestfs peer skipped: {e:#}");
        return Err(format!("{e:#}"));
    }
    let user_set = std::env::var_os("LIBGUESTFS_BACKEND_SETTINGS").is_some();
    let first = Guestfs {
        settings: (accel == Accel::Tcg && !user_set).then_some("force_tcg"),
    };
    let warm_up = |g: &Guestfs| {
        g.command("virt-ls", image, &["/"])
            .and_then(|mut c| timed(&mut c))
    };
    let (guestfs, result) = match warm_up(&first) {
        Err(e) if accel == Accel::Unknown && !user_set => {
            println!("libguestfs failed with its default accelerator ({e:#}); retrying on TCG");
            let tcg = Guestfs {
                settings: Some("force_tcg"),
            };
            let r = warm_up(&tcg);
            (tcg, r)
        }
        r => (first, r),
    };
    let how = match guestfs.settings {
        Some(s) => format!("LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS={s}"),
        None => "LIBGUESTFS_BACKEND=direct".to_string(),
    };
    match result {
        Ok(t) => {
            println!(
                "libguestfs ({how}): warm-up run {:.2} s (builds its appliance cache once)",
                t.secs
            );
            Ok(guestfs)
        }
        Err(e) => {
            println!("libguestfs peer skipped: warm-up failed ({how}): {e:#}");
            Err(format!("libguestfs warm-up failed: {e:#}"))
        }
    }
}

/// Time `rounds` runs of `cmd`, checking each run's result with `check` and calling
/// `cleanup` after it. Skipped when `ready` says the side does not work, or a run fails.
fn measure(
    name: &str,
    ready: &Result<(), String>,
    rounds: usize,
    cmd: impl Fn() -> Result<Command>,
    check: impl Fn(&Timed) -> Result<()>,
    cleanup: impl Fn() -> Result<()>,
) -> Outcome {
    if let Err(why) = ready {
        return Outcome::Skipped(why.clone());
    }
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let run = cmd()
            .and_then(|mut c| timed(&mut c))
            .and_then(|t| check(&t).map(|()| t.secs));
        let cleaned = cleanup();
        match (run, cleaned) {
            (Ok(secs), Ok(())) => samples.push(secs),
            (Err(e), _) | (_, Err(e)) => {
                println!("  {name}: failed: {}", last_lines(&format!("{e:#}"), 3));
                return Outcome::Skipped(format!("{name} failed: {e:#}"));
            }
        }
    }
    println!("  {name}: {} s", fmt_samples(&samples));
    median(&samples)
        .map(Outcome::Secs)
        .unwrap_or_else(|| Outcome::Skipped("no samples".into()))
}

fn record(ctx: &mut Ctx, what: &str, peer: &str, imgsafe: Outcome, peer_time: Outcome) {
    let row = Row {
        group: "e2e",
        what: what.to_string(),
        imgsafe,
        peer: peer.to_string(),
        peer_time,
    };
    print_comparison(&row);
    ctx.rows.push(row);
}

/// A small Linux-like tree: /etc with a few dozen small files, /data with a few MiB in
/// files of mixed sizes (text and incompressible). Returns the bytes under /data.
pub(super) fn make_tree(tree: &Path) -> Result<u64> {
    if tree.exists() {
        std::fs::remove_dir_all(tree)?;
    }
    for d in [
        "etc/ssh",
        "etc/default",
        "etc/conf.d",
        "data/media",
        "data/logs/old",
        "home/user",
    ] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    let files: [(&str, &str); 6] = [
        (
            "etc/os-release",
            "PRETTY_NAME=\"Bench Linux 1\"\nNAME=\"Bench Linux\"\nID=bench\nVERSION_ID=1\n",
        ),
        ("etc/hostname", "bench-host\n"),
        ("etc/fstab", "LABEL=bench-root / ext4 defaults 0 1\n"),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        ),
        (
            "etc/ssh/sshd_config",
            "PermitRootLogin no\nPasswordAuthentication no\n",
        ),
    ];
    for (path, text) in files {
        std::fs::write(tree.join(path), text)?;
    }
    for i in 0..40 {
        std::fs::write(
            tree.join(format!("etc/conf.d/service{i:02}.conf")),
            format!("# service {i}\nenabled=yes\nport={}\n", 8000 + i),
        )?;
    }
    std::fs::write(tree.join("etc/default/grub"), "GRUB_TIMEOUT=5\n")?;
    let mut rng = SplitMix::new(0xe2e);
    let mut total = 0u64;
    let sizes: [(&str, usize); 8] = [
        ("data/media/a.bin", 1536 << 10),
        ("data/media/b.bin", 1 << 20),
        ("data/media/c.bin", 768 << 10),
        ("data/logs/app.log", 512 << 10),
        ("data/logs/old/app.log.1", 1 << 20),
        ("data/logs/old/app.log.2", 256 << 10),
        ("data/notes.txt", 3000),
        ("data/empty", 0),
    ];
    for (path, size) in sizes {
        let mut bytes = vec![0u8; size];
        if path.ends_with(".bin") {
            rng.fill(&mut bytes);
        } else {
            let line = b"2024-05-01T12:00:00Z app[42]: request served in 3 ms\n";
            for (b, l) in bytes.iter_mut().zip(line.iter().cycle()) {
                *b = *l;
            }
        }
        std::fs::write(tree.join(path), &bytes)?;
        total += size as u64;
    }
    for i in 0..20 {
        let mut bytes = vec![0u8; 4096 + i * 1000];
        rng.fill(&mut bytes);
        std::fs::write(tree.join(format!("data/media/thumb{i:02}.jpg")), &bytes)?;
        total += bytes.len() as u64;
    }
    Ok(total)
}

/// Every file and directory under `root`, by relative path: Some(bytes) for a file,
/// None for a directory.
fn snapshot(root: &Path) -> Result<BTreeMap<PathBuf, Option<Vec<u8>>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root)?.to_path_buf();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(path);
                out.insert(rel, None);
            } else if kind.is_file() {
                out.insert(rel, Some(std::fs::read(&path)?));
            } else {
                bail!("{}: unexpected file type in the copy", path.display());
            }
        }
    }
    Ok(out)
}

/// Fail unless `copy` holds the same directories and file contents as `original`.
pub(super) fn same_tree(original: &Path, copy: &Path) -> Result<()> {
    let (a, b) = (snapshot(original)?, snapshot(copy)?);
    if let Some((path, _)) = a.iter().find(|(p, v)| b.get(*p) != Some(v)) {
        bail!(
            "{}: missing or different in the copy {}",
            path.display(),
            copy.display()
        );
    }
    if let Some(path) = b.keys().find(|p| !a.contains_key(*p)) {
        bail!(
            "{}: in the copy {} but not in the image",
            path.display(),
            copy.display()
        );
    }
    Ok(())
}

pub(super) fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("{}: cannot remove", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> WorkDir {
        WorkDir::create(
            std::env::temp_dir().join(format!("xtask-e2e-{tag}-{}", std::process::id())),
        )
        .unwrap()
    }

    #[test]
    fn tree_has_os_release_and_a_few_mib_of_data() {
        let dir = scratch("tree");

        let data = make_tree(&dir.path().join("t")).unwrap();

        assert!(dir.path().join("t/etc/os-release").is_file());
        assert!((4 * MIB..8 * MIB).contains(&data), "{data} bytes");
    }

    #[test]
    fn identical_trees_compare_equal() {
        let dir = scratch("same");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for t in [&a, &b] {
            std::fs::create_dir_all(t.join("sub")).unwrap();
            std::fs::write(t.join("sub/f"), b"x").unwrap();
        }

        let r = same_tree(&a, &b);

        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn a_changed_file_is_found() {
        let dir = scratch("changed");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for (t, text) in [(&a, b"x"), (&b, b"y")] {
            std::fs::create_dir_all(t).unwrap();
            std::fs::write(t.join("f"), text).unwrap();
        }

        let err = same_tree(&a, &b).unwrap_err();

        assert!(
            err.to_string().starts_with("f: missing or different"),
            "{err}"
        );
    }

    #[test]
    fn an_extra_file_in_the_copy_is_found() {
        let dir = scratch("extra");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("extra"), b"x").unwrap();

        let err = same_tree(&a, &b).unwrap_err();

        assert!(err.to_string().starts_with("extra: in the copy"), "{err}");
    }
}
