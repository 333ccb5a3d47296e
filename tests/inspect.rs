//! The guest as its OS sees it: root detection, /etc/fstab (UUID=, LABEL=, /dev/mapper
//! names), manual assembly with -m DEV:MOUNTPOINT, and LVM volumes activated by the
//! guest's real lvm tools, on disks built at test time.

mod support;

use std::fs;
use std::path::Path;
use support::lvm::{lvm_disk, Lv};
use support::*;

const BOOT_UUID: &str = "0b0a1234-5678-4abc-8def-0123456789ab";
const ROOT_UUID: &str = "7007aaaa-5678-4abc-8def-0123456789ab";

/// An ext4 image of `tree` with the given label and UUID.
fn ext4(tree: &Path, label: &str, uuid: &str, out: &Path) {
    must(
        tool("mke2fs", "e2fsprogs")
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-U", uuid, "-d"])
            .arg(tree)
            .arg(out)
            .arg("16M"),
    );
}

/// A Linux-like MBR disk: 1 = /boot (by UUID in fstab), 2 = root, 3 = /home (by LABEL).
/// Its fstab also lists swap, proc, a noauto entry and one UUID that is not on the disk.
fn linux_disk() -> Image {
    let t = tempfile::tempdir().unwrap();
    let (root, boot, home) = (
        t.path().join("root"),
        t.path().join("boot"),
        t.path().join("home"),
    );
    sample_tree(&root, TreeOpts::PLAIN);
    fs::remove_dir_all(root.join("home/me")).unwrap();
    fs::create_dir_all(root.join("boot")).unwrap();
    fs::create_dir_all(root.join("srv")).unwrap();
    let fstab = format!(
        "# /etc/fstab of a test system\nUUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n\
         UUID={BOOT_UUID} /boot ext4 defaults 0 2\nLABEL=home\\040fs /home ext4 defaults 0 2\n\
         /dev/sda4 none swap sw 0 0\nproc /proc proc defaults 0 0\nLABEL=home\\040fs /mnt ext4 noauto 0 0\n\
         UUID=deadbeef-0000-4000-8000-000000000000 /srv ext4 defaults 0 2\n"
    );
    fs::write(root.join("etc/fstab"), fstab).unwrap();
    fs::create_dir_all(&boot).unwrap();
    fs::write(boot.join("vmlinuz-test"), b"not really a kernel\n").unwrap();
    fs::create_dir_all(home.join("me")).unwrap();
    fs::write(home.join("me/letter"), b"Dear imgsafe,\nfrom /home.\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2, p3, disk) = (
        dir.path().join("p1"),
        dir.path().join("p2"),
        dir.path().join("p3"),
        dir.path().join("disk.img"),
    );
    ext4(&boot, "boot", BOOT_UUID, &p1);
    ext4(&root, "root", ROOT_UUID, &p2);
    ext4(
        &home,
        "home fs",
        "4044eeee-5678-4abc-8def-0123456789ab",
        &p3,
    );
    let parts = [
        Part {
            image: &p1,
            kind: "83",
        },
        Part {
            image: &p2,
            kind: "83",
        },
        Part {
            image: &p3,
            kind: "83",
        },
    ];
    partitioned_disk("dos", &parts, &disk);
    for p in [&p1, &p2, &p3] {
        fs::remove_file(p).unwrap();
    }
    Image::new(dir, disk)
}

#[test]
fn several_filesystems_are_assembled_from_fstab_by_default() {
    let img = linux_disk();

    let ls = run(["ls", &img.arg(), "/boot"]);

    assert_eq!(ok_stdout(&ls), "lost+found\nvmlinuz-test\n");
    let err = stderr(&ls);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("UUID=deadbeef-0000-4000-8000-000000000000 on /srv")
            && warnings[0].contains("skipped"),
        "{err}"
    );
    img.assert_unchanged();
}

#[test]
fn inspect_flag_mounts_home_by_label_and_the_root_beneath() {
    let img = linux_disk();

    let cat = run(["cat", "-i", &img.arg(), "/home/me/letter", "/etc/hostname"]);

    assert_eq!(ok_stdout(&cat), "Dear imgsafe,\nfrom /home.\nsample-host\n");
    img.assert_unchanged();
}

#[test]
fn manual_assembly_mounts_only_what_is_given() {
    let img = linux_disk();

    let ls = run([
        "ls",
        "-m",
        "2",
        "-m",
        "/dev/sda1:/boot",
        &img.arg(),
        "/boot",
    ]);
    let home = run(["ls", "-m", "2", "-m", "1:/boot", &img.arg(), "/home"]);

    assert_eq!(ok_stdout(&ls), "lost+found\nvmlinuz-test\n");
    assert_eq!(
        ok_stdout(&home),
        "",
        "/home is not mounted by hand, so the root's empty directory shows"
    );
    assert!(!stderr(&ls).contains("warning"), "{}", stderr(&ls));
    img.assert_unchanged();
}

