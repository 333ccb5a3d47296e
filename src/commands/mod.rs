//! One file per subcommand. Each takes its parsed arguments and returns `Result<()>`.

pub mod appliance;
pub mod cat;
pub mod cp;
pub mod filesystems;
pub mod info;
pub mod ls;
pub mod serve;
pub mod shell;

use crate::cli::Command;
use crate::Result;

/// Run one parsed subcommand.
pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Ls(a) => ls::run(a),
        Command::Cat(a) => cat::run(a),
        Command::Cp(a) => cp::run(a),
        Command::Filesystems(a) => filesystems::run(a),
        Command::Info(a) => info::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Appliance(a) => appliance::run(a),
        Command::Shell(a) => shell::run(a),
    }
}
