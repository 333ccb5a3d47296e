//! `imgsafe cp IMAGE:PATH... DEST`: copy files and directory trees out of an image.
//!
//! Behaves like `cp -r --preserve=mode,timestamps --no-dereference`: DEST an existing
//! directory → each source lands as DEST/<its name> (an image root `/` is merged into
//! DEST); otherwise the single source is copied as DEST itself. Regular files are
//! streamed (holes kept: runs of zeros become holes), directories are copied
//! recursively, symlinks stay symlinks, devices/fifos/sockets are skipped with a warning,
//! hard links become separate copies.
//!
//! The guest is hostile (DESIGN.md, trust boundary 3), so:
//! - every name is validated again here, and a bad one aborts the copy naming it;
//! - the walk must be a proper pre-order listing (see [`order`]); anything else aborts;
//! - nothing is written before the whole plan has been checked against DEST: a bad walk
//!   or an existing file (without `--force`) is reported with DEST untouched;
//! - every write is relative to an open directory and never follows a symlink below
//!   DEST (see [`dest`]), so nothing can be created outside DEST;
//! - a file's stream may not be longer or shorter than the size the guest announced.
//!
//! Modes: the permission bits are kept; set-user-id, set-group-id and sticky bits are
//! dropped, because a file from an untrusted image should not arrive with
//! privilege-related bits. Directories are created owner-only while they are filled and
//! get their final mode and mtime once their contents are done. Directories that
//! already existed in DEST are merged into and keep their own mode and mtime.
//!
//! A file is written under a temporary name ([`PART_PREFIX`]) and renamed into place
//! once complete, with its mode and mtime, so a copy cut short (an error, a full disk,
//! SIGKILL) never leaves a partial file under the final name. When a copy fails, what
//! it completed stays, with final modes: the directories it created get their modes and
//! mtimes then too, and the file being written is removed.

mod dest;
mod order;
mod progress;

use crate::agent_client::GuestFs;
use crate::cli::CpArgs;
use crate::session::Session;
use crate::{trace, Error, Result};
use dest::{Dir, Present};
use imgsafe_proto::{validate_name, Entry, FileType, MAX_PATH};
use order::{OrderError, Tree};
use progress::Progress;
use std::fs::File;
use std::io::{self, IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Most entries a copy collects from the guest's walks (bounds memory).
pub const MAX_WALK_ENTRIES: usize = 10_000_000;
/// Most name bytes (path components and symlink targets) a copy collects (bounds memory).
pub const MAX_WALK_BYTES: u64 = 1 << 30;
/// Mode bits kept from the guest: permissions only (no set-id, no sticky).
const KEPT_MODE: u32 = 0o777;
/// Mode of a directory while the copy fills it.
const WORK_DIR_MODE: u32 = 0o700;
/// Name prefix of a file being written, until it is renamed to its own name.
pub const PART_PREFIX: &str = ".imgsafe-part-";
/// Granularity at which runs of zeros become holes in the destination file.
const HOLE_BLOCK: usize = 4096;

/// How to copy.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Replace existing non-directories in DEST (unlink, then create).
    pub force: bool,
    /// Allow a progress bar on stderr (the caller checks that stderr is a terminal).
    pub progress: bool,
    /// (device, inode) of the image's own files: never replaced, even with `force`, so
    /// a copy into the image's folder cannot swap the image for a file from the guest.
    pub protected: Vec<(u64, u64)>,
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created (not counting existing ones merged into).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Devices, fifos and sockets skipped.
    pub skipped: u64,
    /// File bytes copied.
    pub bytes: u64,
}

/// A name or path for a one-line message, safe for a terminal.
fn show(bytes: &[u8]) -> String {
    crate::terminal::printable(bytes)
}

/// One source as the copy sees it.
struct Source {
    /// The guest path without trailing slashes ("" for the root).
    guest: Vec<u8>,
    /// lstat of the source.
    entry: Entry,
    /// Name the source itself gets in the top-level destination directory; None when the
    /// image root is merged into DEST.
    top: Option<Vec<u8>>,
}

/// One thing to create: its path below the top-level destination directory.
struct Item {
    src: usize,
    path: Vec<Vec<u8>>,
    entry: Entry,
}

/// Everything a copy will do, collected and bounded before anything is written.
struct Plan {
    /// The top-level destination directory: DEST, or DEST's parent when DEST is the copy.
    top: Dir,
    /// How to show `top` in messages ("" for the current directory).
    top_shown: String,
    sources: Vec<Source>,
    items: Vec<Item>,
}

impl Plan {
    /// The guest path an item is read from.
    fn guest_path(&self, item: &Item) -> Vec<u8> {
        let src = &self.sources[item.src];
        let rel = if src.top.is_some() {
            item.path.get(1..).unwrap_or(&[])
        } else {
            &item.path[..]
        };
        let mut p = src.guest.clone();
        for c in rel {
            p.push(b'/');
            p.extend_from_slice(c);
        }
        if p.is_empty() {
            p.push(b'/');
        }
        p
    }

    /// The destination path of an item, for messages.
    fn shown(&self, item: &Item) -> String {
        let mut s = self.top_shown.clone();
        for c in &item.path {
            if !s.is_empty() && !s.ends_with('/') {
                s.push('/');
            }
            s.push_str(&show(c));
        }
        s
    }

    fn order_error(&self, item: &Item, e: OrderError) -> Error {
        Error::guest(format!(
            "refusing walk entry {}: {e}",
            show(&self.guest_path(item))
        ))
    }
}

/// The last component of an item's path (checked non-empty by [`Tree::step`]).
fn leaf(item: &Item) -> &[u8] {
    item.path.last().map_or(&[][..], |c| &c[..])
}

/// Split a guest source path into its trimmed form and its last component (None for `/`).
fn source_name(path: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    if path.first() != Some(&b'/') {
        return Err(Error::Other(format!(
            "{}: image paths must start with /",
            show(path)
        )));
    }
    let end = path.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
    let trimmed = &path[..end];
    if trimmed.is_empty() {
        return Ok((Vec::new(), None));
    }
    let name = trimmed.rsplit(|&b| b == b'/').next().unwrap_or(trimmed);
    validate_name(name).map_err(|e| {
        Error::Other(format!(
            "{}: cannot name the copy after its last component ({e})",
            show(path)
        ))
    })?;
    Ok((trimmed.to_vec(), Some(name.to_vec())))
}

