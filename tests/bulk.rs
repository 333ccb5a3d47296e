//! The bulk data path end to end: `cp`, `cat` and `cp IMAGE:/dir -` on real images of
//! every layout the guest maps (ext4, xfs, vfat, an LVM linear LV on a partition) and
//! one it must not (btrfs), each file checked byte for byte against its source, holes
//! kept, the image unchanged. A lying guest is covered by the unit tests of
//! `bulk::check` and `bulk::HostReader::accept` (src/bulk.rs).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use support::*;

/// How many files the `-v` line of `cp` or `cat` says the host read from the image.
fn direct(err: &str) -> u64 {
    let at = err
        .find(" read from the image directly")
        .unwrap_or_else(|| panic!("no bulk count in:\n{err}"));
    let before = err[..at].trim_end_matches(" files");
    let n: String = before
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    n.chars().rev().collect::<String>().parse().unwrap()
}

/// Files for the bulk path: random data, holes with data between them, a file of many
/// extents (see [`fragment`]), a 0-byte file and a tiny one (inline on ext4).
fn bulk_tree(root: &Path) {
    fs::create_dir_all(root.join("data")).unwrap();
    fs::write(root.join("data/random.bin"), pseudo_random(5 << 20, 11)).unwrap();
    let holes = fs::File::create(root.join("data/holes.bin")).unwrap();
    use std::os::unix::fs::FileExt;
    holes.write_all_at(&pseudo_random(1 << 20, 12), 0).unwrap();
    holes
        .write_all_at(&pseudo_random(1 << 20, 13), 5 << 20)
        .unwrap();
    holes.set_len(8 << 20).unwrap();
    fs::write(root.join("data/empty"), b"").unwrap();
    fs::write(
        root.join("data/tiny"),
        b"small enough to live in the inode\n",
    )
    .unwrap();
}

/// Every regular file below `src` has the same bytes below `out`.
fn assert_same_files(src: &Path, out: &Path) -> usize {
    let mut n = 0;
    for p in walk(src) {
        let rel = p.strip_prefix(src).unwrap();
        if rel.starts_with("lost+found") || !fs::symlink_metadata(&p).unwrap().is_file() {
            continue;
        }
        let copy = out.join(rel);
        assert!(
            fs::read(&p).unwrap() == fs::read(&copy).unwrap(),
            "content of {}",
            rel.display()
        );
        n += 1;
    }
    n
}

/// Whether a file occupies less disk space than its length.
fn is_sparse(p: &Path) -> bool {
    let m = fs::metadata(p).unwrap();
    m.blocks() * 512 < m.len()
}

/// `cp -v IMAGE:/ DEST`: its stderr, after checking it succeeded.
fn cp_all(img: &str, dest: &Path) -> String {
    let out = run(["cp", "-v", &format!("{img}:/"), dest.to_str().unwrap()]);
    ok_stdout(&out);
    stderr(&out)
}

/// Make `name` (written from `data`) a file of many small extents: fill the image with
/// small files, delete every other one, then write the file into the gaps (debugfs).
fn fragment(img: &Path, name: &str, data: &Path) {
    let mut script = String::new();
    for i in (1..200).step_by(2) {
        script.push_str(&format!("rm /fill/f{i:03}\n"));
    }
    script.push_str(&format!("write {} {name}\n", data.display()));
    let sf = img.with_extension("debugfs");
    fs::write(&sf, script).unwrap();
    must(
        tool("debugfs", "e2fsprogs")
            .arg("-w")
            .arg("-f")
            .arg(&sf)
            .arg(img),
    );
}

/// The number of extents debugfs lists for `path`.
fn extents(img: &Path, path: &str) -> usize {
    let out = tool("debugfs", "e2fsprogs")
        .args(["-R", &format!("ex {path}")])
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .count()
        .saturating_sub(1)
}

