//! Dynamic and differencing VHD disks: the block allocation table, per-block sector
//! bitmaps, and reads that fall through to the parent.

use super::cache::BitmapCache;
use super::footer::Footer;
use super::header::{DynHeader, HEADER_LEN};
use super::io::{read_segments, Segment};
use crate::format::{BlockSource, Extent, FormatError, LayerInfo};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// BAT value of a block that is not allocated (spec: "Block Allocation Table").
pub const BAT_UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Smallest block size imgsafe accepts (one sector).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size imgsafe accepts; writers use 2 MiB (qemu, Hyper-V) or 512 KiB.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most BAT entries imgsafe holds in memory (128 MiB of table): a 2040 GiB disk with
/// 64 KiB blocks fits; anything larger is refused before allocating.
pub const MAX_BAT_ENTRIES: u64 = 32 << 20;
/// Bytes of sector bitmaps kept in memory per differencing file.
const BITMAP_CACHE_BYTES: usize = 8 << 20;
/// Sector size the bitmap and BAT are counted in.
const SECTOR: u64 = 512;
/// Bytes of a differencing disk mapped per call to the parent when building an allocation
/// map (at most 16 Ki sector runs, so a chain of 64 files holds a few MiB of maps).
const LOWER_SLICE: u64 = 8 << 20;

/// Bytes of the sector bitmap in front of each block: one bit per sector, padded to a
/// whole number of sectors (spec: "the bitmap is padded to a 512-byte sector boundary").
pub fn bitmap_len(block_size: u32) -> u64 {
    let sectors = u64::from(block_size) / SECTOR;
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// Is the bit of `sector` set? Bit 7 of byte 0 is the block's first sector.
pub fn bit(bitmap: &[u8], sector: u64) -> bool {
    let byte = (sector / 8) as usize;
    bitmap
        .get(byte)
        .is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

/// Runs of equal bits over sectors `[first, end)`: `(start, end, set)`, in order.
pub fn bit_runs(bitmap: &[u8], first: u64, end: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut s = first;
    while s < end {
        let set = bit(bitmap, s);
        let mut e = s + 1;
        while e < end {
            // Skip whole bytes that match the run (the common all-set / all-clear case).
            if e.is_multiple_of(8) && e + 8 <= end {
                let b = bitmap.get((e / 8) as usize).copied().unwrap_or(0);
                if b == if set { 0xFF } else { 0x00 } {
                    e += 8;
                    continue;
                }
            }
            if bit(bitmap, e) != set {
                break;
            }
            e += 1;
        }
        out.push((s, e, set));
        s = e;
    }
    out
}

/// Where one run of virtual bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// This file, at this offset.
    File(u64),
    /// Not in this file: the parent, or zeros when there is none.
    Lower,
}

/// A run of the virtual disk with one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    virt: u64,
    len: u64,
    src: Source,
}

/// Everything read from the file at open time that the reader needs.
pub struct Layout {
    /// Parsed dynamic header (for the parent id, locators, block size).
    pub header: DynHeader,
    /// One entry per block of the virtual disk (entries past the disk are not kept).
    pub bat: Vec<u32>,
}

