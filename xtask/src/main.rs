//! `cargo xtask <task>`: project tasks.
//!
//! - `demo`: build imgsafe, make a small demo disk image with real tools, and run the
//!   main commands on it.
//! - `appliance`: build imgsafe and its appliance ahead of time (for CI and packaging).
//! - `bench`: compare imgsafe with its peers on the same images in the same run.

mod bench;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("appliance") => appliance(),
        Some("bench") => bench::run(&args[1..]),
        _ => bail!("usage: cargo xtask demo|appliance|bench"),
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// Build the imgsafe binary with `profile` ("dev" or "release") and return its path.
fn build_imgsafe(release: bool) -> Result<PathBuf> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(["build", "--quiet", "-p", "imgsafe"])
        .current_dir(root());
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(dir
        .join(if release { "release" } else { "debug" })
        .join("imgsafe"))
}

fn run(c: &mut Command) -> Result<()> {
    let status = c
        .status()
        .with_context(|| format!("running {:?}", c.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", c.get_program());
    }
    Ok(())
}

/// Run a tool that must exist, naming its Debian package when it does not.
fn tool(name: &str, package: &str) -> Result<Command> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found: install the Debian package {package}"))?;
    Ok(Command::new(found))
}

/// Make a small ext4 image with a Linux-like tree: the demo's "untrusted" disk.
fn make_demo_image(dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("tree");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    for d in ["etc", "home/demo/notes", "var/log"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::write(
        tree.join("etc/os-release"),
        "PRETTY_NAME=\"imgsafe demo disk\"\nNAME=\"imgsafe-demo\"\nID=imgsafe-demo\nVERSION_ID=1\n",
    )?;
    std::fs::write(tree.join("etc/hostname"), "demo-host\n")?;
    std::fs::write(
        tree.join("etc/fstab"),
        "LABEL=demo-root / ext4 defaults 0 1\n",
    )?;
    std::fs::write(
        tree.join("home/demo/letter.txt"),
        "Dear reader,\nthis file was read from inside a VM.\n",
    )?;
    std::fs::write(
        tree.join("home/demo/notes/todo.md"),
        "- look inside images without root\n",
    )?;
    std::fs::write(tree.join("var/log/boot.log"), "booted\n".repeat(100))?;
    std::os::unix::fs::symlink("/etc/hostname", tree.join("home/demo/hostname-link"))?;
    let img = dir.join("demo.img");
    let _ = std::fs::remove_file(&img);
    run(tool("mke2fs", "e2fsprogs")?
        .args(["-q", "-F", "-t", "ext4", "-L", "demo-root", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("32M"))?;
    Ok(img)
}

fn demo() -> Result<()> {
    let bin = build_imgsafe(false)?;
    let dir = root().join("target").join("demo");
    std::fs::create_dir_all(&dir)?;
    let img = make_demo_image(&dir)?;
    let out = dir.join("copied");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let img_s = img.to_string_lossy().into_owned();
    let steps: Vec<Vec<String>> = vec![
        vec!["info".into(), img_s.clone()],
        vec!["filesystems".into(), img_s.clone()],
        vec!["ls".into(), "-l".into(), img_s.clone(), "/home/demo".into()],
        vec!["cat".into(), img_s.clone(), "/etc/os-release".into()],
        vec![
            "cp".into(),
            format!("{img_s}:/home/demo"),
            out.to_string_lossy().into_owned(),
        ],
    ];
    for s in steps {
        println!("\n$ imgsafe {}", s.join(" "));
        run(Command::new(&bin).args(&s))?;
    }
    println!("\n$ ls -lR {}", out.display());
    run(Command::new("ls").arg("-lR").arg(&out))?;
    Ok(())
}

fn appliance() -> Result<()> {
    let bin = build_imgsafe(false)?;
    run(Command::new(&bin).arg("appliance"))
}
