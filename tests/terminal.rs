//! Names from the image on a terminal: C0, DEL, C1 controls and bytes that are not UTF-8
//! never reach it raw (`?` instead, as GNU `ls` shows them), while piped output keeps
//! the exact bytes. `ls` runs on a real pty.

mod support;

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};
use support::*;

/// A name with the C1 control CSI (U+009B, bytes `c2 9b`): many terminals obey it as ESC [.
const CSI_NAME: &[u8] = b"csi\xc2\x9b31mred";
/// A name that is not UTF-8.
const BAD_NAME: &[u8] = b"bad\xff\xfename";
/// A name with a C0 escape sequence and DEL.
const ESC_NAME: &[u8] = b"esc\x1b[2J\x7fend";
/// Target of the symlink `link`, with CSI in it.
const CSI_TARGET: &[u8] = b"to\xc2\x9b2J";
/// A FIFO, which `cp` skips with a warning naming it.
const FIFO_NAME: &[u8] = b"fifo\xc2\x9b5m";

/// Bytes no terminal may receive from a name.
fn raw_controls(out: &[u8]) -> Vec<u8> {
    let text_controls = out
        .utf8_chunks()
        .flat_map(|c| c.valid().chars().collect::<Vec<_>>())
        .filter(|c| c.is_control() && !matches!(c, '\n' | '\r'))
        .map(|c| c as u32 as u8);
    let invalid = out.utf8_chunks().flat_map(|c| c.invalid().to_vec());
    text_controls.chain(invalid).collect()
}

/// An ext4 image whose `/names` holds the awkward names, a symlink and a FIFO.
fn image() -> Image {
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("names");
    fs::create_dir(&dir).unwrap();
    for n in [CSI_NAME, BAD_NAME, ESC_NAME] {
        fs::write(dir.join(OsStr::from_bytes(n)), b"x").unwrap();
    }
    std::os::unix::fs::symlink(OsStr::from_bytes(CSI_TARGET), dir.join("link")).unwrap();
    let fifo =
        std::ffi::CString::new([dir.as_os_str().as_bytes(), b"/", FIFO_NAME].concat()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    ext4_image(src.path(), "16M")
}

/// Run `cmd` with its stdout on a fresh pty (raw mode, so the bytes are exactly what
/// was written); returns them and the exit code.
fn on_pty(cmd: &mut Command) -> (Vec<u8>, Output) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; the null pointers ask for defaults.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: termios is plain data; tcgetattr fills it and cfmakeraw edits it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(
            libc::tcgetattr(std::os::fd::AsRawFd::as_raw_fd(&slave), &mut t),
            0
        );
        libc::cfmakeraw(&mut t);
        assert_eq!(
            libc::tcsetattr(std::os::fd::AsRawFd::as_raw_fd(&slave), libc::TCSANOW, &t),
            0
        );
    }
    let child = cmd
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command keeps what it was given: take the pty's other side back from it, so
    // the reads below end when the child closes it.
    cmd.stdout(Stdio::null());
    let mut master = fs::File::from(master);
    let mut shown = Vec::new();
    let mut buf = [0u8; 4096];
    // Reads fail with EIO once every holder of the other side has closed it.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    (shown, child.wait_with_output().unwrap())
}

/// Regression: on a tty `ls -l` replaced ESC but passed CSI (`c2 9b`) and bytes that are
/// not UTF-8 (`ff fe`) straight to the terminal.
#[test]
fn ls_long_on_a_terminal_shows_c1_controls_and_invalid_utf8_as_question_marks() {
    let img = image();

    let (shown, out) = on_pty(imgsafe().args(["ls", "-l", &img.arg(), "/names"]));

    let text = String::from_utf8_lossy(&shown);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(raw_controls(&shown), Vec::<u8>::new(), "{text:?}");
    for want in [
        "csi?31mred",
        "bad??name",
        "esc?[2J?end",
        "link -> to?2J",
        "fifo?5m",
    ] {
        assert!(text.contains(want), "no {want:?} in {text:?}");
    }
    img.assert_unchanged();
}

#[test]
fn ls_piped_keeps_the_exact_bytes() {
    let img = image();

    let out = run(["ls", &img.arg(), "/names"]);

    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let want: Vec<u8> = {
        let mut names = [CSI_NAME, BAD_NAME, ESC_NAME, FIFO_NAME, b"link".as_slice()];
        names.sort();
        names.iter().flat_map(|n| [*n, b"\n"].concat()).collect()
    };
    assert_eq!(out.stdout, want);
    img.assert_unchanged();
}

/// `cp` names a skipped FIFO in its warning: the name reaches stderr made printable.
#[test]
fn cp_warnings_show_names_printable() {
    let img = image();
    let dest = tempfile::tempdir().unwrap();

    let out = run([
        "cp".as_ref(),
        OsStr::new(&format!("{}:/names", img.arg())),
        dest.path().as_os_str(),
    ]);

    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(err.contains("fifo?5m"), "{err}");
    assert_eq!(raw_controls(&out.stderr), Vec::<u8>::new(), "{err:?}");
    let copied = dest.path().join("names").join(OsStr::from_bytes(CSI_NAME));
    assert_eq!(fs::read(copied).unwrap(), b"x");
    img.assert_unchanged();
}

/// `filesystems` shows a label's C1 controls as `?`, like every other guest text.
#[test]
fn filesystems_shows_labels_printable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("label.img");
    must(
        tool("mke2fs", "e2fsprogs")
            .args(["-q", "-F", "-t", "ext4", "-L"])
            .arg(OsStr::from_bytes(b"lab\xc2\x9b2Jel"))
            .arg(&path)
            .arg("8M"),
    );
    let img = Image::new(dir, path);

    let out = run(["filesystems", &img.arg()]);

    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(text.contains("lab?2Jel"), "{text:?}");
    assert_eq!(raw_controls(&out.stdout), Vec::<u8>::new(), "{text:?}");
    img.assert_unchanged();
}
