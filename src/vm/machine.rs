//! Choosing the machine type and its firmware.
//!
//! `microvm` boots fastest, but only with firmware that loads the kernel itself: qboot,
//! the firmware microvm was written for. Which firmware QEMU gives microvm by default
//! depends on how QEMU was packaged (Debian's QEMU 10 uses a SeaBIOS build that needs
//! option ROMs to boot a kernel, and with the PVH one it stalls), so imgsafe names
//! qboot explicitly. A QEMU without `qboot.rom` boots the standard `q35` PC with its
//! default firmware instead: it works everywhere, and reaches the guest's /init about
//! 0.3 s later under TCG.

use super::config::{Machine, VmConfig};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Environment variable forcing the machine type (`microvm` or `q35`).
pub const MACHINE_ENV: &str = "IMGSAFE_MACHINE";
/// qboot's file name in QEMU's firmware directory.
pub const QBOOT: &str = "qboot.rom";

/// `IMGSAFE_MACHINE` cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineError {
    /// A value imgsafe does not know.
    #[error("{MACHINE_ENV}={0:?}: expected `microvm` or `q35`")]
    Unknown(String),
    /// microvm asked for, but QEMU has no qboot to boot it with.
    #[error("{MACHINE_ENV}=microvm: QEMU's {QBOOT} firmware was not found beside {0}; use q35")]
    NoQboot(String),
}

/// Where QEMU keeps its firmware, for the QEMU binary `qemu` (a bare name is looked up
/// on `PATH`): `PREFIX/share/qemu` for a QEMU installed as `PREFIX/bin/...` (Debian's
/// `/usr/share/qemu`, a local build's `/usr/local/share/qemu`), and `pc-bios` beside a
/// binary run from QEMU's build tree.
pub fn firmware_dirs(qemu: &Path) -> Vec<PathBuf> {
    let Some(binary) = resolve(qemu) else {
        return Vec::new();
    };
    let binary = std::fs::canonicalize(&binary).unwrap_or(binary);
    let Some(bin_dir) = binary.parent() else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    if let Some(prefix) = bin_dir.parent() {
        dirs.push(prefix.join("share/qemu"));
    }
    dirs.push(bin_dir.join("pc-bios"));
    dirs
}

/// The path of `name` in QEMU's firmware directories, if it is there.
pub fn find_firmware(qemu: &Path, name: &str) -> Option<PathBuf> {
    firmware_dirs(qemu)
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `qemu` itself when it names a path, else the first executable of that name on `PATH`.
pub fn resolve(qemu: &Path) -> Option<PathBuf> {
    if qemu.components().count() > 1 {
        return Some(qemu.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(qemu))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Decide the machine and its firmware from `IMGSAFE_MACHINE` (`env`, if set) and
/// where qboot is (`qboot`, if found). Pure.
pub fn decide(
    env: Option<&OsString>,
    qboot: Option<PathBuf>,
    qemu: &Path,
) -> Result<(Machine, Option<PathBuf>), MachineError> {
    let wanted = super::env_choice(env, &[("microvm", Machine::Microvm), ("q35", Machine::Q35)])
        .map_err(MachineError::Unknown)?;
    match (wanted, qboot) {
        (Some(Machine::Q35), _) | (None, None) => Ok((Machine::Q35, None)),
        (Some(Machine::Microvm) | None, Some(qboot)) => Ok((Machine::Microvm, Some(qboot))),
        (Some(Machine::Microvm), None) => Err(MachineError::NoQboot(qemu.display().to_string())),
    }
}

/// The machine for `qemu` on this host, without looking at `IMGSAFE_MACHINE`.
pub fn auto(qemu: &Path) -> (Machine, Option<PathBuf>) {
    match find_firmware(qemu, QBOOT) {
        Some(qboot) => (Machine::Microvm, Some(qboot)),
        None => (Machine::Q35, None),
    }
}

/// Honour `IMGSAFE_MACHINE` in a config from [`VmConfig::new`], which already looked
/// for qboot ([`auto`]: its firmware is qboot exactly when QEMU has it).
pub fn apply_env(cfg: &mut VmConfig) -> Result<(), MachineError> {
    let qboot = cfg.firmware.take();
    (cfg.machine, cfg.firmware) = decide(std::env::var_os(MACHINE_ENV).as_ref(), qboot, &cfg.qemu)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "qemu-system-x86_64";

    fn qboot() -> Option<PathBuf> {
        Some(PathBuf::from("/usr/share/qemu/qboot.rom"))
    }

    #[test]
    fn microvm_with_qboot_when_qemu_has_it() {
        assert_eq!(
            decide(None, qboot(), Path::new(QEMU)),
            Ok((Machine::Microvm, qboot()))
        );
    }

    #[test]
    fn q35_when_qemu_has_no_qboot() {
        assert_eq!(
            decide(None, None, Path::new(QEMU)),
            Ok((Machine::Q35, None))
        );
    }

    #[test]
    fn env_forces_q35_even_with_qboot() {
        let env = OsString::from("Q35");
        assert_eq!(
            decide(Some(&env), qboot(), Path::new(QEMU)),
            Ok((Machine::Q35, None))
        );
    }

    #[test]
    fn env_microvm_without_qboot_is_an_error() {
        let env = OsString::from("microvm");
        let err = decide(Some(&env), None, Path::new(QEMU)).unwrap_err();
        assert_eq!(err, MachineError::NoQboot(QEMU.into()));
        assert!(err.to_string().contains("qboot.rom"), "{err}");
    }

    #[test]
    fn env_unknown_value_is_an_error() {
        let env = OsString::from("pc");
        assert_eq!(
            decide(Some(&env), qboot(), Path::new(QEMU)),
            Err(MachineError::Unknown("pc".into()))
        );
    }

    #[test]
    fn empty_env_is_ignored() {
        let env = OsString::new();
        assert_eq!(
            decide(Some(&env), None, Path::new(QEMU)),
            Ok((Machine::Q35, None))
        );
    }

    #[test]
    fn firmware_dirs_follow_the_binary_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("prefix/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let qemu = bin.join(QEMU);
        std::fs::write(&qemu, b"").unwrap();
        let share = dir.path().join("prefix/share/qemu");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join(QBOOT), b"rom").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();

        assert_eq!(
            find_firmware(&qemu, QBOOT),
            Some(root.join("prefix/share/qemu/qboot.rom"))
        );
        assert_eq!(find_firmware(&qemu, "none.rom"), None);
    }
}
