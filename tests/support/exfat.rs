//! Adds files and directories to an exFAT image that mkfs.exfat made, since exfatprogs
//! has no copy-in tool and mounting needs root. Written from the exFAT specification
//! (Microsoft, "exFAT file system specification"): each new file gets contiguous
//! clusters marked in the allocation bitmap and a NoFatChain stream, so the FAT is
//! never touched. fsck.exfat checks the result.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Directory entry types (section 6.2 and 7).
const ENTRY_BITMAP: u8 = 0x81;
const ENTRY_FILE: u8 = 0x85;
const ENTRY_STREAM: u8 = 0xC0;
const ENTRY_NAME: u8 = 0xC1;
/// FileAttributes (7.4.4).
const ATTR_DIRECTORY: u16 = 0x10;
const ATTR_ARCHIVE: u16 = 0x20;
/// GeneralSecondaryFlags: AllocationPossible | NoFatChain (6.3.3).
const STREAM_FLAGS: u8 = 0x03;
/// Name characters per file name entry (7.7.3).
const NAME_CHARS: usize = 15;

/// An exFAT volume being filled.
pub struct ExFat {
    file: File,
    cluster: u64,
    heap: u64,
    bitmap: u64,
    cluster_count: u32,
    root: u32,
}

/// A directory of the volume: its first cluster and size (one cluster for new ones).
#[derive(Clone, Copy)]
pub struct Dir {
    first: u32,
    len: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The 16-bit rotate-and-add checksum the specification uses for sets and names.
fn rot_sum(acc: u16, bytes: impl IntoIterator<Item = u8>) -> u16 {
    bytes.into_iter().fold(acc, |c, b| {
        (if c & 1 != 0 { 0x8000u16 } else { 0 })
            .wrapping_add(c >> 1)
            .wrapping_add(u16::from(b))
    })
}

/// An exFAT timestamp (7.4.8) for seconds since the epoch, in UTC.
fn timestamp(secs: i64) -> u32 {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    ((year - 1980) << 25)
        | (month << 21)
        | (day << 16)
        | ((rem / 3600) << 11)
        | ((rem / 60 % 60) << 5)
        | (rem % 60 / 2)
}

impl ExFat {
    /// Open an image mkfs.exfat made.
    pub fn open(path: &Path) -> ExFat {
        let file = File::options().read(true).write(true).open(path).unwrap();
        let mut bs = [0u8; 512];
        file.read_exact_at(&mut bs, 0).unwrap();
        assert_eq!(&bs[3..11], b"EXFAT   ");
        let sector = 1u64 << bs[108];
        let cluster = sector << bs[109];
        let mut v = ExFat {
            file,
            cluster,
            heap: u64::from(le32(&bs, 88)) * sector,
            bitmap: 0,
            cluster_count: le32(&bs, 92),
            root: le32(&bs, 96),
        };
        let root = v.read(v.offset(v.root), cluster as usize);
        let e = root
            .chunks_exact(32)
            .find(|e| e[0] == ENTRY_BITMAP)
            .expect("no allocation bitmap entry");
        v.bitmap = v.offset(le32(e, 20));
        v
    }

    /// The root directory (the one cluster mkfs.exfat gives it).
    pub fn root(&self) -> Dir {
        Dir {
            first: self.root,
            len: self.cluster,
        }
    }

    fn offset(&self, cluster: u32) -> u64 {
        self.heap + u64::from(cluster - 2) * self.cluster
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.file.read_exact_at(&mut b, off).unwrap();
        b
    }

    /// Mark `n` contiguous free clusters used; returns the first.
    fn allocate(&mut self, n: u32) -> u32 {
        let bytes = self.cluster_count.div_ceil(8) as usize;
        let mut map = self.read(self.bitmap, bytes);
        let free = |m: &[u8], i: u32| m[(i / 8) as usize] & (1 << (i % 8)) == 0;
        let start = (0..=self.cluster_count - n)
            .find(|&s| (s..s + n).all(|i| free(&map, i)))
            .expect("exFAT image full");
        for i in start..start + n {
            map[(i / 8) as usize] |= 1 << (i % 8);
        }
        self.file.write_all_at(&map, self.bitmap).unwrap();
        start + 2
    }

    /// Write the entry set for `name` into the first free slots of `dir`.
    fn add_entry(&mut self, dir: Dir, name: &str, attr: u16, first: u32, len: u64, mtime: i64) {
        let units: Vec<u16> = name.encode_utf16().collect();
        let names = units.len().div_ceil(NAME_CHARS);
        let mut set = vec![0u8; 32 * (2 + names)];
        let ts = timestamp(mtime).to_le_bytes();
        set[0] = ENTRY_FILE;
        set[1] = (1 + names) as u8;
        set[4..6].copy_from_slice(&attr.to_le_bytes());
        for at in [8, 12, 16] {
            set[at..at + 4].copy_from_slice(&ts);
        }
        // UTC offsets valid and zero.
        set[22..25].copy_from_slice(&[0x80; 3]);
        let s = &mut set[32..64];
        s[0] = ENTRY_STREAM;
        s[1] = STREAM_FLAGS;
        s[3] = units.len() as u8;
        let upcased = name
            .chars()
            .flat_map(char::to_uppercase)
            .collect::<String>();
        let hash = rot_sum(0, upcased.encode_utf16().flat_map(|u| u.to_le_bytes()));
        s[4..6].copy_from_slice(&hash.to_le_bytes());
        s[8..16].copy_from_slice(&len.to_le_bytes());
        s[20..24].copy_from_slice(&first.to_le_bytes());
        s[24..32].copy_from_slice(&len.to_le_bytes());
        for (i, chunk) in units.chunks(NAME_CHARS).enumerate() {
            let e = &mut set[64 + 32 * i..96 + 32 * i];
            e[0] = ENTRY_NAME;
            for (j, u) in chunk.iter().enumerate() {
                e[2 + 2 * j..4 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let sum = rot_sum(
            0,
            set.iter()
                .enumerate()
                .filter(|(i, _)| *i != 2 && *i != 3)
                .map(|(_, b)| *b),
        );
        set[2..4].copy_from_slice(&sum.to_le_bytes());
        let base = self.offset(dir.first);
        let entries = self.read(base, dir.len as usize);
        let slot = entries
            .chunks_exact(32)
            .position(|e| e[0] == 0)
            .expect("directory full");
        assert!(
            (slot + 2 + names) * 32 <= dir.len as usize,
            "directory full"
        );
        self.file
            .write_all_at(&set, base + slot as u64 * 32)
            .unwrap();
    }

    /// Add a regular file holding `data` to `dir`.
    pub fn add_file(&mut self, dir: Dir, name: &str, data: &[u8], mtime: i64) {
        let clusters = (data.len() as u64).div_ceil(self.cluster).max(1) as u32;
        let first = self.allocate(clusters);
        self.file.write_all_at(data, self.offset(first)).unwrap();
        self.add_entry(dir, name, ATTR_ARCHIVE, first, data.len() as u64, mtime);
    }

    /// Add an empty directory (one zeroed cluster) to `dir`.
    pub fn add_dir(&mut self, dir: Dir, name: &str, mtime: i64) -> Dir {
        let first = self.allocate(1);
        let zero = vec![0u8; self.cluster as usize];
        self.file.write_all_at(&zero, self.offset(first)).unwrap();
        self.add_entry(dir, name, ATTR_DIRECTORY, first, self.cluster, mtime);
        Dir {
            first,
            len: self.cluster,
        }
    }
}
