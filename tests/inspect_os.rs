//! `imgsafe inspect`: what OS a disk holds, on disks built at test time with mke2fs -d:
//! a Debian-like root (dpkg status, os-release as a symlink, /boot from its fstab), an
//! Alpine-like root (apk), a root with only /etc/redhat-release (rpm: no list), a disk
//! with no OS, and a root whose files lie (bad values become null plus a warning).

mod support;

use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use support::*;

const ROOT_UUID: &str = "7007aaaa-5678-4abc-8def-0123456789ab";
const BOOT_UUID: &str = "0b0a1234-5678-4abc-8def-0123456789ab";

fn write(root: &Path, path: &str, data: &[u8]) {
    let p = root.join(path.trim_start_matches('/'));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// A real ELF program at /bin/sh (the host's own shell).
fn shell(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy(fs::canonicalize("/bin/sh").unwrap(), root.join("bin/sh")).unwrap();
}

fn ext4(tree: &Path, uuid: &str, out: &Path) {
    must(
        tool("mke2fs", "e2fsprogs")
            .args(["-q", "-F", "-t", "ext4", "-U", uuid, "-d"])
            .arg(tree)
            .arg(out)
            .arg("16M"),
    );
}

fn inspect_json(img: &Image) -> (Value, String) {
    let out = run(["inspect", "--json", &img.arg()]);
    let v: Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    (v, stderr(&out))
}

fn debian_disk() -> Image {
    let t = tempfile::tempdir().unwrap();
    let (root, boot) = (t.path().join("root"), t.path().join("boot"));
    write(
        &root,
        "/usr/lib/os-release",
        b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
VERSION_ID=\"12\"\nID=debian\n",
    );
    write(&root, "/etc/debian_version", b"12.5\n");
    symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
    write(&root, "/etc/hostname", b"bookworm-box\n");
    write(
        &root,
        "/etc/fstab",
        format!("UUID={ROOT_UUID} / ext4 defaults 0 1\nUUID={BOOT_UUID} /boot ext4 defaults 0 2\n")
            .as_bytes(),
    );
    write(
        &root,
        "/var/lib/dpkg/status",
        b"Package: base-files\nStatus: install ok installed\nPriority: required\n\
Architecture: amd64\nVersion: 12.4+deb12u5\nDescription: Debian base system\n \
miscellaneous files\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 0.1\n\n\
Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u4\n",
    );
    fs::create_dir_all(root.join("lib/modules/6.1.0-99-amd64/kernel")).unwrap();
    fs::create_dir_all(root.join("boot")).unwrap();
    shell(&root);
    write(&boot, "/vmlinuz-6.1.0-99-amd64", b"not really a kernel\n");
    write(&boot, "/config-6.1.0-99-amd64", b"# config\n");
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2, disk) = (
        dir.path().join("p1"),
        dir.path().join("p2"),
        dir.path().join("disk.img"),
    );
    ext4(&boot, BOOT_UUID, &p1);
    ext4(&root, ROOT_UUID, &p2);
    partitioned_disk(
        "dos",
        &[
            Part {
                image: &p1,
                kind: "83",
            },
            Part {
                image: &p2,
                kind: "83",
            },
        ],
        &disk,
    );
    Image::new(dir, disk)
}

#[test]
fn debian_like_root_with_dpkg_status_and_boot_from_fstab() {
    let img = debian_disk();

    let (v, err) = inspect_json(&img);
    let text = run(["inspect", &img.arg()]);

    assert_eq!(
        v,
        json!({
            "os": "linux",
            "distro": "debian",
            "version": "12",
            "product_name": "Debian GNU/Linux 12 (bookworm)",
            "hostname": "bookworm-box",
            "arch": std::env::consts::ARCH,
            "root": "/dev/vda2",
            "mountpoints": {"/dev/vda2": "/", "/dev/vda1": "/boot"},
            "package_format": "deb",
            "packages": [
                {"name": "base-files", "version": "12.4+deb12u5", "arch": "amd64"},
                {"name": "libc6", "version": "2.36-9+deb12u4", "arch": "amd64"}
            ],
            "kernels": [{
                "release": "6.1.0-99-amd64",
                "image": "/boot/vmlinuz-6.1.0-99-amd64",
                "modules": "/lib/modules/6.1.0-99-amd64"
            }],
            "warnings": []
        }),
        "{err}"
    );
    let text = ok_stdout(&text);
    assert!(text.starts_with("os:       linux\n"), "{text}");
    assert!(text.contains("distro:   debian 12\n"), "{text}");
    assert!(text.contains("packages: deb, 2 installed\n"), "{text}");
    assert!(
        text.contains("mounts:   /dev/vda1 on /boot, /dev/vda2 on /\n"),
        "{text}"
    );
    img.assert_unchanged();
}

