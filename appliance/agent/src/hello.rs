//! `Hello`: start of a session. The same guest may answer many sessions, because the
//! host restores it from a saved state taken right after its first hello; so each hello
//! makes it fresh (entropy, clock) and waits for the disks the host plugged in after
//! the restore.

use crate::devices::DeviceRoots;
use crate::error::OpError;
use imgsafe_proto::{valid_disk_serial, ErrorKind, WallClock, MAX_ENTROPY, MAX_HELLO_DISKS};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the disks may take to appear after a PCI rescan (they take ~0.1 s under
/// TCG; the bound is for a host so busy that the guest barely runs).
pub const DISK_WAIT: Duration = Duration::from_secs(20);
/// Poll interval while waiting for the disks.
const DISK_POLL: Duration = Duration::from_millis(2);
/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])` in linux/random.h: add bytes to the input
/// pool and credit them as entropy.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`, `_IO('R', 0x07)`: reseed the CRNG from the input pool now, so the
/// next random bytes no longer follow from the saved state's pool.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Make the guest fresh: credit `entropy` to the kernel's pool, reseed the CRNG and set
/// the clock. Failures are logged only: a guest that cannot do this is still usable
/// (the host never trusts it for randomness or time).
pub fn refresh(entropy: &[u8], time: WallClock, log: &dyn Fn(&str)) {
    if !entropy.is_empty() {
        if let Err(e) = add_entropy(&entropy[..entropy.len().min(MAX_ENTROPY)]) {
            log(&format!("adding entropy: {e}"));
        }
    }
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(time.secs).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(time.nanos.min(999_999_999) as i32),
    };
    // SAFETY: clock_settime reads the timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        log(&format!(
            "setting the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    let bits = i32::try_from(bytes.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // The ioctl reads whole u32 words.
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    let f = File::options().write(true).open("/dev/urandom")?;
    // SAFETY: the buffer is a valid rand_pool_info of buf_size bytes and outlives the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until a block device with each of `serials` exists. A disk plugged in after a
