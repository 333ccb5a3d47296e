//! The imgsafe guest agent.
//!
//! It is compiled into the imgsafe binary itself and copied into the appliance's
//! initramfs as `/init`, so it always travels with the host binary and always speaks
//! the same protocol version. When the binary starts as the appliance's init (see
//! [`is_appliance_init`]) it calls [`run`].

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the image's root filesystem is mounted in the guest.
pub const SYSROOT: &str = "/sysroot";
/// Pause before reading again after the host end of the port closed (it reads EOF then).
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// Whether this process is the appliance's init, so the binary must be the guest agent:
/// PID 1, started as `/init`, *and* booted with [`imgsafe_proto::APPLIANCE_MARKER`]. A container
/// entrypoint is PID 1 too, and must stay the command-line tool.
pub fn is_appliance_init() -> bool {
    std::process::id() == 1
        && std::env::var_os(imgsafe_proto::APPLIANCE_MARKER_VAR).is_some_and(|v| v == "1")
        && std::env::args_os().next().is_some_and(|a| a == "/init")
}

/// Run as the appliance's init: set up the guest, serve the host, power off.
pub fn run() -> ! {
    let sysroot = Path::new(SYSROOT);
    let port = match init::boot() {
        Ok(p) => p,
        Err(e) => {
            init::log(&format!("fatal: {e}"));
            init::power_off(sysroot);
        }
    };
    let agent = serve::Agent {
        sysroot: PathBuf::from(SYSROOT),
        devices: devices::DeviceRoots {
            sys: "/sys".into(),
            dev: "/dev".into(),
        },
        debug: init::debug_requested(),
        tools: lvm::Tools {
            lvm: Some(PathBuf::from(lvm::LVM_BINARY)),
            mdadm: Some(PathBuf::from(md::MDADM_BINARY)),
            cryptsetup: Some(PathBuf::from(luks::CRYPTSETUP_BINARY)),
        },
        disk_wait: hello::DISK_WAIT,
        is_init: true,
    };
    loop {
        let reader = port.try_clone().map(BufReader::new);
        let Ok(mut reader) = reader else {
            init::log("fatal: cannot duplicate the port descriptor");
            init::power_off(sysroot);
        };
        let mut writer = BufWriter::with_capacity(imgsafe_proto::CHUNK + 64, &port);
        match agent.serve(&mut reader, &mut writer) {
            serve::Outcome::Shutdown => init::power_off(sysroot),
            // A virtio-serial port reads EOF while the host side is not connected.
            serve::Outcome::Disconnected => std::thread::sleep(RECONNECT_PAUSE),
        }
    }
}

pub mod btrfs;
pub mod devices;
pub mod entry;
pub mod error;
pub mod extents;
pub mod hello;
pub mod init;
pub mod luks;
pub mod lvm;
pub mod md;
pub mod mount;
pub mod probe;
pub mod readdir;
pub mod readfile;
pub mod resolve;
pub mod serve;
pub mod shell;
#[cfg(test)]
mod test_tools;
pub mod tool;
pub mod walk;
