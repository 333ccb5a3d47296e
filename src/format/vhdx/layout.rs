//! The VHDX structures read at open time (MS-VHDX section 2): the header section (file
//! type identifier, two headers, two region tables), the metadata region and the BAT.
//! All integers are little-endian; GUIDs are in Microsoft's mixed-endian layout.

use super::crc32c::crc32c_with_hole;
use crate::bytes::{le16, le32, le64};
use crate::format::FormatError;
use std::fs::File;
use std::path::Path;

/// One MiB: the alignment of regions and the unit of BAT file offsets (2.5.1).
pub const MIB: u64 = 1 << 20;
/// The header section: the first 1 MiB of the file (2.2).
pub const HEADER_SECTION_LEN: u64 = MIB;
/// File type identifier signature at offset 0 (2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// The two headers, at 64 KiB and 128 KiB (2.2.2).
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes of a header covered by its checksum (2.2.2).
pub const HEADER_LEN: usize = 4096;
/// Header signature "head" (2.2.2).
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Header `Version` this decoder reads (2.2.2: "MUST be set to 1").
pub const HEADER_VERSION: u16 = 1;
/// The two region tables, at 192 KiB and 256 KiB (2.2.3).
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes of a region table covered by its checksum (2.2.3.1).
pub const REGION_TABLE_LEN: usize = 64 << 10;
/// Region table signature "regi" (2.2.3.1).
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Most region table entries (2.2.3.1: "less than or equal to 2,047").
pub const MAX_TABLE_ENTRIES: usize = 2047;
/// Metadata table signature "metadata" (2.6.1.1).
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// Bytes of the metadata table at the start of the metadata region (2.6).
pub const METADATA_TABLE_LEN: u64 = 64 << 10;
/// Largest metadata item (2.6.1.2: "Length MUST be less than or equal to 1 MB").
pub const MAX_ITEM_LEN: u32 = 1 << 20;
/// Block size bounds (2.6.2.1: "at least 1 MB and not greater than 256 MB").
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest virtual disk (2.6.2.2: "MUST be at most 64 TB").
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Sectors described by one sector bitmap block (2.4: "2^23").
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;
/// Most BAT entries one file may hold in memory (128 MiB of table): a 16 TiB disk with
/// 1 MiB blocks, or the 64 TiB maximum with 4 MiB blocks or larger.
pub const MAX_BAT_ENTRIES: u64 = 16 << 20;

/// Payload block states (2.5.1.1).
pub const PAYLOAD_NOT_PRESENT: u8 = 0;
/// See [`PAYLOAD_NOT_PRESENT`].
pub const PAYLOAD_UNDEFINED: u8 = 1;
/// See [`PAYLOAD_NOT_PRESENT`].
pub const PAYLOAD_ZERO: u8 = 2;
/// See [`PAYLOAD_NOT_PRESENT`].
pub const PAYLOAD_UNMAPPED: u8 = 3;
/// See [`PAYLOAD_NOT_PRESENT`].
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
/// See [`PAYLOAD_NOT_PRESENT`].
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block states (2.5.1.2).
pub const SB_NOT_PRESENT: u8 = 0;
/// See [`SB_NOT_PRESENT`].
pub const SB_PRESENT: u8 = 6;

/// A GUID in its on-disk byte order from its text form's fields.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// BAT region 2DC27766-F623-4200-9D64-115E9BFD4A08 (2.2.3.2).
pub const REGION_BAT: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Metadata region 8B7CA206-4790-4B9A-B8FE-575F050F886E (2.2.3.2).
pub const REGION_METADATA: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// File Parameters item CAA16737-FA36-4D43-B3B6-33F0AA44E76B (2.6.2.1).
pub const ITEM_FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual Disk Size item 2FA54224-CD1B-4876-B211-5DBED83BF4B8 (2.6.2.2).
pub const ITEM_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Virtual Disk ID (page 83 data) item BECA12AB-B2E6-4523-93EF-C309E000C746 (2.6.2.3).
pub const ITEM_DISK_ID: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical Sector Size item 8141BF1D-A96F-4709-BA47-F233A8FAAB5F (2.6.2.4).
pub const ITEM_LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical Sector Size item CDA348C7-445D-4471-9CC9-E9885251C556 (2.6.2.5).
pub const ITEM_PHYSICAL_SECTOR: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent Locator item A8D35F2D-B30B-454D-ABF7-D3D84834AB0C (2.6.2.6).
pub const ITEM_PARENT_LOCATOR: [u8; 16] = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// The VHDX parent locator type B04AEFB7-D19E-4A81-B789-25B8E9445913 (2.6.2.6.3).
pub const LOCATOR_TYPE_VHDX: [u8; 16] = guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

