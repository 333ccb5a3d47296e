//! One QEMU process: spawn, QMP, disk hot-plug, start, watch, shut down, always reap.

use super::config::{DiskSpec, VmConfig};
use super::qmp::{Qmp, QmpError};
use super::reaper;
use serde_json::json;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long QEMU may take to open its QMP socket (it is ready in ~0.1 s normally).
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest Unix socket path (`sun_path` is 108 bytes including the final NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// How often exit is polled while waiting.
const POLL: Duration = Duration::from_millis(5);
/// How much of the end of the console log and of QEMU's messages goes into an error.
const TAIL_BYTES: u64 = 8192;
/// Default largest file QEMU may write (RLIMIT_FSIZE, see `VmConfig::max_file_bytes`).
/// Without an overlay the only files it writes are the guest console log and its own
/// messages; a guest flooding its console (a compromised guest kernel is within the
/// threat model) would otherwise fill the host's temp directory. Past the limit the
/// kernel stops QEMU with SIGXFSZ, reported as such.
pub const MAX_QEMU_FILE_BYTES: u64 = 64 << 20;
/// What Linux prints when it panics.
const PANIC_MARK: &str = "Kernel panic - not syncing";
/// How many lines of each go into an error.
const TAIL_LINES: usize = 6;

/// A failure starting, driving or watching QEMU.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The QEMU binary is missing.
    #[error("{}: not found: install the Debian package qemu-system-x86", qemu.display())]
    QemuNotFound { qemu: PathBuf },
    /// Any other failure to start the QEMU process.
    #[error("cannot start {}: {source}", qemu.display())]
    Spawn { qemu: PathBuf, source: io::Error },
    /// A socket path does not fit in `sun_path`.
    #[error("socket path is {len} bytes, longer than a Unix socket allows ({MAX_SOCKET_PATH}): {}", path.display())]
    SocketPathTooLong { path: PathBuf, len: usize },
    /// The temporary file for QEMU's own messages could not be made.
    #[error("cannot create a temporary file for QEMU's messages: {0}")]
    MessagesFile(io::Error),
    /// The process-wide registry of live QEMUs is full.
    #[error("too many QEMU processes at once (at most {})", reaper::MAX_VMS)]
    TooManyVms,
    /// QEMU exited before it opened QMP (bad option, missing kernel file, ...).
    #[error("QEMU exited during start-up ({status}): {messages}")]
    EarlyExit { status: String, messages: String },
    /// The agent channel socket could not be connected to.
    #[error("cannot connect to the agent channel {}: {source}", path.display())]
    AgentConnect { path: PathBuf, source: io::Error },
    /// QEMU's QMP socket could not be reached.
    #[error("QEMU did not answer on QMP: {0}")]
    QmpConnect(QmpError),
    /// A QMP command failed; `step` says what imgsafe was doing.
    #[error("{step}: {source}")]
    Qmp {
        step: &'static str,
        source: QmpError,
    },
    /// Every root port already holds a disk.
    #[error("no free PCIe root port for another disk ({ports} configured)")]
    NoFreeRootPort { ports: u32 },
    /// QMP is JSON text, so paths sent over it must be UTF-8.
    #[error("path is not valid UTF-8 and cannot be sent to QEMU: {}", path.display())]
    NonUtf8Path { path: PathBuf },
    /// QEMU is gone: the guest powered off, panicked (`panic=-1` + `-no-reboot`), or
    /// QEMU failed or was killed.
    #[error("QEMU exited unexpectedly ({status}){detail}")]
    Exited { status: String, detail: String },
    /// SIGINT/SIGTERM/SIGHUP arrived while QEMU was starting.
    #[error("interrupted by a signal")]
    Interrupted,
    /// waitpid failed.
    #[error("waiting for QEMU: {0}")]
    Wait(io::Error),
    /// Saving or restoring the VM state failed.
    #[error("{step}: {what}")]
    Migration { step: &'static str, what: String },
}

/// How often a running migration is polled (saving and restoring take tens of ms).
const MIGRATION_POLL: Duration = Duration::from_millis(2);

/// A `file:` migration URI for `path` (QMP is JSON text: the path must be UTF-8).
fn file_uri(path: &Path) -> Result<String, VmError> {
    path.to_str()
        .map(|p| format!("file:{p}"))
        .ok_or_else(|| VmError::NonUtf8Path {
            path: path.to_path_buf(),
        })
}

/// Every path of a disk must be UTF-8 to be described to QEMU.
fn check_utf8(disk: &DiskSpec) -> Result<(), VmError> {
    for p in std::iter::once(&disk.nbd_socket).chain(&disk.overlay) {
        if p.to_str().is_none() {
            return Err(VmError::NonUtf8Path { path: p.clone() });
        }
    }
    Ok(())
}

/// A disk plugged into the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSlot {
    /// Block node name (`disk0`, ...).
    pub node: String,
    /// Device id (`vd0`, ...).
    pub device: String,
    /// The virtio-blk serial the guest sees (`/dev/disk/by-id/virtio-<serial>`).
    pub serial: String,
}

