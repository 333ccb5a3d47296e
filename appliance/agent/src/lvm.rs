//! LVM: activate the volume groups found on the image's disks with the host's lvm2
//! tools (copied into the appliance with their libraries), then give every logical
//! volume its `/dev/VG/LV` name.
//!
//! There is no udev in the appliance: the appliance's `/etc/lvm/lvm.conf` turns udev
//! synchronisation off, so libdevmapper creates `/dev/mapper/*` itself, and this module
//! makes the `/dev/VG/LV` links from sysfs (`dm/name`, `dm/uuid`), which is what the
//! kernel actually activated. The image disk is attached read-only, so activation can
//! never write LVM metadata back to it.

use crate::devices::{list_filesystems, DeviceRoots};
use imgsafe_proto::FsInfo;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the appliance builder puts the host's `lvm` binary.
pub const LVM_BINARY: &str = "/sbin/lvm";
/// Probe type of an LVM physical volume.
pub const PV_TYPE: &str = "LVM2_member";
/// Prefix of the device-mapper UUID of every LVM logical volume (lib/activate/dev_manager.c).
const DM_UUID_PREFIX: &str = "LVM-";

/// Whether activation already ran in this boot (it is done once, on the first listing).
static ACTIVATED: AtomicBool = AtomicBool::new(false);

/// The tools that build volumes out of the disks (None: never run that one).
#[derive(Debug, Clone, Default)]
pub struct Tools {
    /// lvm, which activates volume groups.
    pub lvm: Option<PathBuf>,
    /// mdadm, which assembles RAID arrays.
    pub mdadm: Option<PathBuf>,
    /// cryptsetup, which opens LUKS containers (only when the host sends a key).
    pub cryptsetup: Option<PathBuf>,
}

/// List the devices; assemble the RAID arrays whose members are among them (their
/// content may be a physical volume), then, if a physical volume is among them, activate
/// every volume group (each once per boot), listing again after each so that what they
/// made is included.
pub fn list_with_volumes(roots: &DeviceRoots, tools: &Tools, log: &dyn Fn(&str)) -> Vec<FsInfo> {
    let mut list = list_filesystems(roots);
    if crate::md::assemble_if_members(&list, tools.mdadm.as_deref(), log) {
        list = list_filesystems(roots);
    }
    let lvm = tools.lvm.as_deref();
    let has_pv = list.iter().any(|f| f.fstype.as_deref() == Some(PV_TYPE));
    let Some(lvm) = lvm.filter(|_| has_pv) else {
        return list;
    };
    if ACTIVATED.swap(true, Ordering::SeqCst) {
        return list;
    }
    if let Err(e) = activate(lvm) {
        log(&format!("LVM activation: {e}"));
    }
    let linked = link_volumes(roots);
    if linked == 0 {
        log("LVM activation: no logical volume appeared");
    }
    list_filesystems(roots)
}

/// Load device-mapper and run `lvm vgchange -ay`.
fn activate(lvm: &Path) -> Result<(), String> {
    crate::init::load_fs_modules("dm");
    crate::tool::run(lvm, &["vgchange", "--activate", "y", "--sysinit"], None)
        .map_err(|e| e.message)
}

pub use imgsafe_proto::lvm_names::split_dm_name;

/// The (VG, LV) of a sysfs block device that is an active LVM logical volume.
pub fn lv_of(sysdir: &Path) -> Option<(String, String)> {
    let uuid = std::fs::read_to_string(sysdir.join("dm/uuid")).ok()?;
    if !uuid.trim().starts_with(DM_UUID_PREFIX) {
        return None;
    }
    split_dm_name(std::fs::read_to_string(sysdir.join("dm/name")).ok()?.trim())
}

/// Make `/dev/VG/LV -> ../dm-N` for every active LV that lacks it; returns the number of
/// LVs found. A name that clashes with an existing non-directory in /dev is left alone.
pub fn link_volumes(roots: &DeviceRoots) -> usize {
    let mut found = 0;
    let Ok(rd) = std::fs::read_dir(roots.sys.join("block")) else {
        return 0;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((vg, lv)) = name.starts_with("dm-").then(|| lv_of(&e.path())).flatten() else {
            continue;
        };
        found += 1;
        let dir: PathBuf = roots.dev.join(&vg);
        if !dir.is_dir() && std::fs::create_dir(&dir).is_err() {
            continue;
        }
        let link = dir.join(&lv);
        if std::fs::symlink_metadata(&link).is_err() {
            let _ = std::os::unix::fs::symlink(Path::new("..").join(&name), &link);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tools::run;
    use std::fs;

    #[test]
    fn logical_volumes_are_listed_as_dev_vg_lv_and_probed_through_their_node() {
        let t = tempfile::tempdir().unwrap();
        let roots = DeviceRoots {
            sys: t.path().join("sys"),
            dev: t.path().join("dev"),
        };
        let d = roots.sys.join("block/dm-3");
        fs::create_dir_all(d.join("dm")).unwrap();
        fs::write(d.join("size"), format!("{}\n", (8u64 << 20) / 512)).unwrap();
        fs::write(d.join("dm/name"), "vg0-lv--x\n").unwrap();
        fs::write(d.join("dm/uuid"), "LVM-0123\n").unwrap();
        fs::create_dir_all(&roots.dev).unwrap();
        let node = roots.dev.join("dm-3");
        fs::File::create(&node).unwrap().set_len(8 << 20).unwrap();
        run(
            "dosfstools",
            "mkfs.vfat",
            &["-n", "LVDATA", node.to_str().unwrap()],
        );

        let list = list_with_volumes(&roots, &Tools::default(), &|_| {});

        let got: Vec<(&str, Option<&str>, Option<&str>)> = list
            .iter()
            .map(|f| (f.device.as_str(), f.fstype.as_deref(), f.label.as_deref()))
            .collect();
        assert_eq!(got, [("/dev/vg0/lv-x", Some("vfat"), Some("LVDATA"))]);
    }

    #[test]
    fn links_are_made_for_lvm_volumes_only() {
        let t = tempfile::tempdir().unwrap();
        let roots = DeviceRoots {
            sys: t.path().join("sys"),
            dev: t.path().join("dev"),
        };
        for (dm, name, uuid) in [
            ("dm-0", "vg0-my--data", "LVM-abcdef"),
            ("dm-1", "cryptroot", "CRYPT-LUKS2-x"),
        ] {
            let d = roots.sys.join("block").join(dm).join("dm");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("name"), format!("{name}\n")).unwrap();
            fs::write(d.join("uuid"), format!("{uuid}\n")).unwrap();
        }
        fs::create_dir_all(&roots.dev).unwrap();

        let n = link_volumes(&roots);

        assert_eq!(n, 1);
        assert_eq!(
            fs::read_link(roots.dev.join("vg0/my-data")).unwrap(),
            Path::new("../dm-0")
        );
        assert!(!roots.dev.join("cryptroot").exists());
    }
}
