//! `imgsafe info`.

use crate::cli::InfoArgs;
use crate::Result;

/// Run `imgsafe info`.
pub fn run(args: InfoArgs) -> Result<()> {
    let _ = args;
    Err(crate::Error::Other("not written yet".into()))
}
