//! `imgsafe cat`.

use crate::cli::CatArgs;
use crate::Result;

/// Run `imgsafe cat`.
pub fn run(args: CatArgs) -> Result<()> {
    let _ = args;
    Err(crate::Error::Other("not written yet".into()))
}
