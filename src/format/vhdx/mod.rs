//! Microsoft VHDX: fixed, dynamic and differencing disks (MS-VHDX).
//!
//! The header section ([`layout`]) holds two headers (the valid one with the larger
//! sequence number is current, both CRC-32C checked) and two region tables naming the
//! BAT and metadata regions; the metadata gives the block size, the logical and physical
//! sector sizes, the virtual size, the disk id (page 83 data) and, for a differencing
//! disk, the parent locator. The BAT interleaves one sector bitmap entry after every
//! `chunk ratio` payload entries.
//!
//! # Block states
//!
//! Fully present blocks are read from the file. Not present blocks read from the parent
//! in a differencing disk and as zeros otherwise; zero, undefined and unmapped blocks read
//! as zeros (the spec allows zeros for the latter two, and zeros never leak old data).
//! Partially present blocks (differencing disks only) consult the chunk's sector bitmap
//! sector by sector, bit 0 of byte 0 first: set bits are this file, clear bits the parent.
//!
//! # The log
//!
//! A header whose `LogGuid` is not zero has log entries that were never applied to the
//! file. imgsafe refuses such a file, naming the log, instead of replaying it in memory:
//! replay means trusting a second hostile structure on every read, and the tools that
//! wrote the file replay it themselves when they open it read-write.
//!
//! # Parents
//!
//! The parent locator's `relative_path` is tried first (against the child's folder),
//! then `absolute_win32_path` when it names a path usable here (a drive letter does
//! not), then the file name of any path beside the child; `volume_path` names a Windows
//! volume and is not used. The parent's current `DataWriteGuid` must equal the child's
//! `parent_linkage` (or `parent_linkage2`), unless `--ignore-parent-id`.

pub mod crc32c;
pub mod layout;

use super::vhd::cache::BitmapCache;
use super::{BlockSource, Extent, FormatError, LayerInfo, OpenOptions};
use layout::{guid_text, offset, state, Layout};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use super::MAX_CHAIN_DEPTH;
/// Most memory the BATs of one chain may take together.
pub const MAX_CHAIN_BAT_BYTES: u64 = 512 << 20;
/// Bytes of sector bitmaps kept in memory per differencing file.
const BITMAP_CACHE_BYTES: usize = 8 << 20;
/// Bytes of a differencing disk mapped per call to its parent when building an
/// allocation map, so each file of a deep chain holds one slice's map at a time.
const LOWER_SLICE: u64 = 8 << 20;

/// True if the file starts with the VHDX file type identifier.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(layout::FILE_SIGNATURE)
}

/// What the files opened so far in a chain have taken.
#[derive(Default)]
struct Chain {
    /// (device, inode) of each file, top first, to refuse parent loops.
    files: super::ChainFiles,
    /// Bytes held by their BATs.
    bat_bytes: u64,
}

/// Open a VHDX file (and, for a differencing disk, its parents).
pub fn open(
    path: &Path,
    file: File,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockSource>, FormatError> {
    let mut chain = Chain::default();
    Ok(Box::new(open_layer(path, file, opts, &mut chain)?))
}

fn open_layer(
    path: &Path,
    file: File,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Vhdx, FormatError> {
    chain.files.enter(path, &file, "differencing")?;
    let is_parent = chain.files.is_parent();
    let layout = layout::load(path, &file)?;
    chain.bat_bytes += layout.bat.len() as u64 * 8;
    if chain.bat_bytes > MAX_CHAIN_BAT_BYTES {
        return Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!(
                "differencing chain whose BATs need more than {} MiB of memory",
                MAX_CHAIN_BAT_BYTES >> 20
            ),
        });
    }
    let parent = if layout.meta.has_parent {
        let p = open_parent(path, &layout, opts, chain)?;
        if p.logical_sector != u64::from(layout.meta.logical_sector) {
            return Err(FormatError::corrupt(
                path,
                format!(
                    "parent {} has {}-byte logical sectors, this disk {}-byte ones",
                    p.path.display(),
                    p.logical_sector,
                    layout.meta.logical_sector
                ),
            ));
        }
        Some(Box::new(p) as Box<dyn BlockSource>)
    } else {
        None
    };
    let role = super::chain_role(is_parent, parent.is_some());
    Ok(Vhdx::new(path, file, layout, parent, role))
}

