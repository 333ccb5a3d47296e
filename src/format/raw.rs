//! Raw images: the file is the disk.

use super::{BlockSource, Extent, FormatError, LayerInfo};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
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
        Ok(Raw { path: path.to_path_buf(), file, size })
    }

    /// Find the next data or hole boundary with lseek(SEEK_DATA/SEEK_HOLE); `None` when
    /// the file system does not support it.
    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let off = i64::try_from(offset).ok()?;
        // SAFETY: lseek on a valid fd has no memory-safety preconditions; the shared file
        // position it moves is never used by this type (all reads are positioned).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            None
        } else {
            Some(r as u64)
        }
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
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            // SEEK_DATA from pos: where the next data starts (ENXIO past the last data).
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Some(d) => d.min(end),
                None if self.seek(pos, libc::SEEK_HOLE).is_some() => end, // only a hole remains
                None => {
                    out.push(Extent { offset: pos, length: end - pos, allocated: true });
                    break;
                }
            };
            if data > pos {
                out.push(Extent { offset: pos, length: data - pos, allocated: false });
                pos = data;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE).unwrap_or(end).min(end).max(pos + 1);
            out.push(Extent { offset: pos, length: hole - pos, allocated: true });
            pos = hole;
        }
        Ok(out)
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
