//! `Shell`: busybox sh inside the appliance, on a pty (interactive) or on three pipes
//! (scripts), with its cwd at the sysroot. With `--overlay` the host has put a
//! copy-on-write layer over the disk and the filesystems are mounted read-write; the
//! shell needs nothing more for that.
//!
//! The session takes over the channel until the shell has exited: a scoped thread reads
//! the host's frames (stdin bytes, resizes, stdin EOF, the final `ShellDone`) while the
//! calling thread streams the shell's output back and waits for it to exit.
//!
//! The shell is not a child of the agent: PID 1's reaper thread reaps every child with
//! `waitpid(-1)` and would steal its exit status. A forked supervisor starts the shell,
//! waits for it and writes its pid and then its wait status to a pipe; the agent only
//! has to read that pipe (and the reaper may reap the supervisor).

use crate::error::{errno_text, OpError};
use imgsafe_proto::{
    read_shell_frame, write_data, write_msg, write_stderr, ErrorKind, FrameError, Request,
    Response, ShellFrame, ShellMount, ShellStart, ShellStatus, WinSize,
};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{kill_process, kill_process_group, waitpid, Pid, Signal, WaitOptions};
use rustix::termios::{tcsetwinsize, Winsize};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The shell binary (busybox's ash, linked as /bin/sh in the appliance).
pub const SHELL: &str = "/bin/sh";
/// HOME for the shell (created in the initramfs' RAM root if missing).
const HOME: &str = "/root";
/// PATH for the shell.
const PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
/// Prompt: says where the user is (busybox expands `\w`).
const PS1: &str = "imgsafe:\\w\\$ ";
/// Largest output chunk read from the shell and sent in one frame.
const OUTPUT_CHUNK: usize = 64 * 1024;
/// Longest TERM value passed on (anything longer is not a terminal name).
const MAX_TERM: usize = 64;

/// Run one shell session on the channel: answer `ShellStarted` (or `Error`), stream
/// until the shell exits, send `ShellExit`, and return once the host sent `ShellDone`.
/// An error means the channel itself failed.
pub fn run<R: Read + Send, W: Write>(
    sysroot: &Path,
    start: ShellStart,
    r: &mut R,
    w: &mut W,
) -> io::Result<()> {
    let mounts = mounts_below(sysroot);
    let child = match Child::spawn(sysroot, &start) {
        Ok(p) => p,
        Err(e) => {
            crate::init::log(&format!("shell: {}", e.message));
            write_msg(w, &e.response())?;
            return w.flush();
        }
    };
    write_msg(w, &Response::ShellStarted { mounts })?;
    w.flush()?;
    let Child {
        pid,
        supervisor,
        mut status,
        input,
        out,
        err,
        pty,
    } = child;
    let result = std::thread::scope(|s| {
        let reader = s.spawn(move || pump_input(r, input, pty, pid));
        let status = pump_output(w, &out, err.as_ref(), &mut status, pid, supervisor);
        let sent = status.and_then(|st| {
            write_msg(w, &Response::ShellExit { status: st })?;
            w.flush()
        });
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("shell input thread panicked")));
        sent.and(read)
    });
    result
}

/// Read the host's frames until `ShellDone`: stdin bytes go to the shell, resizes to
/// the pty. A broken channel kills the shell so the output side ends too.
fn pump_input<R: Read>(
    r: &mut R,
    input: Option<File>,
    pty: bool,
    pid: libc::pid_t,
) -> io::Result<()> {
    let mut input = input;
    loop {
        let frame = match read_shell_frame::<_, Request>(r) {
            Ok(f) => f,
            // The whole frame was consumed: skip it and stay in step.
            Err(FrameError::Malformed(_)) | Err(FrameError::UnknownKind(_)) => continue,
            Err(e) => {
                kill_session(pid);
                return Err(io::Error::other(e.to_string()));
            }
        };
        match frame {
            ShellFrame::Data(d) => {
                // A shell that closed its stdin (or exited) makes this EPIPE/EIO: from
                // then on stdin bytes are dropped, as a closed pipe would.
                if input.as_mut().is_some_and(|f| f.write_all(&d).is_err()) {
                    input = None;
                }
            }
            ShellFrame::Msg(Request::ShellResize { rows, cols }) => {
                if let (true, Some(f)) = (pty, &input) {
                    set_winsize(f, WinSize { rows, cols });
                }
            }
            // A pty has no separate EOF (the host sends ^D bytes); a pipe is closed.
            ShellFrame::Msg(Request::ShellEof) if !pty => input = None,
            ShellFrame::Msg(Request::ShellOutputClosed) => {
                // Nobody reads the output any more: the commands writing it would get
                // SIGPIPE on a local pipe, so end the group that way (the status says so).
                let sig = if pty { Signal::HUP } else { Signal::PIPE };
                signal_group(pid, sig);
            }
            ShellFrame::Msg(Request::ShellDone) => return Ok(()),
            ShellFrame::Msg(_) | ShellFrame::Stderr(_) => {}
        }
    }
}