fn guid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// A GUID as text, lower case without braces (`83ed0ec3-24c8-49a6-a959-5e4bf1288bfb`).
pub fn guid_text(g: &[u8; 16]) -> String {
    let h = |r: &[u8]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "{:08x}-{:04x}-{:04x}-{}-{}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        h(&g[8..10]),
        h(&g[10..16])
    )
}

/// One of the two headers, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `SequenceNumber`: the valid header with the larger one is current.
    pub sequence: u64,
    /// `DataWriteGuid`: changes when the virtual disk's data changes; a differencing
    /// child records its parent's.
    pub data_write_guid: [u8; 16],
    /// `LogGuid`: non-zero when the log holds entries to replay.
    pub log_guid: [u8; 16],
    /// `LogLength` and `LogOffset`.
    pub log_len: u32,
    /// See `log_len`.
    pub log_offset: u64,
}

/// Why a header copy is not usable (the other may still be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// No "head" signature.
    NoSignature,
    /// Checksum mismatch.
    BadChecksum { stored: u32, computed: u32 },
    /// A version other than 1.
    Version(u16),
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderProblem::NoSignature => f.write_str("no \"head\" signature"),
            HeaderProblem::BadChecksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            HeaderProblem::Version(v) => write!(f, "version {v} (imgsafe reads version 1)"),
        }
    }
}

impl Header {
    /// Parse one 4 KiB header, checking signature, CRC-32C and version.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderProblem> {
        if &b[0..4] != HEADER_SIGNATURE {
            return Err(HeaderProblem::NoSignature);
        }
        let stored = le32(b, 4);
        let computed = crc32c_with_hole(b, 4);
        if stored != computed {
            return Err(HeaderProblem::BadChecksum { stored, computed });
        }
        let version = le16(b, 66);
        if version != HEADER_VERSION {
            return Err(HeaderProblem::Version(version));
        }
        Ok(Header {
            sequence: le64(b, 8),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_len: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }
}

/// A region of the file named in the region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// File offset (a multiple of 1 MiB, after the header section).
    pub offset: u64,
    /// Length in bytes (a multiple of 1 MiB).
    pub len: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Does `[a, b)` overlap this region?
    pub fn overlaps(&self, a: u64, b: u64) -> bool {
        a < self.end() && self.offset < b
    }
}

/// The metadata items imgsafe uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// `BlockSize`.
    pub block_size: u32,
    /// `HasParent`: a differencing file.
    pub has_parent: bool,
    /// `LeaveBlockAllocated`: a fixed file.
    pub leave_allocated: bool,
    /// `VirtualDiskSize`.
    pub disk_size: u64,
    /// `LogicalSectorSize` (512 or 4096).
    pub logical_sector: u32,
    /// `PhysicalSectorSize`, if the item is present.
    pub physical_sector: Option<u32>,
    /// `VirtualDiskId` (the SCSI page 83 identifier), if present.
    pub disk_id: Option<[u8; 16]>,
    /// The parent locator's key-value pairs, for a differencing file.
    pub parent_locator: Vec<(String, String)>,
}

/// Everything read from a VHDX file at open time.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The current header.
    pub header: Header,
    /// The BAT and metadata regions.
    pub bat_region: Region,
    /// See `bat_region`.
    pub metadata_region: Region,
    /// The metadata items.
    pub meta: Metadata,
    /// Payload blocks per sector bitmap block (2.4).
    pub chunk_ratio: u64,
    /// Payload blocks of the virtual disk.
    pub payload_blocks: u64,
    /// The BAT, payload and sector bitmap entries interleaved as stored.
    pub bat: Vec<u64>,
}

