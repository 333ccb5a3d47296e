//! MD RAID: arrays whose members are on the image's disks are assembled read-only with
//! the host's mdadm (copied into the appliance), once per boot and only when a member
//! is seen. `--readonly` starts every array read-only (no resync, no recovery, no
//! superblock update) and `--run` starts a degraded one too; the disks are read-only
//! virtio devices besides, so nothing can reach an image.
//!
//! Without udev, mdadm makes the `/dev/mdN` nodes and `/dev/md/NAME` links itself; an
//! array is listed by that link's name, which is what fstab and users use.

use imgsafe_proto::FsInfo;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the appliance builder puts the host's `mdadm` binary.
pub const MDADM_BINARY: &str = "/sbin/mdadm";
/// The appliance's mdadm configuration (written by the appliance builder).
pub const MDADM_CONFIG: &str = "/etc/mdadm/mdadm.conf";
/// Probe type of an MD RAID member.
pub const MEMBER_TYPE: &str = "linux_raid_member";
/// Longest array name read from `/dev/md` (md names are at most 32 bytes).
const MAX_NAME: usize = 64;

/// Whether assembly already ran in this boot.
static ASSEMBLED: AtomicBool = AtomicBool::new(false);

/// If `list` holds a RAID member and `mdadm` is given, load the md modules and assemble
/// every array read-only (once per boot). True when it ran.
pub fn assemble_if_members(list: &[FsInfo], mdadm: Option<&Path>, log: &dyn Fn(&str)) -> bool {
    let has_member = list
        .iter()
        .any(|f| f.fstype.as_deref() == Some(MEMBER_TYPE));
    let Some(mdadm) = mdadm.filter(|_| has_member) else {
        return false;
    };
    if ASSEMBLED.swap(true, Ordering::SeqCst) {
        return false;
    }
    crate::init::load_fs_modules("md");
    // raid456 is loaded only for parity levels: loading it benchmarks the parity code
    // (CONFIG_RAID6_PQ_BENCHMARK), most of a second under TCG.
    if list
        .iter()
        .filter(|f| f.fstype.as_deref() == Some(MEMBER_TYPE))
        .any(|f| needs_parity(Path::new(&f.device), f.size))
    {
        crate::init::load_fs_modules("md_parity");
    }
    let config = format!("--config={MDADM_CONFIG}");
    let args = ["--assemble", "--scan", "--readonly", "--run", &config];
    if let Err(e) = crate::tool::run(mdadm, &args, None) {
        log(&format!("MD RAID assembly: {e}"));
    }
    true
}

/// Whether the member at `path` is of a parity level (4, 5, 6), or cannot be read: then
/// the parity module is loaded in case.
fn needs_parity(path: &Path, size: u64) -> bool {
    match std::fs::File::open(path) {
        Ok(f) => crate::probe::md_level(&f, size).is_none_or(|l| (4..=6).contains(&l)),
        Err(_) => true,
    }
}

/// The `/dev/md/NAME` of md device `node` (`md127`): the link in `dev/md` that points
/// to it, if mdadm made one with a plain name.
pub fn array_name(dev: &Path, node: &str) -> Option<String> {
    let rd = std::fs::read_dir(dev.join("md")).ok()?;
    let mut names: Vec<String> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            (target.file_name()? == node && valid_name(&name)).then_some(name)
        })
        .collect();
    names.sort();
    names.into_iter().next().map(|n| format!("/dev/md/{n}"))
}

/// A name safe to show and to match fstab against: printable ASCII without `/` or
/// spaces, not `.` or `..`.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n != "."
        && n != ".."
        && n.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_array_goes_by_the_name_of_its_link_in_dev_md() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("md")).unwrap();
        std::os::unix::fs::symlink("../md127", t.path().join("md/data")).unwrap();
        std::os::unix::fs::symlink("../md126", t.path().join("md/other")).unwrap();

        assert_eq!(
            array_name(t.path(), "md127").as_deref(),
            Some("/dev/md/data")
        );
        assert_eq!(array_name(t.path(), "md125"), None);
    }

    #[test]
    fn a_list_without_members_runs_nothing() {
        let list = vec![FsInfo {
            device: "/dev/vda".into(),
            size: 1 << 20,
            fstype: Some("ext4".into()),
            label: None,
            uuid: None,
            partition: None,
            partuuid: None,
            partitioned: false,
        }];

        assert!(!assemble_if_members(
            &list,
            Some(Path::new("/nonexistent")),
            &|_| {}
        ));
    }
}
