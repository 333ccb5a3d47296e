//! imgsafe: look inside untrusted disk images without root.
//!
//! Image containers are decoded here, in the host process ([`format`]), served over a
//! private NBD socket ([`nbd`]) to a throwaway QEMU appliance ([`vm`], [`appliance`]),
//! where a small guest agent mounts and reads the filesystems. [`session`] ties these
//! together; [`commands`] are the subcommands.

pub mod agent_client;
pub mod appliance;
pub mod cli;
pub mod commands;
pub mod error;
pub mod format;
pub mod image;
pub mod inspect;
pub mod nbd;
pub mod session;
pub mod trace;
pub mod vm;

pub use error::{Error, Result};

use clap::Parser;
use std::ffi::OsString;

/// Parse `args`, run the command, print any error as one line, and return the exit code.
pub fn main_with_args<I: IntoIterator<Item = OsString>>(args: I) -> i32 {
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { error::exit::USAGE } else { error::exit::OK };
            let _ = e.print();
            return code;
        }
    };
    trace::set_verbose(cli.verbose);
    match commands::run(cli.command) {
        Ok(()) => error::exit::OK,
        // Whatever failed after SIGINT/SIGTERM failed because of it (QEMU was killed).
        Err(_) if vm::reaper::interrupted() => {
            eprintln!("imgsafe: {}", Error::Interrupted);
            Error::Interrupted.exit_code()
        }
        Err(e) => {
            eprintln!("imgsafe: {e}");
            e.exit_code()
        }
    }
}