/// Read and validate the dynamic header and BAT of `path`.
///
/// `size` is the virtual size; `data_limit` is where block data must end (the start of
/// the footer at the end, or the file length when that footer is missing).
pub fn load_layout(
    path: &Path,
    file: &File,
    footer: &Footer,
    size: u64,
    data_limit: u64,
) -> Result<Layout, FormatError> {
    let bad = |what: String| FormatError::corrupt(path, what);
    let file_len = crate::format::file_len(path, file)?;
    let hdr_off = footer.data_offset;
    let hdr_end = hdr_off
        .checked_add(HEADER_LEN as u64)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| {
            bad(format!(
                "footer data_offset {hdr_off} points past the end of the file"
            ))
        })?;
    if hdr_off < 512 {
        return Err(bad(format!(
            "footer data_offset {hdr_off} overlaps the footer copy at offset 0"
        )));
    }
    let mut raw = [0u8; HEADER_LEN];
    crate::format::read_exact_at(file, &mut raw, hdr_off).map_err(|e| FormatError::io(path, e))?;
    let header = DynHeader::parse(&raw)
        .map_err(|p| bad(format!("dynamic header at offset {hdr_off}: {p}")))?;

    let bs = header.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(bad(format!(
            "block size {bs} is not a power of two between 512 bytes and 256 MiB"
        )));
    }
    let needed = size.div_ceil(u64::from(bs));
    let max = u64::from(header.max_table_entries);
    if max < needed {
        return Err(bad(format!(
            "max_table_entries {max} is too small for a {size}-byte disk with {bs}-byte blocks (needs {needed})"
        )));
    }
    let bat_off = header.table_offset;
    let bat_end = bat_off
        .checked_add(max * 4)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| bad(format!("BAT (table_offset {bat_off}, max_table_entries {max}) extends past the end of the file")))?;
    if bat_off < 512 {
        return Err(bad(format!(
            "BAT (table_offset {bat_off}) overlaps the footer copy at offset 0"
        )));
    }
    if bat_off < hdr_end && hdr_off < bat_end {
        return Err(bad(format!(
            "BAT (table_offset {bat_off}) overlaps the dynamic header"
        )));
    }
    if needed > MAX_BAT_ENTRIES {
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!("BAT of {needed} entries (imgsafe's limit is {MAX_BAT_ENTRIES})"),
        });
    }
    // needed ≤ MAX_BAT_ENTRIES and ≤ max, and the BAT was checked to lie inside the file:
    // this allocation is bounded by both.
    let mut table = vec![0u8; (needed * 4) as usize];
    crate::format::read_exact_at(file, &mut table, bat_off)
        .map_err(|e| FormatError::io(path, e))?;
    let bat: Vec<u32> = table
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();

    let block_bytes = bitmap_len(bs) + u64::from(bs);
    for (i, &entry) in bat.iter().enumerate() {
        if entry == BAT_UNALLOCATED {
            continue;
        }
        let start = u64::from(entry) * SECTOR;
        // start < 2^41 and block_bytes < 2^29: no overflow.
        let end = start + block_bytes;
        if end > data_limit {
            return Err(bad(format!(
                "BAT entry {i} points past the end of the file"
            )));
        }
        let overlaps = |a: u64, b: u64| start < b && a < end;
        if overlaps(0, 512) {
            return Err(bad(format!(
                "BAT entry {i} overlaps the footer copy at offset 0"
            )));
        }
        if overlaps(hdr_off, hdr_end) {
            return Err(bad(format!("BAT entry {i} overlaps the dynamic header")));
        }
        if overlaps(bat_off, bat_end) {
            return Err(bad(format!("BAT entry {i} overlaps the BAT")));
        }
    }
    Ok(Layout { header, bat })
}

/// A dynamic or differencing VHD file, with its parent chain for the latter.
pub struct Dynamic {
    path: PathBuf,
    file: File,
    size: u64,
    block_size: u64,
    bitmap_len: u64,
    bat: Vec<u32>,
    /// `Some` for differencing disks: reads of clear-bit sectors and unallocated blocks
    /// go there. Dynamic disks ignore the bitmap, as qemu does (it always writes all ones).
    parent: Option<Box<dyn BlockSource>>,
    bitmaps: BitmapCache,
    layer: LayerInfo,
}

impl Dynamic {
    /// Build the reader from a validated layout. `role` is the layer role for `info`.
    pub fn new(
        path: &Path,
        file: File,
        footer: &Footer,
        size: u64,
        layout: Layout,
        parent: Option<Box<dyn BlockSource>>,
        role: &str,
    ) -> Self {
        let block_size = u64::from(layout.header.block_size);
        let allocated = layout.bat.iter().filter(|&&e| e != BAT_UNALLOCATED).count() as u64;
        let layer = LayerInfo {
            path: path.to_path_buf(),
            format: "vhd".into(),
            version: Some(footer.type_name().into()),
            role: role.into(),
            cluster_size: Some(block_size),
            allocated_bytes: Some(allocated.saturating_mul(block_size)),
        };
        Dynamic {
            path: path.to_path_buf(),
            file,
            size,
            block_size,
            bitmap_len: bitmap_len(layout.header.block_size),
            bat: layout.bat,
            parent,
            bitmaps: BitmapCache::new(BITMAP_CACHE_BYTES),
            layer,
        }
    }

