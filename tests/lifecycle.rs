//! Rootless operation and QEMU lifetime: imgsafe runs as an ordinary user, and no QEMU
//! process outlives it after success, an error, SIGINT or its own death.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::*;

fn small_image() -> Image {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    ext4_image(src.path(), "16M")
}

/// A private TMPDIR whose path appears in QEMU's command line (its sockets live there),
/// so the test can find the QEMU processes of one imgsafe run.
fn marked_tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgsafe-life-")
        .tempdir()
        .unwrap()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn qemus(tmp: &tempfile::TempDir) -> Vec<u32> {
    processes_mentioning(tmp.path().to_str().unwrap())
        .into_iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu"))
        })
        .collect()
}

#[test]
fn runs_as_an_ordinary_user() {
    let img = small_image();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let out = if uid != 0 {
        run(["cat", &img.arg(), "/etc/hostname"])
    } else {
        // Run as root, prove imgsafe needs no root by running it as an ordinary user:
        // IMGSAFE_TEST_USER (CI creates one with a home), else `nobody`, which every
        // Debian system has.
        let user = std::env::var("IMGSAFE_TEST_USER").unwrap_or_else(|_| "nobody".to_string());
        // Give the ordinary user a copy of the binary and the image it can reach.
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.path().join("imgsafe");
        fs::copy(env!("CARGO_BIN_EXE_imgsafe"), &bin).unwrap();
        let disk = dir.path().join("disk.img");
        fs::copy(&img.path, &disk).unwrap();
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o644)).unwrap();
        let script = format!(
            // The first command boots and saves the appliance, the second restores it.
            "set -e; test \"$(id -u)\" != 0; export XDG_CACHE_HOME=$(mktemp -d); \
             IMGSAFE_ACCEL=tcg {bin} cat {disk} /etc/hostname; \
             IMGSAFE_ACCEL=tcg {bin} -v cat {disk} /etc/hostname 2>\"$XDG_CACHE_HOME/v\"; \
             grep -q '] restore: ' \"$XDG_CACHE_HOME/v\"; rm -rf \"$XDG_CACHE_HOME\"",
            bin = bin.display(),
            disk = disk.display()
        );
        tool("runuser", "util-linux")
            .args(["-u", &user, "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    let expected = if uid != 0 {
        "sample-host\n"
    } else {
        "sample-host\nsample-host\n"
    };
    assert_eq!(ok_stdout(&out), expected);
    img.assert_unchanged();
}

#[test]
fn a_guest_that_does_not_answer_in_time_is_a_clear_error_and_leaves_no_qemu() {
    let img = small_image();
    let tmp = marked_tmp();

    // No appliance boots in 50 ms, even under KVM.
    let out = imgsafe()
        .env("TMPDIR", tmp.path())
        .env("IMGSAFE_TIMEOUT", "0.05")
        .args(["ls", &img.arg(), "/"])
        .output()
        .unwrap();

    let err = stderr(&out);
    assert_eq!(code(&out), 6, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "imgsafe: {}: the appliance did not start within 0.05 s",
            img.arg()
        )),
        "{err}"
    );
    assert!(qemus(&tmp).is_empty(), "QEMU left behind after a timeout");
    img.assert_unchanged();
}

#[test]
fn no_qemu_left_after_success_or_error() {
    let img = small_image();
    let tmp = marked_tmp();

    let ok = imgsafe()
        .env("TMPDIR", tmp.path())
        .args(["ls", &img.arg(), "/"])
        .output()
        .unwrap();
    let left_after_ok = qemus(&tmp);
    let err = imgsafe()
        .env("TMPDIR", tmp.path())
        .args(["cat", &img.arg(), "/nope"])
        .output()
        .unwrap();
    let left_after_err = qemus(&tmp);

    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(code(&err), 4, "{}", stderr(&err));
    assert!(
        left_after_ok.is_empty() && left_after_err.is_empty(),
        "{left_after_ok:?} {left_after_err:?}"
    );
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temp files left behind"
    );
    img.assert_unchanged();
}

#[test]
fn sigint_during_a_command_kills_qemu_and_exits_130() {
    let img = small_image();
    let tmp = marked_tmp();
    let mut child = imgsafe()
        .env("TMPDIR", tmp.path())
        .args(["ls", &img.arg(), "/"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || !qemus(&tmp).is_empty()),
        "QEMU never started"
    );

    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();

    assert_eq!(status.code(), Some(130));
    assert!(qemus(&tmp).is_empty(), "QEMU survived SIGINT");
    img.assert_unchanged();
}

