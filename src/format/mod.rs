//! Container format decoders.
//!
//! Every format is one file behind one read-only trait, [`BlockSource`]. A decoder is
//! opened from a path, probes nothing by file name, checks every offset it reads from the
//! file, and answers reads of the *virtual* disk. Chains (ploop deltas, VHD differencing
//! parents) are decoders that own their parent as a `Box<dyn BlockSource>`.

pub mod foreign;
pub mod ploop;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

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
        Ok(vec![Extent {
            offset,
            length,
            allocated: true,
        }])
    }

    /// The files that make up this image, top first.
    fn layers(&self) -> Vec<LayerInfo>;

    /// Internal snapshots of the top file, for formats that have them.
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }
}

/// What `imgsafe info` shows about one internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    /// Unique id, as `--snapshot` takes it.
    pub id: String,
    /// Name, as `--snapshot` also takes it.
    pub name: String,
    /// Virtual disk size when the snapshot was taken, in bytes.
    pub disk_size: u64,
    /// When it was taken, seconds since the Unix epoch.
    pub date: u64,
    /// Bytes of saved VM state (0 for a disk-only snapshot).
    pub vm_state_size: u64,
}

/// The container formats imgsafe can decode, as probed from magic bytes or named by
/// `--format`. The command line's list of values comes from [`Format::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Ploop,
    Descriptor,
    Vhd,
    Vdi,
    Vhdx,
    Vmdk,
    Ova,
    Qcow2,
}

impl Format {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [Format; 9] = [
        Format::Raw,
        Format::Ploop,
        Format::Descriptor,
        Format::Vhd,
        Format::Vdi,
        Format::Vhdx,
        Format::Vmdk,
        Format::Ova,
        Format::Qcow2,
    ];

    /// The name `--format` takes and `info` prints.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Ploop => "ploop",
            Format::Descriptor => "descriptor",
            Format::Vhd => "vhd",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Vmdk => "vmdk",
            Format::Ova => "ova",
            Format::Qcow2 => "qcow2",
        }
    }

    /// One line on what the format is, for `--help`.
    pub fn about(self) -> &'static str {
        match self {
            Format::Raw => "The file is the disk, byte for byte",
            Format::Ploop => "OpenVZ ploop / Parallels expanding image (one delta, no chain)",
            Format::Descriptor => "A ploop DiskDescriptor.xml naming a chain of deltas",
            Format::Vhd => "Microsoft VHD: fixed, dynamic or differencing",
            Format::Vdi => "VirtualBox VDI: static, dynamic or differencing",
            Format::Vhdx => "Microsoft VHDX: fixed, dynamic or differencing",
            Format::Vmdk => "VMware VMDK: sparse, flat and stream-optimized extents, delta chains",
            Format::Ova => "An OVA (tar) holding VMDK disks, read in place",
            Format::Qcow2 => "QEMU qcow2 (v2/v3), with its backing chain",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    /// A format by its [`Format::name`] (exactly; names are lowercase).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown format {s:?}"))
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
    /// The file is not of the format it must be (`format`), for the reason `why`.
    #[error("{}: not a {format} file: {why}", path.display())]
    NotFormat {
        path: PathBuf,
        format: &'static str,
        why: &'static str,
    },
    /// A file opened as the parent of differencing disk `child` could not be used;
    /// `source` names the parent and says why.
    #[error(
        "{source} (it is the parent of differencing disk {}{})",
        child.display(),
        must_be.map_or(String::new(), |f| format!(", and must be a {f}"))
    )]
    ParentOf {
        child: PathBuf,
        /// The parent's format, said when the file is not of it.
        must_be: Option<&'static str>,
        #[source]
        source: Box<FormatError>,
    },
}

impl FormatError {
    /// Shorthand for a [`FormatError::Corrupt`].
    pub fn corrupt(path: &Path, what: impl Into<String>) -> Self {
        FormatError::Corrupt {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FormatError::Io { path, .. }
            | FormatError::IsDirectory { path }
            | FormatError::Empty { path }
            | FormatError::Corrupt { path, .. }
            | FormatError::Unsupported { path, .. }
            | FormatError::NotFormat { path, .. } => path,
            FormatError::ParentOf { source, .. } => source.path(),
        }
    }

