//! The qcow2 header, its extensions and the snapshot table (QEMU docs/interop/qcow2.txt).
//!
//! Everything here is a pure function of bytes, so the fuzz target can drive it without
//! files. All fields are big-endian.

use crate::bytes::{be32, be64};

/// `QFI\xfb` at offset 0 ("magic").
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Length of a version 2 header, and the fixed part of version 3 ("header_length" is
/// implied for v2).
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest `header_length` of a version 3 header.
pub const V3_HEADER_LEN: u32 = 104;
/// Smallest cluster: `cluster_bits` 9 = 512 bytes ("cluster_bits ... must not be less
/// than 9").
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster QEMU accepts: `cluster_bits` 21 = 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need subclusters of at least 512 bytes: 32 per cluster, so
/// clusters of 16 KiB or more (QEMU refuses smaller ones).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Longest backing file name ("backing_file_size ... must not be longer than 1023").
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most L1 entries QEMU accepts (`QCOW_MAX_L1_SIZE`, 32 MiB of table).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Most internal snapshots QEMU accepts (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65_536;
/// Most bytes of snapshot table read (QEMU allows 64 MiB; 16 MiB holds 65536 snapshots
/// with 200-byte names).
pub const MAX_SNAPSHOT_TABLE: u64 = 16 << 20;
/// Most extra data per snapshot entry (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Largest virtual size read: 2^61 bytes, QEMU's own bound (`QCOW_MAX_L1_SIZE` at 2 MiB
/// clusters), so every byte offset and sum below stays far from u64 overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

/// Incompatible feature bit 0: the image was not closed cleanly (refcounts may be stale;
/// the L1/L2 tables imgsafe reads are still valid).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found metadata corruption and stopped writing.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the header's `compression_type` field is in use.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible bit imgsafe understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
/// Autoclear bit 1: the external data file is a valid raw image of the disk.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table (48-byte entries).
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension: full disk encryption (LUKS) header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// `crypt_method` 1: AES-CBC with the key from a password (legacy qcow2 encryption).
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` 2: LUKS.
pub const CRYPT_LUKS: u32 = 2;

/// How compressed clusters are compressed (`compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// 0: raw deflate (zlib without header), 4 KiB window.
    Deflate,
    /// 1: zstd frames.
    Zstd,
}

/// Why a header cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A field or table is invalid.
    #[error("{0}")]
    Corrupt(String),
    /// Valid, but a feature imgsafe does not read.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

fn corrupt<T>(what: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Corrupt(what.into()))
}

fn unsupported<T>(what: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Unsupported(what.into()))
}

/// The parsed header and extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Number of L1 entries.
    pub l1_size: u64,
    /// File offset of the L1 table.
    pub l1_offset: u64,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// Compressed cluster format.
    pub compression: Compression,
    /// Backing file name as written.
    pub backing: Option<String>,
    /// Backing file format (QEMU's driver name), as written.
    pub backing_format: Option<String>,
    /// External data file name, as written.
    pub data_file: Option<String>,
}

/// Name of incompatible bit `bit`, from the image's feature name table or the spec.
fn incompat_name(bit: u32, names: &[(u8, u8, String)]) -> String {
    names
        .iter()
        .find(|(kind, b, _)| *kind == 0 && u32::from(*b) == bit)
        .map(|(_, _, n)| n.clone())
        .unwrap_or_else(|| format!("bit {bit}"))
}

