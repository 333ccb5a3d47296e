//! The VirtualBox VDI header, version 1.1 (VirtualBox `VDICore.h`: `VDIPREHEADER` +
//! `VDIHEADER1`), all fields little-endian.

use crate::bytes::{le32, le64};

/// Bytes of the pre-header: a 64-byte text banner, the signature and the version.
pub const PRE_HEADER_LEN: usize = 72;
/// Offset of the signature in the pre-header.
pub const SIGNATURE_AT: usize = 64;
/// `VDI_IMAGE_SIGNATURE`: 0xbeda107f, stored little-endian at byte 64.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Major version this decoder reads (`VDI_IMAGE_VERSION_MAJOR` of v1.1).
pub const VERSION_MAJOR: u16 = 1;
/// Size of the v1.1 header proper (`sizeof(VDIHEADER1)`); `VDIHEADER1PLUS` adds 16 bytes
/// of logical geometry, which nothing here needs.
pub const HEADER1_LEN: u32 = 0x180;
/// Largest `cbHeader` accepted: VirtualBox writes 0x180 or 0x190; anything up to one
/// 4 KiB page is read, anything larger is not a v1.1 header.
pub const MAX_HEADER_LEN: u32 = 4096 - PRE_HEADER_LEN as u32;
/// Bytes read to parse a header: the pre-header and the v1.1 header.
pub const READ_LEN: usize = PRE_HEADER_LEN + HEADER1_LEN as usize;

/// `VDI_IMAGE_TYPE_NORMAL`: dynamically growing.
pub const TYPE_DYNAMIC: u32 = 1;
/// `VDI_IMAGE_TYPE_FIXED`: every block preallocated ("static" in qemu).
pub const TYPE_STATIC: u32 = 2;
/// `VDI_IMAGE_TYPE_UNDO`: an undo image (VirtualBox 1.x), not read.
pub const TYPE_UNDO: u32 = 3;
/// `VDI_IMAGE_TYPE_DIFF`: a differencing image over the parent named by its link UUID.
pub const TYPE_DIFF: u32 = 4;

/// Block map entry of a block that is not allocated (`VDI_IMAGE_BLOCK_FREE`): reads as
/// zeros, or from the parent in a differencing image.
pub const BLOCK_FREE: u32 = 0xFFFF_FFFF;
/// Block map entry of a block known to be zeros (`VDI_IMAGE_BLOCK_ZERO`): reads as zeros
/// even in a differencing image (the parent is not consulted).
pub const BLOCK_ZERO: u32 = 0xFFFF_FFFE;

/// The sector size VDI images use (`cbSector` of the legacy geometry).
pub const SECTOR: u64 = 512;

/// The fields of a v1.1 header that reading the disk needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Minor version (1 for v1.1).
    pub version_minor: u16,
    /// `cbHeader`: bytes of header after the pre-header.
    pub header_len: u32,
    /// `u32Type`: one of the `TYPE_*` constants.
    pub image_type: u32,
    /// `offBlocks`: file offset of the block map.
    pub offset_blocks: u32,
    /// `offData`: file offset of block 0's data area.
    pub offset_data: u32,
    /// `LegacyGeometry.cbSector`.
    pub sector_size: u32,
    /// `cbDisk`: virtual disk size in bytes.
    pub disk_size: u64,
    /// `cbBlock`: bytes of virtual disk per block.
    pub block_size: u32,
    /// `cbBlockExtra`: bytes stored in front of each block's data.
    pub block_extra: u32,
    /// `cBlocks`: entries in the block map.
    pub blocks: u32,
    /// `cBlocksAllocated`.
    pub blocks_allocated: u32,
    /// `uuidCreate`: this image's identity.
    pub uuid_create: [u8; 16],
    /// `uuidModify`: changes whenever the image is written.
    pub uuid_modify: [u8; 16],
    /// `uuidLinkage`: the parent's `uuidCreate` (differencing images).
    pub uuid_link: [u8; 16],
    /// `uuidParentModify`: the parent's `uuidModify` when this image was made.
    pub uuid_parent_modify: [u8; 16],
}

/// Why bytes are not a v1.1 VDI header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Fewer bytes than a pre-header and v1.1 header.
    Short(usize),
    /// No `0xbeda107f` at byte 64.
    NoSignature,
    /// A version this decoder does not read.
    Version { major: u16, minor: u16 },
    /// `cbHeader` smaller than v1.1's or larger than a page.
    HeaderLen(u32),
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderProblem::Short(n) => write!(f, "file of {n} bytes is too short for a VDI header"),
            HeaderProblem::NoSignature => f.write_str("no VDI signature 0xbeda107f at byte 64"),
            HeaderProblem::Version { major, minor } => {
                write!(f, "VDI version {major}.{minor} (imgsafe reads version 1.1)")
            }
            HeaderProblem::HeaderLen(n) => write!(
                f,
                "header size {n} is not between {HEADER1_LEN} and {MAX_HEADER_LEN} bytes"
            ),
        }
    }
}

fn uuid(b: &[u8], at: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[at..at + 16]);
    u
}

