//! Hosted sparse extents (`KDMV`, VMware "Virtual Disk Format 1.1", "Hosted Sparse
//! Extent Header"): a 512-byte little-endian header, a grain directory (GD) of u32 sector
//! offsets of grain tables (GT), and GTs of u32 sector offsets of grains. Stream-optimized
//! extents keep the GD at the end (`gdOffset` = [`GD_AT_END`], the real one in the footer
//! header 1024 bytes before the end) and store each grain deflate-compressed behind a
//! 12-byte marker (`lba` u64, `size` u32).

use crate::bytes::{le16, le32, le64};
use crate::format::vhd::cache::BitmapCache;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `SPARSE_MAGICNUMBER`: "KDMV" little-endian.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// Bytes of the header.
pub const HEADER_LEN: usize = 512;
/// Sector size of every VMDK offset and count.
pub const SECTOR: u64 = 512;
/// Flag: a redundant grain directory is kept at `rgdOffset`.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag: GTE value 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: metadata markers are present (stream-optimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` of a stream-optimized extent whose GD is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm` deflate.
pub const COMPRESS_DEFLATE: u16 = 1;
/// GTE of a grain that reads as zeros (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// Largest grain accepted (2048 sectors = 1 MiB); VMware and qemu write 64 KiB.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Most GTEs per GT accepted; everyone writes 512.
pub const MAX_GTES_PER_GT: u32 = 4096;
/// Largest capacity accepted: 64 TiB in sectors.
pub const MAX_CAPACITY: u64 = (64 << 40) / SECTOR;
/// Bytes of grain tables kept in memory for one disk, shared out among its sparse
/// extents (a twoGbMaxExtentSparse disk may have thousands).
pub const GT_CACHE_BYTES_PER_DISK: usize = 32 << 20;
/// Most and least grain table bytes one extent keeps.
const GT_CACHE_MAX: usize = 1 << 20;
/// See [`GT_CACHE_MAX`].
const GT_CACHE_MIN: usize = 4096;
/// Bytes of decompressed grains kept in memory per stream-optimized extent.
const GRAIN_CACHE_BYTES: usize = 4 << 20;

/// The sparse extent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1, 2 or 3.
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Sectors of virtual disk in this extent.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_sectors: u64,
    /// Embedded descriptor: sector offset and length in sectors (0 when none).
    pub desc_offset: u64,
    /// See `desc_offset`.
    pub desc_sectors: u64,
    /// GTEs per GT.
    pub gtes_per_gt: u32,
    /// Redundant GD, sectors.
    pub rgd_offset: u64,
    /// GD, sectors (or [`GD_AT_END`]).
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// `compressAlgorithm`.
    pub compress: u16,
}

impl Header {
    /// Parse and check a 512-byte header.
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN || &b[0..4] != MAGIC {
            return Err("no \"KDMV\" sparse extent header".into());
        }
        let h = Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_sectors: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_sectors: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            compress: le16(b, 77),
        };
        if !(1..=3).contains(&h.version) {
            return Err(format!(
                "sparse extent version {} (imgsafe reads 1 to 3)",
                h.version
            ));
        }
        if !h.grain_sectors.is_power_of_two() || h.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(format!(
                "grain size of {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                h.grain_sectors
            ));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(format!(
                "{} entries per grain table (1 to {MAX_GTES_PER_GT} accepted)",
                h.gtes_per_gt
            ));
        }
        if h.capacity > MAX_CAPACITY {
            return Err(format!("capacity of {} sectors exceeds 64 TiB", h.capacity));
        }
        if h.capacity.div_ceil(h.grain_sectors) > u64::from(u32::MAX) {
            return Err(format!(
                "{} grains of {} sectors (imgsafe reads at most 2^32 - 1 per extent)",
                h.capacity.div_ceil(h.grain_sectors),
                h.grain_sectors
            ));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress != COMPRESS_DEFLATE {
            return Err(format!(
                "compression algorithm {} (imgsafe reads deflate)",
                h.compress
            ));
        }
        Ok(h)
    }

    fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
}

/// Where one grain's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not in this extent: the parent, or zeros.
    Lower,
    /// Zeros.
    Zero,
    /// Uncompressed, at this file offset.
    Plain(u64),
    /// Compressed behind a marker at this file offset.
    Compressed(u64),
}

/// One opened sparse extent file.
pub struct Sparse {
    path: PathBuf,
    file: Window,
    file_len: u64,
    header: Header,
    /// Grains with data, counted at open.
    data_grains: u64,
    gd: Vec<u32>,
    gts: BitmapCache,
    grains: BitmapCache,
}