/// Where the parent may be, in the order to try.
fn parent_candidates(child: &Path, pairs: &[(String, String)]) -> Vec<PathBuf> {
    let child_dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let value = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: Option<PathBuf>| {
        if let Some(p) = p {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    };
    let local = |text: &str| super::vhd::header::windows_to_local(text, &child_dir);
    push(value("relative_path").and_then(local));
    push(
        value("absolute_win32_path")
            .map(|t| t.strip_prefix("\\\\?\\").unwrap_or(t))
            .and_then(local),
    );
    for key in ["relative_path", "absolute_win32_path", "volume_path"] {
        let name = value(key).and_then(|t| t.rsplit(['\\', '/']).next());
        if let Some(n) = name.filter(|n| !n.is_empty() && *n != "." && *n != "..") {
            push(Some(child_dir.join(n)));
        }
    }
    out
}

/// The linkage GUIDs as text (lower case, without braces).
fn linkages(pairs: &[(String, String)]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == "parent_linkage" || k == "parent_linkage2")
        .map(|(_, v)| v.trim_matches(['{', '}']).to_ascii_lowercase())
        .collect()
}

/// Find, check and open the parent of a differencing disk.
fn open_parent(
    child: &Path,
    l: &Layout,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Vhdx, FormatError> {
    let pairs = &l.meta.parent_locator;
    let want = linkages(pairs);
    if want.is_empty() {
        return Err(FormatError::corrupt(
            child,
            "parent locator has no parent_linkage",
        ));
    }
    let candidates = parent_candidates(child, pairs);
    if candidates.is_empty() {
        return Err(FormatError::corrupt(
            child,
            "parent locator names no path usable on this machine",
        ));
    }
    let mut first_err: Option<FormatError> = None;
    for p in &candidates {
        if std::fs::symlink_metadata(p).is_err() {
            continue;
        }
        let result = (|| {
            if !std::fs::metadata(p).is_ok_and(|m| m.is_file()) {
                return Err(FormatError::corrupt(p, "not a regular file"));
            }
            let f = super::open_image_file(p)?;
            let ph = layout::load(p, &f)?.header;
            let got = guid_text(&ph.data_write_guid);
            if !want.contains(&got) && !opts.ignore_parent_id {
                return Err(FormatError::corrupt(
                    child,
                    format!(
                        "parent {} has DataWriteGuid {got} but this disk expects {} (the parent was modified or replaced; --ignore-parent-id opens it anyway)",
                        p.display(),
                        want.join(" or ")
                    ),
                ));
            }
            let (files, bat) = (chain.files.len(), chain.bat_bytes);
            open_layer(p, f, opts, chain).inspect_err(|_| {
                chain.files.truncate(files);
                chain.bat_bytes = bat;
            })
        })();
        match result {
            Ok(v) => return Ok(v),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        FormatError::corrupt(
            child,
            format!("parent image not found (looked for {})", list.join(", ")),
        )
    }))
}

/// Where one run of virtual bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// This file, at this offset.
    File(u64),
    /// Zeros, whatever lies below.
    Zero,
    /// The parent, or zeros when there is none.
    Lower,
}

/// A run of the virtual disk with one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    virt: u64,
    len: u64,
    src: Source,
}

/// Is bit `i` set? Bit 0 of byte 0 is the first sector (MS-VHDX 2.4).
fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap
        .get((i / 8) as usize)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Runs of equal bits over `[first, end)`: `(start, end, set)`, in order.
