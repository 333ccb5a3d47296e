//! End to end: `imgsafe shell` through the real appliance, in -c, stdin-script,
//! --overlay and interactive (a real pty driven by tmux) modes. The image file's sha256
//! is checked after each.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::tmux::Tmux;
use support::*;

fn sample() -> (tempfile::TempDir, Image) {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let img = ext4_image(src.path(), "24M");
    (src, img)
}

#[test]
fn command_keeps_stdout_and_stderr_apart_binary_safe_with_its_exit_status() {
    let (_src, img) = sample();

    let out = run([
        "shell",
        &img.arg(),
        "-c",
        r#"cat etc/hostname; printf '\377\000'; echo to-stderr >&2; find /sysroot/etc -name "*e*" | wc -l; exit 3"#,
    ]);

    assert_eq!(
        out.stdout,
        b"sample-host\n\xff\x003\n",
        "stderr: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("to-stderr\n"), "{}", stderr(&out));
    assert_eq!(code(&out), 3);
    img.assert_unchanged();
}

#[test]
fn the_usual_tools_and_file_type_detection_are_there() {
    let (_src, img) = sample();

    let out = run([
        "shell",
        &img.arg(),
        "-c",
        "for t in ls cat find grep less more hexdump xxd stat du df md5sum sha256sum file; do command -v $t >/dev/null || echo missing $t; done; file -b etc/hostname",
    ]);

    assert_eq!(ok_stdout(&out), "ASCII text\n");
    img.assert_unchanged();
}

#[test]
fn a_disk_without_filesystem_still_gets_a_shell_to_look_at_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blank.img");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[..8].copy_from_slice(b"NOTAFS!\n");
    std::fs::write(&path, &bytes).unwrap();
    let img = Image::new(dir, path);

    let out = run([
        "shell",
        &img.arg(),
        "-c",
        "head -c 8 /dev/vda; ls /sysroot | wc -l",
    ]);

    assert_eq!(ok_stdout(&out), "NOTAFS!\n0\n");
    assert!(
        stderr(&out).contains("no filesystem found, nothing is mounted"),
        "{}",
        stderr(&out)
    );
    img.assert_unchanged();
}

#[test]
fn script_on_stdin_runs_read_only_and_a_signal_gives_128_plus_n() {
    let (_src, img) = sample();
    let mut child = imgsafe()
        .args(["shell", &img.arg()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = "cat /sysroot/etc/hostname\necho x > /sysroot/newfile || echo refused\necho scratch > /tmp/f && cat /tmp/f\nkill -TERM $$\necho not reached\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();

    let out = child.wait_with_output().unwrap();

    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sample-host\nrefused\nscratch\n",
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&out), 128 + 15);
    img.assert_unchanged();
}

