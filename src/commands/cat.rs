//! `imgsafe cat`: write files of the image to stdout, binary-safe and streamed.

use crate::cli::CatArgs;
use crate::session::Session;
use crate::{Error, Result};
use std::io::{self, Write};

/// Run `imgsafe cat`.
pub fn run(args: CatArgs) -> Result<()> {
    let mut s = Session::open_mounted(&args.image, &args.image_args, &args.guest, &args.mount)?;
    let stage = crate::trace::stage("cat");
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let mut result = Ok(());
    let mut total = 0;
    for p in &args.paths {
        match s.fs().read_file(p.as_bytes(), &mut out) {
            Ok(n) => total += n,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let flushed = out.flush();
    stage.done(&format!("{total} bytes"));
    let result =
        result.and_then(|_| flushed.map_err(|e| Error::Other(format!("writing output: {e}"))));
    match result {
        Ok(()) => s.finish(),
        // A reader that went away (`imgsafe cat ... | head`) is not an error.
        Err(Error::Other(m)) if m.contains("Broken pipe") => s.finish(),
        Err(e) => {
            let e = s.annotate(e);
            s.abort();
            Err(e)
        }
    }
}
