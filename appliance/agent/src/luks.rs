//! LUKS: containers on the disks are opened read-only with the key the host sent
//! (`Unlock`), by the host's cryptsetup copied into the appliance, through dm-crypt.
//!
//! The key reaches cryptsetup on a pipe (`--key-file=-`, its exact bytes), never on a
//! command line or in an environment, and this process wipes its own copy when done.
//! The guest's memory is never saved (a warm state is taken before any session) and
//! goes when the VM ends.

use crate::devices::{list_filesystems, DeviceRoots};
use crate::lvm::Tools;
use imgsafe_proto::{FsInfo, MAX_UNLOCKED};
use std::path::Path;

/// Where the appliance builder puts the host's `cryptsetup` binary.
pub const CRYPTSETUP_BINARY: &str = "/sbin/cryptsetup";
/// Probe type of a LUKS container.
pub const LUKS_TYPE: &str = "crypto_LUKS";
/// Prefix of the device-mapper name of an opened container (`luks-UUID`, as
/// systemd-cryptsetup names them); lvm.conf accepts PVs inside these.
pub const MAPPER_PREFIX: &str = "luks-";
/// cryptsetup's exit status for "no key available with this passphrase" (man
/// cryptsetup, RETURN CODES: 2 = permission denied / wrong passphrase).
const WRONG_KEY: i32 = 2;

/// What `Unlock` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unlocked {
    /// Containers opened (guest devices).
    pub opened: Vec<String>,
    /// Containers where the key opened no key slot.
    pub refused: Vec<String>,
}

/// Open every LUKS container with `key`: on the disks and RAID arrays, then, once the
/// volume groups are activated, on the logical volumes. Any failure other than a wrong
/// key is an error naming the container.
pub fn unlock(
    roots: &DeviceRoots,
    tools: &Tools,
    cryptsetup: Option<&Path>,
    key: &[u8],
    log: &dyn Fn(&str),
) -> Result<Unlocked, String> {
    let cryptsetup = cryptsetup.ok_or("the appliance has no cryptsetup")?;
    let mut done = Unlocked::default();
    let mut list = list_filesystems(roots);
    if crate::md::assemble_if_members(&list, tools.mdadm.as_deref(), log) {
        list = list_filesystems(roots);
    }
    let mut opened_any = open_all(&list, cryptsetup, key, &mut done)?;
    for _ in 0..2 {
        // Volume groups on what was opened, then containers on their volumes.
        list = crate::lvm::list_with_volumes(roots, tools, log);
        if !opened_any {
            break;
        }
        opened_any = open_all(&list, cryptsetup, key, &mut done)?;
    }
    Ok(done)
}

/// Open the containers of `list` not tried yet; true when one was opened.
fn open_all(
    list: &[FsInfo],
    cryptsetup: &Path,
    key: &[u8],
    done: &mut Unlocked,
) -> Result<bool, String> {
    crate::init::load_fs_modules("crypt");
    let mut any = false;
    for (i, f) in list
        .iter()
        .filter(|f| f.fstype.as_deref() == Some(LUKS_TYPE))
        .enumerate()
    {
        if done.opened.contains(&f.device) || done.refused.contains(&f.device) {
            continue;
        }
        if done.opened.len() + done.refused.len() >= MAX_UNLOCKED {
            break;
        }
        let name = mapper_name(f.uuid.as_deref(), i);
        let args = [
            "open",
            "--readonly",
            "--disable-locks",
            "--type=luks",
            "--key-file=-",
            &f.device,
            &name,
        ];
        match crate::tool::run(cryptsetup, &args, Some(key)) {
            Ok(()) => {
                done.opened.push(f.device.clone());
                any = true;
            }
            Err(e) if e.code == Some(WRONG_KEY) => done.refused.push(f.device.clone()),
            Err(e) => return Err(format!("{}: {e}", f.device)),
        }
    }
    Ok(any)
}

/// `luks-UUID` when the container's UUID is a plain one, else `luks-N`.
fn mapper_name(uuid: Option<&str>, n: usize) -> String {
    match uuid.filter(|u| {
        !u.is_empty() && u.len() <= 40 && u.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    }) {
        Some(u) => format!("{MAPPER_PREFIX}{u}"),
        None => format!("{MAPPER_PREFIX}{n}"),
    }
}

/// Overwrite `buf` with zeros in a way the compiler keeps (the key is dead after).
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, exclusive reference into `buf`.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapper_names_come_from_plain_uuids_only() {
        assert_eq!(
            mapper_name(Some("0b0a1234-5678-4abc-8def-0123456789ab"), 0),
            "luks-0b0a1234-5678-4abc-8def-0123456789ab"
        );
        assert_eq!(mapper_name(Some("../x"), 3), "luks-3");
        assert_eq!(mapper_name(None, 1), "luks-1");
    }

    #[test]
    fn wipe_zeroes_every_byte() {
        let mut k = b"secret".to_vec();

        wipe(&mut k);

        assert_eq!(k, [0u8; 6]);
    }
}