#[test]
fn a_reader_that_stops_reading_ends_the_guest_command_like_a_pipe() {
    // `imgsafe shell IMG -c yes | head -1`: without SIGPIPE reaching the guest, `yes`
    // would run forever.
    let (_src, img) = sample();
    let mut child = imgsafe()
        .args(["shell", &img.arg(), "-c", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 2];
    std::io::Read::read_exact(&mut child.stdout.take().unwrap(), &mut first).unwrap();

    // The read end is closed here (dropped above); imgsafe must notice and finish.
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("imgsafe shell kept running after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    assert_eq!(&first, b"y\n");
    assert_eq!(
        status.code(),
        Some(128 + 13),
        "SIGPIPE status, as a local pipeline"
    );
    img.assert_unchanged();
}

#[test]
fn overlay_takes_more_writes_than_guest_memory_and_leaves_nothing_behind() {
    // 256 MiB written: more than the appliance's RAM, so the layer must be on the host.
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let img = ext4_image(src.path(), "400M");
    let tmp = tempfile::tempdir().unwrap();

    let out = imgsafe()
        .env("TMPDIR", tmp.path())
        .args([
            "shell",
            "--overlay",
            &img.arg(),
            "-c",
            "dd if=/dev/zero of=/sysroot/big bs=1M count=256 2>/dev/null && sync && \
             stat -c %s /sysroot/big && rm /sysroot/etc/hostname && ls /sysroot/etc",
        ])
        .output()
        .unwrap();

    assert_eq!(ok_stdout(&out), "268435456\nfstab\nos-release\n");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    img.assert_unchanged();
}

#[test]
fn overlay_makes_vfat_writable_and_keeps_iso9660_read_only_with_a_warning() {
    // An EFI-style disk: vfat beside ext4; and a CD image, which cannot be written.
    let t = tempfile::tempdir().unwrap();
    let (root, efi) = (t.path().join("root"), t.path().join("efi"));
    sample_tree(&root, TreeOpts::PLAIN);
    std::fs::create_dir_all(root.join("efi")).unwrap();
    std::fs::create_dir_all(&efi).unwrap();
    std::fs::write(efi.join("BOOT.TXT"), b"efi file\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2, disk, iso) = (
        dir.path().join("p1"),
        dir.path().join("p2"),
        dir.path().join("disk.img"),
        dir.path().join("cd.iso"),
    );
    fs_image("vfat", &efi, 8, &p1);
    fs_image("ext4", &root, 16, &p2);
    partitioned_disk(
        "dos",
        &[
            Part {
                image: &p1,
                kind: "ef",
            },
            Part {
                image: &p2,
                kind: "83",
            },
        ],
        &disk,
    );
    must(
        tool("genisoimage", "genisoimage")
            .args(["-quiet", "-R", "-o"])
            .arg(&iso)
            .arg(&efi),
    );
    let iso = Image::new(tempfile::tempdir().unwrap(), iso);
    let img = Image::new(dir, disk);

    let out = run([
        "shell",
        "--overlay",
        &img.arg(),
        "-m",
        "2",
        "-m",
        "1:/efi",
        "-c",
        "echo x > /sysroot/new && cat /sysroot/new; echo y > /sysroot/efi/Z.TXT && cat /sysroot/efi/Z.TXT",
    ]);
    let cd = run([
        "shell",
        "--overlay",
        &iso.arg(),
        "-c",
        "cat /sysroot/BOOT.TXT; touch /sysroot/x 2>/dev/null || echo cd-read-only",
    ]);

    assert_eq!(ok_stdout(&out), "x\ny\n");
    assert!(!stderr(&out).contains("read-only"), "{}", stderr(&out));
    assert_eq!(ok_stdout(&cd), "efi file\ncd-read-only\n");
    assert!(
        stderr(&cd).contains("/sysroot (iso9660) stays read-only"),
        "{}",
        stderr(&cd)
    );
    img.assert_unchanged();
    iso.assert_unchanged();
}

fn wait_for_file(p: &Path, within: Duration) -> String {
    let start = Instant::now();
    while !p.exists() || std::fs::read_to_string(p).unwrap().is_empty() {
        assert!(start.elapsed() < within, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(100));
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn interactive_shell_on_a_real_terminal() {
    let (_src, img) = sample();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // stty -g before and after: the terminal settings imgsafe must restore.
    let cmd = format!(
        "stty -g > {d}/before; env XDG_CACHE_HOME={} IMGSAFE_ACCEL=tcg TERM=xterm {} shell {}; echo $? > {d}/rc; stty -g > {d}/after; sleep 600",
        test_cache().display(),
        env!("CARGO_BIN_EXE_imgsafe"),
        img.arg()
    );
    let t = Tmux::start(&cmd, 100, 30);
    let boot = Duration::from_secs(90);
    let step = Duration::from_secs(20);

    let banner = t.wait_for("the prompt", boot, |s| s.contains("imgsafe:/sysroot#"));
    t.keys(&["cat /sysroot/etc/hostname", "Enter"]);
    t.wait_for("the file's text", step, |s| s.contains("\nsample-host"));
    t.keys(&["sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_millis(700));
    t.keys(&["C-c"]);
    t.keys(&["echo after-$((6*7))", "Enter"]);
    t.wait_for("a command after Ctrl-C", step, |s| s.contains("after-42"));
    must(t.cmd().args(["resize-window", "-x", "120", "-y", "40"]));
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["stty size", "Enter"]);
    t.wait_for("the new size", step, |s| s.contains("\n40 120"));
    t.keys(&["exit 3", "Enter"]);
    let rc = wait_for_file(&dir.path().join("rc"), step);
    let after = wait_for_file(&dir.path().join("after"), step);

    assert!(
        banner.contains("/dev/vda (ext4) at /sysroot, read-only"),
        "{banner}"
    );
    assert!(banner.contains("Ctrl-D"), "{banner}");
    assert_eq!(rc.trim(), "3");
    assert_eq!(
        after,
        std::fs::read_to_string(dir.path().join("before")).unwrap()
    );
    img.assert_unchanged();
}

/// `env ... imgsafe shell IMAGE` for a tmux pane: the shared cache, TCG, and `TMPDIR`
/// so the run's QEMU can be found by its command line.
fn shell_in_pane(img: &Image, tmp: &Path) -> String {
    format!(
        "env XDG_CACHE_HOME={} IMGSAFE_ACCEL=tcg TERM=xterm TMPDIR={} {} shell {}",
        test_cache().display(),
        tmp.display(),
        env!("CARGO_BIN_EXE_imgsafe"),
        img.arg()
    )
}

/// QEMU processes whose command line mentions `tmp` (their sockets live there).
fn qemus_under(tmp: &Path) -> Vec<u32> {
    processes_mentioning(tmp.to_str().unwrap())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu"))
        })
        .collect()
}

#[test]
fn ctrl_d_at_the_prompt_ends_the_interactive_session_with_status_0() {
    let (_src, img) = sample();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let cmd = format!(
        "{}; echo $? > {d}/rc; sleep 600",
        shell_in_pane(&img, dir.path())
    );
    let t = Tmux::start(&cmd, 100, 30);

    t.wait_for("the prompt", Duration::from_secs(90), |s| {
        s.contains("imgsafe:/sysroot#")
    });
    t.keys(&["echo ready-$((40+2))", "Enter"]);
    t.wait_for("a command's output", Duration::from_secs(20), |s| {
        s.contains("\nready-42")
    });
    t.keys(&["C-d"]);
    let rc = wait_for_file(&dir.path().join("rc"), Duration::from_secs(20));

    assert_eq!(rc.trim(), "0");
    img.assert_unchanged();
}

#[test]
fn sigterm_during_an_interactive_session_restores_the_terminal_and_exits_130() {
    let (_src, img) = sample();
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("imgsafe-term-")
        .tempdir()
        .unwrap();
    let d = dir.path().display();
    // The inner sh records its pid and execs imgsafe, which keeps that pid and stays in
    // the foreground on the pane's terminal.
    let cmd = format!(
        "stty -g > {d}/before; sh -c 'echo $$ > {d}/pid; exec {}'; echo $? > {d}/rc; stty -g > {d}/after; sleep 600",
        shell_in_pane(&img, tmp.path())
    );
    let t = Tmux::start(&cmd, 100, 30);
    t.wait_for("the prompt", Duration::from_secs(90), |s| {
        s.contains("imgsafe:/sysroot#")
    });
    let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let qemu_while_running = qemus_under(tmp.path());

    // SAFETY: a signal to the imgsafe process this test started (through tmux and sh).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let rc = wait_for_file(&dir.path().join("rc"), Duration::from_secs(20));
    let after = wait_for_file(&dir.path().join("after"), Duration::from_secs(5));

    assert!(
        !qemu_while_running.is_empty(),
        "no QEMU found for the session: the check below would prove nothing"
    );
    assert_eq!(rc.trim(), "130");
    assert_eq!(
        after,
        std::fs::read_to_string(dir.path().join("before")).unwrap(),
        "terminal settings not restored"
    );
    assert_eq!(
        qemus_under(tmp.path()),
        Vec::<u32>::new(),
        "QEMU left running after SIGTERM"
    );
    img.assert_unchanged();
}
