//! `imgsafe shell IMAGE [-c COMMAND] [--overlay]`: busybox sh inside the appliance.
//!
//! Interactive (stdin is a terminal, no `-c`): the guest runs the shell on a pty; the
//! host terminal goes raw and bytes flow both ways unchanged, so Ctrl-C, line editing
//! and job control are the guest pty's business. Otherwise the guest uses three pipes:
//! stdin is forwarded with its EOF, stdout and stderr come back as separate streams.
//! The host never parses what the shell prints; the banner is built from what the host
//! knows and the guest's typed mount list.

mod term;

use crate::agent_client::{channel_error, send_error, set_channel_timeout, ShellChannel};
use crate::cli::ShellArgs;
use crate::session::{self, Session};
use crate::{vm, Error, Result};
use imgsafe_proto::{
    read_shell_frame, write_data, write_msg, ErrorKind, Request, Response, ShellFrame, ShellMount,
    ShellStart, ShellStatus, WinSize,
};
use rustix::event::{PollFd, PollFlags};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Largest stdin chunk sent in one frame.
const INPUT_CHUNK: usize = 64 * 1024;
/// Most mounts shown in the banner.
const MAX_BANNER_MOUNTS: usize = 16;
/// Longest guest-supplied text shown in the banner, per field.
const MAX_BANNER_FIELD: usize = 200;
/// Status when the guest reports one that cannot be an exit status.
const BAD_STATUS: i32 = 255;