#[test]
fn ext4_files_come_from_the_image_byte_for_byte_with_holes_and_unwritten_ranges() {
    let src = tempfile::tempdir().unwrap();
    bulk_tree(src.path());
    fs::create_dir(src.path().join("fill")).unwrap();
    for i in 0..200 {
        fs::write(
            src.path().join(format!("fill/f{i:03}")),
            pseudo_random(16 << 10, i),
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    must(
        tool("mke2fs", "e2fsprogs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "1024",
                "-O",
                "inline_data",
                "-d",
            ])
            .arg(src.path())
            .arg(&img)
            .arg("48M"),
    );
    // Unwritten (preallocated) blocks inside the hole of holes.bin: KiB 2000..2100.
    must(
        tool("debugfs", "e2fsprogs")
            .args(["-w", "-R", "fallocate /data/holes.bin 2000 2100"])
            .arg(&img),
    );
    // debugfs leaves i_size at the end of the file's last extent: give back its hole.
    must(
        tool("debugfs", "e2fsprogs")
            .args(["-w", "-R", "sif /data/holes.bin size 8388608"])
            .arg(&img),
    );
    let many = dir.path().join("many.src");
    fs::write(&many, pseudo_random(1_500_000, 99)).unwrap();
    fragment(&img, "many.bin", &many);
    fs::copy(&many, src.path().join("many.bin")).unwrap();
    for i in (1..200).step_by(2) {
        fs::remove_file(src.path().join(format!("fill/f{i:03}"))).unwrap();
    }
    assert!(
        extents(&img, "/many.bin") > 40,
        "many.bin is not fragmented"
    );
    let image = Image::new(dir, img);
    let out = tempfile::tempdir().unwrap();

    let err = cp_all(&image.arg(), out.path());

    assert_eq!(assert_same_files(src.path(), out.path()), 105);
    assert_eq!(direct(&err), 3, "{err}");
    assert!(is_sparse(&out.path().join("data/holes.bin")));
    image.assert_unchanged();
}

#[test]
fn cat_of_a_large_file_comes_from_the_image() {
    let src = tempfile::tempdir().unwrap();
    bulk_tree(src.path());
    let image = ext4_image(src.path(), "48M");

    let out = run(["cat", "-v", &image.arg(), "/data/holes.bin", "/data/tiny"]);

    let want = [
        fs::read(src.path().join("data/holes.bin")).unwrap(),
        fs::read(src.path().join("data/tiny")).unwrap(),
    ]
    .concat();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == want, "cat output differs");
    assert_eq!(direct(&stderr(&out)), 1);
    image.assert_unchanged();
}

#[test]
fn with_bulk_turned_off_files_are_streamed_through_the_guest() {
    let src = tempfile::tempdir().unwrap();
    bulk_tree(src.path());
    let image = ext4_image(src.path(), "48M");

    let out = imgsafe()
        .env("IMGSAFE_BULK", "0")
        .args(["cat", "-v", &image.arg(), "/data/random.bin"])
        .output()
        .unwrap();

    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == fs::read(src.path().join("data/random.bin")).unwrap());
    assert_eq!(direct(&stderr(&out)), 0);
    image.assert_unchanged();
}

/// A filesystem image of the bulk tree, unpartitioned, as an [`Image`].
fn fs_disk(fstype: &str, src: &Path, mib: u64) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    fs_image(fstype, src, mib, &img);
    Image::new(dir, img)
}

#[test]
fn xfs_files_come_from_the_image() {
    let src = tempfile::tempdir().unwrap();
    bulk_tree(src.path());
    let image = fs_disk("xfs", src.path(), 300);
    let out = tempfile::tempdir().unwrap();

    let err = cp_all(&image.arg(), out.path());

    assert_eq!(assert_same_files(src.path(), out.path()), 4);
    assert_eq!(direct(&err), 2, "{err}");
    assert!(is_sparse(&out.path().join("data/holes.bin")));
    image.assert_unchanged();
}

#[test]
fn vfat_files_come_from_the_image() {
    let src = tempfile::tempdir().unwrap();
    bulk_tree(src.path());
    let image = fs_disk("vfat", src.path(), 64);
    let out = tempfile::tempdir().unwrap();

    let err = cp_all(&image.arg(), out.path());

    assert_eq!(assert_same_files(src.path(), out.path()), 4);
    assert_eq!(direct(&err), 2, "{err}");
    assert!(is_sparse(&out.path().join("data/holes.bin")));
    image.assert_unchanged();
}

#[test]
fn files_of_an_lvm_linear_volume_on_a_partition_come_from_the_image() {
    let src = tempfile::tempdir().unwrap();
    bulk_tree(src.path());
    let dir = tempfile::tempdir().unwrap();
    let fsimg = dir.path().join("lv.ext4");
    fs_image("ext4", src.path(), 40, &fsimg);
    let pv = dir.path().join("pv.img");
    support::lvm::lvm_disk(
        "bulkvg",
        &[support::lvm::Lv {
            name: "data",
            image: &fsimg,
        }],
        &pv,
    );
    let img = dir.path().join("disk.img");
    partitioned_disk(
        "dos",
        &[Part {
            image: &pv,
            kind: "8e",
        }],
        &img,
    );
    let image = Image::new(dir, img);
    let out = tempfile::tempdir().unwrap();

    let res = run([
        "cp",
        "-v",
        "-m",
        "/dev/bulkvg/data",
        &format!("{}:/", image.arg()),
        out.path().to_str().unwrap(),
    ]);

    ok_stdout(&res);
    assert_eq!(assert_same_files(src.path(), out.path()), 4);
    assert_eq!(direct(&stderr(&res)), 2, "{}", stderr(&res));
    image.assert_unchanged();
}

