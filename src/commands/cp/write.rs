//! The second step of a copy: create what the plan holds, every write relative to an
//! open directory (see [`super::dest`]), each file under a temporary name until whole.

use super::dest::{self, Dir, Present};
use super::order::Tree;
use super::plan::{check_item, leaf, Item, Plan};
use super::progress::Progress;
use super::{show, CopyOptions, CopyStats, CpError};
use super::{HOLE_BLOCK, KEPT_MODE, PART_PREFIX, WORK_DIR_MODE};
use crate::agent_client::{FileSink, GuestFs};
use crate::bulk::MAP_MIN;
use crate::{trace, Error, Result};
use imgsafe_proto::{Entry, FileMap, FileType};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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

/// Regular files of one directory waiting to be read in one batch, by plan index.
type Batch = super::batch::Batch<usize>;

/// Whether `item` belongs to another directory than the files waiting in `batch`.
fn other_dir(batch: &Batch, plan: &Plan, item: &Item) -> bool {
    batch.first().is_some_and(|&i| {
        let p = &plan.items[i].path;
        p[..p.len() - 1] != item.path[..item.path.len() - 1]
    })
}

/// Read the files of `batch` into `parent`, each under a temporary name, then renamed.
fn run_batch(
    fs: &mut dyn GuestFs,
    plan: &Plan,
    batch: &mut Batch,
    parent: &Dir,
    ctx: &mut Ctx<'_>,
) -> Result<()> {
    let Some((items, requests)) = batch.take() else {
        return Ok(());
    };
    let mut sink = CopySink {
        plan,
        items: &items,
        parent,
        ctx,
        current: None,
    };
    fs.read_files(&requests, &mut sink)
}

/// What the second pass carries along.
struct Ctx<'a> {
    opts: &'a CopyOptions,
    progress: &'a mut Progress,
    stats: CopyStats,
}

/// A file being written under its temporary name; removed on drop unless committed.
struct Part<'a> {
    parent: &'a Dir,
    name: Vec<u8>,
    file: File,
    done: bool,
}

impl<'a> Part<'a> {
    /// A fresh temporary file in `parent`, once `name` is known to be free or replaceable.
    fn create(parent: &'a Dir, name: &[u8], opts: &CopyOptions, shown: &str) -> Result<Self> {
        let err = |source: io::Error| CpError::Write {
            path: shown.to_string(),
            source,
        };
        if parent.lookup(name).map_err(err)?.is_some() {
            check_replaceable(parent, name, opts, shown)?;
        }
        let (name, file) = create_part(parent).map_err(err)?;
        Ok(Part {
            parent,
            name,
            file,
            done: false,
        })
    }

    /// Give the file its length, mode and mtime and rename it to `name`.
    fn commit(mut self, name: &[u8], e: &Entry, opts: &CopyOptions, shown: &str) -> Result<()> {
        let err = |source: io::Error| CpError::Write {
            path: shown.to_string(),
            source,
        };
        // Trailing zeros were skipped as a hole: give the file its full length.
        self.file.set_len(e.size).map_err(err)?;
        dest::set_mode_mtime(&self.file, e.mode & KEPT_MODE, e.mtime, e.mtime_nsec).map_err(err)?;
        self.parent
            .rename(&self.name, name, opts.force)
            .map_err(|x| match x.raw_os_error() {
                // Appeared since the check in `create`.
                Some(libc::EEXIST) => Error::from(CpError::Exists {
                    path: shown.to_string(),
                }),
                _ => err(x).into(),
            })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Part<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.parent.unlink(&self.name);
        }
    }
}

/// Write `buf` at `at`, leaving blocks of zeros as holes.
fn put_at(file: &File, at: u64, buf: &[u8]) -> io::Result<()> {
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
        if !hole {
            file.write_all_at(&buf[i..j], at + i as u64)?;
        }
        i = j;
    }
    Ok(())
}

/// The file being streamed: bounded by the size the walk announced.
struct Streaming<'a> {
    item: usize,
    /// The size the walk announced: the stream may not be longer.
    limit: u64,
    part: Part<'a>,
    written: u64,
    overflow: bool,
    failed: Option<io::Error>,
}

/// Receives the files of one batch (see [`FileSink`]).
struct CopySink<'p, 'c, 'o> {
    plan: &'p Plan,
    items: &'p [usize],
    parent: &'p Dir,
    ctx: &'c mut Ctx<'o>,
    current: Option<Streaming<'p>>,
}

impl<'p> CopySink<'p, '_, '_> {
    fn item(&self, i: usize) -> &'p Item {
        let plan: &'p Plan = self.plan;
        &plan.items[self.items[i]]
    }
}

