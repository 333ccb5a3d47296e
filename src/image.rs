//! From what the user typed to an opened, decoded image.

use crate::cli::ImageArgs;
use crate::format::{self, BlockSource, OpenOptions};
use crate::Result;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Resolve the image argument to the file to open. Plain paths are used as they are;
/// ploop directories and bare container ids are resolved by the format layer.
pub fn resolve(arg: &Path, args: &ImageArgs) -> PathBuf {
    let _ = args;
    arg.to_path_buf()
}

/// Open and decode the image named on the command line.
pub fn open(arg: &Path, args: &ImageArgs) -> Result<Arc<dyn BlockSource>> {
    let stage = crate::trace::stage("decode");
    let path = resolve(arg, args);
    let opts = OpenOptions { format: args.format, ignore_parent_id: args.ignore_parent_id };
    let src: Arc<dyn BlockSource> = Arc::from(format::open(&path, &opts)?);
    let top = src.layers().first().map(|l| l.format.clone()).unwrap_or_default();
    stage.done(&format!("{top}, {} bytes", src.size()));
    Ok(src)
}
