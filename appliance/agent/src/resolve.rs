//! Resolving guest paths under the sysroot, as libguestfs's `sysroot_realpath` does.
//!
//! Every path in a request is an absolute path inside the image. Intermediate symlinks
//! are followed *re-rooted* at the sysroot: an absolute target starts again at the
//! sysroot, `..` never climbs above it, and at most [`MAX_SYMLINKS`] links are followed.
//! The result contains no symlink except, when asked, the final component, so the
//! kernel never resolves an image-controlled link against the appliance's own root.

use crate::error::{shown, OpError};
use imgsafe_proto::{ErrorKind, MAX_PATH};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Most symlinks followed while resolving one path (Linux's MAXSYMLINKS).
pub const MAX_SYMLINKS: usize = 40;

/// What to do with a final component that is a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Final {
    /// Follow it, re-rooted (ReadDir, ReadFile, Walk).
    Follow,
    /// Leave it as is (Stat, ReadLink).
    Keep,
}

/// A resolved path: where it is on the appliance, and its components inside the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `root` joined with `components`; safe to hand to the kernel.
    pub host: PathBuf,
    /// Components from the image root, none of them `.`, `..` or a followed link.
    pub components: Vec<Vec<u8>>,
}

impl Resolved {
    /// The last component, empty for the image root.
    pub fn name(&self) -> Vec<u8> {
        self.components.last().cloned().unwrap_or_default()
    }
}

/// Check a request path: absolute, no NUL, at most [`MAX_PATH`] bytes.
pub fn check_request_path(path: &[u8]) -> Result<(), OpError> {
    if path.len() > MAX_PATH || path.contains(&0) {
        return Err(OpError::new(
            ErrorKind::BadRequest,
            format!("{}: path too long or contains NUL", shown(path)),
        ));
    }
    if path.first() != Some(&b'/') {
        return Err(OpError::new(
            ErrorKind::BadRequest,
            format!("{}: path is not absolute", shown(path)),
        ));
    }
    Ok(())
}

fn split(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&c| c == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
}

fn join(root: &Path, components: &[Vec<u8>]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in components {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// statfs f_type of FUSE mounts (linux/magic.h FUSE_SUPER_MAGIC): in the appliance only
/// NTFS is mounted through FUSE.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// Most directory entries looked at for one case-insensitive lookup.
const MAX_CASE_SCAN: usize = 65536;

/// On a case-insensitive filesystem (NTFS, as Windows looks names up), the one name in
/// `missing`'s directory that equals its last component ignoring case; None when the
/// directory is elsewhere, or none or several match.
fn case_insensitive_match(missing: &Path) -> Option<Vec<u8>> {
    let (dir, want) = (missing.parent()?, missing.file_name()?.to_str()?);
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != FUSE_SUPER_MAGIC {
        return None;
    }
    let fold = |s: &str| s.chars().flat_map(char::to_uppercase).collect::<String>();
    let want = fold(want);
    let mut found = None;
    for e in std::fs::read_dir(dir).ok()?.take(MAX_CASE_SCAN) {
        let name = e.ok()?.file_name();
        if name.to_str().is_some_and(|n| fold(n) == want) {
            if found.is_some() {
                return None;
            }
            found = Some(name.as_bytes().to_vec());
        }
    }
    found
}

/// Resolve `path` under `root`. Every component must exist; intermediate ones must be
/// directories (after following links).
pub fn resolve(root: &Path, path: &[u8], last: Final) -> Result<Resolved, OpError> {
    resolve_with(root, path, last, |_| Ok(false))
}

/// Resolve `path` under `root`, creating missing directories (a mountpoint, `mkdir -p`).
pub fn resolve_creating(root: &Path, path: &[u8]) -> Result<Resolved, OpError> {
    resolve_with(root, path, Final::Follow, |p| {
        // On a read-only filesystem the directory simply does not exist: say that,
        // not "read-only file system".
        std::fs::create_dir(p)
            .map(|_| true)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::EROFS) => Ok(false),
                _ => Err(e),
            })
    })
}