impl Layout {
    /// The BAT entry of payload block `i`.
    pub fn payload_entry(&self, i: u64) -> u64 {
        self.bat
            .get((i + i / self.chunk_ratio) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The BAT entry of the sector bitmap block of chunk `c`.
    pub fn bitmap_entry(&self, c: u64) -> u64 {
        self.bat
            .get((c * (self.chunk_ratio + 1) + self.chunk_ratio) as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// State bits of a BAT entry.
pub fn state(entry: u64) -> u8 {
    (entry & 7) as u8
}

/// File offset of a BAT entry's block, in bytes.
pub fn offset(entry: u64) -> u64 {
    (entry >> 20) * MIB
}

fn read(path: &Path, file: &File, buf: &mut [u8], at: u64) -> Result<(), FormatError> {
    crate::format::read_exact_at(file, buf, at).map_err(|e| FormatError::io(path, e))
}

/// Read and check the header section, metadata and BAT of `path`.
pub fn load(path: &Path, file: &File) -> Result<Layout, FormatError> {
    let bad = |what: String| FormatError::corrupt(path, what);
    let file_len = crate::format::file_len(path, file)?;
    if file_len < HEADER_SECTION_LEN {
        return Err(bad(format!(
            "file of {file_len} bytes is shorter than the 1 MiB VHDX header section"
        )));
    }
    let mut sig = [0u8; 8];
    read(path, file, &mut sig, 0)?;
    if &sig != FILE_SIGNATURE {
        return Err(bad("no \"vhdxfile\" signature at offset 0".into()));
    }
    let header = current_header(path, file)?;
    if header.log_guid != [0; 16] {
        // Replaying would mean trusting a second hostile structure (log entries,
        // descriptors, sequence numbers) and overlaying it on every read; Hyper-V and
        // qemu replay it when they open the file read-write, which is the user's call.
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!(
                "VHDX log {} (at offset {}, {} bytes) is not empty: the file was not closed cleanly and its log must be replayed first (attach it read-write once in Hyper-V, or run `qemu-img check -r all` on a copy)",
                guid_text(&header.log_guid),
                header.log_offset,
                header.log_len
            ),
        });
    }
    let (bat_region, metadata_region) = regions(path, file, file_len)?;
    let meta = metadata(path, file, metadata_region)?;

    let bs = u64::from(meta.block_size);
    let lss = u64::from(meta.logical_sector);
    // 2^23 × 512 or 4096 is a multiple of every block size up to 256 MiB: at least 16.
    let chunk_ratio = SECTORS_PER_BITMAP * lss / bs;
    let payload_blocks = meta.disk_size.div_ceil(bs);
    let bitmap_blocks = payload_blocks.div_ceil(chunk_ratio);
    let entries = if meta.has_parent {
        bitmap_blocks * (chunk_ratio + 1)
    } else if payload_blocks == 0 {
        0
    } else {
        payload_blocks + (payload_blocks - 1) / chunk_ratio
    };
    if entries * 8 > bat_region.len {
        return Err(bad(format!(
            "BAT region of {} bytes holds fewer than the {entries} entries a {}-byte disk with {bs}-byte blocks needs",
            bat_region.len, meta.disk_size
        )));
    }
    if entries > MAX_BAT_ENTRIES {
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!("BAT of {entries} entries (imgsafe's limit is {MAX_BAT_ENTRIES})"),
        });
    }
    // entries ≤ MAX_BAT_ENTRIES and fits in the BAT region, which lies inside the file.
    let mut raw = vec![0u8; (entries * 8) as usize];
    read(path, file, &mut raw, bat_region.offset)?;
    let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
    let layout = Layout {
        header,
        bat_region,
        metadata_region,
        meta,
        chunk_ratio,
        payload_blocks,
        bat,
    };
    check_bat(path, &layout, file_len)?;
    Ok(layout)
}

/// The valid header with the larger sequence number; an error naming both problems
/// when neither is valid.
fn current_header(path: &Path, file: &File) -> Result<Header, FormatError> {
    let mut found: Vec<Result<Header, HeaderProblem>> = Vec::new();
    for at in HEADER_OFFSETS {
        let mut b = [0u8; HEADER_LEN];
        read(path, file, &mut b, at)?;
        found.push(Header::parse(&b));
    }
    match (&found[0], &found[1]) {
        (Ok(a), Ok(b)) => Ok(if b.sequence > a.sequence { b } else { a }.clone()),
        (Ok(h), Err(_)) | (Err(_), Ok(h)) => Ok(h.clone()),
        (Err(p1), Err(p2)) => Err(FormatError::corrupt(
            path,
            format!("neither VHDX header is valid (header 1: {p1}; header 2: {p2})"),
        )),
    }
}

/// The BAT and metadata regions from the first valid region table.
fn regions(path: &Path, file: &File, file_len: u64) -> Result<(Region, Region), FormatError> {
    let bad = |what: String| FormatError::corrupt(path, what);
    let mut problems = Vec::new();
    let mut table = None;
    for (i, at) in REGION_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; REGION_TABLE_LEN];
        read(path, file, &mut b, *at)?;
        let stored = le32(&b, 4);
        let computed = crc32c_with_hole(&b, 4);
        if &b[0..4] != REGION_SIGNATURE {
            problems.push(format!("region table {}: no \"regi\" signature", i + 1));
        } else if stored != computed {
            problems.push(format!(
                "region table {}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
                i + 1
            ));
        } else {
            table = Some(b);
            break;
        }
    }
    let Some(t) = table else {
        return Err(bad(problems.join("; ")));
    };
    let count = le32(&t, 8) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(bad(format!(
            "region table has {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let (mut bat, mut meta) = (None, None);
    let mut seen: Vec<Region> = Vec::new();
    for i in 0..count {
        let e = 16 + i * 32;
        let id = guid_at(&t, e);
        let r = Region {
            offset: le64(&t, e + 16),
            len: u64::from(le32(&t, e + 24)),
        };
        let required = le32(&t, e + 28) & 1 == 1;
        let name = guid_text(&id);
        if !r.offset.is_multiple_of(MIB)
            || !r.len.is_multiple_of(MIB)
            || r.offset < HEADER_SECTION_LEN
        {
            return Err(bad(format!(
                "region {name} (offset {}, length {}) is not 1 MiB-aligned after the header section",
                r.offset, r.len
            )));
        }
        if r.offset.checked_add(r.len).is_none_or(|e| e > file_len) {
            return Err(bad(format!(
                "region {name} (offset {}, length {}) extends past the end of the file",
                r.offset, r.len
            )));
        }
        if seen.iter().any(|s| s.overlaps(r.offset, r.end())) {
            return Err(bad(format!("region {name} overlaps another region")));
        }
        seen.push(r);
        match id {
            REGION_BAT => bat = Some(r),
            REGION_METADATA => meta = Some(r),
            _ if required => {
                return Err(FormatError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("required VHDX region {name} that imgsafe does not know"),
                })
            }
            _ => {}
        }
    }
    match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        (None, _) => Err(bad("region table has no BAT region".into())),
        (_, None) => Err(bad("region table has no metadata region".into())),
    }
}