    /// Shorthand for a [`FormatError::Io`].
    pub fn io(path: &Path, source: io::Error) -> Self {
        FormatError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Options that change how an image is opened.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Skip probing and decode as this format.
    pub format: Option<Format>,
    /// VHD, VHDX and VMDK: accept a parent whose id does not match the child's record.
    pub ignore_parent_id: bool,
    /// OVA: which of its disks to read (1-based), when it holds several.
    pub disk: Option<usize>,
    /// qcow2: read this internal snapshot (id or name) instead of the active layer.
    pub snapshot: Option<String>,
}

/// Most files in one chain of backing, differencing or delta files (the top included),
/// for every format: each is an open file and a lookup per block, and a cycle that the
/// name checks miss still ends here.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// The files of one same-format chain opened so far (VHD, VHDX and VDI differencing
/// parents, VMDK deltas), by (device, inode): one cycle check and one depth limit for
/// the chains those decoders walk themselves. Backing files of any format (qcow2) go
/// through [`open_layer`] and its [`ChainPos`] instead, which the formats that need a
/// parent of their own kind cannot use: they check the parent's id before opening its
/// chain.
#[derive(Debug, Default)]
pub(crate) struct ChainFiles(Vec<(u64, u64)>);

impl ChainFiles {
    /// Enter `file` as the next file down a `kind` chain ("differencing", "delta"):
    /// refused when it is already in the chain, or when the chain would be deeper than
    /// [`MAX_CHAIN_DEPTH`].
    pub fn enter(&mut self, path: &Path, file: &File, kind: &str) -> Result<(), FormatError> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(|e| FormatError::io(path, e))?;
        let id = (meta.dev(), meta.ino());
        if self.0.contains(&id) {
            return Err(FormatError::corrupt(
                path,
                format!("parent loop: this file is already in the {kind} chain"),
            ));
        }
        if self.0.len() >= MAX_CHAIN_DEPTH {
            return Err(FormatError::Unsupported {
                path: path.to_path_buf(),
                what: format!("{kind} chain deeper than {MAX_CHAIN_DEPTH} files"),
            });
        }
        self.0.push(id);
        Ok(())
    }

    /// Whether the file entered last is a parent, not the image named by the user.
    pub fn is_parent(&self) -> bool {
        self.0.len() > 1
    }

    /// How many files are in the chain.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Forget the files entered after the first `len` (a parent candidate that failed).
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }
}

/// The role `info` shows for a file of a same-format chain: a parent, the top of a
/// chain, or an image on its own.
pub fn chain_role(is_parent: bool, has_parent: bool) -> &'static str {
    match (is_parent, has_parent) {
        (true, _) => "parent",
        (false, true) => "top",
        (false, false) => "image",
    }
}

/// Where a file being opened sits in a chain of backing files: how deep, and which files
/// are open above it (a file that is its own ancestor would otherwise recurse forever).
#[derive(Debug, Clone, Default)]
pub struct ChainPos {
    /// 0 for the image named by the user.
    pub depth: usize,
    /// (device, inode) of every file above (and, once opened, of the file itself).
    pub above: Vec<(u64, u64)>,
}

/// Bytes read from the start of a file for probing.
pub const PROBE_LEN: usize = 4096;
const _: () = assert!(PROBE_LEN >= foreign::HEAD_NEEDED);

/// Decide the format of a file from its first bytes (and its last 512 for VHD fixed).
pub fn detect(path: &Path, file: &File) -> Result<Format, FormatError> {
    let head = read_head(path, file)?;
    if ploop::probe(&head) {
        return Ok(Format::Ploop);
    }
    if ploop::descriptor::probe(path, file, &head)? {
        return Ok(Format::Descriptor);
    }
    if vhd::probe(path, file, &head)? {
        return Ok(Format::Vhd);
    }
    if vdi::probe(&head) {
        return Ok(Format::Vdi);
    }
    if vhdx::probe(&head) {
        return Ok(Format::Vhdx);
    }
    if vmdk::probe(&head) {
        return Ok(Format::Vmdk);
    }
    if vmdk::ova::probe(&head) {
        return Ok(Format::Ova);
    }
    if qcow2::probe(&head) {
        return Ok(Format::Qcow2);
    }
    if let Some(f) = foreign::identify(&head) {
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!(
                "a {}, which imgsafe does not read: {} (or force --format raw)",
                f.name, f.hint
            ),
        });
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
    open_layer(path, opts.format, opts, &ChainPos::default())
}

