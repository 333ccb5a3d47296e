//! The bulk data path: the host reads a file's bytes itself from the decoded image, at
//! the places the guest says they are (DESIGN.md, "The bulk data path").
//!
//! What this trusts: only that the guest's map points at the file's bytes. A map is only
//! ever a list of ranges of the image the user asked to read, so a lying guest can at
//! most make the host copy other bytes of that same image, which a lying guest streaming
//! the file could do anyway. Still, every map is checked before use ([`check`]): a
//! bounded number of extents, in file order, not overlapping in the file or on the disk,
//! aligned to 512-byte sectors, inside the disk, within the file's size, on the disk
//! this session serves. Then the file's first and last 64 KiB as read from the image are
//! hashed and compared with the hash the guest computed reading them through its
//! filesystem ([`verify_edges`]); a map that fails either check is not used and the file
//! is streamed through the guest instead.

use crate::format::BlockSource;
use imgsafe_proto::{FileMap, MapExtent, MAP_EDGE, MAX_MAP_EXTENTS};
use sha2::{Digest, Sha256};
use std::io;
use std::sync::mpsc;
use std::sync::Arc;

pub use imgsafe_proto::MAP_MIN;
/// Size of one read from the image.
const READ_CHUNK: u64 = 4 << 20;
/// Chunks read ahead of the writer.
const READ_AHEAD: usize = 4;
/// Sector size every extent is aligned to.
const SECTOR: u64 = 512;

/// The image disk as the host reads it for the bulk path.
#[derive(Clone)]
pub struct HostReader {
    source: Arc<dyn BlockSource>,
    serial: String,
}

/// Why a map was not used (said with `-v`; the file is streamed instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// The map is for another size than the file has.
    #[error("map is for {map} bytes, the file has {file}")]
    Size { map: u64, file: u64 },
    /// The map points into another disk.
    #[error("map is for disk {0:?}, not the image's")]
    Disk(String),
    /// More extents than the limit or than the file has sectors.
    #[error("{0} extents")]
    TooMany(usize),
    /// An empty or unaligned extent.
    #[error("extent at {0} is empty or not sector-aligned")]
    Unaligned(u64),
    /// Extents out of file order or overlapping in the file.
    #[error("extent at {0} overlaps or is out of order")]
    Order(u64),
    /// An extent with data past the file's end.
    #[error("extent at {0} starts past the end of the file")]
    PastEnd(u64),
    /// An extent outside the disk.
    #[error("extent at {0} is outside the disk")]
    OutsideDisk(u64),
    /// Two extents on the same disk bytes.
    #[error("extents share disk bytes at {0}")]
    Shared(u64),
    /// The image's bytes at the file's ends are not what the guest read there.
    #[error("the first and last 64 KiB differ from what the guest read")]
    Mismatch,
    /// Reading the image failed.
    #[error("reading the image: {0}")]
    Read(String),
}

/// A checked map: data extents only, clipped to the file's size, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// File size.
    pub size: u64,
    /// (logical, disk offset, length); everything else reads as zeros.
    pub data: Vec<(u64, u64, u64)>,
}

impl Checked {
    /// Bytes the map says hold data.
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|d| d.2).sum()
    }
}

/// Check a guest's map of a file of `size` bytes on the disk `serial` of `disk_size`
/// bytes (see the module doc for the rules).
pub fn check(map: &FileMap, size: u64, serial: &str, disk_size: u64) -> Result<Checked, Reject> {
    if map.size != size {
        return Err(Reject::Size {
            map: map.size,
            file: size,
        });
    }
    if map.disk != serial {
        return Err(Reject::Disk(crate::terminal::printable(
            map.disk.as_bytes(),
        )));
    }
    let n = map.extents.len();
    if n > MAX_MAP_EXTENTS || n as u64 > size / SECTOR + 2 {
        return Err(Reject::TooMany(n));
    }
    let mut data = Vec::with_capacity(n);
    let mut on_disk: Vec<(u64, u64)> = Vec::with_capacity(n);
    let mut next = 0u64;
    for e in &map.extents {
        let MapExtent {
            logical,
            physical,
            length,
            unwritten,
        } = *e;
        if length == 0 || (logical | physical | length) % SECTOR != 0 {
            return Err(Reject::Unaligned(logical));
        }
        if logical < next {
            return Err(Reject::Order(logical));
        }
        let end = logical.checked_add(length).ok_or(Reject::Order(logical))?;
        next = end;
        let disk_end = physical
            .checked_add(length)
            .filter(|&x| x <= disk_size)
            .ok_or(Reject::OutsideDisk(logical))?;
        on_disk.push((physical, disk_end));
        if logical >= size {
            // Preallocated past the end (fallocate --keep-size) reads as nothing.
            if unwritten {
                continue;
            }
            return Err(Reject::PastEnd(logical));
        }
        if !unwritten {
            data.push((logical, physical, end.min(size) - logical));
        }
    }
    on_disk.sort_unstable();
    if let Some(w) = on_disk.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(Reject::Shared(w[1].0));
    }
    Ok(Checked { size, data })
}

