//! `Mount`: read-only, with options that never write to the image or replay a journal;
//! or, when the host put a throwaway copy-on-write layer over the disk (`shell
//! --overlay`), read-write where the filesystem allows it.

use crate::error::{errno_text, OpError};
use crate::probe::probe;
use crate::resolve::resolve_creating;
use imgsafe_proto::fstypes::fs_type;
use imgsafe_proto::ErrorKind;
use std::ffi::CStr;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;

/// mount(2) itself: the one place the agent calls it for a block filesystem.
pub(crate) fn mount_syscall(
    src: &CStr,
    dst: &CStr,
    ty: &CStr,
    flags: libc::c_ulong,
    data: &CStr,
) -> io::Result<()> {
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            ty.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Flags of every mount: read-only, and nothing in the image may run or reach a device.
const FLAGS: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;

fn cstr(s: &[u8], what: &str) -> Result<CString, OpError> {
    CString::new(s).map_err(|_| OpError::new(ErrorKind::BadRequest, format!("{what} contains NUL")))
}

/// The type the probe finds on `device`.
fn probed_type(device: &str) -> Result<String, OpError> {
    let f = File::open(device)
        .map_err(|e| OpError::new(ErrorKind::Mount, format!("{device}: {}", errno_text(&e))))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    // Block devices report size 0 through metadata; seek to the end instead.
    let size = if size == 0 {
        io::Seek::seek(&mut &f, io::SeekFrom::End(0)).unwrap_or(0)
    } else {
        size
    };
    probe(&f, size).fstype.ok_or_else(|| {
        OpError::new(
            ErrorKind::Mount,
            format!("{device}: no filesystem recognised"),
        )
    })
}

/// How to mount one device.
#[derive(Debug, Clone, Copy, Default)]
pub struct How<'a> {
    /// The type to mount it as; None = the type the probe finds.
    pub fstype: Option<&'a str>,
    /// Read-write where the filesystem allows it (over a copy-on-write layer only).
    pub writable: bool,
    /// btrfs only: the subvolume to mount instead of the default one.
    pub subvolid: Option<u64>,
}

/// Mount `device` at `sysroot` + `mountpoint`, read-only unless `how.writable` and the
/// filesystem can be written (then read-only is the fallback); returns the type used.
pub fn mount(sysroot: &Path, device: &str, mountpoint: &str, how: How) -> Result<String, OpError> {
    let How {
        fstype,
        writable,
        subvolid,
    } = how;
    if !device.starts_with("/dev/") || device.split('/').any(|c| c == "..") {
        return Err(OpError::new(
            ErrorKind::BadRequest,
            format!("{device}: not a device path"),
        ));
    }
    let fstype = match fstype {
        Some(t) => t.to_string(),
        None => probed_type(device)?,
    };
    let Some(kind) = fs_type(&fstype) else {
        return Err(OpError::new(
            ErrorKind::Mount,
            format!("{device}: {fstype} is not a filesystem imgsafe mounts"),
        ));
    };
    if subvolid.is_some() && kind.name != "btrfs" {
        return Err(OpError::new(
            ErrorKind::BadRequest,
            format!("{device}: {fstype} has no subvolumes"),
        ));
    }
    let target = resolve_creating(sysroot, mountpoint.as_bytes())
        .map_err(|e| OpError::new(ErrorKind::Mount, format!("mountpoint {}", e.message)))?;
    if let Some(program) = kind.fuse {
        crate::init::load_fs_modules(kind.name);
        let opts = kind.read_only.first().map_or("ro", |(_, o)| *o);
        if writable {
            crate::init::log(&format!("{device}: {fstype} is mounted read-only"));
        }
        fuse_mount(Path::new(program), device, &target.host, opts)?;
        return Ok(fstype);
    }
    let src = cstr(device.as_bytes(), "device")?;
    let dst = cstr(
        std::os::unix::ffi::OsStrExt::as_bytes(target.host.as_os_str()),
        "mountpoint",
    )?;
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    let rw: &[(&str, &str)] = if writable { kind.writable } else { &[] };
    let all = rw.iter().map(|a| (*a, FLAGS & !libc::MS_RDONLY));
    crate::init::load_fs_modules(kind.name);
    for ((t, opts), flags) in all.chain(kind.read_only.iter().map(|a| (*a, FLAGS))) {
        let ty = cstr(t.as_bytes(), "fstype")?;
        let opts = match subvolid {
            Some(id) if opts.is_empty() => format!("subvolid={id}"),
            Some(id) => format!("{opts},subvolid={id}"),
            None => opts.to_string(),
        };
        let data = cstr(opts.as_bytes(), "options")?;
        match mount_syscall(&src, &dst, &ty, flags, &data) {
            Ok(()) => return Ok(t.to_string()),
            Err(e) => last = e,
        }
        // A read-write attempt that fails for any reason falls back to read-only.
        let read_write = flags & libc::MS_RDONLY == 0;
        if !read_write && !matches!(last.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENODEV)) {
            break;
        }
    }
    Err(OpError::new(
        ErrorKind::Mount,
        format!(
            "mount {device} on {mountpoint} as {fstype}: {}",
            errno_text(&last)
        ),
    ))
}