#[test]
fn qemu_dies_with_imgsafe_even_on_sigkill() {
    let img = small_image();
    let tmp = marked_tmp();
    let mut child = imgsafe()
        .env("TMPDIR", tmp.path())
        .args(["ls", &img.arg(), "/"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || !qemus(&tmp).is_empty()),
        "QEMU never started"
    );

    child.kill().unwrap();
    child.wait().unwrap();

    assert!(
        wait_until(Duration::from_secs(5), || qemus(&tmp).is_empty()),
        "QEMU outlived a killed imgsafe"
    );
}

#[test]
fn q35_machine_serves_where_qemu_has_no_qboot() {
    let img = small_image();

    let out = imgsafe()
        .env("IMGSAFE_MACHINE", "q35")
        .args(["-v", "cat", &img.arg(), "/etc/hostname"])
        .output()
        .unwrap();

    let err = stderr(&out);
    assert_eq!(ok_stdout(&out), "sample-host\n", "{err}");
    assert!(err.contains(" -M q35 ") && !err.contains("-bios"), "{err}");
    img.assert_unchanged();
}

/// The run directories (`imgsafe-*`) in `tmp`.
fn run_dirs(tmp: &tempfile::TempDir) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("imgsafe-"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// Regression: with umask 000 the run directory was drwxrwxrwx and its sockets
/// srwxrwxrwx, so another user could read the image over nbd.sock and drive the VM over
/// qmp.sock.
#[test]
fn the_run_directory_and_all_in_it_are_owner_only_even_with_umask_000() {
    let img = small_image();
    let tmp = marked_tmp();
    let mut command = imgsafe();
    command
        .env("TMPDIR", tmp.path())
        .args(["shell", &img.arg(), "-c", "sleep 30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: umask is async-signal-safe and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let names = ["nbd.sock", "qmp.sock", "agent.sock", "console.log", ".lock"];
    let ready = wait_until(Duration::from_secs(120), || {
        run_dirs(&tmp)
            .first()
            .is_some_and(|d| names.iter().all(|n| d.join(n).exists()))
    });
    let dir = run_dirs(&tmp).first().cloned();
    let mode = |p: &std::path::Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    let modes: Vec<(String, u32)> = dir
        .iter()
        .flat_map(|d| fs::read_dir(d).unwrap().flatten())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                mode(&e.path()),
            )
        })
        .collect();
    let dir_mode = dir.as_deref().map(mode);
    child.kill().unwrap();
    child.wait().unwrap();

    assert!(ready, "the run directory never held {names:?}");
    assert_eq!(dir_mode, Some(0o700));
    assert_eq!(
        mode(&test_cache().join("imgsafe")),
        0o700,
        "the appliance cache"
    );
    assert!(modes.len() >= names.len(), "{modes:?}");
    assert!(
        modes.iter().all(|(_, m)| m & 0o077 == 0),
        "not owner-only: {modes:?}"
    );
}

/// Regression: a SIGKILLed imgsafe left its run directory (sockets, console log) behind
/// for good.
#[test]
fn a_run_directory_left_by_a_killed_imgsafe_is_swept_by_the_next_command() {
    let img = small_image();
    let tmp = marked_tmp();
    let mut child = imgsafe()
        .env("TMPDIR", tmp.path())
        .args(["ls", &img.arg(), "/"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || !qemus(&tmp).is_empty()),
        "QEMU never started"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let left = run_dirs(&tmp);
    // Directories changed in the last two seconds may still be being set up.
    std::thread::sleep(Duration::from_millis(2500));

    let out = imgsafe()
        .env("TMPDIR", tmp.path())
        .args(["ls", &img.arg(), "/"])
        .output()
        .unwrap();

    assert_eq!(left.len(), 1, "{left:?}");
    assert!(ok_stdout(&out).contains("etc\n"));
    assert_eq!(run_dirs(&tmp), Vec::<std::path::PathBuf>::new());
}

/// `unshare` running `args` as PID 1 of a new PID namespace (with a user namespace
/// when not root, so the test needs no privilege).
fn as_pid_1(args: &[&str]) -> std::process::Output {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let mut c = tool("unshare", "util-linux");
    if !root {
        c.arg("-r");
    }
    c.args(["-fpm", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_imgsafe"))
        .args(args)
        .env("XDG_CACHE_HOME", test_cache())
        .env("IMGSAFE_ACCEL", "tcg")
        .stdin(Stdio::null());
    c.output().unwrap()
}

#[test]
fn as_pid_1_of_a_container_it_is_the_command_line_tool_not_the_agent() {
    let img = small_image();

    let version = as_pid_1(&["--version"]);
    let ls = as_pid_1(&["cat", &img.arg(), "/etc/hostname"]);

    assert!(
        ok_stdout(&version).starts_with("imgsafe "),
        "{}",
        stderr(&version)
    );
    assert_eq!(ok_stdout(&ls), "sample-host\n");
    img.assert_unchanged();
}
