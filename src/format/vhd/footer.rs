//! The 512-byte VHD footer ("hard disk footer", VHD spec 1.0, "Hard Disk Footer Format").
//!
//! All fields are big-endian. Fixed disks have it only at the end of the file; dynamic and
//! differencing disks also keep a copy at offset 0, which is what lets imgsafe recover
//! when the one at the end is damaged.

use std::fmt;

/// Size of the footer on disk.
pub const FOOTER_LEN: usize = 512;
/// Old Virtual PC versions wrote a 511-byte footer (the last reserved byte missing).
pub const OLD_FOOTER_LEN: usize = 511;
/// Footer cookie ("Cookie", spec: "conectix").
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Offset of the 32-bit checksum field in the footer.
const CHECKSUM_AT: usize = 64;
/// Disk type "Fixed hard disk" (spec: Disk Type = 2).
pub const TYPE_FIXED: u32 = 2;
/// Disk type "Dynamic hard disk" (spec: Disk Type = 3).
pub const TYPE_DYNAMIC: u32 = 3;
/// Disk type "Differencing hard disk" (spec: Disk Type = 4).
pub const TYPE_DIFFERENCING: u32 = 4;
/// Largest disk the VHD format allows: 2040 GiB (spec limit; qemu's VHD_MAX_SECTORS).
pub const MAX_DISK_SIZE: u64 = 0xff00_0000 * 512;

/// One's-complement of the byte sum with the checksum field (4 bytes at `at`) counted
/// as zero (spec: "Checksum"; the dynamic header uses the same rule).
pub fn checksum(bytes: &[u8], at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

use crate::bytes::{be32, be64};

/// A VHD footer, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header (dynamic/differencing); all ones for fixed disks.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC when the file was created.
    pub timestamp: u32,
    /// Four-character code of the program that made the file (`qemu`, `qem2`, `win `, ...).
    pub creator_app: [u8; 4],
    /// Size of the virtual disk in bytes, as stored ("Current Size").
    pub current_size: u64,
    /// CHS geometry: cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// Fixed, dynamic or differencing ([`TYPE_FIXED`] ...).
    pub disk_type: u32,
    /// The disk's unique id; a differencing child records its parent's.
    pub unique_id: [u8; 16],
}

/// Why 512 bytes are not a usable footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FooterProblem {
    /// No `conectix` cookie: there is no footer here at all.
    NoCookie,
    /// The cookie is there but the checksum does not match.
    BadChecksum { stored: u32, computed: u32 },
}

impl fmt::Display for FooterProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FooterProblem::NoCookie => f.write_str("no \"conectix\" cookie"),
            FooterProblem::BadChecksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
        }
    }
}

impl Footer {
    /// Decode and verify a footer. `raw` is 512 bytes (a 511-byte old footer is passed
    /// padded with one zero byte, which does not change the checksum).
    pub fn parse(raw: &[u8; FOOTER_LEN]) -> Result<Footer, FooterProblem> {
        if &raw[..8] != FOOTER_COOKIE {
            return Err(FooterProblem::NoCookie);
        }
        let stored = be32(raw, CHECKSUM_AT);
        let computed = checksum(raw, CHECKSUM_AT);
        if stored != computed {
            return Err(FooterProblem::BadChecksum { stored, computed });
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&raw[28..32]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&raw[68..84]);
        Ok(Footer {
            data_offset: be64(raw, 16),
            timestamp: be32(raw, 24),
            creator_app,
            current_size: be64(raw, 48),
            geometry: (u16::from_be_bytes([raw[56], raw[57]]), raw[58], raw[59]),
            disk_type: be32(raw, 60),
            unique_id,
        })
    }

    /// The disk size its CHS geometry gives (cylinders × heads × sectors × 512): what
    /// Virtual PC shows, and what qemu uses for creators other than Hyper-V & co.
    pub fn chs_size(&self) -> u64 {
        let (c, h, s) = self.geometry;
        u64::from(c) * u64::from(h) * u64::from(s) * 512
    }

    /// The type as the name `imgsafe info` shows.
    pub fn type_name(&self) -> &'static str {
        match self.disk_type {
            TYPE_FIXED => "fixed",
            TYPE_DYNAMIC => "dynamic",
            _ => "differencing",
        }
    }
}

/// Test-only builder: a valid footer with the given fields, checksum filled in.
#[cfg(test)]
pub(crate) fn build(
    disk_type: u32,
    current_size: u64,
    data_offset: u64,
    unique_id: [u8; 16],
) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[..8].copy_from_slice(FOOTER_COOKIE);
    b[8..12].copy_from_slice(&2u32.to_be_bytes());
    b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    b[16..24].copy_from_slice(&data_offset.to_be_bytes());
    b[24..28].copy_from_slice(&1000u32.to_be_bytes());
    b[28..32].copy_from_slice(b"test");
    b[40..48].copy_from_slice(&current_size.to_be_bytes());
    b[48..56].copy_from_slice(&current_size.to_be_bytes());
    b[56..60].copy_from_slice(&[0, 16, 4, 17]);
    b[60..64].copy_from_slice(&disk_type.to_be_bytes());
    b[68..84].copy_from_slice(&unique_id);
    let c = checksum(&b, CHECKSUM_AT);
    b[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&c.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_fields_of_a_built_footer() {
        let raw = build(TYPE_DYNAMIC, 10 << 20, 512, [7; 16]);

        let f = Footer::parse(&raw).unwrap();

        assert_eq!(f.disk_type, TYPE_DYNAMIC);
        assert_eq!(f.current_size, 10 << 20);
        assert_eq!(f.data_offset, 512);
        assert_eq!(f.unique_id, [7; 16]);
        assert_eq!(&f.creator_app, b"test");
        assert_eq!(f.chs_size(), 16 * 4 * 17 * 512);
    }

    #[test]
    fn parse_rejects_a_flipped_byte_with_both_checksums() {
        let mut raw = build(TYPE_FIXED, 1 << 20, u64::MAX, [1; 16]);
        let good = be32(&raw, CHECKSUM_AT);
        raw[100] ^= 1;

        let err = Footer::parse(&raw).unwrap_err();

        assert_eq!(
            err,
            FooterProblem::BadChecksum {
                stored: good,
                computed: good.wrapping_sub(1)
            }
        );
    }

    #[test]
    fn parse_without_cookie_says_so() {
        let raw = [0u8; FOOTER_LEN];

        assert_eq!(Footer::parse(&raw).unwrap_err(), FooterProblem::NoCookie);
    }

    #[test]
    fn checksum_ignores_the_checksum_field_itself() {
        let mut a = [1u8; 16];
        let b = a;
        a[4..8].copy_from_slice(&[9, 9, 9, 9]);

        assert_eq!(checksum(&a, 4), checksum(&b, 4));
        assert_eq!(checksum(&b, 4), !12u32);
    }
}