impl std::fmt::Debug for HostReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostReader")
            .field("size", &self.source.size())
            .field("serial", &self.serial)
            .finish()
    }
}

impl HostReader {
    /// Read the image `source`, served to the guest as the disk with `serial`.
    pub fn new(source: Arc<dyn BlockSource>, serial: String) -> Self {
        HostReader { source, serial }
    }

    /// Check `map` (see [`check`]) and the file's ends against the guest's hash.
    pub fn accept(&self, map: &FileMap, size: u64) -> Result<Checked, Reject> {
        let c = check(map, size, &self.serial, self.source.size())?;
        self.verify_edges(&c, &map.edge_sha256)?;
        Ok(c)
    }

    /// Fill `buf` with the file's bytes at `off` as the map places them.
    fn read_file_range(&self, c: &Checked, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let end = off + buf.len() as u64;
        for &(logical, physical, len) in &c.data {
            let (s, e) = (logical.max(off), (logical + len).min(end));
            if s < e {
                let dst = &mut buf[(s - off) as usize..(e - off) as usize];
                self.source.read_at(dst, physical + (s - logical))?;
            }
        }
        Ok(())
    }

    /// Compare the hash of the file's first and last [`MAP_EDGE`] bytes read from the
    /// image with the guest's `want`.
    pub fn verify_edges(&self, c: &Checked, want: &[u8]) -> Result<(), Reject> {
        let n = c.size.min(MAP_EDGE) as usize;
        let mut buf = vec![0u8; n];
        let mut h = Sha256::new();
        for off in [0, c.size - n as u64] {
            self.read_file_range(c, off, &mut buf)
                .map_err(|e| Reject::Read(e.to_string()))?;
            h.update(&buf);
        }
        if h.finalize().as_slice() != want {
            return Err(Reject::Mismatch);
        }
        Ok(())
    }

    /// Write the file `c` describes to `out` in order, zeros for its holes.
    pub fn copy_stream(&self, c: &Checked, out: &mut dyn io::Write) -> io::Result<()> {
        let mut pos = 0u64;
        self.copy(c, &mut |at, buf| {
            write_zeros(out, at - pos)?;
            out.write_all(buf)?;
            pos = at + buf.len() as u64;
            Ok(())
        })?;
        write_zeros(out, c.size - pos)
    }

    /// Read every data extent of `c` from the image, in file order, in large reads on a
    /// reader thread while `put(logical offset, bytes)` writes the previous ones. Holes
    /// and unwritten extents are not passed to `put` (they are zeros). The read buffers
    /// go back to the reader once written: a fresh 4 MiB buffer per read cost a mapping,
    /// a page fault per page and an unmapping each time.
    pub fn copy(
        &self,
        c: &Checked,
        put: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        type Filled = io::Result<(u64, Vec<u8>, usize)>;
        let (tx, rx) = mpsc::sync_channel::<Filled>(READ_AHEAD);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        std::thread::scope(|s| {
            s.spawn(move || {
                for &(logical, physical, len) in &c.data {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(READ_CHUNK) as usize;
                        let mut buf = match free_rx.try_recv() {
                            Ok(b) if b.len() >= n => b,
                            _ => vec![0u8; n],
                        };
                        let r = self
                            .source
                            .read_at(&mut buf[..n], physical + done)
                            .map(|()| (logical + done, buf, n));
                        let failed = r.is_err();
                        // The writer went away (its own error): stop reading.
                        if tx.send(r).is_err() || failed {
                            return;
                        }
                        done += n as u64;
                    }
                }
            });
            for r in rx.iter() {
                let (at, buf, n) = r?;
                put(at, &buf[..n])?;
                // The reader may be done already; then the buffer is simply dropped.
                let _ = free_tx.send(buf);
            }
            Ok(())
        })
    }
}

