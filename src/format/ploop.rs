//! OpenVZ ploop / Parallels expanding images (v1 and v2 headers).

use super::{BlockSource, FormatError};
use std::fs::File;
use std::path::Path;

/// True if `head` starts with a ploop v1 or v2 header magic.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt")
}

/// Open one ploop file on its own (no chain).
pub fn open_single(path: &Path, file: File) -> Result<Box<dyn BlockSource>, FormatError> {
    let _ = file;
    Err(FormatError::Unsupported { path: path.to_path_buf(), what: "ploop not written yet".into() })
}
