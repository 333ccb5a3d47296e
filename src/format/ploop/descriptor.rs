//! ploop / Parallels Desktop DiskDescriptor.xml: a chain of ploop deltas, possibly split.
//!
//! Schema: QEMU docs/interop/prl-xml.rst and OpenVZ ploop lib/xml.c. `StorageData/Storage`
//! lists the files (`Image`: GUID, Type, File relative to the XML's folder);
//! `Snapshots/Shot` links each GUID to its ParentGUID; the top is `Snapshots/TopGUID`, or
//! the predefined top GUID when that element is absent. The chain is walked from the top to
//! the root (ParentGUID all zeros) and opened as one [`ploop::Chain`].
//!
//! Split disks (Parallels Desktop's "split into 2 GB files"): several `Storage` elements,
//! each covering sectors `[Start, End)` of the disk and holding one `Image` per snapshot
//! GUID. Each extent is its own chain of deltas (each delta file is as large as its extent);
//! the snapshot tree is shared. They are joined by [`Split`].
//!
//! Parallels Desktop writes an `<Encryption>` block on every disk; an Engine of the null
//! GUID (with or without braces, any case) and empty Data/Salt mean *not encrypted*.
//!
//! "Plain" images: ploop writes `Type` Plain on *every* image of a disk whose base is raw,
//! while the deltas above it are still ploop files. So the type is decided per file from its
//! magic: a ploop header makes it a ploop delta; a Plain file without one is a raw base and
//! is accepted only at the bottom of the chain; a Compressed file without one is refused.
//!
//! Image files must resolve (after symlinks) inside the descriptor's folder: a hostile
//! descriptor cannot make imgsafe read some other file of the user's into the appliance.

pub use super::xml::{parse as parse_xml, Element};

use super::xml;
use super::{self as ploop, Chain, Delta, SECTOR_SIZE};
use crate::format::{BlockSource, Extent, FormatError, LayerInfo};
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The top GUID used when `Snapshots/TopGUID` is absent (prl-xml.rst "Snapshots").
pub const DEFAULT_TOP_GUID: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
/// ParentGUID of the root snapshot.
pub const NONE_GUID: &str = "{00000000-0000-0000-0000-000000000000}";
pub use crate::format::MAX_CHAIN_DEPTH;

/// `Image/Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// An expanding (ploop) image.
    Compressed,
    /// A raw image.
    Plain,
}

/// One `StorageData/Storage/Image` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Normalised (lowercase) GUID.
    pub guid: String,
    /// Declared type.
    pub kind: ImageType,
    /// File name as written, relative to the descriptor's folder.
    pub file: String,
}

/// One `StorageData/Storage` element: a range of the disk and its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// `Start`, in sectors: first sector of the disk this extent holds.
    pub start: u64,
    /// `End`, in sectors: the extent holds sectors `[start, end)`.
    pub end: u64,
    /// `Blocksize`, in sectors, when present.
    pub block_sectors: Option<u64>,
    /// The image files, one per snapshot GUID.
    pub images: Vec<ImageEntry>,
}

impl Storage {
    /// Index into `images` of the file for snapshot `guid`.
    pub fn image_for(&self, guid: &str) -> Option<usize> {
        self.images.iter().position(|i| i.guid == guid)
    }
}

/// Most `Storage` extents accepted (Parallels splits at 2 GiB, so 4096 covers 8 TiB; each
/// extent is a chain of open files).
pub const MAX_STORAGES: usize = 4096;

/// The parts of a DiskDescriptor.xml imgsafe uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `Disk_Parameters/Disk_size`, in sectors.
    pub disk_sectors: u64,
    /// The extents, in disk order, covering `[0, disk_sectors)` without gaps.
    pub storages: Vec<Storage>,
    /// Normalised top GUID.
    pub top_guid: String,
    /// `(GUID, ParentGUID)` of each `Shot`, normalised.
    pub shots: Vec<(String, String)>,
}

fn norm_guid(g: &str) -> String {
    g.trim().to_ascii_lowercase()
}

/// True for the null GUID in any spelling Parallels writes: any case, braces or not.
fn is_null_guid(g: &str) -> bool {
    let g = g.trim();
    let bare = g
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .unwrap_or(g);
    bare.len() == 36
        && bare.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b == b'0'
            }
        })
}

fn number(parent: &Element, name: &str, ctx: &str) -> Result<Option<u64>, String> {
    match parent.child_text(name) {
        None => Ok(None),
        Some(t) => t
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{ctx}/{name} is not a number: {t:?}")),
    }
}