impl FileSink for CopySink<'_, '_, '_> {
    fn begin(&mut self, i: usize, _announced: u64) -> Result<()> {
        // The walk's size is the one checked: the stream must match it exactly.
        self.current = None;
        let item = self.item(i);
        let part = Part::create(
            self.parent,
            leaf(item),
            self.ctx.opts,
            &self.plan.shown(item),
        )?;
        self.current = Some(Streaming {
            item: i,
            limit: item.entry.size,
            part,
            written: 0,
            overflow: false,
            failed: None,
        });
        Ok(())
    }

    fn data(&mut self, d: &[u8]) -> io::Result<()> {
        let Some(s) = self.current.as_mut() else {
            return Err(io::Error::other("data outside a file"));
        };
        let n = d.len() as u64;
        if s.written.checked_add(n).is_none_or(|end| end > s.limit) {
            s.overflow = true;
            return Err(io::Error::other("stream longer than the file's size"));
        }
        if let Err(e) = put_at(&s.part.file, s.written, d) {
            let kind = e.kind();
            s.failed = Some(e);
            return Err(kind.into());
        }
        s.written += n;
        self.ctx.progress.add(n);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let Some(mut s) = self.current.take() else {
            return Err(Error::guest("file stream without a start"));
        };
        let item = self.item(s.item);
        let (guest, shown) = (self.plan.guest_path(item), self.plan.shown(item));
        if s.overflow {
            return Err(Error::guest(format!(
                "{}: sent more than its size of {} bytes",
                show(&guest),
                item.entry.size
            )));
        }
        if let Some(source) = s.failed.take() {
            return Err(CpError::Write {
                path: shown,
                source,
            }
            .into());
        }
        if s.written != item.entry.size {
            return Err(Error::guest(format!(
                "{}: sent {} bytes for a file of {} bytes",
                show(&guest),
                s.written,
                item.entry.size
            )));
        }
        s.part
            .commit(leaf(item), &item.entry, self.ctx.opts, &shown)?;
        self.ctx.stats.files += 1;
        self.ctx.stats.bytes += s.written;
        Ok(())
    }

    fn mapped(&mut self, i: usize, map: FileMap) -> Result<bool> {
        self.current = None;
        let item = self.item(i);
        let Some(reader) = self.ctx.opts.reader.as_ref() else {
            return Ok(false);
        };
        let (guest, shown) = (self.plan.guest_path(item), self.plan.shown(item));
        let checked = match reader.accept(&map, item.entry.size) {
            Ok(c) => c,
            Err(why) => {
                trace::note(&format!("{}: streamed instead: {why}", show(&guest)));
                return Ok(false);
            }
        };
        let part = Part::create(self.parent, leaf(item), self.ctx.opts, &shown)?;
        let progress = &mut *self.ctx.progress;
        reader
            .copy(&checked, &mut |at, buf| {
                put_at(&part.file, at, buf)?;
                progress.add(buf.len() as u64);
                Ok(())
            })
            .map_err(|source| CpError::Write {
                path: shown.clone(),
                source,
            })?;
        progress.add(item.entry.size - checked.data_bytes());
        part.commit(leaf(item), &item.entry, self.ctx.opts, &shown)?;
        self.ctx.stats.files += 1;
        self.ctx.stats.mapped += 1;
        self.ctx.stats.bytes += item.entry.size;
        Ok(true)
    }
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
    let mut ctx = Ctx {
        opts,
        progress,
        stats: CopyStats::default(),
    };
    let result = apply_items(fs, plan, &mut ctx, &mut tree);
    let mut finished = Ok(());
    for d in tree.finish() {
        let r = finish_dir(d);
        if finished.is_ok() {
            finished = r;
        }
    }
    result?;
    finished?;
    Ok(ctx.stats)
}

/// Create every item of the plan in order, leaving the directories still open in `tree`.
/// Regular files of one directory are read in batches; everything else (and a file of
/// another directory) first reads the files waiting.
fn apply_items(
    fs: &mut dyn GuestFs,
    plan: &Plan,
    ctx: &mut Ctx<'_>,
    tree: &mut Tree<OpenDir>,
) -> Result<()> {
    let mut batch = Batch::default();
    for (index, item) in plan.items.iter().enumerate() {
        let e = &item.entry;
        if e.kind != FileType::Regular || other_dir(&batch, plan, item) {
            let parent = tree.current().map_or(&plan.top, |d| &d.dir);
            run_batch(fs, plan, &mut batch, parent, ctx)?;
        }
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
        let err = |source: io::Error| CpError::Create {
            path: shown.clone(),
            source,
        };
        match e.kind {
            FileType::Directory => {
                let (open, created) = make_dir(parent, name, e, shown)?;
                ctx.stats.dirs += u64::from(created);
                tree.enter(name, open);
            }
            FileType::Regular => {
                let mapped = ctx.opts.reader.is_some() && e.size >= MAP_MIN;
                if batch.push(index, plan.guest_path(item), mapped) {
                    run_batch(fs, plan, &mut batch, parent, ctx)?;
                }
            }
            FileType::Symlink => {
                let target = e.target.as_deref().unwrap_or_default();
                create_replacing(parent, name, ctx.opts, &shown, |d, n| {
                    d.make_symlink(n, target)
                })?;
                parent
                    .set_link_mtime(name, e.mtime, e.mtime_nsec)
                    .map_err(err)?;
                ctx.stats.symlinks += 1;
            }
            other => {
                eprintln!(
                    "imgsafe: warning: skipping {} {}",
                    kind_name(other),
                    show(&plan.guest_path(item))
                );
                ctx.stats.skipped += 1;
            }
        }
    }
    let parent = tree.current().map_or(&plan.top, |d| &d.dir);
    run_batch(fs, plan, &mut batch, parent, ctx)
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
