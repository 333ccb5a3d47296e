//! The 1024-byte dynamic disk header (`cxsparse`, VHD spec "Dynamic Disk Header Format")
//! and the parent locators a differencing disk uses to find its parent.

use super::footer::checksum;
use crate::bytes::{be32, be64};
use std::path::{Path, PathBuf};

/// Size of the dynamic header on disk.
pub const HEADER_LEN: usize = 1024;
/// Dynamic header cookie (spec: "cxsparse").
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Offset of the 32-bit checksum field in the header.
const CHECKSUM_AT: usize = 36;
/// Offset of the parent's UTF-16 (big-endian) file name, 512 bytes.
const PARENT_NAME_AT: usize = 64;
/// Offset of the first of the eight 24-byte parent locator entries.
const LOCATORS_AT: usize = 576;
/// Number of parent locator entries.
const LOCATOR_COUNT: usize = 8;
/// Platform code "W2ru": Windows relative path, UTF-16LE.
pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Platform code "W2ku": Windows absolute path, UTF-16LE.
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Platform code "MacX": Mac OS X file URL, UTF-8.
pub const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");
/// Longest locator payload imgsafe reads: a Windows long path (32767 UTF-16 units).
pub const MAX_LOCATOR_LEN: u32 = 65536;

/// One parent locator entry as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    /// Index 0..8 in the header, for error messages.
    pub index: usize,
    /// Platform code (`W2ru`, `W2ku`, `MacX`, ...).
    pub code: u32,
    /// Length of the path data in bytes.
    pub data_len: u32,
    /// Absolute file offset of the path data.
    pub data_offset: u64,
}

/// The dynamic disk header, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// Absolute file offset of the block allocation table.
    pub table_offset: u64,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Bytes of virtual disk per block (data only, without the sector bitmap).
    pub block_size: u32,
    /// Unique id of the parent (differencing disks).
    pub parent_unique_id: [u8; 16],
    /// Parent's modification time, seconds since 2000-01-01 UTC.
    pub parent_timestamp: u32,
    /// Parent's file name from the header (may be empty).
    pub parent_name: String,
    /// The non-empty parent locator entries.
    pub locators: Vec<Locator>,
}

/// Why 1024 bytes are not a usable dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// No `cxsparse` cookie.
    NoCookie,
    /// The checksum does not match.
    BadChecksum { stored: u32, computed: u32 },
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderProblem::NoCookie => f.write_str("no \"cxsparse\" cookie"),
            HeaderProblem::BadChecksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
        }
    }
}

impl DynHeader {
    /// Decode and verify a dynamic header.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<DynHeader, HeaderProblem> {
        if &raw[..8] != HEADER_COOKIE {
            return Err(HeaderProblem::NoCookie);
        }
        let stored = be32(raw, CHECKSUM_AT);
        let computed = checksum(raw, CHECKSUM_AT);
        if stored != computed {
            return Err(HeaderProblem::BadChecksum { stored, computed });
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&raw[40..56]);
        let locators = (0..LOCATOR_COUNT)
            .map(|i| {
                let at = LOCATORS_AT + i * 24;
                Locator {
                    index: i,
                    code: be32(raw, at),
                    data_len: be32(raw, at + 8),
                    data_offset: be64(raw, at + 16),
                }
            })
            .filter(|l| l.code != 0)
            .collect();
        Ok(DynHeader {
            table_offset: be64(raw, 16),
            max_table_entries: be32(raw, 28),
            block_size: be32(raw, 32),
            parent_unique_id,
            parent_timestamp: be32(raw, 56),
            parent_name: utf16_name(&raw[PARENT_NAME_AT..PARENT_NAME_AT + 512], true),
            locators,
        })
    }
}

