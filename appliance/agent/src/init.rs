//! PID 1 duties: mount the pseudo filesystems, load modules, reap orphans, find the
//! host channel, and power off — never exit, since PID 1 exiting panics the kernel.

use crate::error::errno_text;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File listing the modules to load, absolute .ko paths in dependency order.
const MODULE_LIST: &str = "/etc/imgsafe/modules";
/// How long to wait for the virtio-serial port to appear.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for the port.
const PORT_POLL: Duration = Duration::from_millis(20);
/// finit_module flag: the file is compressed and the kernel should decompress it (5.17+).
const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;
/// Kernel command-line switch that logs each request to the console.
pub const DEBUG_FLAG: &str = "imgsafe.debug=1";

/// Write one line to the console (stderr is /dev/console once [`console`] ran).
pub fn log(msg: &str) {
    eprintln!("imgsafe-agent: {msg}");
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// mount(2) with no data; EBUSY (already mounted) counts as success.
fn mount_fs(fstype: &str, target: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (src, tgt, ty, d) = (c(fstype), c(target), c(fstype), c(data));
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            flags,
            d.as_ptr().cast(),
        )
    };
    let err = io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(io::Error::new(
            err.kind(),
            format!("mounting {fstype} on {target}: {}", errno_text(&err)),
        ))
    }
}

/// Mount devtmpfs and make /dev/console fds 0, 1 and 2 (the kernel could not open it if
/// the initramfs has no /dev/console node).
fn console() -> io::Result<()> {
    mount_fs("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755")?;
    let f = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")?;
    for fd in 0..3 {
        // SAFETY: dup2 on an fd we own onto the standard fds.
        unsafe { libc::dup2(f.as_raw_fd(), fd) };
    }
    Ok(())
}

/// Mount the pseudo filesystems the agent and a later shell need.
fn mounts() -> io::Result<()> {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount_fs("proc", "/proc", nosuid_nodev | libc::MS_NOEXEC, "")?;
    mount_fs("sysfs", "/sys", nosuid_nodev | libc::MS_NOEXEC, "")?;
    mount_fs("tmpfs", "/tmp", nosuid_nodev, "mode=1777")?;
    mount_fs("tmpfs", "/run", nosuid_nodev, "mode=0755")?;
    mount_fs(
        "devpts",
        "/dev/pts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    )?;
    Ok(())
}

/// Load one module with finit_module(2); EEXIST (built in or already loaded) is fine.
fn load_module(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    let name = path.as_os_str().as_bytes();
    let compressed = [&b".xz"[..], b".zst", b".gz"]
        .iter()
        .any(|ext| name.ends_with(ext));
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = c("");
    // SAFETY: fd is open for the duration; params is a valid empty string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    let err = io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Load every module in [`MODULE_LIST`]; failures are logged, not fatal (the module may
/// be for hardware this VM does not have).
fn load_modules() {
    load_module_list(Path::new(MODULE_LIST));
}

/// Where the host lists, per filesystem type, the modules that type needs (in load
/// order). They are loaded only when such a filesystem is mounted: loading xfs and
/// btrfs under TCG costs hundreds of milliseconds that most commands do not need.
pub const FS_MODULE_DIR: &str = "/etc/imgsafe/fs";

/// Load the modules a filesystem type needs, if the appliance lists any for it (a
/// missing list means the driver is built in, or unknown and the mount will say so).
pub fn load_fs_modules(fstype: &str) {
    if fstype
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        load_module_list(&Path::new(FS_MODULE_DIR).join(fstype));
    }
}

/// Load every module listed in `file`, one absolute path a line.
fn load_module_list(file: &Path) {
    let list = std::fs::read(file).unwrap_or_default();
    for line in list.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let path = Path::new(std::ffi::OsStr::from_bytes(line));
        if let Err(e) = load_module(path) {
            log(&format!(
                "loading module {}: {}",
                path.display(),
                errno_text(&e)
            ));
        }
    }
}

