//! `ReadFileMapped`: say where a regular file's bytes lie on the image disk, so the host
//! reads them itself instead of through the emulated CPU twice.
//!
//! FIEMAP (FIBMAP for vfat, which has no FIEMAP) gives extents as offsets of the filesystem's block device; they are translated
//! to offsets of the whole virtio disk through the partition's start (sysfs) and
//! device-mapper tables whose targets are all `linear` (LVM linear volumes). Anything
//! else falls back to streaming the file, per file: a filesystem not on the list below
//! (btrfs's "physical" is a logical address of its own; iso9660 has no FIEMAP), an extent
//! whose flags make the address meaningless or the bytes transformed (inline, tail,
//! encoded, encrypted, not aligned, unknown, delayed allocation), a striped, thin, crypt
//! or RAID mapping, a disk without a serial, more than [`MAX_MAP_EXTENTS`] extents, or
//! a file smaller than [`MAP_MIN`].

use crate::error::OpError;
use crate::readfile::{open_regular, read_file};
use imgsafe_proto::{write_msg, FileMap, MapExtent, Response, MAP_EDGE, MAP_MIN, MAX_MAP_EXTENTS};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// statfs f_type values of the filesystems whose FIEMAP "physical" is a byte offset of
/// the block device they are mounted from (linux/magic.h).
const MAPPABLE_FS: [i64; 3] = [
    0xEF53,      // EXT2/3/4_SUPER_MAGIC
    0x5846_5342, // XFS_SUPER_MAGIC ("XFSB")
    0x4d44,      // MSDOS_SUPER_MAGIC (vfat)
];

/// FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap) (linux/fs.h).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// FIEMAP_EXTENT_LAST: the file's last extent (linux/fiemap.h).
const EXTENT_LAST: u32 = 0x1;
/// FIEMAP_EXTENT_UNWRITTEN: allocated, reads as zeros.
const EXTENT_UNWRITTEN: u32 = 0x800;
/// FIEMAP_EXTENT_MERGED: the filesystem merged several of its extents into this one.
const EXTENT_MERGED: u32 = 0x1000;
/// FIEMAP_EXTENT_SHARED: also used by another file (reflink); the address is still real.
const EXTENT_SHARED: u32 = 0x2000;
/// Flags that leave an extent's physical address a plain device offset of its bytes;
/// any other bit (UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE,
/// DATA_TAIL, or one this code does not know) means the file is streamed.
const GOOD_FLAGS: u32 = EXTENT_LAST | EXTENT_UNWRITTEN | EXTENT_MERGED | EXTENT_SHARED;
/// Extents asked for per FIEMAP call.
const FIEMAP_BATCH: usize = 256;
/// Size of struct fiemap without its extents.
const FIEMAP_HEAD: usize = 32;
/// Size of struct fiemap_extent.
const FIEMAP_EXTENT: usize = 56;

/// DM_TABLE_STATUS = _IOWR(0xfd, 12, struct dm_ioctl) (linux/dm-ioctl.h).
const DM_TABLE_STATUS: libc::c_ulong = 0xC138_FD0C;
/// sizeof(struct dm_ioctl).
const DM_IOCTL_SIZE: usize = 312;
/// DM_STATUS_TABLE_FLAG: return the table, not the status.
const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
/// DM_BUFFER_FULL_FLAG: the answer did not fit.
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
/// sizeof(struct dm_target_spec).
const DM_TARGET_SPEC: usize = 40;
/// Most device layers (partition, LV, ...) followed from a filesystem to its disk.
const MAX_LAYERS: usize = 8;
/// Most device-mapper targets of one table that are followed.
const MAX_TARGETS: usize = 1024;

