//! `ListFilesystems`: block devices from sysfs, each probed by [`crate::probe`].

use crate::probe::{partition_table, probe, PartEntry, Probe};
use imgsafe_proto::FsInfo;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Device name prefixes that never hold the image.
const SKIPPED: [&str; 3] = ["loop", "ram", "zram"];
/// Bytes per sysfs `size` unit (always 512, whatever the logical block size).
const SYSFS_SECTOR: u64 = 512;

/// Where the agent looks for devices: `/sys` and `/dev` in the guest, temp dirs in tests.
#[derive(Debug, Clone)]
pub struct DeviceRoots {
    /// sysfs mount (contains `block/`).
    pub sys: PathBuf,
    /// devtmpfs mount.
    pub dev: PathBuf,
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn sectors_to_bytes(dir: &Path) -> u64 {
    read_trimmed(&dir.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .and_then(|n| n.checked_mul(SYSFS_SECTOR))
        .unwrap_or(0)
}

fn sorted_dir(p: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn probe_path(path: &Path, size: u64) -> (Probe, Option<Vec<PartEntry>>) {
    match File::open(path) {
        Ok(f) => (probe(&f, size), partition_table(&f, size)),
        Err(_) => (Probe::default(), None),
    }
}

/// Guest path (as reported) and local path (as opened) of a sysfs block device.
fn device_paths(roots: &DeviceRoots, name: &str, sysdir: &Path) -> (String, PathBuf) {
    if name.starts_with("dm-") {
        // An LVM logical volume goes by /dev/VG/LV, the name fstab and users use; it is
        // opened through its kernel node, which exists whatever links were made.
        if let Some((vg, lv)) = crate::lvm::lv_of(sysdir) {
            return (format!("/dev/{vg}/{lv}"), roots.dev.join(name));
        }
        if let Some(dm) =
            read_trimmed(&sysdir.join("dm/name")).filter(|n| !n.is_empty() && !n.contains('/'))
        {
            return (
                format!("/dev/mapper/{dm}"),
                roots.dev.join("mapper").join(dm),
            );
        }
    }
    if name.starts_with("md") {
        if let Some(array) = crate::md::array_name(&roots.dev, name) {
            return (array, roots.dev.join(name));
        }
    }
    (format!("/dev/{name}"), roots.dev.join(name))
}

fn info(device: String, size: u64, p: Probe) -> FsInfo {
    FsInfo {
        device,
        size,
        fstype: p.fstype,
        label: p.label,
        uuid: p.uuid,
        partition: None,
        partuuid: None,
        partitioned: p.partitioned,
    }
}

/// Every disk, partition and device-mapper volume, disks each followed by their partitions.
pub fn list_filesystems(roots: &DeviceRoots) -> Vec<FsInfo> {
    let mut out = Vec::new();
    let mut block = sorted_dir(&roots.sys.join("block"));
    // Disks and their partitions first, then the volumes built on them: RAID arrays,
    // then device-mapper volumes (which may sit on an array).
    block.sort_by_key(|(name, _)| match name {
        n if n.starts_with("dm-") => 2,
        n if n.starts_with("md") => 1,
        _ => 0,
    });
    for (name, sysdir) in block {
        if SKIPPED.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let size = sectors_to_bytes(&sysdir);
        if size == 0 {
            continue;
        }
        let (device, local) = device_paths(roots, &name, &sysdir);
        let (content, table) = probe_path(&local, size);
        let mut parts: Vec<(u32, String, PathBuf)> = sorted_dir(&sysdir)
            .into_iter()
            .filter_map(|(pname, pdir)| {
                let n = read_trimmed(&pdir.join("partition"))?.parse().ok()?;
                Some((n, pname, pdir))
            })
            .collect();
        parts.sort();
        let mut disk = info(device, size, content);
        if disk.partitioned || !parts.is_empty() {
            disk = FsInfo {
                partitioned: true,
                fstype: None,
                label: None,
                uuid: None,
                ..disk
            };
        }
        out.push(disk);
        for (number, pname, pdir) in parts {
            let psize = sectors_to_bytes(&pdir);
            let (pcontent, _) = probe_path(&roots.dev.join(&pname), psize);
            let partuuid = table
                .iter()
                .flatten()
                .find(|e| e.number == number)
                .and_then(|e| e.partuuid.clone());
            out.push(FsInfo {
                partition: Some(number),
                partuuid,
                ..info(format!("/dev/{pname}"), psize, pcontent)
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tools::run;
    use std::fs;

    fn sysfs_dev(dir: &Path, size_bytes: u64, extra: &[(&str, &str)]) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("size"), format!("{}\n", size_bytes / 512)).unwrap();
        for (f, v) in extra {
            fs::create_dir_all(dir.join(f).parent().unwrap()).unwrap();
            fs::write(dir.join(f), v).unwrap();
        }
    }

    fn file(p: &Path, size: u64) -> &str {
        fs::File::create(p).unwrap().set_len(size).unwrap();
        p.to_str().unwrap()
    }

    #[test]
    fn disks_partitions_and_dm_volumes_are_listed_and_probed() {
        let t = tempfile::tempdir().unwrap();
        let roots = DeviceRoots {
            sys: t.path().join("sys"),
            dev: t.path().join("dev"),
        };
        fs::create_dir_all(roots.dev.join("mapper")).unwrap();
        let disk = roots.dev.join("vda");
        run(
            "gdisk",
            "sgdisk",
            &[
                "-n",
                "1:2048:+8M",
                "-u",
                "1:0A0B0C0D-1111-2222-3333-444455556666",
                file(&disk, 16 << 20),
            ],
        );
        let part = roots.dev.join("vda1");
        run(
            "e2fsprogs",
            "mkfs.ext4",
            &["-q", "-F", "-L", "root", file(&part, 8 << 20)],
        );
        let lv = roots.dev.join("mapper/vg-data");
        run(
            "dosfstools",
            "mkfs.vfat",
            &["-n", "DATA", file(&lv, 8 << 20)],
        );
        let block = roots.sys.join("block");
        sysfs_dev(&block.join("vda"), 16 << 20, &[]);
        sysfs_dev(&block.join("vda/vda1"), 8 << 20, &[("partition", "1\n")]);
        sysfs_dev(&block.join("dm-0"), 8 << 20, &[("dm/name", "vg-data\n")]);
        sysfs_dev(&block.join("loop0"), 8 << 20, &[]);
        sysfs_dev(&block.join("sr0"), 0, &[]);

        let list = list_filesystems(&roots);

        #[allow(clippy::type_complexity)]
        let summary: Vec<(
            &str,
            Option<&str>,
            Option<&str>,
            Option<u32>,
            Option<&str>,
            bool,
        )> = list
            .iter()
            .map(|f| {
                (
                    f.device.as_str(),
                    f.fstype.as_deref(),
                    f.label.as_deref(),
                    f.partition,
                    f.partuuid.as_deref(),
                    f.partitioned,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("/dev/vda", None, None, None, None, true),
                (
                    "/dev/vda1",
                    Some("ext4"),
                    Some("root"),
                    Some(1),
                    Some("0a0b0c0d-1111-2222-3333-444455556666"),
                    false
                ),
                (
                    "/dev/mapper/vg-data",
                    Some("vfat"),
                    Some("DATA"),
                    None,
                    None,
                    false
                ),
            ]
        );
        assert_eq!(list[1].size, 8 << 20);
    }
}
