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

//!
//! The work is split along its steps: [`args`] parses `IMAGE:/PATH... DEST`, [`plan`]
//! collects and checks everything against DEST without writing, [`write`] creates it;
//! DEST `-` writes a tar stream to stdout instead ([`tar`]). Files the guest can map are
//! read by the host from the image itself ([`crate::bulk`]).

mod args;
mod batch;
mod dest;
mod error;
mod order;
mod plan;
mod progress;
mod tar;
mod write;

pub use error::CpError;

use crate::agent_client::GuestFs;
use crate::cli::CpArgs;
use crate::session::Session;
use crate::{trace, Result};
use imgsafe_proto::FileType;
use progress::Progress;
use std::io::{self, IsTerminal};
use std::path::Path;

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
    /// The image as the host reads it: files the guest can map are read from it
    /// directly (see [`crate::bulk`]); None streams every file through the guest.
    pub reader: Option<crate::bulk::HostReader>,
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
    /// Regular files read from the image by the host (the rest came through the guest).
    pub mapped: u64,
}
/// A name or path for a one-line message, safe for a terminal.
fn show(bytes: &[u8]) -> String {
    crate::terminal::printable(bytes)
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
        return Err(CpError::NothingToCopy.into());
    }
    let plan = plan::make_plan(fs, sources, dest)?;
    plan::check_plan(&plan, opts.force)?;
    let total = plan
        .items
        .iter()
        .filter(|i| i.entry.kind == FileType::Regular)
        .fold(0u64, |acc, i| acc.saturating_add(i.entry.size));
    let mut progress = Progress::new(opts.progress, total);
    let stats = write::apply(fs, &plan, opts, &mut progress)?;
    progress.finish();
    Ok(stats)
}

/// Run `imgsafe cp`.
pub fn run(args: CpArgs) -> Result<()> {
    let (image, sources, dest) = args::parse_args(&args.args)?;
    let to_tar = dest.as_os_str() == "-";
    // Fail before booting anything when DEST cannot take several sources.
    if sources.len() > 1 && !to_tar && !dest.is_dir() {
        return Err(CpError::SeveralSources {
            dest: dest.display().to_string(),
        }
        .into());
    }
    Session::run_mounted(
        &image,
        &args.image_args.spec(),
        &args.guest.guest(),
        &args.mount.choice(),
        |session| {
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
                reader: session.host_reader(),
            };
            let stage = trace::stage("cp");
            let stats = if to_tar {
                let stdout = io::stdout();
                let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
                let reader = opts.reader.clone();
                tar::write_tar(
                    session.fs(),
                    &sources,
                    &mut out,
                    reader.as_ref(),
                    opts.progress,
                )
            } else {
                copy_out(session.fs(), &sources, &dest, &opts)
            }?;
            // (A failed copy ends the session without asking the guest: after a failed
            // stream the channel may be out of step. Session::run does that.)
            stage.done(&format!(
            "{} files ({} read from the image directly), {} directories, {} symlinks, {} skipped, {} bytes",
            stats.files, stats.mapped, stats.dirs, stats.symlinks, stats.skipped, stats.bytes
        ));
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests;
