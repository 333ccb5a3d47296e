//! Raw images: the file is the disk.

use super::{BlockSource, Extent, FormatError, LayerInfo};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A raw disk image.
pub struct Raw {
    path: PathBuf,
    file: File,
    size: u64,
}

impl Raw {
    /// Wrap an already opened file.
    pub fn new(path: &Path, file: File) -> Result<Self, FormatError> {
        let size = super::file_len(path, &file)?;
        Ok(Raw {
            path: path.to_path_buf(),
            file,
            size,
        })
    }
}

impl BlockSource for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::check_read(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        Ok(super::file_extents(&self.file, offset, end))
    }

    fn layers(&self) -> Vec<LayerInfo> {
        vec![LayerInfo {
            path: self.path.clone(),
            format: "raw".into(),
            version: None,
            role: "image".into(),
            cluster_size: None,
            allocated_bytes: None,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_bytes_at_offset() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"0123456789").unwrap();
        let raw = Raw::new(f.path(), File::open(f.path()).unwrap()).unwrap();
        let mut buf = [0u8; 4];

        raw.read_at(&mut buf, 3).unwrap();

        assert_eq!(&buf, b"3456");
    }

    #[test]
    fn refuses_read_past_end() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"0123456789").unwrap();
        let raw = Raw::new(f.path(), File::open(f.path()).unwrap()).unwrap();
        let mut buf = [0u8; 4];

        let err = raw.read_at(&mut buf, 8).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn sparse_file_reports_hole() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 << 20).unwrap();
        f.as_file().write_all_at(&[1u8; 4096], 0).unwrap();
        let raw = Raw::new(f.path(), File::open(f.path()).unwrap()).unwrap();

        let ext = raw.extents(0, 4 << 20).unwrap();

        assert!(ext[0].allocated);
        assert!(ext.iter().any(|e| !e.allocated));
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 4 << 20);
    }
}
