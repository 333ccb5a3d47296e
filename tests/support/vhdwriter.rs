//! Test-only VHD writer for what qemu-img cannot make: dynamic and differencing disks
//! with chosen bitmaps, junk in clear-bit sectors, parent locators of each platform, and
//! deliberately broken fields. Written from the VHD 1.0 spec, independent of the decoder.
//!
//! Layout it writes: footer copy (0), dynamic header (512), BAT (1536, padded to a
//! sector), parent locator payloads (each padded to a sector), blocks (bitmap + data),
//! footer. [`BAT_OFFSET`] and [`HEADER_OFFSET`] let tests patch fields.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where this writer puts the dynamic header.
pub const HEADER_OFFSET: usize = 512;
/// Where this writer puts the BAT.
pub const BAT_OFFSET: usize = 1536;
/// Footer disk type: fixed.
pub const FIXED: u32 = 2;
/// Footer disk type: dynamic.
pub const DYNAMIC: u32 = 3;
/// Footer disk type: differencing.
pub const DIFFERENCING: u32 = 4;

/// A parent locator entry: platform code and its payload bytes.
#[derive(Debug, Clone)]
pub struct Locator {
    pub code: [u8; 4],
    pub data: Vec<u8>,
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// W2ru: a Windows-style relative path (e.g. `.\base.vhd`), UTF-16LE.
pub fn w2ru(rel: &str) -> Locator {
    Locator {
        code: *b"W2ru",
        data: utf16le(rel),
    }
}

/// W2ku: an absolute path, UTF-16LE (a Unix path here, so it resolves on this machine).
pub fn w2ku(abs: &str) -> Locator {
    Locator {
        code: *b"W2ku",
        data: utf16le(abs),
    }
}

/// MacX: a `file://` URL, UTF-8.
pub fn macx(url: &str) -> Locator {
    Locator {
        code: *b"MacX",
        data: url.as_bytes().to_vec(),
    }
}

/// One's complement of the byte sum, skipping the 4-byte checksum field at `at`.
pub fn checksum(b: &[u8], at: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &x) in b.iter().enumerate() {
        if i < at || i >= at + 4 {
            sum = sum.wrapping_add(u32::from(x));
        }
    }
    !sum
}

/// Recompute the checksum of the footer at `off` (footer checksum field at +64).
pub fn fix_footer_checksum(img: &mut [u8], off: usize) {
    let c = checksum(&img[off..off + 512], 64);
    img[off + 64..off + 68].copy_from_slice(&c.to_be_bytes());
}

/// Recompute the dynamic header checksum (field at +36) of an image from this writer.
pub fn fix_header_checksum(img: &mut [u8]) {
    let h = HEADER_OFFSET;
    let c = checksum(&img[h..h + 1024], 36);
    img[h + 36..h + 40].copy_from_slice(&c.to_be_bytes());
}

/// A fresh unique id (distinct within this process, and between processes).
pub fn new_id() -> [u8; 16] {
    static N: AtomicU32 = AtomicU32::new(1);
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    id[4..8].copy_from_slice(&std::process::id().to_be_bytes());
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    id[8..].copy_from_slice(&t.to_be_bytes());
    id
}

/// The footer fields a child needs from its parent.
#[derive(Debug, Clone, Copy)]
pub struct ParentInfo {
    pub unique_id: [u8; 16],
    pub timestamp: u32,
    pub current_size: u64,
}

/// Read the footer at the end of a VHD file.
pub fn parent_info(path: &Path) -> io::Result<ParentInfo> {
    let b = std::fs::read(path)?;
    if b.len() < 512 || &b[b.len() - 512..b.len() - 504] != b"conectix" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no VHD footer", path.display()),
        ));
    }
    let f = &b[b.len() - 512..];
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&f[68..84]);
    Ok(ParentInfo {
        unique_id,
        timestamp: u32::from_be_bytes(f[24..28].try_into().unwrap()),
        current_size: u64::from_be_bytes(f[48..56].try_into().unwrap()),
    })
}

/// A dynamic or differencing VHD to be written.
#[derive(Debug, Clone)]
pub struct VhdImage {
    pub disk_type: u32,
    pub size: u64,
    pub block_size: u32,
    /// Written to the header instead of the computed count, when set.
    pub max_table_entries: Option<u32>,
    pub unique_id: [u8; 16],
    pub timestamp: u32,
    pub parent: Option<ParentInfo>,
    /// UTF-16BE name in the header.
    pub parent_name: String,
    pub locators: Vec<Locator>,
    /// block index → (bitmap, data)
    pub blocks: BTreeMap<u32, (Vec<u8>, Vec<u8>)>,
}

impl VhdImage {
    /// An empty dynamic disk.
    pub fn dynamic(size: u64, block_size: u32) -> Self {
        VhdImage {
            disk_type: DYNAMIC,
            size,
            block_size,
            max_table_entries: None,
            unique_id: new_id(),
            timestamp: 700_000_000,
            parent: None,
            parent_name: String::new(),
            locators: Vec::new(),
            blocks: BTreeMap::new(),
        }
    }

    /// An empty differencing disk over `parent` (all reads fall through to it).
    pub fn differencing(parent: ParentInfo, block_size: u32) -> Self {
        let mut v = Self::dynamic(parent.current_size, block_size);
        v.disk_type = DIFFERENCING;
        v.parent = Some(parent);
        v
    }

    pub fn bitmap_len(&self) -> usize {
        (self.block_size as usize / 512).div_ceil(8).div_ceil(512) * 512
    }

