//! `Subvolumes`: the subvolumes of one btrfs, read with the kernel's own tree-search
//! ioctl on a private read-only mount of its top level (the agent never parses btrfs
//! structures from the disk itself, only the kernel's answers, and bounds those).

use crate::error::{errno_text, OpError};
use crate::probe::le64;
use imgsafe_proto::{ErrorKind, Subvolume, BTRFS_TOP_LEVEL, MAX_FRAME, MAX_PATH, MAX_SUBVOLUMES};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Where the top level is mounted while it is listed (outside the sysroot).
const TOP_MOUNT: &str = "/run/imgsafe-btrfs-top";
/// linux/btrfs.h: `_IOWR(0x94, 17, struct btrfs_ioctl_search_args)` (4096 bytes).
const IOC_TREE_SEARCH: libc::c_ulong = 0xD000_9411;
/// linux/btrfs.h: `_IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args)` (4096 bytes).
const IOC_INO_LOOKUP: libc::c_ulong = 0xD000_9412;
/// Size of both ioctls' argument structs.
const ARGS: usize = 4096;
/// struct btrfs_ioctl_search_key is 104 bytes; the result buffer follows it.
const SEARCH_KEY: usize = 104;
/// struct btrfs_ioctl_search_header: transid, objectid, offset (u64), type, len (u32).
const SEARCH_HEADER: usize = 32;
/// btrfs_tree.h object ids and key types used here.
const ROOT_TREE: u64 = 1;
const ROOT_TREE_DIR: u64 = 6;
const FIRST_FREE: u64 = 256;
const LAST_FREE: u64 = u64::MAX - 255;
const DIR_ITEM_KEY: u32 = 84;
const ROOT_BACKREF_KEY: u32 = 144;
/// Most search calls made for one listing (each returns up to a page of items).
const MAX_SEARCHES: usize = 4096;

/// A root-tree item found by [`search`]: (objectid, offset, data).
type Item = (u64, u64, Vec<u8>);

/// Every item of `key_type` in the root tree with an objectid in `objectids`, in key
/// order, through as many tree-search calls as it takes (bounded).
fn search(fd: &File, objectids: (u64, u64), key_type: u32) -> Result<Vec<Item>, OpError> {
    let mut out = Vec::new();
    let (mut obj, mut ty, mut off) = (objectids.0, key_type, 0u64);
    for _ in 0..MAX_SEARCHES {
        let mut args = vec![0u8; ARGS];
        let key: [u64; 7] = [ROOT_TREE, obj, objectids.1, off, u64::MAX, 0, u64::MAX];
        for (i, v) in key.iter().enumerate() {
            args[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        args[56..60].copy_from_slice(&ty.to_le_bytes());
        args[60..64].copy_from_slice(&key_type.to_le_bytes());
        args[64..68].copy_from_slice(&4096u32.to_le_bytes());
        // SAFETY: args is the 4096-byte struct the ioctl reads and writes.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), IOC_TREE_SEARCH, args.as_mut_ptr()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(OpError::new(
                ErrorKind::Mount,
                format!("btrfs tree search: {}", errno_text(&e)),
            ));
        }
        let count = u32::from_le_bytes(args[64..68].try_into().unwrap_or_default());
        if count == 0 {
            return Ok(out);
        }
        let mut at = SEARCH_KEY;
        let mut last = (obj, ty, off);
        for _ in 0..count {
            let Some(h) = args.get(at..at + SEARCH_HEADER) else {
                break;
            };
            let (o, offset) = (le64(h, 8), le64(h, 16));
            let t = u32::from_le_bytes(h[24..28].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(h[28..32].try_into().unwrap_or_default()) as usize;
            let Some(data) = args.get(at + SEARCH_HEADER..at + SEARCH_HEADER + len) else {
                break;
            };
            if t == key_type {
                out.push((o, offset, data.to_vec()));
            }
            last = (o, t, offset);
            at += SEARCH_HEADER + len;
        }
        if out.len() > MAX_SUBVOLUMES {
            return Err(OpError::new(ErrorKind::Mount, "too many btrfs subvolumes"));
        }
        // Continue just after the last key returned.
        (obj, ty, off) = match last {
            (o, t, u64::MAX) if t == u32::MAX => (o.saturating_add(1), 0, 0),
            (o, t, u64::MAX) => (o, t + 1, 0),
            (o, t, x) => (o, t, x + 1),
        };
        if obj > objectids.1 {
            return Ok(out);
        }
    }
    Err(OpError::new(
        ErrorKind::Mount,
        "btrfs tree search did not end",
    ))
}

/// The path of directory `dirid` inside subvolume `tree`, as the kernel resolves it
/// (`""` for the subvolume's own root, else ending in `/`).
fn ino_path(fd: &File, tree: u64, dirid: u64) -> Result<Vec<u8>, OpError> {
    let mut args = vec![0u8; ARGS];
    args[0..8].copy_from_slice(&tree.to_le_bytes());
    args[8..16].copy_from_slice(&dirid.to_le_bytes());
    // SAFETY: args is the 4096-byte struct the ioctl reads and writes.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), IOC_INO_LOOKUP, args.as_mut_ptr()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(OpError::new(
            ErrorKind::Mount,
            format!("btrfs inode lookup: {}", errno_text(&e)),
        ));
    }
    let name = &args[16..];
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    Ok(name[..end].to_vec())
}