    /// The bitmap of an allocated block (differencing disks only).
    fn bitmap(&self, block: u32, entry: u32) -> io::Result<std::sync::Arc<[u8]>> {
        self.bitmaps.get_or_load(block, || {
            let mut bm = vec![0u8; self.bitmap_len as usize];
            crate::format::read_exact_at(&self.file, &mut bm, u64::from(entry) * SECTOR).map_err(
                |e| {
                    io::Error::new(
                        e.kind(),
                        format!("{}: block {block} bitmap: {e}", self.path.display()),
                    )
                },
            )?;
            Ok(bm)
        })
    }

    /// Split `[offset, offset + len)` into runs by source, merging neighbours that
    /// continue each other (contiguous file bytes, or consecutive lower runs).
    fn runs(&self, offset: u64, len: u64) -> io::Result<Vec<Run>> {
        let mut out: Vec<Run> = Vec::new();
        let mut push = |r: Run| match out.last_mut() {
            Some(last)
                if match (last.src, r.src) {
                    (Source::Lower, Source::Lower) => true,
                    (Source::File(a), Source::File(b)) => a + last.len == b,
                    _ => false,
                } =>
            {
                last.len += r.len
            }
            _ => out.push(r),
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let chunk = (self.block_size - in_block).min(end - pos);
            let entry = self
                .bat
                .get(block as usize)
                .copied()
                .unwrap_or(BAT_UNALLOCATED);
            if entry == BAT_UNALLOCATED {
                push(Run {
                    virt: pos,
                    len: chunk,
                    src: Source::Lower,
                });
            } else {
                let data = u64::from(entry) * SECTOR + self.bitmap_len;
                if self.parent.is_none() {
                    push(Run {
                        virt: pos,
                        len: chunk,
                        src: Source::File(data + in_block),
                    });
                } else {
                    let bm = self.bitmap(block as u32, entry)?;
                    let first = in_block / SECTOR;
                    let last = (in_block + chunk).div_ceil(SECTOR);
                    for (s, e, set) in bit_runs(&bm, first, last) {
                        let a = (s * SECTOR).max(in_block);
                        let b = (e * SECTOR).min(in_block + chunk);
                        let src = if set {
                            Source::File(data + a)
                        } else {
                            Source::Lower
                        };
                        push(Run {
                            virt: pos - in_block + a,
                            len: b - a,
                            src,
                        });
                    }
                }
            }
            pos += chunk;
        }
        Ok(out)
    }

