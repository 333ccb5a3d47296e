//! Container format decoders.
//!
//! Every format is one file behind one read-only trait, [`BlockSource`]. A decoder is
//! opened from a path, probes nothing by file name, checks every offset it reads from the
//! file, and answers reads of the *virtual* disk. Chains (ploop deltas, VHD differencing
//! parents) are decoders that own their parent as a `Box<dyn BlockSource>`.

pub mod descriptor;
pub mod ploop;
pub mod raw;
pub mod vhd;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// One run of the virtual disk with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the virtual disk, in bytes.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// `false` for a hole: no layer of the image stores data here and it reads as zeros.
    pub allocated: bool,
}

/// What `imgsafe info` shows about one file of an image (a chain has several).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerInfo {
    /// The file this layer was read from.
    pub path: PathBuf,
    /// Format name, as `--format` spells it (`raw`, `ploop`, `vhd`, ...).
    pub format: String,
    /// Format version or subformat (`v2`, `dynamic`, `differencing`, ...), if any.
    pub version: Option<String>,
    /// Role in the chain: `image` for a lone file, `top`, `delta`, `base`, `parent`.
    pub role: String,
    /// Cluster or block size in bytes, for formats that have one.
    pub cluster_size: Option<u64>,
    /// Bytes of the virtual disk this file stores data for (None if unknown).
    pub allocated_bytes: Option<u64>,
}

