//! `imgsafe cp`.

use crate::cli::CpArgs;
use crate::Result;

/// Run `imgsafe cp`.
pub fn run(args: CpArgs) -> Result<()> {
    let _ = args;
    Err(crate::Error::Other("not written yet".into()))
}
