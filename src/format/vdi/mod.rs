//! VirtualBox VDI: static, dynamic and differencing images (header version 1.1).
//!
//! Layout ([`header`]): a 72-byte pre-header (banner, signature, version), the header
//! (`cbHeader` bytes), a block map of little-endian u32 entries at `offBlocks`, and the
//! blocks at `offData`. Entry `n` of the map says where virtual block `n` is: data block
//! index `e` lives at `offData + e × (cbBlockExtra + cbBlock) + cbBlockExtra`;
//! [`BLOCK_FREE`] is not allocated and [`BLOCK_ZERO`] reads as zeros.
//!
//! # Differencing images
//!
//! A differencing VDI names its parent only by the parent's creation UUID
//! (`uuidLinkage`); where the parent lives is recorded by VirtualBox in the machine's
//! `.vbox` file, not in the image. imgsafe looks for the parent beside the child: the
//! `.vdi` files of the child's folder (at most [`MAX_SCAN_ENTRIES`] entries of it are
//! looked at) whose `uuidCreate` matches. The match is the identity check; the parent's
//! modification UUID is not compared, since VirtualBox does not refuse a chain on it.
//! Free blocks read from the parent, zero blocks read as zeros without consulting it.

pub mod header;

use super::{BlockSource, Extent, FormatError, LayerInfo};
use header::{Header, BLOCK_FREE, BLOCK_ZERO, SECTOR};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub use super::MAX_CHAIN_DEPTH;
/// Most block map entries one file may have in memory (128 MiB of map): a 32 TiB disk
/// with VirtualBox's 1 MiB blocks fits.
pub const MAX_BLOCKS: u64 = 32 << 20;
/// Most memory the block maps of one chain may take together.
pub const MAX_CHAIN_MAP_BYTES: u64 = 512 << 20;
/// Smallest block size accepted (one sector).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted; VirtualBox and qemu write 1 MiB.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most directory entries looked at when searching the child's folder for its parent,
/// so a folder of millions of files cannot keep imgsafe busy.
pub const MAX_SCAN_ENTRIES: usize = 4096;
/// Bytes of a differencing image mapped per call to its parent when building an
/// allocation map, so each file of a deep chain holds one slice's map at a time.
const LOWER_SLICE: u64 = 8 << 20;

/// True if the file's first bytes carry the VDI signature.
pub fn probe(head: &[u8]) -> bool {
    header::has_signature(head)
}

/// What the files opened so far in a chain have taken.
#[derive(Default)]
struct Chain {
    /// (device, inode) of each file, top first, to refuse parent loops.
    files: super::ChainFiles,
    /// Bytes held by their block maps.
    map_bytes: u64,
}

/// Open a VDI file (and, for a differencing image, its parents).
pub fn open(path: &Path, file: File) -> Result<Box<dyn BlockSource>, FormatError> {
    let mut chain = Chain::default();
    Ok(Box::new(open_layer(path, file, &mut chain)?))
}

/// Read the header of an open file.
fn read_header(path: &Path, file: &File) -> Result<Header, FormatError> {
    let head = super::read_head(path, file)?;
    Header::parse(&head).map_err(|p| FormatError::corrupt(path, format!("VDI header: {p}")))
}

/// Open one file of a chain; `chain` holds what the files above it took.
fn open_layer(path: &Path, file: File, chain: &mut Chain) -> Result<Vdi, FormatError> {
    chain.files.enter(path, &file, "differencing")?;
    let is_parent = chain.files.is_parent();

    let header = read_header(path, &file)?;
    let layout = load_layout(path, &file, &header)?;
    chain.map_bytes += layout.map.len() as u64 * 4;
    if chain.map_bytes > MAX_CHAIN_MAP_BYTES {
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!(
                "differencing chain whose block maps need more than {} MiB of memory",
                MAX_CHAIN_MAP_BYTES >> 20
            ),
        });
    }
    let parent = if header.image_type == header::TYPE_DIFF {
        Some(Box::new(open_parent(path, &header, chain)?) as Box<dyn BlockSource>)
    } else {
        None
    };
    let role = super::chain_role(is_parent, parent.is_some());
    Ok(Vdi::new(path, file, &header, layout, parent, role))
}

/// The checked geometry and block map of one file.
struct Layout {
    /// Virtual disk size in bytes.
    size: u64,
    /// One entry per block of the virtual disk.
    map: Vec<u32>,
}

