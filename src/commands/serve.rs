//! `imgsafe serve`.

use crate::cli::ServeArgs;
use crate::Result;

/// Run `imgsafe serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let _ = args;
    Err(crate::Error::Other("not written yet".into()))
}
