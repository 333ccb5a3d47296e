//! From what the user typed to an opened, decoded image.

use crate::format::{self, BlockSource, FormatError, OpenOptions};
use crate::Result;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest disk QEMU's block layer takes: `BDRV_MAX_LENGTH`, INT64_MAX rounded down to
/// `BDRV_MAX_ALIGNMENT` (1 GiB) (QEMU include/block/block_int-common.h). A larger
/// export fails `blockdev-add` with "File too large".
pub const MAX_VM_DISK_BYTES: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// Refuse, before anything boots, a decoded disk of `size` bytes the VM cannot attach.
pub fn check_vm_size(image: &Path, size: u64) -> Result<()> {
    if size > MAX_VM_DISK_BYTES {
        return Err(crate::Error::TooLarge {
            image: image.to_path_buf(),
            size,
            max: MAX_VM_DISK_BYTES,
        });
    }
    Ok(())
}

/// Name of the ploop descriptor inside a ploop image directory.
pub const DESCRIPTOR_NAME: &str = "DiskDescriptor.xml";

/// Resolve the image argument to the file to open, as the ploop tools and Parallels
/// Desktop lay images out:
/// - a directory holding `DiskDescriptor.xml` → that descriptor;
/// - a directory (a Parallels `.pvm` VM folder) holding exactly one `.hdd` bundle with a
///   descriptor → that bundle's descriptor; several → an error listing them;
/// - the empty `name.hdd` file Parallels Desktop keeps beside the descriptor → the
///   descriptor;
/// - a bare container id (`101`, or a UUID) that is not an existing path →
///   `<vz_root>/<id>/root.hdd/DiskDescriptor.xml`, or an error when nothing is there;
/// - anything else → the path as given (opening it reports what is wrong with it).
pub fn resolve(arg: &Path, vz_root: &Path) -> Result<PathBuf, FormatError> {
    if arg.is_dir() {
        let xml = arg.join(DESCRIPTOR_NAME);
        if xml.is_file() {
            return Ok(xml);
        }
        return vm_folder_disk(arg).map(|found| found.unwrap_or_else(|| arg.to_path_buf()));
    }
    if let Ok(meta) = arg.metadata() {
        let beside = arg.parent().map(|d| d.join(DESCRIPTOR_NAME));
        if let Some(xml) = beside.filter(|x| meta.is_file() && meta.len() == 0 && x.is_file()) {
            return Ok(xml);
        }
    }
    if arg.symlink_metadata().is_ok() {
        return Ok(arg.to_path_buf());
    }
    let Some(id) = arg.to_str().filter(|s| is_container_id(s)) else {
        return Ok(arg.to_path_buf());
    };
    let xml = vz_root.join(id).join("root.hdd").join(DESCRIPTOR_NAME);
    if xml.is_file() {
        return Ok(xml);
    }
    let why = format!(
        "no such file, and no container {id} under {} ({} does not exist; set --vz-root or IMGSAFE_VZ_ROOT)",
        vz_root.display(),
        xml.display()
    );
    Err(FormatError::io(
        arg,
        io::Error::new(io::ErrorKind::NotFound, why),
    ))
}

/// The descriptor of the one `.hdd` bundle inside a Parallels VM folder, `None` when the
/// folder holds none, an error naming them when it holds several (which disk is meant
/// cannot be guessed).
fn vm_folder_disk(dir: &Path) -> Result<Option<PathBuf>, FormatError> {
    let entries = std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))?;
    let mut bundles: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x.eq_ignore_ascii_case("hdd"))
                && p.join(DESCRIPTOR_NAME).is_file()
        })
        .collect();
    bundles.sort();
    match bundles.len() {
        0 => Ok(None),
        1 => Ok(Some(bundles[0].join(DESCRIPTOR_NAME))),
        _ => {
            let names: Vec<String> = bundles
                .iter()
                .filter_map(|b| b.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            Err(FormatError::Unsupported {
                path: dir.to_path_buf(),
                what: format!(
                    "the folder holds {} disk bundles ({}); name the one to open",
                    names.len(),
                    names.join(", ")
                ),
            })
        }
    }
}

/// A container id as OpenVZ / Virtuozzo name them: a number, or a UUID.
fn is_container_id(s: &str) -> bool {
    let numeric = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let uuid = s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    numeric || uuid
}

/// How to open an image, as the command line asked (parsed there, so this layer and
/// the session never see clap's types).
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// The decoder's options (`--format`, `--ignore-parent-id`, `--disk`, `--snapshot`).
    pub options: OpenOptions,
    /// Where bare OpenVZ container ids are looked up.
    pub vz_root: std::path::PathBuf,
}

