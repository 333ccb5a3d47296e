//! The one error type every operation returns; it becomes `Response::Error` on the wire.

use imgsafe_proto::{ErrorKind, Response};
use std::io;

/// A failed request: the category the host maps to an exit code, and one line of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// Category for the host.
    pub kind: ErrorKind,
    /// Human-readable message naming the path or device.
    pub message: String,
}

impl OpError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            message: message.into(),
        }
    }

    /// A system call on `what` (a guest path or device) failed with `err`.
    pub fn io(what: &[u8], err: &io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::ENOTDIR) => ErrorKind::NotDirectory,
            Some(libc::EISDIR) => ErrorKind::IsDirectory,
            Some(libc::ELOOP) => ErrorKind::TooManyLinks,
            _ => ErrorKind::Other,
        };
        OpError {
            kind,
            message: format!("{}: {}", shown(what), errno_text(err)),
        }
    }

    /// The wire form.
    pub fn response(self) -> Response {
        Response::Error {
            kind: self.kind,
            message: self.message,
        }
    }
}

/// A raw path shown in a message (lossy: messages are text, names on the wire are bytes).
pub fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// An I/O error's text without std's " (os error N)" suffix.
pub fn errno_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}
