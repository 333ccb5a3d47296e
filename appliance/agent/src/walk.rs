//! `Walk`: every entry below a directory, depth first, pre-order.
//!
//! Symlinks below the start are reported, never followed; mountpoints below it are
//! crossed (an image's fstab mounts are part of its tree). Iterative, so a deep tree
//! cannot overflow the stack; bounded in depth and path length so every entry fits a frame.

use crate::entry::{bytes_estimate, json_estimate, lstat_entry, FRAME_BUDGET};
use crate::error::{shown, OpError};
use crate::readdir::open_dir;
use imgsafe_proto::{write_msg, ErrorKind, Response, WalkEntry, MAX_DIR_ENTRIES_PER_FRAME};
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Deepest level reported (the host refuses longer component lists).
pub const MAX_DEPTH: usize = 2048;
/// Most raw bytes in one entry's relative path (keeps each entry far below MAX_FRAME).
pub const MAX_WALK_PATH: usize = 64 * 1024;

/// Frames of walk entries, cut by count and estimated size.
struct Batcher<'a, W: Write> {
    w: &'a mut W,
    batch: Vec<WalkEntry>,
    budget: usize,
}

impl<W: Write> Batcher<'_, W> {
    fn push(&mut self, e: WalkEntry) -> io::Result<()> {
        let cost =
            json_estimate(&e.entry) + e.path.iter().map(|c| bytes_estimate(c)).sum::<usize>();
        if self.batch.len() == MAX_DIR_ENTRIES_PER_FRAME || self.budget + cost > FRAME_BUDGET {
            write_msg(
                self.w,
                &Response::WalkEntries {
                    entries: std::mem::take(&mut self.batch),
                    done: false,
                },
            )?;
            self.budget = 0;
        }
        self.budget += cost;
        self.batch.push(e);
        Ok(())
    }
}

/// One directory being listed: its location and the names still to visit.
struct Level {
    host: PathBuf,
    names: std::vec::IntoIter<Vec<u8>>,
}

fn list(host: &Path, shown_path: &[u8]) -> Result<Vec<Vec<u8>>, OpError> {
    let rd = std::fs::read_dir(host).map_err(|e| OpError::io(shown_path, &e))?;
    rd.map(|item| {
        item.map(|de| de.file_name().as_bytes().to_vec())
            .map_err(|e| OpError::io(shown_path, &e))
    })
    .collect()
}

/// Answer `Walk` on `w`. Only an error writing to the channel is returned.
pub fn walk<W: Write>(root: &Path, path: &[u8], w: &mut W) -> io::Result<()> {
    let mut out = Batcher {
        w,
        batch: Vec::new(),
        budget: 0,
    };
    match walk_into(root, path, &mut out) {
        Ok(Ok(())) => write_msg(
            out.w,
            &Response::WalkEntries {
                entries: out.batch,
                done: true,
            },
        ),
        Ok(Err(e)) => write_msg(out.w, &e.response()),
        Err(io) => Err(io),
    }
}

/// The walk proper: the outer error is the channel's, the inner one the filesystem's.
fn walk_into<W: Write>(
    root: &Path,
    path: &[u8],
    out: &mut Batcher<'_, W>,
) -> io::Result<Result<(), OpError>> {
    let start = match open_dir(root, path) {
        Ok((host, _)) => host,
        Err(e) => return Ok(Err(e)),
    };
    let first = match list(&start, path) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let mut stack = vec![Level {
        host: start,
        names: first.into_iter(),
    }];
    let mut rel: Vec<Vec<u8>> = Vec::new();
    let mut rel_bytes = 0usize;
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.next() else {
            stack.pop();
            if let Some(c) = rel.pop() {
                rel_bytes -= c.len();
            }
            continue;
        };
        let host = level.host.join(OsStr::from_bytes(&name));
        let mut comps = rel.clone();
        comps.push(name.clone());
        let shown_rel = [path, b"/", &comps.join(&b"/"[..])].concat();
        if comps.len() > MAX_DEPTH || rel_bytes + name.len() > MAX_WALK_PATH {
            let msg = format!("{}: tree too deep to walk", shown(&shown_rel));
            return Ok(Err(OpError::new(ErrorKind::Other, msg)));
        }
        let entry = match lstat_entry(&host, name.clone(), &shown_rel) {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
        let is_dir = entry.kind == imgsafe_proto::FileType::Directory;
        out.push(WalkEntry { path: comps, entry })?;
        if is_dir {
            let names = match list(&host, &shown_rel) {
                Ok(n) => n,
                Err(e) => return Ok(Err(e)),
            };
            rel_bytes += name.len();
            rel.push(name);
            stack.push(Level {
                host,
                names: names.into_iter(),
            });
        }
    }
    Ok(Ok(()))
}