/// A running (or paused) QEMU. Dropping it kills and reaps QEMU if still alive.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that spawned QEMU exits, not only the
/// process: launch from a thread that lives as long as the `Vm` (the main thread).
pub struct Vm {
    child: Child,
    pid: i32,
    qmp: Option<Qmp>,
    agent_socket: PathBuf,
    console_log: Option<PathBuf>,
    /// QEMU's stdout and stderr (an unnamed temporary file).
    messages: File,
    root_ports: u32,
    disks: u32,
    exited: Option<ExitStatus>,
}

impl Vm {
    /// Spawn QEMU (paused, `-S`) and connect to its QMP socket.
    pub fn launch(cfg: &VmConfig) -> Result<Vm, VmError> {
        for disk in &cfg.disks {
            check_utf8(disk)?;
        }
        for path in [&cfg.qmp_socket, &cfg.agent_socket] {
            let len = path.as_os_str().as_bytes().len();
            if len > MAX_SOCKET_PATH {
                return Err(VmError::SocketPathTooLong {
                    path: path.clone(),
                    len,
                });
            }
        }
        let messages = tempfile::tempfile().map_err(VmError::MessagesFile)?;
        let out = messages.try_clone().map_err(VmError::MessagesFile)?;
        let err = messages.try_clone().map_err(VmError::MessagesFile)?;
        let mut command = Command::new(&cfg.qemu);
        command
            .args(cfg.argv())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: Ctrl-C on the terminal reaches imgsafe only, which
            // then tears QEMU down in order.
            .process_group(0);
        // SAFETY: getpid is async-signal-safe.
        let parent = unsafe { libc::getpid() };
        let max_file = cfg.max_file_bytes;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, setrlimit, umask, getppid), allocating nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                let file_limit = libc::rlimit {
                    rlim_cur: max_file,
                    rlim_max: max_file,
                };
                // No core dump either: it would hold guest memory and fill the disk.
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &file_limit) != 0
                    || libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // QEMU creates the QMP and agent sockets and the console log: owner-only
                // whatever umask imgsafe was started with.
                libc::umask(0o077);
                // imgsafe died before prctl took effect: do not start an orphan.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => VmError::QemuNotFound {
                qemu: cfg.qemu.clone(),
            },
            _ => VmError::Spawn {
                qemu: cfg.qemu.clone(),
                source,
            },
        })?;
        let pid = i32::try_from(child.id()).expect("Linux pids fit in i32");
        // From here on `vm`'s Drop kills and reaps QEMU on every error path.
        let mut vm = Vm {
            child,
            pid,
            qmp: None,
            agent_socket: cfg.agent_socket.clone(),
            console_log: cfg.console_log.clone(),
            messages,
            root_ports: cfg.root_ports.max(1),
            disks: u32::try_from(cfg.disks.len()).unwrap_or(u32::MAX),
            exited: None,
        };
        if !reaper::register(pid) {
            return Err(VmError::TooManyVms);
        }
        // A signal that came before `register` could not kill this QEMU: stop here.
        if reaper::interrupted() {
            return Err(VmError::Interrupted);
        }
        let connected = Qmp::connect(&cfg.qmp_socket, QMP_CONNECT_TIMEOUT, || {
            vm.poll_exit().is_none() && !reaper::interrupted()
        });
        match connected {
            Ok(qmp) => vm.qmp = Some(qmp),
            Err(_) if reaper::interrupted() => return Err(VmError::Interrupted),
            Err(e) => {
                // A QEMU that failed at start-up has written why and exited: report that.
                if let Some(status) = vm.wait_exit(Duration::from_millis(200)) {
                    let messages = vm
                        .messages_tail()
                        .unwrap_or_else(|| "no error message".to_string());
                    return Err(VmError::EarlyExit {
                        status: describe(status),
                        messages,
                    });
                }
                return Err(VmError::QmpConnect(e));
            }
        }
        Ok(vm)
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How long QEMU's busiest thread (a vCPU, when the guest runs) has waited for a
    /// CPU while runnable (`/proc/PID/task/*/schedstat`, second field): the time other
    /// processes kept the guest from running. Zero where the kernel does not say.
    pub fn run_queue_wait(&self) -> Duration {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return Duration::ZERO;
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|text| parse_schedstat(&text))
            .max_by_key(|&(run, _)| run)
            .map_or(Duration::ZERO, |(_, wait)| Duration::from_nanos(wait))
    }

    /// The Unix socket QEMU serves the agent channel on.
    pub fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    /// Connect to the agent channel. QEMU creates this socket before its QMP socket, so
    /// it exists once [`Vm::launch`] has returned; bytes written before the guest opens
    /// its port wait in the socket.
    pub fn connect_agent(&mut self) -> Result<UnixStream, VmError> {
        UnixStream::connect(&self.agent_socket).map_err(|source| match self.poll_exit() {
            Some(status) => VmError::Exited {
                status: describe(status),
                detail: self.exit_detail(),
            },
            None => VmError::AgentConnect {
                path: self.agent_socket.clone(),
                source,
            },
        })
    }

    /// The QMP session, for commands not wrapped here.
    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().expect("a launched Vm always has QMP")
    }

    /// Plug an NBD export (served on a Unix socket) into the next free root port as a
    /// virtio-blk disk. With `read_only`, the block node is opened read-only and QEMU
    /// gives the device the virtio `VIRTIO_BLK_F_RO` feature, so the guest cannot write
    /// whatever it does.
    pub fn attach_nbd_disk(
        &mut self,
        nbd_socket: &Path,
        export: &str,
        read_only: bool,
    ) -> Result<DiskSlot, VmError> {
        self.attach_disk(nbd_socket, export, read_only, None)
    }

    /// Attach an NBD export (opened read-only) under a writable copy-on-write layer in
    /// the empty qcow2 file `overlay` (see [`super::qcow2`]): the guest sees a writable
    /// disk, every write lands in `overlay`, and nothing is ever written to the export.
    pub fn attach_nbd_disk_with_overlay(
        &mut self,
        nbd_socket: &Path,
        export: &str,
        overlay: &Path,
    ) -> Result<DiskSlot, VmError> {
        self.attach_disk(nbd_socket, export, true, Some(overlay))
    }

    fn attach_disk(
        &mut self,
        nbd_socket: &Path,
        export: &str,
        read_only: bool,
        overlay: Option<&Path>,
    ) -> Result<DiskSlot, VmError> {
        if self.disks >= self.root_ports {
            return Err(VmError::NoFreeRootPort {
                ports: self.root_ports,
            });
        }
        let spec = DiskSpec {
            nbd_socket: nbd_socket.to_path_buf(),
            export: export.to_string(),
            read_only,
            overlay: overlay.map(Path::to_path_buf),
        };
        check_utf8(&spec)?;
        let n = self.disks;
        let nodes = spec.blockdevs(n).unwrap_or_default();
        for (i, node) in nodes.into_iter().enumerate() {
            let step = if i == 0 {
                "attaching the disk"
            } else {
                "adding the copy-on-write overlay"
            };
            self.qmp_step(step, "blockdev-add", node)?;
        }
        self.qmp_step("plugging the disk in", "device_add", spec.device(n))?;
        self.disks += 1;
        Ok(DiskSlot {
            node: DiskSpec::node(n),
            device: DiskSpec::device_id(n),
            serial: DiskSpec::serial(n),
        })
    }

    /// Save the VM's device state to `file` (`migrate` to a `file:` URI) and leave QEMU
    /// stopped. Guest RAM is not in it: it must live in a shared file
    /// ([`GuestRam::SaveTo`]), which `x-ignore-shared` leaves out of the stream.
    pub fn save_state(&mut self, file: &Path, timeout: Duration) -> Result<(), VmError> {
        let uri = file_uri(file)?;
        self.qmp_call("stopping the VM to save it", "stop", None)?;
        self.set_ignore_shared("saving the VM state")?;
        self.qmp_step("saving the VM state", "migrate", json!({ "uri": uri }))?;
        self.wait_migration("saving the VM state", timeout)
    }

    /// Restore the device state saved by [`Vm::save_state`] into a QEMU launched with
    /// `incoming` and the saved RAM file ([`GuestRam::RestoreFrom`](super::config::GuestRam::RestoreFrom)). The VM stays
    /// paused; [`Vm::start`] runs it.
    pub fn restore_state(&mut self, file: &Path, timeout: Duration) -> Result<(), VmError> {
        let uri = file_uri(file)?;
        self.set_ignore_shared("restoring the VM state")?;
        self.qmp_step(
            "restoring the VM state",
            "migrate-incoming",
            json!({ "uri": uri }),
        )?;
        self.wait_migration("restoring the VM state", timeout)
    }

    fn set_ignore_shared(&mut self, step: &'static str) -> Result<(), VmError> {
        self.qmp_step(
            step,
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        )
    }

    /// Poll `query-migrate` until the migration completed, failed, or `timeout` passed.
    fn wait_migration(&mut self, step: &'static str, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp_call(step, "query-migrate", None)?;
            match info.get("status").and_then(serde_json::Value::as_str) {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    let why = info
                        .get("error-desc")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or(status);
                    return Err(VmError::Migration {
                        step,
                        what: why.chars().take(500).collect(),
                    });
                }
                _ => {}
            }
            if reaper::interrupted() {
                return Err(VmError::Interrupted);
            }
            if Instant::now() >= deadline {
                return Err(VmError::Migration {
                    step,
                    what: format!("not done within {:.1} s", timeout.as_secs_f64()),
                });
            }
            std::thread::sleep(MIGRATION_POLL);
        }
    }

    /// Let the guest run (QMP `cont`).
    pub fn start(&mut self) -> Result<(), VmError> {
        self.qmp_call("starting the VM", "cont", None).map(drop)
    }

    /// `Err(VmError::Exited)` if QEMU is gone, with the end of the console log and of
    /// QEMU's messages.
    pub fn check_alive(&mut self) -> Result<(), VmError> {
        match self.poll_exit() {
            None => Ok(()),
            Some(status) => Err(VmError::Exited {
                status: describe(status),
                detail: self.exit_detail(),
            }),
        }
    }

    /// QEMU's exit status if it has exited (reaping it), else `None`.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.poll_exit()
    }

    /// Wait up to `timeout` for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Ask QEMU to quit (QMP `quit`), wait up to `timeout`, then SIGKILL. QEMU is gone
    /// and reaped when this returns.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, VmError> {
        if let Some(status) = self.poll_exit() {
            return Ok(status);
        }
        if let Some(qmp) = self.qmp.as_mut() {
            // QEMU may close the socket before the answer arrives; either way the wait
            // below decides.
            let _ = qmp.execute("quit", None);
        }
        match self.wait_exit(timeout) {
            Some(status) => Ok(status),
            None => self.kill(),
        }
    }

    /// SIGKILL QEMU and reap it.
    pub fn kill(&mut self) -> Result<ExitStatus, VmError> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        reaper::unregister(self.pid);
        // SAFETY: the pid is our child and not yet reaped, so it cannot have been recycled.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let status = self.child.wait().map_err(VmError::Wait)?;
        self.exited = Some(status);
        Ok(status)
    }

    /// The end of the guest console log (sanitized), if any.
    pub fn console_tail(&self) -> Option<String> {
        let path = self.console_log.as_ref()?;
        let mut file = File::open(path).ok()?;
        tail_lines(&mut file)
    }

    /// The guest kernel's panic line from the end of the console log, if it panicked.
    pub fn console_panic(&self) -> Option<String> {
        let path = self.console_log.as_ref()?;
        let mut file = File::open(path).ok()?;
        let lines = tail_text(&mut file)?;
        lines.into_iter().rev().find(|l| l.contains(PANIC_MARK))
    }

    /// The end of what QEMU printed on stdout/stderr (sanitized), if anything.
    pub fn messages_tail(&self) -> Option<String> {
        let mut file = self.messages.try_clone().ok()?;
        tail_lines(&mut file)
    }

    /// Run a command whose failure is a [`VmError::Qmp`] naming `step`.
    fn qmp_call(
        &mut self,
        step: &'static str,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmError> {
        let result = self.qmp().execute(command, arguments);
        result.map_err(|source| match self.poll_exit() {
            // A dead QEMU explains the failure better than the broken socket.
            Some(status) => VmError::Exited {
                status: describe(status),
                detail: self.exit_detail(),
            },
            None => VmError::Qmp { step, source },
        })
    }

    fn qmp_step(
        &mut self,
        step: &'static str,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<(), VmError> {
        self.qmp_call(step, command, Some(arguments)).map(drop)
    }

    /// Non-blocking exit check. Peeks with `WNOWAIT` first so the pid is unregistered
    /// before it is reaped (the signal handler must never see a recycled pid).
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        // SAFETY: siginfo_t is plain data; waitid only writes it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: valid pointer to a siginfo_t; P_PID with our own child's pid.
        let rc = unsafe { libc::waitid(libc::P_PID, self.pid as libc::id_t, &mut info, flags) };
        // SAFETY: si_pid is valid to read after waitid; it stays 0 if nothing changed.
        if rc != 0 || unsafe { info.si_pid() } == 0 {
            return None;
        }
        reaper::unregister(self.pid);
        match self.child.wait() {
            Ok(status) => {
                self.exited = Some(status);
                Some(status)
            }
            Err(_) => None,
        }
    }

    /// "; console: ...; QEMU: ..." from whatever is available.
    fn exit_detail(&self) -> String {
        let mut detail = String::new();
        // A panic's backtrace fills the end of the log; the panic line says more.
        if let Some(panic) = self.console_panic() {
            detail.push_str("; guest ");
            detail.push_str(panic.trim_start_matches(|c| c != 'K'));
        } else if let Some(console) = self.console_tail() {
            detail.push_str("; guest console: ");
            detail.push_str(&console);
        }
        if let Some(messages) = self.messages_tail() {
            detail.push_str("; QEMU: ");
            detail.push_str(&messages);
        }
        detail
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.kill();
        }
        reaper::unregister(self.pid);
    }
}