/// Write `n` zero bytes.
fn write_zeros(out: &mut dyn io::Write, mut n: u64) -> io::Result<()> {
    let zeros = [0u8; 64 * 1024];
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..k])?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: u64 = 64 << 20;

    fn ext(logical: u64, physical: u64, length: u64) -> MapExtent {
        MapExtent {
            logical,
            physical,
            length,
            unwritten: false,
        }
    }

    fn map(size: u64, extents: Vec<MapExtent>) -> FileMap {
        FileMap {
            size,
            disk: "imgsafe0".into(),
            extents,
            edge_sha256: Vec::new(),
        }
    }

    fn checked(m: &FileMap) -> Result<Checked, Reject> {
        check(m, m.size, "imgsafe0", DISK)
    }

    #[test]
    fn a_plain_map_is_clipped_to_the_file_size() {
        let m = map(5000, vec![ext(0, 1 << 20, 8192)]);

        let c = checked(&m).unwrap();

        assert_eq!(c.data, vec![(0, 1 << 20, 5000)]);
    }

    #[test]
    fn holes_and_unwritten_extents_are_not_data() {
        let mut pre = ext(8192, 2 << 20, 4096);
        pre.unwritten = true;
        let m = map(
            1 << 20,
            vec![ext(0, 1 << 20, 4096), pre, ext(65536, 3 << 20, 4096)],
        );

        let c = checked(&m).unwrap();

        assert_eq!(c.data, vec![(0, 1 << 20, 4096), (65536, 3 << 20, 4096)]);
    }

    #[test]
    fn lying_guest_extent_outside_the_disk_is_rejected() {
        let m = map(8192, vec![ext(0, DISK - 4096, 8192)]);

        assert_eq!(checked(&m), Err(Reject::OutsideDisk(0)));
    }

    #[test]
    fn lying_guest_extent_wrapping_around_is_rejected() {
        let m = map(8192, vec![ext(0, u64::MAX - 511, 8192)]);

        assert_eq!(checked(&m), Err(Reject::OutsideDisk(0)));
    }

    #[test]
    fn lying_guest_overlap_in_the_file_is_rejected() {
        let m = map(16384, vec![ext(0, 1 << 20, 8192), ext(4096, 2 << 20, 4096)]);

        assert_eq!(checked(&m), Err(Reject::Order(4096)));
    }

    #[test]
    fn lying_guest_overlap_on_the_disk_is_rejected() {
        let m = map(
            16384,
            vec![ext(0, 1 << 20, 8192), ext(8192, (1 << 20) + 4096, 8192)],
        );

        assert_eq!(checked(&m), Err(Reject::Shared((1 << 20) + 4096)));
    }

    #[test]
    fn lying_guest_data_past_the_end_is_rejected() {
        let m = map(4096, vec![ext(0, 1 << 20, 4096), ext(8192, 2 << 20, 4096)]);

        assert_eq!(checked(&m), Err(Reject::PastEnd(8192)));
    }

    #[test]
    fn lying_guest_with_more_extents_than_sectors_is_rejected() {
        let extents = (0..10)
            .map(|i| ext(i * 512, (1 << 20) + i * 512, 512))
            .collect();
        let m = map(1024, extents);

        assert_eq!(checked(&m), Err(Reject::TooMany(10)));
    }

    #[test]
    fn lying_guest_unaligned_extent_is_rejected() {
        let m = map(8192, vec![ext(0, (1 << 20) + 7, 4096)]);

        assert_eq!(checked(&m), Err(Reject::Unaligned(0)));
    }

    #[test]
    fn lying_guest_other_disk_or_size_is_rejected() {
        let m = map(8192, vec![ext(0, 1 << 20, 8192)]);

        assert_eq!(
            check(&m, 8192, "imgsafe1", DISK),
            Err(Reject::Disk("imgsafe0".into()))
        );
        assert_eq!(
            check(&m, 4096, "imgsafe0", DISK),
            Err(Reject::Size {
                map: 8192,
                file: 4096
            })
        );
    }

    /// A disk in memory: byte i is `i % 253`.
    struct Mem(Vec<u8>);

    impl BlockSource for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn layers(&self) -> Vec<crate::format::LayerInfo> {
            Vec::new()
        }
    }

    fn reader() -> HostReader {
        let disk = (0..DISK as usize).map(|i| (i % 253) as u8).collect();
        HostReader::new(Arc::new(Mem(disk)), "imgsafe0".into())
    }

    /// The file the map describes, read straight from the disk.
    fn expected(r: &HostReader, c: &Checked) -> Vec<u8> {
        let mut v = vec![0u8; c.size as usize];
        r.read_file_range(c, 0, &mut v).unwrap();
        v
    }

    fn edge_hash(file: &[u8]) -> Vec<u8> {
        let n = file.len().min(MAP_EDGE as usize);
        let mut h = Sha256::new();
        h.update(&file[..n]);
        h.update(&file[file.len() - n..]);
        h.finalize().to_vec()
    }

    #[test]
    fn edges_that_match_are_accepted_and_copy_yields_the_file() {
        let r = reader();
        let mut m = map(
            (9 << 20) + 100,
            vec![
                ext(0, 1 << 20, 4 << 20),
                ext(5 << 20, 20 << 20, (4 << 20) + 512),
            ],
        );
        let c = checked(&m).unwrap();
        let want = expected(&r, &c);
        m.edge_sha256 = edge_hash(&want);
        let mut got = vec![0u8; want.len()];

        r.accept(&m, m.size).unwrap();
        r.copy(&c, &mut |at, b| {
            got[at as usize..at as usize + b.len()].copy_from_slice(b);
            Ok(())
        })
        .unwrap();

        assert_eq!(got, want);
    }

    #[test]
    fn lying_guest_edges_that_differ_are_rejected() {
        let r = reader();
        let mut m = map(1 << 20, vec![ext(0, 1 << 20, 1 << 20)]);
        m.edge_sha256 = edge_hash(&vec![0u8; 1 << 20]);

        assert_eq!(r.accept(&m, m.size), Err(Reject::Mismatch));
    }
}
