//! qcow2, QEMU's copy-on-write format, versions 2 and 3 (QEMU docs/interop/qcow2.txt).
//!
//! A two-level table maps the virtual disk: the L1 table (in the header's `l1_table_offset`)
//! points to L2 tables of one cluster each, whose entries give each cluster's state: data
//! at a host offset (in this file or an external data file), compressed (deflate or zstd),
//! all zeros, or unallocated (read from the backing file, or zeros without one). With
//! extended L2 entries each cluster has 32 subclusters with their own allocated/zero bits.
//! L1 and L2 tables are read on demand through byte-bounded caches, so a header declaring
//! a huge L1 costs nothing until a read needs one page of it. Refcounts are not needed
//! for reading and are never looked at.
//!
//! Why an own decoder rather than the `imago` crate: imago (0.2.6) is async, so every read
//! would run through an executor inside the synchronous, multi-threaded `BlockSource`
//! reads the NBD server makes; it refuses zstd-compressed and extended-L2 images, both
//! of which QEMU writes today; and its backing chains only reach formats imago itself
//! decodes, while here a backing file may be any format imgsafe reads (VHD, ploop, ...).
//! The reader is a few hundred lines over the same checked-offset habits as `vhd/`.

mod compress;
pub mod header;

pub use header::{Compression, Header, HeaderError, Snapshot};

use super::vhd::cache::BitmapCache;
use super::SnapshotInfo;
use super::{BlockSource, ChainPos, Extent, Format, FormatError, LayerInfo, OpenOptions};
use crate::bytes::be64_or_zero;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// L1 and L2 entries: bits 9-55 are the offset of the table or cluster.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bit 62: the cluster is compressed.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 63: refcount is exactly one; with an external data file it tells an
/// allocated cluster at host offset 0 from an unallocated one.
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit 0 (standard entries): the cluster reads as zeros.
const OFLAG_ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;
/// Bytes of L2 tables cached (32 MiB maps 256 GiB of disk at 64 KiB clusters).
const L2_CACHE_BYTES: usize = 32 << 20;
/// Bytes of L1 table pages cached.
const L1_CACHE_BYTES: usize = 4 << 20;
/// Most bytes of L2 tables read to count a file's allocated bytes for `info`; beyond, the
/// count is left unknown rather than reading a huge image's whole metadata.
const MAX_COUNT_L2_BYTES: u64 = 64 << 20;

/// State of a run of the virtual disk in this file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Stored uncompressed at this host offset (of the data file when there is one).
    Data(u64),
    /// Reads as zeros; the backing file is not consulted.
    Zero,
    /// Not stored here: read from the backing file (zeros without one).
    Unalloc,
    /// One compressed cluster: host offset and size of its compressed bytes.
    Compressed(u64, u64),
}

/// An external data file.
#[derive(Debug)]
struct DataFile {
    path: PathBuf,
    file: File,
    len: u64,
}

/// An opened qcow2 file and everything below it.
pub struct Qcow2 {
    path: PathBuf,
    file: File,
    file_len: u64,
    header: Header,
    data: Option<DataFile>,
    /// Virtual size read (the snapshot's when one is chosen).
    size: u64,
    l1_offset: u64,
    l1_size: u64,
    snapshots: Vec<Snapshot>,
    /// The snapshot read instead of the active layer.
    chosen: Option<usize>,
    backing: Option<Box<dyn BlockSource>>,
    l1_pages: BitmapCache<u64>,
    l2_tables: BitmapCache<u64>,
    /// The last decompressed cluster, by host offset: reads smaller than a cluster would
    /// otherwise decompress it once per read.
    last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
    allocated: OnceLock<Option<u64>>,
    role: String,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// True if `head` starts with the qcow magic and is not qcow version 1 (a different
/// format, named by `foreign`); other versions are refused by the header parser by number.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(header::MAGIC) && head.get(4..8) != Some(&[0, 0, 0, 1])
}

fn header_error(path: &Path, e: HeaderError) -> FormatError {
    match e {
        HeaderError::Corrupt(what) => FormatError::corrupt(path, what),
        HeaderError::Unsupported(what) => FormatError::Unsupported {
            path: path.to_path_buf(),
            what,
        },
    }
}

