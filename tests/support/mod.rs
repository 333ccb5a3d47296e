//! Shared helpers for the end-to-end tests: run the real binary, build disk images with
//! real tools at test time, and prove the image file is never written.
#![allow(dead_code)]

pub mod exfat;
pub mod lvm;
pub mod ploopwriter;
pub mod serve;
pub mod tmux;
pub mod vdidiff;
pub mod vhdwriter;
pub mod vhdxdiff;

use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Fixed mtime given to every file of the sample tree.
pub const MTIME: i64 = 1_600_000_000;

/// Cache shared by all tests of one run so the appliance is built once.
pub fn test_cache() -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join("imgsafe-test-cache");
    fs::create_dir_all(&p).unwrap();
    p
}

/// The imgsafe binary under test, with the shared appliance cache.
pub fn imgsafe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imgsafe"));
    c.env("XDG_CACHE_HOME", test_cache())
        .env("IMGSAFE_ACCEL", "tcg")
        .stdin(Stdio::null());
    c
}

/// Run imgsafe with `args` and collect its output.
pub fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    imgsafe().args(args).output().expect("running imgsafe")
}

/// A command for a tool that must be installed; panics naming its Debian package.
pub fn tool(name: &str, package: &str) -> Command {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install the Debian package {package}"));
    Command::new(found)
}

/// Run a tool and insist that it succeeds.
pub fn must(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assert that `copy` holds what `orig` holds: same names, types, contents, permission
/// bits, mtimes and symlink targets (`lost+found`, which mke2fs adds, is ignored).
pub fn assert_same_tree(orig: &Path, copy: &Path) {
    let rel = |root: &Path, all: Vec<std::path::PathBuf>| {
        let mut v: Vec<_> = all
            .into_iter()
            .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
            .collect();
        v.retain(|p| !p.starts_with("lost+found"));
        v.sort();
        v
    };
    let want = rel(orig, walk(orig));
    assert_eq!(rel(copy, walk(copy)), want);
    for p in &want {
        let (a, b) = (
            fs::symlink_metadata(orig.join(p)).unwrap(),
            fs::symlink_metadata(copy.join(p)).unwrap(),
        );
        assert_eq!(a.file_type(), b.file_type(), "{}", p.display());
        assert_eq!(a.mtime(), b.mtime(), "mtime of {}", p.display());
        if a.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(orig.join(p)).unwrap(),
                fs::read_link(copy.join(p)).unwrap()
            );
            continue;
        }
        assert_eq!(
            a.mode() & 0o7777,
            b.mode() & 0o7777,
            "mode of {}",
            p.display()
        );
        if a.is_file() {
            assert!(
                fs::read(orig.join(p)).unwrap() == fs::read(copy.join(p)).unwrap(),
                "content of {}",
                p.display()
            );
        }
    }
}

/// sha256 of a file, hex.
pub fn sha256(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A disk image made for one test, with its sha256 taken when it was made.
pub struct Image {
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
    sha: String,
}

impl Image {
    /// Record an image file's hash.
    pub fn new(dir: tempfile::TempDir, path: PathBuf) -> Image {
        let sha = sha256(&path);
        Image { path, dir, sha }
    }

    /// Panic if the image file's bytes changed since it was made.
    pub fn assert_unchanged(&self) {
        assert_eq!(
            sha256(&self.path),
            self.sha,
            "{} was modified",
            self.path.display()
        );
    }

    /// The path as a string argument.
    pub fn arg(&self) -> String {
        self.path.to_str().unwrap().to_string()
    }
}

/// Stdout as text, stderr shown on failure.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The deterministic pseudo-random bytes of the sample's binary file.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn set_mtime(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = [libc::timespec {
        tv_sec: MTIME,
        tv_nsec: 0,
    }; 2];
    // SAFETY: valid NUL-terminated path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// Options for the sample tree: which awkward names the target filesystem can hold.