#[test]
fn btrfs_files_are_streamed_through_the_guest() {
    let src = tempfile::tempdir().unwrap();
    bulk_tree(src.path());
    let image = fs_disk("btrfs", src.path(), 128);
    let out = tempfile::tempdir().unwrap();

    let err = cp_all(&image.arg(), out.path());

    assert_eq!(assert_same_files(src.path(), out.path()), 4);
    assert_eq!(direct(&err), 0, "{err}");
    assert!(is_sparse(&out.path().join("data/holes.bin")));
    image.assert_unchanged();
}

/// (type, size or target, content hash) of every entry below `root`, by relative path
/// bytes, as the tar checks compare them.
fn inventory(root: &Path) -> BTreeMap<Vec<u8>, String> {
    let mut m = BTreeMap::new();
    for p in walk(root) {
        let rel = p.strip_prefix(root).unwrap();
        if rel.starts_with("lost+found") {
            continue;
        }
        let md = fs::symlink_metadata(&p).unwrap();
        let what = if md.file_type().is_symlink() {
            format!(
                "l {}",
                hex(fs::read_link(&p).unwrap().as_os_str().as_bytes())
            )
        } else if md.is_dir() {
            format!("d {:o}", md.mode() & 0o777)
        } else {
            format!("f {:o} {}", md.mode() & 0o777, sha256(&p))
        };
        m.insert(rel.as_os_str().as_bytes().to_vec(), what);
    }
    m
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_tree_as_tar_on_stdout_extracts_with_gnu_tar_and_reads_with_python_tarfile() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(
        src.path(),
        TreeOpts {
            odd_names: true,
            links: true,
            sparse: true,
        },
    );
    bulk_tree(src.path());
    let long = "n".repeat(200);
    fs::write(src.path().join("data").join(&long), b"long name\n").unwrap();
    std::os::unix::fs::symlink("x".repeat(150), src.path().join("data/long-link")).unwrap();
    let image = ext4_image(src.path(), "64M");
    let work = tempfile::tempdir().unwrap();
    let tar_file = work.path().join("out.tar");

    let res = run(["cp", "-v", &format!("{}:/", image.arg()), "-"]);
    fs::write(&tar_file, &res.stdout).unwrap();
    let x = work.path().join("x");
    fs::create_dir(&x).unwrap();
    let gnu = tool("tar", "tar")
        .arg("-xf")
        .arg(&tar_file)
        .arg("-C")
        .arg(&x)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let py = tool("python3", "python3")
        .arg("-c")
        .arg(PY_LIST)
        .arg(&tar_file)
        .output()
        .unwrap();

    assert!(res.status.success(), "{}", stderr(&res));
    assert!(direct(&stderr(&res)) >= 3, "{}", stderr(&res));
    assert!(
        gnu.status.success(),
        "{}",
        String::from_utf8_lossy(&gnu.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&gnu.stderr), "");
    assert_eq!(inventory(&x), inventory(src.path()));
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let from_py: BTreeMap<Vec<u8>, String> = String::from_utf8(py.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, rest) = l.split_once(' ').unwrap();
            let bytes = (0..name.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&name[i..i + 2], 16).unwrap())
                .collect();
            (bytes, rest.to_string())
        })
        .collect();
    assert_eq!(from_py, inventory(src.path()));
    image.assert_unchanged();
}

/// Lists a tar as `hexname type...` lines in [`inventory`]'s form.
const PY_LIST: &str = r#"
import hashlib, os, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    for m in t.getmembers():
        name = os.fsencode(m.name).hex()
        if m.name.startswith("lost+found"):
            continue
        if m.issym():
            print(name, "l", os.fsencode(m.linkname).hex())
        elif m.isdir():
            print(name, "d", format(m.mode & 0o777, "o"))
        else:
            h = hashlib.sha256(t.extractfile(m).read()).hexdigest()
            print(name, "f", format(m.mode & 0o777, "o"), h)
"#;

/// `cp -r` into a directory still works for a tree far larger than one batch.
#[test]
fn many_small_files_copy_in_batches() {
    let src = tempfile::tempdir().unwrap();
    for d in 0..4 {
        let dir = src.path().join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for i in 0..300 {
            fs::write(dir.join(format!("f{i}")), pseudo_random(100 + i, i as u64)).unwrap();
        }
    }
    let image = ext4_image(src.path(), "48M");
    let out = tempfile::tempdir().unwrap();
    let dest: PathBuf = out.path().join("copy");

    let res = run(["cp", &format!("{}:/", image.arg()), dest.to_str().unwrap()]);

    ok_stdout(&res);
    assert_eq!(assert_same_files(src.path(), &dest), 1200);
    image.assert_unchanged();
}
