//! The second step of a copy: create what the plan holds, every write relative to an
//! open directory (see [`super::dest`]), each file under a temporary name until whole.

use super::dest::{self, Dir, Present};
use super::order::Tree;
use super::plan::{check_item, leaf, Item, Plan};
use super::progress::Progress;
use super::{show, CopyOptions, CopyStats, CpError};
use super::{HOLE_BLOCK, KEPT_MODE, PART_PREFIX, WORK_DIR_MODE};
use crate::agent_client::GuestFs;
use crate::{Error, Result};
use imgsafe_proto::{Entry, FileType};
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

/// A destination directory being filled.
pub(super) struct OpenDir {
    dir: Dir,
    /// Final mode and mtime, for directories this copy created.
    finish: Option<(u32, i64, u32)>,
    shown: String,
}

fn finish_dir(d: OpenDir) -> Result<()> {
    if let Some((mode, sec, nsec)) = d.finish {
        d.dir
            .set_mode_mtime(mode, sec, nsec)
            .map_err(|source| CpError::FinishDir {
                path: d.shown.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Create (or, if it is already a real directory, open) the directory `name`.
fn make_dir(parent: &Dir, name: &[u8], entry: &Entry, shown: String) -> Result<(OpenDir, bool)> {
    let err = |source: io::Error| CpError::MakeDir {
        path: shown.clone(),
        source,
    };
    let created = match parent.make_dir(name, WORK_DIR_MODE) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => return Err(err(e).into()),
    };
    let dir = parent
        .open_child(name)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => CpError::NotADirectory {
                path: shown.clone(),
            },
            _ => err(e),
        })?;
    if created {
        // The umask may have taken the owner's bits; the copy needs them until the end.
        dir.set_mode(WORK_DIR_MODE).map_err(err)?;
    }
    let finish = created.then_some((entry.mode & KEPT_MODE, entry.mtime, entry.mtime_nsec));
    Ok((OpenDir { dir, finish, shown }, created))
}

/// Whether `name`, already present, may be replaced: only with `--force`, never a
/// directory, never a file of the image being read.
fn check_replaceable(parent: &Dir, name: &[u8], opts: &CopyOptions, shown: &str) -> Result<()> {
    let path = || shown.to_string();
    let err = |source: io::Error| CpError::Inspect {
        path: path(),
        source,
    };
    if !opts.force {
        return Err(CpError::Exists { path: path() }.into());
    }
    if parent.lookup(name).map_err(err)? == Some(Present::Directory) {
        return Err(CpError::IsADirectory { path: path() }.into());
    }
    if parent
        .identity(name)
        .map_err(err)?
        .is_some_and(|id| opts.protected.contains(&id))
    {
        return Err(CpError::ImageFile { path: path() }.into());
    }
    Ok(())
}

/// Run `create` for `name`; if something is there, and it may be replaced, remove it
/// and try once more.
fn create_replacing<T>(
    parent: &Dir,
    name: &[u8],
    opts: &CopyOptions,
    shown: &str,
    create: impl Fn(&Dir, &[u8]) -> io::Result<T>,
) -> Result<T> {
    let err = |source: io::Error| CpError::Create {
        path: shown.to_string(),
        source,
    };
    match create(parent, name) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            check_replaceable(parent, name, opts, shown)?;
            parent.unlink(name).map_err(err)?;
            Ok(create(parent, name).map_err(err)?)
        }
        other => Ok(other.map_err(err)?),
    }
}

/// Create a new file under a fresh temporary name in `parent`; returns the name too.
fn create_part(parent: &Dir) -> io::Result<(Vec<u8>, File)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{PART_PREFIX}{}-{n}", std::process::id()).into_bytes();
        match parent.create_file(&name) {
            Ok(file) => return Ok((name, file)),
            // Left by an earlier copy (killed) or made by someone else: take the next.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copy the regular file `item` to `name` in `parent`: written under a temporary name,
/// given its mode and mtime, then renamed into place. On failure nothing is left.
fn copy_file(
    fs: &mut dyn GuestFs,
    plan: &Plan,
    item: &Item,
    parent: &Dir,
    opts: &CopyOptions,
    progress: &mut Progress,
) -> Result<u64> {
    let (name, e, shown) = (leaf(item), &item.entry, plan.shown(item));
    let err = |source: io::Error| CpError::Write {
        path: shown.clone(),
        source,
    };
    if parent.lookup(name).map_err(err)?.is_some() {
        check_replaceable(parent, name, opts, &shown)?;
    }
    let (part, mut file) = create_part(parent).map_err(err)?;
    let copied = stream(fs, &plan.guest_path(item), &mut file, e, &shown, progress)
        .and_then(|n| {
            dest::set_mode_mtime(&file, e.mode & KEPT_MODE, e.mtime, e.mtime_nsec)
                .map(|_| n)
                .map_err(|x| err(x).into())
        })
        .and_then(|n| {
            parent
                .rename(&part, name, opts.force)
                .map(|_| n)
                .map_err(|x| match x.raw_os_error() {
                    // Appeared since the check above.
                    Some(libc::EEXIST) => CpError::Exists {
                        path: shown.clone(),
                    }
                    .into(),
                    _ => err(x).into(),
                })
        });
    if copied.is_err() {
        let _ = parent.unlink(&part);
    }
    copied
}

/// The destination file being written: bounded by the announced size, holes for zeros.
struct Sink<'a> {
    file: &'a mut File,
    written: u64,
    limit: u64,
    overflow: bool,
    failed: Option<io::Error>,
    progress: &'a mut Progress,
}