/// Open and decode the image named on the command line.
pub fn open(arg: &Path, spec: &ImageSpec) -> Result<Arc<dyn BlockSource>> {
    let stage = crate::trace::stage("decode");
    let path = resolve(arg, &spec.vz_root)?;
    let src: Arc<dyn BlockSource> = Arc::from(format::open(&path, &spec.options)?);
    let top = src
        .layers()
        .first()
        .map(|l| l.format.clone())
        .unwrap_or_default();
    stage.done(&format!("{top}, {} bytes", src.size()));
    Ok(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_disk_qemu_takes_passes_and_one_more_byte_does_not() {
        let at_max = check_vm_size(Path::new("d.img"), MAX_VM_DISK_BYTES);
        let over = check_vm_size(Path::new("d.img"), MAX_VM_DISK_BYTES + 1);

        assert!(at_max.is_ok());
        assert_eq!(
            over.map_err(|e| e.exit_code()),
            Err(crate::error::exit::IMAGE)
        );
        assert_eq!(MAX_VM_DISK_BYTES, (1 << 63) - (1 << 30));
    }

    #[test]
    fn directory_with_descriptor_resolves_to_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DESCRIPTOR_NAME), "<x/>").unwrap();

        let got = resolve(dir.path(), Path::new("/nonexistent")).unwrap();

        assert_eq!(got, dir.path().join(DESCRIPTOR_NAME));
    }

    #[test]
    fn vm_folder_with_one_bundle_resolves_to_its_descriptor() {
        let vm = tempfile::tempdir().unwrap();
        let hdd = vm.path().join("disk0.hdd");
        std::fs::create_dir(&hdd).unwrap();
        std::fs::write(hdd.join(DESCRIPTOR_NAME), "<x/>").unwrap();
        std::fs::write(vm.path().join("config.pvs"), "<x/>").unwrap();

        let got = resolve(vm.path(), Path::new("/nonexistent")).unwrap();

        assert_eq!(got, hdd.join(DESCRIPTOR_NAME));
    }

    #[test]
    fn vm_folder_with_several_bundles_lists_them() {
        let vm = tempfile::tempdir().unwrap();
        for name in ["b.hdd", "a.hdd"] {
            std::fs::create_dir(vm.path().join(name)).unwrap();
            std::fs::write(vm.path().join(name).join(DESCRIPTOR_NAME), "<x/>").unwrap();
        }

        let err = resolve(vm.path(), Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();

        assert!(
            err.ends_with(
                "unsupported: the folder holds 2 disk bundles (a.hdd, b.hdd); name the one to open"
            ),
            "{err}"
        );
    }

    #[test]
    fn empty_name_hdd_beside_the_descriptor_resolves_to_it() {
        let hdd = tempfile::tempdir().unwrap();
        std::fs::write(hdd.path().join(DESCRIPTOR_NAME), "<x/>").unwrap();
        std::fs::write(hdd.path().join("disk.hdd"), "").unwrap();

        let got = resolve(&hdd.path().join("disk.hdd"), Path::new("/nonexistent")).unwrap();

        assert_eq!(got, hdd.path().join(DESCRIPTOR_NAME));
    }

    #[test]
    fn container_id_resolves_under_vz_root() {
        let root = tempfile::tempdir().unwrap();
        let hdd = root.path().join("101/root.hdd");
        std::fs::create_dir_all(&hdd).unwrap();
        std::fs::write(hdd.join(DESCRIPTOR_NAME), "<x/>").unwrap();

        let got = resolve(Path::new("101"), root.path()).unwrap();

        assert_eq!(got, hdd.join(DESCRIPTOR_NAME));
    }

    #[test]
    fn missing_container_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();

        let err = resolve(Path::new("4242"), root.path())
            .unwrap_err()
            .to_string();

        assert!(
            err.starts_with("4242: no such file, and no container 4242 under"),
            "{err}"
        );
    }

    #[test]
    fn other_missing_paths_pass_through() {
        let got = resolve(Path::new("no-such-disk.img"), Path::new("/vz/private")).unwrap();

        assert_eq!(got, Path::new("no-such-disk.img"));
    }

    #[test]
    fn recognises_container_ids() {
        assert!(is_container_id("101"));
        assert!(is_container_id("1b2e3c4d-0000-4000-8000-00000000abcd"));
        assert!(!is_container_id("disk.img"));
        assert!(!is_container_id(""));
    }
}
