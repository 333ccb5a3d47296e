//! OpenVZ ploop / Parallels expanding images (v1 and v2 headers), and chains of them.
//!
//! Layout (QEMU docs/interop/parallels.rst; OpenVZ ploop include/ploop1_image.h): a 64-byte
//! little-endian header, then the BAT (one u32 per cluster of the virtual disk) from byte
//! 64, then data clusters in any order. A BAT entry of 0 means "not allocated": the cluster
//! reads as zeros, or from the next delta down in a chain. What is read matches QEMU's
//! `parallels` driver (block/parallels.c) for both magics: the version field must be 2, the
//! v1 size is the low 32 bits of the size field, v1 entries count 512-byte sectors and v2
//! entries count clusters. Fields QEMU ignores when reading (flags, data offset, format
//! extension) are ignored here too, so both agree byte for byte.
//!
//! [`descriptor`] opens the DiskDescriptor.xml that names a chain of such deltas (and of
//! raw `Plain` files) for OpenVZ and Parallels Desktop; [`xml`] is its bounded reader.

pub mod descriptor;
mod xml;

use super::{BlockSource, Extent, FormatError, LayerInfo};
use crate::bytes::{le32, le64};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Header magic of v1 images: BAT entries are sector offsets (parallels.rst "magic").
pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
/// Header magic of v2 images: BAT entries are cluster indexes, 64-bit size field.
pub const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
/// Size of the header; the BAT starts right after it (parallels.rst "BAT").
pub const HEADER_SIZE: u64 = 64;
/// The only `version` (ploop `m_Type`, PRL_IMAGE_COMPRESSED) QEMU and ploop accept.
pub const HEADER_VERSION: u32 = 2;
/// `m_DiskInUse` value meaning "opened read-write and not closed" (SIGNATURE_DISK_IN_USE).
pub const DISK_IN_USE: u32 = 0x746F_6E59;
/// Bytes per sector: the unit of sizes and v1 BAT entries.
pub const SECTOR_SIZE: u64 = 512;
/// Largest cluster imgsafe reads, in sectors (64 MiB; real images use 63 sectors to 1 MiB).
pub const MAX_CLUSTER_SECTORS: u32 = 131_072;
/// Largest BAT imgsafe loads into memory, in entries (128 MiB of u32; 32 TiB at 1 MiB).
pub const MAX_BAT_ENTRIES: u64 = 1 << 25;

/// Which header magic the file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `WithoutFreeSpace`.
    V1,
    /// `WithouFreSpacExt`.
    V2,
}

impl Version {
    /// The name `imgsafe info` shows.
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A parsed and range-checked ploop header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which magic, and so how BAT entries and the size field are read.
    pub version: Version,
    /// Cluster size in sectors (`m_Sectors`, "tracks" in QEMU); 1..=MAX_CLUSTER_SECTORS.
    pub cluster_sectors: u32,
    /// Number of BAT entries (`m_Size`).
    pub bat_entries: u32,
    /// Virtual disk size in sectors (`m_SizeInSectors`, u32 in v1, u64 in v2).
    pub size_sectors: u64,
    /// `m_DiskInUse` says the image was not closed cleanly.
    pub in_use: bool,
}

