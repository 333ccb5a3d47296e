//! `imgsafe cat`: write files of the image to stdout, binary-safe and streamed.

use crate::cli::CatArgs;
use crate::session::Session;
use crate::{Error, Result};
use std::io::{self, Write};

/// Run `imgsafe cat`.
pub fn run(args: CatArgs) -> Result<()> {
    Session::run_mounted(&args.image, &args.image_args, &args.mount, |s| {
        let stage = crate::trace::stage("cat");
        let stdout = io::stdout();
        let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
        let mut total = 0;
        for p in &args.paths {
            match s.fs().read_file(p.as_bytes(), &mut out) {
                Ok(n) => total += n,
                // The reader went away mid-file (`imgsafe cat ... | head`): not an error.
                Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    stage.done(&format!("{total} bytes, reader gone"));
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        let flushed = crate::error::write_output(out.flush());
        stage.done(&format!("{total} bytes"));
        flushed
    })
}