    /// Read what lies below this file: the parent (zeros past its end) or zeros.
    fn read_lower(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(parent) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let within = parent.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(within);
        if !head.is_empty() {
            parent.read_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Allocation map of the lower layers over a range: the parent's (holes past its end),
    /// or one hole when there is no parent.
    fn lower_extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let hole = |offset, length| Extent {
            offset,
            length,
            allocated: false,
        };
        let Some(parent) = &self.parent else {
            return Ok(vec![hole(offset, len)]);
        };
        let within = parent.size().saturating_sub(offset).min(len);
        let mut out = if within > 0 {
            parent.extents(offset, within)?
        } else {
            Vec::new()
        };
        crate::format::push_extent(&mut out, hole(offset + within, len - within));
        Ok(out)
    }

    /// Allocation map of `[offset, end)` (inside the disk), appended to `out`: this file's
    /// runs, with the parent asked once for the span of the runs that fall through to it.
    fn slice_extents(&self, out: &mut Vec<Extent>, offset: u64, end: u64) -> io::Result<()> {
        let own: Vec<Extent> = self
            .runs(offset, end - offset)?
            .iter()
            .map(|r| Extent {
                offset: r.virt,
                length: r.len,
                allocated: matches!(r.src, Source::File(_)),
            })
            .collect();
        let lower = match crate::format::holes_span(&own) {
            Some((a, b)) => self.lower_extents(a, b - a)?,
            None => Vec::new(),
        };
        crate::format::overlay_extents(&own, &lower, out);
        Ok(())
    }
}

impl BlockSource for Dynamic {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::format::check_read(self.size, offset, buf.len() as u64)?;
        let runs = self.runs(offset, buf.len() as u64)?;
        let mut segs = Vec::new();
        for r in &runs {
            if let Source::File(file_off) = r.src {
                segs.push(Segment {
                    file_off,
                    buf_start: (r.virt - offset) as usize,
                    len: r.len as usize,
                });
            }
        }
        read_segments(&self.file, buf, &segs)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        for r in runs.iter().filter(|r| r.src == Source::Lower) {
            let start = (r.virt - offset) as usize;
            self.read_lower(&mut buf[start..start + r.len as usize], r.virt)?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        // With a parent, work a slice at a time: each file of a deep chain then holds only
        // one slice's map while its parent answers, whatever range the caller asked for.
        let slice = if self.parent.is_some() {
            LOWER_SLICE
        } else {
            u64::MAX
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let stop = end.min((pos / slice).saturating_add(1).saturating_mul(slice));
            self.slice_extents(&mut out, pos, stop)?;
            pos = stop;
        }
        Ok(out)
    }

    fn layers(&self) -> Vec<LayerInfo> {
        let mut v = vec![self.layer.clone()];
        if let Some(p) = &self.parent {
            v.extend(p.layers());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bitmap_len_is_padded_to_sectors() {
        let cases = [
            (512u32, 512u64),
            (4096, 512),
            (2 << 20, 512),
            (4 << 20, 1024),
            (256 << 20, 65536),
        ];

        let got: Vec<u64> = cases.iter().map(|&(bs, _)| bitmap_len(bs)).collect();

        assert_eq!(got, cases.iter().map(|&(_, l)| l).collect::<Vec<_>>());
    }

    #[test]
    fn bit_zero_is_msb_of_first_byte() {
        let bm = [0b1000_0001u8, 0];

        assert_eq!(
            (0..9).map(|s| bit(&bm, s)).collect::<Vec<_>>(),
            [true, false, false, false, false, false, false, true, false]
        );
    }

    #[test]
    fn bit_runs_splits_on_changes() {
        let bm = [0xFF, 0xF0, 0x00, 0x01];

        let runs = bit_runs(&bm, 2, 32);

        assert_eq!(runs, vec![(2, 12, true), (12, 31, false), (31, 32, true)]);
    }

    proptest! {
        #[test]
        fn bit_runs_agree_with_bit_by_bit(bm in proptest::collection::vec(any::<u8>(), 1..64), a in 0u64..512, b in 0u64..512) {
            let (first, end) = (a.min(b), a.max(b));

            let runs = bit_runs(&bm, first, end);

            let mut expect = first;
            for (s, e, set) in runs {
                prop_assert_eq!(s, expect);
                prop_assert!(e > s);
                for x in s..e {
                    prop_assert_eq!(bit(&bm, x), set);
                }
                if e < end {
                    prop_assert_ne!(bit(&bm, e), set);
                }
                expect = e;
            }
            prop_assert_eq!(expect, end);
        }

        #[test]
        fn bitmap_covers_every_sector(shift in 9u32..29) {
            let bs = 1u32 << shift;

            let len = bitmap_len(bs);

            prop_assert!(len * 8 >= u64::from(bs) / 512);
            prop_assert_eq!(len % 512, 0);
            prop_assert!(len - 512 < u64::from(bs) / 512 / 8 || len == 512);
        }
    }
}