/// Open `path` as `format` (probed when `None`) as a file at chain position `pos`: the
/// one opener for the user's image and for every backing file a format names, so a
/// backing file may be any format imgsafe reads, with one depth limit and one cycle check.
pub fn open_layer(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
    pos: &ChainPos,
) -> Result<Box<dyn BlockSource>, FormatError> {
    use std::os::unix::fs::MetadataExt;
    let file = open_image_file(path)?;
    let meta = file.metadata().map_err(|e| FormatError::io(path, e))?;
    let id = (meta.dev(), meta.ino());
    if pos.above.contains(&id) {
        return Err(FormatError::corrupt(
            path,
            "backing chain loops back to this file",
        ));
    }
    if pos.depth >= MAX_CHAIN_DEPTH {
        return Err(FormatError::corrupt(
            path,
            format!("backing chain is deeper than {MAX_CHAIN_DEPTH} files"),
        ));
    }
    // This file's own position, with itself among the files its backing files must not be.
    let here = ChainPos {
        depth: pos.depth,
        above: pos.above.iter().copied().chain([id]).collect(),
    };
    let format = match format {
        Some(f) => f,
        None => detect(path, &file)?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::Raw::new(path, file)?)),
        Format::Ploop => ploop::open_single(path, file),
        Format::Descriptor => ploop::descriptor::open_chain(path),
        Format::Vhd => vhd::open(path, file, opts),
        Format::Vdi => vdi::open(path, file),
        Format::Vhdx => vhdx::open(path, file, opts),
        Format::Vmdk => vmdk::open(path, file, opts),
        Format::Ova => vmdk::open_ova(path, file, opts),
        Format::Qcow2 => qcow2::open(path, file, opts, &here),
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
    let kind = file
        .metadata()
        .map_err(|e| FormatError::io(path, e))?
        .file_type();
    if kind.is_dir() {
        return Err(FormatError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(FormatError::corrupt(
            path,
            "not a regular file or block device",
        ));
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
        return Err(FormatError::Empty {
            path: path.to_path_buf(),
        });
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
    f.seek(SeekFrom::End(0))
        .map_err(|e| FormatError::io(path, e))
}

/// Most of the virtual disk whose allocation map is asked of a decoder in one call, by
/// NBD block status and by `imgsafe info`: a fragmented image (hostile or not) then makes
/// one call build at most one window's worth of extents.
pub const EXTENT_WINDOW: u64 = 256 << 20;

/// Most extents `imgsafe info` examines to count allocated bytes (16 Mi): a hostile image
/// of alternating 512-byte runs would otherwise keep it busy for billions of extents.
pub const MAX_COUNTED_EXTENTS: u64 = 16 << 20;

/// Count the bytes of `src` some layer stores data for, asking the decoder one
/// [`EXTENT_WINDOW`] at a time so memory stays bounded by one window. Returns `None` when
/// the disk has more than `max_extents` extents (the count is then left unknown rather
/// than spending minutes on a hostile map).
pub fn count_allocated(src: &dyn BlockSource, max_extents: u64) -> io::Result<Option<u64>> {
    let size = src.size();
    let mut allocated: u64 = 0;
    let mut examined: u64 = 0;
    let mut pos = 0;
    while pos < size {
        let end = size.min(pos.saturating_add(EXTENT_WINDOW));
        let extents = src.extents(pos, end - pos)?;
        examined = examined.saturating_add(extents.len() as u64);
        if examined > max_extents {
            return Ok(None);
        }
        for e in extents.iter().filter(|e| e.allocated) {
            // Clip to the window: a decoder's extents are trusted for their state only.
            let a = e.offset.clamp(pos, end);
            let b = e.offset.saturating_add(e.length).clamp(pos, end);
            allocated = allocated.saturating_add(b - a);
        }
        pos = end;
    }
    Ok(Some(allocated))
}

/// Append `e` to `out`, merging it into the last extent when it continues it with the same
/// allocation state. Empty extents are dropped.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last)
            if last.allocated == e.allocated
                && last.offset.checked_add(last.length) == Some(e.offset) =>
        {
            last.length += e.length
        }
        _ => out.push(e),
    }
}