impl Descriptor {
    /// Interpret a parsed document. The error is the message after the file name.
    pub fn from_xml(root: &Element) -> Result<Descriptor, String> {
        if root.name != "Parallels_disk_image" {
            return Err(format!(
                "root element is <{}>, not <Parallels_disk_image>",
                root.name
            ));
        }
        let params = root
            .child("Disk_Parameters")
            .ok_or("no <Disk_Parameters> element")?;
        let disk_sectors = number(params, "Disk_size", "Disk_Parameters")?
            .ok_or("no <Disk_Parameters/Disk_size> element")?;
        if disk_sectors.checked_mul(SECTOR_SIZE).is_none() {
            return Err(format!("Disk_size {disk_sectors} overflows"));
        }
        check_encryption(root)?;
        if number(params, "Padding", "Disk_Parameters")?.unwrap_or(0) != 0 {
            return Err("unsupported: Disk_Parameters/Padding is not 0".into());
        }
        let storage_data = root
            .child("StorageData")
            .ok_or("no <StorageData> element")?;
        let lone = storage_data.children_named("Storage").count() == 1;
        let storages = storage_data
            .children_named("Storage")
            .map(|st| storage_entry(st, lone.then_some(disk_sectors)))
            .collect::<Result<Vec<_>, _>>()?;
        check_extents(&storages, disk_sectors)?;
        let snapshots = root.child("Snapshots");
        let top_guid = snapshots
            .and_then(|s| s.child_text("TopGUID"))
            .map_or(DEFAULT_TOP_GUID.to_string(), norm_guid);
        let shots = snapshots
            .into_iter()
            .flat_map(|s| s.children_named("Shot"))
            .map(|shot| {
                let guid = shot.child_text("GUID").ok_or("a <Shot> has no <GUID>")?;
                let parent = shot
                    .child_text("ParentGUID")
                    .ok_or_else(|| format!("Shot {guid} has no <ParentGUID>"))?;
                Ok((norm_guid(guid), norm_guid(parent)))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Descriptor {
            disk_sectors,
            storages,
            top_guid,
            shots,
        })
    }

    /// Snapshot GUIDs from the top delta down to the root. Refuses GUIDs that are
    /// referenced but not listed in every extent, cycles, and chains deeper than
    /// [`MAX_CHAIN_DEPTH`].
    pub fn chain(&self) -> Result<Vec<String>, String> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut guid = self.top_guid.clone();
        let lone_image = self.storages.iter().all(|s| s.images.len() == 1);
        loop {
            if !seen.insert(guid.clone()) {
                return Err(format!("cycle in the snapshot chain at GUID {guid}"));
            }
            if order.len() >= MAX_CHAIN_DEPTH {
                return Err(format!(
                    "snapshot chain is deeper than {MAX_CHAIN_DEPTH} deltas"
                ));
            }
            for (n, storage) in self.storages.iter().enumerate() {
                if storage.image_for(&guid).is_none() {
                    return Err(if self.storages.len() == 1 {
                        format!("GUID {guid} is referenced but not listed in StorageData")
                    } else {
                        format!(
                            "GUID {guid} is referenced but not listed in StorageData/Storage {}",
                            n + 1
                        )
                    });
                }
            }
            let parent = match self.shots.iter().find(|(g, _)| *g == guid) {
                Some((_, p)) => p.clone(),
                // ploop itself treats a lone image without a Shot as the root.
                None if lone_image => NONE_GUID.to_string(),
                None => return Err(format!("GUID {guid} has no <Shot> entry")),
            };
            order.push(guid);
            if is_null_guid(&parent) {
                return Ok(order);
            }
            guid = parent;
        }
    }
}

/// One `Storage`; `lone_end` is the end used when it is the only extent (ploop writes its
/// End loosely there and reads the whole disk from it, so Disk_size decides).
fn storage_entry(storage: &Element, lone_end: Option<u64>) -> Result<Storage, String> {
    let start = number(storage, "Start", "Storage")?.unwrap_or(0);
    let end = match lone_end {
        Some(end) => end,
        None => number(storage, "End", "Storage")?.ok_or("a <Storage> has no <End>")?,
    };
    let block_sectors = number(storage, "Blocksize", "Storage")?;
    let images = storage
        .children_named("Image")
        .map(image_entry)
        .collect::<Result<Vec<_>, _>>()?;
    if images.is_empty() {
        return Err(format!(
            "no <Image> in the <Storage> of sectors {start}..{end}"
        ));
    }
    // Two files under one GUID would make the chain depend on which one is found first.
    let mut guids = HashSet::new();
    if let Some(dup) = images.iter().find(|i| !guids.insert(i.guid.as_str())) {
        return Err(format!(
            "StorageData/Storage/Image GUID {} is listed more than once",
            dup.guid
        ));
    }
    Ok(Storage {
        start,
        end,
        block_sectors,
        images,
    })
}

/// The extents must tile the disk: the first starts at sector 0, each starts where the one
/// before ends, none is empty, and the last ends at `Disk_size` (a gap or overlap would
/// leave sectors with no file or two).
fn check_extents(storages: &[Storage], disk_sectors: u64) -> Result<(), String> {
    if storages.is_empty() {
        return Err("no <StorageData/Storage> element".into());
    }
    if storages.len() > MAX_STORAGES {
        return Err(format!(
            "unsupported: more than {MAX_STORAGES} <Storage> extents"
        ));
    }
    let mut expect = 0;
    for s in storages {
        if s.start != expect {
            return Err(format!(
                "Storage of sectors {}..{} should start at sector {expect} (extents must follow each other)",
                s.start, s.end
            ));
        }
        if s.end <= s.start {
            return Err(format!(
                "Storage of sectors {}..{} is empty",
                s.start, s.end
            ));
        }
        expect = s.end;
    }
    if expect != disk_sectors {
        return Err(format!(
            "the Storage extents end at sector {expect}, not at Disk_size {disk_sectors}"
        ));
    }
    Ok(())
}

fn image_entry(el: &Element) -> Result<ImageEntry, String> {
    let guid = el
        .child_text("GUID")
        .filter(|g| !g.is_empty())
        .ok_or("an <Image> has no <GUID>")?;
    let file = el
        .child_text("File")
        .filter(|f| !f.is_empty())
        .ok_or_else(|| format!("Image {guid} has no <File>"))?;
    let kind = match el.child_text("Type") {
        Some("Plain") => ImageType::Plain,
        Some("Compressed") | None => ImageType::Compressed,
        Some(other) => return Err(format!("Image {guid} has unknown Type {other:?}")),
    };
    Ok(ImageEntry {
        guid: norm_guid(guid),
        kind,
        file: file.to_string(),
    })
}

