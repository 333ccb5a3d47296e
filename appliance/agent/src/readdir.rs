//! `ReadDir`: list one directory in bounded frames.

use crate::entry::{json_estimate, lstat_entry, FRAME_BUDGET};
use crate::error::{shown, OpError};
use crate::resolve::{resolve, Final};
use imgsafe_proto::{write_msg, ErrorKind, Response, MAX_DIR_ENTRIES_PER_FRAME};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Open a directory of the image (following a final symlink, re-rooted).
pub fn open_dir(
    root: &Path,
    path: &[u8],
) -> Result<(std::path::PathBuf, std::fs::ReadDir), OpError> {
    let r = resolve(root, path, Final::Follow)?;
    let meta = std::fs::symlink_metadata(&r.host).map_err(|e| OpError::io(path, &e))?;
    if !meta.is_dir() {
        return Err(OpError::new(
            ErrorKind::NotDirectory,
            format!("{}: not a directory", shown(path)),
        ));
    }
    let rd = std::fs::read_dir(&r.host).map_err(|e| OpError::io(path, &e))?;
    Ok((r.host, rd))
}

/// Answer `ReadDir` on `w`: `DirEntries` frames (the last with `done: true`) or one `Error`.
/// Only an error writing to the channel is returned.
pub fn read_dir<W: Write>(root: &Path, path: &[u8], w: &mut W) -> io::Result<()> {
    let (_, rd) = match open_dir(root, path) {
        Ok(d) => d,
        Err(e) => return write_msg(w, &e.response()),
    };
    let mut batch = Vec::new();
    let mut budget = 0;
    for item in rd {
        let entry = item.map_err(|e| OpError::io(path, &e)).and_then(|de| {
            let name = de.file_name().as_bytes().to_vec();
            lstat_entry(&de.path(), name, path)
        });
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return write_msg(w, &e.response()),
        };
        let cost = json_estimate(&entry);
        if batch.len() == MAX_DIR_ENTRIES_PER_FRAME || budget + cost > FRAME_BUDGET {
            write_msg(
                w,
                &Response::DirEntries {
                    entries: std::mem::take(&mut batch),
                    done: false,
                },
            )?;
            budget = 0;
        }
        budget += cost;
        batch.push(entry);
    }
    write_msg(
        w,
        &Response::DirEntries {
            entries: batch,
            done: true,
        },
    )
}