/// A host-side step of the shell that failed (the guest's failures are
/// [`Error::Guest`]).
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// SIGWINCH could not be watched.
    #[error("watching terminal resizes: {0}")]
    Resizes(#[source] io::Error),
    /// The terminal could not be put in raw mode.
    #[error("setting the terminal to raw mode: {0}")]
    RawMode(#[source] io::Error),
    /// The pipe that wakes the input loop could not be made.
    #[error("creating a pipe: {0}")]
    Pipe(#[source] io::Error),
    /// The thread copying the guest's output panicked.
    #[error("shell output thread panicked")]
    OutputThread,
}

/// How the shell is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A pty in the guest, the host terminal raw.
    Interactive,
    /// Pipes; host stdin forwarded.
    Pipes,
}

/// Run the shell; `Ok` holds imgsafe's exit code, the shell's own status (as with
/// `ssh host cmd`), returned once the session is torn down.
pub fn run(args: ShellArgs) -> Result<i32> {
    let mode = if args.command.is_none() && term::is_tty(libc::STDIN_FILENO) {
        Mode::Interactive
    } else {
        Mode::Pipes
    };
    // A shell is useful even on a disk with no filesystem (hexdump /dev/vda).
    let s = Session::open_mounted_with(
        &args.image,
        &args.image_args.spec(),
        &args.guest.guest(),
        &args.mount.choice(),
        args.overlay,
        true,
    )?;
    let status = s.run(|s| drive(s, &args, mode))?;
    let _ = io::stdout().flush();
    Ok(exit_code(status))
}

/// The exit code for a shell status: its own, or 128+N for a signal.
fn exit_code(st: ShellStatus) -> i32 {
    match st {
        ShellStatus::Exited(n) if (0..=255).contains(&n) => n,
        ShellStatus::Signaled(n) if (1..=64).contains(&n) => 128 + n,
        _ => BAD_STATUS,
    }
}

/// Start the shell on the session's channel and run it to the end.
fn drive(s: &mut Session, args: &ShellArgs, mode: Mode) -> Result<ShellStatus> {
    let image = s.image().to_path_buf();
    let ch = s
        .fs()
        .shell_channel()
        .ok_or_else(|| Error::appliance("no guest agent to run a shell"))?;
    let tty = match mode {
        Mode::Interactive => {
            let (rows, cols) = term::window_size(libc::STDIN_FILENO).unwrap_or((24, 80));
            Some(WinSize { rows, cols })
        }
        Mode::Pipes => None,
    };
    let start = ShellStart {
        command: args.command.as_ref().map(|c| c.as_bytes().to_vec()),
        tty,
        term: std::env::var("TERM").ok(),
    };
    // The guest must start the shell within the answer timeout; after that a session
    // may sit idle (or a command run) for hours, so no timeout while it runs.
    let mounts = start_shell(ch.reader, ch.writer, start)?;
    set_timeout(&ch, None)?;
    if args.overlay && mode == Mode::Pipes {
        for m in mounts
            .iter()
            .filter(|m| !m.writable)
            .take(MAX_BANNER_MOUNTS)
        {
            eprintln!(
                "imgsafe: warning: {}: {} ({}) stays read-only: it cannot be mounted read-write",
                image.display(),
                clean(&m.path),
                clean(&m.fstype)
            );
        }
    }
    let status = match mode {
        Mode::Interactive => {
            eprint!("{}", banner(&image, &mounts, args.overlay));
            let _sigint = term::SignalGuard::ignore_sigint();
            let winch = term::Winch::install().map_err(ShellError::Resizes)?;
            let raw = term::RawMode::enable(libc::STDIN_FILENO).map_err(ShellError::RawMode)?;
            let st = pump(ch.reader, ch.writer, Some(&winch));
            drop(raw);
            st
        }
        Mode::Pipes => pump(ch.reader, ch.writer, None),
    }?;
    set_timeout(&ch, Some(session::timeout()?))?;
    Ok(status)
}

fn set_timeout(ch: &ShellChannel, t: Option<std::time::Duration>) -> Result<()> {
    set_channel_timeout(ch.reader.get_ref(), t)
}

/// Send `Shell` and read its answer: the guest's mount list.
fn start_shell<R: io::Read, W: Write>(
    r: &mut R,
    w: &mut W,
    start: ShellStart,
) -> Result<Vec<ShellMount>> {
    write_msg(w, &Request::Shell(start))
        .and_then(|()| w.flush())
        .map_err(send_error)?;
    match read_shell_frame::<_, Response>(r).map_err(channel_error)? {
        ShellFrame::Msg(Response::ShellStarted { mounts }) => Ok(mounts),
        ShellFrame::Msg(Response::Error {
            kind: ErrorKind::Mount,
            message,
        }) => Err(Error::Filesystem {
            image: Default::default(),
            what: clean(&message),
        }),
        ShellFrame::Msg(Response::Error { message, .. }) => Err(Error::guest(format!(
            "starting the shell: {}",
            clean(&message)
        ))),
        _ => Err(Error::guest("unexpected answer to Shell")),
    }
}

/// Guest text made safe to print: control characters replaced, length bounded.
fn clean(s: &str) -> String {
    crate::terminal::printable_max(s, MAX_BANNER_FIELD)
}

/// The banner printed on stderr before an interactive session.
fn banner(image: &Path, mounts: &[ShellMount], overlay: bool) -> String {
    let shown: Vec<String> = mounts
        .iter()
        .take(MAX_BANNER_MOUNTS)
        .map(|m| {
            let ro = if overlay && !m.writable {
                ", read-only"
            } else {
                ""
            };
            format!(
                "{} ({}) at {}{ro}",
                clean(&m.device),
                clean(&m.fstype),
                clean(&m.path)
            )
        })
        .collect();
    let what = if shown.is_empty() {
        "nothing mounted".to_string()
    } else {
        shown.join(", ")
    };
    let writes = if overlay {
        "writable: changes go to a throwaway copy-on-write file on the host and vanish when the shell ends"
    } else {
        "read-only; /tmp is a RAM disk for scratch files"
    };
    // Raw mode is not on yet, but the guest's output will be: end lines with CR LF.
    format!(
        "imgsafe: shell inside the appliance for {}\r\nimgsafe: {what}, {writes}\r\nimgsafe: the image file is never written. Leave with `exit` or Ctrl-D.\r\n",
        image.display()
    )
}

/// Move bytes until the shell exits: guest output to stdout/stderr on a thread, host
/// stdin and resizes to the guest here. Returns the shell's status after `ShellDone`.
fn pump<R: io::Read + Send, W: Write>(
    r: &mut R,
    w: &mut W,
    winch: Option<&term::Winch>,
) -> Result<ShellStatus> {
    let (wake_r, wake_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| ShellError::Pipe(e.into()))?;
    std::thread::scope(|scope| {
        let output = scope.spawn(move || {
            let r = copy_output(r, &wake_w);
            // Wake the input loop; the write end closes with this thread.
            drop(wake_w);
            r
        });
        let input = copy_input(w, winch, wake_r.as_fd());
        let status = output
            .join()
            .unwrap_or_else(|_| Err(ShellError::OutputThread.into()));
        let status = status?;
        input?;
        write_msg(w, &Request::ShellDone)
            .and_then(|()| w.flush())
            .map_err(send_error)?;
        Ok(status)
    })
}

/// Guest frames to stdout and stderr until `ShellExit`. When stdout fails, one byte on
/// `wake` asks the input side to tell the guest (see [`copy_input`]).
fn copy_output<R: io::Read>(r: &mut R, wake: &OwnedFd) -> Result<ShellStatus> {
    let (mut out, mut err) = (io::stdout().lock(), io::stderr().lock());
    let mut out_failed: Option<io::Error> = None;
    loop {
        match read_shell_frame::<_, Response>(r).map_err(channel_error)? {
            // After a local write error keep reading, so the channel stays in step and
            // the shell's status still arrives.
            ShellFrame::Data(d) if out_failed.is_none() => {
                if let Err(e) = out.write_all(&d).and_then(|()| out.flush()) {
                    out_failed = Some(e);
                    // If this fails the input side still ends when this thread
                    // closes `wake`.
                    let _ = rustix::io::write(wake, &[1]);
                }
            }
            ShellFrame::Data(_) => {}
            ShellFrame::Stderr(d) => {
                let _ = err.write_all(&d).and_then(|()| err.flush());
            }
            ShellFrame::Msg(Response::ShellExit { status }) => {
                return match out_failed {
                    Some(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Error::Output(e)),
                    _ => Ok(status),
                };
            }
            ShellFrame::Msg(_) => {
                return Err(Error::guest("unexpected message during the shell session"))
            }
        }
    }
}

/// Host stdin (and resizes) to the guest until `wake` says the output side ended.
fn copy_input<W: Write>(
    w: &mut W,
    winch: Option<&term::Winch>,
    wake: BorrowedFd<'_>,
) -> Result<()> {
    let stdin = io::stdin();
    let stdin = stdin.as_fd();
    let mut stdin_open = true;
    let mut buf = vec![0u8; INPUT_CHUNK];
    loop {
        let mut fds = vec![PollFd::from_borrowed_fd(wake, PollFlags::IN)];
        if let Some(wn) = winch {
            fds.push(PollFd::from_borrowed_fd(wn.fd(), PollFlags::IN));
        }
        if stdin_open {
            fds.push(PollFd::from_borrowed_fd(stdin, PollFlags::IN));
        }
        if rustix::event::poll(&mut fds, None).is_err() {
            // A signal: SIGTERM/SIGHUP killed QEMU and the output side will end.
            if vm::reaper::interrupted() {
                return Ok(());
            }
            continue;
        }
        let ready = |i: usize| !fds[i].revents().is_empty();
        if ready(0) {
            let mut byte = [0u8; 1];
            if !matches!(rustix::io::read(wake, &mut byte), Ok(1)) {
                // EOF: the output side has ended.
                return Ok(());
            }
            // Our stdout is gone: have the guest end the commands writing to it.
            write_msg(w, &Request::ShellOutputClosed)
                .and_then(|()| w.flush())
                .map_err(send_error)?;
            continue;
        }
        if let Some(wn) = winch {
            if ready(1) {
                wn.drain();
                if let Some((rows, cols)) = term::window_size(libc::STDIN_FILENO) {
                    write_msg(w, &Request::ShellResize { rows, cols })
                        .and_then(|()| w.flush())
                        .map_err(send_error)?;
                }
            }
        }
        if stdin_open && ready(fds.len() - 1) {
            match rustix::io::read(stdin, &mut buf) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    write_msg(w, &Request::ShellEof)
                        .and_then(|()| w.flush())
                        .map_err(send_error)?;
                }
                Ok(n) => write_data(w, &buf[..n])
                    .and_then(|()| w.flush())
                    .map_err(send_error)?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ShellStatus::Exited(0)), 0);
        assert_eq!(exit_code(ShellStatus::Exited(3)), 3);
        assert_eq!(exit_code(ShellStatus::Signaled(9)), 137);
        assert_eq!(exit_code(ShellStatus::Exited(-1)), BAD_STATUS);
        assert_eq!(exit_code(ShellStatus::Signaled(1000)), BAD_STATUS);
    }

    #[test]
    fn banner_names_the_mounts_and_neutralises_guest_text() {
        let mounts = vec![ShellMount {
            device: "/dev/vda\x1b[2J".into(),
            path: "/sysroot".into(),
            fstype: "ext4".into(),
            writable: false,
        }];

        let b = banner(Path::new("disk.img"), &mounts, false);

        assert!(
            b.contains("disk.img") && b.contains("/dev/vda?[2J (ext4) at /sysroot"),
            "{b}"
        );
        assert!(b.contains("read-only") && b.contains("Ctrl-D"), "{b}");
        assert!(!b.contains('\x1b'));
    }

    #[test]
    fn output_frames_go_to_their_streams_until_exit() {
        let mut buf = Vec::new();
        write_data(&mut buf, b"x").unwrap();
        write_msg(
            &mut buf,
            &Response::ShellExit {
                status: ShellStatus::Exited(5),
            },
        )
        .unwrap();

        let (_wake_r, wake_w) = rustix::pipe::pipe().unwrap();

        let st = copy_output(&mut buf.as_slice(), &wake_w).unwrap();

        assert_eq!(st, ShellStatus::Exited(5));
    }

    #[test]
    fn banner_says_which_mounts_an_overlay_could_not_cover() {
        let mount = |path: &str, fstype: &str, writable| ShellMount {
            device: "/dev/vda1".into(),
            path: path.into(),
            fstype: fstype.into(),
            writable,
        };
        let mounts = vec![
            mount("/sysroot", "ext4", true),
            mount("/sysroot/efi", "vfat", false),
        ];

        let b = banner(Path::new("disk.img"), &mounts, true);

        assert!(b.contains("(ext4) at /sysroot, "), "{b}");
        assert!(b.contains("(vfat) at /sysroot/efi, read-only,"), "{b}");
    }

    #[test]
    fn a_refused_start_is_a_filesystem_error() {
        let mut answer = Vec::new();
        let refusal = Response::Error {
            kind: ErrorKind::Mount,
            message: "nothing to run the shell in".into(),
        };
        write_msg(&mut answer, &refusal).unwrap();
        let mut sent = Vec::new();
        let start = ShellStart {
            command: None,
            tty: None,
            term: None,
        };

        let err = start_shell(&mut answer.as_slice(), &mut sent, start).unwrap_err();

        assert_eq!(err.exit_code(), crate::error::exit::FILESYSTEM);
        assert!(!sent.is_empty());
    }
}