impl Header {
    /// Parse the first 64 bytes of a file. The error is the message after the file name.
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_SIZE as usize {
            return Err(format!(
                "file too short for a ploop header ({} bytes, need 64)",
                b.len()
            ));
        }
        let version = match &b[..16] {
            m if m == MAGIC_V1 => Version::V1,
            m if m == MAGIC_V2 => Version::V2,
            _ => return Err("not a ploop image (bad header magic)".into()),
        };
        let m_type = le32(b, 16);
        if m_type != HEADER_VERSION {
            return Err(format!(
                "unsupported header version {m_type} (m_Type), expected 2"
            ));
        }
        let cluster_sectors = le32(b, 28);
        if cluster_sectors == 0 || cluster_sectors > MAX_CLUSTER_SECTORS {
            return Err(format!(
                "cluster size m_Sectors={cluster_sectors} sectors is out of range (1..={MAX_CLUSTER_SECTORS})"
            ));
        }
        let bat_entries = le32(b, 32);
        // v1 keeps a u32 here and the next 4 bytes are unused; QEMU masks them off too.
        let size_sectors = match version {
            Version::V1 => u64::from(le32(b, 36)),
            Version::V2 => le64(b, 36),
        };
        if size_sectors.checked_mul(SECTOR_SIZE).is_none() {
            return Err(format!(
                "disk size m_SizeInSectors={size_sectors} overflows"
            ));
        }
        let header = Header {
            version,
            cluster_sectors,
            bat_entries,
            size_sectors,
            in_use: le32(b, 44) == DISK_IN_USE,
        };
        let needed = header.clusters_needed();
        if u64::from(bat_entries) < needed {
            return Err(format!(
                "BAT size m_Size={bat_entries} is too small for a disk of {size_sectors} sectors (needs {needed} entries)"
            ));
        }
        if needed > MAX_BAT_ENTRIES {
            return Err(format!(
                "disk needs {needed} BAT entries, more than the {MAX_BAT_ENTRIES} imgsafe reads"
            ));
        }
        Ok(header)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.cluster_sectors) * SECTOR_SIZE
    }

    /// Virtual disk size in bytes (checked not to overflow by [`Header::parse`]).
    pub fn disk_size(&self) -> u64 {
        self.size_sectors * SECTOR_SIZE
    }

    /// BAT entries that map the virtual disk; later entries are ignored, as QEMU does.
    pub fn clusters_needed(&self) -> u64 {
        self.size_sectors.div_ceil(u64::from(self.cluster_sectors))
    }

    /// End of the header and the whole on-disk BAT, in bytes.
    pub fn bat_end(&self) -> u64 {
        HEADER_SIZE + 4 * u64::from(self.bat_entries)
    }

    /// Byte offset in the file of the cluster a non-zero BAT entry points to.
    pub fn host_offset(&self, entry: u32) -> u64 {
        match self.version {
            Version::V1 => u64::from(entry) * SECTOR_SIZE,
            // entry < 2^32 and cluster_size <= 2^26, so this cannot overflow.
            Version::V2 => u64::from(entry) * self.cluster_size(),
        }
    }

    /// Bytes of virtual cluster `index` that lie inside the disk (the last may be short).
    pub fn cluster_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.cluster_size());
        self.disk_size()
            .saturating_sub(start)
            .min(self.cluster_size())
    }
}

