//! The host terminal during an interactive shell: raw mode, SIGINT left to the guest,
//! SIGWINCH turned into readable bytes on a pipe. Each is a guard restored on drop, so
//! every way out of the session (return, error, panic unwinding) restores the terminal.

use rustix::termios;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The write end of the SIGWINCH pipe (-1 = none); read by the signal handler.
static WINCH_PIPE: AtomicI32 = AtomicI32::new(-1);

/// `fd` as a borrowed fd, for the duration of one call on a process-wide fd.
fn borrowed(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: only used on the standard fds and fds the caller keeps open for the
    // call; rustix just passes the number to the syscall.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// True if `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    termios::isatty(borrowed(fd))
}

/// The size of the terminal on `fd`, if it is one and reports a non-zero size.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(borrowed(fd)).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The terminal on `fd` in raw mode until dropped.
pub struct RawMode {
    fd: RawFd,
    saved: termios::Termios,
}

impl RawMode {
    /// Switch `fd` to raw mode (no echo, no line editing, no signals from keys, no
    /// output processing): every byte goes to the guest's pty, whose line discipline
    /// does all of that instead.
    pub fn enable(fd: RawFd) -> io::Result<RawMode> {
        let saved = termios::tcgetattr(borrowed(fd))?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(borrowed(fd), termios::OptionalActions::Now, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Drain: pending output is written with the raw settings it was meant for.
        let _ = termios::tcsetattr(
            borrowed(self.fd),
            termios::OptionalActions::Drain,
            &self.saved,
        );
    }
}

/// A signal's disposition replaced until dropped.
pub struct SignalGuard {
    sig: libc::c_int,
    old: libc::sigaction,
}

impl SignalGuard {
    fn set(sig: libc::c_int, handler: libc::sighandler_t) -> SignalGuard {
        // SAFETY: zeroed sigaction structs are valid; the handler (if any) is
        // async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, &action, &mut old);
            SignalGuard { sig, old }
        }
    }

    /// Ignore SIGINT: in raw mode Ctrl-C is a byte for the guest, so a SIGINT can only
    /// come from elsewhere, and must not kill the VM under an interactive session.
    pub fn ignore_sigint() -> SignalGuard {
        SignalGuard::set(libc::SIGINT, libc::SIG_IGN)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the disposition saved in `set`.
        unsafe { libc::sigaction(self.sig, &self.old, std::ptr::null_mut()) };
    }
}

/// SIGWINCH delivered as a byte on a pipe, until dropped.
pub struct Winch {
    read: OwnedFd,
    write: OwnedFd,
    _guard: SignalGuard,
}

extern "C" fn on_winch(_: libc::c_int) {
    let fd = WINCH_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops the byte (one
        // pending byte is enough to trigger a size check).
        unsafe { libc::write(fd, b"w".as_ptr().cast(), 1) };
    }
}

impl Winch {
    /// Install the handler.
    pub fn install() -> io::Result<Winch> {
        let (read, write) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        WINCH_PIPE.store(write.as_raw_fd(), Ordering::SeqCst);
        let guard = SignalGuard::set(
            libc::SIGWINCH,
            on_winch as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        Ok(Winch {
            read,
            write,
            _guard: guard,
        })
    }

    /// The fd that becomes readable on a resize.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Empty the pipe after a wake-up.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        while rustix::io::read(&self.read, &mut buf).is_ok_and(|n| n > 0) {}
    }
}

impl Drop for Winch {
    fn drop(&mut self) {
        let _ = WINCH_PIPE.compare_exchange(
            self.write.as_raw_fd(),
            -1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{PollFd, PollFlags};

    #[test]
    fn winch_signal_makes_the_pipe_readable() {
        let w = Winch::install().unwrap();

        // SAFETY: raising a signal whose handler is installed.
        unsafe { libc::raise(libc::SIGWINCH) };

        let second = rustix::event::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        let mut p = [PollFd::from_borrowed_fd(w.fd(), PollFlags::IN)];
        assert_eq!(rustix::event::poll(&mut p, Some(&second)), Ok(1));
        w.drain();
        let mut p = [PollFd::from_borrowed_fd(w.fd(), PollFlags::IN)];
        let now = rustix::event::Timespec::default();
        assert_eq!(rustix::event::poll(&mut p, Some(&now)), Ok(0));
    }

    #[test]
    fn a_pipe_is_not_a_terminal() {
        let (r, _w) = rustix::pipe::pipe().unwrap();

        let (tty, size) = (is_tty(r.as_raw_fd()), window_size(r.as_raw_fd()));

        assert!(!tty && size.is_none());
    }
}
