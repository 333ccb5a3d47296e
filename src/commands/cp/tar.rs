//! `imgsafe cp IMAGE:/PATH... -`: the tree as a POSIX pax tar stream on stdout (like
//! `virt-tar-out`), for `imgsafe cp img:/etc - | tar -xf - -C out`.
//!
//! Names are checked exactly as for a directory destination (the walk must be a proper
//! pre-order listing of single, safe components), all of it before the first byte is
//! written. Member names are relative (`etc/hosts`; the image root's entries for `/`).
//! A pax extended header carries what ustar cannot: long names and link targets (as
//! their bytes, UTF-8 or not, as GNU tar and Python's tarfile read them; no
//! `hdrcharset`, which GNU tar warns about), large sizes, uids and gids, and sub-second
//! mtimes. Permission bits are kept and set-id and sticky
//! bits dropped, as `cp` does. Holes are written as zeros (the archive is not sparse).

use super::batch::Batch;
use super::order::Tree;
use super::plan::{check_entry, collect, guest_path, leaf, stat_sources, Item, Source};
use super::progress::Progress;
use super::write::kind_name;
use super::{show, CopyStats, CpError, KEPT_MODE};
use crate::agent_client::{FileSink, GuestFs};
use crate::bulk::{HostReader, MAP_MIN};
use crate::{trace, Error, Result};
use imgsafe_proto::{FileMap, FileType};
use std::io::{self, Write};

/// Size of a tar block (POSIX ustar).
const BLOCK: usize = 512;

/// The pax records and ustar header of one member.
struct Member<'a> {
    /// Path in the archive, `/`-separated (a directory's without its trailing `/`).
    path: Vec<u8>,
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    mtime_nsec: u32,
    link: Option<&'a [u8]>,
}

/// One pax record, `"%d %s=%s\n"`, whose length counts its own digits.
fn record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut n = rest + rest.to_string().len();
    if n.to_string().len() != (n - rest) {
        n += 1;
    }
    let mut r = format!("{n} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// Write `v` as a NUL-terminated octal field of `field.len()` bytes; false if too big.
fn octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() > digits {
        field[..digits].fill(b'0');
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

/// Whether `b` fits a ustar name field as it is (bytes as they are: GNU tar and Python's
/// tarfile both take a name's bytes from there, UTF-8 or not).
fn plain(b: &[u8], max: usize) -> bool {
    b.len() <= max
}

impl Member<'_> {
    /// The header blocks: a pax `x` header if needed, then the ustar header.
    fn header(&self) -> Vec<u8> {
        let mut name = self.path.clone();
        if self.kind == b'5' {
            name.push(b'/');
        }
        let mut pax = Vec::new();
        if !plain(&name, 100) {
            pax.extend(record("path", &name));
        }
        if let Some(l) = self.link.filter(|l| !plain(l, 100)) {
            pax.extend(record("linkpath", l));
        }
        let mut h = [0u8; BLOCK];
        let short: Vec<u8> = name.iter().copied().take(100).collect();
        h[..short.len()].copy_from_slice(&short);
        octal(&mut h[100..108], u64::from(self.mode));
        if !octal(&mut h[108..116], u64::from(self.uid)) {
            pax.extend(record("uid", self.uid.to_string().as_bytes()));
        }
        if !octal(&mut h[116..124], u64::from(self.gid)) {
            pax.extend(record("gid", self.gid.to_string().as_bytes()));
        }
        if !octal(&mut h[124..136], self.size) {
            pax.extend(record("size", self.size.to_string().as_bytes()));
        }
        let fits = self.mtime >= 0 && octal(&mut h[136..148], self.mtime as u64);
        if !fits || self.mtime_nsec != 0 {
            let t = if self.mtime_nsec == 0 {
                self.mtime.to_string()
            } else if self.mtime >= 0 {
                format!("{}.{:09}", self.mtime, self.mtime_nsec)
            } else {
                // -1.25 s is -2 s + 0.75 s: the fraction counts up from the second below.
                let (s, ns) = (self.mtime + 1, 1_000_000_000 - self.mtime_nsec);
                format!("-{}.{ns:09}", -s)
            };
            pax.extend(record("mtime", t.as_bytes()));
            if !fits {
                octal(&mut h[136..148], 0);
            }
        }
        h[156] = self.kind;
        if let Some(l) = self.link {
            let short: Vec<u8> = l.iter().copied().take(100).collect();
            h[157..157 + short.len()].copy_from_slice(&short);
        }
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        checksum(&mut h);
        let mut out = Vec::with_capacity(3 * BLOCK + pax.len());
        if !pax.is_empty() {
            let mut x = [0u8; BLOCK];
            let xname = b"PaxHeaders/member";
            x[..xname.len()].copy_from_slice(xname);
            octal(&mut x[100..108], 0o644);
            octal(&mut x[108..116], 0);
            octal(&mut x[116..124], 0);
            octal(&mut x[124..136], pax.len() as u64);
            octal(&mut x[136..148], 0);
            x[156] = b'x';
            x[257..263].copy_from_slice(b"ustar\0");
            x[263..265].copy_from_slice(b"00");
            checksum(&mut x);
            out.extend_from_slice(&x);
            out.extend_from_slice(&pax);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        out.extend_from_slice(&h);
        out
    }
}

/// Fill in a header's checksum (the sum of its bytes, the field counted as spaces).
fn checksum(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

/// The member for an item of the walk.
fn member(item: &Item) -> Member<'_> {
    let e = &item.entry;
    let kind = match e.kind {
        FileType::Directory => b'5',
        FileType::Symlink => b'2',
        _ => b'0',
    };
    Member {
        path: item.path.join(&b'/'),
        kind,
        mode: e.mode & KEPT_MODE,
        uid: e.uid,
        gid: e.gid,
        size: if kind == b'0' { e.size } else { 0 },
        mtime: e.mtime,
        mtime_nsec: e.mtime_nsec,
        link: e.target.as_deref().filter(|_| kind == b'2'),
    }
}

/// Receives the files of one batch and writes them as members.
struct TarSink<'w, 'a> {
    w: &'w mut TarWriter<'a>,
    items: Vec<&'a Item>,
    /// The member being streamed, and its bytes so far.
    current: Option<(usize, u64)>,
    failed: Option<io::Error>,
}

impl TarSink<'_, '_> {
    fn output(&self, source: io::Error) -> Error {
        CpError::Output { source }.into()
    }

    fn pad(&mut self, size: u64) -> Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.w
                .out
                .write_all(&[0u8; BLOCK][..BLOCK - rem])
                .map_err(|e| self.output(e))?;
        }
        Ok(())
    }
}

