//! `Stat` and `ReadLink`, and the lstat → [`Entry`] conversion every listing uses.

use crate::error::{shown, OpError};
use crate::resolve::{resolve, Final};
use imgsafe_proto::{Entry, ErrorKind, FileType};
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Bytes one entry may take in JSON besides its names (field names, numbers), rounded up.
const ENTRY_FIXED_JSON: usize = 400;
/// Upper bound of JSON bytes per raw name byte: serde writes `Vec<u8>` as "255," at worst.
const JSON_PER_BYTE: usize = 4;
/// Budget of estimated JSON bytes per listing frame, half of MAX_FRAME for safety.
pub const FRAME_BUDGET: usize = imgsafe_proto::MAX_FRAME / 2;

/// Upper bound of the JSON size of `e` (so frames can be cut before they get too large).
pub fn json_estimate(e: &Entry) -> usize {
    let target = e.target.as_ref().map_or(0, Vec::len);
    ENTRY_FIXED_JSON + JSON_PER_BYTE * (e.name.len() + target)
}

/// Upper bound of the JSON size of a raw byte string inside a list.
pub fn bytes_estimate(b: &[u8]) -> usize {
    JSON_PER_BYTE * b.len() + 4
}

fn kind(meta: &Metadata) -> FileType {
    let t = meta.file_type();
    if t.is_symlink() {
        FileType::Symlink
    } else if t.is_dir() {
        FileType::Directory
    } else if t.is_char_device() {
        FileType::CharDevice
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else if t.is_fifo() {
        FileType::Fifo
    } else if t.is_socket() {
        FileType::Socket
    } else {
        FileType::Regular
    }
}

/// lstat `host` and describe it as `name`; `shown_path` names it in errors.
pub fn lstat_entry(host: &Path, name: Vec<u8>, shown_path: &[u8]) -> Result<Entry, OpError> {
    let meta = std::fs::symlink_metadata(host).map_err(|e| OpError::io(shown_path, &e))?;
    let target = if meta.file_type().is_symlink() {
        let t = std::fs::read_link(host).map_err(|e| OpError::io(shown_path, &e))?;
        Some(t.as_os_str().as_bytes().to_vec())
    } else {
        None
    };
    Ok(Entry {
        name,
        kind: kind(&meta),
        mode: meta.mode() & 0o7777,
        size: meta.size(),
        mtime: meta.mtime(),
        mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        uid: meta.uid(),
        gid: meta.gid(),
        nlink: meta.nlink(),
        target,
    })
}

/// `Stat`: lstat a path of the image (the final component is not followed).
pub fn stat(root: &Path, path: &[u8]) -> Result<Entry, OpError> {
    let r = resolve(root, path, Final::Keep)?;
    lstat_entry(&r.host, r.name(), path)
}

/// `ReadLink`: the target of a symlink, as stored (not resolved).
pub fn read_link(root: &Path, path: &[u8]) -> Result<Vec<u8>, OpError> {
    let r = resolve(root, path, Final::Keep)?;
    match std::fs::read_link(&r.host) {
        Ok(t) => Ok(t.as_os_str().as_bytes().to_vec()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(OpError::new(
            ErrorKind::BadRequest,
            format!("{}: not a symbolic link", shown(path)),
        )),
        Err(e) => Err(OpError::io(path, &e)),
    }
}