/// Reap every child that exits (orphans are re-parented to PID 1). SIGCHLD is blocked
/// in every thread and waited for synchronously by one reaper thread.
fn start_reaper() {
    // SAFETY: signal-set manipulation on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(|| loop {
        // SAFETY: as above; waitpid with WNOHANG on any child.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            let mut status = 0;
            loop {
                let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if pid <= 0 {
                    break;
                }
                remember_reaped(pid, status);
            }
        }
    });
}

/// Most exit statuses the reaper keeps for children whose parent thread was too late.
const MAX_REAPED: usize = 64;

/// Exit statuses (as waitpid gives them) of children the reaper collected, newest last.
static REAPED: std::sync::Mutex<Vec<(libc::pid_t, libc::c_int)>> =
    std::sync::Mutex::new(Vec::new());

fn remember_reaped(pid: libc::pid_t, status: libc::c_int) {
    if let Ok(mut r) = REAPED.lock() {
        if r.len() >= MAX_REAPED {
            r.remove(0);
        }
        r.push((pid, status));
    }
}

/// The exit code of child `pid` if the reaper thread collected it before its parent's
/// wait did (which then failed with ECHILD): Some(code) when it exited, Some(128 + N)
/// when killed by signal N. Waits briefly, since the reaper records it just after.
pub fn reaped_exit_code(pid: u32) -> Option<i32> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    for _ in 0..100 {
        if let Ok(mut r) = REAPED.lock() {
            if let Some(i) = r.iter().position(|(p, _)| *p == pid) {
                let (_, status) = r.remove(i);
                return Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    None
}

/// The /dev node of the virtio-serial port named `name`, from /sys/class/virtio-ports.
fn find_port(name: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    rd.filter_map(Result::ok).find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim_end() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Wait (bounded) for the host channel and open it read-write.
fn open_port() -> Result<File, String> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find_port(imgsafe_proto::PORT_NAME) {
            match File::options()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(&dev)
            {
                Ok(f) => return Ok(f),
                Err(e) if start.elapsed() > PORT_WAIT => {
                    return Err(format!("opening {}: {}", dev.display(), errno_text(&e)))
                }
                Err(_) => {}
            }
        }
        if start.elapsed() > PORT_WAIT {
            return Err(format!(
                "virtio-serial port {} did not appear within {PORT_WAIT:?}",
                imgsafe_proto::PORT_NAME
            ));
        }
        std::thread::sleep(PORT_POLL);
    }
}

/// Whether the kernel command line asks for request logging.
pub fn debug_requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|s| s.split_whitespace().any(|w| w == DEBUG_FLAG))
        .unwrap_or(false)
}

/// Seconds since the guest kernel started (CLOCK_BOOTTIME), the clock of the kernel's
/// own log timestamps, so boot steps logged with it line up with the kernel's.
fn uptime() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Set up the guest as init and return the host channel.
pub fn boot() -> Result<File, String> {
    let started = uptime();
    if let Err(e) = console() {
        // Keep going: without a console we only lose log lines.
        log(&format!("console: {e}"));
    }
    // Milestones go to the console on every boot (two short lines), so that a guest
    // that never answers says how far it got in the host's error message: nothing
    // (the kernel), "init" (mounts or modules), or "port open" (the handshake).
    log(&format!("init at {started:.3}s"));
    if !Path::new(imgsafe_proto::INITRAMFS_COMPLETE).exists() {
        return Err(format!(
            "the initramfs was not unpacked whole ({} is missing): the guest has too \
             little memory for it",
            imgsafe_proto::INITRAMFS_COMPLETE
        ));
    }
    mounts().map_err(|e| e.to_string())?;
    start_reaper();
    let mounted = uptime();
    load_modules();
    let loaded = uptime();
    let port = open_port();
    log(&format!(
        "port open at {:.3}s (mounts until {mounted:.3}s, modules until {loaded:.3}s)",
        uptime()
    ));
    port
}

/// Sync, unmount the image's filesystems and power off. Never returns.
pub fn power_off(sysroot: &Path) -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe { libc::sync() };
    crate::mount::unmount_all(sysroot);
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot failed: exiting PID 1 panics the kernel, and panic=-1 resets the VM,
    // which the host treats as the end of the appliance too.
    log(&format!(
        "power off failed: {}",
        errno_text(&io::Error::last_os_error())
    ));
    std::process::exit(1)
}