/// Refuse encrypted disks: the data would read as noise. Parallels Desktop writes an
/// `<Encryption>` block on every disk; it means "encrypted" only when it names an engine
/// other than the null GUID or carries key material.
fn check_encryption(root: &Element) -> Result<(), String> {
    let params = root.child("Disk_Parameters");
    for enc in params
        .into_iter()
        .chain(Some(root))
        .flat_map(|p| p.children_named("Encryption"))
    {
        let engine = enc.child_text("Engine").unwrap_or("");
        if !engine.is_empty() && engine != "0" && !is_null_guid(engine) {
            return Err(format!(
                "unsupported: the disk is encrypted (Encryption/Engine {engine:?})"
            ));
        }
        for key in ["KeyId", "Data", "Salt"] {
            if enc.child_text(key).is_some_and(|k| !k.is_empty()) {
                return Err(format!(
                    "unsupported: the disk is encrypted (Encryption/{key} is set)"
                ));
            }
        }
    }
    Ok(())
}

/// Most bytes read to find the root element: a descriptor may start with a long comment.
pub const PROBE_MAX: usize = 64 << 10;
/// The root element of a DiskDescriptor.xml (prl-xml.rst).
const ROOT_TAG: &[u8] = b"<Parallels_disk_image";

/// True if the file is an XML document whose root element is `<Parallels_disk_image>`.
/// `head` is the file's first bytes; up to [`PROBE_MAX`] are read when what precedes the
/// root (declaration, comments, processing instructions) runs past them.
pub fn probe(path: &Path, file: &std::fs::File, head: &[u8]) -> Result<bool, FormatError> {
    match root_is_descriptor(head) {
        Some(found) => Ok(found),
        // The whole file was in `head`: the prolog never ends.
        None if head.len() < crate::format::PROBE_LEN => Ok(false),
        None => {
            let len = crate::format::file_len(path, file)?;
            let mut more = vec![0u8; usize::try_from(len).unwrap_or(PROBE_MAX).min(PROBE_MAX)];
            crate::format::read_exact_at(file, &mut more, 0)
                .map_err(|e| FormatError::io(path, e))?;
            Ok(root_is_descriptor(&more) == Some(true))
        }
    }
}

/// Whether the root element of the XML document starting `bytes` is `<Parallels_disk_image`,
/// skipping a byte-order mark, whitespace, the declaration, comments and processing
/// instructions before it; `None` when `bytes` ends before the root element starts.
fn root_is_descriptor(bytes: &[u8]) -> Option<bool> {
    let mut rest = bytes
        .strip_prefix(b"\xEF\xBB\xBF".as_slice())
        .unwrap_or(bytes);
    loop {
        rest = rest.trim_ascii_start();
        if rest.starts_with(b"<?") {
            rest = &rest[past(rest, 2, b"?>")?..];
        } else if rest.starts_with(b"<!--") {
            rest = &rest[past(rest, 4, b"-->")?..];
        } else if rest.len() <= ROOT_TAG.len() {
            // Too short to tell, unless it already cannot be the root tag.
            let n = rest.len();
            return if rest == &ROOT_TAG[..n] || b"<!--".starts_with(rest) || b"<?".starts_with(rest)
            {
                None
            } else {
                Some(false)
            };
        } else {
            let after = rest[ROOT_TAG.len()];
            return Some(
                rest.starts_with(ROOT_TAG)
                    && (after.is_ascii_whitespace() || after == b'>' || after == b'/'),
            );
        }
    }
}

/// Index just past the first `close` in `hay` at or after `from`.
fn past(hay: &[u8], from: usize, close: &[u8]) -> Option<usize> {
    let at = hay
        .get(from..)?
        .windows(close.len())
        .position(|w| w == close)?;
    Some(from + at + close.len())
}

