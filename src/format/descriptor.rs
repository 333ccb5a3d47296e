//! ploop DiskDescriptor.xml: a chain of ploop deltas.
//!
//! Schema: QEMU docs/interop/prl-xml.rst and OpenVZ ploop lib/xml.c. `StorageData/Storage`
//! lists the files (`Image`: GUID, Type, File relative to the XML's folder);
//! `Snapshots/Shot` links each GUID to its ParentGUID; the top is `Snapshots/TopGUID`, or
//! the predefined top GUID when that element is absent. The chain is walked from the top to
//! the root (ParentGUID all zeros) and opened as one [`ploop::Chain`].
//!
//! "Plain" images: ploop writes `Type` Plain on *every* image of a disk whose base is raw,
//! while the deltas above it are still ploop files. So the type is decided per file from its
//! magic: a ploop header makes it a ploop delta; a Plain file without one is a raw base and
//! is accepted only at the bottom of the chain; a Compressed file without one is refused.
//!
//! Image files must resolve (after symlinks) inside the descriptor's folder: a hostile
//! descriptor cannot make imgsafe read some other file of the user's into the appliance.

mod xml;

pub use xml::{parse as parse_xml, Element};

use super::ploop::{self, Chain, Delta, SECTOR_SIZE};
use super::{BlockSource, FormatError, OpenOptions};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The top GUID used when `Snapshots/TopGUID` is absent (prl-xml.rst "Snapshots").
pub const DEFAULT_TOP_GUID: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
/// ParentGUID of the root snapshot.
pub const NONE_GUID: &str = "{00000000-0000-0000-0000-000000000000}";
/// Deepest chain imgsafe opens (each delta is an open file and a lookup per cluster).
pub const MAX_CHAIN_DEPTH: usize = 64;

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

/// The parts of a DiskDescriptor.xml imgsafe uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `Disk_Parameters/Disk_size`, in sectors.
    pub disk_sectors: u64,
    /// `Storage/Blocksize`, in sectors, when present.
    pub block_sectors: Option<u64>,
    /// The image files.
    pub images: Vec<ImageEntry>,
    /// Normalised top GUID.
    pub top_guid: String,
    /// `(GUID, ParentGUID)` of each `Shot`, normalised.
    pub shots: Vec<(String, String)>,
}

fn norm_guid(g: &str) -> String {
    g.trim().to_ascii_lowercase()
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
        let mut storages = storage_data.children_named("Storage");
        let storage = storages.next().ok_or("no <StorageData/Storage> element")?;
        if storages.next().is_some() {
            return Err("unsupported: more than one <Storage> (split image)".into());
        }
        if number(storage, "Start", "Storage")?.unwrap_or(0) != 0 {
            return Err("unsupported: Storage/Start is not 0 (split image)".into());
        }
        let block_sectors = number(storage, "Blocksize", "Storage")?;
        let images = storage
            .children_named("Image")
            .map(image_entry)
            .collect::<Result<Vec<_>, _>>()?;
        if images.is_empty() {
            return Err("no <Image> in <StorageData/Storage>".into());
        }
        // Two files under one GUID would make the chain depend on which one is found first.
        let mut guids = HashSet::new();
        if let Some(dup) = images.iter().find(|i| !guids.insert(i.guid.as_str())) {
            return Err(format!(
                "StorageData/Storage/Image GUID {} is listed more than once",
                dup.guid
            ));
        }
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
            block_sectors,
            images,
            top_guid,
            shots,
        })
    }

    /// Indexes into `images` from the top delta down to the root. Refuses GUIDs that are
    /// referenced but not listed, cycles, and chains deeper than [`MAX_CHAIN_DEPTH`].
    pub fn chain(&self) -> Result<Vec<usize>, String> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut guid = self.top_guid.clone();
        loop {
            if !seen.insert(guid.clone()) {
                return Err(format!("cycle in the snapshot chain at GUID {guid}"));
            }
            if order.len() >= MAX_CHAIN_DEPTH {
                return Err(format!(
                    "snapshot chain is deeper than {MAX_CHAIN_DEPTH} deltas"
                ));
            }
            let index = self
                .images
                .iter()
                .position(|i| i.guid == guid)
                .ok_or_else(|| {
                    format!("GUID {guid} is referenced but not listed in StorageData")
                })?;
            order.push(index);
            let parent = match self.shots.iter().find(|(g, _)| *g == guid) {
                Some((_, p)) => p.clone(),
                // ploop itself treats a lone image without a Shot as the root.
                None if self.images.len() == 1 => NONE_GUID.to_string(),
                None => return Err(format!("GUID {guid} has no <Shot> entry")),
            };
            if parent == NONE_GUID {
                return Ok(order);
            }
            guid = parent;
        }
    }
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

