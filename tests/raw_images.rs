//! End to end on raw images: ls, cat, filesystems through the real appliance, on
//! filesystems and partition layouts made at test time by real tools.

mod support;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use support::*;

fn sample_ext4() -> (tempfile::TempDir, Image) {
    let src = tempfile::tempdir().unwrap();
    sample_tree(
        src.path(),
        TreeOpts {
            odd_names: true,
            links: true,
            sparse: true,
        },
    );
    let img = ext4_image(src.path(), "48M");
    (src, img)
}

#[test]
fn ls_lists_sorted_names_one_per_line() {
    let (src, img) = sample_ext4();

    let out = run(["ls", &img.arg(), "/home/me"]);

    let mut want: Vec<Vec<u8>> = fs::read_dir(src.path().join("home/me"))
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    want.sort();
    let want: Vec<u8> = want
        .iter()
        .flat_map(|n| n.iter().copied().chain([b'\n']))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&want),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&out), 0);
    img.assert_unchanged();
}

#[test]
fn ls_long_shows_mode_size_mtime_and_link_target() {
    let (_src, img) = sample_ext4();

    let out = run(["ls", "-l", &img.arg(), "/home/me"]);

    let text = ok_stdout(&out);
    let letter = text.lines().find(|l| l.ends_with(" letter")).expect(&text);
    let fields: Vec<&str> = letter.split_whitespace().collect();
    assert_eq!(
        fields,
        ["-rw-r-----", "30", "2020-09-13", "12:26:40", "letter"]
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("abs-link -> /etc/passwd")),
        "{text}"
    );
    img.assert_unchanged();
}

#[test]
fn ls_recursive_json_gives_exact_names() {
    let (src, img) = sample_ext4();

    let out = run(["ls", "-R", "--json", &img.arg(), "/"]);

    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    let entries = doc["entries"].as_array().unwrap();
    let paths: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| match e.get("path_bytes") {
            Some(b) => b
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u8)
                .collect(),
            None => e["path"].as_str().unwrap().as_bytes().to_vec(),
        })
        .collect();
    for n in odd_names() {
        let mut p = b"odd/".to_vec();
        p.extend(&n);
        assert!(
            paths.contains(&p),
            "missing {:?}",
            String::from_utf8_lossy(&p)
        );
    }
    let leaf = paths.iter().any(|p| p.ends_with(b"level11/leaf.txt"));
    assert!(leaf);
    let big = entries
        .iter()
        .find(|e| e["path"] == "home/me/big.bin")
        .unwrap();
    assert_eq!(big["size"], 3 << 20);
    assert_eq!(big["type"], "file");
    assert_eq!(big["mtime"], MTIME);
    // Every file of the source tree is listed (lost+found is extra, made by mke2fs).
    let listed = entries.len();
    assert_eq!(listed, walk(src.path()).len() + 1);
    img.assert_unchanged();
}

#[test]
fn cat_is_binary_safe_and_streams_big_and_sparse_files() {
    let (src, img) = sample_ext4();

    let big = run(["cat", &img.arg(), "/home/me/big.bin"]);
    let sparse = run(["cat", &img.arg(), "/home/me/sparse.img", "/etc/hostname"]);

    assert_eq!(code(&big), 0, "{}", stderr(&big));
    assert!(big.stdout == fs::read(src.path().join("home/me/big.bin")).unwrap());
    let mut want = fs::read(src.path().join("home/me/sparse.img")).unwrap();
    want.extend(b"sample-host\n");
    assert!(sparse.stdout == want, "{}", stderr(&sparse));
    img.assert_unchanged();
}

#[test]
fn cat_follows_symlinks_inside_the_image_and_reads_odd_names() {
    let (_src, img) = sample_ext4();

    let out = run(["cat", &img.arg(), "/home/me/rel-link", "/odd/back\\slash"]);

    assert_eq!(
        ok_stdout(&out),
        "Dear imgsafe,\nplease copy me.\nback\\slash"
    );
    img.assert_unchanged();
}