impl FileSink for TarSink<'_, '_> {
    fn begin(&mut self, i: usize, _announced: u64) -> Result<()> {
        let h = member(self.items[i]).header();
        self.w.out.write_all(&h).map_err(|e| self.output(e))?;
        self.current = Some((i, 0));
        Ok(())
    }

    fn data(&mut self, d: &[u8]) -> io::Result<()> {
        let Some((i, n)) = self.current.as_mut() else {
            return Err(io::Error::other("data outside a file"));
        };
        let size = self.items[*i].entry.size;
        if *n + d.len() as u64 > size {
            return Err(io::Error::other("stream longer than the file's size"));
        }
        if let Err(e) = self.w.out.write_all(d) {
            let kind = e.kind();
            self.failed = Some(e);
            return Err(kind.into());
        }
        *n += d.len() as u64;
        self.w.progress.add(d.len() as u64);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let Some((i, n)) = self.current.take() else {
            return Err(Error::guest("file stream without a start"));
        };
        if let Some(e) = self.failed.take() {
            return Err(self.output(e));
        }
        let item = self.items[i];
        if n != item.entry.size {
            return Err(Error::guest(format!(
                "{}: sent a stream of another size than its {} bytes",
                show(&guest_path(self.w.sources, item)),
                item.entry.size
            )));
        }
        self.w.stats.files += 1;
        self.w.stats.bytes += n;
        self.pad(n)
    }

    fn mapped(&mut self, i: usize, map: FileMap) -> Result<bool> {
        let item = self.items[i];
        let Some(reader) = self.w.reader else {
            return Ok(false);
        };
        let checked = match reader.accept(&map, item.entry.size) {
            Ok(c) => c,
            Err(why) => {
                let g = show(&guest_path(self.w.sources, item));
                trace::note(&format!("{g}: streamed instead: {why}"));
                return Ok(false);
            }
        };
        let h = member(item).header();
        self.w.out.write_all(&h).map_err(|e| self.output(e))?;
        reader
            .copy_stream(&checked, self.w.out)
            .map_err(|e| self.output(e))?;
        self.w.progress.add(item.entry.size);
        self.w.stats.files += 1;
        self.w.stats.mapped += 1;
        self.w.stats.bytes += item.entry.size;
        self.pad(item.entry.size)?;
        Ok(true)
    }
}