/// True if `head` (a file's first bytes) carries the VDI signature.
pub fn has_signature(head: &[u8]) -> bool {
    head.get(SIGNATURE_AT..SIGNATURE_AT + 4) == Some(&SIGNATURE.to_le_bytes()[..])
}

impl Header {
    /// Parse the pre-header and v1.1 header from the file's first bytes.
    pub fn parse(b: &[u8]) -> Result<Header, HeaderProblem> {
        if !has_signature(b) {
            return Err(HeaderProblem::NoSignature);
        }
        if b.len() < READ_LEN {
            return Err(HeaderProblem::Short(b.len()));
        }
        let version = le32(b, 68);
        let (major, minor) = ((version >> 16) as u16, version as u16);
        if major != VERSION_MAJOR || minor < 1 {
            return Err(HeaderProblem::Version { major, minor });
        }
        let header_len = le32(b, 72);
        if !(HEADER1_LEN..=MAX_HEADER_LEN).contains(&header_len) {
            return Err(HeaderProblem::HeaderLen(header_len));
        }
        // Offsets below are from the start of the file: the pre-header is 72 bytes, and
        // v1.1 puts a 256-byte comment after cbHeader, u32Type and fFlags.
        Ok(Header {
            version_minor: minor,
            header_len,
            image_type: le32(b, 0x4c),
            offset_blocks: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            sector_size: le32(b, 0x168),
            disk_size: le64(b, 0x170),
            block_size: le32(b, 0x178),
            block_extra: le32(b, 0x17c),
            blocks: le32(b, 0x180),
            blocks_allocated: le32(b, 0x184),
            uuid_create: uuid(b, 0x188),
            uuid_modify: uuid(b, 0x198),
            uuid_link: uuid(b, 0x1a8),
            uuid_parent_modify: uuid(b, 0x1b8),
        })
    }

    /// Where the header ends in the file (the block map must not start before).
    pub fn end(&self) -> u64 {
        PRE_HEADER_LEN as u64 + u64::from(self.header_len)
    }

    /// Subformat name for `info`.
    pub fn type_name(&self) -> &'static str {
        match self.image_type {
            TYPE_DYNAMIC => "dynamic",
            TYPE_STATIC => "static",
            TYPE_UNDO => "undo",
            TYPE_DIFF => "differencing",
            _ => "unknown",
        }
    }
}

/// Test-only: a v1.1 header of `image_type` (512 bytes, block map at 512, data after it)
/// for unit tests that build images in memory from the layout above.
#[cfg(test)]
pub fn build(image_type: u32, disk_size: u64, block_size: u32, blocks: u32) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
    b[64..68].copy_from_slice(&SIGNATURE.to_le_bytes());
    b[68..72].copy_from_slice(&0x0001_0001u32.to_le_bytes());
    b[72..76].copy_from_slice(&HEADER1_LEN.to_le_bytes());
    b[0x4c..0x50].copy_from_slice(&image_type.to_le_bytes());
    let bmap_len = (u64::from(blocks) * 4).div_ceil(512) * 512;
    b[0x154..0x158].copy_from_slice(&512u32.to_le_bytes());
    b[0x158..0x15c].copy_from_slice(&((512 + bmap_len) as u32).to_le_bytes());
    b[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes());
    b[0x170..0x178].copy_from_slice(&disk_size.to_le_bytes());
    b[0x178..0x17c].copy_from_slice(&block_size.to_le_bytes());
    b[0x180..0x184].copy_from_slice(&blocks.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_at_their_spec_offsets() {
        let mut b = build(TYPE_DIFF, 5 << 20, 1 << 20, 5);
        b[0x188..0x198].copy_from_slice(&[1; 16]);
        b[0x1a8..0x1b8].copy_from_slice(&[3; 16]);

        let h = Header::parse(&b).unwrap();

        assert_eq!(
            (h.image_type, h.disk_size, h.block_size, h.blocks),
            (TYPE_DIFF, 5 << 20, 1 << 20, 5)
        );
        assert_eq!((h.offset_blocks, h.offset_data), (512, 1024));
        assert_eq!((h.uuid_create, h.uuid_link), ([1; 16], [3; 16]));
        assert_eq!(h.end(), 72 + 0x180);
        assert_eq!(h.type_name(), "differencing");
    }

    #[test]
    fn refuses_other_versions_header_sizes_and_short_input() {
        let good = build(TYPE_DYNAMIC, 1 << 20, 1 << 20, 1);
        let mut v10 = good.clone();
        v10[68..72].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        let mut big = good.clone();
        big[72..76].copy_from_slice(&u32::MAX.to_le_bytes());

        assert_eq!(
            Header::parse(&v10),
            Err(HeaderProblem::Version { major: 1, minor: 0 })
        );
        assert_eq!(Header::parse(&big), Err(HeaderProblem::HeaderLen(u32::MAX)));
        assert_eq!(Header::parse(&good[..100]), Err(HeaderProblem::Short(100)));
        assert_eq!(Header::parse(&[0u8; 512]), Err(HeaderProblem::NoSignature));
    }
}
