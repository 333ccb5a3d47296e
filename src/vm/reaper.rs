//! No QEMU outlives imgsafe: a process-wide registry of live QEMU pids, and handlers
//! for SIGINT/SIGTERM/SIGHUP that kill them.
//!
//! The paths out of imgsafe and what kills QEMU on each:
//! - success, error, panic (unwinding): `Vm`'s `Drop` (SIGKILL + waitpid);
//! - SIGINT/SIGTERM/SIGHUP: the handler here SIGKILLs every registered QEMU and sets
//!   [`interrupted`]; the main flow then fails at its next agent call (the channel
//!   closes with QEMU), unwinds normally (temp dirs removed by their `Drop`) and exits
//!   130. A second signal exits at once;
//! - imgsafe killed outright (SIGKILL, abort): `PR_SET_PDEATHSIG` set in QEMU.
//!
//! The handler may only do async-signal-safe things, so the registry is a fixed
//! array of atomics (no lock, no allocation) and the handler only reads it and calls
//! `kill`. A pid is unregistered before it is reaped, so the handler can never kill a
//! recycled pid.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;

/// Most QEMU processes one imgsafe process runs at once.
pub const MAX_VMS: usize = 32;
/// Signals that interrupt imgsafe.
pub const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Live QEMU pids; 0 = free slot.
static PIDS: [AtomicI32; MAX_VMS] = [const { AtomicI32::new(0) }; MAX_VMS];
/// Set by the first signal.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Which signal that was.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Add a live QEMU pid. False if [`MAX_VMS`] are already registered.
pub fn register(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    PIDS.iter().any(|slot| {
        slot.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

/// Remove a pid. Must be called before the process is reaped.
pub fn unregister(pid: i32) {
    if pid <= 0 {
        return;
    }
    for slot in &PIDS {
        let _ = slot.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// True if `pid` is registered.
pub fn is_registered(pid: i32) -> bool {
    pid > 0 && PIDS.iter().any(|slot| slot.load(Ordering::SeqCst) == pid)
}

/// SIGKILL every registered QEMU. Async-signal-safe.
pub fn kill_all() {
    for slot in &PIDS {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe; the pid is a child not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// True once SIGINT, SIGTERM or SIGHUP has been received (after
/// [`install_signal_handlers`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The signal that interrupted imgsafe, if any.
pub fn signal() -> Option<i32> {
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Install the handlers for [`SIGNALS`] (once per process; later calls do nothing).
pub fn install_signal_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in SIGNALS {
            // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                // Restart interrupted system calls: the main flow learns about the
                // signal from the closed agent channel and `interrupted()`, not EINTR.
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
    });
}

/// The handler: kill QEMU, remember the signal; a second signal exits at once (QEMU is
/// already dead, temp dirs may be left behind).
extern "C" fn on_signal(sig: libc::c_int) {
    kill_all();
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    SIGNAL.store(sig, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn register_then_unregister() {
        let pid = 0x3fff_fff0;

        let added = register(pid);
        let present = is_registered(pid);
        unregister(pid);

        assert!(added && present && !is_registered(pid));
    }

    #[test]
    fn non_positive_pids_are_refused() {
        assert!(!register(0) && !register(-1));
    }

    #[test]
    fn kill_all_kills_registered_children() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        register(pid);

        kill_all();
        unregister(pid);

        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }
}