fn string_at(head: &[u8], at: u64, len: u64, what: &str) -> Result<String, HeaderError> {
    let end = at.checked_add(len).filter(|&e| e <= head.len() as u64);
    let Some(end) = end else {
        return corrupt(format!("{what} lies outside the header cluster"));
    };
    let bytes = &head[at as usize..end as usize];
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_string()),
        _ => corrupt(format!("{what} is not a UTF-8 string")),
    }
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 16 with extended L2, else 8.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// True when L2 entries carry subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }

    /// L1 entries a disk of `size` bytes needs.
    pub fn l1_needed(&self, size: u64) -> u64 {
        size.div_ceil(self.cluster_size() * self.l2_entries())
    }

    /// Parse the header cluster `head` (the file's first cluster, or all of a shorter
    /// file) of a file of `file_len` bytes.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if head.len() < V2_HEADER_LEN as usize {
            return corrupt(format!(
                "file is {} bytes, shorter than a qcow2 header",
                head.len()
            ));
        }
        if &head[..4] != MAGIC {
            return corrupt("bad qcow2 magic");
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return unsupported(format!("qcow2 version {version} (imgsafe reads 2 and 3)"));
        }
        let cluster_bits = be32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return corrupt(format!(
                "cluster_bits {cluster_bits} is out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        match be32(head, 32) {
            0 => {}
            CRYPT_AES => return unsupported("the image is encrypted (AES)"),
            CRYPT_LUKS => return unsupported("the image is encrypted (LUKS)"),
            m => return unsupported(format!("the image is encrypted (unknown method {m})")),
        }
        let (incompatible, autoclear, header_length) = if version == 3 {
            if head.len() < V3_HEADER_LEN as usize {
                return corrupt("file is shorter than a version 3 header");
            }
            (be64(head, 72), be64(head, 88), be32(head, 100))
        } else {
            (0, 0, V2_HEADER_LEN)
        };
        if version == 3
            && (header_length < V3_HEADER_LEN || u64::from(header_length) > cluster_size)
        {
            return corrupt(format!(
                "header_length {header_length} is out of range ({V3_HEADER_LEN}..={cluster_size})"
            ));
        }
        let head = &head[..head.len().min(cluster_size as usize)];
        let exts = extensions(head, header_length)?;
        if exts.crypto {
            return unsupported("the image is encrypted (LUKS header extension)");
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| incompat_name(b, &exts.feature_names))
                .collect();
            return unsupported(format!(
                "incompatible feature {} (not known to imgsafe)",
                names.join(", ")
            ));
        }
        let compression = match head.get(104).filter(|_| header_length > V3_HEADER_LEN) {
            None | Some(0) => Compression::Deflate,
            Some(1) => Compression::Zstd,
            Some(t) => return unsupported(format!("compression type {t}")),
        };
        if compression != Compression::Deflate && incompatible & INCOMPAT_COMPRESSION == 0 {
            return corrupt("compression_type is set but the compression incompatible bit is not");
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return corrupt(format!(
                "extended L2 entries need clusters of at least {} bytes, not {cluster_size}",
                1u64 << MIN_EXTENDED_L2_CLUSTER_BITS
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 && exts.data_file.is_none() {
            return unsupported("an external data file whose name is not recorded in the image");
        }
        let backing_offset = be64(head, 8);
        let backing_len = be32(head, 16);
        let backing = if backing_offset == 0 {
            None
        } else if backing_len > MAX_BACKING_NAME || backing_len == 0 {
            return corrupt(format!(
                "backing file name is {backing_len} bytes (1..={MAX_BACKING_NAME})"
            ));
        } else {
            Some(string_at(
                head,
                backing_offset,
                backing_len.into(),
                "backing file name",
            )?)
        };
        let size = be64(head, 24);
        if size > MAX_VIRTUAL_SIZE {
            return unsupported(format!("virtual size {size} bytes is larger than 2^61"));
        }
        let header = Header {
            version,
            cluster_bits,
            size,
            l1_size: be32(head, 36).into(),
            l1_offset: be64(head, 40),
            nb_snapshots: be32(head, 60),
            snapshots_offset: be64(head, 64),
            incompatible,
            autoclear,
            compression,
            backing,
            backing_format: exts.backing_format,
            data_file: exts.data_file,
        };
        header.check_l1(header.l1_offset, header.l1_size, size, file_len, "L1 table")?;
        if header.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt(format!(
                "{} snapshots, more than the {MAX_SNAPSHOTS} qcow2 allows",
                header.nb_snapshots
            ));
        }
        if header.nb_snapshots > 0
            && (!header.snapshots_offset.is_multiple_of(8) || header.snapshots_offset >= file_len)
        {
            return corrupt(format!(
                "snapshot table offset {} is unaligned or past the end of the file",
                header.snapshots_offset
            ));
        }
        Ok(header)
    }

    /// Check an L1 table (the active one or a snapshot's): big enough for `size`, within
    /// QEMU's limit, cluster-aligned, clear of the header and inside the file.
    pub fn check_l1(
        &self,
        offset: u64,
        entries: u64,
        size: u64,
        file_len: u64,
        what: &str,
    ) -> Result<(), HeaderError> {
        let needed = self.l1_needed(size);
        if entries < needed {
            return corrupt(format!(
                "{what} has {entries} entries, fewer than the {needed} the disk size needs"
            ));
        }
        if entries > MAX_L1_ENTRIES {
            return corrupt(format!(
                "{what} has {entries} entries, more than the {MAX_L1_ENTRIES} qcow2 allows"
            ));
        }
        if entries == 0 {
            return Ok(());
        }
        if !offset.is_multiple_of(self.cluster_size()) || offset < self.cluster_size() {
            return corrupt(format!(
                "{what} offset {offset} is not a cluster boundary after the header"
            ));
        }
        // entries <= 4 Mi and offset < 2^64 - 32 MiB or the sum fails: checked.
        match offset.checked_add(entries * 8) {
            Some(end) if end <= file_len => Ok(()),
            _ => corrupt(format!(
                "{what} ({entries} entries at offset {offset}) extends past the end of the file"
            )),
        }
    }
}

