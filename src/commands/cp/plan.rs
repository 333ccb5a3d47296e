//! The first step of a copy: stat the sources, choose where they go, collect every
//! walk (bounded), and check the whole plan against DEST before anything is written.

use super::dest::{Dir, Present};
use super::order::{OrderError, Tree};
use super::{show, CpError};
use super::{MAX_WALK_BYTES, MAX_WALK_ENTRIES};
use crate::agent_client::GuestFs;
use crate::{Error, Result};
use imgsafe_proto::{validate_name, Entry, FileType, MAX_PATH};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One source as the copy sees it.
pub(super) struct Source {
    /// The guest path without trailing slashes ("" for the root).
    pub(super) guest: Vec<u8>,
    /// lstat of the source.
    pub(super) entry: Entry,
    /// Name the source itself gets in the top-level destination directory; None when the
    /// image root is merged into DEST.
    pub(super) top: Option<Vec<u8>>,
}

/// One thing to create: its path below the top-level destination directory.
pub(super) struct Item {
    pub(super) src: usize,
    pub(super) path: Vec<Vec<u8>>,
    pub(super) entry: Entry,
}

/// Everything a copy will do, collected and bounded before anything is written.
pub(super) struct Plan {
    /// The top-level destination directory: DEST, or DEST's parent when DEST is the copy.
    pub(super) top: Dir,
    /// How to show `top` in messages ("" for the current directory).
    pub(super) top_shown: String,
    pub(super) sources: Vec<Source>,
    pub(super) items: Vec<Item>,
}

impl Plan {
    /// The guest path an item is read from.
    pub(super) fn guest_path(&self, item: &Item) -> Vec<u8> {
        guest_path(&self.sources, item)
    }

    /// The destination path of an item, for messages.
    pub(super) fn shown(&self, item: &Item) -> String {
        let mut s = self.top_shown.clone();
        for c in &item.path {
            if !s.is_empty() && !s.ends_with('/') {
                s.push('/');
            }
            s.push_str(&show(c));
        }
        s
    }

    pub(super) fn order_error(&self, item: &Item, e: OrderError) -> Error {
        Error::guest(format!(
            "refusing walk entry {}: {e}",
            show(&self.guest_path(item))
        ))
    }
}

/// The guest path an item of a walk of `sources` is read from.
pub(super) fn guest_path(sources: &[Source], item: &Item) -> Vec<u8> {
    let src = &sources[item.src];
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

/// The last component of an item's path (checked non-empty by [`Tree::step`]).
pub(super) fn leaf(item: &Item) -> &[u8] {
    item.path.last().map_or(&[][..], |c| &c[..])
}

/// Split a guest source path into its trimmed form and its last component (None for `/`).
pub(super) fn source_name(path: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    if path.first() != Some(&b'/') {
        return Err(CpError::RelativeSource { path: show(path) }.into());
    }
    let end = path.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
    let trimmed = &path[..end];
    if trimmed.is_empty() {
        return Ok((Vec::new(), None));
    }
    let name = trimmed.rsplit(|&b| b == b'/').next().unwrap_or(trimmed);
    validate_name(name).map_err(|source| CpError::SourceName {
        path: show(path),
        source,
    })?;
    Ok((trimmed.to_vec(), Some(name.to_vec())))
}

/// Where the copies go: DEST itself (None) or DEST's parent and DEST's name.
pub(super) fn resolve_dest(
    dest: &Path,
    sources: &[Source],
) -> Result<(Dir, String, Option<Vec<u8>>)> {
    let shown = dest.display().to_string();
    let open_err = |what: &str, source: io::Error| CpError::OpenDest {
        path: what.to_string(),
        source,
    };
    match std::fs::metadata(dest) {
        Ok(md) if md.is_dir() => {
            let dir = Dir::open_user(dest).map_err(|e| open_err(&shown, e))?;
            return Ok((dir, shown, None));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(open_err(&shown, e).into()),
    }
    if sources.len() > 1 {
        return Err(CpError::SeveralSources { dest: shown }.into());
    }
    let is_dir = sources
        .first()
        .is_some_and(|s| s.entry.kind == FileType::Directory);
    if dest.as_os_str().as_bytes().ends_with(b"/") && !is_dir {
        return Err(CpError::DestNotDirectory { dest: shown }.into());
    }
    let Some(name) = dest.file_name() else {
        return Err(CpError::DestUnnamed { dest: shown }.into());
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
pub(super) struct Budget {
    entries: usize,
    bytes: u64,
    max_entries: usize,
    max_bytes: u64,
}

impl Budget {
    pub(super) fn new(max_entries: usize, max_bytes: u64) -> Self {
        Budget {
            entries: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    pub(super) fn take(&mut self, path: &[Vec<u8>], entry: &Entry) -> Result<()> {
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
pub(super) fn make_plan(fs: &mut dyn GuestFs, sources: &[Vec<u8>], dest: &Path) -> Result<Plan> {
    let mut srcs = stat_sources(fs, sources)?;
    let (top, top_shown, as_name) = resolve_dest(dest, &srcs)?;
    if let Some(name) = as_name {
        srcs[0].top = Some(name);
    }
    let items = collect(fs, &srcs, sources)?;
    Ok(Plan {
        top,
        top_shown,
        sources: srcs,
        items,
    })
}

/// lstat every source; each is named after its last component (the root: merged).
pub(super) fn stat_sources(fs: &mut dyn GuestFs, sources: &[Vec<u8>]) -> Result<Vec<Source>> {
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
    Ok(srcs)
}

/// Every item to create: each source, and every entry of its walk, bounded.
pub(super) fn collect(
    fs: &mut dyn GuestFs,
    srcs: &[Source],
    sources: &[Vec<u8>],
) -> Result<Vec<Item>> {
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
    Ok(items)
}

/// Refuse entries whose content cannot be used as sent.
pub(super) fn check_item(plan: &Plan, item: &Item) -> Result<()> {
    check_entry(&plan.sources, item)
}

/// [`check_item`] for an item of a walk of `sources`.
pub(super) fn check_entry(sources: &[Source], item: &Item) -> Result<()> {
    let guest = || show(&guest_path(sources, item));
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
        FileType::Regular if guest_path(sources, item).len() > MAX_PATH => {
            return Err(CpError::PathTooLong {
                path: guest(),
                max: MAX_PATH,
            }
            .into());
        }
        _ => {}
    }
    Ok(())
}

/// First pass: check the whole plan against DEST without writing anything.
pub(super) fn check_plan(plan: &Plan, force: bool) -> Result<()> {
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
            Some(d) => d.lookup(name).map_err(|source| CpError::Inspect {
                path: plan.shown(item),
                source,
            })?,
            None => None,
        };
        let kind = item.entry.kind;
        let existing = match (kind, present, parent) {
            (FileType::Directory, Some(Present::Directory), Some(d)) => {
                Some(d.open_child(name).map_err(|source| CpError::Inspect {
                    path: plan.shown(item),
                    source,
                })?)
            }
            (FileType::Directory, Some(_), _) => {
                return Err(CpError::NotADirectory {
                    path: plan.shown(item),
                }
                .into());
            }
            (FileType::Regular | FileType::Symlink, Some(Present::Directory), _) => {
                return Err(CpError::IsADirectory {
                    path: plan.shown(item),
                }
                .into());
            }
            (FileType::Regular | FileType::Symlink, Some(_), _) if !force => {
                return Err(CpError::Exists {
                    path: plan.shown(item),
                }
                .into());
            }
            _ => None,
        };
        if kind == FileType::Directory {
            tree.enter(name, existing);
        }
    }
    Ok(())
}