#[derive(Clone, Copy)]
pub struct TreeOpts {
    /// Names with newline, backslash and non-UTF-8 bytes (ext4, btrfs).
    pub odd_names: bool,
    /// Symlinks and hard links.
    pub links: bool,
    /// A sparse 8 MiB file.
    pub sparse: bool,
}

impl TreeOpts {
    /// Plain names only, no links, no sparse file: what every filesystem holds.
    pub const PLAIN: TreeOpts = TreeOpts {
        odd_names: false,
        links: false,
        sparse: false,
    };
}

/// Every name of the sample tree's awkward directory when `odd_names` is set.
pub fn odd_names() -> Vec<Vec<u8>> {
    vec![
        b"with space.txt".to_vec(),
        "naïve ünïcödé.txt".as_bytes().to_vec(),
        b"new\nline".to_vec(),
        b"back\\slash".to_vec(),
        vec![b'b', b'a', b'd', 0xff, 0xfe],
    ]
}

/// Build the sample tree used by the filesystem tests.
pub fn sample_tree(root: &Path, opts: TreeOpts) {
    let w = |rel: &str, data: &[u8]| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    };
    w(
        "etc/os-release",
        b"NAME=\"Sample\"\nID=sample\nVERSION_ID=42\n",
    );
    w("etc/hostname", b"sample-host\n");
    w("etc/fstab", b"# empty\n");
    w("home/me/letter", b"Dear imgsafe,\nplease copy me.\n");
    w("home/me/big.bin", &pseudo_random(3 << 20, 7));
    fs::set_permissions(
        root.join("home/me/letter"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let mut deep = String::from("deep");
    for i in 0..12 {
        deep.push_str(&format!("/level{i}"));
    }
    w(&format!("{deep}/leaf.txt"), b"bottom\n");
    w("home/me/with space.txt", b"spaced\n");
    if opts.odd_names {
        let odd = root.join("odd");
        fs::create_dir_all(&odd).unwrap();
        for n in odd_names() {
            fs::write(odd.join(OsStr::from_bytes(&n)), &n).unwrap();
        }
    }
    if opts.links {
        symlink("/etc/passwd", root.join("home/me/abs-link")).unwrap();
        symlink("../../../../../outside", root.join("home/me/escape-link")).unwrap();
        symlink("letter", root.join("home/me/rel-link")).unwrap();
        fs::hard_link(root.join("home/me/letter"), root.join("home/me/hard")).unwrap();
    }
    if opts.sparse {
        let f = fs::File::create(root.join("home/me/sparse.img")).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"middle", 4 << 20).unwrap();
    }
    fs::set_permissions(root.join("home/me"), fs::Permissions::from_mode(0o750)).unwrap();
    // mtimes last, deepest first, so creating children does not bump them again.
    let mut all: Vec<PathBuf> = walk(root);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in all {
        set_mtime(&p);
    }
}

/// Every path below `root` (not following symlinks), root excluded.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// An ext4 image of `tree` (mke2fs -d), unpartitioned.
pub fn ext4_image(tree: &Path, size: &str) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    must(
        tool("mke2fs", "e2fsprogs")
            .args(["-q", "-F", "-t", "ext4", "-L", "rootfs", "-d"])
            .arg(tree)
            .arg(&img)
            .arg(size),
    );
    Image::new(dir, img)
}

