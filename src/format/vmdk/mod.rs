//! VMware VMDK: a descriptor ([`descriptor`], embedded in a sparse extent or a separate
//! text file) listing extents that together make the disk: hosted sparse (`KDMV`,
//! [`sparse`]; stream-optimized ones with deflate-compressed grains), flat (raw bytes
//! from an offset; ESXi's `VMFS` extents are the same) and zero extents.
//!
//! createTypes read: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat, streamOptimized, vmfs and vmfsThin. Refused: ESXi `vmfsSparse`
//! (COWD) and `seSparse` deltas, raw device mappings, and device-backed types.
//!
//! Extent files are looked up relative to the descriptor's folder and never outside it
//! through `..`; an absolute extent path is used as written. The extents must add up to
//! the disk, and a sparse extent must hold at least the sectors its line gives.
//!
//! A delta (snapshot or linked clone) names its parent with `parentFileNameHint` and
//! records the parent's `CID` as `parentCID`; the parent's descriptor must carry that
//! `CID` (unless `--ignore-parent-id`). Grains a delta does not hold read from the parent.

pub mod descriptor;
pub mod ova;
pub mod sparse;

use super::{BlockSource, Extent, FormatError, LayerInfo, OpenOptions};
use descriptor::{Descriptor, ExtentKind, Problem, NO_PARENT_CID};
use sparse::{Grain, Sparse, SECTOR};
use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

pub use super::MAX_CHAIN_DEPTH;

/// True for a sparse extent header or a text descriptor.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(sparse::MAGIC) || descriptor::probe(head)
}