/// Answer `ReadFileMapped` on `w`: a `FileMap` when the file can be mapped, otherwise
/// exactly what `ReadFile` answers. Only an error writing to the channel is returned.
pub fn read_file_mapped<W: Write>(
    root: &Path,
    sys: &Path,
    dev: &Path,
    path: &[u8],
    w: &mut W,
) -> io::Result<()> {
    match map_file(root, sys, dev, path) {
        Ok(Some(map)) => write_msg(w, &Response::FileMap(map)),
        // Errors (not found, not a file) are reported by the stream path in its words.
        Ok(None) | Err(_) => read_file(root, path, w),
    }
}

/// The file's map, or None when it must be streamed.
fn map_file(root: &Path, sys: &Path, dev: &Path, path: &[u8]) -> Result<Option<FileMap>, OpError> {
    let (file, size) = open_regular(root, path)?;
    if size < MAP_MIN || !mappable_fs(&file) {
        return Ok(None);
    }
    let rdev = file.metadata().map_err(|e| OpError::io(path, &e))?.dev();
    let Some(layer) = Layer::resolve(sys, dev, libc::major(rdev), libc::minor(rdev), 0) else {
        return Ok(None);
    };
    let Some(raw) = fiemap(&file).or_else(|| fibmap(&file, size)) else {
        return Ok(None);
    };
    let mut extents = Vec::new();
    for (logical, physical, length, flags) in raw {
        if flags & !GOOD_FLAGS != 0 {
            return Ok(None);
        }
        let Some(pieces) = layer.to_disk(physical, length) else {
            return Ok(None);
        };
        let mut at = logical;
        for (disk_off, len) in pieces {
            extents.push(MapExtent {
                logical: at,
                physical: disk_off,
                length: len,
                unwritten: flags & EXTENT_UNWRITTEN != 0,
            });
            at += len;
        }
        if extents.len() > MAX_MAP_EXTENTS {
            return Ok(None);
        }
    }
    let Some(edge_sha256) = edge_hash(&file, size) else {
        return Ok(None);
    };
    Ok(Some(FileMap {
        size,
        disk: layer.serial().to_string(),
        extents,
        edge_sha256,
    }))
}

/// Whether the file's filesystem is one whose FIEMAP addresses are device offsets.
fn mappable_fs(file: &File) -> bool {
    // SAFETY: statfs is plain data filled by the kernel for a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    MAPPABLE_FS.contains(&(st.f_type as i64))
}

/// Every extent of the file as (logical, physical, length, flags), or None when FIEMAP
/// fails or the file has more than [`MAX_MAP_EXTENTS`] extents.
fn fiemap(file: &File) -> Option<Vec<(u64, u64, u64, u32)>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    // u64 words keep the buffer aligned for the kernel's struct.
    let mut buf = vec![0u64; (FIEMAP_HEAD + FIEMAP_BATCH * FIEMAP_EXTENT) / 8];
    loop {
        buf.iter_mut().for_each(|w| *w = 0);
        buf[0] = start;
        buf[1] = u64::MAX - start;
        // fm_flags = 0, fm_mapped_extents = 0 (word 2); fm_extent_count (word 3, low half).
        buf[3] = FIEMAP_BATCH as u64;
        // SAFETY: the buffer holds a struct fiemap with room for FIEMAP_BATCH extents,
        // as fm_extent_count says; the kernel writes at most that much.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) } != 0 {
            return None;
        }
        let mapped = (buf[2] >> 32) as usize;
        if mapped == 0 {
            return Some(out);
        }
        if mapped > FIEMAP_BATCH {
            return None;
        }
        let mut last = false;
        for i in 0..mapped {
            let w = (FIEMAP_HEAD + i * FIEMAP_EXTENT) / 8;
            let (logical, physical, length) = (buf[w], buf[w + 1], buf[w + 2]);
            let flags = buf[w + 5] as u32;
            out.push((logical, physical, length, flags));
            last = flags & EXTENT_LAST != 0;
            start = logical.checked_add(length)?;
        }
        if last {
            return Some(out);
        }
        if out.len() > MAX_MAP_EXTENTS {
            return None;
        }
    }
}

