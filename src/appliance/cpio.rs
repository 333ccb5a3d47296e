//! A writer for the "newc" cpio format, the one the Linux kernel unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// newc magic: ASCII header with hexadecimal fields, no checksum.
const MAGIC: &str = "070701";
/// Name of the record that ends the archive.
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams entries into a cpio archive. All entries are owned by root with mtime 0, so
/// the archive depends only on its contents.
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    dirs: HashSet<String>,
}

impl<W: Write> Writer<W> {
    /// Start an archive.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            ino: 1,
            dirs: HashSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u32) -> io::Result<()> {
        self.header_rdev(name, mode, size, (0, 0))
    }

    fn header_rdev(
        &mut self,
        name: &str,
        mode: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> io::Result<()> {
        let namesize = name.len() + 1;
        let hdr = format!(
            "{MAGIC}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.ino += 1;
        self.out.write_all(hdr.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + namesize)
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let pad = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])
    }

    /// Add a directory (once; repeated calls are ignored).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        if self.dirs.insert(name.to_string()) {
            self.header(name, S_IFDIR | perm, 0)?;
        }
        Ok(())
    }

    /// Add every missing parent directory of `rel`.
    pub fn parents(&mut self, rel: &Path) -> io::Result<()> {
        let mut acc = String::new();
        if let Some(parent) = rel.parent() {
            for c in parent.components() {
                if !acc.is_empty() {
                    acc.push('/');
                }
                acc.push_str(&c.as_os_str().to_string_lossy());
                self.dir(&acc.clone(), 0o755)?;
            }
        }
        Ok(())
    }

    /// Add a regular file with the given bytes.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        self.header(name, S_IFREG | perm, size)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    /// Add a regular file copied from the host (following symlinks).
    pub fn file_from(&mut self, name: &str, perm: u32, src: &Path) -> io::Result<()> {
        let mut f = File::open(src)?;
        let len = f.metadata()?.len();
        let size = u32::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        self.header(name, S_IFREG | perm, size)?;
        let copied = io::copy(&mut io::Read::take(&mut f, len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while copied", src.display()),
            ));
        }
        self.pad(len as usize)
    }

    /// Add a character device node. Writing the archive entry needs no privilege; the
    /// kernel creates the node when it unpacks the initramfs.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header_rdev(name, S_IFCHR | perm, 0, (major, minor))
    }

    /// Add a symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, target.len() as u32)?;
        self.out.write_all(target.as_bytes())?;
        self.pad(target.len())
    }

    /// Write the trailer and return the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 0)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_four_byte_aligned_and_trailer_ends() {
        let mut w = Writer::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file("etc/x", 0o644, b"hello").unwrap();
        w.symlink("l", "etc/x").unwrap();

        let out = w.finish().unwrap();

        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("etc/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn archive_unpacks_with_cpio_tool() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(Vec::new());
        w.parents(Path::new("a/b/c.txt")).unwrap();
        w.file("a/b/c.txt", 0o600, b"content\n").unwrap();
        w.symlink("a/link", "b/c.txt").unwrap();
        let archive = w.finish().unwrap();
        let cpio_path = dir.path().join("x.cpio");
        std::fs::write(&cpio_path, &archive).unwrap();
        let unpack = dir.path().join("out");
        std::fs::create_dir(&unpack).unwrap();

        let status = std::process::Command::new("cpio")
            .args(["-idm", "--quiet", "-F"])
            .arg(&cpio_path)
            .current_dir(&unpack)
            .status()
            .expect("cpio not found: install the Debian package cpio");

        assert!(status.success());
        assert_eq!(
            std::fs::read(unpack.join("a/b/c.txt")).unwrap(),
            b"content\n"
        );
        assert_eq!(
            std::fs::read_link(unpack.join("a/link")).unwrap(),
            Path::new("b/c.txt")
        );
    }
}