/// The resolver; `missing` is called for a component that does not exist and returns
/// whether it created it.
fn resolve_with(
    root: &Path,
    path: &[u8],
    last: Final,
    missing: impl Fn(&Path) -> io::Result<bool>,
) -> Result<Resolved, OpError> {
    check_request_path(path)?;
    let mut pending: VecDeque<Vec<u8>> = split(path).collect();
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        if c == b".." {
            done.pop();
            continue;
        }
        let is_last = pending.is_empty();
        done.push(c);
        let mut host = join(root, &done);
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(real) = case_insensitive_match(&host) {
                    host.set_file_name(OsStr::from_bytes(&real));
                    if let Some(last) = done.last_mut() {
                        *last = real;
                    }
                    std::fs::symlink_metadata(&host).map_err(|e| OpError::io(path, &e))?
                } else if missing(&host).map_err(|e| OpError::io(path, &e))? {
                    std::fs::symlink_metadata(&host).map_err(|e| OpError::io(path, &e))?
                } else {
                    return Err(OpError::io(path, &e));
                }
            }
            Err(e) => return Err(OpError::io(path, &e)),
        };
        if meta.file_type().is_symlink() && (!is_last || last == Final::Follow) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(OpError::new(
                    ErrorKind::TooManyLinks,
                    format!("{}: too many levels of symbolic links", shown(path)),
                ));
            }
            let target = std::fs::read_link(&host).map_err(|e| OpError::io(path, &e))?;
            let target = target.as_os_str().as_bytes();
            done.pop();
            if target.first() == Some(&b'/') {
                done.clear();
            }
            for t in split(target).collect::<Vec<_>>().into_iter().rev() {
                pending.push_front(t);
            }
        } else if !is_last && !meta.is_dir() {
            return Err(OpError::new(
                ErrorKind::NotDirectory,
                format!("{}: not a directory", shown(path)),
            ));
        }
    }
    Ok(Resolved {
        host: join(root, &done),
        components: done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A temp dir standing in for /sysroot, with a file outside it as bait.
    fn sysroot() -> (tempfile::TempDir, PathBuf) {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("sysroot");
        fs::create_dir_all(root.join("etc/sub")).unwrap();
        fs::write(root.join("etc/passwd"), b"root:x:0:0\n").unwrap();
        fs::write(top.path().join("secret"), b"host file\n").unwrap();
        (top, root)
    }

    fn comps(r: &Resolved) -> Vec<&[u8]> {
        r.components.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn plain_path_resolves_below_root() {
        let (_t, root) = sysroot();

        let r = resolve(&root, b"/etc//./passwd", Final::Keep).unwrap();

        assert_eq!(r.host, root.join("etc/passwd"));
        assert_eq!(comps(&r), vec![&b"etc"[..], b"passwd"]);
    }

    #[test]
    fn dotdot_never_climbs_above_root() {
        let (_t, root) = sysroot();

        let r = resolve(&root, b"/../../etc/../../etc/sub/../passwd", Final::Keep).unwrap();
        let escape = resolve(&root, b"/../secret", Final::Keep).unwrap_err();

        assert_eq!(r.host, root.join("etc/passwd"));
        assert_eq!(escape.kind, ErrorKind::NotFound);
    }

    #[test]
    fn absolute_symlink_is_rerooted() {
        let (_t, root) = sysroot();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("/secret", root.join("bait")).unwrap();

        let r = resolve(&root, b"/abs/passwd", Final::Keep).unwrap();
        let bait = resolve(&root, b"/bait", Final::Follow).unwrap_err();

        assert_eq!(r.host, root.join("etc/passwd"));
        assert_eq!(bait.kind, ErrorKind::NotFound);
    }

    #[test]
    fn relative_symlink_with_dotdot_escape_stays_inside() {
        let (_t, root) = sysroot();
        symlink("../../../../etc", root.join("etc/sub/up")).unwrap();

        let r = resolve(&root, b"/etc/sub/up/passwd", Final::Keep).unwrap();

        assert_eq!(r.host, root.join("etc/passwd"));
    }

    #[test]
    fn final_symlink_followed_only_when_asked() {
        let (_t, root) = sysroot();
        symlink("etc/passwd", root.join("pw")).unwrap();

        let kept = resolve(&root, b"/pw", Final::Keep).unwrap();
        let followed = resolve(&root, b"/pw", Final::Follow).unwrap();

        assert_eq!(kept.host, root.join("pw"));
        assert_eq!(followed.host, root.join("etc/passwd"));
        assert_eq!(followed.name(), b"passwd");
    }

    #[test]
    fn symlink_loop_is_refused() {
        let (_t, root) = sysroot();
        symlink("b", root.join("a")).unwrap();
        symlink("a", root.join("b")).unwrap();
        symlink("self/x", root.join("self")).unwrap();

        let loop_err = resolve(&root, b"/a", Final::Follow).unwrap_err();
        let self_err = resolve(&root, b"/self/y", Final::Keep).unwrap_err();

        assert_eq!(loop_err.kind, ErrorKind::TooManyLinks);
        assert!(
            loop_err.message.contains("too many levels"),
            "{}",
            loop_err.message
        );
        assert!(
            self_err.message.contains("too many levels"),
            "{}",
            self_err.message
        );
    }

    #[test]
    fn file_as_directory_is_not_a_directory() {
        let (_t, root) = sysroot();

        let err = resolve(&root, b"/etc/passwd/x", Final::Keep).unwrap_err();

        assert_eq!(err.kind, ErrorKind::NotDirectory);
    }

    #[test]
    fn relative_and_nul_paths_are_bad_requests() {
        let (_t, root) = sysroot();

        assert_eq!(
            resolve(&root, b"etc", Final::Keep).unwrap_err().kind,
            ErrorKind::BadRequest
        );
        assert_eq!(
            resolve(&root, b"/e\0tc", Final::Keep).unwrap_err().kind,
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn root_resolves_to_root_with_empty_name() {
        let (_t, root) = sysroot();

        let r = resolve(&root, b"/", Final::Follow).unwrap();

        assert_eq!(r.host, root);
        assert_eq!(r.name(), b"");
    }

    #[test]
    fn creating_makes_missing_dirs_without_leaving_root() {
        let (top, root) = sysroot();
        symlink("/boot", root.join("bootlink")).unwrap();

        let r = resolve_creating(&root, b"/bootlink/efi").unwrap();

        assert_eq!(r.host, root.join("boot/efi"));
        assert!(root.join("boot/efi").is_dir());
        assert!(!top.path().join("boot").exists());
    }
}
