//! `ReadFile`: stream a regular file in `CHUNK`-sized data frames, never all in memory.

use crate::error::{shown, OpError};
use crate::resolve::{resolve, Final};
use imgsafe_proto::{write_data, write_msg, ErrorKind, Response, CHUNK};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Open a regular file of the image for reading; returns it and its size.
pub(crate) fn open_regular(root: &Path, path: &[u8]) -> Result<(File, u64), OpError> {
    let r = resolve(root, path, Final::Follow)?;
    let meta = std::fs::symlink_metadata(&r.host).map_err(|e| OpError::io(path, &e))?;
    if meta.is_dir() {
        return Err(OpError::new(
            ErrorKind::IsDirectory,
            format!("{}: is a directory", shown(path)),
        ));
    }
    // Checked before open: opening a FIFO or device could block or have side effects.
    if !meta.is_file() {
        return Err(OpError::new(
            ErrorKind::Other,
            format!("{}: not a regular file", shown(path)),
        ));
    }
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&r.host)
        .map_err(|e| OpError::io(path, &e))?;
    let size = file.metadata().map_err(|e| OpError::io(path, &e))?.len();
    Ok((file, size))
}

/// Answer `ReadFile` on `w`: `FileStart`, data frames, `FileEnd` — or `Error` at any
/// point. Only an error writing to the channel is returned.
pub fn read_file<W: Write>(root: &Path, path: &[u8], w: &mut W) -> io::Result<()> {
    send_file(path, open_regular(root, path), w)
}

/// Files of one batch small enough to be read ahead, and the most bytes read ahead for
/// one batch: well inside the guest's page cache.
const PREFETCH_FILE_MAX: u64 = 1 << 20;
const PREFETCH_BATCH_MAX: u64 = 16 << 20;

/// Answer several `ReadFile` requests, in order, as [`read_file`] would one by one; but
/// first open them all and ask the kernel to read the small ones ahead. A tree of small
/// files otherwise costs one synchronous disk read per file, each a round trip through
/// the emulated disk to the host; asked together, they are in flight at once and the
/// block layer merges neighbours.
pub fn read_files<W: Write>(root: &Path, paths: &[Vec<u8>], w: &mut W) -> io::Result<()> {
    let opened: Vec<_> = paths.iter().map(|p| open_regular(root, p)).collect();
    let mut budget = PREFETCH_BATCH_MAX;
    for (file, size) in opened.iter().flatten() {
        if *size <= PREFETCH_FILE_MAX && *size <= budget {
            budget -= size;
            prefetch(file, *size);
        }
    }
    for (path, o) in paths.iter().zip(opened) {
        send_file(path, o, w)?;
    }
    Ok(())
}

/// Start reading `file` into the page cache without waiting (a hint: failure is
/// harmless, the read then simply happens when the file is sent).
fn prefetch(file: &File, size: u64) {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(size).unwrap_or(0);
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open
    // for as long as `file` lives, which outlasts the call.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, len, libc::POSIX_FADV_WILLNEED);
    }
}

/// Send one file that [`open_regular`] opened (or the error it gave).
fn send_file<W: Write>(
    path: &[u8],
    opened: Result<(File, u64), OpError>,
    w: &mut W,
) -> io::Result<()> {
    let (file, size) = match opened {
        Ok(f) => f,
        Err(e) => return write_msg(w, &e.response()),
    };
    write_msg(w, &Response::FileStart { size })?;
    let mut buf = vec![0u8; CHUNK];
    let mut off: u64 = 0;
    while off < size {
        let want = usize::try_from((size - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        let n = match file.read_at(&mut buf[..want], off) {
            Ok(0) => {
                let msg = format!("{}: file ended after {off} of {size} bytes", shown(path));
                return write_msg(w, &OpError::new(ErrorKind::Other, msg).response());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return write_msg(w, &OpError::io(path, &e).response()),
        };
        write_data(w, &buf[..n])?;
        off += n as u64;
    }
    write_msg(w, &Response::FileEnd)
}