/// Decode and check the BAT entries that map the disk, from the little-endian bytes that
/// follow the header. Every allocated entry must point after the header and BAT and its
/// whole in-disk part must lie inside a file of `file_len` bytes.
pub fn parse_bat(header: &Header, bat: &[u8], file_len: u64) -> Result<Vec<u32>, String> {
    let needed = header.clusters_needed() as usize; // bounded by MAX_BAT_ENTRIES
    if bat.len() / 4 < needed {
        return Err(format!(
            "BAT ({} entries) extends past the end of the file",
            header.bat_entries
        ));
    }
    let mut entries = Vec::with_capacity(needed);
    for (i, raw) in bat.chunks_exact(4).take(needed).enumerate() {
        let entry = le32(raw, 0);
        if entry != 0 {
            check_entry(header, i as u64, entry, file_len)?;
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn check_entry(header: &Header, index: u64, entry: u32, file_len: u64) -> Result<(), String> {
    let host = header.host_offset(entry);
    if host < header.bat_end() {
        return Err(format!(
            "BAT entry {index} points into the header or BAT (byte {host})"
        ));
    }
    let end = host.checked_add(header.cluster_len(index));
    if end.is_none_or(|e| e > file_len) {
        return Err(format!(
            "BAT entry {index} points past the end of the file (byte {host} of {file_len})"
        ));
    }
    Ok(())
}

/// What one file of a chain holds.
#[derive(Debug)]
enum DeltaKind {
    /// A ploop file: cluster `i` is at `header.host_offset(bat[i])` when `bat[i] != 0`.
    Ploop { header: Header, bat: Vec<u32> },
    /// A raw ("Plain") base image: the file is the disk, every cluster is allocated.
    Plain { len: u64 },
}

/// One opened file of a ploop image: a ploop delta or a raw base.
#[derive(Debug)]
pub struct Delta {
    path: PathBuf,
    file: File,
    kind: DeltaKind,
}

impl Delta {
    /// Open a ploop file: parse and check its header and BAT. Warns once on stderr when the
    /// image is marked in use (it is read anyway: imgsafe never writes it).
    pub fn open_ploop(path: &Path, file: File) -> Result<Delta, FormatError> {
        let len = super::file_len(path, &file)?;
        let mut head = [0u8; HEADER_SIZE as usize];
        let got = usize::try_from(len).unwrap_or(usize::MAX).min(head.len());
        super::read_exact_at(&file, &mut head[..got], 0).map_err(|e| FormatError::io(path, e))?;
        let header = Header::parse(&head[..got]).map_err(|w| FormatError::corrupt(path, w))?;
        let bat_len = header.clusters_needed() * 4; // <= 4 * MAX_BAT_ENTRIES
        if HEADER_SIZE + bat_len > len {
            let what = format!(
                "BAT ({} entries) extends past the end of the file",
                header.bat_entries
            );
            return Err(FormatError::corrupt(path, what));
        }
        let mut raw = vec![0u8; bat_len as usize];
        super::read_exact_at(&file, &mut raw, HEADER_SIZE).map_err(|e| FormatError::io(path, e))?;
        let bat = parse_bat(&header, &raw, len).map_err(|w| FormatError::corrupt(path, w))?;
        if header.in_use {
            eprintln!(
                "imgsafe: warning: {}: image is marked in use (m_DiskInUse); it may be open for writing elsewhere, reading it anyway",
                path.display()
            );
        }
        Ok(Delta {
            path: path.to_path_buf(),
            file,
            kind: DeltaKind::Ploop { header, bat },
        })
    }

    /// Use a raw file as the base of a chain.
    pub fn open_plain(path: &Path, file: File) -> Result<Delta, FormatError> {
        let len = super::file_len(path, &file)?;
        Ok(Delta {
            path: path.to_path_buf(),
            file,
            kind: DeltaKind::Plain { len },
        })
    }

    /// The file this delta was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header, for ploop deltas.
    pub fn header(&self) -> Option<&Header> {
        match &self.kind {
            DeltaKind::Ploop { header, .. } => Some(header),
            DeltaKind::Plain { .. } => None,
        }
    }

    /// Length of the file in bytes for a raw delta.
    pub fn plain_len(&self) -> Option<u64> {
        match self.kind {
            DeltaKind::Plain { len } => Some(len),
            DeltaKind::Ploop { .. } => None,
        }
    }

    /// File offset of virtual cluster `index`, or `None` when this delta does not store it.
    fn locate(&self, index: u64, cluster_size: u64) -> Option<u64> {
        match &self.kind {
            DeltaKind::Ploop { header, bat } => {
                let entry = *bat.get(usize::try_from(index).ok()?)?;
                (entry != 0).then(|| header.host_offset(entry))
            }
            DeltaKind::Plain { len } => {
                let off = index.checked_mul(cluster_size)?;
                (off < *len).then_some(off)
            }
        }
    }

    /// Bytes of a disk of `disk_size` bytes this delta stores data for.
    fn allocated_bytes(&self, disk_size: u64) -> u64 {
        match &self.kind {
            DeltaKind::Ploop { header, bat } => bat
                .iter()
                .enumerate()
                .filter(|(_, &e)| e != 0)
                .map(|(i, _)| header.cluster_len(i as u64))
                .sum(),
            DeltaKind::Plain { len } => (*len).min(disk_size),
        }
    }
}

/// A run of the virtual disk served by one contiguous read (or a hole).
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Delta index and file offset of the run's first byte; `None` for zeros.
    source: Option<(usize, u64)>,
    /// Where the run starts in the caller's buffer.
    start: usize,
    /// Length in bytes.
    len: u64,
}

impl Run {
    /// True when `next` (the source of the byte right after this run) continues it.
    fn continues(&self, next: Option<(usize, u64)>) -> bool {
        match (self.source, next) {
            (None, None) => true,
            (Some((d, h)), Some((nd, nh))) => d == nd && h.checked_add(self.len) == Some(nh),
            _ => false,
        }
    }
}

/// A ploop image: one file, or a chain of deltas (top first) that all share one cluster
/// size. A read goes to the top delta and falls down the chain cluster by cluster.
///
/// Why a flat list here, when VHD, VHDX, VDI, VMDK and qcow2 stack their parent as a
/// [`BlockSource`] (through [`crate::format::open_layer`]): every delta of a ploop chain
/// shares one cluster size and one BAT geometry, set by the descriptor, so the lookup for
/// one cluster is an index into each BAT in turn, and a run of clusters that resolve to
/// the same delta is read with one pread; the `Plain` base is a delta kind with an
/// identity map. Those formats' layers each have their own block size and parent
/// format, so there the parent is just another source.
#[derive(Debug)]
pub struct Chain {
    deltas: Vec<Delta>,
    roles: Vec<String>,
    cluster_size: u64,
    size: u64,
}

impl Chain {
    /// Build a chain from deltas ordered top first. The caller has checked that the
    /// deltas agree on cluster size and disk size, and that a raw delta can only be the
    /// last (the base); `roles` names each one for `info`.
    pub fn new(deltas: Vec<Delta>, roles: Vec<String>, cluster_size: u64, size: u64) -> Chain {
        Chain {
            deltas,
            roles,
            cluster_size,
            size,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The topmost delta storing virtual cluster `index`, and the file offset there.
    fn locate(&self, index: u64) -> Option<(usize, u64)> {
        self.deltas
            .iter()
            .enumerate()
            .find_map(|(d, delta)| delta.locate(index, self.cluster_size).map(|h| (d, h)))
    }

    /// Map of `[offset, end)` by the ploop deltas alone: allocated where one stores the
    /// cluster, a hole where a read falls through to the raw base or zeros.
    fn delta_extents(&self, offset: u64, end: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        if self.deltas.iter().all(|d| d.header().is_none()) {
            // No BAT to consult: skip stepping through the clusters one by one.
            super::push_extent(
                &mut out,
                Extent {
                    offset,
                    length: end.saturating_sub(offset),
                    allocated: false,
                },
            );
            return out;
        }
        let cs = self.cluster_size;
        let mut pos = offset;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            let index = pos / cs;
            let allocated = self
                .deltas
                .iter()
                .any(|d| d.header().is_some() && d.locate(index, cs).is_some());
            super::push_extent(
                &mut out,
                Extent {
                    offset: pos,
                    length: n,
                    allocated,
                },
            );
            pos += n;
        }
        out
    }

    /// Map of `[offset, end)` below every ploop delta: the raw base's own data and holes,
    /// read from the file system in one go (bytes past the base file are holes), or one
    /// hole when there is no raw base.
    fn base_extents(&self, offset: u64, end: u64) -> Vec<Extent> {
        let hole = |offset: u64, end: u64| Extent {
            offset,
            length: end.saturating_sub(offset),
            allocated: false,
        };
        let mut out = Vec::new();
        match self.deltas.last() {
            Some(Delta {
                file,
                kind: DeltaKind::Plain { len },
                ..
            }) => {
                let data_end = end.min(*len);
                if offset < data_end {
                    out = super::file_extents(file, offset, data_end);
                }
                super::push_extent(&mut out, hole(offset.max(data_end), end));
            }
            _ => super::push_extent(&mut out, hole(offset, end)),
        }
        out
    }

    fn flush(&self, buf: &mut [u8], run: Run) -> io::Result<()> {
        let out = &mut buf[run.start..run.start + run.len as usize];
        match run.source {
            None => {
                out.fill(0);
                Ok(())
            }
            Some((d, host)) => super::read_exact_at(&self.deltas[d].file, out, host),
        }
    }
}

impl BlockSource for Chain {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = super::check_read(self.size, offset, buf.len() as u64)?;
        let cs = self.cluster_size;
        let mut run: Option<Run> = None;
        let mut pos = offset;
        while pos < end {
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let source = self.locate(pos / cs).map(|(d, host)| (d, host + within));
            match run.as_mut() {
                // Contiguous clusters of one file become one pread; adjacent holes one fill.
                Some(r) if r.continues(source) => r.len += n,
                _ => {
                    if let Some(r) = run.take() {
                        self.flush(buf, r)?;
                    }
                    run = Some(Run {
                        source,
                        start: (pos - offset) as usize,
                        len: n,
                    });
                }
            }
            pos += n;
        }
        match run {
            Some(r) => self.flush(buf, r),
            None => Ok(()),
        }
    }

    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let own = self.delta_extents(offset, end);
        let lower = match super::holes_span(&own) {
            Some((a, b)) => self.base_extents(a, b),
            None => Vec::new(),
        };
        let mut out = Vec::new();
        super::overlay_extents(&own, &lower, &mut out);
        Ok(out)
    }

    fn layers(&self) -> Vec<LayerInfo> {
        self.deltas
            .iter()
            .zip(&self.roles)
            .map(|(d, role)| LayerInfo {
                path: d.path.clone(),
                format: if d.header().is_some() { "ploop" } else { "raw" }.into(),
                version: d.header().map(|h| h.version.name().to_string()),
                role: role.clone(),
                cluster_size: d.header().map(Header::cluster_size),
                allocated_bytes: Some(d.allocated_bytes(self.size)),
            })
            .collect()
    }
}

/// True if `head` starts with a ploop v1 or v2 header magic.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(MAGIC_V1) || head.starts_with(MAGIC_V2)
}