#[test]
fn alpine_like_root_with_apk_database() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    write(
        root,
        "/etc/os-release",
        b"NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.18.4\nPRETTY_NAME=\"Alpine Linux v3.18\"\n",
    );
    write(root, "/etc/alpine-release", b"3.18.4\n");
    write(root, "/etc/hostname", b"alp\n");
    write(
        root,
        "/lib/apk/db/installed",
        b"C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nS:383152\nT:the musl c library\n\n\
P:busybox\nV:1.36.1-r5\nA:x86_64\n\n",
    );
    shell(root);
    let img = ext4_image(root, "16M");

    let (v, err) = inspect_json(&img);

    assert_eq!(v["os"], "linux", "{err}");
    assert_eq!(v["distro"], "alpine");
    assert_eq!(v["version"], "3.18.4");
    assert_eq!(v["product_name"], "Alpine Linux v3.18");
    assert_eq!(v["hostname"], "alp");
    assert_eq!(v["root"], "/dev/vda");
    assert_eq!(v["mountpoints"], json!({"/dev/vda": "/"}));
    assert_eq!(v["package_format"], "apk");
    assert_eq!(
        v["packages"],
        json!([
            {"name": "musl", "version": "1.2.4-r2", "arch": "x86_64"},
            {"name": "busybox", "version": "1.36.1-r5", "arch": "x86_64"}
        ])
    );
    assert_eq!(v["kernels"], json!([]));
    assert_eq!(v["warnings"], json!([]), "{err}");
    img.assert_unchanged();
}

#[test]
fn root_with_only_redhat_release_reports_rpm_without_a_list() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    write(
        root,
        "/etc/redhat-release",
        b"CentOS release 6.10 (Final)\n",
    );
    write(
        root,
        "/etc/sysconfig/network",
        b"NETWORKING=yes\nHOSTNAME=old-centos\n",
    );
    write(root, "/var/lib/rpm/Packages", &[0u8; 4096]);
    shell(root);
    let img = ext4_image(root, "16M");

    let (v, err) = inspect_json(&img);

    assert_eq!(v["os"], "linux", "{err}");
    assert_eq!(v["distro"], "centos");
    assert_eq!(v["version"], "6.10");
    assert_eq!(v["product_name"], "CentOS release 6.10 (Final)");
    assert_eq!(v["hostname"], "old-centos");
    assert_eq!(v["arch"], std::env::consts::ARCH);
    assert_eq!(v["package_format"], "rpm");
    assert_eq!(v["packages"], Value::Null);
    let warnings = v["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("rpm: the package list is not read"),
        "{warnings:?}"
    );
    assert!(err.contains("warning:") && err.contains("rpm"), "{err}");
    img.assert_unchanged();
}

#[test]
fn a_disk_with_no_os_is_unknown_not_an_error() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "/data/report.csv", b"a,b\n1,2\n");
    let img = ext4_image(t.path(), "16M");

    let (v, err) = inspect_json(&img);
    let text = run(["inspect", &img.arg()]);

    assert_eq!(
        v,
        json!({
            "os": "unknown", "distro": null, "version": null, "product_name": null,
            "hostname": null, "arch": null, "root": "/dev/vda",
            "mountpoints": {"/dev/vda": "/"}, "package_format": null, "packages": null,
            "kernels": [], "warnings": []
        }),
        "{err}"
    );
    assert!(ok_stdout(&text).starts_with("os:       unknown\n"));
    img.assert_unchanged();
}