/// Resolve the holes of one layer's own map with the map of the layers below it, appending
/// the result to `out`.
///
/// `upper` covers a range in order: its allocated extents are data the layer stores, its
/// holes are where reads fall through. `lower` is the lower layers' map, in order, of (at
/// least) the span from the first hole to the last. Asking the lower layers once for that
/// span, rather than once per hole, keeps a map of many small holes to one call. Any part
/// of a hole `lower` leaves uncovered is reported allocated, the answer that is always safe.
pub fn overlay_extents(upper: &[Extent], lower: &[Extent], out: &mut Vec<Extent>) {
    let mut first = 0;
    for u in upper {
        if u.allocated {
            push_extent(out, *u);
            continue;
        }
        let u_end = u.offset.saturating_add(u.length);
        let mut pos = u.offset;
        while first < lower.len() && lower[first].offset.saturating_add(lower[first].length) <= pos
        {
            first += 1;
        }
        for l in lower[first..].iter().take_while(|l| l.offset < u_end) {
            let l_end = l.offset.saturating_add(l.length);
            if pos >= u_end {
                break;
            }
            if l_end <= pos {
                continue;
            }
            if l.offset > pos {
                push_extent(
                    out,
                    Extent {
                        offset: pos,
                        length: l.offset - pos,
                        allocated: true,
                    },
                );
                pos = l.offset;
            }
            let stop = l_end.min(u_end);
            push_extent(
                out,
                Extent {
                    offset: pos,
                    length: stop - pos,
                    allocated: l.allocated,
                },
            );
            pos = stop;
        }
        if pos < u_end {
            push_extent(
                out,
                Extent {
                    offset: pos,
                    length: u_end - pos,
                    allocated: true,
                },
            );
        }
    }
}

/// The smallest range holding every hole of `extents`, as `(start, end)`.
pub fn holes_span(extents: &[Extent]) -> Option<(u64, u64)> {
    let first = extents.iter().find(|e| !e.allocated)?;
    let last = extents.iter().rfind(|e| !e.allocated)?;
    Some((first.offset, last.offset.saturating_add(last.length)))
}

/// Allocation map of bytes `[offset, end)` of a file whose byte `n` is byte `n` of the
/// virtual disk, from lseek(SEEK_DATA/SEEK_HOLE). Bytes past the end of the file are holes;
/// on a file system without SEEK_DATA everything in the file is reported allocated.
///
/// The result has at most one extent per data or hole run of the file in the range, so
/// callers bound it by bounding the range.
pub fn file_extents(file: &File, offset: u64, end: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (allocated, next) = match seek_file(file, pos, libc::SEEK_DATA) {
            Ok(data) if data > pos => (false, data),
            // Data at pos: it runs to the next hole (the end of the file is one).
            Ok(_) => (true, seek_file(file, pos, libc::SEEK_HOLE).unwrap_or(end)),
            // ENXIO: no data from pos on, or pos is at or past the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (false, end),
            // SEEK_DATA unsupported (or the offset is not representable): say data.
            Err(_) => (true, end),
        };
        // max(pos + 1): a file changing under us must not stall the loop.
        let next = next.min(end).max(pos + 1);
        push_extent(
            &mut out,
            Extent {
                offset: pos,
                length: next - pos,
                allocated,
            },
        );
        pos = next;
    }
    out
}

/// lseek on `file` without using its shared position for anything else (all reads here
/// are positioned), so concurrent callers do not disturb each other.
fn seek_file(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a valid fd has no memory-safety preconditions.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
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

        assert!(matches!(
            open_image_file(dir.path()),
            Err(FormatError::IsDirectory { .. })
        ));
        assert!(matches!(
            open_image_file(&empty),
            Err(FormatError::Empty { .. })
        ));
    }
}

