//! Differencing VHDX files for tests, which qemu-img cannot write: a dynamic VHDX made by
//! qemu-img becomes a differencing one by the changes MS-VHDX describes for one: the
//! File Parameters item gets `HasParent` (2.6.2.1), a Parent Locator item of the VHDX
//! type is added to the metadata table with `parent_linkage` = the parent's current
//! `DataWriteGuid` and the given paths (2.6.2.6), and chosen fully present blocks become
//! partially present with a sector bitmap block appended to the file (2.4, 2.5.1). The
//! metadata region and the BAT carry no checksum, so the headers stay as qemu wrote them.
//! libvhdi then reads the chain as an independent oracle.
#![allow(dead_code)]

use std::path::Path;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;
/// Region table 1 (2.2.3) and the GUIDs of the BAT and metadata regions.
const REGION_TABLE_AT: usize = 192 * KIB;
const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
/// File Parameters item CAA16737-FA36-4D43-B3B6-33F0AA44E76B.
const FILE_PARAMETERS: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
/// Parent Locator item A8D35F2D-B30B-454D-ABF7-D3D84834AB0C.
const PARENT_LOCATOR: [u8; 16] = [
    0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c,
];
/// VHDX parent locator type B04AEFB7-D19E-4A81-B789-25B8E9445913.
const LOCATOR_TYPE_VHDX: [u8; 16] = [
    0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13,
];

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// (offset, length) of the region `guid` from region table 1.
fn region(f: &[u8], guid: [u8; 16]) -> (usize, usize) {
    let t = &f[REGION_TABLE_AT..];
    (0..le32(t, 8) as usize)
        .map(|i| 16 + i * 32)
        .find(|&e| t[e..e + 16] == guid)
        .map(|e| (le64(t, e + 16) as usize, le32(t, e + 24) as usize))
        .expect("qemu-made VHDX has this region")
}

/// The current header's DataWriteGuid of a VHDX file, as `{lower-case text}`.
pub fn data_write_guid(path: &Path) -> String {
    let f = std::fs::read(path).unwrap();
    let (h1, h2) = (&f[64 * KIB..68 * KIB], &f[128 * KIB..132 * KIB]);
    let h = if le64(h2, 8) > le64(h1, 8) { h2 } else { h1 };
    let g = &h[32..48];
    let hex = |r: &[u8]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "{{{:08x}-{:04x}-{:04x}-{}-{}}}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        hex(&g[8..10]),
        hex(&g[10..16])
    )
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// How to turn a dynamic VHDX into a differencing one.
pub struct Diff<'a> {
    /// Key-value pairs of the parent locator (`parent_linkage` first, then paths).
    pub locator: Vec<(&'a str, String)>,
    /// Payload blocks to make partially present, with the sector ranges
    /// `[first, end)` (in logical sectors of the block) whose bits are set.
    pub partial: Vec<(usize, Vec<(usize, usize)>)>,
}

/// Make the qemu-made dynamic VHDX at `path` a differencing disk as `diff` says.
pub fn make_differencing(path: &Path, diff: &Diff) {
    let mut f = std::fs::read(path).unwrap();
    let (meta, meta_len) = region(&f, METADATA_GUID);
    let (bat, _) = region(&f, BAT_GUID);
    // The metadata table: set HasParent and find where the items end.
    let count = le16(&f, meta + 10) as usize;
    let mut items_end = 64 * KIB;
    let mut block_size = 0usize;
    for i in 0..count {
        let e = meta + 32 + i * 32;
        let (off, len) = (le32(&f, e + 16) as usize, le32(&f, e + 20) as usize);
        items_end = items_end.max(off + len);
        if f[e..e + 16] == FILE_PARAMETERS {
            block_size = le32(&f, meta + off) as usize;
            let flags = le32(&f, meta + off + 4) | 2;
            f[meta + off + 4..meta + off + 8].copy_from_slice(&flags.to_le_bytes());
        }
    }
    assert!(block_size > 0, "no File Parameters item");
    // The parent locator item: header, entries, then the UTF-16LE strings.
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = diff
        .locator
        .iter()
        .map(|(k, v)| (utf16(k), utf16(v)))
        .collect();
    let mut item = vec![0u8; 20 + pairs.len() * 12];
    item[..16].copy_from_slice(&LOCATOR_TYPE_VHDX);
    item[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let e = 20 + i * 12;
        let ko = item.len() as u32;
        item.extend(k);
        let vo = item.len() as u32;
        item.extend(v);
        item[e..e + 4].copy_from_slice(&ko.to_le_bytes());
        item[e + 4..e + 8].copy_from_slice(&vo.to_le_bytes());
        item[e + 8..e + 10].copy_from_slice(&(k.len() as u16).to_le_bytes());
        item[e + 10..e + 12].copy_from_slice(&(v.len() as u16).to_le_bytes());
    }
    let item_off = items_end.next_multiple_of(8);
    assert!(item_off + item.len() <= meta_len, "metadata region full");
    f[meta + item_off..meta + item_off + item.len()].copy_from_slice(&item);
    let e = meta + 32 + count * 32;
    f[e..e + 16].copy_from_slice(&PARENT_LOCATOR);
    f[e + 16..e + 20].copy_from_slice(&(item_off as u32).to_le_bytes());
    f[e + 20..e + 24].copy_from_slice(&(item.len() as u32).to_le_bytes());
    f[e + 24..e + 28].copy_from_slice(&4u32.to_le_bytes()); // IsRequired
    f[meta + 10..meta + 12].copy_from_slice(&((count + 1) as u16).to_le_bytes());
    // Partially present blocks and their chunk's sector bitmap (512-byte sectors).
    let chunk_ratio = (1usize << 23) * 512 / block_size;
    let per_block = block_size / 512 / 8;
    let mut bitmaps: Vec<(usize, usize)> = Vec::new(); // (chunk, file offset)
    for (block, ranges) in &diff.partial {
        let idx = block + block / chunk_ratio;
        let entry = le64(&f, bat + idx * 8);
        assert_eq!(entry & 7, 6, "block {block} is not fully present");
        f[bat + idx * 8..bat + idx * 8 + 8].copy_from_slice(&(entry & !7 | 7).to_le_bytes());
        let chunk = block / chunk_ratio;
        let bm_off = match bitmaps.iter().find(|b| b.0 == chunk) {
            Some(b) => b.1,
            None => {
                let at = f.len().next_multiple_of(MIB);
                f.resize(at + MIB, 0);
                let sb = chunk * (chunk_ratio + 1) + chunk_ratio;
                let v = ((at / MIB) as u64) << 20 | 6;
                f[bat + sb * 8..bat + sb * 8 + 8].copy_from_slice(&v.to_le_bytes());
                bitmaps.push((chunk, at));
                at
            }
        };
        let base = bm_off + (block % chunk_ratio) * per_block;
        for &(a, b) in ranges {
            for s in a..b {
                f[base + s / 8] |= 1 << (s % 8);
            }
        }
    }
    std::fs::write(path, f).unwrap();
}
