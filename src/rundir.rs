//! The private run directory of one command: the NBD, QMP and agent sockets, the guest
//! console log and the overlay live there, readable by this user only whatever the umask.
//!
//! A run directory is `$TMPDIR/imgsafe-XXXXXX`, mode 0700, holding [`LOCK_FILE`] locked
//! (`flock`) for as long as its command runs. The kernel drops the lock when the process
//! dies, even by SIGKILL, so a later command can tell a stale directory (its lock can be
//! taken) from a live one, whatever PID namespace either runs in, and removes it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Name prefix of run directories in the temp dir.
pub const PREFIX: &str = "imgsafe-";
/// File in a run directory that its command holds locked while it runs.
pub const LOCK_FILE: &str = ".lock";
/// Mode of the run directory: only its owner may list or enter it.
const DIR_MODE: u32 = 0o700;
/// Mode of every file imgsafe creates in it.
const FILE_MODE: u32 = 0o600;
/// A run directory changed this recently may be one whose command is still creating its
/// lock file; sweeping leaves it for next time.
const FRESH_GRACE: Duration = Duration::from_secs(2);
/// A run directory without a lock file is a command killed between creating the
/// directory and its lock, or one of an older imgsafe that made no lock and may still be
/// running a long command; untouched this long, it is certainly stale.
const UNLOCKED_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Why the run directory could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// Creating the directory or its lock failed.
    #[error("creating a private run directory in {}: {source}", dir.display())]
    Create { dir: PathBuf, source: io::Error },
}

/// A private run directory, removed (with everything in it) on drop.
pub struct RunDir {
    // Field order: the directory goes before its lock is released.
    dir: tempfile::TempDir,
    _lock: File,
}

impl RunDir {
    /// Where the directory is.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Remove stale run directories of this user, then make a fresh one, 0700, locked.
pub fn create() -> Result<RunDir, RunDirError> {
    let parent = std::env::temp_dir();
    sweep(&parent);
    let err = |source| RunDirError::Create {
        dir: parent.clone(),
        source,
    };
    let dir = tempfile::Builder::new()
        .prefix(PREFIX)
        .permissions(fs::Permissions::from_mode(DIR_MODE))
        .tempdir_in(&parent)
        .map_err(err)?;
    // The mode given at mkdir is masked by the umask (which may leave the owner without
    // access); set it outright.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(DIR_MODE)).map_err(err)?;
    let lock = open_lock(dir.path(), true).map_err(err)?;
    if !try_lock(&lock) {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(RunDir { dir, _lock: lock })
}

/// Make `path` a directory only its owner can use (mode 0700, whatever the umask), and
/// fix the mode of one that already exists.
pub fn private_dir(path: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Remove the run directories in `parent` whose command is gone: owned by this user, a
/// real directory (not a symlink), and its lock free. Anything else is left alone, and
/// failures are ignored: sweeping is housekeeping, never a reason to fail a command.
pub fn sweep(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(PREFIX.as_bytes())
        {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        if let Some(_held) = claim_stale(&path, &meta) {
            crate::trace::note(&format!("removing stale run directory {}", path.display()));
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// If the run directory at `path` belongs to a command that is no longer running, its
/// lock, now held by us (`Some(None)` for a directory old enough without one). The lock
/// is released when dropped, after the caller's removal, so a second sweeper sees it
/// held or gone.
fn claim_stale(path: &Path, meta: &fs::Metadata) -> Option<Option<File>> {
    let age = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or_default();
    if age < FRESH_GRACE {
        return None;
    }
    match open_lock(path, false) {
        // Taking the lock proves its holder is dead.
        Ok(lock) => try_lock(&lock).then_some(Some(lock)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (age > UNLOCKED_GRACE).then_some(None),
        Err(_) => None,
    }
}

/// Open (with `create`, make) the lock file of run directory `dir`, never through a
/// symlink.
fn open_lock(dir: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(LOCK_FILE))
}

/// Take an exclusive lock on `file` without waiting; false if another holds it.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a file descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_dir_is_0700_and_locked() {
        let run = create().unwrap();

        let mode = fs::metadata(run.path()).unwrap().permissions().mode() & 0o7777;
        let lock = open_lock(run.path(), false).unwrap();

        assert_eq!(mode, 0o700);
        assert!(!try_lock(&lock));
    }

    #[test]
    fn sweeping_removes_only_unlocked_run_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join("imgsafe-dead");
        let live = tmp.path().join("imgsafe-live");
        let other = tmp.path().join("other-dead");
        for d in [&dead, &live, &other] {
            fs::create_dir(d).unwrap();
            drop(open_lock(d, true).unwrap());
            age(d, Duration::from_secs(60));
        }
        let held = open_lock(&live, false).unwrap();
        assert!(try_lock(&held));

        sweep(tmp.path());

        assert!(!dead.exists());
        assert!(live.exists());
        assert!(other.exists());
    }

    /// Date the last change of directory `d` back by `by`.
    fn age(d: &Path, by: Duration) {
        File::open(d)
            .unwrap()
            .set_modified(SystemTime::now() - by)
            .unwrap();
    }

    #[test]
    fn an_old_run_dir_without_a_lock_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("imgsafe-old");
        fs::create_dir(&old).unwrap();
        age(&old, UNLOCKED_GRACE * 2);

        sweep(tmp.path());

        assert!(!old.exists());
    }

    #[test]
    fn a_private_dir_that_exists_open_is_made_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("imgsafe");
        fs::create_dir(&cache).unwrap();
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();

        private_dir(&cache).unwrap();

        let mode = fs::metadata(&cache).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_fresh_run_dir_without_its_lock_yet_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let young = tmp.path().join("imgsafe-young");
        fs::create_dir(&young).unwrap();

        sweep(tmp.path());

        assert!(young.exists());
    }
}