/// The bytes of a file that hold one extent: all of it, or a member of an OVA (tar).
pub struct Window {
    /// The file.
    pub file: File,
    /// Where the extent starts in it.
    pub base: u64,
    /// The extent's length.
    pub len: u64,
}

impl Window {
    /// Read exactly `buf.len()` bytes at `at` of the extent, never past its end.
    pub fn read(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let end = at.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        crate::format::read_exact_at(&self.file, buf, self.base + at)
    }
}

fn read_exact(path: &Path, file: &Window, buf: &mut [u8], at: u64) -> Result<(), String> {
    file.read(buf, at)
        .map_err(|e| format!("{} at offset {at}: {e}", path.display()))
}

impl Sparse {
    /// Open the sparse extent in `file` whose header is `header` (from offset 0).
    /// `sparse_extents` is the number of sparse extents of the disk, to share the grain
    /// table cache.
    pub fn open(
        path: &Path,
        file: File,
        header: Header,
        sparse_extents: usize,
    ) -> Result<Sparse, String> {
        let len = crate::format::file_len(path, &file).map_err(|e| e.to_string())?;
        Sparse::open_in(path, Window { file, base: 0, len }, header, sparse_extents)
    }

    /// Open the sparse extent held by `file` (a whole file or an OVA member).
    pub fn open_in(
        path: &Path,
        file: Window,
        header: Header,
        sparse_extents: usize,
    ) -> Result<Sparse, String> {
        let file_len = file.len;
        let mut header = header;
        if header.gd_offset == GD_AT_END {
            // Stream-optimized: footer marker, footer header, end-of-stream marker.
            let at = file_len
                .checked_sub(2 * HEADER_LEN as u64)
                .filter(|&a| a >= HEADER_LEN as u64)
                .ok_or("stream-optimized extent too short for its footer")?;
            let mut b = [0u8; HEADER_LEN];
            read_exact(path, &file, &mut b, at)?;
            let footer = Header::parse(&b).map_err(|e| format!("footer: {e}"))?;
            if footer.gd_offset == GD_AT_END {
                return Err("footer has no grain directory offset either".into());
            }
            header.gd_offset = footer.gd_offset;
        }
        let gd = match load_gd(path, &file, file_len, &header, header.gd_offset) {
            Ok(gd) => gd,
            Err(primary) if header.flags & FLAG_RGD != 0 && header.rgd_offset != 0 => {
                let gd = load_gd(path, &file, file_len, &header, header.rgd_offset)
                    .map_err(|_| primary.clone())?;
                eprintln!(
                    "imgsafe: warning: {}: {primary}; using the redundant grain directory",
                    path.display()
                );
                gd
            }
            Err(e) => return Err(e),
        };
        let data_grains = check_gts(path, &file, file_len, &header, &gd)?;
        Ok(Sparse {
            path: path.to_path_buf(),
            file,
            file_len,
            header,
            data_grains,
            gd,
            gts: BitmapCache::new(
                (GT_CACHE_BYTES_PER_DISK / sparse_extents.max(1)).clamp(GT_CACHE_MIN, GT_CACHE_MAX),
            ),
            grains: BitmapCache::new(GRAIN_CACHE_BYTES),
        })
    }

    /// Sectors of virtual disk this extent holds.
    pub fn capacity(&self) -> u64 {
        self.header.capacity
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.header.grain_sectors * SECTOR
    }