/// Refuse encrypted disks: the data would read as noise.
fn check_encryption(root: &Element) -> Result<(), String> {
    let params = root.child("Disk_Parameters");
    for enc in params
        .into_iter()
        .chain(Some(root))
        .flat_map(|p| p.children_named("Encryption"))
    {
        let engine = enc.child_text("Engine").unwrap_or("");
        if !engine.is_empty() && engine != "0" {
            return Err(format!(
                "unsupported: the disk is encrypted (Encryption/Engine {engine:?})"
            ));
        }
        if enc.child_text("KeyId").is_some_and(|k| !k.is_empty()) {
            return Err("unsupported: the disk is encrypted (Encryption/KeyId is set)".into());
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
        None if head.len() < super::PROBE_LEN => Ok(false),
        None => {
            let len = super::file_len(path, file)?;
            let mut more = vec![0u8; usize::try_from(len).unwrap_or(PROBE_MAX).min(PROBE_MAX)];
            super::read_exact_at(file, &mut more, 0).map_err(|e| FormatError::io(path, e))?;
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
    let file = super::open_image_file(path)?;
    let len = super::file_len(path, &file)?;
    if len > xml::MAX_BYTES as u64 {
        return Err(FormatError::corrupt(
            path,
            format!("descriptor is {len} bytes, larger than the 1 MiB limit"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    super::read_exact_at(&file, &mut bytes, 0).map_err(|e| FormatError::io(path, e))?;
    let root = xml::parse(&bytes).map_err(|w| FormatError::corrupt(path, w))?;
    Descriptor::from_xml(&root).map_err(|w| FormatError::corrupt(path, w))
}

/// Resolve an `Image/File` against the folder of the real descriptor (a symlinked
/// DiskDescriptor.xml names the files next to its target, as ploop reads it), refusing
/// anything outside that folder. Returns the canonical path that was checked, so the file
/// opened is the one checked.
fn image_path(xml_path: &Path, file: &str) -> Result<PathBuf, FormatError> {
    let rel = Path::new(file);
    let outside = || {
        FormatError::corrupt(
            xml_path,
            format!("Image File {file:?} is outside the descriptor's folder"),
        )
    };
    if rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(outside());
    }
    let real_xml = xml_path
        .canonicalize()
        .map_err(|e| FormatError::io(xml_path, e))?;
    // A canonical file path always has a parent folder.
    let canon_dir = real_xml.parent().unwrap_or(Path::new("/"));
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
    let file = super::open_image_file(&path)?;
    let head = super::read_head(&path, &file)?;
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

/// Open the chain a DiskDescriptor.xml describes.
pub fn open_chain(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockSource>, FormatError> {
    let _ = opts;
    // Read the descriptor that image paths are resolved against, even if a symlink
    // pointing to it is swapped meanwhile.
    let real = path.canonicalize().map_err(|e| FormatError::io(path, e))?;
    let desc = read_descriptor(&real)?;
    let order = desc.chain().map_err(|w| FormatError::corrupt(path, w))?;
    let disk_size = desc.disk_sectors * SECTOR_SIZE;
    // Blocksize 0 says nothing; ploop deltas must agree with any other value.
    let block_sectors = desc.block_sectors.filter(|&b| b > 0);
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
    let mut seen = std::collections::HashSet::new();
    let mut bat_bytes: u64 = 0;
    for (depth, &index) in order.iter().enumerate() {
        let is_base = depth + 1 == order.len();
        let delta = open_delta(&real, &desc.images[index])?;
        check_delta(&delta, disk_size, &mut cluster_size, is_base)?;
        // Several GUIDs naming one file would multiply its BAT in memory for nothing.
        let id = std::fs::metadata(delta.path())
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| FormatError::io(delta.path(), e))?;
        if !seen.insert(id) {
            return Err(FormatError::corrupt(
                delta.path(),
                format!("listed twice in the chain of {}", path.display()),
            ));
        }
        if delta.plain_len().is_none() {
            let clusters = disk_size.div_ceil(cluster_size.filter(|&c| c > 0).unwrap_or(1 << 20));
            bat_bytes = bat_bytes.saturating_add(clusters.saturating_mul(4));
            if bat_bytes > MAX_CHAIN_BAT_BYTES {
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
    Ok(Box::new(Chain::new(deltas, roles, cluster_size, disk_size)))
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
        assert_eq!(d.block_sectors, Some(2048));
        assert_eq!(d.chain().unwrap(), vec![1, 0]);
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

        assert_eq!(d.chain().unwrap(), vec![0, 1]);
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

        assert_eq!(d.chain().unwrap(), vec![0]);
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

        assert_eq!(d.images[0].kind, ImageType::Plain);
    }

    #[test]
    fn image_path_refuses_parent_dir() {
        let dir = tempfile::tempdir().unwrap();
        let xml = dir.path().join("DiskDescriptor.xml");

        let err = image_path(&xml, "../etc/passwd").unwrap_err().to_string();

        assert!(err.contains("outside the descriptor's folder"), "{err}");
    }

    #[test]
    fn image_path_refuses_absolute_outside() {
        let dir = tempfile::tempdir().unwrap();
        let xml = dir.path().join("DiskDescriptor.xml");
        std::fs::write(&xml, "<Parallels_disk_image/>").unwrap();

        let err = image_path(&xml, "/etc/passwd").unwrap_err().to_string();

        assert!(err.contains("outside the descriptor's folder"), "{err}");
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

        let src = open_chain(&xml, &OpenOptions::default()).unwrap();
        let counted =
            super::super::count_allocated(&*src, super::super::MAX_COUNTED_EXTENTS).unwrap();
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

        let err = open_chain(&xml, &OpenOptions::default())
            .err()
            .unwrap()
            .to_string();

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
            let head = super::super::read_head(p, &f).unwrap();
            probe(p, &f, &head).unwrap()
        };

        assert!(probe_file(&long));
        assert!(!probe_file(&endless));
    }
}