fn bit_runs(bitmap: &[u8], first: u64, end: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut s = first;
    while s < end {
        let set = bit(bitmap, s);
        let mut e = s + 1;
        while e < end {
            if e.is_multiple_of(8) && e + 8 <= end {
                let b = bitmap.get((e / 8) as usize).copied().unwrap_or(0);
                if b == if set { 0xFF } else { 0 } {
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

/// One VHDX file, with its parent chain for a differencing disk.
pub struct Vhdx {
    path: PathBuf,
    file: File,
    size: u64,
    block_size: u64,
    logical_sector: u64,
    layout: Layout,
    parent: Option<Box<dyn BlockSource>>,
    bitmaps: BitmapCache,
    layer: LayerInfo,
}

impl Vhdx {
    fn new(
        path: &Path,
        file: File,
        layout: Layout,
        parent: Option<Box<dyn BlockSource>>,
        role: &str,
    ) -> Vhdx {
        let block_size = u64::from(layout.meta.block_size);
        let present = (0..layout.payload_blocks)
            .filter(|&i| {
                matches!(
                    state(layout.payload_entry(i)),
                    layout::PAYLOAD_FULLY_PRESENT | layout::PAYLOAD_PARTIALLY_PRESENT
                )
            })
            .count() as u64;
        let kind = if layout.meta.has_parent {
            "differencing"
        } else if layout.meta.leave_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        let size = layout.meta.disk_size;
        let layer = LayerInfo {
            path: path.to_path_buf(),
            format: "vhdx".into(),
            version: Some(kind.into()),
            role: role.into(),
            cluster_size: Some(block_size),
            allocated_bytes: Some(present.saturating_mul(block_size).min(size)),
        };
        Vhdx {
            path: path.to_path_buf(),
            file,
            size,
            block_size,
            logical_sector: u64::from(layout.meta.logical_sector),
            layout,
            parent,
            bitmaps: BitmapCache::new(BITMAP_CACHE_BYTES),
            layer,
        }
    }

    /// The sector bitmap bytes of payload block `block` (partially present only).
    fn bitmap(&self, block: u64) -> io::Result<Arc<[u8]>> {
        let l = &self.layout;
        let per_block = self.block_size / self.logical_sector / 8;
        let at =
            offset(l.bitmap_entry(block / l.chunk_ratio)) + (block % l.chunk_ratio) * per_block;
        // Payload blocks ≤ 64 TiB / 1 MiB = 2^26: the index fits the cache's u32 key.
        self.bitmaps.get_or_load(block as u32, || {
            let mut bm = vec![0u8; per_block as usize];
            super::read_exact_at(&self.file, &mut bm, at).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: sector bitmap of block {block}: {e}",
                        self.path.display()
                    ),
                )
            })?;
            Ok(bm)
        })
    }

    /// Split `[offset, offset + len)` (inside the disk) into runs by source.
    fn runs(&self, offset: u64, len: u64) -> io::Result<Vec<Run>> {
        let mut out: Vec<Run> = Vec::new();
        let mut push = |r: Run| match out.last_mut() {
            Some(last)
                if match (last.src, r.src) {
                    (Source::File(a), Source::File(b)) => a + last.len == b,
                    (a, b) => a == b,
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
            let entry = self.layout.payload_entry(block);
            let data = layout::offset(entry);
            match state(entry) {
                layout::PAYLOAD_FULLY_PRESENT => push(Run {
                    virt: pos,
                    len: chunk,
                    src: Source::File(data + in_block),
                }),
                layout::PAYLOAD_PARTIALLY_PRESENT => {
                    let bm = self.bitmap(block)?;
                    let ss = self.logical_sector;
                    for (s, e, set) in bit_runs(&bm, in_block / ss, (in_block + chunk).div_ceil(ss))
                    {
                        let a = (s * ss).max(in_block);
                        let b = (e * ss).min(in_block + chunk);
                        push(Run {
                            virt: pos - in_block + a,
                            len: b - a,
                            src: if set {
                                Source::File(data + a)
                            } else {
                                Source::Lower
                            },
                        });
                    }
                }
                layout::PAYLOAD_NOT_PRESENT => push(Run {
                    virt: pos,
                    len: chunk,
                    src: Source::Lower,
                }),
                // Zero, undefined, unmapped (checked at open: no other state is left).
                _ => push(Run {
                    virt: pos,
                    len: chunk,
                    src: Source::Zero,
                }),
            }
            pos += chunk;
        }
        Ok(out)
    }

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

    /// Allocation map of `[offset, end)` (inside the disk), appended to `out`: this
    /// file's runs, with the parent asked once for the span of the runs that fall to it.
    fn slice_extents(&self, out: &mut Vec<Extent>, offset: u64, end: u64) -> io::Result<()> {
        let runs = self.runs(offset, end - offset)?;
        let hole = |offset, length| Extent {
            offset,
            length,
            allocated: false,
        };
        let first = runs.iter().find(|r| r.src == Source::Lower);
        let last = runs.iter().rfind(|r| r.src == Source::Lower);
        let span = first.zip(last).map(|(f, l)| (f.virt, l.virt + l.len));
        let lower = match (span, &self.parent) {
            (Some((a, b)), Some(parent)) => {
                let within = parent.size().saturating_sub(a).min(b - a);
                if within > 0 {
                    parent.extents(a, within)?
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        };
        let mut li = 0;
        for r in &runs {
            let r_end = r.virt + r.len;
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
                    let stop = parent.size().clamp(r.virt, r_end);
                    let mut pos = r.virt;
                    while li < lower.len()
                        && lower[li].offset.saturating_add(lower[li].length) <= pos
                    {
                        li += 1;
                    }
                    for l in lower[li..].iter().take_while(|l| l.offset < stop) {
                        let a = l.offset.max(pos);
                        let b = l.offset.saturating_add(l.length).min(stop);
                        if a > pos {
                            // A gap in the parent's answer: data is the answer that is
                            // always safe.
                            super::push_extent(
                                out,
                                Extent {
                                    offset: pos,
                                    length: a - pos,
                                    allocated: true,
                                },
                            );
                        }
                        if b > a {
                            super::push_extent(
                                out,
                                Extent {
                                    offset: a,
                                    length: b - a,
                                    allocated: l.allocated,
                                },
                            );
                            pos = b;
                        }
                    }
                    if pos < stop {
                        super::push_extent(
                            out,
                            Extent {
                                offset: pos,
                                length: stop - pos,
                                allocated: true,
                            },
                        );
                    }
                    // Past the parent's end: zeros.
                    super::push_extent(out, hole(stop, r_end - stop));
                }
            }
        }
        Ok(())
    }
}

impl BlockSource for Vhdx {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::check_read(self.size, offset, buf.len() as u64)?;
        for r in self.runs(offset, buf.len() as u64)? {
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
mod tests {
    use super::*;

    #[test]
    fn bits_are_least_significant_first() {
        let bm = [0b0000_0001u8, 0b1000_0000];

        assert_eq!(
            (0..16).filter(|&i| bit(&bm, i)).collect::<Vec<_>>(),
            [0, 15]
        );
        assert_eq!(
            bit_runs(&[0xFF, 0x0F, 0x00], 4, 24),
            [(4, 12, true), (12, 24, false)]
        );
    }

    #[test]
    fn candidates_try_relative_then_absolute_then_names_beside() {
        let pairs = vec![
            ("parent_linkage".to_string(), "{AB}".to_string()),
            ("relative_path".to_string(), "..\\base\\p.vhdx".to_string()),
            (
                "absolute_win32_path".to_string(),
                "\\\\?\\C:\\vms\\q.vhdx".to_string(),
            ),
            (
                "volume_path".to_string(),
                "\\\\?\\Volume{1}\\r.vhdx".to_string(),
            ),
        ];

        let got = parent_candidates(Path::new("/x/y/child.vhdx"), &pairs);

        assert_eq!(
            got,
            [
                PathBuf::from("/x/y/../base/p.vhdx"),
                PathBuf::from("/x/y/p.vhdx"),
                PathBuf::from("/x/y/q.vhdx"),
                PathBuf::from("/x/y/r.vhdx"),
            ]
        );
        assert_eq!(linkages(&pairs), ["ab"]);
    }
}