fn bad_data(path: &Path, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

/// QEMU's block driver name for a backing format, as imgsafe's [`Format`].
fn backing_format(name: &str) -> Option<Format> {
    match name {
        "vpc" => Some(Format::Vhd),
        "parallels" => Some(Format::Ploop),
        _ => name.parse().ok(),
    }
}

/// Read the first cluster (or the whole file, if shorter) and parse the header.
pub fn read_header(path: &Path, file: &File) -> Result<(Header, u64), FormatError> {
    let file_len = super::file_len(path, file)?;
    let mut head = vec![0u8; 4096.min(file_len as usize)];
    super::read_exact_at(file, &mut head, 0).map_err(|e| FormatError::io(path, e))?;
    // cluster_bits is checked by parse; read the rest of a larger header cluster first.
    if head.len() >= 24 {
        let bits = u32::from_be_bytes(head[20..24].try_into().unwrap_or([0; 4]));
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            let want = (1u64 << bits).min(file_len) as usize;
            if want > head.len() {
                head.resize(want, 0);
                super::read_exact_at(file, &mut head, 0).map_err(|e| FormatError::io(path, e))?;
            }
        }
    }
    let h = Header::parse(&head, file_len).map_err(|e| header_error(path, e))?;
    Ok((h, file_len))
}

/// Read the snapshot table: at most [`header::MAX_SNAPSHOT_TABLE`] bytes.
fn read_snapshots(
    path: &Path,
    file: &File,
    h: &Header,
    file_len: u64,
) -> Result<Vec<Snapshot>, FormatError> {
    let mut out = Vec::new();
    if h.nb_snapshots == 0 {
        return Ok(out);
    }
    let table_end = file_len.min(
        h.snapshots_offset
            .saturating_add(header::MAX_SNAPSHOT_TABLE),
    );
    let mut at = h.snapshots_offset;
    // Entries are read in chunks; one entry is at most 40 + 1024 + 2 * 65535 bytes.
    let mut buf = Vec::new();
    let mut buf_at = at;
    while out.len() < h.nb_snapshots as usize {
        let rel = (at - buf_at) as usize;
        match header::parse_snapshot(&buf[rel.min(buf.len())..], h.size)
            .map_err(|e| header_error(path, e))?
        {
            Some((snap, len)) => {
                out.push(snap);
                at += len as u64;
            }
            None => {
                if at >= table_end {
                    return Err(FormatError::corrupt(
                        path,
                        format!(
                            "snapshot table ({} entries) runs past the end of the file or the {} MiB limit",
                            h.nb_snapshots,
                            header::MAX_SNAPSHOT_TABLE >> 20
                        ),
                    ));
                }
                let have = buf.len() - rel.min(buf.len());
                let want = (have + (256 << 10)).min((table_end - at) as usize);
                if want <= have {
                    return Err(FormatError::corrupt(
                        path,
                        "snapshot table entry runs past the end of the file",
                    ));
                }
                let mut fresh = vec![0u8; want];
                super::read_exact_at(file, &mut fresh, at).map_err(|e| FormatError::io(path, e))?;
                buf = fresh;
                buf_at = at;
            }
        }
    }
    Ok(out)
}

/// Resolve a backing or data file name written in the image at `path`: absolute as
/// written, relative against the image's folder (as QEMU resolves them).
fn beside(path: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

fn open_data_file(path: &Path, name: &str) -> Result<DataFile, FormatError> {
    let data_path = beside(path, name);
    let file = match super::open_image_file(&data_path) {
        Ok(f) => f,
        // A data file nothing was written to yet is empty, and valid.
        Err(FormatError::Empty { .. }) => {
            File::open(&data_path).map_err(|e| FormatError::io(&data_path, e))?
        }
        Err(FormatError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(FormatError::corrupt(
                &data_path,
                format!("external data file of {} does not exist", path.display()),
            ))
        }
        Err(e) => return Err(e),
    };
    let len = super::file_len(&data_path, &file)?;
    Ok(DataFile {
        path: data_path,
        file,
        len,
    })
}

fn open_backing(
    path: &Path,
    h: &Header,
    name: &str,
    pos: &ChainPos,
) -> Result<Box<dyn BlockSource>, FormatError> {
    if name.starts_with("json:") || name.contains("://") {
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!("backing file {name:?} is a QEMU protocol or json: spec, not a file"),
        });
    }
    let format = match h.backing_format.as_deref() {
        None => None,
        Some(f) => Some(backing_format(f).ok_or_else(|| FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!("backing file format {f:?}, which imgsafe does not read"),
        })?),
    };
    let backing_path = beside(path, name);
    if !backing_path.exists() && backing_path.symlink_metadata().is_err() {
        return Err(FormatError::corrupt(
            &backing_path,
            format!("backing file of {} does not exist", path.display()),
        ));
    }
    let opts = OpenOptions::default();
    let below = ChainPos {
        depth: pos.depth + 1,
        above: pos.above.clone(),
    };
    super::open_layer(&backing_path, format, &opts, &below)
}

