//! An unreadable host kernel (Ubuntu installs /boot/vmlinuz-* mode 0600): imgsafe
//! fetches the distribution's package of it with apt-get as the ordinary user, says so
//! once, caches it, and boots it; when that cannot be done the error names both ways out.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use support::*;

/// The kernel the search picks on this host: a cloud kernel first, with its modules.
fn host_kernel() -> (PathBuf, String) {
    let mut found: Vec<(bool, PathBuf, String)> = fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rel = name.strip_prefix("vmlinuz-")?.to_string();
            Path::new("/lib/modules")
                .join(&rel)
                .is_dir()
                .then(|| (rel.contains("-cloud-"), e.path(), rel))
        })
        .collect();
    found.sort();
    let (_, k, rel) = found
        .pop()
        .expect("no /boot/vmlinuz-*: install the Debian package linux-image-cloud-amd64");
    (k, rel)
}

/// A folder the ordinary user can enter holding `boot/vmlinuz-REL` that it cannot read:
/// root's 0600 copy when the test runs as root (it runs imgsafe as IMGSAFE_TEST_USER or
/// nobody), else the user's own copy with mode 0000.
fn unreadable_boot(kernel: &Path, rel: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let boot = dir.path().join("boot");
    fs::create_dir(&boot).unwrap();
    fs::set_permissions(&boot, fs::Permissions::from_mode(0o755)).unwrap();
    let copy = boot.join(format!("vmlinuz-{rel}"));
    fs::copy(kernel, &copy).unwrap();
    let mode = if is_root() { 0o600 } else { 0o000 };
    fs::set_permissions(&copy, fs::Permissions::from_mode(mode)).unwrap();
    dir
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// Run `script` with sh as the ordinary user (or as this user when not root).
fn as_user(script: &str) -> Output {
    let mut c = if is_root() {
        let user = std::env::var("IMGSAFE_TEST_USER").unwrap_or_else(|_| "nobody".to_string());
        let mut c = tool("runuser", "util-linux");
        c.args(["-u", &user, "--", "sh", "-c", script]);
        c
    } else {
        let mut c = tool("sh", "dash");
        c.args(["-c", script]);
        c
    };
    c.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn an_unreadable_host_kernel_is_fetched_from_its_package_once_and_boots() {
    let (kernel, rel) = host_kernel();
    let dir = unreadable_boot(&kernel, &rel);
    let bin = dir.path().join("imgsafe");
    fs::copy(env!("CARGO_BIN_EXE_imgsafe"), &bin).unwrap();
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let img = ext4_image(src.path(), "16M");
    let disk = dir.path().join("disk.img");
    fs::copy(&img.path, &disk).unwrap();
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o644)).unwrap();
    let before = sha256(&disk);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    fs::set_permissions(&out_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let script = format!(
        "set -e; export XDG_CACHE_HOME=$(mktemp -d) IMGSAFE_ACCEL=tcg IMGSAFE_WARM=0 \
         IMGSAFE_TEST_BOOT_DIR={boot}; \
         {bin} appliance --json >{out}/first.json 2>{out}/first.err; \
         {bin} appliance --json >{out}/second.json 2>{out}/second.err; \
         {bin} cat {disk} /etc/hostname; \
         cat \"$XDG_CACHE_HOME\"/imgsafe/kernel/*/vmlinuz-{rel} >{out}/fetched; \
         rm -rf \"$XDG_CACHE_HOME\"",
        boot = dir.path().join("boot").display(),
        bin = bin.display(),
        disk = disk.display(),
        out = out_dir.display(),
    );

    let out = as_user(&script);

    let read = |n: &str| fs::read_to_string(out_dir.join(n)).unwrap_or_default();
    assert_eq!(
        ok_stdout(&out),
        "sample-host\n",
        "first: {} second: {}",
        read("first.err"),
        read("second.err")
    );
    let notes: Vec<String> = read("first.err").lines().map(String::from).collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains(&format!("kernel {}/boot/vmlinuz-{rel} is not readable by this user; using its distribution package", dir.path().display())),
        "{notes:?}"
    );
    assert_eq!(read("second.err"), "", "said again on the cached path");
    let first: serde_json::Value = serde_json::from_str(&read("first.json")).unwrap();
    assert_eq!(first["kernel_release"], rel.as_str());
    // apt's package holds the very file the host installed from it.
    assert_eq!(sha256(&out_dir.join("fetched")), sha256(&kernel));
    assert_eq!(sha256(&disk), before);
}

#[test]
fn without_apt_get_the_error_names_both_ways_out() {
    let (kernel, rel) = host_kernel();
    let dir = unreadable_boot(&kernel, &rel);
    let bin = dir.path().join("imgsafe");
    fs::copy(env!("CARGO_BIN_EXE_imgsafe"), &bin).unwrap();
    let script = format!(
        "export XDG_CACHE_HOME=$(mktemp -d) IMGSAFE_TEST_BOOT_DIR={boot}; \
         PATH=/nonexistent {bin} appliance; rc=$?; rm -rf \"$XDG_CACHE_HOME\"; exit $rc",
        boot = dir.path().join("boot").display(),
        bin = bin.display(),
    );

    let out = as_user(&script);

    let err = stderr(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("apt-get not found"), "{err}");
    assert!(err.contains("is not readable by this user"), "{err}");
    assert!(err.contains("chmod 0644"), "{err}");
    assert!(err.contains("IMGSAFE_KERNEL"), "{err}");
}