    /// The header (for `info`).
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn err(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", self.path.display()),
        )
    }

    /// Where grain `g` (index in the extent) is. GTEs are checked here, on first use:
    /// a grain must lie after the metadata (`overHead`) and inside the file.
    pub fn grain(&self, g: u64) -> io::Result<Grain> {
        let per_gt = u64::from(self.header.gtes_per_gt);
        let gdi = g / per_gt;
        let gt_sector = self.gd.get(gdi as usize).copied().unwrap_or(0);
        if gt_sector == 0 {
            return Ok(Grain::Lower);
        }
        let gt_bytes = per_gt * 4;
        // GD entries ≤ 4 Mi (checked at open): the index fits the cache key.
        let gt: Arc<[u8]> = self.gts.get_or_load(gdi as u32, || {
            let mut t = vec![0u8; gt_bytes as usize];
            self.file.read(&mut t, u64::from(gt_sector) * SECTOR)?;
            Ok(t)
        })?;
        let gte = le32(&gt, ((g % per_gt) * 4) as usize);
        classify(&self.header, self.file_len, g, gte).map_err(|e| self.err(e))
    }

    /// The decompressed bytes of compressed grain `g` whose marker is at `at`.
    pub fn inflate(&self, g: u64, at: u64) -> io::Result<Arc<[u8]>> {
        let grain = self.grain_bytes();
        // Grains per extent ≤ u32::MAX (checked at open): the index is the cache key.
        self.grains.get_or_load(g as u32, || {
            let mut m = [0u8; 12];
            self.file.read(&mut m, at)?;
            let (lba, size) = (le64(&m, 0), u64::from(le32(&m, 8)));
            if lba != g * self.header.grain_sectors {
                return Err(self.err(format!(
                    "compressed grain marker at offset {at} is for sector {lba}, not grain {g}"
                )));
            }
            // Deflate never grows data by more than a few bytes per 16 KiB block.
            if size == 0 || size > 2 * grain + 4096 || at + 12 + size > self.file_len {
                return Err(self.err(format!(
                    "compressed grain at offset {at} has an impossible size {size}"
                )));
            }
            let mut z = vec![0u8; size as usize];
            self.file.read(&mut z, at + 12)?;
            let mut out =
                miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&z, grain as usize)
                    .map_err(|e| {
                        self.err(format!(
                            "compressed grain {g} does not inflate: {:?}",
                            e.status
                        ))
                    })?;
            // A short last grain is zero-padded, as qemu reads it.
            out.resize(grain as usize, 0);
            Ok(out)
        })
    }

    /// Read `buf.len()` bytes at `off` of a plain grain's file bytes.
    pub fn read_file(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.file
            .read(buf, at)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }

    /// Number of grains with data in this extent (for `info`).
    pub fn count_allocated(&self) -> u64 {
        self.data_grains
    }
}

/// What GTE `gte` of grain `g` means; a grain must lie after the metadata (`overHead`)
/// and inside the file.
fn classify(h: &Header, file_len: u64, g: u64, gte: u32) -> Result<Grain, String> {
    match gte {
        0 => Ok(Grain::Lower),
        GTE_ZEROED if h.flags & FLAG_ZERO_GRAIN != 0 => Ok(Grain::Zero),
        s if u64::from(s) < h.overhead.max(1) => Err(format!(
            "grain table entry for grain {g} ({s}) points into the extent's metadata"
        )),
        s => {
            let at = u64::from(s) * SECTOR;
            let min_len = if h.compressed() {
                12
            } else {
                h.grain_sectors * SECTOR
            };
            if at + min_len > file_len {
                return Err(format!(
                    "grain table entry for grain {g} points past the end of the file"
                ));
            }
            Ok(if h.compressed() {
                Grain::Compressed(at)
            } else {
                Grain::Plain(at)
            })
        }
    }
}

/// Read every grain table of `gd` once and check every entry, so a broken table is
/// reported when the image is opened rather than in the middle of a read. Returns the
/// number of grains with data. Memory: one table at a time.
fn check_gts(
    path: &Path,
    file: &Window,
    file_len: u64,
    h: &Header,
    gd: &[u32],
) -> Result<u64, String> {
    let per_gt = u64::from(h.gtes_per_gt);
    let grains = h.capacity.div_ceil(h.grain_sectors);
    let mut t = vec![0u8; (per_gt * 4) as usize];
    let mut data = 0;
    for (i, &s) in gd.iter().enumerate() {
        if s == 0 {
            continue;
        }
        read_exact(path, file, &mut t, u64::from(s) * SECTOR)?;
        for (j, c) in t.chunks_exact(4).enumerate() {
            let g = i as u64 * per_gt + j as u64;
            if g >= grains {
                break;
            }
            if matches!(
                classify(h, file_len, g, le32(c, 0))?,
                Grain::Plain(_) | Grain::Compressed(_)
            ) {
                data += 1;
            }
        }
    }
    Ok(data)
}