/// Stream the shell's output until it exits, then drain what it left and reap it.
fn pump_output<W: Write>(
    w: &mut W,
    out: &File,
    err: Option<&File>,
    status: &mut File,
    pid: libc::pid_t,
    supervisor: libc::pid_t,
) -> io::Result<ShellStatus> {
    let mut open = [true, err.is_some()];
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        let streams: Vec<(usize, &File)> = [Some(out), err]
            .into_iter()
            .enumerate()
            .filter_map(|(i, f)| f.filter(|_| open[i]).map(|f| (i, f)))
            .collect();
        let mut fds = vec![pollfd(&*status)];
        fds.extend(streams.iter().map(|(_, f)| pollfd(*f)));
        if !poll(&mut fds, None)? {
            continue;
        }
        let ready: Vec<bool> = fds.iter().map(|p| !p.revents().is_empty()).collect();
        drop(fds);
        for ((i, f), &r) in streams.iter().zip(&ready[1..]) {
            if r {
                open[*i] = forward(w, f, *i == 1, &mut buf)?;
            }
        }
        if ready[0] {
            break;
        }
    }
    // The shell is gone: end its process group (pipe mode leftovers such as `sleep &`),
    // then take whatever output is already buffered, without waiting for more.
    signal_group(pid, Signal::KILL);
    for (i, f) in [Some(out), err].into_iter().enumerate() {
        let Some(f) = f else { continue };
        while open[i] {
            let mut p = [pollfd(f)];
            if !poll(&mut p, Some(&Timespec::default()))? || p[0].revents().is_empty() {
                break;
            }
            open[i] = forward(w, f, i == 1, &mut buf)?;
        }
    }
    Ok(reap(status, supervisor))
}

/// Read once from `f` and send it as a stdout or stderr frame. False at EOF (a pty
/// master reads EIO once every slave fd is closed).
fn forward<W: Write>(w: &mut W, mut f: &File, stderr: bool, buf: &mut [u8]) -> io::Result<bool> {
    let n = match f.read(buf) {
        Ok(0) => return Ok(false),
        Ok(n) => n,
        Err(e)
            if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock =>
        {
            return Ok(true)
        }
        Err(_) => return Ok(false),
    };
    if stderr {
        write_stderr(w, &buf[..n])?;
    } else {
        write_data(w, &buf[..n])?;
    }
    w.flush()?;
    Ok(true)
}

fn pollfd<F: AsFd>(f: &F) -> PollFd<'_> {
    PollFd::new(f, PollFlags::IN)
}