/// Check the header's fields against each other and the file, then read the block map.
fn load_layout(path: &Path, file: &File, h: &Header) -> Result<Layout, FormatError> {
    let bad = |what: String| FormatError::corrupt(path, what);
    let unsupported = |what: String| FormatError::Unsupported {
        path: path.to_path_buf(),
        what,
    };
    match h.image_type {
        header::TYPE_DYNAMIC | header::TYPE_STATIC | header::TYPE_DIFF => {}
        header::TYPE_UNDO => return Err(unsupported("VDI undo image (VirtualBox 1.x)".into())),
        t => return Err(bad(format!("unknown VDI image type {t}"))),
    }
    if u64::from(h.sector_size) != SECTOR {
        return Err(unsupported(format!(
            "VDI sector size {} (only 512 is read)",
            h.sector_size
        )));
    }
    let bs = h.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(bad(format!(
            "block size {bs} is not a power of two between 512 bytes and 256 MiB"
        )));
    }
    if h.block_extra > bs {
        return Err(bad(format!(
            "block extra data of {} bytes is larger than the {bs}-byte block",
            h.block_extra
        )));
    }
    // Odd sizes (VBoxManage convertfromraw writes them) are rounded up to a whole sector,
    // as qemu does; the block map must still cover the rounded size.
    let size = h
        .disk_size
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(|| bad(format!("disk size {} overflows", h.disk_size)))?;
    let covered = u64::from(h.blocks) * u64::from(bs);
    if size > covered {
        return Err(bad(format!(
            "disk size {size} is larger than its {} blocks of {bs} bytes",
            h.blocks
        )));
    }
    let needed = size.div_ceil(u64::from(bs));
    if needed > MAX_BLOCKS {
        return Err(unsupported(format!(
            "block map of {needed} entries (imgsafe's limit is {MAX_BLOCKS})"
        )));
    }
    let file_len = super::file_len(path, file)?;
    let map_off = u64::from(h.offset_blocks);
    let map_end = map_off + u64::from(h.blocks) * 4;
    if map_off < h.end() {
        return Err(bad(format!(
            "block map (offset {map_off}) overlaps the header"
        )));
    }
    if map_end > file_len {
        return Err(bad(format!(
            "block map (offset {map_off}, {} entries) extends past the end of the file",
            h.blocks
        )));
    }
    let data_off = u64::from(h.offset_data);
    if data_off < map_end {
        return Err(bad(format!(
            "data area (offset {data_off}) overlaps the block map"
        )));
    }
    // needed ≤ MAX_BLOCKS and ≤ blocks, whose table lies inside the file: bounded twice.
    let mut raw = vec![0u8; (needed * 4) as usize];
    super::read_exact_at(file, &mut raw, map_off).map_err(|e| FormatError::io(path, e))?;
    let map: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let stride = u64::from(h.block_extra) + u64::from(bs);
    for (i, &e) in map.iter().enumerate() {
        if e == BLOCK_FREE || e == BLOCK_ZERO {
            continue;
        }
        if e >= h.blocks {
            return Err(bad(format!(
                "block map entry {i} ({e}) is not below the block count {}",
                h.blocks
            )));
        }
        // e < 2^32 and stride ≤ 2^29: no overflow.
        let end = data_off + (u64::from(e) + 1) * stride;
        if end > file_len {
            return Err(bad(format!(
                "block map entry {i} points past the end of the file"
            )));
        }
    }
    Ok(Layout { size, map })
}

/// Find the parent of a differencing image among the `.vdi` files of its folder, by the
/// creation UUID the child links to, and open it (with its own parents).
fn open_parent(child: &Path, h: &Header, chain: &mut Chain) -> Result<Vdi, FormatError> {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let want = uuid_text(&h.uuid_link);
    let mut matches: Vec<(PathBuf, File)> = Vec::new();
    let mut looked = 0usize;
    let entries = std::fs::read_dir(&dir).map_err(|e| FormatError::io(&dir, e))?;
    for entry in entries.take(MAX_SCAN_ENTRIES) {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        // Compared as bytes: slicing a non-ASCII name as a str could split a character.
        let b = name.as_encoded_bytes();
        let is_vdi = b.len() > 4 && b[b.len() - 4..].eq_ignore_ascii_case(b".vdi");
        if !is_vdi {
            continue;
        }
        looked += 1;
        let p = dir.join(&name);
        // Only regular files (a symlink to one is fine): a FIFO or device is never opened.
        if !std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(f) = super::open_image_file(&p) else {
            continue;
        };
        if read_header(&p, &f).is_ok_and(|ph| ph.uuid_create == h.uuid_link) {
            matches.push((p, f));
        }
    }
    matches.sort_by(|a, b| a.0.cmp(&b.0));
    // The child itself (or a hard link to it) can match only in a broken chain: it is
    // left for open_layer to report as a loop rather than counted as a second candidate.
    if matches.len() > 1 {
        let names: Vec<String> = matches.iter().map(|m| m.0.display().to_string()).collect();
        return Err(FormatError::corrupt(
            child,
            format!(
                "several files beside it have the parent UUID {want}: {}",
                names.join(", ")
            ),
        ));
    }
    let Some((p, f)) = matches.pop() else {
        return Err(FormatError::corrupt(
            child,
            format!(
                "parent image with UUID {want} not found among the {looked} .vdi files in {}",
                dir.display()
            ),
        ));
    };
    open_layer(&p, f, chain)
}

/// A UUID as VirtualBox prints it: the first three fields are stored little-endian.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h = |r: &[u8]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let rev = |r: &[u8]| h(&r.iter().rev().copied().collect::<Vec<u8>>());
    format!(
        "{}-{}-{}-{}-{}",
        rev(&u[0..4]),
        rev(&u[4..6]),
        rev(&u[6..8]),
        h(&u[8..10]),
        h(&u[10..16])
    )
}

