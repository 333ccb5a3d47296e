//! Helpers shared by the agent's unit tests, which build their inputs with real tools.

use std::process::Command;

/// Run a tool, failing the test with the Debian package to install if it is missing and
/// with the tool's stderr if it fails.
pub fn run(package: &str, prog: &str, args: &[&str]) {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| {
        panic!("{prog} not runnable ({e}): install the Debian package {package}")
    });
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