/// poll(2) (`None`: no timeout); false when interrupted by a signal.
fn poll(fds: &mut [PollFd<'_>], timeout: Option<&Timespec>) -> io::Result<bool> {
    match rustix::event::poll(fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Send `sig` to the process group `pid` leads (the shell, after its setsid).
fn signal_group(pid: libc::pid_t, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = kill_process_group(pid, sig);
    }
}

/// The shell's status as the supervisor reported it, then reap the supervisor (unless
/// PID 1's reaper already did). A supervisor that died without reporting (it cannot
/// fail otherwise) counts as the shell being killed.
fn reap(status: &mut File, supervisor: libc::pid_t) -> ShellStatus {
    let mut raw = [0u8; 4];
    let got = status.read_exact(&mut raw);
    // Our own child; ECHILD if the reaper thread was first.
    if let Some(pid) = Pid::from_raw(supervisor) {
        while matches!(waitpid(Some(pid), WaitOptions::empty()), Err(Errno::INTR)) {}
    }
    if got.is_err() {
        return ShellStatus::Signaled(libc::SIGKILL);
    }
    decode_status(i32::from_ne_bytes(raw))
}

/// A waitpid status as exit code or signal.
fn decode_status(st: libc::c_int) -> ShellStatus {
    if libc::WIFSIGNALED(st) {
        ShellStatus::Signaled(libc::WTERMSIG(st))
    } else {
        ShellStatus::Exited(libc::WEXITSTATUS(st))
    }
}

/// SIGKILL the shell and its process group (the host is gone).
fn kill_session(pid: libc::pid_t) {
    signal_group(pid, Signal::KILL);
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = kill_process(pid, Signal::KILL);
    }
}

fn set_winsize<F: AsFd>(fd: F, size: WinSize) {
    let ws = Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let _ = tcsetwinsize(fd, ws);
}

/// The running shell and the host-facing ends of its stdio.
struct Child {
    /// The shell (leader of its own session and process group).
    pid: libc::pid_t,
    /// The process waiting for it.
    supervisor: libc::pid_t,
    /// Where the supervisor writes the shell's wait status.
    status: File,
    /// Where stdin bytes go: the pty master, or the write end of the stdin pipe.
    input: Option<File>,
    /// The pty master, or the read end of the stdout pipe.
    out: File,
    /// The read end of the stderr pipe (pipe mode).
    err: Option<File>,
    pty: bool,
}

fn os_err(what: &str, e: io::Error) -> OpError {
    OpError::new(ErrorKind::Other, format!("{what}: {}", errno_text(&e)))
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, OpError> {
    CString::new(bytes)
        .map_err(|_| OpError::new(ErrorKind::BadRequest, format!("{what} contains a NUL byte")))
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> Result<(OwnedFd, OwnedFd), OpError> {
    rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| os_err("pipe", e.into()))
}

/// A new pty of `size`: (master, slave), both close-on-exec.
fn open_pty(size: WinSize) -> Result<(OwnedFd, OwnedFd), OpError> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(|e| os_err("opening /dev/ptmx", e.into()))?;
    let name = grantpt(&master)
        .and_then(|()| unlockpt(&master))
        .and_then(|()| ptsname(&master, Vec::new()))
        .map_err(|e| os_err("setting up the pty", e.into()))?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| os_err("opening the pty slave", e.into()))?;
    set_winsize(&master, size);
    Ok((master, slave))
}

/// TERM from the host if it looks like a terminal name.
fn term_value(term: Option<&str>) -> &str {
    term.filter(|t| !t.is_empty() && t.len() <= MAX_TERM)
        .filter(|t| {
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        })
        .unwrap_or("vt100")
}

impl Child {
    fn spawn(sysroot: &Path, start: &ShellStart) -> Result<Child, OpError> {
        let mut argv = vec![cstring(b"sh", "argv")?];
        if let Some(cmd) = &start.command {
            argv.push(cstring(b"-c", "argv")?);
            argv.push(cstring(cmd, "the command")?);
        }
        let term = match start.tty {
            Some(_) => term_value(start.term.as_deref()),
            None => "dumb",
        };
        let _ = std::fs::create_dir_all(HOME);
        let env = [
            format!("HOME={HOME}"),
            format!("PATH={PATH}"),
            format!("TERM={term}"),
            format!("PS1={PS1}"),
            "SHELL=/bin/sh".to_string(),
            "USER=root".to_string(),
            "LOGNAME=root".to_string(),
        ];
        let envp: Vec<CString> = env
            .iter()
            .map(|e| cstring(e.as_bytes(), "environment"))
            .collect::<Result<_, _>>()?;
        let cwd = cstring(sysroot.as_os_str().as_bytes(), "sysroot")?;
        let exe = cstring(SHELL.as_bytes(), "shell")?;
        match start.tty {
            Some(size) => {
                let (master, slave) = open_pty(size)?;
                let fd = slave.as_raw_fd();
                let (pid, supervisor, status) = spawn_supervised(&Exec {
                    exe: &exe,
                    argv: &argv,
                    envp: &envp,
                    cwd: &cwd,
                    stdio: [fd, fd, fd],
                    ctty: true,
                })?;
                drop(slave);
                let master = File::from(master);
                let input = master
                    .try_clone()
                    .map_err(|e| os_err("dup of the pty master", e))?;
                Ok(Child {
                    pid,
                    supervisor,
                    status,
                    input: Some(input),
                    out: master,
                    err: None,
                    pty: true,
                })
            }
            None => {
                let (in_r, in_w) = pipe()?;
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                let stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
                let (pid, supervisor, status) = spawn_supervised(&Exec {
                    exe: &exe,
                    argv: &argv,
                    envp: &envp,
                    cwd: &cwd,
                    stdio,
                    ctty: false,
                })?;
                drop((in_r, out_w, err_w));
                Ok(Child {
                    pid,
                    supervisor,
                    status,
                    input: Some(in_w.into()),
                    out: out_r.into(),
                    err: Some(err_r.into()),
                    pty: false,
                })
            }
        }
    }
}