/// Write `sources` and the trees below them to `out` as a pax tar stream.
pub(super) fn write_tar(
    fs: &mut dyn GuestFs,
    sources: &[Vec<u8>],
    out: &mut dyn Write,
    reader: Option<&HostReader>,
    progress_wanted: bool,
) -> Result<CopyStats> {
    let srcs = stat_sources(fs, sources)?;
    let items = collect(fs, &srcs, sources)?;
    // The same order and name checks as for a directory destination, before writing.
    let mut tree: Tree<()> = Tree::new();
    for item in &items {
        tree.step(&item.path).map_err(|e| {
            Error::guest(format!(
                "refusing walk entry {}: {e}",
                show(&guest_path(&srcs, item))
            ))
        })?;
        check_entry(&srcs, item)?;
        if item.entry.kind == FileType::Directory {
            tree.enter(leaf(item), ());
        }
    }
    let total = items
        .iter()
        .filter(|i| i.entry.kind == FileType::Regular)
        .fold(0u64, |acc, i| acc.saturating_add(i.entry.size));
    let mut w = TarWriter {
        out,
        sources: &srcs,
        reader,
        progress: Progress::new(progress_wanted, total),
        stats: CopyStats::default(),
    };
    let mut batch = Batch::default();
    for item in &items {
        let e = &item.entry;
        if e.kind != FileType::Regular {
            w.run(fs, &mut batch)?;
        }
        match e.kind {
            FileType::Regular => {
                let mapped = reader.is_some() && e.size >= MAP_MIN;
                if batch.push(item, guest_path(&srcs, item), mapped) {
                    w.run(fs, &mut batch)?;
                }
            }
            FileType::Directory | FileType::Symlink => {
                w.out
                    .write_all(&member(item).header())
                    .map_err(|source| CpError::Output { source })?;
                if e.kind == FileType::Directory {
                    w.stats.dirs += 1;
                } else {
                    w.stats.symlinks += 1;
                }
            }
            other => {
                eprintln!(
                    "imgsafe: warning: skipping {} {}",
                    kind_name(other),
                    show(&guest_path(&srcs, item))
                );
                w.stats.skipped += 1;
            }
        }
    }
    w.run(fs, &mut batch)?;
    w.out
        .write_all(&[0u8; 2 * BLOCK])
        .and_then(|()| w.out.flush())
        .map_err(|source| CpError::Output { source })?;
    w.progress.finish();
    Ok(w.stats)
}

/// The archive being written and what it has counted so far.
struct TarWriter<'a> {
    out: &'a mut dyn Write,
    sources: &'a [Source],
    reader: Option<&'a HostReader>,
    progress: Progress,
    stats: CopyStats,
}

impl<'a> TarWriter<'a> {
    /// Read the files waiting in `batch` and write them as members.
    fn run(&mut self, fs: &mut dyn GuestFs, batch: &mut Batch<&'a Item>) -> Result<()> {
        let Some((items, requests)) = batch.take() else {
            return Ok(());
        };
        let mut sink = TarSink {
            w: self,
            items,
            current: None,
            failed: None,
        };
        fs.read_files(&requests, &mut sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_counts_its_own_length() {
        assert_eq!(record("path", b"abc"), b"12 path=abc\n");
        let long = vec![b'x'; 95];

        let r = record("path", &long);

        assert_eq!(r.len().to_string(), String::from_utf8_lossy(&r[..3]));
    }

    #[test]
    fn a_short_ascii_member_has_no_pax_header() {
        let m = Member {
            path: b"etc/hosts".to_vec(),
            kind: b'0',
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 5,
            mtime: 1_600_000_000,
            mtime_nsec: 0,
            link: None,
        };

        let h = m.header();

        assert_eq!(h.len(), BLOCK);
        assert_eq!(&h[..9], b"etc/hosts");
        assert_eq!(&h[257..263], b"ustar\0");
    }

    #[test]
    fn a_long_binary_name_goes_in_a_pax_record() {
        let mut path = vec![b'd'; 150];
        path.extend_from_slice(b"/\xff");
        let m = Member {
            path: path.clone(),
            kind: b'0',
            mode: 0o644,
            uid: 1 << 22,
            gid: 0,
            size: 0,
            mtime: 1,
            mtime_nsec: 5,
            link: None,
        };

        let h = m.header();

        assert_eq!(h[156], b'x');
        let text = &h[BLOCK..];
        let needle = [b"path=".to_vec(), path].concat();
        assert!(text.windows(needle.len()).any(|w| w == needle));
        assert!(text.windows(11).any(|w| w == b"uid=4194304"));
        assert!(text.windows(18).any(|w| w == b"mtime=1.000000005\n"));
    }
}