/// FIBMAP = _IO(0x00, 1): the device block of one file block (linux/fs.h).
const FIBMAP: libc::c_ulong = 1;
/// FIGETBSZ = _IO(0x00, 2): the filesystem's block size.
const FIGETBSZ: libc::c_ulong = 2;
/// Most blocks asked for one by one with FIBMAP (vfat has no FIEMAP; its blocks are
/// sectors, so this bounds the files mapped that way to 64 MiB of 512-byte sectors).
const MAX_FIBMAP_BLOCKS: u64 = 128 * 1024;

/// The file's extents from FIBMAP, block by block, for filesystems without FIEMAP
/// (vfat): contiguous blocks merged, None past [`MAX_FIBMAP_BLOCKS`] or on any hole.
fn fibmap(file: &File, size: u64) -> Option<Vec<(u64, u64, u64, u32)>> {
    let mut bsz: libc::c_int = 0;
    // SAFETY: FIGETBSZ writes one int.
    if unsafe { libc::ioctl(file.as_raw_fd(), FIGETBSZ, &mut bsz) } != 0 || bsz < 512 {
        return None;
    }
    let bsz = bsz as u64;
    let blocks = size.div_ceil(bsz);
    if blocks > MAX_FIBMAP_BLOCKS {
        return None;
    }
    let mut out: Vec<(u64, u64, u64, u32)> = Vec::new();
    for b in 0..blocks {
        let mut v = libc::c_int::try_from(b).ok()?;
        // SAFETY: FIBMAP reads and writes one int.
        if unsafe { libc::ioctl(file.as_raw_fd(), FIBMAP, &mut v) } != 0 || v <= 0 {
            return None;
        }
        let phys = (v as u64).checked_mul(bsz)?;
        match out.last_mut() {
            Some(last) if last.1 + last.2 == phys && last.0 + last.2 == b * bsz => last.2 += bsz,
            _ => out.push((b * bsz, phys, bsz, 0)),
        }
        if out.len() > MAX_MAP_EXTENTS {
            return None;
        }
    }
    Some(out)
}

/// SHA-256 of the first and last `min(MAP_EDGE, size)` bytes, read through the filesystem.
fn edge_hash(file: &File, size: u64) -> Option<Vec<u8>> {
    let n = size.min(MAP_EDGE) as usize;
    let mut buf = vec![0u8; n];
    let mut h = Sha256::new();
    for off in [0, size - n as u64] {
        file.read_exact_at(&mut buf, off).ok()?;
        h.update(&buf);
    }
    Some(h.finalize().to_vec())
}

/// One block device between a filesystem and the disk, as sysfs and device-mapper say.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layer {
    /// A whole virtio disk: its serial and size in bytes.
    Disk { serial: String, size: u64 },
    /// A partition `size` bytes long starting `start` bytes into `parent`.
    Part {
        start: u64,
        size: u64,
        parent: Box<Layer>,
    },
    /// A device-mapper device made only of linear targets.
    Linear(Vec<Target>),
}

/// One linear target: device bytes `[start, start + len)` are `parent` bytes from `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    start: u64,
    len: u64,
    parent: Layer,
    offset: u64,
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trimmed(p)?.parse().ok()
}