/// What the header extensions say.
#[derive(Debug, Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<String>,
    /// (type, bit, name) from the feature name table.
    feature_names: Vec<(u8, u8, String)>,
    crypto: bool,
}

/// Walk the header extensions from `start` to the end-of-list marker or the end of
/// `head` (the header cluster).
fn extensions(head: &[u8], start: u32) -> Result<Extensions, HeaderError> {
    let mut out = Extensions::default();
    let mut at = start as usize;
    while at + 8 <= head.len() {
        let kind = be32(head, at);
        let len = be32(head, at + 4) as usize;
        let data_at = at + 8;
        if kind == EXT_END {
            break;
        }
        if len > head.len() - data_at {
            return corrupt(format!(
                "header extension {kind:#x} at byte {at} runs past the header cluster"
            ));
        }
        let data = &head[data_at..data_at + len];
        let text = |what: &str| match std::str::from_utf8(data) {
            Ok(s) if !s.contains('\0') => Ok(s.to_string()),
            _ => corrupt(format!("{what} is not a UTF-8 string")),
        };
        match kind {
            EXT_BACKING_FORMAT => out.backing_format = Some(text("backing format name")?),
            EXT_DATA_FILE => out.data_file = Some(text("external data file name")?),
            EXT_CRYPTO => out.crypto = true,
            EXT_FEATURE_NAMES => {
                for e in data.chunks_exact(48) {
                    let name = e[2..].split(|&b| b == 0).next().unwrap_or(&[]);
                    out.feature_names.push((
                        e[0],
                        e[1],
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                }
            }
            _ => {}
        }
        // Data is padded to a multiple of 8 bytes.
        at = data_at + len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique id string (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// Name given by the user.
    pub name: String,
    /// Its L1 table.
    pub l1_offset: u64,
    /// Its L1 entries.
    pub l1_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Disk size when taken (extra data, else the header's size).
    pub disk_size: u64,
    /// Saved VM state bytes (0 for a disk-only snapshot).
    pub vm_state_size: u64,
}

/// Fixed part of a snapshot table entry.
pub const SNAPSHOT_FIXED_LEN: usize = 40;

/// Parse one snapshot table entry from `b`, which holds at least its fixed part; returns
/// the entry and its length (padded to 8), or `None` when `b` is too short for its
/// variable part (the caller reads more). `default_size` is the header's virtual size.
pub fn parse_snapshot(
    b: &[u8],
    default_size: u64,
) -> Result<Option<(Snapshot, usize)>, HeaderError> {
    if b.len() < SNAPSHOT_FIXED_LEN {
        return Ok(None);
    }
    let l1_offset = be64(b, 0);
    let l1_size = u64::from(be32(b, 8));
    let id_len = usize::from(u16::from_be_bytes([b[12], b[13]]));
    let name_len = usize::from(u16::from_be_bytes([b[14], b[15]]));
    let date_sec = be32(b, 16);
    let vm_clock_nsec = be64(b, 24);
    let mut vm_state_size = u64::from(be32(b, 32));
    let extra = be32(b, 36);
    if extra > MAX_SNAPSHOT_EXTRA {
        return corrupt(format!(
            "snapshot extra data is {extra} bytes (limit {MAX_SNAPSHOT_EXTRA})"
        ));
    }
    let extra = extra as usize;
    let total = SNAPSHOT_FIXED_LEN + extra + id_len + name_len;
    if b.len() < total {
        return Ok(None);
    }
    let ex = &b[SNAPSHOT_FIXED_LEN..SNAPSHOT_FIXED_LEN + extra];
    if ex.len() >= 8 {
        vm_state_size = be64(ex, 0);
    }
    let disk_size = if ex.len() >= 16 {
        be64(ex, 8)
    } else {
        default_size
    };
    if disk_size > MAX_VIRTUAL_SIZE {
        return corrupt(format!(
            "snapshot disk size {disk_size} is larger than 2^61"
        ));
    }
    let strs = &b[SNAPSHOT_FIXED_LEN + extra..total];
    let id = String::from_utf8_lossy(&strs[..id_len]).into_owned();
    let name = String::from_utf8_lossy(&strs[id_len..]).into_owned();
    Ok(Some((
        Snapshot {
            id,
            name,
            l1_offset,
            l1_size,
            date_sec,
            vm_clock_nsec,
            disk_size,
            vm_state_size,
        },
        total.div_ceil(8) * 8,
    )))
}