/// Open a qcow2 file at chain position `pos` (its own; its backing files go one deeper).
pub fn open(
    path: &Path,
    file: File,
    opts: &OpenOptions,
    pos: &ChainPos,
) -> Result<Box<dyn BlockSource>, FormatError> {
    let (h, file_len) = read_header(path, &file)?;
    if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
        eprintln!(
            "imgsafe: warning: {}: image is marked corrupt by QEMU; reading it anyway",
            path.display()
        );
    } else if h.incompatible & header::INCOMPAT_DIRTY != 0 {
        eprintln!(
            "imgsafe: warning: {}: image was not closed cleanly (dirty); reading it anyway",
            path.display()
        );
    }
    let snapshots = read_snapshots(path, &file, &h, file_len)?;
    let (mut size, mut l1_offset, mut l1_size, mut chosen) = (h.size, h.l1_offset, h.l1_size, None);
    if let Some(want) = opts.snapshot.as_deref() {
        let found = snapshots
            .iter()
            .position(|s| s.id == want)
            .or_else(|| snapshots.iter().position(|s| s.name == want));
        let Some(i) = found else {
            let have: Vec<String> = snapshots
                .iter()
                .map(|s| format!("{} {:?}", s.id, s.name))
                .collect();
            return Err(FormatError::corrupt(
                path,
                format!(
                    "no internal snapshot {want:?} (the image has {})",
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            ));
        };
        let s = &snapshots[i];
        h.check_l1(
            s.l1_offset,
            s.l1_size,
            s.disk_size,
            file_len,
            &format!("snapshot {:?} L1 table", s.name),
        )
        .map_err(|e| header_error(path, e))?;
        (size, l1_offset, l1_size, chosen) = (s.disk_size, s.l1_offset, s.l1_size, Some(i));
    }
    let data = match (
        &h.data_file,
        h.incompatible & header::INCOMPAT_DATA_FILE != 0,
    ) {
        (Some(name), true) => Some(open_data_file(path, name)?),
        _ => None,
    };
    let backing = match &h.backing {
        Some(name) => Some(open_backing(path, &h, name, pos)?),
        None => None,
    };
    let role = match (pos.depth, backing.is_some()) {
        (0, false) => "image",
        (0, true) => "top",
        _ => "backing",
    };
    Ok(Box::new(Qcow2 {
        path: path.to_path_buf(),
        file,
        file_len,
        data,
        size,
        l1_offset,
        l1_size,
        snapshots,
        chosen,
        backing,
        l1_pages: BitmapCache::new(L1_CACHE_BYTES),
        l2_tables: BitmapCache::new(L2_CACHE_BYTES),
        last_compressed: Mutex::new(None),
        allocated: OnceLock::new(),
        role: role.to_string(),
        header: h,
    }))
}

impl Qcow2 {
    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Virtual bytes one L1 entry maps.
    fn l1_span(&self) -> u64 {
        self.cs() * self.header.l2_entries()
    }

    /// L2 table offset of L1 entry `index` (0: no table).
    fn l1_entry(&self, index: u64) -> io::Result<u64> {
        if index >= self.l1_size {
            return Ok(0);
        }
        let cs = self.cs();
        let byte = index * 8;
        let page = byte / cs;
        let page_off = self.l1_offset + page * cs;
        let page_len = (self.l1_size * 8 - page * cs).min(cs);
        let table = self.l1_pages.get_or_load(page_off, || {
            let mut b = vec![0u8; page_len as usize];
            super::read_exact_at(&self.file, &mut b, page_off)?;
            Ok(b)
        })?;
        Ok(be64_or_zero(&table, (byte % cs) as usize) & OFFSET_MASK)
    }