impl Sink<'_> {
    fn put(&mut self, buf: &[u8]) -> io::Result<()> {
        let zero = |i: usize| {
            buf[i..buf.len().min(i + HOLE_BLOCK)]
                .iter()
                .all(|&b| b == 0)
        };
        let mut i = 0;
        while i < buf.len() {
            let hole = zero(i);
            let mut j = i;
            while j < buf.len() && zero(j) == hole {
                j = buf.len().min(j + HOLE_BLOCK);
            }
            if hole {
                self.file.seek(SeekFrom::Current((j - i) as i64))?;
            } else {
                self.file.write_all(&buf[i..j])?;
            }
            i = j;
        }
        Ok(())
    }
}

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len() as u64;
        if self
            .written
            .checked_add(n)
            .is_none_or(|end| end > self.limit)
        {
            self.overflow = true;
            return Err(io::Error::other("stream longer than the file's size"));
        }
        if let Err(e) = self.put(buf) {
            let kind = e.kind();
            self.failed = Some(e);
            return Err(io::Error::from(kind));
        }
        self.written += n;
        self.progress.add(n);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Stream the guest file into `file`, checking the length against `entry.size`.
fn stream(
    fs: &mut dyn GuestFs,
    guest: &[u8],
    file: &mut File,
    entry: &Entry,
    shown: &str,
    progress: &mut Progress,
) -> Result<u64> {
    let mut sink = Sink {
        file,
        written: 0,
        limit: entry.size,
        overflow: false,
        failed: None,
        progress,
    };
    let result = fs.read_file(guest, &mut sink);
    if sink.overflow {
        return Err(Error::guest(format!(
            "{}: sent more than its size of {} bytes",
            show(guest),
            entry.size
        )));
    }
    if let Some(e) = sink.failed.take() {
        return Err(CpError::Write {
            path: shown.to_string(),
            source: e,
        }
        .into());
    }
    let n = result?;
    if n != entry.size || sink.written != entry.size {
        return Err(Error::guest(format!(
            "{}: sent {} bytes for a file of {} bytes",
            show(guest),
            sink.written,
            entry.size
        )));
    }
    // Trailing zeros were skipped as a hole: give the file its full length.
    sink.file
        .set_len(entry.size)
        .map_err(|source| CpError::Write {
            path: shown.to_string(),
            source,
        })?;
    Ok(n)
}

/// Second pass: create everything. On failure too, the directories this copy created
/// get their final modes and mtimes (see the module doc).
pub(super) fn apply(
    fs: &mut dyn GuestFs,
    plan: &Plan,
    opts: &CopyOptions,
    progress: &mut Progress,
) -> Result<CopyStats> {
    let mut tree: Tree<OpenDir> = Tree::new();
    let result = apply_items(fs, plan, opts, progress, &mut tree);
    let mut finished = Ok(());
    for d in tree.finish() {
        let r = finish_dir(d);
        if finished.is_ok() {
            finished = r;
        }
    }
    let stats = result?;
    finished?;
    Ok(stats)
}

/// Create every item of the plan in order, leaving the directories still open in `tree`.
fn apply_items(
    fs: &mut dyn GuestFs,
    plan: &Plan,
    opts: &CopyOptions,
    progress: &mut Progress,
    tree: &mut Tree<OpenDir>,
) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    for item in &plan.items {
        for d in tree
            .step(&item.path)
            .map_err(|e| plan.order_error(item, e))?
        {
            finish_dir(d)?;
        }
        check_item(plan, item)?;
        let parent = tree.current().map_or(&plan.top, |d| &d.dir);
        let name = leaf(item);
        let shown = plan.shown(item);
        let e = &item.entry;
        let err = |source: io::Error| CpError::Create {
            path: shown.clone(),
            source,
        };
        match e.kind {
            FileType::Directory => {
                let (open, created) = make_dir(parent, name, e, shown)?;
                stats.dirs += u64::from(created);
                tree.enter(name, open);
            }
            FileType::Regular => {
                stats.bytes += copy_file(fs, plan, item, parent, opts, progress)?;
                stats.files += 1;
            }
            FileType::Symlink => {
                let target = e.target.as_deref().unwrap_or_default();
                create_replacing(parent, name, opts, &shown, |d, n| d.make_symlink(n, target))?;
                parent
                    .set_link_mtime(name, e.mtime, e.mtime_nsec)
                    .map_err(err)?;
                stats.symlinks += 1;
            }
            other => {
                eprintln!(
                    "imgsafe: warning: skipping {} {}",
                    kind_name(other),
                    show(&plan.guest_path(item))
                );
                stats.skipped += 1;
            }
        }
    }
    Ok(stats)
}

pub(super) fn kind_name(k: FileType) -> &'static str {
    match k {
        FileType::Regular => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::CharDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
    }
}
