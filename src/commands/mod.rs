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

/// Run one parsed subcommand; `Ok` holds the exit code: 0, or a shell's own status.
/// Every command that works on an image names it in its errors through its session
/// (see [`crate::Error::about_image`]).
pub fn run(cmd: Command) -> Result<i32> {
    let done = |r: Result<()>| r.map(|()| crate::error::exit::OK);
    match cmd {
        Command::Ls(a) => done(ls::run(a)),
        Command::Cat(a) => done(cat::run(a)),
        Command::Cp(a) => done(cp::run(a)),
        Command::Filesystems(a) => done(filesystems::run(a)),
        Command::Info(a) => done(info::run(a)),
        Command::Serve(a) => done(serve::run(a)),
        Command::Appliance(a) => done(appliance::run(a)),
        Command::Shell(a) => shell::run(a),
        Command::Inspect(a) => done(inspect::run(a)),
        Command::Completions(a) => done(completions::completions(a)),
        Command::Man => done(completions::man()),
    }
}