/// Open a VMDK (and its parents).
pub fn open(
    path: &Path,
    file: File,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockSource>, FormatError> {
    let mut chain = super::ChainFiles::default();
    Ok(Box::new(open_layer(path, file, opts, &mut chain)?))
}

/// Open the disk inside an OVA (a tar of an OVF and VMDKs) in place.
pub fn open_ova(
    path: &Path,
    file: File,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockSource>, FormatError> {
    Ok(Box::new(ova::open(path, file, opts)?))
}

/// One piece of the disk.
enum Piece {
    /// Raw bytes of `file` from byte `base`.
    Flat {
        file: File,
        path: PathBuf,
        base: u64,
    },
    /// Zeros.
    Zero,
    /// A hosted sparse extent.
    Sparse(Box<Sparse>),
}

/// A piece and where it sits in the virtual disk.
struct Part {
    start: u64,
    len: u64,
    piece: Piece,
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Where an extent file named in a descriptor in `dir` is.
fn extent_path(desc: &Path, dir: &Path, name: &str) -> Result<PathBuf, FormatError> {
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(FormatError::corrupt(
            desc,
            format!("extent \"{name}\" lies outside the descriptor's folder"),
        ));
    }
    Ok(dir.join(p))
}

/// Open a file a descriptor names (an extent or the parent): a regular file only, so a
/// hostile descriptor cannot make imgsafe read a device, whatever the user may open.
fn open_named(p: &Path) -> Result<File, FormatError> {
    let f = super::open_image_file(p)?;
    let meta = f.metadata().map_err(|e| FormatError::io(p, e))?;
    if !meta.is_file() {
        return Err(FormatError::corrupt(
            p,
            "named by a VMDK descriptor but not a regular file",
        ));
    }
    Ok(f)
}

fn problem(path: &Path, p: Problem) -> FormatError {
    match p {
        Problem::Corrupt(what) => FormatError::corrupt(path, what),
        Problem::Unsupported(what) => FormatError::Unsupported {
            path: path.to_path_buf(),
            what,
        },
    }
}

/// Read the descriptor of a file: embedded in its sparse header, or the whole file.
/// `None` for a sparse extent without one (it is then the whole disk by itself).
fn read_descriptor(
    path: &Path,
    file: &File,
    head: &[u8],
) -> Result<(Option<Descriptor>, Option<sparse::Header>), FormatError> {
    let len = super::file_len(path, file)?;
    if head.starts_with(sparse::MAGIC) {
        let h = sparse::Header::parse(head).map_err(|e| FormatError::corrupt(path, e))?;
        if h.desc_offset == 0 || h.desc_sectors == 0 {
            return Ok((None, Some(h)));
        }
        let at = h.desc_offset.checked_mul(SECTOR);
        let n = h.desc_sectors.checked_mul(SECTOR);
        let (Some(at), Some(n)) = (at, n) else {
            return Err(FormatError::corrupt(
                path,
                "embedded descriptor offset overflows",
            ));
        };
        if n > descriptor::MAX_DESCRIPTOR_LEN || at.checked_add(n).is_none_or(|e| e > len) {
            return Err(FormatError::corrupt(
                path,
                format!("embedded descriptor (sector {}, {} sectors) lies outside the file or is too large", h.desc_offset, h.desc_sectors),
            ));
        }
        let mut raw = vec![0u8; n as usize];
        super::read_exact_at(file, &mut raw, at).map_err(|e| FormatError::io(path, e))?;
        let d = descriptor::parse(&raw).map_err(|p| problem(path, p))?;
        return Ok((Some(d), Some(h)));
    }
    if len > descriptor::MAX_DESCRIPTOR_LEN {
        return Err(FormatError::corrupt(
            path,
            format!("descriptor file of {len} bytes is too large"),
        ));
    }
    let mut raw = vec![0u8; len as usize];
    super::read_exact_at(file, &mut raw, 0).map_err(|e| FormatError::io(path, e))?;
    let d = descriptor::parse(&raw).map_err(|p| problem(path, p))?;
    Ok((Some(d), None))
}

fn open_layer(
    path: &Path,
    file: File,
    opts: &OpenOptions,
    chain: &mut super::ChainFiles,
) -> Result<Vmdk, FormatError> {
    chain.enter(path, &file, "delta")?;
    let is_parent = chain.is_parent();
    let head = super::read_head(path, &file)?;
    let (desc, own_header) = read_descriptor(path, &file, &head)?;
    let dir = folder_of(path);
    let mut parts: Vec<Part> = Vec::new();
    let mut pos: u64 = 0;
    let (create_type, cid, parent_cid, hint) = match &desc {
        Some(d) => (
            d.create_type.clone(),
            d.cid,
            d.parent_cid,
            d.parent_hint.clone(),
        ),
        None => ("monolithicSparse".into(), 0, NO_PARENT_CID, None),
    };
    let lines = match &desc {
        Some(d) => d.extents.clone(),
        None => {
            let h = own_header
                .clone()
                .ok_or_else(|| FormatError::corrupt(path, "no descriptor"))?;
            vec![descriptor::ExtentLine {
                sectors: h.capacity,
                kind: ExtentKind::Sparse {
                    file: String::new(),
                },
            }]
        }
    };
    let sparse_count = lines
        .iter()
        .filter(|l| matches!(l.kind, ExtentKind::Sparse { .. }))
        .count();
    // A sparse file with its own descriptor is its one extent, whatever the descriptor
    // calls it (the file may have been renamed).
    let mut own = match own_header.clone() {
        Some(h) if lines.len() == 1 => Some((file, h)),
        _ => None,
    };
    for line in &lines {
        let bytes = line
            .sectors
            .checked_mul(SECTOR)
            .filter(|b| {
                pos.checked_add(*b)
                    .is_some_and(|e| e <= sparse::MAX_CAPACITY * SECTOR)
            })
            .ok_or_else(|| FormatError::corrupt(path, "extents add up to more than 64 TiB"))?;
        let piece = open_piece(path, &dir, line, bytes, own.take(), sparse_count)?;
        parts.push(Part {
            start: pos,
            len: bytes,
            piece,
        });
        pos += bytes;
    }
    let parent = match parent_cid {
        NO_PARENT_CID => None,
        _ => Some(open_parent(path, &dir, hint, parent_cid, opts, chain)?),
    };
    let role = super::chain_role(is_parent, parent.is_some());
    let version = own_header
        .as_ref()
        .map(|h| format!("{create_type} v{}", h.version))
        .unwrap_or(create_type);
    Ok(Vmdk {
        path: path.to_path_buf(),
        size: pos,
        cid,
        parts,
        parent,
        role: role.into(),
        version,
    })
}

/// Open the extent that `line` describes, `bytes` long. `own` is the file being opened
/// with its sparse header, when it is itself the disk's one sparse extent.
fn open_piece(
    path: &Path,
    dir: &Path,
    line: &descriptor::ExtentLine,
    bytes: u64,
    own: Option<(File, sparse::Header)>,
    sparse_count: usize,
) -> Result<Piece, FormatError> {
    Ok(match &line.kind {
        ExtentKind::Zero => Piece::Zero,
        ExtentKind::Flat { file: name, offset } => {
            let p = extent_path(path, dir, name)?;
            let f = open_named(&p)?;
            let base = offset
                .checked_mul(SECTOR)
                .ok_or_else(|| FormatError::corrupt(&p, "flat extent offset overflows"))?;
            let len = super::file_len(&p, &f)?;
            if base.checked_add(bytes).is_none_or(|e| e > len) {
                return Err(FormatError::corrupt(
                    &p,
                    format!(
                        "flat extent of {} sectors from sector {offset} is longer than the file ({len} bytes)",
                        line.sectors
                    ),
                ));
            }
            Piece::Flat {
                file: f,
                path: p,
                base,
            }
        }
        ExtentKind::Sparse { file: name } => {
            let (p, f, h) = match own {
                Some((f, h)) => (path.to_path_buf(), f, h),
                None => {
                    let p = extent_path(path, dir, name)?;
                    let f = open_named(&p)?;
                    let head = super::read_head(&p, &f)?;
                    let h =
                        sparse::Header::parse(&head).map_err(|e| FormatError::corrupt(&p, e))?;
                    (p, f, h)
                }
            };
            if h.capacity < line.sectors {
                return Err(FormatError::corrupt(
                    &p,
                    format!(
                        "sparse extent holds {} sectors but the descriptor gives it {}",
                        h.capacity, line.sectors
                    ),
                ));
            }
            Piece::Sparse(Box::new(
                Sparse::open(&p, f, h, sparse_count).map_err(|e| FormatError::corrupt(&p, e))?,
            ))
        }
    })
}

/// Open the parent of delta `path`, named by `hint`, and check it is the disk the delta
/// was taken from (its CID is `parent_cid`).
fn open_parent(
    path: &Path,
    dir: &Path,
    hint: Option<String>,
    parent_cid: u32,
    opts: &OpenOptions,
    chain: &mut super::ChainFiles,
) -> Result<Box<dyn BlockSource>, FormatError> {
    let hint = hint.ok_or_else(|| {
        FormatError::corrupt(path, "delta (parentCID set) has no parentFileNameHint")
    })?;
    let unix = hint.replace('\\', "/");
    let pp = if Path::new(&unix).is_absolute() {
        PathBuf::from(&unix)
    } else {
        dir.join(&unix)
    };
    let pf = open_named(&pp)?;
    let parent = open_layer(&pp, pf, opts, chain)?;
    if parent.cid != parent_cid && !opts.ignore_parent_id {
        return Err(FormatError::corrupt(
            path,
            format!(
                "parent {} has CID {:08x} but this delta expects {parent_cid:08x} (the parent was modified after the snapshot; --ignore-parent-id opens it anyway)",
                pp.display(),
                parent.cid
            ),
        ));
    }
    Ok(Box::new(parent))
}

/// A VMDK disk: its pieces in order, and its parent for a delta.
pub struct Vmdk {
    path: PathBuf,
    size: u64,
    cid: u32,
    parts: Vec<Part>,
    parent: Option<Box<dyn BlockSource>>,
    role: String,
    version: String,
}

/// Where one run of the disk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// Part `i` holds data here.
    Data,
    /// Zeros.
    Zero,
    /// The parent, or zeros.
    Lower,
}

impl Vmdk {
    /// The parts overlapping `[offset, end)`, as (index, from, to) in disk bytes.
    fn parts_in(&self, offset: u64, end: u64) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let first = self.parts.partition_point(|p| p.start + p.len <= offset);
        self.parts[first..]
            .iter()
            .enumerate()
            .take_while(move |(_, p)| p.start < end)
            .map(move |(i, p)| (first + i, offset.max(p.start), end.min(p.start + p.len)))
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

    /// Runs of one sparse part over disk bytes `[a, b)`: (from, to, source).
    fn sparse_runs(
        &self,
        s: &Sparse,
        start: u64,
        a: u64,
        b: u64,
    ) -> io::Result<Vec<(u64, u64, Src, Grain)>> {
        let gb = s.grain_bytes();
        let mut out: Vec<(u64, u64, Src, Grain)> = Vec::new();
        let mut pos = a;
        while pos < b {
            let rel = pos - start;
            let g = rel / gb;
            let stop = b.min(start + (g + 1) * gb);
            let grain = s.grain(g)?;
            let src = match grain {
                Grain::Lower => Src::Lower,
                Grain::Zero => Src::Zero,
                Grain::Plain(_) | Grain::Compressed(_) => Src::Data,
            };
            out.push((pos, stop, src, grain));
            pos = stop;
        }
        Ok(out)
    }
}

impl BlockSource for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = super::check_read(self.size, offset, buf.len() as u64)?;
        for (i, a, b) in self.parts_in(offset, end) {
            let part = &self.parts[i];
            let out = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match &part.piece {
                Piece::Zero => out.fill(0),
                Piece::Flat { file, path, base } => {
                    super::read_exact_at(file, out, base + (a - part.start))
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
                }
                Piece::Sparse(s) => {
                    let gb = s.grain_bytes();
                    // Grains that follow each other in the file are read with one call:
                    // (start in `out`, file offset, length) of the run being gathered.
                    let mut pending: Option<(usize, u64, usize)> = None;
                    for (x, y, _, grain) in self.sparse_runs(s, part.start, a, b)? {
                        let (from, to) = ((x - a) as usize, (y - a) as usize);
                        let in_grain = (x - part.start) % gb;
                        if let Grain::Plain(at) = grain {
                            let at = at + in_grain;
                            match &mut pending {
                                Some((p, f, n)) if *f + *n as u64 == at && *p + *n == from => {
                                    *n += to - from
                                }
                                _ => {
                                    if let Some((p, f, n)) = pending.take() {
                                        s.read_file(&mut out[p..p + n], f)?;
                                    }
                                    pending = Some((from, at, to - from));
                                }
                            }
                            continue;
                        }
                        let dst = &mut out[from..to];
                        match grain {
                            Grain::Lower => self.read_lower(dst, x)?,
                            Grain::Zero => dst.fill(0),
                            // Gathered into `pending` above.
                            Grain::Plain(_) => {}
                            Grain::Compressed(at) => {
                                let data = s.inflate((x - part.start) / gb, at)?;
                                let from = in_grain as usize;
                                dst.copy_from_slice(&data[from..from + dst.len()]);
                            }
                        }
                    }
                    if let Some((p, f, n)) = pending {
                        s.read_file(&mut out[p..p + n], f)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut own: Vec<(u64, u64, Src)> = Vec::new();
        let mut push = |a: u64, b: u64, s: Src| match own.last_mut() {
            Some(last) if last.1 == a && last.2 == s => last.1 = b,
            _ => own.push((a, b, s)),
        };
        for (i, a, b) in self.parts_in(offset, end) {
            let part = &self.parts[i];
            match &part.piece {
                Piece::Zero => push(a, b, Src::Zero),
                Piece::Flat { .. } => push(a, b, Src::Data),
                Piece::Sparse(s) => {
                    for (x, y, src, _) in self.sparse_runs(s, part.start, a, b)? {
                        push(x, y, src);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (a, b, src) in own {
            let e = |offset, length, allocated| Extent {
                offset,
                length,
                allocated,
            };
            match (src, &self.parent) {
                (Src::Data, _) => super::push_extent(&mut out, e(a, b - a, true)),
                (Src::Zero, _) | (Src::Lower, None) => {
                    super::push_extent(&mut out, e(a, b - a, false))
                }
                (Src::Lower, Some(parent)) => {
                    let stop = parent.size().clamp(a, b);
                    let mut pos = a;
                    if stop > a {
                        for l in parent.extents(a, stop - a)? {
                            let x = l.offset.clamp(pos, stop);
                            let y = l.offset.saturating_add(l.length).clamp(x, stop);
                            if x > pos {
                                super::push_extent(&mut out, e(pos, x - pos, true));
                            }
                            super::push_extent(&mut out, e(x, y - x, l.allocated));
                            pos = pos.max(y);
                        }
                    }
                    if pos < stop {
                        super::push_extent(&mut out, e(pos, stop - pos, true));
                    }
                    super::push_extent(&mut out, e(stop, b - stop, false));
                }
            }
        }
        Ok(out)
    }

    fn layers(&self) -> Vec<LayerInfo> {
        let grain = self.parts.iter().find_map(|p| match &p.piece {
            Piece::Sparse(s) => Some(s.grain_bytes()),
            _ => None,
        });
        let allocated: u64 = self
            .parts
            .iter()
            .map(|p| match &p.piece {
                Piece::Zero => 0,
                Piece::Flat { .. } => p.len,
                Piece::Sparse(s) => (s.count_allocated() * s.grain_bytes()).min(p.len),
            })
            .sum();
        let mut v = vec![LayerInfo {
            path: self.path.clone(),
            format: "vmdk".into(),
            version: Some(self.version.clone()),
            role: self.role.clone(),
            cluster_size: grain,
            allocated_bytes: Some(allocated),
        }];
        if let Some(p) = &self.parent {
            v.extend(p.layers());
        }
        v
    }
}
