//! Microsoft VHD: fixed, dynamic and differencing disks.

use super::{BlockSource, FormatError, OpenOptions};
use std::fs::File;
use std::path::Path;

/// True if the file has a VHD footer (`conectix`) at its end or a footer copy at offset 0.
pub fn probe(path: &Path, file: &File, head: &[u8]) -> Result<bool, FormatError> {
    let _ = (path, file);
    Ok(head.starts_with(b"conectix"))
}

/// Open a VHD file (and, for differencing disks, its parent chain).
pub fn open(path: &Path, file: File, opts: &OpenOptions) -> Result<Box<dyn BlockSource>, FormatError> {
    let _ = (file, opts);
    Err(FormatError::Unsupported { path: path.to_path_buf(), what: "VHD not written yet".into() })
}