#[test]
fn filesystems_marks_the_detected_root() {
    let img = linux_disk();

    let out = run(["filesystems", "--json", &img.arg()]);

    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    let list = doc["filesystems"].as_array().unwrap();
    let roots: Vec<(&str, bool, &str)> = list
        .iter()
        .filter(|f| f["root"] == true)
        .map(|f| {
            (
                f["device"].as_str().unwrap(),
                f["default"] == true,
                f["uuid"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(roots, [("/dev/vda2", true, ROOT_UUID)]);
    let home = list.iter().find(|f| f["partition"] == 3).unwrap();
    assert_eq!(
        (home["label"].as_str(), home["type"].as_str()),
        (Some("home fs"), Some("ext4"))
    );
    img.assert_unchanged();
}

/// A whole-disk LVM PV with VG `vgtest`: LV `root` (fstab mounts `my-data` at /data by
/// its /dev/mapper name) and LV `my-data` (a dash, which device-mapper names double).
fn lvm_image() -> Image {
    let t = tempfile::tempdir().unwrap();
    let (root, data) = (t.path().join("root"), t.path().join("data"));
    sample_tree(&root, TreeOpts::PLAIN);
    fs::create_dir_all(root.join("data")).unwrap();
    fs::write(root.join("etc/fstab"), "/dev/vgtest/root / ext4 defaults 0 1\n/dev/mapper/vgtest-my--data /data ext4 defaults 0 2\n").unwrap();
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("on-the-lv.txt"), b"logical volume content\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (r, d, disk) = (
        t.path().join("r.img"),
        t.path().join("d.img"),
        dir.path().join("lvm.img"),
    );
    fs_image("ext4", &root, 24, &r);
    ext4(&data, "data", "da7a0000-5678-4abc-8def-0123456789ab", &d);
    lvm_disk(
        "vgtest",
        &[
            Lv {
                name: "root",
                image: &r,
            },
            Lv {
                name: "my-data",
                image: &d,
            },
        ],
        &disk,
    );
    Image::new(dir, disk)
}

#[test]
fn lvm_writer_output_passes_pvck() {
    let img = lvm_image();

    let out = tool("pvck", "lvm2")
        .args(["--dump", "metadata"])
        .arg(&img.path)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();

    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // pvck prefixes every failed check (label crc, header crc, text crc, ...) with CHECK.
    assert!(!text.contains("CHECK"), "{text}");
    assert!(
        text.contains("# vgname vgtest seqno 1")
            && text.contains("vgtest {")
            && text.contains("my-data {")
            && text.contains("extent_count = 6"),
        "{text}"
    );
}

#[test]
fn lvm_volumes_are_listed_by_vg_and_lv_name() {
    let img = lvm_image();

    let out = run(["filesystems", "--json", &img.arg()]);

    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    let got: Vec<(&str, Option<&str>, bool)> = doc["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["device"].as_str().unwrap(),
                f["type"].as_str(),
                f["root"] == true,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/dev/vda", Some("LVM2_member"), false),
            ("/dev/vgtest/root", Some("ext4"), true),
            ("/dev/vgtest/my-data", Some("ext4"), false)
        ]
    );
    img.assert_unchanged();
}

#[test]
fn lvm_root_mounts_an_lv_named_in_fstab_by_its_mapper_name() {
    let img = lvm_image();

    let ls = run(["ls", &img.arg(), "/data"]);
    let by_hand = run([
        "cat",
        "-m",
        "/dev/vgtest/my-data",
        &img.arg(),
        "/on-the-lv.txt",
    ]);

    assert_eq!(ok_stdout(&ls), "lost+found\non-the-lv.txt\n");
    assert!(!stderr(&ls).contains("warning"), "{}", stderr(&ls));
    assert_eq!(ok_stdout(&by_hand), "logical volume content\n");
    img.assert_unchanged();
}

#[test]
fn lvm_on_a_partition_beside_boot_is_assembled_from_fstab() {
    // The usual installer layout: p1 /boot (ext4, by UUID), p2 an LVM PV holding root.
    let t = tempfile::tempdir().unwrap();
    let (root, boot) = (t.path().join("root"), t.path().join("boot"));
    sample_tree(&root, TreeOpts::PLAIN);
    fs::create_dir_all(root.join("boot")).unwrap();
    fs::write(root.join("etc/fstab"), format!("/dev/mapper/vgpart-root / ext4 defaults 0 1\nUUID={BOOT_UUID} /boot ext4 defaults 0 2\n")).unwrap();
    fs::create_dir_all(&boot).unwrap();
    fs::write(boot.join("grub.cfg"), b"set default=0\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (b, r, pv, disk) = (
        t.path().join("b.img"),
        t.path().join("r.img"),
        t.path().join("pv.img"),
        dir.path().join("disk.img"),
    );
    ext4(&boot, "boot", BOOT_UUID, &b);
    fs_image("ext4", &root, 24, &r);
    lvm_disk(
        "vgpart",
        &[Lv {
            name: "root",
            image: &r,
        }],
        &pv,
    );
    partitioned_disk(
        "dos",
        &[
            Part {
                image: &b,
                kind: "83",
            },
            Part {
                image: &pv,
                kind: "8e",
            },
        ],
        &disk,
    );
    let img = Image::new(dir, disk);

    let out = run(["cat", &img.arg(), "/boot/grub.cfg", "/etc/hostname"]);

    assert_eq!(ok_stdout(&out), "set default=0\nsample-host\n");
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    img.assert_unchanged();
}
