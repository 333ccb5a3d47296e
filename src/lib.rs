//! imgsafe: look inside untrusted disk images without root.
//!
//! Image containers are decoded here, in the host process ([`format`]), served over a
//! private NBD socket ([`nbd`]) to a throwaway QEMU appliance ([`vm`], [`appliance`]),
//! where a small guest agent mounts and reads the filesystems. [`session`] ties these
//! together; [`commands`] are the subcommands.

pub mod agent_client;
pub mod appliance;
pub mod bulk;
pub mod bytes;
pub mod cli;
pub mod commands;
pub mod error;
pub mod format;
pub mod guest_os;
pub mod image;
pub mod inspect;
pub mod key;
pub mod nbd;
pub mod rundir;
pub mod session;
pub mod terminal;
pub mod trace;
pub mod vm;
pub mod warm;

pub use error::{Error, Result};

use clap::Parser;
use std::ffi::OsString;

/// Parse `args`, run the command, print any error as one line, and return the exit code.
pub fn main_with_args<I: IntoIterator<Item = OsString>>(args: I) -> i32 {
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // --help and --version print as clap lays them out.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return error::exit::OK;
        }
        Err(e) => {
            eprintln!("imgsafe: {}", usage_line(&e.render().to_string()));
            return error::exit::USAGE;
        }
    };
    trace::set_verbose(cli.verbose);
    match commands::run(cli.command) {
        Ok(code) => code,
        // Whatever failed after SIGINT/SIGTERM failed because of it (QEMU was killed).
        Err(_) if vm::reaper::interrupted() => {
            eprintln!("imgsafe: {}", Error::Interrupted);
            Error::Interrupted.exit_code()
        }
        Err(e) => {
            eprintln!("imgsafe: {}", printable(&e.to_string()));
            e.exit_code()
        }
    }
}

/// A clap usage error as one line: its message (the lines before the usage block,
/// joined) and where to read more; the full usage is one `--help` away.
fn usage_line(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    let text = message.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    format!("{} (see imgsafe --help)", printable(text))
}

/// Most characters of one error line.
const MAX_MESSAGE: usize = 2000;

/// An error message, which may carry guest- or image-supplied bytes, as one bounded
/// line that cannot drive the user's terminal.
fn printable(s: &str) -> String {
    terminal::printable_max(s, MAX_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_are_one_line_naming_the_problem() {
        let e = cli::Cli::try_parse_from(["imgsafe", "cat", "disk.img"]).unwrap_err();

        let line = usage_line(&e.render().to_string());

        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("required arguments were not provided: <PATHS>..."),
            "{line}"
        );
        assert!(line.ends_with("(see imgsafe --help)"), "{line}");
    }

    #[test]
    fn escape_sequences_and_newlines_never_reach_the_terminal() {
        let shown = printable("mount: \x1b]0;pwned\x07 bad\nsecond line");

        assert_eq!(shown, "mount: ?]0;pwned? bad?second line");
    }

    #[test]
    fn long_messages_are_cut() {
        let shown = printable(&"é".repeat(5000));

        assert_eq!(shown.chars().count(), MAX_MESSAGE + 3);
    }
}