/// Where the copies go: DEST itself (None) or DEST's parent and DEST's name.
fn resolve_dest(dest: &Path, sources: &[Source]) -> Result<(Dir, String, Option<Vec<u8>>)> {
    let shown = dest.display().to_string();
    let open_err = |what: &str, e: io::Error| Error::Other(format!("{what}: {e}"));
    match std::fs::metadata(dest) {
        Ok(md) if md.is_dir() => {
            let dir = Dir::open_user(dest).map_err(|e| open_err(&shown, e))?;
            return Ok((dir, shown, None));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(open_err(&shown, e)),
    }
    if sources.len() > 1 {
        return Err(Error::Other(format!(
            "{shown}: not a directory (several sources need an existing directory)"
        )));
    }
    let is_dir = sources
        .first()
        .is_some_and(|s| s.entry.kind == FileType::Directory);
    if dest.as_os_str().as_bytes().ends_with(b"/") && !is_dir {
        return Err(Error::Other(format!("{shown}: not a directory")));
    }
    let Some(name) = dest.file_name() else {
        return Err(Error::Other(format!(
            "{shown}: cannot be the name of a copy"
        )));
    };
    let parent = dest.parent().unwrap_or(Path::new(""));
    let parent_shown = parent.display().to_string();
    let dir = Dir::open_user(parent).map_err(|e| {
        open_err(
            if parent_shown.is_empty() {
                "."
            } else {
                &parent_shown
            },
            e,
        )
    })?;
    Ok((dir, parent_shown, Some(name.as_bytes().to_vec())))
}

/// Counts what the walks have sent, to bound memory.
struct Budget {
    entries: usize,
    bytes: u64,
    max_entries: usize,
    max_bytes: u64,
}

impl Budget {
    fn new(max_entries: usize, max_bytes: u64) -> Self {
        Budget {
            entries: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    fn take(&mut self, path: &[Vec<u8>], entry: &Entry) -> Result<()> {
        self.entries += 1;
        let names: u64 = path.iter().map(|c| c.len() as u64).sum();
        let target = entry.target.as_ref().map_or(0, |t| t.len() as u64);
        self.bytes = self.bytes.saturating_add(names).saturating_add(target);
        if self.entries > self.max_entries {
            return Err(Error::guest(format!(
                "walk has more than {} entries",
                self.max_entries
            )));
        }
        if self.bytes > self.max_bytes {
            return Err(Error::guest(format!(
                "walk has more than {} bytes of names",
                self.max_bytes
            )));
        }
        Ok(())
    }
}

/// Stat every source, choose the destination and collect every walk.
fn make_plan(fs: &mut dyn GuestFs, sources: &[Vec<u8>], dest: &Path) -> Result<Plan> {
    let mut srcs = Vec::with_capacity(sources.len());
    for s in sources {
        let (guest, name) = source_name(s)?;
        let entry = fs.stat(s)?;
        srcs.push(Source {
            guest,
            entry,
            top: name,
        });
    }
    let (top, top_shown, as_name) = resolve_dest(dest, &srcs)?;
    if let Some(name) = as_name {
        srcs[0].top = Some(name);
    }
    let mut items = Vec::new();
    let mut budget = Budget::new(MAX_WALK_ENTRIES, MAX_WALK_BYTES);
    for (i, (src, arg)) in srcs.iter().zip(sources).enumerate() {
        let prefix: Vec<Vec<u8>> = src.top.iter().cloned().collect();
        if let Some(name) = &src.top {
            items.push(Item {
                src: i,
                path: vec![name.clone()],
                entry: src.entry.clone(),
            });
        } else if src.entry.kind != FileType::Directory {
            return Err(Error::guest("the image root is not a directory"));
        }
        if src.entry.kind != FileType::Directory {
            continue;
        }
        fs.walk(arg, &mut |w| {
            if w.path.is_empty() {
                // With the source's own name in front it would pass for the source itself.
                return Err(Error::guest(format!(
                    "refusing walk entry below {}: empty path",
                    show(arg)
                )));
            }
            budget.take(&w.path, &w.entry)?;
            let mut path = prefix.clone();
            path.extend(w.path);
            items.push(Item {
                src: i,
                path,
                entry: w.entry,
            });
            Ok(())
        })?;
    }
    Ok(Plan {
        top,
        top_shown,
        sources: srcs,
        items,
    })
}

/// Refuse entries whose content cannot be used as sent.
fn check_item(plan: &Plan, item: &Item) -> Result<()> {
    let guest = || show(&plan.guest_path(item));
    if item.entry.mtime_nsec >= 1_000_000_000 {
        return Err(Error::guest(format!("{}: invalid timestamp", guest())));
    }
    match item.entry.kind {
        FileType::Symlink => {
            let ok = item
                .entry
                .target
                .as_ref()
                .is_some_and(|t| !t.is_empty() && t.len() <= MAX_PATH && !t.contains(&0));
            if !ok {
                return Err(Error::guest(format!(
                    "{}: missing or invalid symlink target",
                    guest()
                )));
            }
        }
        FileType::Regular if plan.guest_path(item).len() > MAX_PATH => {
            return Err(Error::Other(format!(
                "{}: path longer than {MAX_PATH} bytes, cannot be read",
                guest()
            )));
        }
        _ => {}
    }
    Ok(())
}

/// First pass: check the whole plan against DEST without writing anything.
fn check_plan(plan: &Plan, force: bool) -> Result<()> {
    // Payload: the existing destination directory at this level, if there is one.
    let mut tree: Tree<Option<Dir>> = Tree::new();
    for item in &plan.items {
        tree.step(&item.path)
            .map_err(|e| plan.order_error(item, e))?;
        check_item(plan, item)?;
        let name = leaf(item);
        let parent = match tree.current() {
            None => Some(&plan.top),
            Some(d) => d.as_ref(),
        };
        let present = match parent {
            Some(d) => d
                .lookup(name)
                .map_err(|e| Error::Other(format!("{}: {e}", plan.shown(item))))?,
            None => None,
        };
        let kind = item.entry.kind;
        let existing = match (kind, present, parent) {
            (FileType::Directory, Some(Present::Directory), Some(d)) => Some(
                d.open_child(name)
                    .map_err(|e| Error::Other(format!("{}: {e}", plan.shown(item))))?,
            ),
            (FileType::Directory, Some(_), _) => {
                return Err(Error::Other(format!(
                    "{}: exists and is not a directory",
                    plan.shown(item)
                )));
            }
            (FileType::Regular | FileType::Symlink, Some(Present::Directory), _) => {
                return Err(Error::Other(format!(
                    "{}: is a directory, not replacing it",
                    plan.shown(item)
                )));
            }
            (FileType::Regular | FileType::Symlink, Some(_), _) if !force => {
                return Err(Error::Other(format!(
                    "{}: already exists (use --force to replace it)",
                    plan.shown(item)
                )));
            }
            _ => None,
        };
        if kind == FileType::Directory {
            tree.enter(name, existing);
        }
    }
    Ok(())
}

/// A destination directory being filled.
struct OpenDir {
    dir: Dir,
    /// Final mode and mtime, for directories this copy created.
    finish: Option<(u32, i64, u32)>,
    shown: String,
}

fn finish_dir(d: OpenDir) -> Result<()> {
    if let Some((mode, sec, nsec)) = d.finish {
        d.dir
            .set_mode_mtime(mode, sec, nsec)
            .map_err(|e| Error::Other(format!("{}: {e}", d.shown)))?;
    }
    Ok(())
}

/// Create (or, if it is already a real directory, open) the directory `name`.
fn make_dir(parent: &Dir, name: &[u8], entry: &Entry, shown: String) -> Result<(OpenDir, bool)> {
    let err = |e: io::Error| Error::Other(format!("{shown}: {e}"));
    let created = match parent.make_dir(name, WORK_DIR_MODE) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => return Err(err(e)),
    };
    let dir = parent
        .open_child(name)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                Error::Other(format!("{shown}: exists and is not a directory"))
            }
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
    let err = |e: io::Error| Error::Other(format!("{shown}: {e}"));
    if !opts.force {
        return Err(Error::Other(format!(
            "{shown}: already exists (use --force to replace it)"
        )));
    }
    if parent.lookup(name).map_err(err)? == Some(Present::Directory) {
        return Err(Error::Other(format!(
            "{shown}: is a directory, not replacing it"
        )));
    }
    if parent
        .identity(name)
        .map_err(err)?
        .is_some_and(|id| opts.protected.contains(&id))
    {
        return Err(Error::Other(format!(
            "{shown}: is a file of the image being read, not replacing it"
        )));
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
    let err = |e: io::Error| Error::Other(format!("{shown}: {e}"));
    match create(parent, name) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            check_replaceable(parent, name, opts, shown)?;
            parent.unlink(name).map_err(err)?;
            create(parent, name).map_err(err)
        }
        other => other.map_err(err),
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
    let err = |x: io::Error| Error::Other(format!("{shown}: {x}"));
    if parent.lookup(name).map_err(err)?.is_some() {
        check_replaceable(parent, name, opts, &shown)?;
    }
    let (part, mut file) = create_part(parent).map_err(err)?;
    let copied = stream(fs, &plan.guest_path(item), &mut file, e, &shown, progress)
        .and_then(|n| {
            dest::set_mode_mtime(&file, e.mode & KEPT_MODE, e.mtime, e.mtime_nsec)
                .map(|_| n)
                .map_err(err)
        })
        .and_then(|n| {
            parent
                .rename(&part, name, opts.force)
                .map(|_| n)
                .map_err(|x| match x.raw_os_error() {
                    // Appeared since the check above.
                    Some(libc::EEXIST) => Error::Other(format!(
                        "{shown}: already exists (use --force to replace it)"
                    )),
                    _ => err(x),
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
    failed: Option<String>,
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
            self.failed = Some(e.to_string());
            return Err(e);
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
        return Err(Error::Other(format!("{shown}: {e}")));
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
        .map_err(|e| Error::Other(format!("{shown}: {e}")))?;
    Ok(n)
}

/// Second pass: create everything. On failure too, the directories this copy created
/// get their final modes and mtimes (see the module doc).
fn apply(
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
        let err = |x: io::Error| Error::Other(format!("{shown}: {x}"));
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

fn kind_name(k: FileType) -> &'static str {
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

/// Copy `sources` (absolute guest paths) out of the mounted guest filesystem to `dest`.
/// Nothing is written unless the whole plan checks out; see the module documentation.
pub fn copy_out(
    fs: &mut dyn GuestFs,
    sources: &[Vec<u8>],
    dest: &Path,
    opts: &CopyOptions,
) -> Result<CopyStats> {
    if sources.is_empty() {
        return Err(Error::Other("nothing to copy".into()));
    }
    let plan = make_plan(fs, sources, dest)?;
    check_plan(&plan, opts.force)?;
    let total = plan
        .items
        .iter()
        .filter(|i| i.entry.kind == FileType::Regular)
        .fold(0u64, |acc, i| acc.saturating_add(i.entry.size));
    let mut progress = Progress::new(opts.progress, total);
    let stats = apply(fs, &plan, opts, &mut progress)?;
    progress.finish();
    Ok(stats)
}

/// Split `IMAGE:/PATH` at the first ":/" whose prefix exists as a file or directory (an
/// image path may itself contain ":/"), else at the first ":/".
fn split_source_arg(arg: &str) -> Result<(PathBuf, Vec<u8>)> {
    let mut first = None;
    for (i, _) in arg.match_indices(":/").filter(|&(i, _)| i > 0) {
        if std::fs::symlink_metadata(&arg[..i]).is_ok() {
            return Ok((PathBuf::from(&arg[..i]), arg.as_bytes()[i + 1..].to_vec()));
        }
        first.get_or_insert(i);
    }
    match first {
        Some(i) => Ok((PathBuf::from(&arg[..i]), arg.as_bytes()[i + 1..].to_vec())),
        None => Err(Error::Usage(format!(
            "{arg}: a source must be IMAGE:/PATH (the path in the image starting with /)"
        ))),
    }
}

fn same_image(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// `IMAGE:/PATH... DEST` → the image, the guest paths and DEST.
fn parse_args(args: &[String]) -> Result<(PathBuf, Vec<Vec<u8>>, PathBuf)> {
    let (dest, sources) = match args.split_last() {
        Some((d, s)) if !s.is_empty() => (d, s),
        _ => return Err(Error::Usage("cp needs IMAGE:/PATH... DEST".into())),
    };
    let mut image: Option<PathBuf> = None;
    let mut paths = Vec::with_capacity(sources.len());
    for arg in sources {
        let (img, path) = split_source_arg(arg)?;
        match &image {
            Some(first) if !same_image(first, &img) => {
                return Err(Error::Usage(format!(
                    "all sources must come from the same image ({} and {})",
                    first.display(),
                    img.display()
                )));
            }
            Some(_) => {}
            None => image = Some(img),
        }
        paths.push(path);
    }
    let image = image.ok_or_else(|| Error::Usage("cp needs IMAGE:/PATH... DEST".into()))?;
    Ok((image, paths, PathBuf::from(dest)))
}

/// Run `imgsafe cp`.
pub fn run(args: CpArgs) -> Result<()> {
    let (image, sources, dest) = parse_args(&args.args)?;
    // Fail before booting anything when DEST cannot take several sources.
    if sources.len() > 1 && !dest.is_dir() {
        return Err(Error::Other(format!(
            "{}: not a directory (several sources need an existing directory)",
            dest.display()
        )));
    }
    let mut session = Session::open_mounted(&image, &args.image_args, &args.guest, &args.mount)?;
    let protected = session
        .image_files()
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| {
            (
                std::os::unix::fs::MetadataExt::dev(&m),
                std::os::unix::fs::MetadataExt::ino(&m),
            )
        })
        .collect();
    let opts = CopyOptions {
        force: args.force,
        progress: io::stderr().is_terminal(),
        protected,
    };
    let stage = trace::stage("cp");
    match copy_out(session.fs(), &sources, &dest, &opts) {
        Ok(stats) => {
            stage.done(&format!(
                "{} files, {} directories, {} symlinks, {} skipped, {} bytes",
                stats.files, stats.dirs, stats.symlinks, stats.skipped, stats.bytes
            ));
            session.finish()
        }
        Err(e) => {
            let e = session.annotate(e);
            // After a failed stream the channel may be out of step: do not ask the guest.
            session.abort();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgsafe_proto::WalkEntry;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use tempfile::TempDir;

    type Key = Vec<Vec<u8>>;

    /// A guest filesystem in memory. Its walk is a correct pre-order walk unless
    /// `walk_script` replaces it with a hostile one, sent verbatim.
    struct MemFs {
        nodes: BTreeMap<Key, (Entry, Vec<u8>)>,
        walk_script: Option<Vec<WalkEntry>>,
        /// Bytes added to every file stream (a guest sending more than announced).
        extra: Vec<u8>,
        /// A file whose stream fails halfway (the destination filling up, say).
        fail: Option<Key>,
        /// A directory listed in the middle of every file stream, and what it held.
        peek: Option<(PathBuf, Vec<Vec<String>>)>,
    }

    fn key(path: &[u8]) -> Key {
        path.split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn entry(
        key: &Key,
        kind: FileType,
        mode: u32,
        size: u64,
        mtime: i64,
        target: Option<&[u8]>,
    ) -> Entry {
        Entry {
            name: key.last().cloned().unwrap_or_default(),
            kind,
            mode,
            size,
            mtime,
            mtime_nsec: 250,
            uid: 0,
            gid: 0,
            nlink: 1,
            target: target.map(<[u8]>::to_vec),
        }
    }

    impl MemFs {
        fn new() -> Self {
            let mut nodes = BTreeMap::new();
            nodes.insert(
                Vec::new(),
                (
                    entry(&Vec::new(), FileType::Directory, 0o755, 0, 1, None),
                    Vec::new(),
                ),
            );
            MemFs {
                nodes,
                walk_script: None,
                extra: Vec::new(),
                fail: None,
                peek: None,
            }
        }

        fn dir(mut self, path: &[u8], mode: u32, mtime: i64) -> Self {
            let k = key(path);
            self.nodes.insert(
                k.clone(),
                (
                    entry(&k, FileType::Directory, mode, 4096, mtime, None),
                    Vec::new(),
                ),
            );
            self
        }

        fn file(mut self, path: &[u8], data: &[u8], mode: u32, mtime: i64) -> Self {
            let k = key(path);
            let e = entry(&k, FileType::Regular, mode, data.len() as u64, mtime, None);
            self.nodes.insert(k, (e, data.to_vec()));
            self
        }

        fn link(mut self, path: &[u8], target: &[u8]) -> Self {
            let k = key(path);
            let e = entry(
                &k,
                FileType::Symlink,
                0o777,
                target.len() as u64,
                7,
                Some(target),
            );
            self.nodes.insert(k, (e, Vec::new()));
            self
        }

        fn special(mut self, path: &[u8], kind: FileType) -> Self {
            let k = key(path);
            self.nodes
                .insert(k.clone(), (entry(&k, kind, 0o600, 0, 1, None), Vec::new()));
            self
        }

        fn script(mut self, walk: Vec<WalkEntry>) -> Self {
            self.walk_script = Some(walk);
            self
        }
    }

    fn not_found(path: &[u8]) -> Error {
        Error::NotFound {
            image: PathBuf::new(),
            path: show(path),
            what: "no such file".into(),
        }
    }

    impl GuestFs for MemFs {
        fn stat(&mut self, path: &[u8]) -> Result<Entry> {
            self.nodes
                .get(&key(path))
                .map(|(e, _)| e.clone())
                .ok_or_else(|| not_found(path))
        }

        fn read_dir(&mut self, path: &[u8]) -> Result<Vec<Entry>> {
            let k = key(path);
            Ok(self
                .nodes
                .iter()
                .filter(|(p, _)| p.len() == k.len() + 1 && p.starts_with(&k))
                .map(|(_, (e, _))| e.clone())
                .collect())
        }

        fn read_file(&mut self, path: &[u8], out: &mut dyn Write) -> Result<u64> {
            let (e, data) = self.nodes.get(&key(path)).ok_or_else(|| not_found(path))?;
            if e.kind != FileType::Regular {
                return Err(not_found(path));
            }
            let mut all = data.clone();
            all.extend_from_slice(&self.extra);
            // Odd-sized chunks, so hole detection sees runs crossing chunk boundaries.
            for (i, chunk) in all.chunks(3000).enumerate() {
                out.write_all(chunk)
                    .map_err(|e| Error::Other(format!("writing output: {e}")))?;
                if i == 0 {
                    if let Some((dir, seen)) = &mut self.peek {
                        seen.push(listing(dir));
                    }
                    if self.fail.as_ref() == Some(&key(path)) {
                        return Err(Error::Other("No space left on device".into()));
                    }
                }
            }
            Ok(all.len() as u64)
        }

        fn walk(
            &mut self,
            path: &[u8],
            each: &mut dyn FnMut(WalkEntry) -> Result<()>,
        ) -> Result<()> {
            if let Some(script) = self.walk_script.clone() {
                return script.into_iter().try_for_each(each);
            }
            let k = key(path);
            let below: Vec<WalkEntry> = self
                .nodes
                .iter()
                .filter(|(p, _)| p.len() > k.len() && p.starts_with(&k))
                .map(|(p, (e, _))| WalkEntry {
                    path: p[k.len()..].to_vec(),
                    entry: e.clone(),
                })
                .collect();
            below.into_iter().try_for_each(each)
        }
    }

    /// A hostile walk entry: `path` components sent as they are.
    fn w(path: &[&[u8]], kind: FileType, target: Option<&[u8]>) -> WalkEntry {
        let k: Key = path.iter().map(|c| c.to_vec()).collect();
        let size = if kind == FileType::Regular { 3 } else { 0 };
        WalkEntry {
            entry: entry(&k, kind, 0o644, size, 1, target),
            path: k,
        }
    }

    /// A scratch area: `dest` (the user's DEST) and `outside` (must stay empty).
    struct Area {
        _tmp: TempDir,
        dest: PathBuf,
        outside: PathBuf,
    }

    fn area() -> Area {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&dest).unwrap();
        std::fs::create_dir(&outside).unwrap();
        Area {
            _tmp: tmp,
            dest,
            outside,
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn opts() -> CopyOptions {
        CopyOptions::default()
    }

    fn force() -> CopyOptions {
        CopyOptions {
            force: true,
            ..CopyOptions::default()
        }
    }

    fn src(p: &str) -> Vec<Vec<u8>> {
        vec![p.as_bytes().to_vec()]
    }

    #[test]
    fn file_into_existing_dir_keeps_its_name() {
        let a = area();
        let mut fs = MemFs::new()
            .dir(b"/etc", 0o755, 1)
            .file(b"/etc/hostname", b"box\n", 0o644, 1);

        let stats = copy_out(&mut fs, &src("/etc/hostname"), &a.dest, &opts()).unwrap();

        assert_eq!(std::fs::read(a.dest.join("hostname")).unwrap(), b"box\n");
        assert_eq!((stats.files, stats.bytes), (1, 4));
    }

    #[test]
    fn file_to_new_name_becomes_that_file() {
        let a = area();
        let mut fs = MemFs::new().file(b"/f", b"data", 0o600, 1);

        copy_out(&mut fs, &src("/f"), &a.dest.join("renamed"), &opts()).unwrap();

        assert_eq!(listing(&a.dest), vec!["renamed"]);
        assert_eq!(std::fs::read(a.dest.join("renamed")).unwrap(), b"data");
    }

    #[test]
    fn directory_is_copied_recursively_with_odd_names() {
        let a = area();
        let deep = b"/d/1/2/3/4/5/6/7/8/9/leaf";
        let mut fs = MemFs::new()
            .dir(b"/d", 0o755, 1)
            .file(b"/d/with space", b"s", 0o644, 1)
            .file(b"/d/new\nline", b"n", 0o644, 1)
            .file(b"/d/back\\slash", b"b", 0o644, 1)
            .file(b"/d/\xff\xfebytes", b"x", 0o644, 1);
        for i in 1..=9 {
            fs = fs.dir(&deep[..2 + 2 * i], 0o755, 1);
        }
        fs = fs.file(deep, b"deep", 0o644, 1);

        let stats = copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

        let d = a.dest.join("d");
        assert_eq!(std::fs::read(d.join("with space")).unwrap(), b"s");
        assert_eq!(std::fs::read(d.join("new\nline")).unwrap(), b"n");
        assert_eq!(std::fs::read(d.join("back\\slash")).unwrap(), b"b");
        assert_eq!(
            std::fs::read(d.join(std::ffi::OsStr::from_bytes(b"\xff\xfebytes"))).unwrap(),
            b"x"
        );
        assert_eq!(
            std::fs::read(d.join("1/2/3/4/5/6/7/8/9/leaf")).unwrap(),
            b"deep"
        );
        assert_eq!((stats.files, stats.dirs), (5, 10));
    }

    #[test]
    fn directory_to_new_name_becomes_that_directory() {
        let a = area();
        let mut fs = MemFs::new()
            .dir(b"/home", 0o755, 1)
            .file(b"/home/letter", b"hi", 0o644, 1);

        copy_out(&mut fs, &src("/home/"), &a.dest.join("copy"), &opts()).unwrap();

        assert_eq!(std::fs::read(a.dest.join("copy/letter")).unwrap(), b"hi");
    }

    #[test]
    fn symlinks_stay_symlinks_and_are_never_followed() {
        let a = area();
        let target = a.outside.join("victim");
        let mut fs = MemFs::new()
            .dir(b"/d", 0o755, 1)
            .link(b"/d/abs", target.as_os_str().as_bytes())
            .link(b"/d/rel", b"../../../outside/victim");

        let stats = copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

        assert_eq!(std::fs::read_link(a.dest.join("d/abs")).unwrap(), target);
        assert_eq!(
            std::fs::read_link(a.dest.join("d/rel")).unwrap(),
            Path::new("../../../outside/victim")
        );
        assert_eq!(stats.symlinks, 2);
        assert!(listing(&a.outside).is_empty());
    }

    #[test]
    fn modes_and_mtimes_are_preserved_and_setid_bits_dropped() {
        let a = area();
        let mut fs = MemFs::new()
            .dir(b"/d", 0o1750, 1_500_000_000)
            .dir(b"/d/ro", 0o555, 1_400_000_000)
            .file(b"/d/ro/f", b"x", 0o640, 1_300_000_000)
            .file(b"/d/suid", b"y", 0o4755, 1_200_000_000)
            .link(b"/d/l", b"f");

        copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

        let md = |p: &str| std::fs::symlink_metadata(a.dest.join(p)).unwrap();
        assert_eq!(
            (md("d").mode() & 0o7777, md("d").mtime()),
            (0o750, 1_500_000_000)
        );
        assert_eq!(
            (md("d/ro").mode() & 0o7777, md("d/ro").mtime()),
            (0o555, 1_400_000_000)
        );
        assert_eq!(
            (
                md("d/ro/f").mode() & 0o7777,
                md("d/ro/f").mtime(),
                md("d/ro/f").mtime_nsec()
            ),
            (0o640, 1_300_000_000, 250)
        );
        assert_eq!(md("d/suid").mode() & 0o7777, 0o755);
        assert_eq!(md("d/l").mtime(), 7);
        std::fs::set_permissions(a.dest.join("d/ro"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }

    #[test]
    fn existing_file_is_refused_without_force_and_left_unchanged() {
        let a = area();
        std::fs::write(a.dest.join("f"), b"mine").unwrap();
        let mut fs = MemFs::new()
            .dir(b"/d", 0o755, 1)
            .file(b"/d/new", b"n", 0o644, 1)
            .file(b"/f", b"theirs", 0o644, 1);
        let sources = vec![b"/d".to_vec(), b"/f".to_vec()];

        let err = copy_out(&mut fs, &sources, &a.dest, &opts()).unwrap_err();

        assert!(
            err.to_string().contains("/f: already exists (use --force"),
            "{err}"
        );
        assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"mine");
        assert_eq!(listing(&a.dest), vec!["f"]);
    }

    #[test]
    fn force_replaces_a_file_and_a_symlink_without_writing_through_it() {
        let a = area();
        let victim = a.outside.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::write(a.dest.join("f"), b"mine").unwrap();
        symlink(&victim, a.dest.join("x")).unwrap();
        let mut fs = MemFs::new()
            .file(b"/f", b"theirs", 0o644, 1)
            .file(b"/x", b"new", 0o644, 1);
        let sources = vec![b"/f".to_vec(), b"/x".to_vec()];

        copy_out(&mut fs, &sources, &a.dest, &force()).unwrap();

        assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"theirs");
        assert!(std::fs::symlink_metadata(a.dest.join("x"))
            .unwrap()
            .is_file());
        assert_eq!(std::fs::read(a.dest.join("x")).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn force_never_replaces_the_image_being_read() {
        let a = area();
        let image = a.dest.join("disk.img");
        std::fs::write(&image, b"the image").unwrap();
        let m = std::fs::metadata(&image).unwrap();
        let opts = CopyOptions {
            force: true,
            protected: vec![(
                std::os::unix::fs::MetadataExt::dev(&m),
                std::os::unix::fs::MetadataExt::ino(&m),
            )],
            ..CopyOptions::default()
        };
        let mut fs = MemFs::new().file(b"/disk.img", b"guest bytes", 0o644, 1);

        let err = copy_out(&mut fs, &src("/disk.img"), &a.dest, &opts).unwrap_err();

        assert!(
            err.to_string()
                .contains("is a file of the image being read"),
            "{err}"
        );
        assert_eq!(std::fs::read(&image).unwrap(), b"the image");
    }

    #[test]
    fn force_never_replaces_a_directory_with_a_file() {
        let a = area();
        std::fs::create_dir(a.dest.join("f")).unwrap();
        let mut fs = MemFs::new().file(b"/f", b"theirs", 0o644, 1);

        let err = copy_out(&mut fs, &src("/f"), &a.dest, &force()).unwrap_err();

        assert!(err.to_string().contains("is a directory"), "{err}");
    }

    #[test]
    fn existing_directory_is_merged_into() {
        let a = area();
        std::fs::create_dir(a.dest.join("d")).unwrap();
        std::fs::write(a.dest.join("d/old"), b"o").unwrap();
        let mut fs = MemFs::new()
            .dir(b"/d", 0o700, 1)
            .file(b"/d/new", b"n", 0o644, 1);

        copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap();

        assert_eq!(listing(&a.dest.join("d")), vec!["new", "old"]);
    }

    #[test]
    fn several_sources_need_an_existing_directory() {
        let a = area();
        let mut fs = MemFs::new()
            .file(b"/a", b"a", 0o644, 1)
            .file(b"/b", b"b", 0o644, 1);
        let sources = vec![b"/a".to_vec(), b"/b".to_vec()];

        let err = copy_out(&mut fs, &sources, &a.dest.join("nope"), &opts()).unwrap_err();

        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(listing(&a.dest).is_empty());
    }

    #[test]
    fn two_sources_with_the_same_name_are_refused() {
        let a = area();
        let mut fs = MemFs::new()
            .dir(b"/a", 0o755, 1)
            .dir(b"/b", 0o755, 1)
            .file(b"/a/x", b"1", 0o644, 1)
            .file(b"/b/x", b"2", 0o644, 1);
        let sources = vec![b"/a/x".to_vec(), b"/b/x".to_vec()];

        let err = copy_out(&mut fs, &sources, &a.dest, &opts()).unwrap_err();

        assert!(err.to_string().contains("listed twice"), "{err}");
        assert!(listing(&a.dest).is_empty());
    }

    #[test]
    fn image_root_is_merged_into_an_existing_dest() {
        let a = area();
        let mut fs =
            MemFs::new()
                .dir(b"/etc", 0o755, 1)
                .file(b"/etc/os-release", b"ID=x", 0o644, 1);

        copy_out(&mut fs, &src("/"), &a.dest, &opts()).unwrap();

        assert_eq!(
            std::fs::read(a.dest.join("etc/os-release")).unwrap(),
            b"ID=x"
        );
    }

    #[test]
    fn devices_fifos_and_sockets_are_skipped() {
        let a = area();
        let mut fs = MemFs::new()
            .dir(b"/dev", 0o755, 1)
            .special(b"/dev/null", FileType::CharDevice)
            .special(b"/dev/sda", FileType::BlockDevice)
            .special(b"/dev/fifo", FileType::Fifo)
            .special(b"/dev/sock", FileType::Socket)
            .file(b"/dev/plain", b"p", 0o644, 1);

        let stats = copy_out(&mut fs, &src("/dev"), &a.dest, &opts()).unwrap();

        assert_eq!(listing(&a.dest.join("dev")), vec!["plain"]);
        assert_eq!(stats.skipped, 4);
    }

    #[test]
    fn zeros_become_holes_with_the_right_content() {
        let a = area();
        let mut data = vec![0u8; 1 << 20];
        data[5000] = 1;
        let mut fs = MemFs::new().file(b"/sparse", &data, 0o644, 1);

        copy_out(&mut fs, &src("/sparse"), &a.dest, &opts()).unwrap();

        let md = std::fs::metadata(a.dest.join("sparse")).unwrap();
        assert_eq!(std::fs::read(a.dest.join("sparse")).unwrap(), data);
        assert!(md.blocks() * 512 < md.len(), "{} blocks", md.blocks());
    }

    #[test]
    fn missing_source_is_not_found() {
        let a = area();
        let mut fs = MemFs::new();

        let err = copy_out(&mut fs, &src("/nope"), &a.dest, &opts()).unwrap_err();

        assert_eq!(err.exit_code(), crate::error::exit::NOT_FOUND);
    }

    /// Run a copy of `/d` whose walk is `script`; the error, after checking that nothing
    /// at all was written, inside or outside DEST.
    fn hostile(script: Vec<WalkEntry>) -> String {
        let a = area();
        let mut fs = MemFs::new().dir(b"/d", 0o755, 1).script(script);

        let err = copy_out(&mut fs, &src("/d"), &a.dest, &opts()).unwrap_err();

        assert!(
            listing(&a.dest).is_empty(),
            "DEST changed: {:?}",
            listing(&a.dest)
        );
        assert!(listing(&a.outside).is_empty());
        assert!(matches!(err, Error::Guest { .. }), "{err}");
        err.to_string()
    }

    #[test]
    fn hostile_dot_dot_component_is_refused() {
        let err = hostile(vec![w(&[b"..", b"outside", b"x"], FileType::Regular, None)]);

        assert!(err.contains("unsafe name .."), "{err}");
    }

    #[test]
    fn hostile_slash_inside_a_component_is_refused() {
        let err = hostile(vec![w(&[b"../outside/x"], FileType::Regular, None)]);

        assert!(err.contains("contains '/'"), "{err}");
    }

    #[test]
    fn hostile_empty_name_is_refused() {
        let err = hostile(vec![w(&[b""], FileType::Regular, None)]);

        assert!(err.contains("empty name"), "{err}");
    }

    #[test]
    fn hostile_nul_in_name_is_refused() {
        let err = hostile(vec![w(&[b"a\0b"], FileType::Regular, None)]);

        assert!(err.contains("NUL"), "{err}");
    }

    #[test]
    fn hostile_empty_path_is_refused() {
        let err = hostile(vec![w(&[], FileType::Regular, None)]);

        assert!(err.contains("empty path"), "{err}");
    }

    #[test]
    fn hostile_file_below_a_symlink_is_refused() {
        let err = hostile(vec![
            w(&[b"a"], FileType::Symlink, Some(b"/tmp")),
            w(&[b"a", b"passwd"], FileType::Regular, None),
        ]);

        assert!(err.contains("d/a/passwd"), "{err}");
    }

    #[test]
    fn hostile_file_before_its_parent_is_refused() {
        let err = hostile(vec![
            w(&[b"sub", b"f"], FileType::Regular, None),
            w(&[b"sub"], FileType::Directory, None),
        ]);

        assert!(
            err.contains("not a directory listed just before it"),
            "{err}"
        );
    }

    #[test]
    fn hostile_duplicate_entry_is_refused() {
        let err = hostile(vec![
            w(&[b"f"], FileType::Regular, None),
            w(&[b"f"], FileType::Regular, None),
        ]);

        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn hostile_directory_then_symlink_of_the_same_name_is_refused() {
        let err = hostile(vec![
            w(&[b"a"], FileType::Directory, None),
            w(&[b"a"], FileType::Symlink, Some(b"/tmp")),
            w(&[b"a", b"f"], FileType::Regular, None),
        ]);

        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn hostile_entry_below_a_regular_file_is_refused() {
        let err = hostile(vec![
            w(&[b"f"], FileType::Regular, None),
            w(&[b"f", b"g"], FileType::Regular, None),
        ]);

        assert!(err.contains("d/f/g"), "{err}");
    }

    #[test]
    fn hostile_timestamp_is_refused() {
        let mut bad = w(&[b"f"], FileType::Regular, None);
        bad.entry.mtime_nsec = 2_000_000_000;

        let err = hostile(vec![bad]);

        assert!(err.contains("invalid timestamp"), "{err}");
    }

    #[test]
    fn hostile_symlink_without_target_is_refused() {
        let err = hostile(vec![w(&[b"l"], FileType::Symlink, None)]);

        assert!(err.contains("symlink target"), "{err}");
    }

    #[test]
    fn hostile_stream_longer_than_announced_is_refused_and_removed() {
        let a = area();
        let mut fs = MemFs::new().file(b"/f", b"abc", 0o644, 1);
        fs.extra = b"and more".to_vec();

        let err = copy_out(&mut fs, &src("/f"), &a.dest, &opts()).unwrap_err();

        assert!(
            err.to_string().contains("more than its size of 3 bytes"),
            "{err}"
        );
        assert!(listing(&a.dest).is_empty());
    }

    /// `len` bytes without runs of zeros (so none of it becomes a hole).
    fn pseudo(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 | 1).collect()
    }

    /// Regression: a copy killed mid-file left a partial file under its final name.
    #[test]
    fn a_file_being_written_never_has_its_final_name() {
        let a = area();
        let data = pseudo(20_000);
        let mut fs = MemFs::new().file(b"/f", &data, 0o644, 1);
        fs.peek = Some((a.dest.clone(), Vec::new()));

        copy_out(&mut fs, &src("/f"), &a.dest, &opts()).unwrap();

        let seen = fs.peek.map(|(_, s)| s).unwrap_or_default();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].len(), 1, "{seen:?}");
        assert!(seen[0][0].starts_with(PART_PREFIX), "{seen:?}");
        assert_eq!(listing(&a.dest), vec!["f"]);
        assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), data);
    }

    /// Regression: a tree copy that failed left its directories at mode 0700.
    #[test]
    fn a_failed_tree_copy_leaves_complete_files_and_final_modes_only() {
        let a = area();
        let mut fs = MemFs::new()
            .dir(b"/t", 0o755, 5)
            .dir(b"/t/sub", 0o750, 6)
            .file(b"/t/sub/a", b"first", 0o640, 7)
            .file(b"/t/sub/b", &pseudo(10_000), 0o644, 8)
            .file(b"/t/z", b"never", 0o644, 9);
        fs.fail = Some(key(b"/t/sub/b"));

        let err = copy_out(&mut fs, &src("/t"), &a.dest, &opts()).unwrap_err();

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let t = a.dest.join("t");
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(listing(&t), vec!["sub"]);
        assert_eq!(listing(&t.join("sub")), vec!["a"]);
        assert_eq!(std::fs::read(t.join("sub/a")).unwrap(), b"first");
        assert_eq!((mode(&t), mode(&t.join("sub"))), (0o755, 0o750));
        assert_eq!(std::fs::metadata(t.join("sub")).unwrap().mtime(), 6);
    }

    #[test]
    fn force_replaces_a_file_by_renaming_over_it() {
        let a = area();
        std::fs::write(a.dest.join("f"), b"old").unwrap();
        let mut fs = MemFs::new().file(b"/f", b"new", 0o600, 1);

        copy_out(&mut fs, &src("/f"), &a.dest, &force()).unwrap();

        assert_eq!(listing(&a.dest), vec!["f"]);
        assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"new");
    }

    #[test]
    fn hostile_stream_shorter_than_announced_is_refused() {
        let a = area();
        let mut fs = MemFs::new().file(b"/f", b"abc", 0o644, 1);
        fs.nodes.get_mut(&key(b"/f")).unwrap().0.size = 10;

        let err = copy_out(&mut fs, &src("/f"), &a.dest, &opts()).unwrap_err();

        assert!(
            err.to_string()
                .contains("sent 3 bytes for a file of 10 bytes"),
            "{err}"
        );
        assert!(listing(&a.dest).is_empty());
    }

    #[test]
    fn existing_symlink_in_dest_is_not_followed_into() {
        let a = area();
        symlink(&a.outside, a.dest.join("x")).unwrap();
        let mut fs = MemFs::new()
            .dir(b"/x", 0o755, 1)
            .file(b"/x/f", b"evil", 0o644, 1);

        let err = copy_out(&mut fs, &src("/x"), &a.dest, &force()).unwrap_err();

        assert!(
            err.to_string().contains("exists and is not a directory"),
            "{err}"
        );
        assert!(listing(&a.outside).is_empty());
    }

    #[test]
    fn symlink_swapped_in_during_the_copy_is_not_followed() {
        let a = area();
        let mut fs = MemFs::new().dir(b"/x", 0o755, 1);
        let plan = make_plan(&mut fs, &src("/x"), &a.dest).unwrap();
        check_plan(&plan, false).unwrap();
        symlink(&a.outside, a.dest.join("x")).unwrap();
        let mut items = plan.items;
        items.push(Item {
            src: 0,
            path: key(b"x/f"),
            entry: entry(&key(b"x/f"), FileType::Regular, 0o644, 4, 1, None),
        });
        let plan = Plan { items, ..plan };

        let err = apply(&mut fs, &plan, &opts(), &mut Progress::new(false, 0)).unwrap_err();

        assert!(
            err.to_string().contains("exists and is not a directory"),
            "{err}"
        );
        assert!(listing(&a.outside).is_empty());
    }

    #[test]
    fn second_pass_alone_refuses_a_file_below_a_symlink_it_created() {
        let a = area();
        let mut fs = MemFs::new().dir(b"/d", 0o755, 1);
        let mut plan = make_plan(&mut fs, &src("/d"), &a.dest).unwrap();
        let link = entry(
            &key(b"d/a"),
            FileType::Symlink,
            0o777,
            0,
            1,
            Some(a.outside.as_os_str().as_bytes()),
        );
        plan.items.push(Item {
            src: 0,
            path: key(b"d/a"),
            entry: link,
        });
        plan.items.push(Item {
            src: 0,
            path: key(b"d/a/f"),
            entry: entry(&key(b"d/a/f"), FileType::Regular, 0o644, 0, 1, None),
        });

        let err = apply(&mut fs, &plan, &opts(), &mut Progress::new(false, 0)).unwrap_err();

        assert!(
            err.to_string()
                .contains("not a directory listed just before it"),
            "{err}"
        );
        assert!(listing(&a.outside).is_empty());
    }

    #[test]
    fn dest_given_as_a_symlink_to_a_directory_is_followed() {
        let a = area();
        let link = a.outside.parent().unwrap().join("dest-link");
        symlink(&a.dest, &link).unwrap();
        let mut fs = MemFs::new().file(b"/f", b"data", 0o644, 1);

        copy_out(&mut fs, &src("/f"), &link, &opts()).unwrap();

        assert_eq!(std::fs::read(a.dest.join("f")).unwrap(), b"data");
    }

    #[test]
    fn walk_budget_stops_at_its_entry_limit() {
        let mut b = Budget::new(2, 1000);
        let e = entry(&key(b"x"), FileType::Regular, 0o644, 0, 1, None);
        b.take(&key(b"x"), &e).unwrap();
        b.take(&key(b"y"), &e).unwrap();

        let err = b.take(&key(b"z"), &e).unwrap_err();

        assert!(err.to_string().contains("more than 2 entries"), "{err}");
    }

    #[test]
    fn walk_budget_counts_names_and_link_targets() {
        let mut b = Budget::new(10, 8);
        let link = entry(
            &key(b"ab"),
            FileType::Symlink,
            0o777,
            0,
            1,
            Some(b"/target"),
        );

        let err = b.take(&key(b"ab"), &link).unwrap_err();

        assert!(
            err.to_string().contains("more than 8 bytes of names"),
            "{err}"
        );
    }

    #[test]
    fn source_name_is_the_last_component() {
        let got = source_name(b"/home/me/letter//").unwrap();

        assert_eq!(got, (b"/home/me/letter".to_vec(), Some(b"letter".to_vec())));
    }

    #[test]
    fn source_ending_in_dot_dot_is_refused() {
        let err = source_name(b"/home/..").unwrap_err();

        assert!(err.to_string().contains("cannot name the copy"), "{err}");
    }

    #[test]
    fn source_arg_splits_at_an_existing_image_path_containing_colon_slash() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("im:")).unwrap();
        let image = tmp.path().join("im:/g.raw");
        std::fs::write(&image, b"").unwrap();
        let arg = format!("{}:/etc/hosts", image.display());

        let (img, path) = split_source_arg(&arg).unwrap();

        assert_eq!((img, path), (image, b"/etc/hosts".to_vec()));
    }

    #[test]
    fn source_arg_splits_at_the_first_colon_slash_when_nothing_exists() {
        let (img, path) = split_source_arg("101:/etc/a:/b").unwrap();

        assert_eq!((img, path), (PathBuf::from("101"), b"/etc/a:/b".to_vec()));
    }

    #[test]
    fn source_without_image_is_a_usage_error() {
        let err = parse_args(&["disk.img".into(), "out".into()]).unwrap_err();

        assert_eq!(err.exit_code(), crate::error::exit::USAGE);
        assert!(err.to_string().contains("IMAGE:/PATH"), "{err}");
    }

    #[test]
    fn sources_from_two_images_are_a_usage_error() {
        let err = parse_args(&["a.img:/x".into(), "b.img:/y".into(), "out".into()]).unwrap_err();

        assert_eq!(err.exit_code(), crate::error::exit::USAGE);
    }

    #[test]
    fn show_escapes_control_and_invalid_bytes() {
        assert_eq!(show(b"a\nb\xffc d"), "a?b?c d");
    }
}
