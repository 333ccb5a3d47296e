//! `imgsafe ls`.

use crate::cli::LsArgs;
use crate::Result;

/// Run `imgsafe ls`.
pub fn run(args: LsArgs) -> Result<()> {
    let _ = args;
    Err(crate::Error::Other("not written yet".into()))
}