/// Read the metadata table and the items imgsafe uses.
fn metadata(path: &Path, file: &File, region: Region) -> Result<Metadata, FormatError> {
    let bad = |what: String| FormatError::corrupt(path, what);
    let mut t = vec![0u8; METADATA_TABLE_LEN as usize];
    read(path, file, &mut t, region.offset)?;
    if &t[0..8] != METADATA_SIGNATURE {
        return Err(bad("metadata region has no \"metadata\" signature".into()));
    }
    let count = le16(&t, 10) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(bad(format!(
            "metadata table has {count} entries (at most {MAX_TABLE_ENTRIES})"
        )));
    }
    let mut items: Vec<([u8; 16], Vec<u8>)> = Vec::new();
    for i in 0..count {
        let e = 32 + i * 32;
        let id = guid_at(&t, e);
        let off = le32(&t, e + 16);
        let len = le32(&t, e + 20);
        let flags = le32(&t, e + 24);
        let (is_user, required) = (flags & 1 == 1, flags & 4 == 4);
        let known = [
            ITEM_FILE_PARAMETERS,
            ITEM_DISK_SIZE,
            ITEM_DISK_ID,
            ITEM_LOGICAL_SECTOR,
            ITEM_PHYSICAL_SECTOR,
            ITEM_PARENT_LOCATOR,
        ];
        if is_user || !known.contains(&id) {
            if required {
                return Err(FormatError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!(
                        "required VHDX metadata item {} that imgsafe does not know",
                        guid_text(&id)
                    ),
                });
            }
            continue;
        }
        if len > MAX_ITEM_LEN
            || (len > 0 && u64::from(off) < METADATA_TABLE_LEN)
            || u64::from(off) + u64::from(len) > region.len
        {
            return Err(bad(format!(
                "metadata item {} (offset {off}, length {len}) lies outside the metadata region",
                guid_text(&id)
            )));
        }
        if items.iter().any(|(k, _)| *k == id) {
            return Err(bad(format!(
                "metadata item {} appears twice",
                guid_text(&id)
            )));
        }
        // len ≤ 1 MiB, and at most six known items are kept.
        let mut v = vec![0u8; len as usize];
        read(path, file, &mut v, region.offset + u64::from(off))?;
        items.push((id, v));
    }
    let item = |id: [u8; 16], min: usize, name: &str| -> Result<Option<&[u8]>, FormatError> {
        match items.iter().find(|(k, _)| *k == id) {
            Some((_, v)) if v.len() >= min => Ok(Some(v.as_slice())),
            Some((_, v)) => Err(bad(format!(
                "metadata item {name} is {} bytes (needs {min})",
                v.len()
            ))),
            None => Ok(None),
        }
    };
    let missing = |name: &str| bad(format!("metadata item {name} is missing"));
    let fp = item(ITEM_FILE_PARAMETERS, 8, "File Parameters")?
        .ok_or_else(|| missing("File Parameters"))?;
    let block_size = le32(fp, 0);
    let flags = le32(fp, 4);
    let disk_size = le64(
        item(ITEM_DISK_SIZE, 8, "Virtual Disk Size")?
            .ok_or_else(|| missing("Virtual Disk Size"))?,
        0,
    );
    let logical_sector = le32(
        item(ITEM_LOGICAL_SECTOR, 4, "Logical Sector Size")?
            .ok_or_else(|| missing("Logical Sector Size"))?,
        0,
    );
    let physical_sector =
        item(ITEM_PHYSICAL_SECTOR, 4, "Physical Sector Size")?.map(|v| le32(v, 0));
    let disk_id = item(ITEM_DISK_ID, 16, "Virtual Disk ID")?.map(|v| guid_at(v, 0));
    let has_parent = flags & 2 == 2;
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(bad(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(bad(format!(
            "logical sector size {logical_sector} is neither 512 nor 4096"
        )));
    }
    if disk_size == 0
        || disk_size > MAX_DISK_SIZE
        || !disk_size.is_multiple_of(u64::from(logical_sector))
    {
        return Err(bad(format!(
            "virtual disk size {disk_size} is not a multiple of the {logical_sector}-byte sector up to 64 TiB"
        )));
    }
    let parent_locator = if has_parent {
        let v = item(ITEM_PARENT_LOCATOR, 20, "Parent Locator")?
            .ok_or_else(|| missing("Parent Locator (the file has a parent)"))?;
        parse_locator(v).map_err(|what| bad(format!("parent locator: {what}")))?
    } else {
        Vec::new()
    };
    if has_parent
        && guid_at_opt(&items, ITEM_PARENT_LOCATOR).is_some_and(|t| t != LOCATOR_TYPE_VHDX)
    {
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: "parent locator of a type other than VHDX".into(),
        });
    }
    Ok(Metadata {
        block_size,
        has_parent,
        leave_allocated: flags & 1 == 1,
        disk_size,
        logical_sector,
        physical_sector,
        disk_id,
        parent_locator,
    })
}