/// A read-only virtual disk.
///
/// Implementations must be safe to call from several threads at once (the NBD server is
/// multi-conn), so they read with positioned reads (`FileExt::read_at`) and keep any cache
/// behind a lock.
pub trait BlockSource: Send + Sync {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` with the virtual disk's bytes starting at `offset`.
    ///
    /// Callers guarantee `offset + buf.len() <= self.size()`; decoders still check and
    /// return `InvalidInput` rather than panic when that is broken.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Allocation state of `[offset, offset + length)`, as consecutive extents that cover
    /// the range exactly (the last may be cut short at the range end). The default says
    /// everything is allocated, which is always a correct (if unhelpful) answer.
    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent { offset, length, allocated: true }])
    }

    /// The files that make up this image, top first.
    fn layers(&self) -> Vec<LayerInfo>;
}

/// The container formats imgsafe can decode, as probed from magic bytes or named by
/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The file is the disk, byte for byte.
    Raw,
    /// OpenVZ ploop / Parallels expanding image (one delta, no chain).
    Ploop,
    /// A ploop DiskDescriptor.xml naming a chain of deltas.
    Descriptor,
    /// Microsoft VHD: fixed, dynamic or differencing.
    Vhd,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Ploop => "ploop",
            Format::Descriptor => "descriptor",
            Format::Vhd => "vhd",
        })
    }
}

/// Why an image could not be opened. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A directory where an image file was expected.
    #[error("{}: is a directory, not a disk image", path.display())]
    IsDirectory { path: PathBuf },
    /// The file is empty: there is no disk in it.
    #[error("{}: empty file (0 bytes), not a disk image", path.display())]
    Empty { path: PathBuf },
    /// A header field, table entry or descriptor element is invalid.
    #[error("{}: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    /// The file is valid but uses a feature imgsafe does not read.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
}

impl FormatError {
    /// Shorthand for a [`FormatError::Corrupt`].
    pub fn corrupt(path: &Path, what: impl Into<String>) -> Self {
        FormatError::Corrupt { path: path.to_path_buf(), what: what.into() }
    }

    /// Shorthand for a [`FormatError::Io`].
    pub fn io(path: &Path, source: io::Error) -> Self {
        FormatError::Io { path: path.to_path_buf(), source }
    }
}

/// Options that change how an image is opened.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Skip probing and decode as this format.
    pub format: Option<Format>,
    /// VHD: accept a parent whose unique id does not match the child's record.
    pub ignore_parent_id: bool,
}

/// Bytes read from the start of a file for probing.
const PROBE_LEN: usize = 4096;

/// Decide the format of a file from its first bytes (and its last 512 for VHD fixed).
pub fn detect(path: &Path, file: &File) -> Result<Format, FormatError> {
    let head = read_head(path, file)?;
    if ploop::probe(&head) {
        return Ok(Format::Ploop);
    }
    if descriptor::probe(&head) {
        return Ok(Format::Descriptor);
    }
    if vhd::probe(path, file, &head)? {
        return Ok(Format::Vhd);
    }
    Ok(Format::Raw)
}

/// Read up to [`PROBE_LEN`] bytes from the start of `file`.
pub fn read_head(path: &Path, file: &File) -> Result<Vec<u8>, FormatError> {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; PROBE_LEN];
    let mut filled = 0;
    while filled < head.len() {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FormatError::io(path, e)),
        }
    }
    head.truncate(filled);
    Ok(head)
}

/// Open an image file read-only: check it is a non-empty regular file, probe the format
/// (unless `opts.format` names it) and return its decoder.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockSource>, FormatError> {
    let file = open_image_file(path)?;
    let format = match opts.format {
        Some(f) => f,
        None => detect(path, &file)?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::Raw::new(path, file)?)),
        Format::Ploop => ploop::open_single(path, file),
        Format::Descriptor => descriptor::open_chain(path, opts),
        Format::Vhd => vhd::open(path, file, opts),
    }
}

/// Open `path` read-only and reject what cannot be a disk image (directories, empty
/// files, FIFOs, sockets, character devices). Never opens for writing: the image file is
/// never modified.
///
/// The file is opened with O_NONBLOCK and checked with fstat on the descriptor itself,
/// so a FIFO named by a hostile descriptor or parent locator can neither block imgsafe
/// nor be swapped in between a check and the open.
pub fn open_image_file(path: &Path) -> Result<File, FormatError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| FormatError::io(path, e))?;
    let kind = file.metadata().map_err(|e| FormatError::io(path, e))?.file_type();
    if kind.is_dir() {
        return Err(FormatError::IsDirectory { path: path.to_path_buf() });
    }
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(FormatError::corrupt(path, "not a regular file or block device"));
    }
    // Regular files and block devices never block; clear the flag anyway so reads
    // behave as ordinary blocking reads.
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    let len = file_len(path, &file)?;
    if len == 0 {
        return Err(FormatError::Empty { path: path.to_path_buf() });
    }
    Ok(file)
}

/// Length of an open file; for block devices, their size.
pub fn file_len(path: &Path, file: &File) -> Result<u64, FormatError> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata().map_err(|e| FormatError::io(path, e))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report size 0 in metadata; seeking to the end gives the real size.
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(|e| FormatError::io(path, e))
}

/// Read exactly `buf.len()` bytes at `offset` of a file, failing on a short read.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Check that a read of `len` bytes at `offset` lies within a disk of `size` bytes;
/// returns where the read ends.
pub fn check_read(size: u64, offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .filter(|&end| end <= size)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past the end of the disk"))
}

#[cfg(test)]
mod check_read_tests {
    use super::*;

    #[test]
    fn reads_within_the_disk_are_accepted_up_to_its_end() {
        assert_eq!(check_read(4096, 0, 4096).unwrap(), 4096);
        assert_eq!(check_read(4096, 4096, 0).unwrap(), 4096);
    }

    #[test]
    fn reads_past_the_end_or_overflowing_are_refused() {
        let past = check_read(4096, 1, 4096).unwrap_err();
        let overflow = check_read(u64::MAX, u64::MAX, 1).unwrap_err();

        assert_eq!(past.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(past.to_string(), "read past the end of the disk");
        assert_eq!(overflow.kind(), io::ErrorKind::InvalidInput);
    }
}

#[cfg(test)]
mod open_image_file_tests {
    use super::*;

    #[test]
    fn fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("disk.img");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        let err = open_image_file(&fifo).unwrap_err();

        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn directory_and_empty_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();

        assert!(matches!(open_image_file(dir.path()), Err(FormatError::IsDirectory { .. })));
        assert!(matches!(open_image_file(&empty), Err(FormatError::Empty { .. })));
    }
}
