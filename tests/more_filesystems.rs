//! squashfs, EROFS, UDF and exFAT through the real appliance: each image is made at
//! test time by its own tool (mksquashfs, mkfs.erofs, genisoimage -udf, mkfs.exfat with
//! files added by a small exFAT writer, since exfatprogs has no copy-in tool), then
//! `filesystems`, `ls`, `cat` and `cp` read it back and the image is unchanged.

mod support;

use std::fs;
use support::*;

fn sample() -> tempfile::TempDir {
    let src = tempfile::tempdir().unwrap();
    sample_tree(
        src.path(),
        TreeOpts {
            odd_names: true,
            links: true,
            sparse: true,
        },
    );
    src
}

/// `filesystems` names the type (and label); `cp` of the whole image gives the tree back.
fn assert_reads_back(img: &Image, src: &std::path::Path, fstype: &str, label: Option<&str>) {
    let fsl = run(["filesystems", &img.arg()]);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("copy");
    let cp = run(["cp", &format!("{}:/", img.arg()), dest.to_str().unwrap()]);

    let table = ok_stdout(&fsl);
    assert!(table.contains(fstype), "{table}");
    if let Some(l) = label {
        assert!(table.contains(l), "{table}");
    }
    assert_eq!(ok_stdout(&cp), "");
    assert_same_tree(src, &dest);
    img.assert_unchanged();
}

#[test]
fn squashfs_reads_back_as_built() {
    let src = sample();
    let dir = tempfile::tempdir().unwrap();
    let sq = dir.path().join("root.squashfs");
    must(
        tool("mksquashfs", "squashfs-tools")
            .arg(src.path())
            .arg(&sq)
            .args(["-quiet", "-noappend", "-no-progress"]),
    );
    let img = Image::new(dir, sq);

    assert_reads_back(&img, src.path(), "squashfs", None);
}

#[test]
fn erofs_reads_back_as_built() {
    let src = sample();
    let dir = tempfile::tempdir().unwrap();
    let ero = dir.path().join("root.erofs");
    must(
        tool("mkfs.erofs", "erofs-utils")
            .args(["--quiet", "--preserve-mtime", "-zlz4hc"])
            .arg(&ero)
            .arg(src.path()),
    );
    let img = Image::new(dir, ero);

    assert_reads_back(&img, src.path(), "erofs", None);
}

#[test]
fn udf_side_of_a_hybrid_disc_is_mounted() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("disc.iso");
    must(
        tool("genisoimage", "genisoimage")
            .args(["-quiet", "-udf", "-R", "-V", "UDFDISC", "-o"])
            .arg(&iso)
            .arg(src.path()),
    );
    let img = Image::new(dir, iso);

    let fsl = run(["filesystems", &img.arg()]);
    let ls = run(["ls", &img.arg(), "/home/me"]);
    let cat = run(["cat", &img.arg(), "/home/me/big.bin"]);

    let table = ok_stdout(&fsl);
    assert!(
        table.contains("udf") && table.contains("UDFDISC"),
        "{table}"
    );
    assert_eq!(ok_stdout(&ls), "big.bin\nletter\nwith space.txt\n");
    assert!(
        cat.stdout == fs::read(src.path().join("home/me/big.bin")).unwrap(),
        "{}",
        stderr(&cat)
    );
    img.assert_unchanged();
}

#[test]
fn exfat_with_files_added_lists_reads_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stick.img");
    fs::File::create(&path).unwrap().set_len(32 << 20).unwrap();
    must(
        tool("mkfs.exfat", "exfatprogs")
            .args(["-L", "MYSTICK"])
            .arg(&path),
    );
    let big = pseudo_random(3 << 20, 11);
    let unicode = "naïve ünïcödé, a name longer than fifteen.txt";
    let mut v = support::exfat::ExFat::open(&path);
    let root = v.root();
    v.add_file(root, "hello.txt", b"hello exFAT\n", MTIME);
    let docs = v.add_dir(root, "Docs", MTIME);
    v.add_file(docs, "big.bin", &big, MTIME);
    v.add_file(docs, unicode, b"unicode\n", MTIME);
    drop(v);
    must(tool("fsck.exfat", "exfatprogs").arg("-n").arg(&path));
    let img = Image::new(dir, path);
    let out = tempfile::tempdir().unwrap();

    let fsl = run(["filesystems", &img.arg()]);
    let ls = run(["ls", &img.arg(), "/Docs"]);
    let cat = run(["cat", &img.arg(), "/hello.txt"]);
    let cp = run([
        "cp",
        &format!("{}:/Docs", img.arg()),
        out.path().to_str().unwrap(),
    ]);

    let table = ok_stdout(&fsl);
    assert!(
        table.contains("exfat") && table.contains("MYSTICK"),
        "{table}"
    );
    assert_eq!(ok_stdout(&ls), format!("big.bin\n{unicode}\n"));
    assert_eq!(ok_stdout(&cat), "hello exFAT\n");
    assert_eq!(ok_stdout(&cp), "");
    assert!(fs::read(out.path().join("Docs/big.bin")).unwrap() == big);
    assert_eq!(
        fs::read(out.path().join("Docs").join(unicode)).unwrap(),
        b"unicode\n"
    );
    img.assert_unchanged();
}