/// The locator type GUID of the parent locator item, if present.
fn guid_at_opt(items: &[([u8; 16], Vec<u8>)], id: [u8; 16]) -> Option<[u8; 16]> {
    items
        .iter()
        .find(|(k, v)| *k == id && v.len() >= 16)
        .map(|(_, v)| guid_at(v, 0))
}

/// The key-value pairs of a parent locator item (2.6.2.6.1–2): UTF-16LE strings at
/// offsets inside the item.
pub fn parse_locator(v: &[u8]) -> Result<Vec<(String, String)>, String> {
    let count = le16(v, 18) as usize;
    let table_end = 20 + count * 12;
    if table_end > v.len() {
        return Err(format!(
            "{count} key-value entries do not fit in the {}-byte item",
            v.len()
        ));
    }
    let text = |off: u32, len: u16| -> Result<String, String> {
        let (a, b) = (off as usize, off as usize + len as usize);
        if off == 0 || len == 0 || !len.is_multiple_of(2) || b > v.len() {
            return Err(format!("string at offset {off}, length {len} is invalid"));
        }
        let units: Vec<u16> = v[a..b]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(String::from_utf16_lossy(&units))
    };
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let e = 20 + i * 12;
        let key = text(le32(v, e), le16(v, e + 8))?;
        let value = text(le32(v, e + 4), le16(v, e + 10))?;
        out.push((key, value));
    }
    Ok(out)
}