    /// The L2 table at `offset`, checked to lie after the header and inside the file.
    fn l2_table(&self, offset: u64) -> io::Result<Arc<[u8]>> {
        let cs = self.cs();
        if !offset.is_multiple_of(cs) || offset < cs {
            return Err(bad_data(
                &self.path,
                format!("L2 table at offset {offset} is unaligned or overlaps the header"),
            ));
        }
        if offset.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return Err(bad_data(
                &self.path,
                format!("L2 table at offset {offset} extends past the end of the file"),
            ));
        }
        self.l2_tables.get_or_load(offset, || {
            let mut b = vec![0u8; cs as usize];
            super::read_exact_at(&self.file, &mut b, offset)?;
            Ok(b)
        })
    }

    /// Call `f(pos, len, state)` for each run of `[pos, end)` in order (`end` ≤ size),
    /// runs ending at cluster, like-subcluster or unmapped-L1-span boundaries (clipped to
    /// `end`). The L1 entry and L2 table are looked up once per table, not per cluster:
    /// the cache's lock and bookkeeping were most of a sequential read's CPU time.
    fn walk(
        &self,
        mut pos: u64,
        end: u64,
        mut f: impl FnMut(u64, u64, State) -> io::Result<()>,
    ) -> io::Result<()> {
        let span = self.l1_span();
        while pos < end {
            let span_end = (pos - pos % span).saturating_add(span).min(end);
            let l2_off = self.l1_entry(pos / span)?;
            if l2_off == 0 {
                f(pos, span_end - pos, State::Unalloc)?;
                pos = span_end;
                continue;
            }
            let table = self.l2_table(l2_off)?;
            while pos < span_end {
                let (state, len) = self.entry_state(&table, pos)?;
                let n = len.min(span_end - pos);
                f(pos, n, state)?;
                pos += n;
            }
        }
        Ok(())
    }

    /// State of the run starting at virtual byte `pos` within the cluster that `table`
    /// (the L2 table of `pos`'s L1 span) maps, and its length to the end of the cluster
    /// or of a run of like subclusters.
    fn entry_state(&self, table: &[u8], pos: u64) -> io::Result<(State, u64)> {
        let cs = self.cs();
        let span = self.l1_span();
        let index = (pos % span) / cs;
        let esize = self.header.l2_entry_size();
        let at = (index * esize) as usize;
        let entry = be64_or_zero(table, at);
        let within = pos % cs;
        if entry & OFLAG_COMPRESSED != 0 {
            return self.compressed_state(entry, within);
        }
        let host = entry & OFFSET_MASK;
        let allocated = host != 0 || (self.data.is_some() && entry & OFLAG_COPIED != 0);
        if allocated {
            if !host.is_multiple_of(cs) {
                return Err(bad_data(
                    &self.path,
                    format!("data cluster offset {host} is not cluster-aligned"),
                ));
            }
            if self.data.is_none() && host < cs {
                return Err(bad_data(
                    &self.path,
                    format!("data cluster at offset {host} overlaps the header"),
                ));
            }
        }
        if !self.header.extended_l2() {
            let state = if entry & OFLAG_ZERO != 0 {
                State::Zero
            } else if allocated {
                State::Data(host + within)
            } else {
                State::Unalloc
            };
            return Ok((state, cs - within));
        }
        let bitmap = be64_or_zero(table, at + 8);
        let (alloc, zero) = (bitmap & 0xffff_ffff, bitmap >> 32);
        if alloc & zero != 0 || (!allocated && alloc != 0) {
            return Err(bad_data(
                &self.path,
                format!(
                    "invalid subcluster bitmap {bitmap:#018x} for the cluster at virtual offset {}",
                    pos - within
                ),
            ));
        }
        let sc_size = cs / SUBCLUSTERS;
        let kind = |i: u64| {
            if alloc >> i & 1 != 0 {
                0
            } else if zero >> i & 1 != 0 {
                1
            } else {
                2
            }
        };
        let first = within / sc_size;
        let mut last = first;
        while last + 1 < SUBCLUSTERS && kind(last + 1) == kind(first) {
            last += 1;
        }
        let len = (last + 1) * sc_size - within;
        let state = match kind(first) {
            0 => State::Data(host + within),
            1 => State::Zero,
            _ => State::Unalloc,
        };
        Ok((state, len))
    }

    fn compressed_state(&self, entry: u64, within: u64) -> io::Result<(State, u64)> {
        if self.data.is_some() {
            return Err(bad_data(
                &self.path,
                "compressed cluster in an image with an external data file".into(),
            ));
        }
        let cb = self.header.cluster_bits;
        // Compressed cluster descriptor: offset in bits 0..x-1, additional 512-byte
        // sectors in bits x..61, x = 62 - (cluster_bits - 8).
        let x = 62 - (cb - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
        let size = sectors * 512 - (offset & 511);
        Ok((State::Compressed(offset, size), self.cs() - within))
    }

    /// The decompressed cluster whose compressed bytes are at `offset`.
    fn decompressed(&self, offset: u64, size: u64) -> io::Result<Arc<[u8]>> {
        if let Some((o, c)) = &*self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            if *o == offset {
                return Ok(c.clone());
            }
        }
        if offset >= self.file_len {
            return Err(bad_data(
                &self.path,
                format!("compressed cluster at offset {offset} lies past the end of the file"),
            ));
        }
        // QEMU rounds the size up to whole sectors, which may run past the end of the file
        // for the last cluster; the stream itself must be complete.
        let avail = size.min(self.file_len - offset);
        let mut input = vec![0u8; avail as usize];
        super::read_exact_at(&self.file, &mut input, offset)?;
        let mut out = vec![0u8; self.cs() as usize];
        compress::decompress_cluster(self.header.compression, &input, &mut out).map_err(|w| {
            bad_data(
                &self.path,
                format!("compressed cluster at offset {offset} ({size} bytes): {w}"),
            )
        })?;
        let out: Arc<[u8]> = out.into();
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((offset, out.clone()));
        Ok(out)
    }

    /// Read uncompressed data at `host`; bytes past the end of the file read as zeros, as
    /// QEMU reads them.
    fn read_host(&self, buf: &mut [u8], host: u64) -> io::Result<()> {
        let (file, len) = match &self.data {
            Some(d) => (&d.file, d.len),
            None => (&self.file, self.file_len),
        };
        let have = len.saturating_sub(host).min(buf.len() as u64) as usize;
        super::read_exact_at(file, &mut buf[..have], host)?;
        buf[have..].fill(0);
        Ok(())
    }

    /// Read from the backing file; past its end (or without one), zeros.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let have = b.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if have > 0 {
            b.read_at(&mut buf[..have], offset)?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    fn flush(&self, buf: &mut [u8], run: Run) -> io::Result<()> {
        let out = &mut buf[run.start..run.start + run.len];
        match run.kind {
            RunKind::Host(h) => self.read_host(out, h),
            RunKind::Zero => {
                out.fill(0);
                Ok(())
            }
            RunKind::Backing(g) => self.read_backing(out, g),
        }
    }

    /// Allocation map of the backing file over `[a, b)`, holes past its end.
    fn backing_extents(&self, a: u64, b: u64) -> io::Result<Vec<Extent>> {
        let mut out = Vec::new();
        let hole = |offset, length| Extent {
            offset,
            length,
            allocated: false,
        };
        let Some(back) = &self.backing else {
            super::push_extent(&mut out, hole(a, b - a));
            return Ok(out);
        };
        let mid = b.min(back.size()).max(a);
        if a < mid {
            for e in back.extents(a, mid - a)? {
                super::push_extent(&mut out, e);
            }
        }
        super::push_extent(&mut out, hole(mid, b - mid));
        Ok(out)
    }

    /// Bytes this file stores data for, by reading its L2 tables (bounded).
    fn count_allocated(&self) -> Option<u64> {
        let cs = self.cs();
        let mut total: u64 = 0;
        let mut read: u64 = 0;
        let span = self.l1_span();
        let entries = self.header.l1_needed(self.size);
        for i in 0..entries {
            let l2 = self.l1_entry(i).ok()?;
            if l2 == 0 {
                continue;
            }
            read += cs;
            if read > MAX_COUNT_L2_BYTES {
                return None;
            }
            let end = ((i + 1) * span).min(self.size);
            self.walk(i * span, end, |_, len, state| {
                if matches!(state, State::Data(_) | State::Compressed(..)) {
                    total += len;
                }
                Ok(())
            })
            .ok()?;
        }
        Some(total)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    /// Uncompressed data from this host offset on.
    Host(u64),
    Zero,
    /// The backing file from this virtual offset on.
    Backing(u64),
}