/// Open one ploop file on its own (no chain).
pub fn open_single(path: &Path, file: File) -> Result<Box<dyn BlockSource>, FormatError> {
    let delta = Delta::open_ploop(path, file)?;
    let header = delta
        .header()
        .cloned()
        .expect("open_ploop returns a ploop delta");
    Ok(Box::new(Chain::new(
        vec![delta],
        vec!["image".into()],
        header.cluster_size(),
        header.disk_size(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    /// Test-only in-memory header builder. Not the integration tests' writer
    /// (tests/support/ploopwriter.rs) on purpose: that one makes valid files from disk
    /// contents for qemu-img to compare against; this one sets header fields one by
    /// one so each test can break exactly one (version, BAT size, in-use flag, ...)
    /// and puts each cluster at a chosen slot, and it needs no file.
    #[derive(Clone)]
    struct HeaderBuilder {
        magic: [u8; 16],
        version: u32,
        cluster_sectors: u32,
        bat_entries: u32,
        size_sectors: u64,
        in_use: u32,
    }

    impl HeaderBuilder {
        fn v2(cluster_sectors: u32, size_sectors: u64) -> Self {
            HeaderBuilder {
                magic: *MAGIC_V2,
                version: 2,
                cluster_sectors,
                bat_entries: size_sectors.div_ceil(u64::from(cluster_sectors)) as u32,
                size_sectors,
                in_use: 0,
            }
        }

        fn v1(cluster_sectors: u32, size_sectors: u64) -> Self {
            HeaderBuilder {
                magic: *MAGIC_V1,
                ..Self::v2(cluster_sectors, size_sectors)
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = vec![0u8; 64];
            b[..16].copy_from_slice(&self.magic);
            b[16..20].copy_from_slice(&self.version.to_le_bytes());
            b[20..24].copy_from_slice(&16u32.to_le_bytes());
            b[28..32].copy_from_slice(&self.cluster_sectors.to_le_bytes());
            b[32..36].copy_from_slice(&self.bat_entries.to_le_bytes());
            b[36..44].copy_from_slice(&self.size_sectors.to_le_bytes());
            b[44..48].copy_from_slice(&self.in_use.to_le_bytes());
            b
        }

        /// A whole image: header, BAT, data clusters placed at `placement[i]` (a data-area
        /// slot) for virtual cluster `i`, filled with byte `i + 1`; `None` = unallocated.
        fn image(&self, placement: &[Option<u32>]) -> Vec<u8> {
            let cs = u64::from(self.cluster_sectors) * 512;
            let bat_end = 64 + 4 * u64::from(self.bat_entries);
            let data_start = bat_end.div_ceil(cs) * cs;
            let mut img = self.bytes();
            img.resize(bat_end as usize, 0);
            for (i, slot) in placement.iter().enumerate() {
                let Some(slot) = slot else { continue };
                let host = data_start + u64::from(*slot) * cs;
                let entry = if self.magic == *MAGIC_V1 {
                    host / 512
                } else {
                    host / cs
                } as u32;
                img[64 + 4 * i..68 + 4 * i].copy_from_slice(&entry.to_le_bytes());
                if img.len() < (host + cs) as usize {
                    img.resize((host + cs) as usize, 0);
                }
                img[host as usize..(host + cs) as usize].fill(i as u8 + 1);
            }
            img
        }
    }

    fn open_bytes(bytes: &[u8]) -> Result<Box<dyn BlockSource>, FormatError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        open_single(f.path(), File::open(f.path()).unwrap())
    }

    fn read_all(src: &dyn BlockSource) -> Vec<u8> {
        let mut buf = vec![0u8; src.size() as usize];
        src.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn parses_v2_header() {
        let b = HeaderBuilder::v2(2048, 8192).bytes();

        let h = Header::parse(&b).unwrap();

        assert_eq!(h.version, Version::V2);
        assert_eq!(h.cluster_size(), 1 << 20);
        assert_eq!(h.disk_size(), 4 << 20);
        assert_eq!(h.clusters_needed(), 4);
    }

    #[test]
    fn v1_size_uses_low_32_bits_only() {
        let mut hb = HeaderBuilder::v1(8, 64);
        hb.size_sectors = (1 << 32) | 64;

        let h = Header::parse(&hb.bytes()).unwrap();

        assert_eq!(h.size_sectors, 64);
    }

    #[test]
    fn refuses_zero_cluster_size() {
        let mut hb = HeaderBuilder::v2(8, 64);
        hb.cluster_sectors = 0;

        let err = Header::parse(&hb.bytes()).unwrap_err();

        assert!(err.contains("m_Sectors=0"), "{err}");
    }

    #[test]
    fn refuses_huge_cluster_size() {
        let mut hb = HeaderBuilder::v2(8, 64);
        hb.cluster_sectors = MAX_CLUSTER_SECTORS + 1;

        let err = Header::parse(&hb.bytes()).unwrap_err();

        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn refuses_bat_too_small_for_disk() {
        let mut hb = HeaderBuilder::v2(8, 64);
        hb.bat_entries = 7;

        let err = Header::parse(&hb.bytes()).unwrap_err();

        assert!(err.contains("m_Size=7"), "{err}");
    }

    #[test]
    fn refuses_wrong_version() {
        let mut hb = HeaderBuilder::v2(8, 64);
        hb.version = 3;

        let err = Header::parse(&hb.bytes()).unwrap_err();

        assert!(err.contains("version 3"), "{err}");
    }

    #[test]
    fn refuses_overflowing_v2_size() {
        let mut hb = HeaderBuilder::v2(8, 64);
        hb.size_sectors = u64::MAX / 100;

        let err = Header::parse(&hb.bytes()).unwrap_err();

        assert!(err.contains("overflows"), "{err}");
    }

    #[test]
    fn refuses_short_header() {
        let err = Header::parse(&MAGIC_V2[..]).unwrap_err();

        assert!(err.contains("too short"), "{err}");
    }

    #[test]
    fn reads_shuffled_v2_clusters() {
        let hb = HeaderBuilder::v2(8, 32);
        let img = hb.image(&[Some(2), None, Some(0), Some(1)]);

        let src = open_bytes(&img).unwrap();
        let data = read_all(&*src);

        assert_eq!(&data[..4096], &[1u8; 4096][..]);
        assert_eq!(&data[4096..8192], &[0u8; 4096][..]);
        assert_eq!(&data[8192..12288], &[3u8; 4096][..]);
        assert_eq!(&data[12288..], &[4u8; 4096][..]);
    }

    #[test]
    fn reads_v1_with_63_sector_clusters_and_short_last_cluster() {
        let hb = HeaderBuilder::v1(63, 100);
        let img = hb.image(&[Some(1), Some(0)]);

        let src = open_bytes(&img).unwrap();
        let data = read_all(&*src);

        assert_eq!(data.len(), 100 * 512);
        assert_eq!(&data[..63 * 512], &vec![1u8; 63 * 512][..]);
        assert_eq!(&data[63 * 512..], &vec![2u8; 37 * 512][..]);
    }

    #[test]
    fn unaligned_read_across_clusters() {
        let hb = HeaderBuilder::v2(1, 4);
        let img = hb.image(&[Some(3), Some(2), None, Some(0)]);
        let src = open_bytes(&img).unwrap();
        let mut buf = [0u8; 1024];

        src.read_at(&mut buf, 500).unwrap();

        assert_eq!(&buf[..12], &[1u8; 12]);
        assert_eq!(&buf[12..524], &[2u8; 512][..]);
        assert_eq!(&buf[524..], &[0u8; 500][..]);
    }

    #[test]
    fn refuses_read_past_end() {
        let img = HeaderBuilder::v2(8, 16).image(&[None, None]);
        let src = open_bytes(&img).unwrap();
        let mut buf = [0u8; 16];

        let err = src.read_at(&mut buf, 16 * 512 - 8).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn refuses_entry_past_end_of_file() {
        let hb = HeaderBuilder::v2(8, 32);
        let mut img = hb.image(&[Some(0), None, None, None]);
        img[64 + 4 * 2..64 + 4 * 3].copy_from_slice(&1000u32.to_le_bytes());

        let err = open_bytes(&img).err().unwrap().to_string();

        assert!(
            err.contains("BAT entry 2 points past the end of the file"),
            "{err}"
        );
    }

    #[test]
    fn refuses_entry_into_header() {
        let mut hb = HeaderBuilder::v1(8, 32);
        hb.bat_entries = 300; // the on-disk BAT runs to byte 1264, past sector 1
        let mut img = hb.image(&[None, None, None, None]);
        img[64 + 8..64 + 12].copy_from_slice(&1u32.to_le_bytes());

        let err = open_bytes(&img).err().unwrap().to_string();

        assert!(
            err.contains("BAT entry 2 points into the header or BAT"),
            "{err}"
        );
    }

    #[test]
    fn refuses_bat_past_end_of_file() {
        let mut bytes = HeaderBuilder::v2(8, 8 * 100).bytes();
        bytes.extend_from_slice(&[0u8; 8]);

        let err = open_bytes(&bytes).err().unwrap().to_string();

        assert!(
            err.contains("BAT (100 entries) extends past the end of the file"),
            "{err}"
        );
    }

    #[test]
    fn extents_merge_runs_and_report_holes() {
        let img = HeaderBuilder::v2(8, 32).image(&[Some(0), Some(1), None, Some(2)]);
        let src = open_bytes(&img).unwrap();

        let ext = src.extents(0, 16384).unwrap();

        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    length: 8192,
                    allocated: true
                },
                Extent {
                    offset: 8192,
                    length: 4096,
                    allocated: false
                },
                Extent {
                    offset: 12288,
                    length: 4096,
                    allocated: true
                },
            ]
        );
    }

    #[test]
    fn layer_info_counts_allocated_bytes() {
        let img = HeaderBuilder::v1(8, 32).image(&[Some(0), None, Some(1), None]);
        let src = open_bytes(&img).unwrap();

        let layers = src.layers();

        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].version.as_deref(), Some("v1"));
        assert_eq!(layers[0].cluster_size, Some(4096));
        assert_eq!(layers[0].allocated_bytes, Some(8192));
    }

    #[test]
    fn run_continues_only_when_contiguous() {
        let run = Run {
            source: Some((0, 4096)),
            start: 0,
            len: 512,
        };

        assert!(run.continues(Some((0, 4608))));
        assert!(!run.continues(Some((0, 4609))));
        assert!(!run.continues(Some((1, 4608))));
        assert!(!run.continues(None));
    }

    fn ext(offset: u64, length: u64, allocated: bool) -> Extent {
        Extent {
            offset,
            length,
            allocated,
        }
    }

    fn plain(path: &Path) -> Delta {
        Delta::open_plain(path, File::open(path).unwrap()).unwrap()
    }

    #[test]
    fn holes_of_a_raw_base_show_through_the_delta_above() {
        let dir = tempfile::tempdir().unwrap();
        let (top, base) = (dir.path().join("top.hds"), dir.path().join("base.raw"));
        std::fs::write(
            &top,
            HeaderBuilder::v2(128, 512).image(&[None, Some(0), None, None]),
        )
        .unwrap();
        let raw = File::create(&base).unwrap();
        raw.set_len(256 << 10).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&raw, &[7u8; 65536], 192 << 10).unwrap();
        let top = Delta::open_ploop(&top, File::open(&top).unwrap()).unwrap();
        let chain = Chain::new(
            vec![top, plain(&base)],
            vec!["top".into(), "base".into()],
            65536,
            256 << 10,
        );

        let map = chain.extents(0, 256 << 10).unwrap();

        assert_eq!(
            map,
            [
                ext(0, 64 << 10, false),
                ext(64 << 10, 64 << 10, true),
                ext(128 << 10, 64 << 10, false),
                ext(192 << 10, 64 << 10, true)
            ]
        );
    }

    #[test]
    fn huge_sparse_raw_base_with_tiny_clusters_is_mapped_in_one_go() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let raw = File::create(&base).unwrap();
        raw.set_len(8 << 40).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&raw, &[7u8; 65536], 1 << 40).unwrap();
        let chain = Chain::new(vec![plain(&base)], vec!["base".into()], 512, 8 << 40);

        let map = chain.extents(0, 8 << 40).unwrap();

        assert_eq!(
            map,
            [
                ext(0, 1 << 40, false),
                ext(1 << 40, 65536, true),
                ext((1 << 40) + 65536, (7 << 40) - 65536, false)
            ]
        );
    }

    #[test]
    fn alternating_tiny_clusters_are_counted_only_up_to_the_cap() {
        let sectors = 131_072; // 64 MiB of 512-byte clusters, every other one allocated
        let placement: Vec<Option<u32>> = (0..sectors).map(|i| (i % 2 == 0).then_some(0)).collect();
        let src = open_bytes(&HeaderBuilder::v2(1, sectors as u64).image(&placement)).unwrap();

        let capped = super::super::count_allocated(&*src, 100_000).unwrap();
        let counted =
            super::super::count_allocated(&*src, super::super::MAX_COUNTED_EXTENTS).unwrap();

        assert_eq!(capped, None);
        assert_eq!(counted, Some(32 << 20));
    }

    proptest! {
        #[test]
        fn header_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Header::parse(&bytes);
        }

        #[test]
        fn valid_headers_have_consistent_arithmetic(
            v1 in any::<bool>(),
            cluster_sectors in 1u32..=MAX_CLUSTER_SECTORS,
            size_sectors in 0u64..(1 << 31),
        ) {
            let hb = if v1 { HeaderBuilder::v1(cluster_sectors, size_sectors) } else { HeaderBuilder::v2(cluster_sectors, size_sectors) };
            prop_assume!(size_sectors.div_ceil(u64::from(cluster_sectors)) <= MAX_BAT_ENTRIES);

            let h = Header::parse(&hb.bytes()).unwrap();

            let covered: u64 = (0..h.clusters_needed()).map(|i| h.cluster_len(i)).sum();
            prop_assert_eq!(covered, h.disk_size());
            prop_assert!(h.clusters_needed() * h.cluster_size() >= h.disk_size());
        }

        #[test]
        fn bat_parse_accepts_only_in_file_entries(
            entries in proptest::collection::vec(any::<u32>(), 4),
            file_len in 0u64..100_000,
        ) {
            let h = Header::parse(&HeaderBuilder::v1(8, 32).bytes()).unwrap();
            let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();

            match parse_bat(&h, &raw, file_len) {
                Ok(bat) => for (i, &e) in bat.iter().enumerate() {
                    prop_assert!(e == 0 || (h.host_offset(e) >= h.bat_end() && h.host_offset(e) + h.cluster_len(i as u64) <= file_len));
                },
                Err(msg) => prop_assert!(msg.starts_with("BAT entry")),
            }
        }
    }
}