/// Where one run of virtual bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// This file, at this offset.
    File(u64),
    /// A zero block: zeros, whatever lies below.
    Zero,
    /// A free block: the parent, or zeros when there is none.
    Lower,
}

/// A run of the virtual disk with one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    virt: u64,
    len: u64,
    src: Source,
}

/// One VDI file, with its parent chain for a differencing image.
pub struct Vdi {
    path: PathBuf,
    file: File,
    size: u64,
    block_size: u64,
    /// `offData + cbBlockExtra`: where data block 0's bytes start.
    data_start: u64,
    /// `cbBlockExtra + cbBlock`: bytes between two data blocks' starts.
    stride: u64,
    map: Vec<u32>,
    parent: Option<Box<dyn BlockSource>>,
    layer: LayerInfo,
}

impl Vdi {
    fn new(
        path: &Path,
        file: File,
        h: &Header,
        layout: Layout,
        parent: Option<Box<dyn BlockSource>>,
        role: &str,
    ) -> Vdi {
        let block_size = u64::from(h.block_size);
        let allocated = layout
            .map
            .iter()
            .filter(|&&e| e != BLOCK_FREE && e != BLOCK_ZERO)
            .count() as u64;
        let layer = LayerInfo {
            path: path.to_path_buf(),
            format: "vdi".into(),
            version: Some(format!("1.{} {}", h.version_minor, h.type_name())),
            role: role.into(),
            cluster_size: Some(block_size),
            allocated_bytes: Some(allocated.saturating_mul(block_size).min(layout.size)),
        };
        Vdi {
            path: path.to_path_buf(),
            file,
            size: layout.size,
            block_size,
            data_start: u64::from(h.offset_data) + u64::from(h.block_extra),
            stride: u64::from(h.block_extra) + block_size,
            map: layout.map,
            parent,
            layer,
        }
    }

    /// Split `[offset, offset + len)` (inside the disk) into runs by source, merging
    /// neighbours that continue each other.
    fn runs(&self, offset: u64, len: u64) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let chunk = (self.block_size - in_block).min(end - pos);
            let src = match self.map.get(block as usize).copied() {
                Some(BLOCK_ZERO) => Source::Zero,
                None | Some(BLOCK_FREE) => Source::Lower,
                // Checked at open: the block lies inside the file.
                Some(e) => Source::File(self.data_start + u64::from(e) * self.stride + in_block),
            };
            let r = Run {
                virt: pos,
                len: chunk,
                src,
            };
            match out.last_mut() {
                Some(last)
                    if match (last.src, r.src) {
                        (Source::File(a), Source::File(b)) => a + last.len == b,
                        (a, b) => a == b,
                    } =>
                {
                    last.len += r.len
                }
                _ => out.push(r),
            }
            pos += chunk;
        }
        out
    }

    /// Read what lies below a free block: the parent (zeros past its end) or zeros.
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

    /// Allocation map of `[offset, end)` (inside the disk), appended to `out`.
    fn slice_extents(&self, out: &mut Vec<Extent>, offset: u64, end: u64) -> io::Result<()> {
        let hole = |offset, length| Extent {
            offset,
            length,
            allocated: false,
        };
        for r in self.runs(offset, end - offset) {
            match (r.src, &self.parent) {
                (Source::File(_), _) => super::push_extent(
                    out,
                    Extent {
                        offset: r.virt,
                        length: r.len,
                        allocated: true,
                    },
                ),
                (Source::Zero, _) | (Source::Lower, None) => {
                    super::push_extent(out, hole(r.virt, r.len))
                }
                (Source::Lower, Some(parent)) => {
                    let within = parent.size().saturating_sub(r.virt).min(r.len);
                    if within > 0 {
                        // Clip what the parent says to what was asked: its extents are
                        // trusted for their state only.
                        for e in parent.extents(r.virt, within)? {
                            let a = e.offset.clamp(r.virt, r.virt + within);
                            let b = e.offset.saturating_add(e.length).clamp(a, r.virt + within);
                            super::push_extent(
                                out,
                                Extent {
                                    offset: a,
                                    length: b - a,
                                    allocated: e.allocated,
                                },
                            );
                        }
                    }
                    super::push_extent(out, hole(r.virt + within, r.len - within));
                }
            }
        }
        Ok(())
    }
}

impl BlockSource for Vdi {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::check_read(self.size, offset, buf.len() as u64)?;
        for r in self.runs(offset, buf.len() as u64) {
            let start = (r.virt - offset) as usize;
            let part = &mut buf[start..start + r.len as usize];
            match r.src {
                Source::File(at) => super::read_exact_at(&self.file, part, at).map_err(|e| {
                    io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
                })?,
                Source::Zero => part.fill(0),
                Source::Lower => self.read_lower(part, r.virt)?,
            }
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let slice = if self.parent.is_some() {
            LOWER_SLICE
        } else {
            u64::MAX
        };
        let mut out = Vec::new();
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
mod tests;
