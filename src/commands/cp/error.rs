//! What can go wrong on the host side of a copy, one variant per step. The guest's own
//! misbehaviour stays an [`crate::Error::Guest`] (exit 6); these are all exit 1, and
//! their text is the one-line message the user sees.

use imgsafe_proto::NameError;
use std::io;

/// A failed step of `cp` on the host (the destination, the command line after clap).
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    /// No source was given.
    #[error("nothing to copy")]
    NothingToCopy,
    /// A source path in the image that is not absolute.
    #[error("{path}: image paths must start with /")]
    RelativeSource { path: String },
    /// The source's last component cannot name a file.
    #[error("{path}: cannot name the copy after its last component ({source})")]
    SourceName {
        path: String,
        #[source]
        source: NameError,
    },
    /// DEST, or DEST's parent, could not be opened.
    #[error("{path}: {source}")]
    OpenDest {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Several sources, and DEST is not an existing directory.
    #[error("{dest}: not a directory (several sources need an existing directory)")]
    SeveralSources { dest: String },
    /// DEST ends in `/` but does not exist as a directory and the source is a file.
    #[error("{dest}: not a directory")]
    DestNotDirectory { dest: String },
    /// DEST has no last component (`..`, `/`).
    #[error("{dest}: cannot be the name of a copy")]
    DestUnnamed { dest: String },
    /// A guest path too long to ask the guest for.
    #[error("{path}: path longer than {max} bytes, cannot be read")]
    PathTooLong { path: String, max: usize },
    /// Looking at what is already in DEST failed.
    #[error("{path}: {source}")]
    Inspect {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A directory is to go where a non-directory is.
    #[error("{path}: exists and is not a directory")]
    NotADirectory { path: String },
    /// A file or symlink is to go where a directory is.
    #[error("{path}: is a directory, not replacing it")]
    IsADirectory { path: String },
    /// Something is there and `--force` was not given.
    #[error("{path}: already exists (use --force to replace it)")]
    Exists { path: String },
    /// Something is there and it is one of the image's own files.
    #[error("{path}: is a file of the image being read, not replacing it")]
    ImageFile { path: String },
    /// Creating a directory in DEST failed.
    #[error("{path}: {source}")]
    MakeDir {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Giving a created directory its final mode and mtime failed.
    #[error("{path}: {source}")]
    FinishDir {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Creating a file or symlink (or removing the one it replaces) failed.
    #[error("{path}: {source}")]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Writing a file's bytes, mode, mtime or final name failed.
    #[error("{path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Writing the tar stream to stdout failed.
    #[error("writing output: {source}")]
    Output {
        #[source]
        source: io::Error,
    },
}
