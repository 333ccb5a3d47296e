//! `IMAGE:/PATH... DEST` into the image, the guest paths and DEST.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Split `IMAGE:/PATH` at the first ":/" whose prefix exists as a file or directory (an
/// image path may itself contain ":/"), else at the first ":/".
pub(super) fn split_source_arg(arg: &str) -> Result<(PathBuf, Vec<u8>)> {
    let mut first = None;
    for (i, _) in arg.match_indices(":/").filter(|&(i, _)| i > 0) {
        if std::fs::symlink_metadata(&arg[..i]).is_ok() {
            return Ok((PathBuf::from(&arg[..i]), arg.as_bytes()[i + 1..].to_vec()));
        }
        first.get_or_insert(i);
    }
    match first {
        Some(i) => Ok((PathBuf::from(&arg[..i]), arg.as_bytes()[i + 1..].to_vec())),
        None => Err(Error::Usage(format!(
            "{arg}: a source must be IMAGE:/PATH (the path in the image starting with /)"
        ))),
    }
}

fn same_image(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// `IMAGE:/PATH... DEST` → the image, the guest paths and DEST.
pub(super) fn parse_args(args: &[String]) -> Result<(PathBuf, Vec<Vec<u8>>, PathBuf)> {
    let (dest, sources) = match args.split_last() {
        Some((d, s)) if !s.is_empty() => (d, s),
        _ => return Err(Error::Usage("cp needs IMAGE:/PATH... DEST".into())),
    };
    let mut image: Option<PathBuf> = None;
    let mut paths = Vec::with_capacity(sources.len());
    for arg in sources {
        let (img, path) = split_source_arg(arg)?;
        match &image {
            Some(first) if !same_image(first, &img) => {
                return Err(Error::Usage(format!(
                    "all sources must come from the same image ({} and {})",
                    first.display(),
                    img.display()
                )));
            }
            Some(_) => {}
            None => image = Some(img),
        }
        paths.push(path);
    }
    let image = image.ok_or_else(|| Error::Usage("cp needs IMAGE:/PATH... DEST".into()))?;
    Ok((image, paths, PathBuf::from(dest)))
}