/// `MAJ:MIN` as sysfs and dm tables write it.
fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl Layer {
    /// The device `major:minor` down to its disk, or None if a layer is not one this
    /// module can translate.
    fn resolve(sys: &Path, dev: &Path, major: u32, minor: u32, depth: usize) -> Option<Layer> {
        if depth >= MAX_LAYERS {
            return None;
        }
        let dir = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))).ok()?;
        let sectors = read_u64(&dir.join("size"))?;
        let size = sectors.checked_mul(512)?;
        if dir.join("partition").exists() {
            let start = read_u64(&dir.join("start"))?.checked_mul(512)?;
            let (pm, pn) = parse_dev(&read_trimmed(&dir.parent()?.join("dev"))?)?;
            let parent = Layer::resolve(sys, dev, pm, pn, depth + 1)?;
            return Some(Layer::Part {
                start,
                size,
                parent: Box::new(parent),
            });
        }
        if let Some(name) = read_trimmed(&dir.join("dm/name")) {
            let table = dm_table(&dev.join("mapper/control"), &name)?;
            let mut targets = Vec::new();
            for (start, len, kind, params) in table {
                let (d, offset) = parse_linear(&kind, &params)?;
                let parent = Layer::resolve(sys, dev, d.0, d.1, depth + 1)?;
                targets.push(Target {
                    start: start.checked_mul(512)?,
                    len: len.checked_mul(512)?,
                    parent,
                    offset: offset.checked_mul(512)?,
                });
            }
            return Some(Layer::Linear(targets));
        }
        let serial = read_trimmed(&dir.join("serial")).filter(|s| !s.is_empty())?;
        Some(Layer::Disk { serial, size })
    }

    /// The disk at the bottom (each target of a linear table must reach the same one).
    fn serial(&self) -> &str {
        match self {
            Layer::Disk { serial, .. } => serial,
            Layer::Part { parent, .. } => parent.serial(),
            Layer::Linear(t) => t.first().map_or("", |t| t.parent.serial()),
        }
    }

    /// Device bytes `[off, off + len)` as (disk offset, length) pieces, in order.
    fn to_disk(&self, off: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        let end = off.checked_add(len)?;
        match self {
            Layer::Disk { size, .. } => (end <= *size).then(|| vec![(off, len)]),
            Layer::Part {
                start,
                size,
                parent,
            } => {
                if end > *size {
                    return None;
                }
                parent.to_disk(start.checked_add(off)?, len)
            }
            Layer::Linear(targets) => {
                let serial = self.serial();
                let mut out = Vec::new();
                let mut at = off;
                while at < end {
                    let t = targets
                        .iter()
                        .find(|t| t.start <= at && at < t.start + t.len)?;
                    if t.parent.serial() != serial {
                        return None;
                    }
                    let n = (t.start + t.len).min(end) - at;
                    let inner = t.offset.checked_add(at - t.start)?;
                    out.extend(t.parent.to_disk(inner, n)?);
                    at += n;
                }
                Some(out)
            }
        }
    }
}

/// A `linear` target's parameters, `MAJ:MIN OFFSET_SECTORS`; None for any other target.
fn parse_linear(kind: &str, params: &str) -> Option<((u32, u32), u64)> {
    if kind != "linear" {
        return None;
    }
    let mut it = params.split_whitespace();
    let dev = parse_dev(it.next()?)?;
    let offset = it.next()?.parse().ok()?;
    it.next().is_none().then_some((dev, offset))
}

/// The table of device-mapper device `name` as (start, length, type, params), sectors.
fn dm_table(control: &Path, name: &str) -> Option<Vec<(u64, u64, String, String)>> {
    if name.is_empty() || name.len() >= 128 {
        return None;
    }
    let ctl = File::options().read(true).write(true).open(control).ok()?;
    let mut words = vec![0u64; 16 * 1024 / 8];
    let size = words.len() * 8;
    {
        // SAFETY: a plain byte view of the u64 buffer, which stays borrowed mutably.
        let b = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), size) };
        put_u32(b, 0, 4);
        put_u32(b, 12, size as u32);
        put_u32(b, 16, DM_IOCTL_SIZE as u32);
        put_u32(b, 28, DM_STATUS_TABLE_FLAG);
        b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    }
    // SAFETY: the buffer is a struct dm_ioctl with `size` bytes in all, as data_size says.
    if unsafe { libc::ioctl(ctl.as_raw_fd(), DM_TABLE_STATUS, words.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: as above, read-only now.
    let b = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), size) };
    parse_dm_answer(b)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn get_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The targets of a DM_TABLE_STATUS answer, every offset checked against the buffer.