/// Read and check a grain directory at sector `gd_sector`: inside the file, and every
/// GT it names inside the file and clear of the header and the GD itself.
fn load_gd(
    path: &Path,
    file: &Window,
    file_len: u64,
    h: &Header,
    gd_sector: u64,
) -> Result<Vec<u32>, String> {
    let per_gt_bytes = u64::from(h.gtes_per_gt) * h.grain_sectors * SECTOR;
    let entries = (h.capacity * SECTOR).div_ceil(per_gt_bytes);
    if entries > 4 << 20 {
        return Err(format!("grain directory of {entries} entries is too large"));
    }
    let gd_at = gd_sector
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("grain directory offset {gd_sector} overflows"))?;
    let gd_end = gd_at.saturating_add(entries * 4);
    if gd_at < HEADER_LEN as u64 || gd_end > file_len {
        return Err(format!(
            "grain directory (sector {gd_sector}, {entries} entries) lies outside the file or over the header"
        ));
    }
    let mut raw = vec![0u8; (entries * 4) as usize];
    read_exact(path, file, &mut raw, gd_at)?;
    let gd: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
    let gt_len = u64::from(h.gtes_per_gt) * 4;
    for (i, &s) in gd.iter().enumerate() {
        if s == 0 {
            continue;
        }
        let a = u64::from(s) * SECTOR;
        let b = a + gt_len;
        if a < HEADER_LEN as u64 {
            return Err(format!(
                "grain directory entry {i} points a grain table into the header"
            ));
        }
        let da = h.desc_offset.saturating_mul(SECTOR);
        let db = h
            .desc_offset
            .saturating_add(h.desc_sectors)
            .saturating_mul(SECTOR);
        if a < db && da < b {
            return Err(format!(
                "grain directory entry {i} points a grain table into the embedded descriptor"
            ));
        }
        if a < gd_end && gd_at < b {
            return Err(format!(
                "grain directory entry {i} points a grain table into the grain directory"
            ));
        }
        if b > file_len {
            return Err(format!(
                "grain directory entry {i} points past the end of the file"
            ));
        }
    }
    // Distinct grain tables only: a valid extent never shares one, and a hostile GD of
    // millions of entries naming one table would make the open-time check read it
    // millions of times. Disjoint tables inside the file bound that work by its size.
    let mut starts: Vec<(u32, usize)> = gd
        .iter()
        .enumerate()
        .filter(|e| *e.1 != 0)
        .map(|(i, &s)| (s, i))
        .collect();
    starts.sort_unstable();
    for w in starts.windows(2) {
        if u64::from(w[0].0) * SECTOR + gt_len > u64::from(w[1].0) * SECTOR {
            return Err(format!(
                "grain directory entries {} and {} point to overlapping grain tables",
                w[0].1.min(w[1].1),
                w[0].1.max(w[1].1)
            ));
        }
    }
    Ok(gd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header as qemu-img writes one for a monolithicSparse disk of `capacity` sectors.
    fn header(capacity: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&(FLAG_RGD | 1).to_le_bytes());
        b[12..20].copy_from_slice(&capacity.to_le_bytes());
        b[20..28].copy_from_slice(&128u64.to_le_bytes());
        b[28..36].copy_from_slice(&1u64.to_le_bytes());
        b[36..44].copy_from_slice(&20u64.to_le_bytes());
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        b[48..56].copy_from_slice(&21u64.to_le_bytes());
        b[56..64].copy_from_slice(&26u64.to_le_bytes());
        b[64..72].copy_from_slice(&128u64.to_le_bytes());
        b
    }

    #[test]
    fn parses_the_fields_at_their_spec_offsets() {
        let h = Header::parse(&header(9766)).unwrap();

        assert_eq!((h.version, h.capacity, h.grain_sectors), (1, 9766, 128));
        assert_eq!((h.desc_offset, h.desc_sectors), (1, 20));
        assert_eq!(
            (h.gtes_per_gt, h.rgd_offset, h.gd_offset, h.overhead),
            (512, 21, 26, 128)
        );
    }

    #[test]
    fn refuses_versions_grains_tables_and_capacities_out_of_range() {
        let with = |at: usize, v: &[u8]| {
            let mut b = header(9766);
            b[at..at + v.len()].copy_from_slice(v);
            Header::parse(&b).unwrap_err()
        };

        assert!(with(4, &4u32.to_le_bytes()).contains("version 4"));
        assert!(with(20, &4096u64.to_le_bytes()).contains("grain size of 4096"));
        assert!(with(44, &0u32.to_le_bytes()).contains("0 entries per grain table"));
        assert!(with(12, &u64::MAX.to_le_bytes()).contains("exceeds 64 TiB"));
        assert!(with(8, &(FLAG_COMPRESSED).to_le_bytes()).contains("compression algorithm 0"));
    }

    #[test]
    fn gtes_are_classified_against_the_metadata_and_the_file() {
        let mut h = Header::parse(&header(9766)).unwrap();
        h.flags |= FLAG_ZERO_GRAIN;
        let len = 1 << 20;

        assert_eq!(classify(&h, len, 0, 0), Ok(Grain::Lower));
        assert_eq!(classify(&h, len, 0, GTE_ZEROED), Ok(Grain::Zero));
        assert_eq!(classify(&h, len, 0, 128), Ok(Grain::Plain(65536)));
        assert!(classify(&h, len, 7, 5)
            .unwrap_err()
            .contains("grain 7 (5) points into"));
        assert!(classify(&h, len, 0, 2047)
            .unwrap_err()
            .contains("past the end"));
    }
}