/// Check every BAT entry's state and, for present blocks, where it points.
fn check_bat(path: &Path, l: &Layout, file_len: u64) -> Result<(), FormatError> {
    let bad = |what: String| FormatError::corrupt(path, what);
    let bs = u64::from(l.meta.block_size);
    let in_file = |what: &str, i: u64, entry: u64, len: u64| -> Result<(), FormatError> {
        let start = offset(entry);
        let end = start.checked_add(len).filter(|&e| e <= file_len);
        let Some(end) = end else {
            return Err(bad(format!(
                "BAT {what} entry {i} points past the end of the file"
            )));
        };
        if start < HEADER_SECTION_LEN {
            return Err(bad(format!(
                "BAT {what} entry {i} points into the header section"
            )));
        }
        if l.bat_region.overlaps(start, end) || l.metadata_region.overlaps(start, end) {
            return Err(bad(format!(
                "BAT {what} entry {i} overlaps the BAT or metadata region"
            )));
        }
        Ok(())
    };
    for i in 0..l.payload_blocks {
        let e = l.payload_entry(i);
        match state(e) {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {}
            PAYLOAD_FULLY_PRESENT => in_file("payload", i, e, bs)?,
            PAYLOAD_PARTIALLY_PRESENT if l.meta.has_parent => {
                in_file("payload", i, e, bs)?;
                let c = i / l.chunk_ratio;
                if state(l.bitmap_entry(c)) != SB_PRESENT {
                    return Err(bad(format!(
                        "BAT payload entry {i} is partially present but the sector bitmap of chunk {c} is not"
                    )));
                }
            }
            PAYLOAD_PARTIALLY_PRESENT => {
                return Err(bad(format!(
                    "BAT payload entry {i} is partially present in a file without a parent"
                )))
            }
            s => return Err(bad(format!("BAT payload entry {i} has reserved state {s}"))),
        }
    }
    let chunks = l.payload_blocks.div_ceil(l.chunk_ratio);
    for c in 0..chunks {
        let e = l.bitmap_entry(c);
        match state(e) {
            SB_NOT_PRESENT => {}
            // Only a differencing file reads its bitmaps; elsewhere the entry is ignored.
            SB_PRESENT if l.meta.has_parent => in_file("sector bitmap", c, e, MIB)?,
            SB_PRESENT => {}
            s => {
                return Err(bad(format!(
                    "BAT sector bitmap entry {c} has reserved state {s}"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_mixed_endian_and_print_as_written() {
        assert_eq!(
            guid_text(&REGION_BAT),
            "2dc27766-f623-4200-9d64-115e9bfd4a08"
        );
        assert_eq!(&REGION_BAT[..4], &[0x66, 0x77, 0xc2, 0x2d]);
    }

    #[test]
    fn locator_pairs_are_read_and_bounds_checked() {
        let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        let (k, v) = (utf16("relative_path"), utf16("..\\p.vhdx"));
        let mut item = vec![0u8; 32];
        item[18..20].copy_from_slice(&1u16.to_le_bytes());
        item[20..24].copy_from_slice(&32u32.to_le_bytes());
        item[24..28].copy_from_slice(&(32 + k.len() as u32).to_le_bytes());
        item[28..30].copy_from_slice(&(k.len() as u16).to_le_bytes());
        item[30..32].copy_from_slice(&(v.len() as u16).to_le_bytes());
        item.extend(&k);
        item.extend(&v);
        let mut short = item.clone();
        short.truncate(item.len() - 2);

        assert_eq!(
            parse_locator(&item).unwrap(),
            [("relative_path".to_string(), "..\\p.vhdx".to_string())]
        );
        assert!(parse_locator(&short).unwrap_err().contains("is invalid"));
    }

    #[test]
    fn chunk_ratio_follows_the_sector_and_block_sizes() {
        let ratio = |lss: u64, bs: u64| SECTORS_PER_BITMAP * lss / bs;

        assert_eq!(ratio(512, 1 << 20), 4096);
        assert_eq!(ratio(512, 32 << 20), 128);
        assert_eq!(ratio(512, 256 << 20), 16);
        assert_eq!(ratio(4096, 256 << 20), 128);
    }
}