/// What the child runs; everything is prepared before the clone so the child only
/// makes async-signal-safe system calls.
struct Exec<'a> {
    exe: &'a CString,
    argv: &'a [CString],
    envp: &'a [CString],
    cwd: &'a CString,
    /// fds that become 0, 1, 2.
    stdio: [RawFd; 3],
    /// Make stdin the controlling terminal.
    ctty: bool,
}

/// Fork the supervisor, which forks the shell (default signals, a new session, the
/// stdio fds, the cwd, exec), closes every other fd (so stdin EOF reaches the shell),
/// writes the shell's pid and later its wait status to a pipe, and exits.
/// Returns (shell pid, supervisor pid, read end of that pipe).
fn spawn_supervised(x: &Exec) -> Result<(libc::pid_t, libc::pid_t, File), OpError> {
    let argv: Vec<*const libc::c_char> = x
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = x
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    // SAFETY: an empty signal set, filled before the fork.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigemptyset(&mut empty) };
    let (status_r, status_w) = pipe()?;
    let report = status_w.as_raw_fd();
    // SAFETY: after fork (in this multi-threaded process) the children only make
    // async-signal-safe calls on data prepared above, then exec or _exit.
    let supervisor = unsafe { libc::fork() };
    if supervisor < 0 {
        return Err(os_err("starting the shell", io::Error::last_os_error()));
    }
    if supervisor == 0 {
        unsafe {
            let shell = libc::fork();
            if shell == 0 {
                for sig in 1..libc::SIGRTMIN() {
                    if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                        libc::signal(sig, libc::SIG_DFL);
                    }
                }
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                libc::setsid();
                if x.ctty {
                    libc::ioctl(x.stdio[0], libc::TIOCSCTTY, 0);
                }
                for (to, &from) in x.stdio.iter().enumerate() {
                    libc::dup2(from, to as libc::c_int);
                }
                if libc::chdir(x.cwd.as_ptr()) != 0 {
                    libc::_exit(126);
                }
                libc::execve(x.exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
            // Keep only the report pipe (and 0-2): holding the shell's stdin pipe or
            // pty open here would hide EOF and hangups from it.
            libc::syscall(libc::SYS_close_range, 3u32, (report - 1) as u32, 0u32);
            libc::syscall(libc::SYS_close_range, (report + 1) as u32, u32::MAX, 0u32);
            if shell < 0 {
                libc::_exit(1);
            }
            libc::write(report, (&shell as *const libc::pid_t).cast(), 4);
            let mut st: libc::c_int = 0;
            while libc::waitpid(shell, &mut st, 0) < 0 {
                if *libc::__errno_location() != libc::EINTR {
                    libc::_exit(1);
                }
            }
            libc::write(report, (&st as *const libc::c_int).cast(), 4);
            libc::_exit(0);
        }
    }
    drop(status_w);
    let mut status = File::from(status_r);
    let mut raw = [0u8; 4];
    if let Err(e) = status.read_exact(&mut raw) {
        return Err(os_err("starting the shell", e));
    }
    Ok((i32::from_ne_bytes(raw), supervisor, status))
}

/// Every mount at or below `sysroot`, in mount order, from /proc/self/mounts.
pub fn mounts_below(sysroot: &Path) -> Vec<ShellMount> {
    parse_mounts(
        &std::fs::read("/proc/self/mounts").unwrap_or_default(),
        sysroot.as_os_str().as_bytes(),
    )
}

fn parse_mounts(table: &[u8], root: &[u8]) -> Vec<ShellMount> {
    table
        .split(|&c| c == b'\n')
        .filter_map(|line| {
            let mut f = line
                .split(|&c| c == b' ')
                .map(imgsafe_proto::unescape_octal);
            let (device, path, fstype, options) = (f.next()?, f.next()?, f.next()?, f.next()?);
            let below =
                path == root || (path.starts_with(root) && path.get(root.len()) == Some(&b'/'));
            let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
            below.then(|| ShellMount {
                device: text(device),
                path: text(path),
                fstype: text(fstype),
                writable: options.split(|&c| c == b',').next() == Some(b"rw"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Run a session in a thread against a temp sysroot; the host end is returned.
    fn session(
        start: ShellStart,
    ) -> (
        UnixStream,
        std::thread::JoinHandle<io::Result<()>>,
        tempfile::TempDir,
    ) {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().to_path_buf();
        let (host, guest) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut r = io::BufReader::new(guest.try_clone().unwrap());
            let mut w = io::BufWriter::new(guest);
            run(&path, start, &mut r, &mut w)
        });
        (host, t, root)
    }

    fn pipe_mode(command: Option<&[u8]>) -> ShellStart {
        ShellStart {
            command: command.map(<[u8]>::to_vec),
            tty: None,
            term: None,
        }
    }

    /// Read frames until ShellExit: (stdout, stderr, status); then send ShellDone.
    fn collect(host: &mut UnixStream) -> (Vec<u8>, Vec<u8>, ShellStatus) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match read_shell_frame::<_, Response>(host).unwrap() {
                ShellFrame::Data(d) => out.extend(d),
                ShellFrame::Stderr(d) => err.extend(d),
                ShellFrame::Msg(Response::ShellStarted { .. }) => {}
                ShellFrame::Msg(Response::ShellExit { status }) => {
                    write_msg(host, &Request::ShellDone).unwrap();
                    return (out, err, status);
                }
                ShellFrame::Msg(other) => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn command_output_is_binary_safe_and_streams_stay_apart() {
        let (mut host, t, root) = session(pipe_mode(Some(
            b"printf '\\377\\000'; echo err >&2; pwd >&2; exit 7",
        )));

        let (out, err, status) = collect(&mut host);

        assert_eq!(out, b"\xff\0");
        assert_eq!(
            String::from_utf8_lossy(&err),
            format!("err\n{}\n", root.path().display())
        );
        assert_eq!(status, ShellStatus::Exited(7));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn stdin_bytes_and_eof_reach_the_command() {
        let (mut host, t, _root) = session(pipe_mode(Some(b"cat; echo end")));
        write_data(&mut host, b"line\n\xff").unwrap();
        write_msg(&mut host, &Request::ShellEof).unwrap();

        let (out, _, status) = collect(&mut host);

        assert_eq!(out, b"line\n\xffend\n");
        assert_eq!(status, ShellStatus::Exited(0));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn without_a_command_the_script_is_read_from_stdin() {
        let (mut host, t, _root) = session(pipe_mode(None));
        write_data(&mut host, b"echo one\nprintf two >&2\nexit 4\n").unwrap();
        write_msg(&mut host, &Request::ShellEof).unwrap();

        let (out, err, status) = collect(&mut host);

        assert_eq!((out, err), (b"one\n".to_vec(), b"two".to_vec()));
        assert_eq!(status, ShellStatus::Exited(4));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn death_by_signal_is_reported_as_such() {
        let (mut host, t, _root) = session(pipe_mode(Some(b"kill -9 $$")));

        let (_, _, status) = collect(&mut host);

        assert_eq!(status, ShellStatus::Signaled(libc::SIGKILL));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn pty_has_the_given_size_and_follows_resizes() {
        let start = ShellStart {
            command: Some(b"stty size; read x; stty size; exit 3".to_vec()),
            tty: Some(WinSize { rows: 24, cols: 80 }),
            term: Some("xterm".into()),
        };
        let (mut host, t, _root) = session(start);
        // Wait for the first size line before resizing, so the order is fixed.
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("24 80") {
            match read_shell_frame::<_, Response>(&mut host).unwrap() {
                ShellFrame::Data(d) => seen.extend(d),
                ShellFrame::Msg(Response::ShellStarted { .. }) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        write_msg(
            &mut host,
            &Request::ShellResize {
                rows: 50,
                cols: 132,
            },
        )
        .unwrap();
        write_data(&mut host, b"\n").unwrap();

        let (out, err, status) = collect(&mut host);

        assert!(
            String::from_utf8_lossy(&out).contains("50 132"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(err.is_empty());
        assert_eq!(status, ShellStatus::Exited(3));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn mount_table_entries_below_the_sysroot_are_listed_unescaped() {
        let table = b"rootfs / rootfs rw 0 0\n/dev/vda /sysroot ext4 ro 0 0\n/dev/vda1 /sysroot/my\\040boot vfat ro 0 0\n/dev/x /sysrootx ext4 ro 0 0\n";

        let m = parse_mounts(table, b"/sysroot");

        let paths: Vec<&str> = m.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/sysroot", "/sysroot/my boot"]);
        assert_eq!(
            (m[1].device.as_str(), m[1].fstype.as_str()),
            ("/dev/vda1", "vfat")
        );
    }

    #[test]
    fn odd_term_values_fall_back_to_vt100() {
        assert_eq!(term_value(Some("xterm-256color")), "xterm-256color");
        assert_eq!(term_value(Some("x\x1b]0;")), "vt100");
        assert_eq!(term_value(None), "vt100");
    }
}