fn parse_dm_answer(b: &[u8]) -> Option<Vec<(u64, u64, String, String)>> {
    if get_u32(b, 28)? & DM_BUFFER_FULL_FLAG != 0 {
        return None;
    }
    let data_start = get_u32(b, 16)? as usize;
    let count = get_u32(b, 20)? as usize;
    if count == 0 || count > MAX_TARGETS {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let mut pos = data_start;
    for _ in 0..count {
        let start = get_u64(b, pos)?;
        let len = get_u64(b, pos + 8)?;
        let next = get_u32(b, pos + 20)? as usize;
        let kind = c_string(b.get(pos + 24..pos + DM_TARGET_SPEC)?)?;
        let params = c_string(b.get(pos + DM_TARGET_SPEC..)?)?;
        out.push((start, len, kind, params));
        let to = data_start.checked_add(next)?;
        if to <= pos {
            break;
        }
        pos = to;
    }
    (out.len() == count).then_some(out)
}

/// The NUL-terminated string at the start of `b`.
fn c_string(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    String::from_utf8(b[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> Layer {
        Layer::Disk {
            serial: "imgsafe0".into(),
            size,
        }
    }

    #[test]
    fn a_partition_adds_its_start() {
        let l = Layer::Part {
            start: 1 << 20,
            size: 8 << 20,
            parent: Box::new(disk(16 << 20)),
        };

        assert_eq!(l.to_disk(4096, 8192), Some(vec![((1 << 20) + 4096, 8192)]));
    }

    #[test]
    fn a_range_past_the_partition_is_not_mapped() {
        let l = Layer::Part {
            start: 1 << 20,
            size: 8 << 20,
            parent: Box::new(disk(16 << 20)),
        };

        assert_eq!(l.to_disk((8 << 20) - 4096, 8192), None);
    }

    #[test]
    fn a_linear_table_splits_a_range_across_its_segments() {
        let part = Layer::Part {
            start: 1 << 20,
            size: 32 << 20,
            parent: Box::new(disk(64 << 20)),
        };
        let l = Layer::Linear(vec![
            Target {
                start: 0,
                len: 4096,
                parent: part.clone(),
                offset: 1 << 20,
            },
            Target {
                start: 4096,
                len: 4096,
                parent: part,
                offset: 0,
            },
        ]);

        let got = l.to_disk(2048, 4096);

        assert_eq!(got, Some(vec![((2 << 20) + 2048, 2048), (1 << 20, 2048)]));
    }

    #[test]
    fn only_linear_targets_are_followed() {
        assert_eq!(parse_linear("linear", "254:2 2048"), Some(((254, 2), 2048)));
        assert_eq!(parse_linear("striped", "2 128 254:2 0 254:3 0"), None);
        assert_eq!(parse_linear("crypt", "aes 0 254:2 0"), None);
    }

    #[test]
    fn dm_answer_with_a_full_buffer_is_refused() {
        let mut b = vec![0u8; 512];
        put_u32(&mut b, 28, DM_BUFFER_FULL_FLAG);

        assert_eq!(parse_dm_answer(&b), None);
    }

    #[test]
    fn dm_answer_is_parsed_within_its_buffer() {
        let mut b = vec![0u8; DM_IOCTL_SIZE + 128];
        put_u32(&mut b, 16, DM_IOCTL_SIZE as u32);
        put_u32(&mut b, 20, 1);
        let t = DM_IOCTL_SIZE;
        b[t + 8..t + 16].copy_from_slice(&2048u64.to_le_bytes());
        put_u32(&mut b, t + 20, 64);
        b[t + 24..t + 30].copy_from_slice(b"linear");
        b[t + 40..t + 49].copy_from_slice(b"254:2 384");

        let got = parse_dm_answer(&b);

        assert_eq!(
            got,
            Some(vec![(0, 2048, "linear".into(), "254:2 384".into())])
        );
    }

    #[test]
    fn only_plain_extent_flags_are_good() {
        let inline = 0x200 | EXTENT_LAST;
        let unwritten = EXTENT_UNWRITTEN | EXTENT_LAST;

        assert_ne!(inline & !GOOD_FLAGS, 0);
        assert_eq!(unwritten & !GOOD_FLAGS, 0);
    }
}