#[test]
fn mbr_disk_with_vfat_and_ext4_mounts_linux_root_by_default_and_vfat_with_m() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let boot = tempfile::tempdir().unwrap();
    fs::write(boot.path().join("BOOTX64.EFI"), b"not really a boot loader").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (vfat, ext4, disk) = (
        dir.path().join("p1"),
        dir.path().join("p2"),
        dir.path().join("disk.img"),
    );
    fs_image("vfat", boot.path(), 16, &vfat);
    fs_image("ext4", src.path(), 24, &ext4);
    partitioned_disk(
        "dos",
        &[
            Part {
                image: &vfat,
                kind: "c",
            },
            Part {
                image: &ext4,
                kind: "83",
            },
        ],
        &disk,
    );
    let img = Image::new(dir, disk);

    let fsl = run(["filesystems", "--json", &img.arg()]);
    let root = run(["cat", &img.arg(), "/etc/hostname"]);
    let efi = run(["cat", "-m", "1", &img.arg(), "/BOOTX64.EFI"]);
    let efi_dev = run(["ls", "-m", "/dev/sda1", &img.arg(), "/"]);

    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&fsl)).unwrap();
    let list = doc["filesystems"].as_array().unwrap();
    let types: Vec<&str> = list.iter().filter_map(|f| f["type"].as_str()).collect();
    assert!(
        types.contains(&"vfat") && types.contains(&"ext4"),
        "{types:?}"
    );
    let ext = list.iter().find(|f| f["type"] == "ext4").unwrap();
    assert_eq!(ext["label"], "ext4fs");
    assert_eq!(ext["partition"], 2);
    assert_eq!(ext["default"], true);
    assert_eq!(ok_stdout(&root), "sample-host\n");
    assert_eq!(ok_stdout(&efi), "not really a boot loader");
    assert_eq!(ok_stdout(&efi_dev), "BOOTX64.EFI\n");
    img.assert_unchanged();
}

#[test]
fn of_several_filesystems_the_one_with_etc_is_mounted_and_none_is_an_error() {
    // p1: a minimal Linux root (only /etc/hostname); p2: data. Then vfat beside data only.
    let t = tempfile::tempdir().unwrap();
    let (etc_root, data, efi) = (
        t.path().join("root"),
        t.path().join("data"),
        t.path().join("efi"),
    );
    fs::create_dir_all(etc_root.join("etc")).unwrap();
    fs::write(etc_root.join("etc/hostname"), b"minimal\n").unwrap();
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("d.txt"), b"data\n").unwrap();
    fs::create_dir_all(&efi).unwrap();
    fs::write(efi.join("E.TXT"), b"efi\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let [p1, p2, p3, with_etc, without] =
        ["p1", "p2", "p3", "with-etc.img", "without.img"].map(|n| dir.path().join(n));
    fs_image("ext4", &etc_root, 8, &p1);
    fs_image("ext4", &data, 8, &p2);
    fs_image("vfat", &efi, 8, &p3);
    let linux = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    partitioned_disk(
        "gpt",
        &[
            Part {
                image: &p2,
                kind: linux,
            },
            Part {
                image: &p1,
                kind: linux,
            },
        ],
        &with_etc,
    );
    partitioned_disk(
        "dos",
        &[
            Part {
                image: &p3,
                kind: "c",
            },
            Part {
                image: &p2,
                kind: "83",
            },
        ],
        &without,
    );
    let with_etc = Image::new(tempfile::tempdir().unwrap(), with_etc);
    let without = Image::new(dir, without);

    let picked = run(["cat", &with_etc.arg(), "/etc/hostname"]);
    let refused = run(["ls", &without.arg(), "/"]);

    assert_eq!(ok_stdout(&picked), "minimal\n");
    assert_eq!(code(&refused), 5, "{}", stderr(&refused));
    let err = stderr(&refused);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("several filesystems found")
            && err.contains("(vfat)")
            && err.contains("(ext4)")
            && err.contains("-m"),
        "{err}"
    );
    with_etc.assert_unchanged();
    without.assert_unchanged();
}