/// restore is not seen by the guest on its own (no hot-plug event is sent, which would
/// cost the PCIe slot's settle delays), so the PCI buses are rescanned once first.
pub fn wait_for_disks(
    roots: &DeviceRoots,
    serials: &[String],
    timeout: Duration,
) -> Result<(), OpError> {
    if serials.len() > MAX_HELLO_DISKS || !serials.iter().all(|s| valid_disk_serial(s)) {
        return Err(OpError::new(
            ErrorKind::BadRequest,
            "bad list of disks to wait for",
        ));
    }
    let missing = |roots: &DeviceRoots| -> Vec<&String> {
        let present: Vec<String> = present_disks(&roots.sys)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        serials.iter().filter(|s| !present.contains(s)).collect()
    };
    let start = Instant::now();
    if missing(roots).is_empty() {
        settle(roots, serials, start, timeout)?;
        return put_in_order(roots, serials, start, timeout);
    }
    rescan(&roots.sys, &|| missing(roots).is_empty())?;
    loop {
        let left = missing(roots);
        if left.is_empty() {
            settle(roots, serials, start, timeout)?;
            return put_in_order(roots, serials, start, timeout);
        }
        if start.elapsed() > timeout {
            let names: Vec<&str> = left.iter().map(|s| s.as_str()).collect();
            return Err(OpError::new(
                ErrorKind::Other,
                format!(
                    "disk {} did not appear within {} s",
                    names.join(", "),
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(DISK_POLL);
    }
}

/// Rescan the buses behind the PCIe root ports for new devices: only those buses, so
/// the kernel does not revisit (and retry assigning windows to) everything on the
/// root bus. Where there are none to be found, the whole hierarchy. The buses are
/// rescanned in order, so that the disks are probed, and named vda, vdb, ..., in the
/// order of their root ports, as on a cold boot.
///
/// The buses are rescanned in order and the rescan stops once `all_there` says every
/// disk is present: the host plugs its disks into the first root ports, and probing
/// is synchronous, so one disk costs one bus's rescan rather than all of them (each is
/// config-space work that is slow under TCG).
fn rescan(sys: &Path, all_there: &dyn Fn() -> bool) -> Result<(), OpError> {
    let failed = |path: &Path, e: std::io::Error| {
        OpError::new(
            ErrorKind::Other,
            format!("rescanning PCI ({}): {e}", path.display()),
        )
    };
    let mut buses: Vec<std::path::PathBuf> = std::fs::read_dir(sys.join("class/pci_bus"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().ends_with(":00"))
                .map(|e| e.path().join("rescan"))
                .collect()
        })
        .unwrap_or_default();
    // Bus names are fixed-width hex (`0000:01`), so their order is the numbers'.
    buses.sort();
    if buses.is_empty() {
        let all = sys.join("bus/pci/rescan");
        return std::fs::write(&all, b"1").map_err(|e| failed(&all, e));
    }
    for bus in buses {
        std::fs::write(&bus, b"1").map_err(|e| failed(&bus, e))?;
        if all_there() {
            break;
        }
    }
    Ok(())
}

/// (name, serial) of the block devices in `sys/block` (virtio-blk exposes `serial`).
fn present_disks(sys: &Path) -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir(sys.join("block")) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| {
            let serial = std::fs::read_to_string(e.path().join("serial")).ok()?;
            Some((e.file_name().into_string().ok()?, serial.trim().to_string()))
        })
        .collect()
}

/// Make the disk with the n-th serial of `serials` the n-th virtio disk (vda, vdb, ...).
/// Disks present at boot may be probed in any order (two vCPUs probe concurrently), so
/// when the names are not in order every disk is unbound from virtio_blk and bound
/// again in order: each bind takes the lowest free index, so the names follow.
fn put_in_order(
    roots: &DeviceRoots,
    serials: &[String],
    start: Instant,
    timeout: Duration,
) -> Result<(), OpError> {
    let present = present_disks(&roots.sys);
    let mut wanted: Vec<(String, String)> = Vec::new();
    for (i, serial) in serials.iter().enumerate() {
        let Some((name, _)) = present.iter().find(|(_, s)| s == serial) else {
            return Ok(());
        };
        let Ok(letter) = u8::try_from(i).map(|i| (b'a' + i) as char) else {
            return Ok(());
        };
        wanted.push((name.clone(), format!("vd{letter}")));
    }
    if wanted.iter().all(|(have, want)| have == want) {
        return Ok(());
    }
    let driver = roots.sys.join("bus/virtio/drivers/virtio_blk");
    let failed = |what: &str, e: std::io::Error| {
        OpError::new(
            ErrorKind::Other,
            format!("putting the disks in order ({what}): {e}"),
        )
    };
    let mut devices = Vec::new();
    for (name, _) in &wanted {
        let link = std::fs::read_link(roots.sys.join("block").join(name).join("device"))
            .map_err(|e| failed(name, e))?;
        let dev = link
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        devices.push(dev);
    }
    for dev in &devices {
        std::fs::write(driver.join("unbind"), dev).map_err(|e| failed("unbind", e))?;
    }
    for dev in &devices {
        std::fs::write(driver.join("bind"), dev).map_err(|e| failed("bind", e))?;
    }
    settle(roots, serials, start, timeout)
}

/// Wait until the kernel is done with each disk of `serials`: a disk is in sysfs
/// before its partition table has been read, and while that scan runs the kernel holds
/// the disk exclusively, so that RAID assembly or LVM activation (which claim their
/// members) would fail and partitions would be missing. An exclusive open succeeds
/// once it is done; a node that does not exist is not waited for.
fn settle(
    roots: &DeviceRoots,
    serials: &[String],
    start: Instant,
    timeout: Duration,
) -> Result<(), OpError> {
    let names: Vec<String> = present_disks(&roots.sys)
        .into_iter()
        .filter(|(_, s)| serials.contains(s))
        .map(|(n, _)| n)
        .collect();
    for name in names {
        let node = roots.dev.join(&name);
        loop {
            match std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&node)
            {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                _ => break,
            }
            if start.elapsed() > timeout {
                return Err(OpError::new(
                    ErrorKind::Other,
                    format!("disk {name} stayed busy for {} s", timeout.as_secs()),
                ));
            }
            std::thread::sleep(DISK_POLL);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &Path) -> DeviceRoots {
        DeviceRoots {
            sys: dir.join("sys"),
            dev: dir.join("dev"),
        }
    }

    fn add_disk(dir: &Path, name: &str, serial: &str) {
        let d = dir.join("sys/block").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("serial"), format!("{serial}\n")).unwrap();
    }

    #[test]
    fn present_disks_need_no_rescan() {
        let dir = tempfile::tempdir().unwrap();
        add_disk(dir.path(), "vda", "imgsafe0");

        let r = wait_for_disks(&roots(dir.path()), &["imgsafe0".into()], DISK_WAIT);

        assert!(r.is_ok());
        assert!(!dir.path().join("sys/bus/pci/rescan").exists());
    }

    #[test]
    fn a_missing_disk_triggers_one_rescan_then_times_out_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci")).unwrap();
        add_disk(dir.path(), "vda", "imgsafe0");

        let err = wait_for_disks(
            &roots(dir.path()),
            &["imgsafe0".into(), "imgsafe1".into()],
            Duration::from_millis(30),
        )
        .unwrap_err();

        assert!(err.message.contains("imgsafe1"), "{}", err.message);
        assert_eq!(
            std::fs::read(dir.path().join("sys/bus/pci/rescan")).unwrap(),
            b"1"
        );
    }

    #[test]
    fn the_buses_behind_the_root_ports_are_rescanned_not_the_root_bus() {
        let dir = tempfile::tempdir().unwrap();
        for bus in ["0000:00", "0000:01", "0000:02"] {
            std::fs::create_dir_all(dir.path().join("sys/class/pci_bus").join(bus)).unwrap();
        }

        let _ = wait_for_disks(
            &roots(dir.path()),
            &["imgsafe0".into()],
            Duration::from_millis(10),
        );

        let rescanned = |bus: &str| {
            dir.path()
                .join("sys/class/pci_bus")
                .join(bus)
                .join("rescan")
                .exists()
        };
        assert!(rescanned("0000:01") && rescanned("0000:02"));
        assert!(!rescanned("0000:00"));
    }

    #[test]
    fn serials_that_are_not_short_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();

        let r = wait_for_disks(&roots(dir.path()), &["../x".into()], DISK_WAIT);

        assert_eq!(r.unwrap_err().kind, ErrorKind::BadRequest);
    }
}