#[test]
fn a_blank_disk_is_unknown_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("blank.img");
    fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let img = Image::new(dir, disk);

    let (v, err) = inspect_json(&img);

    assert_eq!(v["os"], "unknown", "{err}");
    assert_eq!(v["root"], Value::Null);
    assert_eq!(v["mountpoints"], json!({}));
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1, "{v}");
    img.assert_unchanged();
}

#[test]
fn lying_files_become_null_with_warnings_and_never_leave_the_guest_root() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    fs::create_dir_all(root.join("etc")).unwrap();
    // Resolved inside the image (where there is no such file), never on the host or in
    // the appliance.
    symlink("../../../../../../etc/passwd", root.join("etc/os-release")).unwrap();
    write(root, "/etc/hostname", b"\x1b]0;owned\x07\n");
    write(
        root,
        "/var/lib/dpkg/status",
        b"Package: evil\x1b[2J\nStatus: install ok installed\nVersion: 1\n",
    );
    write(root, "/bin/sh", b"#!/not/elf\n");
    let img = ext4_image(root, "16M");

    let (v, err) = inspect_json(&img);

    assert_eq!(v["distro"], Value::Null, "{err}");
    assert_eq!(v["hostname"], Value::Null);
    assert_eq!(v["arch"], Value::Null);
    assert_eq!(v["os"], "linux");
    assert_eq!(v["package_format"], "deb");
    assert_eq!(v["packages"], Value::Null);
    let warnings: Vec<&str> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    for path in [
        "/etc/os-release",
        "/etc/hostname",
        "/var/lib/dpkg/status",
        "/bin/sh",
    ] {
        assert!(
            warnings.iter().any(|w| w.starts_with(path)),
            "{path}: {warnings:?}"
        );
    }
    assert!(!err.contains('\x1b'), "{err:?}");
    img.assert_unchanged();
}

#[test]
fn arch_like_root_with_pacman_database() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    write(
        root,
        "/etc/os-release",
        b"NAME=\"Arch Linux\"\nPRETTY_NAME=\"Arch Linux\"\nID=arch\nBUILD_ID=rolling\n",
    );
    write(root, "/var/lib/pacman/local/ALPM_DB_VERSION", b"9\n");
    write(
        root,
        "/var/lib/pacman/local/linux-6.6.1.arch1-1/desc",
        b"%NAME%\nlinux\n\n%VERSION%\n6.6.1.arch1-1\n\n%DESC%\nThe Linux kernel\n\n%ARCH%\nx86_64\n\n",
    );
    write(
        root,
        "/var/lib/pacman/local/pacman-6.0.2-8/desc",
        b"%NAME%\npacman\n\n%VERSION%\n6.0.2-8\n\n%ARCH%\nx86_64\n\n",
    );
    write(root, "/boot/vmlinuz-linux", b"not really a kernel\n");
    fs::create_dir_all(root.join("usr/lib/modules/6.6.1-arch1-1")).unwrap();
    symlink("usr/lib", root.join("lib")).unwrap();
    shell(root);
    let img = ext4_image(root, "16M");

    let (v, err) = inspect_json(&img);

    assert_eq!(v["os"], "linux", "{err}");
    assert_eq!(v["distro"], "arch");
    assert_eq!(v["version"], Value::Null);
    assert_eq!(v["package_format"], "pacman");
    assert_eq!(
        v["packages"],
        json!([
            {"name": "linux", "version": "6.6.1.arch1-1", "arch": "x86_64"},
            {"name": "pacman", "version": "6.0.2-8", "arch": "x86_64"}
        ])
    );
    assert_eq!(
        v["kernels"],
        json!([
            {"release": "6.6.1-arch1-1", "image": null, "modules": "/lib/modules/6.6.1-arch1-1"},
            {"release": "linux", "image": "/boot/vmlinuz-linux", "modules": null}
        ])
    );
    assert_eq!(v["warnings"], json!([]), "{err}");
    img.assert_unchanged();
}