#[test]
fn gpt_disk_with_btrfs() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(
        src.path(),
        TreeOpts {
            odd_names: true,
            links: true,
            sparse: false,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let (part, disk) = (dir.path().join("p1"), dir.path().join("disk.img"));
    fs_image("btrfs", src.path(), 128, &part);
    partitioned_disk(
        "gpt",
        &[Part {
            image: &part,
            kind: "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        }],
        &disk,
    );
    let img = Image::new(dir, disk);

    let ls = run(["ls", &img.arg(), "/etc"]);
    let cat = run(["cat", &img.arg(), "/home/me/big.bin"]);

    assert_eq!(ok_stdout(&ls), "fstab\nhostname\nos-release\n");
    assert!(
        cat.stdout == fs::read(src.path().join("home/me/big.bin")).unwrap(),
        "{}",
        stderr(&cat)
    );
    img.assert_unchanged();
}

#[test]
fn iso9660_image() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("cd.iso");
    must(
        tool("genisoimage", "genisoimage")
            .args(["-quiet", "-R", "-J", "-V", "SAMPLECD", "-o"])
            .arg(&iso)
            .arg(src.path()),
    );
    let img = Image::new(dir, iso);

    let fsl = run(["filesystems", &img.arg()]);
    let cat = run(["cat", &img.arg(), "/etc/os-release"]);

    let table = ok_stdout(&fsl);
    assert!(
        table.contains("iso9660") && table.contains("SAMPLECD"),
        "{table}"
    );
    assert_eq!(
        ok_stdout(&cat),
        "NAME=\"Sample\"\nID=sample\nVERSION_ID=42\n"
    );
    img.assert_unchanged();
}

#[test]
fn xfs_unpartitioned() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(
        src.path(),
        TreeOpts {
            odd_names: false,
            links: true,
            sparse: false,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("xfs.img");
    fs_image("xfs", src.path(), 320, &part);
    let img = Image::new(dir, part);

    let ls = run(["ls", "-l", &img.arg(), "/home/me"]);

    let text = ok_stdout(&ls);
    assert!(
        text.contains(" letter\n") && text.contains("rel-link -> letter"),
        "{text}"
    );
    img.assert_unchanged();
}

#[test]
fn ext2_and_ext3_images_list_and_cat() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let images: Vec<(&str, Image)> = ["ext2", "ext3"]
        .into_iter()
        .map(|fstype| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("{fstype}.img"));
            fs_image(fstype, src.path(), 16, &path);
            (fstype, Image::new(dir, path))
        })
        .collect();

    // The four appliances boot side by side: the test takes about the time of one.
    let spawn = |args: [&str; 3]| {
        imgsafe()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let runs: Vec<_> = images
        .iter()
        .flat_map(|(_, img)| {
            [
                spawn(["ls", &img.arg(), "/etc"]),
                spawn(["cat", &img.arg(), "/home/me/letter"]),
            ]
        })
        .collect();
    let outs: Vec<_> = runs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();

    for ((fstype, img), out) in images.iter().zip(outs.chunks(2)) {
        assert_eq!(
            ok_stdout(&out[0]),
            "fstab\nhostname\nos-release\n",
            "ls on {fstype}"
        );
        assert_eq!(
            ok_stdout(&out[1]),
            "Dear imgsafe,\nplease copy me.\n",
            "cat on {fstype}"
        );
        img.assert_unchanged();
    }
}

#[test]
fn ext4_with_a_dirty_journal_is_read_without_replaying_it() {
    // needs_recovery set: a read-only mount that tried to replay the journal would fail
    // (the NBD disk is read-only), so the agent must mount with `noload`.
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.img");
    fs_image("ext4", src.path(), 16, &path);
    must(
        tool("debugfs", "e2fsprogs")
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&path),
    );
    let header = tool("dumpe2fs", "e2fsprogs")
        .arg("-h")
        .arg(&path)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout).into_owned();
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .expect(&header);
    assert!(
        features.split_whitespace().any(|f| f == "needs_recovery"),
        "{features}"
    );
    let img = Image::new(dir, path);

    let ls = run(["ls", &img.arg(), "/etc"]);
    let cat = run(["cat", &img.arg(), "/etc/hostname"]);

    assert_eq!(ok_stdout(&ls), "fstab\nhostname\nos-release\n");
    assert_eq!(ok_stdout(&cat), "sample-host\n");
    img.assert_unchanged();
}
