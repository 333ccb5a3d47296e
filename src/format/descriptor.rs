//! ploop DiskDescriptor.xml: a chain of ploop deltas.

use super::{BlockSource, FormatError, OpenOptions};
use std::path::Path;

/// True if `head` is an XML document whose root element is `<Parallels_disk_image`.
pub fn probe(head: &[u8]) -> bool {
    let s = String::from_utf8_lossy(head);
    s.trim_start_matches('\u{feff}').trim_start().starts_with("<?xml") && s.contains("<Parallels_disk_image")
}

/// Open the chain a DiskDescriptor.xml describes.
pub fn open_chain(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockSource>, FormatError> {
    let _ = opts;
    Err(FormatError::Unsupported { path: path.to_path_buf(), what: "DiskDescriptor.xml not written yet".into() })
}
