//! Microsoft VHD: fixed, dynamic and differencing disks (Virtual Hard Disk Image Format
//! Specification 1.0).
//!
//! Layout: a 512-byte big-endian footer at the end of the file ([`footer`]); dynamic and
//! differencing disks add a copy of it at offset 0, a 1024-byte dynamic header
//! ([`header`]) and a block allocation table whose allocated blocks are a sector bitmap
//! followed by the block's data ([`dynamic`]).
//!
//! # Virtual size and the CHS quirk
//!
//! The footer stores the disk size twice: `current_size` in bytes and a CHS geometry.
//! Virtual PC (and qemu before 2.6, creator `qemu`) computed the geometry from the
//! requested size and then set `current_size` to cylinders × heads × sectors × 512, so
//! such a disk can be slightly *smaller* than what was asked for; some old Virtual PC
//! files even store a `current_size` larger than their geometry, and Virtual PC shows
//! the geometry size. Hyper-V, Disk2vhd, XenServer and qemu with `force_size=on`
//! (creator `qem2`) use `current_size` and leave the geometry as a hint. qemu's `vpc`
//! driver picks by creator: geometry for anything but `win `, `qem2`, `d2v `, `CTXS`
//! and `tap\0`, unless the geometry is the maximum (65535/16/255).
//!
//! imgsafe always uses `current_size` as stored (rounded down to whole 512-byte sectors,
//! as qemu does), like Hyper-V and qemu with `force_size`. For every image qemu writes
//! this is byte for byte what `qemu-img convert -f vpc` produces: without `force_size`
//! qemu sets `current_size` to exactly the geometry size, with it the geometry is
//! ignored. Only a Virtual PC file whose `current_size` exceeds its geometry differs:
//! imgsafe shows the extra tail sectors, qemu hides them.

pub(crate) mod cache;
pub mod dynamic;
pub mod footer;
pub mod header;
mod io;

use super::{BlockSource, FormatError, LayerInfo, OpenOptions};
use dynamic::{load_layout, Dynamic};
use footer::{Footer, FooterProblem, FOOTER_COOKIE, FOOTER_LEN, OLD_FOOTER_LEN};
use header::{locator_path, PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU};
use std::fs::File;
use std::path::{Path, PathBuf};

pub use super::MAX_CHAIN_DEPTH;
/// Most memory the BATs of one chain may take together (each file's BAT is kept whole;
/// one file's is at most 128 MiB, and 32 of those would be too much to hold).
pub const MAX_CHAIN_BAT_BYTES: u64 = 512 << 20;

/// What the files opened so far in a chain have taken.
#[derive(Default)]
struct Chain {
    /// (device, inode) of each file, top first, to refuse parent loops.
    files: super::ChainFiles,
    /// Bytes held by their BATs.
    bat_bytes: u64,
    /// Some file's parent could not be opened: the error is on its way up, and no file
    /// above it tries another parent candidate.
    parent_failed: bool,
}

impl Chain {
    /// Count a BAT of `entries` against [`MAX_CHAIN_BAT_BYTES`]; refuse the file whose
    /// BAT goes past it.
    fn charge_bat(&mut self, path: &Path, entries: usize) -> Result<(), FormatError> {
        // Entries are u32 and at most MAX_BAT_ENTRIES per file, MAX_CHAIN_DEPTH files: no overflow.
        self.bat_bytes += entries as u64 * 4;
        if self.bat_bytes > MAX_CHAIN_BAT_BYTES {
            return Err(FormatError::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "differencing chain whose block tables need more than {} MiB of memory",
                    MAX_CHAIN_BAT_BYTES >> 20
                ),
            });
        }
        Ok(())
    }
}

