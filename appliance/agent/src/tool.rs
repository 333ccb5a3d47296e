//! Running one of the host tools copied into the appliance (lvm, mdadm, cryptsetup):
//! no stdin unless given, stdout discarded, stderr kept (bounded) for the error.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// Most bytes of a tool's stderr kept for the console log and errors.
const MAX_SAID: u64 = 4096;

/// A tool that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// Its exit status, when it exited.
    pub code: Option<i32>,
    /// What happened, with what it said on stderr.
    pub message: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn failed(message: String) -> Failed {
    Failed {
        code: None,
        message,
    }
}

/// Run `program` with `args`, writing `input` to its stdin (then closing it) when given.
/// Ok when it exits 0; else what it said. The input is written from this thread before
/// the output is read: tools here read their stdin (a key) before writing much, and the
/// pipe holds 64 KiB.
pub fn run(program: &Path, args: &[&str], input: Option<&[u8]>) -> Result<(), Failed> {
    let mut child = Command::new(program)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            failed(format!(
                "running {}: {}",
                program.display(),
                crate::error::errno_text(&e)
            ))
        })?;
    if let (Some(mut stdin), Some(bytes)) = (child.stdin.take(), input) {
        // A tool that exits early closes the pipe; its status says why.
        let _ = stdin.write_all(bytes);
    }
    let mut said = String::new();
    if let Some(err) = child.stderr.take() {
        let _ = err.take(MAX_SAID).read_to_string(&mut said);
    }
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // PID 1's reaper thread may collect the child first; ECHILD then, and the reaper
    // kept its status.
    let said = said.trim().to_string();
    let fail = |code: i32| Failed {
        code: Some(code),
        message: format!(
            "{name} {}: exit status {code}: {said}",
            args.first().unwrap_or(&"")
        ),
    };
    match child.wait() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(Failed {
            code: s.code(),
            message: format!("{name} {}: {s}: {said}", args.first().unwrap_or(&"")),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
            match crate::init::reaped_exit_code(child.id()) {
                Some(0) => Ok(()),
                Some(code) => Err(fail(code)),
                None => Err(failed(format!("{name}: its exit status was lost"))),
            }
        }
        Err(e) => Err(failed(format!("waiting for {name}: {e}"))),
    }
}