/// Most bytes of a FUSE driver's complaint kept for the error message.
const MAX_FUSE_LOG: u64 = 4096;

/// Mount through a FUSE program (`PROGRAM -o OPTS DEVICE TARGET`), which mounts, goes
/// into the background to serve the filesystem, and exits 0 once it is mounted. It
/// stays read-only: `ro` is always in OPTS, and the disk itself is read-only.
fn fuse_mount(program: &Path, device: &str, target: &Path, opts: &str) -> Result<(), OpError> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    if !program.is_file() {
        return Err(OpError::new(
            ErrorKind::Mount,
            format!(
                "{device}: {} is not in the appliance: install the Debian package ntfs-3g on the host",
                program.display()
            ),
        ));
    }
    let opts = format!("{opts},nodev,nosuid");
    let mut child = Command::new(program)
        .arg("-o")
        .arg(&opts)
        .arg(device)
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            OpError::new(
                ErrorKind::Mount,
                format!("running {}: {}", program.display(), errno_text(&e)),
            )
        })?;
    let mut said = String::new();
    if let Some(err) = child.stderr.take() {
        let _ = err.take(MAX_FUSE_LOG).read_to_string(&mut said);
    }
    let failed = |why: String| {
        let said = said.lines().next().unwrap_or("").trim();
        OpError::new(ErrorKind::Mount, format!("mount {device}: {why}: {said}"))
    };
    // PID 1's reaper thread may collect the child first; then whether the mount is
    // there says how it went.
    match child.wait() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(failed(s.to_string())),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) && is_mount_point(target) => Ok(()),
        Err(e) => Err(failed(errno_text(&e))),
    }
}

/// Whether `path` is a mount point (listed in /proc/self/mounts).
fn is_mount_point(path: &Path) -> bool {
    let mounts = std::fs::read("/proc/self/mounts").unwrap_or_default();
    let want = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    mounts
        .split(|&c| c == b'\n')
        .filter_map(|l| l.split(|&c| c == b' ').nth(1))
        .any(|t| imgsafe_proto::unescape_octal(t) == want)
}

/// `Unmount`: remove every mount at or below sysroot + `mountpoint`, deepest first;
/// returns how many there were. The path is resolved like any request path, so an
/// image symlink cannot point the unmount outside the sysroot.
pub fn unmount(sysroot: &Path, mountpoint: &str) -> Result<u32, OpError> {
    let target = crate::resolve::resolve(
        sysroot,
        mountpoint.as_bytes(),
        crate::resolve::Final::Follow,
    )?;
    let n = unmount_below(&target.host);
    u32::try_from(n).map_err(|_| OpError::new(ErrorKind::Other, "too many mounts"))
}

/// Unmount everything at or below `sysroot`, deepest first (lazily if busy).
pub fn unmount_all(sysroot: &Path) {
    unmount_below(sysroot);
}

/// Unmount everything at or below `top`, deepest first (lazily if busy); returns the
/// number of mounts found.
fn unmount_below(sysroot: &Path) -> usize {
    let mounts = std::fs::read("/proc/self/mounts").unwrap_or_default();
    let root = std::os::unix::ffi::OsStrExt::as_bytes(sysroot.as_os_str());
    let mut targets: Vec<Vec<u8>> = mounts
        .split(|&c| c == b'\n')
        .filter_map(|l| l.split(|&c| c == b' ').nth(1))
        .map(imgsafe_proto::unescape_octal)
        .filter(|t| t == root || (t.starts_with(root) && t.get(root.len()) == Some(&b'/')))
        .collect();
    // /proc/self/mounts lists in mount order, so a child always follows its parent.
    targets.reverse();
    let count = targets.len();
    for t in targets {
        let Ok(c) = CString::new(t) else { continue };
        // SAFETY: c is a valid NUL-terminated path.
        unsafe {
            if libc::umount2(c.as_ptr(), 0) != 0 {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_device_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();

        let how = How {
            fstype: Some("ext4"),
            ..How::default()
        };

        let err = mount(dir.path(), "/dev/../etc/passwd", "/", how).unwrap_err();
        let err2 = mount(dir.path(), "relative", "/", how).unwrap_err();

        assert_eq!(err.kind, ErrorKind::BadRequest);
        assert_eq!(err2.kind, ErrorKind::BadRequest);
    }
}