#[cfg(test)]
mod extent_tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    /// A disk of `size` bytes whose every `period` bytes start with `period / 2` allocated
    /// ones; records the longest range it was asked about.
    struct Striped {
        size: u64,
        period: u64,
        longest_ask: Mutex<u64>,
    }

    impl BlockSource for Striped {
        fn size(&self) -> u64 {
            self.size
        }

        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            Ok(())
        }

        fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
            let mut ask = self.longest_ask.lock().unwrap();
            *ask = (*ask).max(length);
            let end = offset + length;
            let mut out = Vec::new();
            let mut pos = offset;
            while pos < end {
                let half = pos / (self.period / 2);
                let next = ((half + 1) * (self.period / 2)).min(end);
                push_extent(
                    &mut out,
                    Extent {
                        offset: pos,
                        length: next - pos,
                        allocated: half.is_multiple_of(2),
                    },
                );
                pos = next;
            }
            Ok(out)
        }

        fn layers(&self) -> Vec<LayerInfo> {
            Vec::new()
        }
    }

    fn ext(offset: u64, length: u64, allocated: bool) -> Extent {
        Extent {
            offset,
            length,
            allocated,
        }
    }

    #[test]
    fn count_allocated_asks_one_window_at_a_time_and_counts_exactly() {
        let src = Striped {
            size: 3 * EXTENT_WINDOW + (1 << 20),
            period: 1 << 20,
            longest_ask: Mutex::new(0),
        };

        let counted = count_allocated(&src, MAX_COUNTED_EXTENTS).unwrap();

        assert_eq!(counted, Some(src.size / 2));
        assert_eq!(*src.longest_ask.lock().unwrap(), EXTENT_WINDOW);
    }

    #[test]
    fn count_allocated_gives_up_past_the_extent_cap() {
        let src = Striped {
            size: 4 * EXTENT_WINDOW,
            period: 1024,
            longest_ask: Mutex::new(0),
        };

        let counted = count_allocated(&src, 1 << 20).unwrap();

        assert_eq!(counted, None);
    }

    #[test]
    fn overlay_fills_holes_from_below_and_uncovered_parts_as_data() {
        let upper = [ext(0, 100, false), ext(100, 50, true), ext(150, 100, false)];
        let lower = [
            ext(0, 40, true),
            ext(40, 80, false),
            ext(120, 60, true),
            ext(200, 30, false),
        ];
        let mut out = Vec::new();

        overlay_extents(&upper, &lower, &mut out);

        // 100..200: this layer's data, then the lower data at 150..180, then 180..200 that
        // `lower` does not cover, all merged into one allocated extent.
        assert_eq!(
            out,
            [
                ext(0, 40, true),
                ext(40, 60, false),
                ext(100, 100, true),
                ext(200, 30, false),
                ext(230, 20, true)
            ]
        );
    }

    #[test]
    fn holes_span_covers_first_to_last_hole() {
        let map = [
            ext(0, 10, true),
            ext(10, 5, false),
            ext(15, 5, true),
            ext(20, 5, false),
            ext(25, 5, true),
        ];

        assert_eq!(holes_span(&map), Some((10, 25)));
        assert_eq!(holes_span(&map[..1]), None);
    }

    #[test]
    fn file_extents_follow_the_file_and_call_bytes_past_its_end_holes() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(2 << 20).unwrap();
        f.as_file().write_all_at(&[1u8; 65536], 0).unwrap();
        f.as_file().write_all_at(&[2u8; 65536], 1 << 20).unwrap();

        let map = file_extents(f.as_file(), 0, 3 << 20);

        assert_eq!(
            map,
            [
                ext(0, 65536, true),
                ext(65536, (1 << 20) - 65536, false),
                ext(1 << 20, 65536, true),
                ext((1 << 20) + 65536, (2 << 20) - 65536, false)
            ]
        );
    }

    #[test]
    fn file_extents_of_a_range_inside_data_is_one_extent() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(&[1u8; 65536], 0).unwrap();

        let map = file_extents(f.as_file(), 100, 200);

        assert_eq!(map, [ext(100, 100, true)]);
    }
}
