//! The error every command returns, and its exit code.

use crate::format::FormatError;
use std::path::PathBuf;

/// Exit codes, as documented in README.md.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Any failure not listed below (host I/O, destination problems, ...).
    pub const OTHER: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// The image file is missing, unreadable, of unknown format or corrupt.
    pub const IMAGE: i32 = 3;
    /// The path does not exist in the image, or is of the wrong type.
    pub const NOT_FOUND: i32 = 4;
    /// No usable filesystem: none found, several and none chosen, or mount failed.
    pub const FILESYSTEM: i32 = 5;
    /// The appliance could not be built, QEMU failed, or the guest misbehaved.
    pub const APPLIANCE: i32 = 6;
    /// Stopped by SIGINT/SIGTERM.
    pub const INTERRUPTED: i32 = 130;
}

/// Any failure of an imgsafe command. The `Display` text is the whole one-line message
/// after `imgsafe: `.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened or decoded.
    #[error(transparent)]
    Image(#[from] FormatError),
    /// A path given by the user does not exist in the image (or has the wrong type).
    #[error("{}: {path}: {what}", image.display())]
    NotFound {
        image: PathBuf,
        path: String,
        what: String,
    },
    /// No filesystem could be chosen or mounted.
    #[error("{}: {what}", image.display())]
    Filesystem { image: PathBuf, what: String },
    /// The image is larger than the VM can attach.
    #[error(
        "{}: the disk is {size} bytes, more than QEMU can attach (at most {max} bytes, about 8 EiB)",
        image.display()
    )]
    TooLarge { image: PathBuf, size: u64, max: u64 },
    /// The appliance or the VM failed.
    #[error("{what}")]
    Appliance { what: String },
    /// The guest agent never answered the handshake in time (the guest did not boot or
    /// was not restored); reported like [`Error::Appliance`], told apart so a boot can
    /// be tried again.
    #[error("{what}")]
    NoAnswer { what: String },
    /// The guest agent broke the protocol or sent something unsafe.
    #[error("guest agent: {what}")]
    Guest { what: String },
    /// Interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
    /// A step of `cp` failed on the host side (the destination, mostly).
    #[error(transparent)]
    Copy(#[from] crate::commands::cp::CpError),
    /// Any other failure, already phrased as one sentence.
    #[error("{0}")]
    Other(String),
    /// Arguments clap accepted but the command cannot use (e.g. a cp source without IMAGE:).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Image(_) | Error::TooLarge { .. } => exit::IMAGE,
            Error::NotFound { .. } => exit::NOT_FOUND,
            Error::Filesystem { .. } => exit::FILESYSTEM,
            Error::Appliance { .. } | Error::NoAnswer { .. } | Error::Guest { .. } => {
                exit::APPLIANCE
            }
            Error::Interrupted => exit::INTERRUPTED,
            Error::Other(_) | Error::Copy(_) => exit::OTHER,
            Error::Usage(_) => exit::USAGE,
        }
    }

    /// Name `image` in an appliance or guest failure (the other kinds name it already,
    /// or are not about it).
    pub fn with_image(self, image: &std::path::Path) -> Error {
        match self {
            Error::Appliance { what } | Error::NoAnswer { what } => {
                Error::appliance(format!("{}: {what}", image.display()))
            }
            Error::Guest { what } => {
                Error::appliance(format!("{}: guest agent: {what}", image.display()))
            }
            other => other,
        }
    }

    /// Shorthand for an [`Error::Appliance`].
    pub fn appliance(what: impl Into<String>) -> Self {
        Error::Appliance { what: what.into() }
    }

    /// Shorthand for an [`Error::Guest`].
    pub fn guest(what: impl Into<String>) -> Self {
        Error::Guest { what: what.into() }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
