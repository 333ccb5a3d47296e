//! Bad input: every failure is one line on stderr naming the image and the problem,
//! with its documented exit code, and the image is never changed.

mod support;

use std::fs;
use support::*;

/// Exit codes from README.md.
const USAGE: i32 = 2;
const IMAGE: i32 = 3;
const NOT_FOUND: i32 = 4;
const FILESYSTEM: i32 = 5;

/// An 8 MiB disk of zeros: no partition table, no filesystem.
fn zeros_image() -> Image {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("zeros.img");
    fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    Image::new(dir, p)
}

fn one_line(out: &std::process::Output) -> String {
    let e = stderr(out);
    let lines: Vec<&str> = e.lines().filter(|l| !l.contains("using TCG")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got {e:?}");
    assert!(lines[0].starts_with("imgsafe: "), "{e}");
    lines[0].to_string()
}

#[test]
fn missing_image_is_an_image_error_naming_the_file() {
    let out = run(["ls", "/no/such/disk.img", "/"]);

    assert_eq!(code(&out), IMAGE);
    let line = one_line(&out);
    assert!(
        line.contains("/no/such/disk.img") && line.contains("No such file"),
        "{line}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn other_vm_image_formats_are_named_not_read_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    for (fmt, name) in [("qed", "QED image")] {
        let path = dir.path().join(format!("disk.{fmt}"));
        must(
            tool("qemu-img", "qemu-utils")
                .args(["create", "-q", "-f", fmt])
                .arg(&path)
                .arg("16M"),
        );
        let img = Image::new(tempfile::tempdir().unwrap(), path.clone());

        // ls too: refused before any VM starts.
        for cmd in ["info", "ls"] {
            let out = run([cmd, path.to_str().unwrap()]);

            assert_eq!(code(&out), IMAGE, "{fmt} {cmd}: {}", stderr(&out));
            let line = one_line(&out);
            assert!(
                line.contains(&format!("a {name}, which imgsafe does not read")),
                "{line}"
            );
            assert!(line.contains(path.to_str().unwrap()), "{line}");
        }
        img.assert_unchanged();
    }
}

#[test]
fn directory_as_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();

    let out = run(["cat", dir.path().to_str().unwrap(), "/etc/hostname"]);

    assert_eq!(code(&out), IMAGE);
    assert!(one_line(&out).contains("is a directory"));
}

#[test]
fn empty_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.img");
    fs::write(&p, b"").unwrap();

    let out = run(["ls", p.to_str().unwrap(), "/"]);

    assert_eq!(code(&out), IMAGE);
    let line = one_line(&out);
    assert!(
        line.contains("empty.img") && line.contains("empty"),
        "{line}"
    );
}

#[test]
fn disk_without_filesystem_is_a_filesystem_error() {
    let img = zeros_image();

    let out = run(["ls", &img.arg(), "/"]);

    assert_eq!(code(&out), FILESYSTEM);
    let line = one_line(&out);
    assert!(
        line.contains("zeros.img") && line.contains("no filesystem"),
        "{line}"
    );
    img.assert_unchanged();
}

#[test]
fn path_not_found_and_directory_for_cat_are_not_found_errors() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let img = ext4_image(src.path(), "16M");

    let missing = run(["ls", &img.arg(), "/no/such"]);
    let dir = run(["cat", &img.arg(), "/etc"]);

    assert_eq!(code(&missing), NOT_FOUND);
    let line = one_line(&missing);
    assert!(
        line.ends_with(&format!(
            "{}: /no/such: no such file or directory in the image",
            img.arg()
        )),
        "{line}"
    );
    assert_eq!(code(&dir), NOT_FOUND);
    assert!(one_line(&dir).ends_with("/etc: is a directory"));
    img.assert_unchanged();
}

#[test]
fn bad_command_line_is_a_usage_error() {
    let cases: [&[&str]; 4] = [
        &["ls"],
        &["cat", "disk.img", "etc/os-release"],
        &["ls", "disk.img", ""],
        &["frobnicate"],
    ];

    for args in cases {
        let out = run(args.iter().copied());

        // Refused before any image is opened or VM started, in one line.
        let err = stderr(&out);
        assert_eq!(code(&out), USAGE, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("imgsafe: ") && err.contains("--help"),
            "{err}"
        );
    }
    let relative = stderr(&run(["cat", "disk.img", "etc/os-release"]));
    assert!(
        relative.contains("'etc/os-release'") && relative.contains("absolute"),
        "{relative}"
    );
}

#[test]
fn bad_accelerator_or_machine_setting_is_a_usage_error() {
    let img = zeros_image();

    for (var, value, expected) in [
        (
            "IMGSAFE_ACCEL",
            "hvf",
            "IMGSAFE_ACCEL=\"hvf\": expected `kvm` or `tcg`",
        ),
        (
            "IMGSAFE_MACHINE",
            "pc",
            "IMGSAFE_MACHINE=\"pc\": expected `microvm` or `q35`",
        ),
    ] {
        for args in [
            vec!["ls".to_string(), img.arg(), "/".into()],
            vec!["appliance".into()],
        ] {
            let out = imgsafe().env(var, value).args(&args).output().unwrap();

            assert_eq!(code(&out), USAGE, "{var} {args:?}: {}", stderr(&out));
            let line = one_line(&out);
            assert!(line.contains(expected), "{line}");
        }
    }
    img.assert_unchanged();
}

/// Regression: an image of 2^63-1 bytes booted the appliance and then failed with exit 6
/// (`QMP blockdev-add failed: ... File too large`).
#[test]
fn an_image_larger_than_qemu_can_attach_is_an_image_error_before_booting() {
    // tmpfs holds sparse files up to 2^63-1 bytes; ext4 stops at 16 TiB.
    let dir = tempfile::Builder::new()
        .prefix("imgsafe-huge-")
        .tempdir_in("/dev/shm")
        .expect("a tmpfs at /dev/shm");
    let path = dir.path().join("huge.img");
    fs::File::create(&path)
        .unwrap()
        .set_len(i64::MAX as u64)
        .unwrap();
    let started = std::time::Instant::now();

    let out = run(["ls".as_ref(), path.as_os_str(), "/".as_ref()]);

    let line = one_line(&out);
    assert_eq!(code(&out), IMAGE, "{line}");
    assert!(
        line.contains(path.to_str().unwrap()) && line.contains("more than QEMU can attach"),
        "{line}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}: the VM was booted",
        started.elapsed()
    );
}

/// Regression: a symlink loop in the image exited 6 ("appliance or VM failure") with the
/// path repeated.
#[test]
fn a_symlink_loop_in_the_image_is_a_path_error_naming_the_path_once() {
    let src = tempfile::tempdir().unwrap();
    let links = src.path().join("links");
    fs::create_dir(&links).unwrap();
    std::os::unix::fs::symlink("self", links.join("self")).unwrap();
    std::os::unix::fs::symlink("b", links.join("a")).unwrap();
    std::os::unix::fs::symlink("a", links.join("b")).unwrap();
    let img = ext4_image(src.path(), "8M");

    let looped = run(["cat", &img.arg(), "/links/self"]);
    let pair = run(["cat", &img.arg(), "/links/a"]);

    for (out, path) in [(&looped, "/links/self"), (&pair, "/links/a")] {
        let line = one_line(out);
        assert_eq!(code(out), NOT_FOUND, "{line}");
        assert_eq!(line.matches(path).count(), 1, "{line}");
        assert!(line.contains("too many levels of symbolic links"), "{line}");
    }
    img.assert_unchanged();
}