    /// Write `data` (whole sectors) at virtual `offset` (sector aligned): allocates the
    /// blocks it touches (their other sectors hold junk with clear bits) and sets the
    /// bits of the sectors written.
    pub fn write_sectors(&mut self, offset: u64, data: &[u8]) {
        assert!(
            offset.is_multiple_of(512) && data.len().is_multiple_of(512),
            "whole sectors only"
        );
        let bs = self.block_size as u64;
        let bm_len = self.bitmap_len();
        for (i, sector) in data.chunks(512).enumerate() {
            let pos = offset + i as u64 * 512;
            let block = (pos / bs) as u32;
            let in_block = (pos % bs) as usize;
            let (bm, blk) = self.blocks.entry(block).or_insert_with(|| {
                let junk = (0..bs as usize)
                    .map(|j| (j as u8) ^ 0xA5 ^ (block as u8))
                    .collect();
                (vec![0u8; bm_len], junk)
            });
            blk[in_block..in_block + 512].copy_from_slice(sector);
            let s = in_block / 512;
            bm[s / 8] |= 0x80 >> (s % 8);
        }
    }

    /// The image file bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let entries = self.size.div_ceil(u64::from(self.block_size)) as usize;
        let bat_len = (entries * 4).div_ceil(512) * 512;
        let mut out = vec![0u8; BAT_OFFSET + bat_len];
        out[BAT_OFFSET..BAT_OFFSET + entries * 4].fill(0xFF);
        out[BAT_OFFSET + entries * 4..].fill(0xFF);

        let mut header = [0u8; 1024];
        header[..8].copy_from_slice(b"cxsparse");
        header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        header[16..24].copy_from_slice(&(BAT_OFFSET as u64).to_be_bytes());
        header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        let max = self.max_table_entries.unwrap_or(entries as u32);
        header[28..32].copy_from_slice(&max.to_be_bytes());
        header[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        if let Some(p) = &self.parent {
            header[40..56].copy_from_slice(&p.unique_id);
            header[56..60].copy_from_slice(&p.timestamp.to_be_bytes());
        }
        let name: Vec<u8> = self
            .parent_name
            .encode_utf16()
            .flat_map(|u| u.to_be_bytes())
            .take(510)
            .collect();
        header[64..64 + name.len()].copy_from_slice(&name);
        for (i, loc) in self.locators.iter().enumerate().take(8) {
            let at = 576 + i * 24;
            let off = out.len() as u64;
            let space = loc.data.len().div_ceil(512).max(1) * 512;
            out.extend_from_slice(&loc.data);
            out.resize(off as usize + space, 0);
            header[at..at + 4].copy_from_slice(&loc.code);
            header[at + 4..at + 8].copy_from_slice(&(space as u32).to_be_bytes());
            header[at + 8..at + 12].copy_from_slice(&(loc.data.len() as u32).to_be_bytes());
            header[at + 16..at + 24].copy_from_slice(&off.to_be_bytes());
        }
        let c = checksum(&header, 36);
        header[36..40].copy_from_slice(&c.to_be_bytes());
        out[HEADER_OFFSET..HEADER_OFFSET + 1024].copy_from_slice(&header);

        for (&block, (bm, data)) in &self.blocks {
            let sector = (out.len() / 512) as u32;
            out[BAT_OFFSET + block as usize * 4..][..4].copy_from_slice(&sector.to_be_bytes());
            out.extend_from_slice(bm);
            out.extend_from_slice(data);
        }
        let footer = self.footer();
        out[..512].copy_from_slice(&footer);
        out.extend_from_slice(&footer);
        out
    }

    fn footer(&self) -> [u8; 512] {
        footer_bytes(
            self.disk_type,
            self.size,
            HEADER_OFFSET as u64,
            self.unique_id,
            self.timestamp,
        )
    }

    /// Write the image to `path`.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

/// A valid footer with these fields (creator `test`, geometry left zero).
pub fn footer_bytes(
    disk_type: u32,
    size: u64,
    data_offset: u64,
    unique_id: [u8; 16],
    timestamp: u32,
) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[24..28].copy_from_slice(&timestamp.to_be_bytes());
    f[28..32].copy_from_slice(b"test");
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    fix_footer_checksum(&mut f, 0);
    f
}

/// Write a fixed VHD holding `raw` (whose length must be a multiple of 512).
pub fn write_fixed(path: &Path, raw: &[u8]) -> io::Result<()> {
    let mut out = raw.to_vec();
    out.extend_from_slice(&footer_bytes(
        FIXED,
        raw.len() as u64,
        u64::MAX,
        new_id(),
        700_000_000,
    ));
    std::fs::write(path, out)
}

/// Build a differencing VHD `child` over the VHD `parent` (any VHD: fixed, dynamic or
/// differencing), storing `writes` (virtual offset, whole sectors) and found through a
/// relative W2ru and an absolute W2ku locator. For benches and end-to-end tests.
pub fn write_differencing(
    child: &Path,
    parent: &Path,
    writes: &[(u64, Vec<u8>)],
) -> io::Result<()> {
    let info = parent_info(parent)?;
    let mut img = VhdImage::differencing(info, 2 << 20);
    let abs = std::fs::canonicalize(parent)?;
    let child_dir = std::fs::canonicalize(
        child
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    if let Ok(rel) = abs.strip_prefix(&child_dir) {
        img.locators.push(w2ru(&format!(
            ".\\{}",
            rel.to_string_lossy().replace('/', "\\")
        )));
    }
    img.locators.push(w2ku(&abs.to_string_lossy()));
    img.parent_name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (off, data) in writes {
        img.write_sectors(*off, data);
    }
    img.write(child)
}