/// One contiguous piece of a read.
#[derive(Debug, Clone, Copy)]
struct Run {
    kind: RunKind,
    start: usize,
    len: usize,
}

impl Run {
    fn continues(&self, next: RunKind) -> bool {
        let n = self.len as u64;
        match (self.kind, next) {
            (RunKind::Host(a), RunKind::Host(b)) => a.checked_add(n) == Some(b),
            (RunKind::Backing(a), RunKind::Backing(b)) => a.checked_add(n) == Some(b),
            (RunKind::Zero, RunKind::Zero) => true,
            _ => false,
        }
    }
}

impl BlockSource for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = super::check_read(self.size, offset, buf.len() as u64)?;
        let mut run: Option<Run> = None;
        self.walk(offset, end, |pos, n, state| {
            let start = (pos - offset) as usize;
            let kind = match state {
                State::Data(h) => RunKind::Host(h),
                State::Zero => RunKind::Zero,
                State::Unalloc if self.backing.is_none() => RunKind::Zero,
                State::Unalloc => RunKind::Backing(pos),
                State::Compressed(coff, csize) => {
                    if let Some(r) = run.take() {
                        self.flush(buf, r)?;
                    }
                    let cluster = self.decompressed(coff, csize)?;
                    let within = (pos % self.cs()) as usize;
                    buf[start..start + n as usize]
                        .copy_from_slice(&cluster[within..within + n as usize]);
                    return Ok(());
                }
            };
            match run.as_mut() {
                // Contiguous clusters of one file become one pread; zeros one fill.
                Some(r) if r.continues(kind) => r.len += n as usize,
                _ => {
                    if let Some(r) = run.take() {
                        self.flush(buf, r)?;
                    }
                    run = Some(Run {
                        kind,
                        start,
                        len: n as usize,
                    });
                }
            }
            Ok(())
        })?;
        match run {
            Some(r) => self.flush(buf, r),
            None => Ok(()),
        }
    }

    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        // This file's own map: (offset, length, state) with Unalloc left to resolve.
        let mut own: Vec<(u64, u64, bool, bool)> = Vec::new(); // (off, len, allocated, falls through)
        self.walk(offset.min(end), end, |pos, n, state| {
            let (alloc, through) = match state {
                State::Data(_) | State::Compressed(..) => (true, false),
                State::Zero => (false, false),
                State::Unalloc => (false, self.backing.is_some()),
            };
            match own.last_mut() {
                Some(l) if l.2 == alloc && l.3 == through => l.1 += n,
                _ => own.push((pos, n, alloc, through)),
            }
            Ok(())
        })?;
        let span = (
            own.iter().find(|r| r.3).map(|r| r.0),
            own.iter().rfind(|r| r.3).map(|r| r.0 + r.1),
        );
        let lower = match span {
            (Some(a), Some(b)) => self.backing_extents(a, b)?,
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        let mut li = 0;
        for (off, len, alloc, through) in own {
            if !through {
                super::push_extent(
                    &mut out,
                    Extent {
                        offset: off,
                        length: len,
                        allocated: alloc,
                    },
                );
                continue;
            }
            let upper = [Extent {
                offset: off,
                length: len,
                allocated: false,
            }];
            // Skip lower extents wholly before this run; the rest start the overlay, so
            // the whole map costs one pass over `lower`.
            while li < lower.len() && lower[li].offset + lower[li].length <= off {
                li += 1;
            }
            super::overlay_extents(&upper, &lower[li..], &mut out);
        }
        Ok(out)
    }

    fn layers(&self) -> Vec<LayerInfo> {
        let h = &self.header;
        let mut version = format!("v{}", h.version);
        if h.compression == Compression::Zstd {
            version += ", zstd";
        }
        if h.extended_l2() {
            version += ", extended L2";
        }
        if let Some(d) = &self.data {
            version += &format!(", data file {}", d.path.display());
        }
        if let Some(i) = self.chosen {
            version += &format!(
                ", snapshot {} {:?}",
                self.snapshots[i].id, self.snapshots[i].name
            );
        }
        let mut out = vec![LayerInfo {
            path: self.path.clone(),
            format: "qcow2".into(),
            version: Some(version),
            role: self.role.clone(),
            cluster_size: Some(self.cs()),
            allocated_bytes: *self.allocated.get_or_init(|| self.count_allocated()),
        }];
        if let Some(b) = &self.backing {
            out.extend(b.layers().into_iter().map(|mut l| {
                if l.role == "image" || l.role == "top" {
                    l.role = "backing".into();
                }
                l
            }));
        }
        out
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                disk_size: s.disk_size,
                date: s.date_sec.into(),
                vm_state_size: s.vm_state_size,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