/// True if the file has a VHD footer cookie (`conectix`) at offset 0 (the copy dynamic
/// disks keep) or in its last 512 (or, for old Virtual PC files, 511) bytes.
///
/// Only the cookie is checked: a file that looks like a VHD but has a bad checksum is
/// reported as a damaged VHD by [`open`], not silently served as raw.
pub fn probe(path: &Path, file: &File, head: &[u8]) -> Result<bool, FormatError> {
    if head.starts_with(FOOTER_COOKIE) {
        return Ok(true);
    }
    let len = super::file_len(path, file)?;
    for tail in [FOOTER_LEN, OLD_FOOTER_LEN] {
        if len >= tail as u64 {
            let mut cookie = [0u8; 8];
            super::read_exact_at(file, &mut cookie, len - tail as u64)
                .map_err(|e| FormatError::io(path, e))?;
            if &cookie == FOOTER_COOKIE {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Open a VHD file (and, for differencing disks, its parent chain).
pub fn open(
    path: &Path,
    file: File,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockSource>, FormatError> {
    let mut chain = Chain::default();
    let found = read_footer(path, &file)?;
    open_layer(path, file, found, opts, &mut chain)
}

/// A footer and where it was found.
struct FooterFound {
    footer: Footer,
    /// Where block data must end: the start of a valid footer at the end of the file, or
    /// the file length when only the copy at offset 0 was usable.
    data_limit: u64,
}

/// Find a valid footer: the one at the end, else (with a warning) the copy at offset 0
/// that dynamic and differencing disks keep.
fn read_footer(path: &Path, file: &File) -> Result<FooterFound, FormatError> {
    let len = super::file_len(path, file)?;
    let read = |off: u64, n: usize| -> Result<[u8; FOOTER_LEN], FormatError> {
        let mut raw = [0u8; FOOTER_LEN];
        super::read_exact_at(file, &mut raw[..n], off).map_err(|e| FormatError::io(path, e))?;
        Ok(raw)
    };
    if len < OLD_FOOTER_LEN as u64 {
        return Err(FormatError::corrupt(
            path,
            format!("file of {len} bytes is too short for a VHD footer"),
        ));
    }
    let mut tail_off = len - FOOTER_LEN.min(len as usize) as u64;
    let mut tail = if len >= FOOTER_LEN as u64 {
        Footer::parse(&read(tail_off, FOOTER_LEN)?)
    } else {
        Err(FooterProblem::NoCookie)
    };
    if tail == Err(FooterProblem::NoCookie) {
        // Old Virtual PC: a 511-byte footer; the missing byte is reserved (zero).
        let old = Footer::parse(&read(len - OLD_FOOTER_LEN as u64, OLD_FOOTER_LEN)?);
        if old != Err(FooterProblem::NoCookie) {
            tail_off = len - OLD_FOOTER_LEN as u64;
            tail = old;
        }
    }
    let tail_problem = match tail {
        Ok(footer) => {
            return Ok(FooterFound {
                footer,
                data_limit: tail_off,
            })
        }
        Err(p) => p,
    };
    let head = if len >= FOOTER_LEN as u64 {
        Footer::parse(&read(0, FOOTER_LEN)?)
    } else {
        Err(FooterProblem::NoCookie)
    };
    match (head, tail_problem) {
        (Ok(footer), tail_problem) if footer.disk_type != footer::TYPE_FIXED => {
            eprintln!(
                "imgsafe: warning: {}: footer at the end of the file is damaged ({tail_problem}); using the copy at offset 0",
                path.display()
            );
            Ok(FooterFound {
                footer,
                data_limit: len,
            })
        }
        (_, p @ FooterProblem::BadChecksum { .. }) => Err(FormatError::corrupt(
            path,
            format!("VHD footer at the end of the file: {p}"),
        )),
        (Err(p @ FooterProblem::BadChecksum { .. }), _) => Err(FormatError::corrupt(
            path,
            format!("VHD footer copy at offset 0: {p}"),
        )),
        _ => Err(FormatError::NotFormat {
            path: path.to_path_buf(),
            format: "VHD",
            why: "no valid \"conectix\" footer at the end of the file or at offset 0",
        }),
    }
}

/// Open one file of a chain, whose footer was already found; `chain` holds what the files
/// above it took.
fn open_layer(
    path: &Path,
    file: File,
    found: FooterFound,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Box<dyn BlockSource>, FormatError> {
    chain.files.enter(path, &file, "differencing")?;
    let is_parent = chain.files.is_parent();

    let footer = found.footer;
    // Whole sectors only, like qemu (total_sectors = current_size / 512).
    let size = footer.current_size / 512 * 512;
    if size > footer::MAX_DISK_SIZE {
        return Err(FormatError::corrupt(
            path,
            format!(
                "footer current_size {} exceeds the VHD maximum of 2040 GiB",
                footer.current_size
            ),
        ));
    }
    match footer.disk_type {
        footer::TYPE_FIXED => {
            if size > found.data_limit {
                return Err(FormatError::corrupt(
                    path,
                    format!("footer current_size {size} is larger than the {} data bytes before the footer", found.data_limit),
                ));
            }
            let role = super::chain_role(is_parent, false);
            Ok(Box::new(Fixed::new(path, file, size, role)))
        }
        footer::TYPE_DYNAMIC | footer::TYPE_DIFFERENCING => {
            let layout = load_layout(path, &file, &footer, size, found.data_limit)?;
            chain.charge_bat(path, layout.bat.len())?;
            let parent = if footer.disk_type == footer::TYPE_DIFFERENCING {
                let parent = open_parent(path, &file, &layout.header, opts, chain)
                    .inspect_err(|_| chain.parent_failed = true)?;
                Some(parent)
            } else {
                None
            };
            let role = super::chain_role(is_parent, parent.is_some());
            let src = Dynamic::new(path, file, &footer, size, layout, parent, role);
            Ok(Box::new(src))
        }
        other => Err(FormatError::Unsupported {
            path: path.to_path_buf(),
            what: format!("VHD disk type {other}"),
        }),
    }
}

/// Find, open and check the parent of a differencing disk: try each candidate path in
/// order, skipping one that does not exist, cannot be opened or (unless
/// `--ignore-parent-id`) is not the parent this disk records. When none fits, report the
/// first id mismatch, else the first candidate's failure, else that none exists.
fn open_parent(
    path: &Path,
    file: &File,
    header: &header::DynHeader,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Box<dyn BlockSource>, FormatError> {
    let candidates = parent_candidates(path, file, header)?;
    if candidates.is_empty() {
        return Err(FormatError::corrupt(
            path,
            "differencing disk names no parent usable on this machine (no W2ru/W2ku/MacX locator or parent name)",
        ));
    }
    let mut mismatch: Option<FormatError> = None;
    let mut failure: Option<FormatError> = None;
    for parent_path in &candidates {
        // A dangling symlink exists here: opening it fails, and that failure is reported.
        if std::fs::symlink_metadata(parent_path).is_err() {
            continue;
        }
        let (files, bat_bytes) = (chain.files.len(), chain.bat_bytes);
        match try_parent(path, parent_path, header, opts, chain) {
            Ok(parent) => return Ok(parent),
            Err(Candidate::Mismatch(e)) => {
                mismatch.get_or_insert(e);
            }
            // The candidate itself opened and something further down its chain failed: that
            // error names its own file. Trying the other candidates would reopen that chain
            // once per candidate at every level, exponential in the depth.
            Err(Candidate::Failed(e)) if chain.parent_failed => return Err(e),
            Err(Candidate::Failed(e)) => {
                failure.get_or_insert(as_parent_of(e, parent_path, path));
            }
        }
        // What the failed candidate took back, so the next one starts from the child.
        chain.files.truncate(files);
        chain.bat_bytes = bat_bytes;
    }
    Err(mismatch.or(failure).unwrap_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        FormatError::corrupt(
            path,
            format!("parent image not found (looked for {})", list.join(", ")),
        )
    }))
}

/// Why one parent candidate was not used.
enum Candidate {
    /// It is a VHD, but not the one the child records.
    Mismatch(FormatError),
    /// It could not be opened or decoded (the error names the file that failed).
    Failed(FormatError),
}

/// Open one candidate as the parent of `child`. The unique id is checked from the footer
/// before the candidate's own chain is opened, so a wrong file costs one read.
///
/// The parent's time stamp is not compared: the id is the identity check, and VirtualBox
/// records the parent file's modification time there, not its footer time stamp, so valid
/// chains would disagree.
fn try_parent(
    child: &Path,
    parent_path: &Path,
    header: &header::DynHeader,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Box<dyn BlockSource>, Candidate> {
    // A FIFO or device named by a hostile locator could block or be huge: only files.
    let meta = std::fs::metadata(parent_path)
        .map_err(|e| Candidate::Failed(FormatError::io(parent_path, e)))?;
    if !meta.is_file() {
        return Err(Candidate::Failed(FormatError::corrupt(
            parent_path,
            "not a regular file",
        )));
    }
    let parent_file = super::open_image_file(parent_path).map_err(Candidate::Failed)?;
    let found = read_footer(parent_path, &parent_file).map_err(Candidate::Failed)?;
    if found.footer.unique_id != header.parent_unique_id && !opts.ignore_parent_id {
        return Err(Candidate::Mismatch(FormatError::corrupt(
            child,
            format!(
                "parent {} has unique id {} but this disk expects {} (the parent was replaced or modified; --ignore-parent-id opens it anyway)",
                parent_path.display(),
                hex(&found.footer.unique_id),
                hex(&header.parent_unique_id)
            ),
        )));
    }
    open_layer(parent_path, parent_file, found, opts, chain).map_err(Candidate::Failed)
}

/// Add to an error about `parent` itself that it was opened as the parent of `child`, so
/// the message names both files. Errors about other files are left alone.
fn as_parent_of(err: FormatError, parent: &Path, child: &Path) -> FormatError {
    if err.path() != parent {
        return err;
    }
    FormatError::ParentOf {
        child: child.to_path_buf(),
        must_be: matches!(err, FormatError::NotFormat { .. }).then_some("VHD"),
        source: Box::new(err),
    }
}

/// Paths where the parent may be, in the order to try: relative locators first (they
/// survive moving the whole folder), then absolute ones, then the header's parent name
/// next to the child.
fn parent_candidates(
    path: &Path,
    file: &File,
    header: &header::DynHeader,
) -> Result<Vec<PathBuf>, FormatError> {
    let child_dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_len = super::file_len(path, file)?;
    let mut out: Vec<PathBuf> = Vec::new();
    for code in [PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX] {
        for loc in header
            .locators
            .iter()
            .filter(|l| l.code == code && l.data_len > 0)
        {
            if loc.data_len > header::MAX_LOCATOR_LEN {
                return Err(FormatError::corrupt(
                    path,
                    format!(
                        "parent locator {} is {} bytes long (limit {})",
                        loc.index,
                        loc.data_len,
                        header::MAX_LOCATOR_LEN
                    ),
                ));
            }
            if loc
                .data_offset
                .checked_add(u64::from(loc.data_len))
                .is_none_or(|e| e > file_len)
            {
                return Err(FormatError::corrupt(
                    path,
                    format!(
                        "parent locator {} data points past the end of the file",
                        loc.index
                    ),
                ));
            }
            let mut data = vec![0u8; loc.data_len as usize];
            super::read_exact_at(file, &mut data, loc.data_offset)
                .map_err(|e| FormatError::io(path, e))?;
            if let Some(p) = locator_path(code, &data, &child_dir) {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    // Last resort: the bare file name from the header, next to the child.
    let name = header.parent_name.rsplit(['\\', '/']).next().unwrap_or("");
    if !name.is_empty() && name != "." && name != ".." {
        let p = child_dir.join(name);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Lower-case hex of an id, for messages.
fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fixed VHD: the disk is the file's first `size` bytes, the footer follows.
pub struct Fixed {
    file: File,
    size: u64,
    layer: LayerInfo,
}

impl Fixed {
    /// Wrap a file whose footer was checked to follow `size` data bytes.
    fn new(path: &Path, file: File, size: u64, role: &str) -> Self {
        let layer = LayerInfo {
            path: path.to_path_buf(),
            format: "vhd".into(),
            version: Some("fixed".into()),
            role: role.into(),
            cluster_size: None,
            allocated_bytes: Some(size),
        };
        Fixed { file, size, layer }
    }
}

impl BlockSource for Fixed {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        super::check_read(self.size, offset, buf.len() as u64)?;
        super::read_exact_at(&self.file, buf, offset)
    }

    fn extents(&self, offset: u64, length: u64) -> std::io::Result<Vec<super::Extent>> {
        // The disk is the file's first `size` bytes, so the file's holes are the disk's.
        let end = offset.saturating_add(length).min(self.size);
        Ok(super::file_extents(&self.file, offset, end))
    }

    fn layers(&self) -> Vec<LayerInfo> {
        vec![self.layer.clone()]
    }
}

#[cfg(test)]
mod tests;