/// Decode a NUL-terminated (or full-length) UTF-16 string; invalid units become U+FFFD.
pub fn utf16_name(bytes: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Turn a locator's payload into a path on this machine, or `None` when it cannot name
/// a file here (a Windows drive path, an empty string, an unknown platform).
///
/// Relative paths (W2ru, relative MacX URLs) resolve against `child_dir`.
pub fn locator_path(code: u32, data: &[u8], child_dir: &Path) -> Option<PathBuf> {
    let text = match code {
        PLATFORM_W2RU | PLATFORM_W2KU => utf16_name(data, false),
        PLATFORM_MACX => {
            let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            let rest = s.strip_prefix("file://")?;
            // file://localhost/abs, file:///abs, or (as some writers do) file://./rel
            let rest = rest.strip_prefix("localhost").unwrap_or(rest);
            percent_decode(rest)?
        }
        _ => return None,
    };
    windows_to_local(&text, child_dir)
}

/// Map a Windows or Unix style path to a local path; relative ones join `child_dir`.
pub(crate) fn windows_to_local(text: &str, child_dir: &Path) -> Option<PathBuf> {
    if text.is_empty() {
        return None;
    }
    let bytes = text.as_bytes();
    // "C:\..." or "\\server\share": no meaning on this machine.
    if (bytes.len() >= 2 && bytes[1] == b':') || text.starts_with("\\\\") {
        return None;
    }
    let unix = text.replace('\\', "/");
    let p = Path::new(&unix);
    if p.is_absolute() {
        Some(p.to_path_buf())
    } else {
        Some(child_dir.join(unix.trim_start_matches("./")))
    }
}

/// Decode %XX escapes of a file URL; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Test-only builder: a valid dynamic header, checksum filled in.
#[cfg(test)]
pub(crate) fn build(
    table_offset: u64,
    max_table_entries: u32,
    block_size: u32,
    parent_id: [u8; 16],
    locators: &[(u32, u32, u64)],
) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(HEADER_COOKIE);
    b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    b[16..24].copy_from_slice(&table_offset.to_be_bytes());
    b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    b[28..32].copy_from_slice(&max_table_entries.to_be_bytes());
    b[32..36].copy_from_slice(&block_size.to_be_bytes());
    b[40..56].copy_from_slice(&parent_id);
    for (i, &(code, len, off)) in locators.iter().enumerate() {
        let at = LOCATORS_AT + i * 24;
        b[at..at + 4].copy_from_slice(&code.to_be_bytes());
        b[at + 4..at + 8].copy_from_slice(&len.div_ceil(512).to_be_bytes());
        b[at + 8..at + 12].copy_from_slice(&len.to_be_bytes());
        b[at + 16..at + 24].copy_from_slice(&off.to_be_bytes());
    }
    let c = checksum(&b, CHECKSUM_AT);
    b[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&c.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16le(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
    }

    #[test]
    fn parse_reads_fields_and_skips_empty_locators() {
        let raw = build(1536, 5, 2 << 20, [3; 16], &[(PLATFORM_W2RU, 24, 4096)]);

        let h = DynHeader::parse(&raw).unwrap();

        assert_eq!(
            (h.table_offset, h.max_table_entries, h.block_size),
            (1536, 5, 2 << 20)
        );
        assert_eq!(h.parent_unique_id, [3; 16]);
        assert_eq!(
            h.locators,
            vec![Locator {
                index: 0,
                code: PLATFORM_W2RU,
                data_len: 24,
                data_offset: 4096
            }]
        );
    }

    #[test]
    fn parse_rejects_bad_checksum() {
        let mut raw = build(1536, 5, 2 << 20, [0; 16], &[]);
        raw[30] ^= 0x80;

        assert!(matches!(
            DynHeader::parse(&raw),
            Err(HeaderProblem::BadChecksum { .. })
        ));
    }

    #[test]
    fn w2ru_relative_path_joins_child_folder() {
        let p = locator_path(
            PLATFORM_W2RU,
            &utf16le(".\\sub\\base.vhd"),
            Path::new("/imgs"),
        );

        assert_eq!(p, Some(PathBuf::from("/imgs/sub/base.vhd")));
    }

    #[test]
    fn w2ku_drive_letter_path_has_no_local_meaning() {
        let p = locator_path(
            PLATFORM_W2KU,
            &utf16le("C:\\vms\\base.vhd"),
            Path::new("/imgs"),
        );

        assert_eq!(p, None);
    }

    #[test]
    fn macx_url_is_percent_decoded() {
        let p = locator_path(
            PLATFORM_MACX,
            b"file://localhost/a%20b/base.vhd",
            Path::new("/imgs"),
        );

        assert_eq!(p, Some(PathBuf::from("/a b/base.vhd")));
    }

    #[test]
    fn macx_without_scheme_is_rejected() {
        assert_eq!(
            locator_path(PLATFORM_MACX, b"/abs/base.vhd", Path::new("/")),
            None
        );
        assert_eq!(
            locator_path(PLATFORM_MACX, b"file:///x%zz", Path::new("/")),
            None
        );
    }

    #[test]
    fn utf16_name_stops_at_nul() {
        let bytes = [0, b'a', 0, b'b', 0, 0, 0, b'c'];

        assert_eq!(utf16_name(&bytes, true), "ab");
    }
}