/// A filesystem image file of `fstype` holding `tree`, `mib` MiB large.
pub fn fs_image(fstype: &str, tree: &Path, mib: u64, out: &Path) {
    let size = format!("{mib}M");
    match fstype {
        "ext4" | "ext3" | "ext2" => must(
            tool("mke2fs", "e2fsprogs")
                .args(["-q", "-F", "-t", fstype, "-L", &format!("{fstype}fs"), "-d"])
                .arg(tree)
                .arg(out)
                .arg(&size),
        ),
        "vfat" => {
            must(
                tool("mkfs.vfat", "dosfstools")
                    .args(["-C", "-n", "EFI"])
                    .arg(out)
                    .arg((mib * 1024).to_string()),
            );
            let mut c = tool("mcopy", "mtools");
            c.args(["-s", "-p", "-m", "-i"]).arg(out);
            for e in fs::read_dir(tree).unwrap() {
                c.arg(e.unwrap().path());
            }
            c.arg("::/");
            must(&mut c);
        }
        "btrfs" => {
            fs::File::create(out).unwrap().set_len(mib << 20).unwrap();
            must(
                tool("mkfs.btrfs", "btrfs-progs")
                    .args(["-q", "-f", "-L", "btrfsroot", "-r"])
                    .arg(tree)
                    .arg(out),
            );
        }
        "xfs" => {
            fs::File::create(out).unwrap().set_len(mib << 20).unwrap();
            let proto = out.with_extension("proto");
            fs::write(&proto, xfs_protofile(tree)).unwrap();
            must(
                tool("mkfs.xfs", "xfsprogs")
                    .args(["-q", "-f", "-L", "xfsroot", "-p"])
                    .arg(&proto)
                    .arg(out),
            );
        }
        other => panic!("no builder for {other}"),
    }
}

/// An mkfs.xfs protofile describing `tree` (names must not contain white space).
fn xfs_protofile(tree: &Path) -> String {
    fn dir(p: &Path, out: &mut String) {
        let mut entries: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(char::is_whitespace) {
                continue;
            }
            let meta = fs::symlink_metadata(e.path()).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.file_type().is_symlink() {
                let t = fs::read_link(e.path()).unwrap();
                out.push_str(&format!("{name} l--{mode:03o} 0 0 {}\n", t.display()));
            } else if meta.is_dir() {
                out.push_str(&format!("{name} d--{mode:03o} 0 0\n"));
                dir(&e.path(), out);
                out.push_str("$\n");
            } else {
                out.push_str(&format!(
                    "{name} ---{mode:03o} 0 0 {}\n",
                    e.path().display()
                ));
            }
        }
    }
    let mut s = String::from("/dev/null\n0 0\nd--755 0 0\n");
    dir(tree, &mut s);
    s.push_str("$\n");
    s
}

/// One partition of a disk being assembled: (filesystem image, GPT/MBR type for sfdisk).
pub struct Part<'a> {
    pub image: &'a Path,
    pub kind: &'a str,
}

/// Lay out `parts` on a new disk with an MBR ("dos") or GPT label, each starting at a
/// 1 MiB boundary, and copy each filesystem image into its partition.
pub fn partitioned_disk(label: &str, parts: &[Part], out: &Path) {
    let mut start_mib = 1u64;
    let mut script = format!("label: {label}\n");
    let mut places = Vec::new();
    for p in parts {
        let len = fs::metadata(p.image).unwrap().len();
        let mib = len.div_ceil(1 << 20);
        script.push_str(&format!(
            "start={}, size={}, type={}\n",
            start_mib * 2048,
            mib * 2048,
            p.kind
        ));
        places.push((p.image, start_mib << 20));
        start_mib += mib;
    }
    fs::File::create(out)
        .unwrap()
        .set_len((start_mib + 1) << 20)
        .unwrap();
    let mut c = tool("sfdisk", "fdisk");
    c.arg("--quiet")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "sfdisk failed for {script}"
    );
    let disk = fs::OpenOptions::new().write(true).open(out).unwrap();
    for (img, off) in places {
        copy_sparse(img, &disk, off);
    }
}

/// Copy `src` into `dst` at `offset`, skipping all-zero blocks so the result stays sparse.
fn copy_sparse(src: &Path, dst: &fs::File, offset: u64) {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let mut f = fs::File::open(src).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], offset + pos).unwrap();
        }
        pos += n as u64;
    }
}

/// Exit code of an output, for asserts.
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Pids of running processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            v.push(pid);
        }
    }
    v
}
