//! Writes into the destination tree, every one relative to an open directory.
//!
//! Names from the guest are single components (validated before they get here), and
//! every call below uses a directory file descriptor plus `O_NOFOLLOW` /
//! `AT_SYMLINK_NOFOLLOW`, so a symlink anywhere below the directory the user named —
//! whether the copy itself created it or it was already there — is never followed.
//! Only [`Dir::open_user`] resolves a path the ordinary way: the destination the user
//! typed may itself be a symlink to a directory, which is the user's own choice.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What is already present under a name, from `fstatat(AT_SYMLINK_NOFOLLOW)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Present {
    /// A real directory (not a symlink to one).
    Directory,
    /// A symlink, whatever it points to.
    Symlink,
    /// A regular file, device, fifo or socket.
    Other,
}

/// An open directory of the destination tree.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// Turn a -1 return into the errno error.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The timespec pair for `futimens`/`utimensat`: access time left alone (the guest does
/// not send it), modification time set.
fn times(sec: i64, nsec: u32) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as libc::c_long,
        },
    ]
}

impl Dir {
    /// Open a directory the user named, following symlinks in `path` (the user's own
    /// path, not the guest's).
    pub fn open_user(path: &Path) -> io::Result<Dir> {
        let p = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let c = cstr(p.as_os_str().as_bytes())?;
        // SAFETY: `c` is a valid NUL-terminated string; the returned fd is owned below.
        let fd = check(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        Ok(Dir {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Open the real subdirectory `name`; fails (ELOOP/ENOTDIR) on a symlink or non-directory.
    pub fn open_child(&self, name: &[u8]) -> io::Result<Dir> {
        let c = cstr(name)?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid dirfd and NUL-terminated name; the returned fd is owned below.
        let fd = check(unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) })?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(Dir {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// What is present under `name` (not following a symlink), or None.
    /// (device, inode) of `name` in this directory, not following a symlink.
    pub fn identity(&self, name: &[u8]) -> io::Result<Option<(u64, u64)>> {
        Ok(self.stat(name)?.map(|st| (st.st_dev, st.st_ino)))
    }

    pub fn lookup(&self, name: &[u8]) -> io::Result<Option<Present>> {
        Ok(self.stat(name)?.map(|st| match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Present::Directory,
            libc::S_IFLNK => Present::Symlink,
            _ => Present::Other,
        }))
    }

    /// `fstatat(AT_SYMLINK_NOFOLLOW)` of `name` in this directory; `None` if nothing is
    /// there.
    fn stat(&self, name: &[u8]) -> io::Result<Option<libc::stat>> {
        let c = cstr(name)?;
        // SAFETY: zeroed `stat` is a valid value for this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid dirfd, NUL-terminated name, and a writable stat buffer.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == -1 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(st))
    }

    /// Create the subdirectory `name` with `mode` (before the umask); EEXIST if anything
    /// is there already.
    pub fn make_dir(&self, name: &[u8], mode: u32) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid dirfd and NUL-terminated name.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })?;
        Ok(())
    }

    /// Create a new, empty regular file `name` readable and writable by the owner only;
    /// EEXIST if anything is there already (never opens an existing file or a symlink).
    pub fn create_file(&self, name: &[u8]) -> io::Result<File> {
        let c = cstr(name)?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid dirfd and NUL-terminated name; the returned fd is owned below.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Rename `from` to `to`, both in this directory. Without `replace`, EEXIST if
    /// anything is at `to`; with it, a file or symlink there is replaced atomically
    /// (the entry itself: a symlink is never followed).
    pub fn rename(&self, from: &[u8], to: &[u8], replace: bool) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        let flags = if replace { 0 } else { libc::RENAME_NOREPLACE };
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid dirfd and NUL-terminated names.
        check(unsafe { libc::renameat2(fd, f.as_ptr(), fd, t.as_ptr(), flags) })?;
        Ok(())
    }

    /// Create the symlink `name -> target`; EEXIST if anything is there already.
    pub fn make_symlink(&self, name: &[u8], target: &[u8]) -> io::Result<()> {
        let (n, t) = (cstr(name)?, cstr(target)?);
        // SAFETY: valid dirfd and NUL-terminated strings.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), n.as_ptr()) })?;
        Ok(())
    }

    /// Remove the non-directory `name` (the entry itself, never what a symlink points to).
    pub fn unlink(&self, name: &[u8]) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid dirfd and NUL-terminated name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) })?;
        Ok(())
    }

    /// Set the modification time of the entry `name` itself (a symlink is not followed).
    pub fn set_link_mtime(&self, name: &[u8], sec: i64, nsec: u32) -> io::Result<()> {
        let c = cstr(name)?;
        let ts = times(sec, nsec);
        // SAFETY: valid dirfd, NUL-terminated name, and a two-element timespec array.
        check(unsafe {
            libc::utimensat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    /// Set this directory's permission bits (umask does not apply).
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        // SAFETY: the fd is open for the duration of the call.
        check(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode as libc::mode_t) })?;
        Ok(())
    }

    /// Give this directory its final permission bits and modification time.
    pub fn set_mode_mtime(&self, mode: u32, sec: i64, nsec: u32) -> io::Result<()> {
        set_mode_mtime(self.fd.as_fd(), mode, sec, nsec)
    }
}

/// `fchmod` + `futimens` on an open file or directory.
pub fn set_mode_mtime(fd: impl AsFd, mode: u32, sec: i64, nsec: u32) -> io::Result<()> {
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: `raw` is an open fd borrowed for the duration of the calls.
    check(unsafe { libc::fchmod(raw, mode as libc::mode_t) })?;
    let ts = times(sec, nsec);
    // SAFETY: as above, with a two-element timespec array.
    check(unsafe { libc::futimens(raw, ts.as_ptr()) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn open_child_refuses_a_symlink_to_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
        let dir = Dir::open_user(tmp.path()).unwrap();

        let err = dir.open_child(b"link").unwrap_err();

        // Linux reports ENOTDIR for O_DIRECTORY|O_NOFOLLOW on a symlink; ELOOP is POSIX.
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)),
            "{err}"
        );
    }

    #[test]
    fn create_file_refuses_to_open_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        symlink(&outside, tmp.path().join("x")).unwrap();
        let dir = Dir::open_user(tmp.path()).unwrap();

        let err = dir.create_file(b"x").unwrap_err();

        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert!(!outside.exists());
    }

    #[test]
    fn lookup_reports_a_symlink_not_its_target() {
        let tmp = tempfile::tempdir().unwrap();
        symlink(tmp.path(), tmp.path().join("loop")).unwrap();
        let dir = Dir::open_user(tmp.path()).unwrap();

        let got = (dir.lookup(b"loop").unwrap(), dir.lookup(b"absent").unwrap());

        assert_eq!(got, (Some(Present::Symlink), None));
    }

    #[test]
    fn set_mode_mtime_applies_exact_bits_and_time() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_user(tmp.path()).unwrap();
        let f = dir.create_file(b"f").unwrap();

        set_mode_mtime(&f, 0o640, 1_000_000_000, 5).unwrap();

        let md = std::fs::metadata(tmp.path().join("f")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::os::unix::fs::MetadataExt::mtime(&md), 1_000_000_000);
        assert_eq!(std::os::unix::fs::MetadataExt::mtime_nsec(&md), 5);
    }
}
