//! `imgsafe filesystems`.

use crate::cli::FilesystemsArgs;
use crate::Result;

/// Run `imgsafe filesystems`.
pub fn run(args: FilesystemsArgs) -> Result<()> {
    let _ = args;
    Err(crate::Error::Other("not written yet".into()))
}
