//! The error every command returns, and its exit code. It gathers each module's own
//! error (format, vm, appliance, session, the commands' own steps), so it sits above
//! them all: the layers below (format, nbd, vm, appliance) return their own errors and
//! never this one.

use crate::appliance::ApplianceError;
use crate::format::FormatError;
use crate::vm::VmError;
use std::io;
use std::path::{Path, PathBuf};

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
    /// The appliance could not be built (kernel, modules, initramfs, cache).
    #[error(transparent)]
    Build(#[from] ApplianceError),
    /// QEMU could not be started or driven (see `vm::VmError` for each step).
    #[error(transparent)]
    Vm(VmError),
    /// The appliance or the VM failed in a way phrased as one sentence.
    #[error("{what}")]
    Appliance { what: String },
    /// The guest agent never answered the handshake in time (the guest did not boot or
    /// was not restored); reported like [`Error::Appliance`], told apart so a boot can
    /// be tried again.
    #[error("{what}")]
    NoAnswer { what: String },
    /// The guest agent broke the protocol or sent something unsafe. What was wrong is
    /// said in words: the host's answer to every such answer is the same (stop, exit
    /// 6), so one variant serves them all; the text names the request and what broke.
    #[error("guest agent: {what}")]
    Guest { what: String },
    /// The guest agent sent a frame that could not be decoded.
    #[error("guest agent: {0}")]
    GuestFrame(#[source] imgsafe_proto::FrameError),
    /// A warm state could not be saved (the warm path then boots cold; seen with `-v`).
    #[error(transparent)]
    Warm(#[from] crate::warm::WarmError),
    /// Interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
    /// Writing the command's output (stdout) failed; see [`write_output`] for a reader
    /// that went away.
    #[error("writing output: {0}")]
    Output(#[source] io::Error),
    /// QEMU is gone: what failed (`cause`), then what QEMU and the guest console said
    /// last (`said`), which is why it failed.
    #[error("{}{said}", gone_text(cause))]
    QemuGone {
        #[source]
        cause: Box<Error>,
        said: String,
    },
    /// An appliance or guest failure while working on `image`, which it names first.
    #[error("{}: {source}", image.display())]
    OnImage {
        image: PathBuf,
        #[source]
        source: Box<Error>,
    },
    /// A step of `cp` failed on the host side (the destination, mostly).
    #[error(transparent)]
    Copy(#[from] crate::commands::cp::CpError),
    /// A session could not be set up on the host (run directory, NBD server, overlay).
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    /// The host could not make a call to the agent (see `agent_client::ClientError`).
    #[error(transparent)]
    Client(#[from] crate::agent_client::ClientError),
    /// The host side of `shell` failed (terminal, pipes).
    #[error(transparent)]
    Shell(#[from] crate::commands::shell::ShellError),
    /// `serve` could not start (signal handlers, socket).
    #[error(transparent)]
    Serve(#[from] crate::commands::serve::ServeError),
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
            Error::Build(_)
            | Error::Vm(_)
            | Error::Appliance { .. }
            | Error::NoAnswer { .. }
            | Error::Guest { .. }
            | Error::GuestFrame(_)
            | Error::QemuGone { .. }
            | Error::Warm(_) => exit::APPLIANCE,
            Error::OnImage { source, .. } => source.exit_code(),
            Error::Interrupted => exit::INTERRUPTED,
            Error::Output(_)
            | Error::Copy(_)
            | Error::Session(_)
            | Error::Client(_)
            | Error::Shell(_)
            | Error::Serve(_) => exit::OTHER,
            Error::Usage(_) => exit::USAGE,
        }
    }

    /// Whether the appliance, QEMU or the guest agent failed (exit 6): the session
    /// cannot go on, unlike after a file that could not be read.
    pub fn is_appliance_failure(&self) -> bool {
        self.exit_code() == exit::APPLIANCE
    }

    /// Name `image` in this error, the one place that does it (the session calls it
    /// for everything that fails while it works on an image): guest-side "not found"
    /// and filesystem errors get it filled in, appliance and guest failures are wrapped
    /// in [`Error::OnImage`]; the other kinds name their file already or are not
    /// about the image.
    pub fn about_image(self, image: &Path) -> Error {
        match self {
            Error::NotFound {
                image: i,
                path,
                what,
            } if i.as_os_str().is_empty() => Error::NotFound {
                image: image.to_path_buf(),
                path,
                what,
            },
            Error::Filesystem { image: i, what } if i.as_os_str().is_empty() => Error::Filesystem {
                image: image.to_path_buf(),
                what,
            },
            e if e.is_appliance_failure() && !matches!(e, Error::OnImage { .. }) => {
                Error::OnImage {
                    image: image.to_path_buf(),
                    source: Box::new(e),
                }
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

/// What failed before QEMU went away. The guest's part is said without its
/// `guest agent:` prefix: with QEMU gone, the agent is not the one to blame.
fn gone_text(cause: &Error) -> String {
    match cause {
        Error::Guest { what } => what.clone(),
        Error::GuestFrame(f) => f.to_string(),
        other => other.to_string(),
    }
}

impl From<VmError> for Error {
    /// A VM failure after a signal is the signal's doing (QEMU was killed by the
    /// handler), so it becomes [`Error::Interrupted`]; anything else is an appliance
    /// failure.
    fn from(e: VmError) -> Self {
        if crate::vm::reaper::interrupted() {
            Error::Interrupted
        } else {
            Error::Vm(e)
        }
    }
}

impl From<crate::vm::AccelError> for Error {
    /// A bad `IMGSAFE_ACCEL` is a usage problem, reported as one line.
    fn from(e: crate::vm::AccelError) -> Self {
        Error::Usage(e.to_string())
    }
}

/// The end of writing a command's output: a reader that went away
/// (`imgsafe cat ... | head`) is not an error, anything else is [`Error::Output`].
pub fn write_output(r: io::Result<()>) -> Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(Error::Output),
    }
}

/// A command's whole output written to stdout and flushed, through [`write_output`].
pub fn print_output(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = io::stdout().lock();
    write_output(out.write_all(bytes).and_then(|()| out.flush()))
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appliance_failures_name_the_image_once_and_keep_their_exit_code() {
        let e = Error::guest("bad frame").about_image(Path::new("d.img"));
        let again = e.about_image(Path::new("d.img"));

        assert_eq!(again.to_string(), "d.img: guest agent: bad frame");
        assert_eq!(again.exit_code(), exit::APPLIANCE);
        assert!(std::error::Error::source(&again).is_some());
    }

    #[test]
    fn a_failure_after_qemu_went_away_keeps_its_cause_and_adds_what_was_said() {
        let gone = Error::QemuGone {
            cause: Box::new(Error::guest("sending request: Broken pipe")),
            said: " (QEMU exited: signal 9); guest said: Kernel panic".into(),
        };

        let e = gone.about_image(Path::new("d.img"));

        assert_eq!(
            e.to_string(),
            "d.img: sending request: Broken pipe (QEMU exited: signal 9); guest said: Kernel panic"
        );
        assert_eq!(e.exit_code(), exit::APPLIANCE);
        let gone = std::error::Error::source(&e).unwrap();
        let cause = gone.source().unwrap();
        assert_eq!(
            cause.to_string(),
            "guest agent: sending request: Broken pipe"
        );
    }

    #[test]
    fn not_found_from_the_guest_gets_the_image_filled_in() {
        let e = Error::NotFound {
            image: PathBuf::new(),
            path: "/x".into(),
            what: "no such file or directory".into(),
        }
        .about_image(Path::new("d.img"));

        assert_eq!(e.to_string(), "d.img: /x: no such file or directory");
        assert_eq!(e.exit_code(), exit::NOT_FOUND);
    }

    #[test]
    fn a_closed_reader_is_not_an_error_other_output_failures_are() {
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        let full = io::Error::from_raw_os_error(libc::ENOSPC);

        assert!(write_output(Err(pipe)).is_ok());
        let e = write_output(Err(full)).unwrap_err();
        assert!(e.to_string().starts_with("writing output: "), "{e}");
        assert_eq!(e.exit_code(), exit::OTHER);
    }
}