/// Full paths from (id → (parent, path inside the parent)), parents first; a chain
/// that is too deep, loops or is not valid UTF-8 leaves that subvolume out.
fn full_paths(refs: &HashMap<u64, (u64, Vec<u8>)>) -> Vec<Subvolume> {
    let mut out = Vec::new();
    for &id in refs.keys() {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = id;
        while cur != BTRFS_TOP_LEVEL && parts.len() <= 64 {
            let Some((parent, rel)) = refs.get(&cur) else {
                break;
            };
            parts.push(rel);
            cur = *parent;
        }
        if cur != BTRFS_TOP_LEVEL {
            continue;
        }
        parts.reverse();
        let path = parts.join(&b'/');
        let ok = path.len() <= MAX_PATH && !path.contains(&0);
        if let Some(p) = String::from_utf8(path).ok().filter(|_| ok) {
            out.push(Subvolume { id, path: p });
        }
    }
    out.sort_by_key(|s| s.id);
    out
}

/// The default subvolume: the `default` dir item of the root tree directory.
fn default_subvolume(fd: &File) -> Result<u64, OpError> {
    let items = search(fd, (ROOT_TREE_DIR, ROOT_TREE_DIR), DIR_ITEM_KEY)?;
    // struct btrfs_dir_item: location (disk key, 17 bytes), transid, data_len, name_len,
    // type, then the name.
    let default = items.iter().find_map(|(_, _, d)| {
        let name_len = usize::from(u16::from_le_bytes(d.get(27..29)?.try_into().ok()?));
        (d.get(30..30 + name_len)? == b"default").then(|| le64(d, 0))
    });
    Ok(default.unwrap_or(BTRFS_TOP_LEVEL))
}

fn list_mounted(fd: &File) -> Result<(u64, Vec<Subvolume>), OpError> {
    let mut refs = HashMap::new();
    for (id, parent, d) in search(fd, (FIRST_FREE, LAST_FREE), ROOT_BACKREF_KEY)? {
        // struct btrfs_root_ref: dirid, sequence (u64), name_len (u16), name.
        let Some(len) = d
            .get(16..18)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        else {
            continue;
        };
        let Some(name) = d.get(18..18 + len) else {
            continue;
        };
        let mut rel = ino_path(fd, parent, le64(&d, 0))?;
        rel.extend_from_slice(name);
        refs.insert(id, (parent, rel));
    }
    let list = full_paths(&refs);
    // The answer must fit one frame, whatever the paths' lengths.
    if list.iter().map(|s| s.path.len() + 64).sum::<usize>() > MAX_FRAME / 2 {
        return Err(OpError::new(
            ErrorKind::Mount,
            "btrfs subvolume paths too long to list",
        ));
    }
    Ok((default_subvolume(fd)?, list))
}

/// The default subvolume's id and every subvolume of the btrfs on `device`.
pub fn subvolumes(device: &str) -> Result<(u64, Vec<Subvolume>), OpError> {
    if !device.starts_with("/dev/") || device.split('/').any(|c| c == "..") {
        return Err(OpError::new(
            ErrorKind::BadRequest,
            format!("{device}: not a device path"),
        ));
    }
    crate::init::load_fs_modules("btrfs");
    let _ = std::fs::create_dir_all(TOP_MOUNT);
    let c = |s: &str| CString::new(s).map_err(|_| OpError::new(ErrorKind::BadRequest, "NUL"));
    let (src, dst, ty) = (c(device)?, c(TOP_MOUNT)?, c("btrfs")?);
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut last = std::io::Error::from_raw_os_error(libc::EINVAL);
    let mut mounted = false;
    for opts in ["rescue=nologreplay,subvolid=5", "nologreplay,subvolid=5"] {
        let data = c(opts)?;
        match crate::mount::mount_syscall(&src, &dst, &ty, flags, &data) {
            Ok(()) => {
                mounted = true;
                break;
            }
            Err(e) => last = e,
        }
    }
    if !mounted {
        return Err(OpError::new(
            ErrorKind::Mount,
            format!("mount {device} as btrfs: {}", errno_text(&last)),
        ));
    }
    let r = File::open(Path::new(TOP_MOUNT))
        .map_err(|e| OpError::new(ErrorKind::Mount, errno_text(&e)))
        .and_then(|fd| list_mounted(&fd));
    // SAFETY: dst is a valid NUL-terminated path.
    unsafe {
        if libc::umount2(dst.as_ptr(), 0) != 0 {
            libc::umount2(dst.as_ptr(), libc::MNT_DETACH);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_joined_through_parents_and_orphans_dropped() {
        let refs: HashMap<u64, (u64, Vec<u8>)> = [
            (256, (5, b"@".to_vec())),
            (257, (256, b".snapshots".to_vec())),
            (258, (257, b"1/snapshot".to_vec())),
            (300, (999, b"orphan".to_vec())),
            (301, (302, b"loop".to_vec())),
            (302, (301, b"loop".to_vec())),
        ]
        .into_iter()
        .collect();

        let got = full_paths(&refs);

        let want = [
            (256, "@"),
            (257, "@/.snapshots"),
            (258, "@/.snapshots/1/snapshot"),
        ];
        let got: Vec<(u64, &str)> = got.iter().map(|s| (s.id, s.path.as_str())).collect();
        assert_eq!(got, want);
    }
}