/// Read and interpret a descriptor file, with the size cap applied before reading.
pub fn read_descriptor(path: &Path) -> Result<Descriptor, FormatError> {
    let file = crate::format::open_image_file(path)?;
    let len = crate::format::file_len(path, &file)?;
    if len > xml::MAX_BYTES as u64 {
        return Err(FormatError::corrupt(
            path,
            format!("descriptor is {len} bytes, larger than the 1 MiB limit"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    crate::format::read_exact_at(&file, &mut bytes, 0).map_err(|e| FormatError::io(path, e))?;
    let root = xml::parse(&bytes).map_err(|w| FormatError::corrupt(path, w))?;
    Descriptor::from_xml(&root).map_err(|w| FormatError::corrupt(path, w))
}

/// True for a path written on another machine: POSIX absolute, a Windows drive path
/// (`C:\\...`) or a UNC path (`\\\\server\\...`).
fn is_foreign_absolute(file: &str) -> bool {
    let b = file.as_bytes();
    file.starts_with('/')
        || file.starts_with("\\\\")
        || (b.len() >= 3
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && matches!(b[2], b'\\' | b'/'))
}

/// Resolve an `Image/File` against the folder of the real descriptor (a symlinked
/// DiskDescriptor.xml names the files next to its target, as ploop reads it), refusing
/// anything outside that folder. Returns the canonical path that was checked, so the file
/// opened is the one checked.
///
/// Parallels Desktop may record absolute paths; a bundle copied to another machine (or
/// folder) then names files that are not there. For an absolute path that does not resolve
/// inside the folder, the file of the same name inside the bundle folder is used instead
/// (said with `-v`): it is the only place a self-contained bundle can keep it.
fn image_path(xml_path: &Path, file: &str) -> Result<PathBuf, FormatError> {
    let outside = || {
        FormatError::corrupt(
            xml_path,
            format!("Image File {file:?} is outside the descriptor's folder"),
        )
    };
    if !is_foreign_absolute(file)
        && Path::new(file)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(outside());
    }
    let real_xml = xml_path
        .canonicalize()
        .map_err(|e| FormatError::io(xml_path, e))?;
    // A canonical file path always has a parent folder.
    let canon_dir = real_xml.parent().unwrap_or(Path::new("/"));
    let mut rel = file;
    if is_foreign_absolute(file) {
        if let Ok(real) = Path::new(file).canonicalize() {
            if real.starts_with(canon_dir) {
                return Ok(real);
            }
        }
        let name = file.rsplit(['/', '\\']).next().unwrap_or("");
        if name.is_empty() || name == "." || name == ".." {
            return Err(outside());
        }
        crate::trace::note(&format!(
            "{}: Image File {file:?} is an absolute path; using {name:?} inside the bundle folder",
            xml_path.display()
        ));
        rel = name;
    }
    let rel = Path::new(rel);
    let joined = canon_dir.join(rel);
    match joined.canonicalize() {
        Ok(real) if real.starts_with(canon_dir) => Ok(real),
        Ok(_) => Err(outside()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(FormatError::corrupt(
            &joined,
            format!("delta file listed in {} does not exist", xml_path.display()),
        )),
        Err(e) => Err(FormatError::io(&joined, e)),
    }
}

/// Open one delta: ploop by magic, raw only when declared Plain.
fn open_delta(xml_path: &Path, entry: &ImageEntry) -> Result<Delta, FormatError> {
    let path = image_path(xml_path, &entry.file)?;
    let file = crate::format::open_image_file(&path)?;
    let head = crate::format::read_head(&path, &file)?;
    if ploop::probe(&head) {
        return Delta::open_ploop(&path, file);
    }
    match entry.kind {
        ImageType::Plain => Delta::open_plain(&path, file),
        ImageType::Compressed => Err(FormatError::corrupt(
            &path,
            "declared Compressed but is not a ploop image (bad header magic)",
        )),
    }
}

/// Check one delta against the descriptor and the chain's cluster size.
fn check_delta(
    delta: &Delta,
    disk_size: u64,
    cluster_size: &mut Option<u64>,
    is_base: bool,
) -> Result<(), FormatError> {
    let path = delta.path();
    if let Some(len) = delta.plain_len() {
        if !is_base {
            return Err(FormatError::corrupt(
                path,
                "a raw (Plain) image can only be the base of the chain",
            ));
        }
        if len < disk_size {
            let what =
                format!("raw base is {len} bytes, smaller than the disk ({disk_size} bytes)");
            return Err(FormatError::corrupt(path, what));
        }
        return Ok(());
    }
    let header = delta.header().expect("not plain, so ploop");
    if header.disk_size() != disk_size {
        let what = format!(
            "disk size {} bytes disagrees with DiskDescriptor.xml Disk_size ({disk_size} bytes)",
            header.disk_size()
        );
        return Err(FormatError::corrupt(path, what));
    }
    match *cluster_size {
        Some(cs) if cs != header.cluster_size() => {
            let what = format!(
                "cluster size {} bytes disagrees with the chain's {cs} bytes",
                header.cluster_size()
            );
            Err(FormatError::corrupt(path, what))
        }
        _ => {
            *cluster_size = Some(header.cluster_size());
            Ok(())
        }
    }
}

/// Unit a chain of only a raw base is read in (the descriptor's Blocksize maps no BAT).
const PLAIN_CLUSTER_SIZE: u64 = 1 << 20;
/// Most memory all BATs of one chain may take (each delta's BAT is read whole).
const MAX_CHAIN_BAT_BYTES: u64 = 512 << 20;

/// Open the chain a DiskDescriptor.xml describes: one [`Chain`] per `Storage` extent,
/// joined by [`Split`] when there are several.
pub fn open_chain(path: &Path) -> Result<Box<dyn BlockSource>, FormatError> {
    // Read the descriptor that image paths are resolved against, even if a symlink
    // pointing to it is swapped meanwhile.
    let real = path.canonicalize().map_err(|e| FormatError::io(path, e))?;
    let desc = read_descriptor(&real)?;
    let order = desc.chain().map_err(|w| FormatError::corrupt(path, w))?;
    let mut opened = Opened {
        seen: HashSet::new(),
        bat_bytes: 0,
    };
    let split = desc.storages.len() > 1;
    let mut parts = Vec::with_capacity(desc.storages.len());
    for (n, storage) in desc.storages.iter().enumerate() {
        let chain = open_extent(path, &real, storage, &order, &mut opened)?;
        if !split {
            return Ok(Box::new(chain));
        }
        let label = format!(
            "extent {}/{} (sectors {}..{})",
            n + 1,
            desc.storages.len(),
            storage.start,
            storage.end
        );
        parts.push((storage.start * SECTOR_SIZE, chain, label));
    }
    Ok(Box::new(Split::new(parts, desc.disk_sectors * SECTOR_SIZE)))
}

/// What the extents of one descriptor have opened so far, shared by all of them.
struct Opened {
    /// (device, inode) of every delta file.
    seen: HashSet<(u64, u64)>,
    /// Memory taken by BATs so far.
    bat_bytes: u64,
}

/// Open the delta chain of one `Storage` extent, top first, following `order` (GUIDs).
fn open_extent(
    path: &Path,
    real: &Path,
    storage: &Storage,
    order: &[String],
    opened: &mut Opened,
) -> Result<Chain, FormatError> {
    // check_extents made end > start, and end <= Disk_size, whose byte size fits u64.
    let disk_size = (storage.end - storage.start) * SECTOR_SIZE;
    // Blocksize 0 says nothing; ploop deltas must agree with any other value.
    let block_sectors = storage.block_sectors.filter(|&b| b > 0);
    if let Some(b) = block_sectors.filter(|&b| b > u64::from(ploop::MAX_CLUSTER_SECTORS)) {
        return Err(FormatError::corrupt(
            path,
            format!(
                "Storage/Blocksize {b} sectors is out of range (1..={})",
                ploop::MAX_CLUSTER_SECTORS
            ),
        ));
    }
    let mut cluster_size = block_sectors.map(|b| b * SECTOR_SIZE);
    let mut deltas = Vec::with_capacity(order.len());
    let mut roles = Vec::with_capacity(order.len());
    for (depth, guid) in order.iter().enumerate() {
        let is_base = depth + 1 == order.len();
        // chain() checked every GUID is listed in every extent.
        let Some(index) = storage.image_for(guid) else {
            return Err(FormatError::corrupt(
                path,
                format!("GUID {guid} not listed"),
            ));
        };
        let delta = open_delta(real, &storage.images[index])?;
        check_delta(&delta, disk_size, &mut cluster_size, is_base)?;
        // Several GUIDs naming one file would multiply its BAT in memory for nothing.
        let id = std::fs::metadata(delta.path())
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| FormatError::io(delta.path(), e))?;
        if !opened.seen.insert(id) {
            return Err(FormatError::corrupt(
                delta.path(),
                format!("listed twice in the chain of {}", path.display()),
            ));
        }
        if delta.plain_len().is_none() {
            let clusters = disk_size.div_ceil(cluster_size.filter(|&c| c > 0).unwrap_or(1 << 20));
            opened.bat_bytes = opened.bat_bytes.saturating_add(clusters.saturating_mul(4));
            if opened.bat_bytes > MAX_CHAIN_BAT_BYTES {
                return Err(FormatError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!(
                        "the chain's tables need more than {} MiB of memory",
                        MAX_CHAIN_BAT_BYTES >> 20
                    ),
                });
            }
        }
        deltas.push(delta);
        roles.push(
            match (depth, is_base) {
                (_, true) => "base",
                (0, false) => "top",
                _ => "delta",
            }
            .to_string(),
        );
    }
    // Without a ploop delta no BAT uses the cluster size: a tiny Blocksize would only make
    // reads step through a huge raw base in tiny pieces.
    let cluster_size = match cluster_size {
        Some(cs) if deltas.iter().any(|d| d.header().is_some()) => cs,
        _ => PLAIN_CLUSTER_SIZE,
    };
    Ok(Chain::new(deltas, roles, cluster_size, disk_size))
}

/// A split disk: extents laid end to end, each its own chain. Reads and allocation maps
/// that cross an extent boundary are cut there and asked of each extent in turn.
#[derive(Debug)]
pub struct Split {
    /// (first byte in the disk, chain, label for `info`), in disk order, tiling the disk.
    parts: Vec<(u64, Chain, String)>,
    size: u64,
}

impl Split {
    /// Join extents that tile `[0, size)` in order (checked by the caller).
    pub fn new(parts: Vec<(u64, Chain, String)>, size: u64) -> Split {
        Split { parts, size }
    }

    /// Index of the extent holding byte `pos` (< size).
    fn part_at(&self, pos: u64) -> usize {
        self.parts
            .partition_point(|(start, _, _)| *start <= pos)
            .saturating_sub(1)
    }

    /// Call `f(part, offset inside it, offset in the request, length)` for each piece of
    /// `[offset, end)` that lies in one extent.
    fn pieces(
        &self,
        offset: u64,
        end: u64,
        mut f: impl FnMut(&Chain, u64, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut pos = offset;
        while pos < end {
            let i = self.part_at(pos);
            let (start, chain, _) = &self.parts[i];
            let part_end = start.saturating_add(chain.size());
            if part_end <= pos {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "no extent holds the offset",
                ));
            }
            let n = part_end.min(end) - pos;
            f(chain, pos - start, pos - offset, n)?;
            pos += n;
        }
        Ok(())
    }
}

impl BlockSource for Split {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = crate::format::check_read(self.size, offset, buf.len() as u64)?;
        self.pieces(offset, end, |chain, inner, at, n| {
            let at = at as usize;
            chain.read_at(&mut buf[at..at + n as usize], inner)
        })
    }

    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        self.pieces(offset, end, |chain, inner, at, n| {
            for e in chain.extents(inner, n)? {
                crate::format::push_extent(
                    &mut out,
                    Extent {
                        offset: offset + at + e.offset.saturating_sub(inner),
                        ..e
                    },
                );
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn layers(&self) -> Vec<LayerInfo> {
        self.parts
            .iter()
            .flat_map(|(_, chain, label)| {
                chain.layers().into_iter().map(move |mut l| {
                    l.role = format!("{}, {label}", l.role);
                    l
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(images: &str, snapshots: &str) -> String {
        format!(
            r#"<?xml version="1.0"?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters><Disk_size>2048</Disk_size><Cylinders>2</Cylinders><Heads>16</Heads><Sectors>64</Sectors><Padding>0</Padding></Disk_Parameters>
  <StorageData><Storage><Start>0</Start><End>2048</End><Blocksize>2048</Blocksize>{images}</Storage></StorageData>
  <Snapshots>{snapshots}</Snapshots>
</Parallels_disk_image>"#
        )
    }

    fn image(guid: &str, file: &str) -> String {
        format!("<Image><GUID>{guid}</GUID><Type>Compressed</Type><File>{file}</File></Image>")
    }

    fn shot(guid: &str, parent: &str) -> String {
        format!("<Shot><GUID>{guid}</GUID><ParentGUID>{parent}</ParentGUID></Shot>")
    }

    fn descriptor(text: &str) -> Result<Descriptor, String> {
        Descriptor::from_xml(&xml::parse(text.as_bytes())?)
    }

    const A: &str = "{aaaaaaaa-0000-0000-0000-000000000001}";
    const B: &str = "{bbbbbbbb-0000-0000-0000-000000000002}";

    #[test]
    fn walks_chain_from_default_top_guid() {
        let text = doc(
            &(image(A, "root.hds") + &image(DEFAULT_TOP_GUID, "root.hds.top")),
            &(shot(A, NONE_GUID) + &shot(DEFAULT_TOP_GUID, A)),
        );

        let d = descriptor(&text).unwrap();

        assert_eq!(d.disk_sectors, 2048);
        assert_eq!(d.storages[0].block_sectors, Some(2048));
        assert_eq!(d.chain().unwrap(), vec![DEFAULT_TOP_GUID, A]);
    }

    #[test]
    fn explicit_top_guid_wins() {
        let text = doc(
            &(image(A, "a") + &image(B, "b")),
            &(format!("<TopGUID>{}</TopGUID>", A.to_uppercase())
                + &shot(A, B)
                + &shot(B, NONE_GUID)),
        );

        let d = descriptor(&text).unwrap();

        assert_eq!(d.chain().unwrap(), vec![A, B]);
    }

    #[test]
    fn refuses_cycle() {
        let text = doc(
            &(image(A, "a") + &image(B, "b")),
            &(format!("<TopGUID>{A}</TopGUID>") + &shot(A, B) + &shot(B, A)),
        );

        let err = descriptor(&text).unwrap().chain().unwrap_err();

        assert!(err.contains("cycle in the snapshot chain"), "{err}");
    }

    #[test]
    fn refuses_unlisted_guid() {
        let text = doc(
            &image(A, "a"),
            &(format!("<TopGUID>{A}</TopGUID>") + &shot(A, B)),
        );

        let err = descriptor(&text).unwrap().chain().unwrap_err();

        assert!(
            err.contains(&format!("GUID {B} is referenced but not listed")),
            "{err}"
        );
    }

    #[test]
    fn refuses_deep_chain() {
        let guid = |i: usize| format!("{{00000000-0000-0000-0000-{:012}}}", i + 1);
        let images: String = (0..70).map(|i| image(&guid(i), "f")).collect();
        let shots: String = (0..70)
            .map(|i| {
                shot(
                    &guid(i),
                    &if i == 69 {
                        NONE_GUID.to_string()
                    } else {
                        guid(i + 1)
                    },
                )
            })
            .collect();
        let text = doc(
            &images,
            &(format!("<TopGUID>{}</TopGUID>", guid(0)) + &shots),
        );

        let err = descriptor(&text).unwrap().chain().unwrap_err();

        assert!(err.contains("deeper than 64"), "{err}");
    }

    #[test]
    fn refuses_encryption_engine() {
        let text = doc(&image(A, "a"), &shot(A, NONE_GUID)).replace(
            "<Padding>0</Padding>",
            "<Padding>0</Padding><Encryption><Engine>1</Engine></Encryption>",
        );

        let err = descriptor(&text).unwrap_err();

        assert!(err.contains("encrypted"), "{err}");
    }

    #[test]
    fn accepts_zero_encryption_engine() {
        let text = doc(
            &image(A, "a"),
            &format!("<TopGUID>{A}</TopGUID>{}", shot(A, NONE_GUID)),
        )
        .replace(
            "<Padding>0</Padding>",
            "<Padding>0</Padding><Encryption><Engine>0</Engine></Encryption>",
        );

        let d = descriptor(&text).unwrap();

        assert_eq!(d.chain().unwrap(), vec![A]);
    }

    #[test]
    fn refuses_wrong_root_and_missing_disk_size() {
        assert!(descriptor("<x/>")
            .unwrap_err()
            .contains("not <Parallels_disk_image>"));
        let text = doc(&image(A, "a"), "").replace("<Disk_size>2048</Disk_size>", "");
        assert!(descriptor(&text).unwrap_err().contains("Disk_size"));
    }

    #[test]
    fn reads_plain_type() {
        let text = doc(
            &image(A, "a").replace("Compressed", "Plain"),
            &shot(A, NONE_GUID),
        );

        let d = descriptor(&text).unwrap();

        assert_eq!(d.storages[0].images[0].kind, ImageType::Plain);
    }

    #[test]
    fn image_path_refuses_parent_dir() {
        let dir = tempfile::tempdir().unwrap();
        let xml = dir.path().join("DiskDescriptor.xml");

        let err = image_path(&xml, "../etc/passwd").unwrap_err().to_string();

        assert!(err.contains("outside the descriptor's folder"), "{err}");
    }

    #[test]
    fn image_path_never_opens_an_absolute_path_outside_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let xml = dir.path().join("DiskDescriptor.xml");
        std::fs::write(&xml, "<Parallels_disk_image/>").unwrap();

        let err = image_path(&xml, "/etc/passwd").unwrap_err().to_string();

        // It looks for `passwd` inside the bundle, which is not there.
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains(dir.path().to_str().unwrap()), "{err}");
    }

    #[test]
    fn absolute_path_from_another_machine_is_found_in_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let xml = dir.path().join("DiskDescriptor.xml");
        std::fs::write(&xml, "<Parallels_disk_image/>").unwrap();
        std::fs::write(dir.path().join("d.hdd.0.hds"), [0u8; 512]).unwrap();
        let want = dir.path().canonicalize().unwrap().join("d.hdd.0.hds");

        let mac = image_path(&xml, "/Users/me/Parallels/VM.pvm/d.hdd/d.hdd.0.hds").unwrap();
        let win = image_path(&xml, "C:\\Users\\me\\VM.pvm\\d.hdd\\d.hdd.0.hds").unwrap();

        assert_eq!(mac, want);
        assert_eq!(win, want);
    }

    #[test]
    fn null_guid_engine_in_any_spelling_is_not_encryption() {
        for engine in [
            "{00000000-0000-0000-0000-000000000000}",
            "00000000-0000-0000-0000-000000000000",
            "{00000000-0000-0000-0000-000000000000} ",
        ] {
            let text = doc(&image(A, "a"), &shot(A, NONE_GUID)).replace(
                "<Padding>0</Padding>",
                &format!("<Padding>0</Padding><Encryption><Engine>{engine}</Engine><Data></Data><Salt></Salt></Encryption>"),
            );

            assert!(descriptor(&text).is_ok(), "{engine}");
        }
    }

    #[test]
    fn real_engine_or_key_data_is_refused_by_name() {
        let with = |enc: &str| {
            descriptor(&doc(&image(A, "a"), &shot(A, NONE_GUID)).replace(
                "<Padding>0</Padding>",
                &format!("<Padding>0</Padding>{enc}"),
            ))
            .unwrap_err()
        };

        let engine = with(
            "<Encryption><Engine>{1ce1ad3a-0000-4000-8000-000000000001}</Engine></Encryption>",
        );
        let data = with("<Encryption><Engine>{00000000-0000-0000-0000-000000000000}</Engine><Data>q83vEjRW</Data></Encryption>");

        assert!(
            engine.contains(
                "encrypted (Encryption/Engine \"{1ce1ad3a-0000-4000-8000-000000000001}\")"
            ),
            "{engine}"
        );
        assert!(
            data.contains("encrypted (Encryption/Data is set)"),
            "{data}"
        );
    }

    /// A descriptor of `extents` Storage elements, each `[start, end)` with images A and B.
    fn split_doc(extents: &[(u64, u64)], disk: u64) -> String {
        let storages: String = extents
            .iter()
            .map(|(a, b)| {
                format!(
                    "<Storage><Start>{a}</Start><End>{b}</End><Blocksize>2048</Blocksize>{}{}</Storage>",
                    image(A, &format!("d.{a}.a")),
                    image(B, &format!("d.{a}.b"))
                )
            })
            .collect();
        format!(
            "<Parallels_disk_image><Disk_Parameters><Disk_size>{disk}</Disk_size></Disk_Parameters>\
             <StorageData>{storages}</StorageData><Snapshots>{}{}</Snapshots></Parallels_disk_image>",
            shot(A, NONE_GUID),
            shot(DEFAULT_TOP_GUID.replace(DEFAULT_TOP_GUID, B).as_str(), A)
        )
        .replace("</Snapshots>", &format!("<TopGUID>{B}</TopGUID></Snapshots>"))
    }

    #[test]
    fn split_extents_share_the_snapshot_chain() {
        let d = descriptor(&split_doc(&[(0, 100), (100, 250), (250, 300)], 300)).unwrap();

        assert_eq!(d.storages.len(), 3);
        assert_eq!((d.storages[1].start, d.storages[1].end), (100, 250));
        assert_eq!(d.chain().unwrap(), vec![B, A]);
    }

    #[test]
    fn split_extents_with_gaps_overlaps_or_short_end_are_refused() {
        let gap = descriptor(&split_doc(&[(0, 100), (120, 300)], 300)).unwrap_err();
        let overlap = descriptor(&split_doc(&[(0, 100), (90, 300)], 300)).unwrap_err();
        let short = descriptor(&split_doc(&[(0, 100), (100, 200)], 300)).unwrap_err();
        let empty = descriptor(&split_doc(&[(0, 100), (100, 100), (100, 300)], 300)).unwrap_err();

        assert!(gap.contains("should start at sector 100"), "{gap}");
        assert!(overlap.contains("should start at sector 100"), "{overlap}");
        assert!(
            short.contains("end at sector 200, not at Disk_size 300"),
            "{short}"
        );
        assert!(empty.contains("is empty"), "{empty}");
    }

    #[test]
    fn a_guid_missing_from_one_extent_is_refused_naming_it() {
        let text = split_doc(&[(0, 100), (100, 300)], 300).replacen(&image(B, "d.100.b"), "", 1);

        let err = descriptor(&text).unwrap().chain().unwrap_err();

        assert_eq!(
            err,
            format!("GUID {B} is referenced but not listed in StorageData/Storage 2")
        );
    }

    #[test]
    fn symlinked_descriptor_resolves_files_next_to_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let (real, link) = (dir.path().join("real"), dir.path().join("link"));
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(&link).unwrap();
        std::fs::write(real.join("DiskDescriptor.xml"), "<Parallels_disk_image/>").unwrap();
        std::fs::write(real.join("root.hds"), [0u8; 512]).unwrap();
        std::os::unix::fs::symlink(
            "../real/DiskDescriptor.xml",
            link.join("DiskDescriptor.xml"),
        )
        .unwrap();

        let got = image_path(&link.join("DiskDescriptor.xml"), "root.hds").unwrap();

        assert_eq!(got, real.canonicalize().unwrap().join("root.hds"));
    }

    /// A chain of one raw base: `Disk_size` and `Blocksize` in sectors, base of `base_len`.
    fn plain_chain(dir: &Path, disk_sectors: u64, block_sectors: u64, base_len: u64) -> PathBuf {
        let text = doc(
            &image(DEFAULT_TOP_GUID, "root.hds").replace("Compressed", "Plain"),
            &shot(DEFAULT_TOP_GUID, NONE_GUID),
        )
        .replace("<Disk_size>2048<", &format!("<Disk_size>{disk_sectors}<"))
        .replace("<Blocksize>2048<", &format!("<Blocksize>{block_sectors}<"));
        let xml = dir.join("DiskDescriptor.xml");
        std::fs::write(&xml, text).unwrap();
        let base = std::fs::File::create(dir.join("root.hds")).unwrap();
        base.set_len(base_len).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&base, &[7u8; 65536], base_len / 8).unwrap();
        xml
    }

    #[test]
    fn huge_sparse_raw_base_with_one_sector_blocksize_is_counted_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let xml = plain_chain(dir.path(), 1 << 34, 1, 8 << 40);

        let src = open_chain(&xml).unwrap();
        let counted =
            crate::format::count_allocated(&*src, crate::format::MAX_COUNTED_EXTENTS).unwrap();
        let mut buf = [0u8; 4];
        src.read_at(&mut buf, (1 << 40) - 2).unwrap();

        assert_eq!(src.size(), 8 << 40);
        assert_eq!(counted, Some(65536));
        assert_eq!(buf, [0, 0, 7, 7]);
    }

    #[test]
    fn blocksize_out_of_range_is_refused_even_for_a_raw_base() {
        let dir = tempfile::tempdir().unwrap();
        let xml = plain_chain(dir.path(), 2048, 131_073, 1 << 20);

        let err = open_chain(&xml).err().unwrap().to_string();

        assert!(
            err.contains("Storage/Blocksize 131073 sectors is out of range"),
            "{err}"
        );
    }

    #[test]
    fn refuses_duplicate_image_guid() {
        let text = doc(
            &(image(A, "a") + &image(&A.to_uppercase(), "b")),
            &shot(A, NONE_GUID),
        );

        let err = descriptor(&text).unwrap_err();

        assert_eq!(
            err,
            format!("StorageData/Storage/Image GUID {A} is listed more than once")
        );
    }

    #[test]
    fn root_element_is_found_after_declaration_comments_and_instructions() {
        let doc = "\u{feff}<?xml version=\"1.0\"?>\n<!-- a <Parallels_disk_image> -->\n<?pi x?>\t<Parallels_disk_image Version=\"1.0\">";

        assert_eq!(root_is_descriptor(doc.as_bytes()), Some(true));
        assert_eq!(root_is_descriptor(b"<Parallels_disk_image>"), Some(true));
        assert_eq!(root_is_descriptor(b"<Parallels_disk_image/>"), Some(true));
    }

    #[test]
    fn descriptor_tag_that_is_not_the_root_is_not_probed() {
        let nested = b"<?xml version=\"1.0\"?><root><Parallels_disk_image/></root>";
        let longer_name = b"<Parallels_disk_image_x>";
        let in_comment = b"<!-- <Parallels_disk_image> --><other/>";

        assert_eq!(root_is_descriptor(nested), Some(false));
        assert_eq!(root_is_descriptor(longer_name), Some(false));
        assert_eq!(root_is_descriptor(in_comment), Some(false));
        assert_eq!(root_is_descriptor(b"<!-- unterminated"), None);
        assert_eq!(root_is_descriptor(b"  <Parallels_disk"), None);
    }

    #[test]
    fn probe_reads_past_a_long_comment_but_not_forever() {
        let dir = tempfile::tempdir().unwrap();
        let (long, endless) = (dir.path().join("long.xml"), dir.path().join("endless.xml"));
        let comment = format!("<!--{}-->", "x".repeat(20_000));
        std::fs::write(
            &long,
            format!("<?xml version=\"1.0\"?>{comment}<Parallels_disk_image/>"),
        )
        .unwrap();
        std::fs::write(&endless, format!("<!--{}", "x".repeat(PROBE_MAX * 2))).unwrap();
        let probe_file = |p: &Path| {
            let f = std::fs::File::open(p).unwrap();
            let head = crate::format::read_head(p, &f).unwrap();
            probe(p, &f, &head).unwrap()
        };

        assert!(probe_file(&long));
        assert!(!probe_file(&endless));
    }
}
