//! One file per subcommand. Each takes its parsed arguments and returns `Result<()>`.

pub mod appliance;
pub mod cat;
pub mod completions;
pub mod cp;
pub mod filesystems;
pub mod info;
pub mod inspect;
pub mod ls;
pub mod serve;
pub mod shell;

use crate::cli::Command;
use crate::Result;

/// Run one parsed subcommand. Appliance and guest failures are reported against the
/// image the command was working on, as every other failure is.
pub fn run(cmd: Command) -> Result<()> {
    let image = match &cmd {
        Command::Ls(a) => Some(a.image.clone()),
        Command::Cat(a) => Some(a.image.clone()),
        Command::Filesystems(a) => Some(a.image.clone()),
        Command::Shell(a) => Some(a.image.clone()),
        Command::Inspect(a) => Some(a.image.clone()),
        // cp names its image inside its sources; info and serve start no VM.
        _ => None,
    };
    let result = dispatch(cmd);
    match image {
        Some(image) => result.map_err(|e| e.with_image(&image)),
        None => result,
    }
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Ls(a) => ls::run(a),
        Command::Cat(a) => cat::run(a),
        Command::Cp(a) => cp::run(a),
        Command::Filesystems(a) => filesystems::run(a),
        Command::Info(a) => info::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Appliance(a) => appliance::run(a),
        Command::Shell(a) => shell::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Completions(a) => completions::completions(a),
        Command::Man => completions::man(),
    }
}