/// (nanoseconds run, nanoseconds waited on a run queue) from a schedstat line.
fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

/// "exit status: 1", "killed by SIGKILL", ...
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(libc::SIGXFSZ)) => {
            "stopped for writing past its file size limit (a flooded console log, or a full overlay)"
                .to_string()
        }
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// The last [`TAIL_LINES`] non-empty lines of the last [`TAIL_BYTES`] of a file, joined
/// with " | ", control characters replaced (the console text comes from the guest).
fn tail_lines(file: &mut File) -> Option<String> {
    let lines = tail_text(file)?;
    let start = lines.len().saturating_sub(TAIL_LINES);
    Some(lines[start..].join(" | ")).filter(|s| !s.is_empty())
}

/// The non-empty lines of the last [`TAIL_BYTES`] of a file, trimmed, control
/// characters replaced by `?`.
fn tail_text(file: &mut File) -> Option<Vec<String>> {
    let len = file.seek(SeekFrom::End(0)).ok()?;
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .ok()?;
    let mut bytes = Vec::new();
    file.take(TAIL_BYTES).read_to_end(&mut bytes).ok()?;
    let lines: Vec<String> = bytes
        .split(|&b| b == b'\n' || b == b'\r')
        .map(crate::terminal::printable)
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    Some(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_keeps_last_lines_and_masks_control_characters() {
        let mut file = tempfile::tempfile().unwrap();
        write!(
            file,
            "one\ntwo\n\nthree\x1b[31m\nfour\nfive\nsix\nseven\r\n"
        )
        .unwrap();

        let tail = tail_lines(&mut file);

        assert_eq!(
            tail.as_deref(),
            Some("two | three?[31m | four | five | six | seven")
        );
    }

    #[test]
    fn schedstat_gives_run_and_wait_time() {
        assert_eq!(parse_schedstat("123 456 7\n"), Some((123, 456)));
        assert_eq!(parse_schedstat("garbage"), None);
    }

    #[test]
    fn tail_of_empty_file_is_none() {
        let mut file = tempfile::tempfile().unwrap();

        assert_eq!(tail_lines(&mut file), None);
    }

    #[test]
    fn tail_reads_only_the_end_of_a_big_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![b'x'; 100_000]).unwrap();
        file.write_all(b"\nlast line\n").unwrap();

        let tail = tail_lines(&mut file).unwrap();

        assert!(
            tail.ends_with("last line") && tail.len() <= TAIL_BYTES as usize + 10,
            "{}",
            tail.len()
        );
    }

    #[test]
    fn missing_qemu_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = VmConfig::new(
            super::super::Accel::Tcg,
            Path::new("/k"),
            Path::new("/i"),
            dir.path(),
        );
        cfg.qemu = PathBuf::from("/nonexistent/qemu-system-x86_64");

        let err = Vm::launch(&cfg).err().unwrap();

        assert_eq!(
            err.to_string(),
            "/nonexistent/qemu-system-x86_64: not found: install the Debian package qemu-system-x86"
        );
    }

    #[test]
    fn overlong_socket_path_is_refused_before_spawning() {
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(120)));
        let cfg = VmConfig::new(
            super::super::Accel::Tcg,
            Path::new("/k"),
            Path::new("/i"),
            &long,
        );

        let err = Vm::launch(&cfg).err().unwrap();

        assert!(matches!(err, VmError::SocketPathTooLong { .. }), "{err}");
    }
}
