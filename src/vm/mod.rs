//! QEMU: typed config → argv, process lifetime, QMP.
//!
//! - [`config`]: [`VmConfig`] and the pure [`VmConfig::argv`];
//! - [`accel`]: KVM or TCG for this host and user;
//! - [`machine`]: microvm booted by qboot, or q35 where QEMU has no qboot;
//! - [`tsc`]: the host TSC rate the guest kernel needs under TCG;
//! - [`qmp`]: a small serde_json QMP client;
//! - [`process`]: [`Vm`], one QEMU process from spawn to reap;
//! - [`reaper`]: the signal handlers and registry that make sure no QEMU outlives imgsafe.
//!
//! A session's use, in order:
//!
//! ```no_run
//! # fn demo(kernel: &std::path::Path, initrd: &std::path::Path, run_dir: &std::path::Path,
//! #         nbd_socket: &std::path::Path) -> imgsafe::Result<()> {
//! use imgsafe::vm::{accel, reaper, Vm, VmConfig};
//! reaper::install_signal_handlers(); // once, early, from the main thread
//! let (accel, notice) = accel::choose()?;
//! if let Some(line) = notice {
//!     eprintln!("{line}");
//! }
//! let mut cfg = VmConfig::new(accel, kernel, initrd, run_dir); // run_dir: private temp dir
//! cfg.extra_cmdline.push("rdinit=/init".into());
//! let mut vm = Vm::launch(&cfg)?; // paused (-S), QMP connected
//! vm.attach_nbd_disk(nbd_socket, "", true)?; // NBD server must already listen
//! vm.start()?;
//! let agent = vm.connect_agent()?; // talk the agent protocol on this stream
//! // ... on any agent I/O error: vm.check_alive()? explains a dead QEMU ...
//! # drop(agent);
//! vm.shutdown(std::time::Duration::from_secs(2))?;
//! # Ok(()) }
//! ```

pub mod accel;
pub mod config;
pub mod machine;
pub mod process;
pub mod qcow2;
pub mod qmp;
pub mod reaper;
pub mod tsc;

use std::ffi::OsString;

pub use accel::AccelError;
pub use config::{Accel, DiskSpec, GuestRam, Machine, VmConfig};
pub use machine::MachineError;
pub use process::{DiskSlot, Vm, VmError, MAX_QEMU_FILE_BYTES};

/// What a setting like `IMGSAFE_ACCEL` names among `choices` (compared ignoring ASCII
/// case): `Ok(None)` when unset or empty, `Err` with the value (lossily decoded) when it
/// names none of them.
fn env_choice<T: Copy>(
    value: Option<&OsString>,
    choices: &[(&str, T)],
) -> Result<Option<T>, String> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    choices
        .iter()
        .find(|(name, _)| text.eq_ignore_ascii_case(name))
        .map(|&(_, choice)| Some(choice))
        .ok_or_else(|| text.into_owned())
}
