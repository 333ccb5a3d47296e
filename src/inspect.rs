//! The guest as its OS sees it: which of the filesystems the agent found is the root,
//! what its `/etc/fstab` says goes where, and how `-m DEV[:MOUNTPOINT]` assembles a
//! tree by hand. Pure functions over the agent's device list; the session does the
//! mounting.
//!
//! `/etc/fstab` is image content, hence hostile: it is read bounded ([`MAX_FSTAB`]),
//! parsed here on the host as bytes, and every text taken from it is cleaned before it
//! reaches a terminal.

use imgsafe_proto::fstypes::{fs_type, is_mountable as mountable_type};
use imgsafe_proto::{unescape_octal, FsInfo, Subvolume, BTRFS_TOP_LEVEL};

/// Largest `/etc/fstab` read (a real one is a few hundred bytes).
pub const MAX_FSTAB: u64 = 1 << 20;
/// Most fstab entries considered.
const MAX_ENTRIES: usize = 1024;
/// Longest text from the image shown in a warning.
const MAX_SHOWN: usize = 200;

/// fstab types that are not on the disk: swap, network and pseudo filesystems.
const NOT_ON_DISK: &[&str] = &[
    "swap",
    "none",
    "ignore",
    "proc",
    "sysfs",
    "tmpfs",
    "devtmpfs",
    "devpts",
    "ramfs",
    "securityfs",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "configfs",
    "mqueue",
    "hugetlbfs",
    "efivarfs",
    "pstore",
    "bpf",
    "autofs",
    "binfmt_misc",
    "fusectl",
    "rpc_pipefs",
    "nfsd",
    "overlay",
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "smb3",
    "ncpfs",
    "ceph",
    "glusterfs",
    "lustre",
    "9p",
    "virtiofs",
    "davfs",
    "sshfs",
    "fuse",
    "afs",
    "ocfs2",
    "gfs2",
];
/// fstab options that mean "not mounted at boot from a local disk".
const NOT_AT_BOOT: &[&str] = &["noauto", "bind", "rbind", "_netdev"];

/// One line of `/etc/fstab`, fields unescaped (`\040` → space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// What to mount: `UUID=…`, `LABEL=…`, `/dev/…`, …
    pub spec: String,
    /// Where, in the guest's tree.
    pub mountpoint: String,
    /// Type as written (`auto` when absent).
    pub fstype: String,
    /// Mount options, split at commas.
    pub options: Vec<String>,
}

/// One mount of the assembled tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Guest device, as the agent listed it.
    pub device: String,
    /// Type the agent probed.
    pub fstype: Option<String>,
    /// Absolute, normalised mountpoint.
    pub mountpoint: String,
    /// btrfs: the subvolume to mount instead of the default one.
    pub subvol: Option<Subvol>,
}

/// A btrfs subvolume as fstab (`subvol=`, `subvolid=`) or `-m DEV@SUBVOL` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subvol {
    /// Path from the top level; `/` and `` are the top level itself.
    Path(String),
    /// Subvolume id.
    Id(u64),
}

/// Subvolumes tried for a root, at most, after the default one.
const MAX_ROOT_SUBVOLUMES: usize = 16;
/// Where distributions keep `/`: Ubuntu and openSUSE `@`, Fedora `root`, others.
const ROOT_SUBVOLUMES: &[&str] = &["@", "root", "@root", "@rootfs", "rootfs"];

impl Subvol {
    /// The subvolume fstab options ask for: `subvolid=` (the kernel's own key) over
    /// `subvol=`.
    pub fn from_options(options: &[String]) -> Option<Subvol> {
        let value = |key: &str| {
            options
                .iter()
                .find_map(|o| o.strip_prefix(key).map(String::from))
        };
        if let Some(id) = value("subvolid=").and_then(|v| v.parse().ok()) {
            return Some(Subvol::Id(id));
        }
        value("subvol=").map(Subvol::Path)
    }

    /// The id of the subvolume this names among `list` (the top level is
    /// [`BTRFS_TOP_LEVEL`]).
    pub fn resolve(&self, list: &[Subvolume]) -> Option<u64> {
        match self {
            Subvol::Id(id) => {
                (*id == BTRFS_TOP_LEVEL || list.iter().any(|s| s.id == *id)).then_some(*id)
            }
            Subvol::Path(p) => {
                let want = p.trim_matches('/');
                if want.is_empty() {
                    return Some(BTRFS_TOP_LEVEL);
                }
                list.iter().find(|s| s.path == want).map(|s| s.id)
            }
        }
    }
}

/// The subvolumes that may hold a root, most likely first: the conventional names,
/// then the others, snapshots last; the default one (already tried) left out.
pub fn root_subvolumes(list: &[Subvolume], default: u64) -> Vec<&Subvolume> {
    let mut c: Vec<&Subvolume> = list.iter().filter(|s| s.id != default).collect();
    c.sort_by_key(|s| {
        let named = ROOT_SUBVOLUMES.iter().position(|n| *n == s.path);
        let snapshot = s
            .path
            .split('/')
            .any(|c| c == ".snapshots" || c == "snapshots");
        (snapshot, named.unwrap_or(ROOT_SUBVOLUMES.len()), s.id)
    });
    c.truncate(MAX_ROOT_SUBVOLUMES);
    c
}

/// Parse fstab text: comment and blank lines skipped, fields split at blanks, at most
/// [`MAX_ENTRIES`] entries. Lines with fewer than two fields are ignored (as mount does).
pub fn parse_fstab(text: &[u8]) -> Vec<FstabEntry> {
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        if out.len() >= MAX_ENTRIES {
            break;
        }
        let mut fields = line
            .split(|&b| b == b' ' || b == b'\t' || b == b'\r')
            .filter(|f| !f.is_empty());
        let (Some(spec), Some(mountpoint)) = (fields.next(), fields.next()) else {
            continue;
        };
        if spec.starts_with(b"#") {
            continue;
        }
        let text = |f: &[u8]| String::from_utf8_lossy(&unescape_octal(f)).into_owned();
        let fstype = fields.next().map_or_else(|| "auto".to_string(), text);
        let options = fields.next().map_or_else(|| "defaults".to_string(), text);
        out.push(FstabEntry {
            spec: text(spec),
            mountpoint: text(mountpoint),
            fstype,
            options: options
                .split(',')
                .filter(|o| !o.is_empty())
                .map(String::from)
                .collect(),
        });
    }
    out
}

/// Why an entry is not for us (None: it is a local filesystem mounted at boot).
pub fn not_for_us(e: &FstabEntry) -> Option<&'static str> {
    let t = e.fstype.as_str();
    if NOT_ON_DISK.contains(&t) || t.starts_with("fuse.") || t.starts_with("fuse3") {
        return Some("not a disk filesystem");
    }
    if e.options.iter().any(|o| NOT_AT_BOOT.contains(&o.as_str())) {
        return Some("not mounted at boot");
    }
    if e.mountpoint == "none" || e.spec == "none" {
        return Some("nothing to mount");
    }
    None
}

/// An absolute mountpoint with `//` and `.` removed; None if relative or it has `..`.
pub fn normalise_mountpoint(mp: &str) -> Option<String> {
    if !mp.starts_with('/') || mp.contains('\0') || mp.len() > imgsafe_proto::MAX_PATH {
        return None;
    }
    let parts: Vec<&str> = mp
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

fn depth(mountpoint: &str) -> usize {
    mountpoint.split('/').filter(|c| !c.is_empty()).count()
}

/// Image text made safe for one line on a terminal.
pub fn shown(s: &str) -> String {
    crate::terminal::printable_max(s, MAX_SHOWN)
}

/// True if the agent can mount what it found on `f`.
pub fn is_mountable(f: &FsInfo) -> bool {
    !f.partitioned && f.fstype.as_deref().is_some_and(mountable_type)
}

/// The filesystems that may be the guest's root, most likely first: Linux types before
/// the rest, each group in the agent's order.
pub fn root_candidates(list: &[FsInfo]) -> Vec<&FsInfo> {
    let mut c: Vec<&FsInfo> = list.iter().filter(|f| is_mountable(f)).collect();
    c.sort_by_key(|f| {
        !f.fstype
            .as_deref()
            .and_then(fs_type)
            .is_some_and(|t| t.linux_root)
    });
    c
}

/// Guest device names a name from the image's own OS may stand for: the name itself,
/// the appliance's virtio name for an sdX/hdX/xvdX/vdX/nvme disk, and `/dev/VG/LV`
/// for `/dev/mapper/VG-LV`.
fn aliases(name: &str) -> Vec<String> {
    let mut v = vec![name.to_string()];
    let bare = name.strip_prefix("/dev/").unwrap_or(name);
    for p in ["sd", "hd", "xvd", "vd"] {
        if let Some(rest) = bare
            .strip_prefix(p)
            .filter(|r| r.starts_with(|c: char| c.is_ascii_lowercase()))
        {
            v.push(format!("/dev/vd{rest}"));
        }
    }
    // nvme0n1p2 → vda2: the first namespace of the first controller is the first disk.
    if let Some(part) = bare.strip_prefix("nvme0n1") {
        match part.strip_prefix('p') {
            Some(n) if n.parse::<u32>().is_ok() => v.push(format!("/dev/vda{n}")),
            None if part.is_empty() => v.push("/dev/vda".into()),
            _ => {}
        }
    }
    if let Some(dm) = bare.strip_prefix("mapper/") {
        if let Some((vg, lv)) = imgsafe_proto::lvm_names::split_dm_name(dm) {
            v.push(format!("/dev/{vg}/{lv}"));
        }
    }
    v
}

/// Find a device by the name a user or the image's OS gives it: a /dev path (see
/// [`aliases`]) or, when `numbers` is set, a bare partition number.
pub fn find_device<'a>(name: &str, list: &'a [FsInfo], numbers: bool) -> Option<&'a FsInfo> {
    if numbers {
        if let Ok(n) = name.parse::<u32>() {
            return list.iter().find(|f| f.partition == Some(n));
        }
    }
    let names = aliases(name);
    names
        .iter()
        .find_map(|n| list.iter().find(|f| &f.device == n))
}

/// Resolve an fstab source: `UUID=`, `LABEL=`, `PARTUUID=`, their `/dev/disk/by-*/`
/// forms, or a device name. `PARTLABEL=` is not probed, so it never resolves.
pub fn resolve_spec<'a>(spec: &str, list: &'a [FsInfo]) -> Option<&'a FsInfo> {
    let unquote = |v: &str| v.trim_matches('"').to_string();
    let by = |key: &str| {
        spec.strip_prefix(&format!("{key}="))
            .map(unquote)
            .or_else(|| {
                spec.strip_prefix(&format!("/dev/disk/by-{}/", key.to_ascii_lowercase()))
                    .map(String::from)
            })
    };
    let same =
        |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    if let Some(u) = by("UUID") {
        return list.iter().find(|f| !f.partitioned && same(&f.uuid, &u));
    }
    if let Some(l) = by("LABEL") {
        return list
            .iter()
            .find(|f| !f.partitioned && f.label.as_deref() == Some(l.as_str()));
    }
    if let Some(p) = by("PARTUUID") {
        return list.iter().find(|f| same(&f.partuuid, &p));
    }
    if spec.starts_with("/dev/") {
        return find_device(spec, list, false);
    }
    None
}

/// From the root's fstab, the other filesystems to mount, shallowest first, and one
/// warning per entry that had to be skipped.
pub fn plan_fstab(
    entries: &[FstabEntry],
    list: &[FsInfo],
    root: &FsInfo,
    root_subvol: Option<&Subvolume>,
) -> (Vec<Planned>, Vec<String>) {
    let (mut plan, mut warnings): (Vec<Planned>, Vec<String>) = (Vec::new(), Vec::new());
    for e in entries {
        if not_for_us(e).is_some() {
            continue;
        }
        let what = format!("/etc/fstab: {} on {}", shown(&e.spec), shown(&e.mountpoint));
        let Some(mountpoint) = normalise_mountpoint(&e.mountpoint) else {
            warnings.push(format!("{what}: not an absolute path; skipped"));
            continue;
        };
        if mountpoint == "/" {
            continue;
        }
        let Some(f) = resolve_spec(&e.spec, list) else {
            warnings.push(format!("{what}: no such device in the image; skipped"));
            continue;
        };
        let subvol = Subvol::from_options(&e.options);
        let same_subvol = match (&subvol, root_subvol) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(Subvol::Id(id)), Some(r)) => *id == r.id,
            (Some(Subvol::Path(p)), Some(r)) => p.trim_matches('/') == r.path,
        };
        if f.device == root.device && same_subvol {
            warnings.push(format!(
                "{what}: the root filesystem again (subvolume or bind mount); skipped"
            ));
            continue;
        }
        if !is_mountable(f) {
            warnings.push(format!("{what}: {} cannot be mounted; skipped", f.device));
            continue;
        }
        if plan.iter().any(|p| p.mountpoint == mountpoint) {
            warnings.push(format!("{what}: mountpoint listed twice; skipped"));
            continue;
        }
        let btrfs = f.fstype.as_deref() == Some("btrfs");
        plan.push(Planned {
            device: f.device.clone(),
            fstype: f.fstype.clone(),
            mountpoint,
            subvol: subvol.filter(|_| btrfs),
        });
    }
    plan.sort_by_key(|p| depth(&p.mountpoint));
    (plan, warnings)
}

/// `-m DEV[:MOUNTPOINT]`, given once or more: the one without a mountpoint is `/`, the
/// others go where they say, shallowest first. DEV is a guest device, an sdX-style
/// name, `/dev/VG/LV` or `/dev/mapper/VG-LV`, or a partition number.
pub fn plan_manual(args: &[String], list: &[FsInfo]) -> Result<Vec<Planned>, String> {
    let mut plan: Vec<Planned> = Vec::new();
    for a in args {
        let (dev, mp) = match a.trim().split_once(':') {
            Some((d, m)) => (d, Some(m)),
            None => (a.trim(), None),
        };
        // No device, partition number or LVM name has an `@`: after it, a subvolume.
        let (dev, subvol) = match dev.split_once('@') {
            Some((d, sv)) => (d, Some(Subvol::Path(sv.to_string()))),
            None => (dev, None),
        };
        let mountpoint = match mp {
            None => "/".to_string(),
            Some(m) => normalise_mountpoint(m).ok_or_else(|| {
                format!("-m {a}: the mountpoint must be an absolute path without ..")
            })?,
        };
        let f = find_device(dev, list, true)
            .ok_or_else(|| format!("no device {dev} in the image; found: {}", describe(list)))?;
        if !is_mountable(f) {
            let t = f
                .fstype
                .as_deref()
                .map_or_else(|| "no filesystem".to_string(), String::from);
            return Err(format!(
                "{}: {t} cannot be mounted; found: {}",
                f.device,
                describe(list)
            ));
        }
        if plan.iter().any(|p| p.mountpoint == mountpoint) {
            let why = if mountpoint == "/" {
                "more than one -m without a mountpoint"
            } else {
                "a mountpoint given twice"
            };
            return Err(format!("-m {a}: {why}"));
        }
        if subvol.is_some() && f.fstype.as_deref() != Some("btrfs") {
            return Err(format!("-m {a}: only btrfs has subvolumes"));
        }
        plan.push(Planned {
            device: f.device.clone(),
            fstype: f.fstype.clone(),
            mountpoint,
            subvol,
        });
    }
    if !plan.iter().any(|p| p.mountpoint == "/") {
        return Err("-m: give the root filesystem as one -m DEVICE without a mountpoint".into());
    }
    plan.sort_by_key(|p| depth(&p.mountpoint));
    Ok(plan)
}

/// "dev (type), …" of the mountable filesystems, for error messages.
pub fn describe(list: &[FsInfo]) -> String {
    let m: Vec<String> = list
        .iter()
        .filter(|f| is_mountable(f))
        .map(|f| format!("{} ({})", f.device, f.fstype.as_deref().unwrap_or("?")))
        .collect();
    if m.is_empty() {
        "nothing mountable".into()
    } else {
        m.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(device: &str, fstype: &str, uuid: &str, label: &str, partition: Option<u32>) -> FsInfo {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        FsInfo {
            device: device.into(),
            size: 1 << 20,
            fstype: opt(fstype),
            label: opt(label),
            uuid: opt(uuid),
            partition,
            partuuid: partition.map(|n| format!("1a2b3c4d-{n:02x}")),
            partitioned: false,
        }
    }

    fn disk() -> Vec<FsInfo> {
        vec![
            FsInfo {
                partitioned: true,
                partuuid: None,
                ..fs("/dev/vda", "", "", "", None)
            },
            fs(
                "/dev/vda1",
                "ext4",
                "11111111-2222-3333-4444-555555555555",
                "boot",
                Some(1),
            ),
            fs(
                "/dev/vda2",
                "ext4",
                "aaaaaaaa-2222-3333-4444-555555555555",
                "root",
                Some(2),
            ),
            fs(
                "/dev/vda3",
                "swap",
                "cccccccc-2222-3333-4444-555555555555",
                "",
                Some(3),
            ),
            fs(
                "/dev/vg0/my-data",
                "xfs",
                "dddddddd-2222-3333-4444-555555555555",
                "HOME",
                None,
            ),
        ]
    }

    #[test]
    fn fstab_fields_comments_and_escapes() {
        let text = b"# comment\n\n  UUID=abc  /  ext4 errors=remount-ro 0 1\r\nLABEL=my\\040disk\t/mnt/my\\040dir\tvfat\n/dev/sdb1 /x\n# /dev/sdc1 /y ext4\nonlyone\n";

        let e = parse_fstab(text);

        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            FstabEntry {
                spec: "UUID=abc".into(),
                mountpoint: "/".into(),
                fstype: "ext4".into(),
                options: vec!["errors=remount-ro".into()]
            }
        );
        assert_eq!(
            (
                e[1].spec.as_str(),
                e[1].mountpoint.as_str(),
                e[1].options.clone()
            ),
            ("LABEL=my disk", "/mnt/my dir", vec!["defaults".to_string()])
        );
        assert_eq!(
            (e[2].fstype.as_str(), e[2].mountpoint.as_str()),
            ("auto", "/x")
        );
    }

    #[test]
    fn hostile_fstab_is_bounded_and_never_panics() {
        let mut text = b"\\7\\777 \\ \\0 \xff\xfe /a\\ ext4 \\\n".to_vec();
        text.extend(b"x /y\n".repeat(5000));

        let e = parse_fstab(&text);

        assert_eq!(e.len(), MAX_ENTRIES);
        assert_eq!(e[0].spec, "\\7\\777");
        assert_eq!(e[0].mountpoint, "\\");
    }

    #[test]
    fn swap_network_pseudo_noauto_and_bind_entries_are_not_for_us() {
        let e = parse_fstab(b"/dev/vda3 none swap sw\nsrv:/x /nfs nfs4 rw\nproc /proc proc defaults\n/dev/vda1 /boot ext4 noauto\n/srv /mnt none bind\nhost:/ /s fuse.sshfs rw\n/dev/vda1 /boot ext4 defaults\n");

        let skipped: Vec<bool> = e.iter().map(|e| not_for_us(e).is_some()).collect();

        assert_eq!(skipped, [true, true, true, true, true, true, false]);
    }

    #[test]
    fn specs_resolve_by_uuid_label_partuuid_and_os_device_names() {
        let list = disk();

        let got = |s: &str| resolve_spec(s, &list).map(|f| f.device.as_str());

        assert_eq!(
            got("UUID=11111111-2222-3333-4444-555555555555"),
            Some("/dev/vda1")
        );
        assert_eq!(
            got("UUID=\"AAAAAAAA-2222-3333-4444-555555555555\""),
            Some("/dev/vda2")
        );
        assert_eq!(
            got("/dev/disk/by-uuid/11111111-2222-3333-4444-555555555555"),
            Some("/dev/vda1")
        );
        assert_eq!(got("LABEL=HOME"), Some("/dev/vg0/my-data"));
        assert_eq!(got("PARTUUID=1A2B3C4D-02"), Some("/dev/vda2"));
        assert_eq!(got("/dev/sda1"), Some("/dev/vda1"));
        assert_eq!(got("/dev/xvda2"), Some("/dev/vda2"));
        assert_eq!(got("/dev/nvme0n1p1"), Some("/dev/vda1"));
        assert_eq!(got("/dev/mapper/vg0-my--data"), Some("/dev/vg0/my-data"));
        assert_eq!(got("/dev/vg0/my-data"), Some("/dev/vg0/my-data"));
        assert_eq!(got("LABEL=nope"), None);
        assert_eq!(got("PARTLABEL=root"), None);
        assert_eq!(got("/dev/sdb1"), None);
    }

    #[test]
    fn fstab_plan_is_ordered_by_depth_and_warns_once_per_bad_entry() {
        let list = disk();
        let root = list[2].clone();
        let fstab = parse_fstab(b"UUID=aaaaaaaa-2222-3333-4444-555555555555 / ext4 defaults\n/dev/mapper/vg0-my--data /home/me xfs defaults\nLABEL=boot /boot ext4 defaults\nUUID=0000 /srv ext4 defaults\n/dev/vda3 none swap sw\nLABEL=boot relative ext4 defaults\n/dev/vda3 /swapfs auto defaults\n");

        let (plan, warnings) = plan_fstab(&fstab, &list, &root, None);

        let got: Vec<(&str, &str)> = plan
            .iter()
            .map(|p| (p.device.as_str(), p.mountpoint.as_str()))
            .collect();
        assert_eq!(
            got,
            [("/dev/vda1", "/boot"), ("/dev/vg0/my-data", "/home/me")]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings[0].contains("UUID=0000 on /srv") && warnings[0].contains("no such device"),
            "{warnings:?}"
        );
    }

    #[test]
    fn manual_assembly_puts_the_bare_device_at_root() {
        let list = disk();
        let args: Vec<String> = ["1:/boot", "2", "/dev/vg0/my-data:/home//./me"]
            .map(String::from)
            .to_vec();

        let plan = plan_manual(&args, &list).unwrap();

        let got: Vec<(&str, &str)> = plan
            .iter()
            .map(|p| (p.device.as_str(), p.mountpoint.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("/dev/vda2", "/"),
                ("/dev/vda1", "/boot"),
                ("/dev/vg0/my-data", "/home/me")
            ]
        );
    }

    #[test]
    fn manual_assembly_errors_name_the_problem() {
        let list = disk();
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        assert!(plan_manual(&args(&["1:/boot"]), &list)
            .unwrap_err()
            .contains("without a mountpoint"));
        assert!(plan_manual(&args(&["1", "2"]), &list)
            .unwrap_err()
            .contains("more than one"));
        assert!(plan_manual(&args(&["3"]), &list)
            .unwrap_err()
            .contains("swap cannot be mounted"));
        assert!(plan_manual(&args(&["/dev/sdc1"]), &list)
            .unwrap_err()
            .contains("no device /dev/sdc1"));
        assert!(plan_manual(&args(&["2", "1:../x"]), &list)
            .unwrap_err()
            .contains("absolute"));
    }

    #[test]
    fn root_candidates_try_linux_types_first() {
        let list = vec![
            fs("/dev/vda1", "vfat", "", "", Some(1)),
            fs("/dev/vda2", "swap", "", "", Some(2)),
            fs("/dev/vda3", "xfs", "", "", Some(3)),
        ];

        let c: Vec<&str> = root_candidates(&list)
            .iter()
            .map(|f| f.device.as_str())
            .collect();

        assert_eq!(c, ["/dev/vda3", "/dev/vda1"]);
    }

    fn subvols() -> Vec<Subvolume> {
        [
            (256, "@"),
            (257, "@home"),
            (258, "@/.snapshots"),
            (259, "@/.snapshots/1/snapshot"),
            (260, "data"),
            (261, "root"),
        ]
        .map(|(id, p)| Subvolume { id, path: p.into() })
        .to_vec()
    }

    #[test]
    fn root_subvolumes_try_conventional_names_first_and_snapshots_last() {
        let list = subvols();

        let order: Vec<u64> = root_subvolumes(&list, 261).iter().map(|s| s.id).collect();

        assert_eq!(order, [256, 257, 260, 258, 259]);
    }

    #[test]
    fn fstab_subvolume_options_resolve_by_path_or_id() {
        let list = subvols();
        let opts = |o: &str| o.split(',').map(String::from).collect::<Vec<_>>();

        let path = Subvol::from_options(&opts("compress=zstd:1,subvol=/@home"));
        let id = Subvol::from_options(&opts("subvol=@,subvolid=260"));

        assert_eq!(path, Some(Subvol::Path("/@home".into())));
        assert_eq!(path.unwrap().resolve(&list), Some(257));
        assert_eq!(id.unwrap().resolve(&list), Some(260));
        assert_eq!(
            Subvol::Path("/".into()).resolve(&list),
            Some(BTRFS_TOP_LEVEL)
        );
        assert_eq!(Subvol::Path("nope".into()).resolve(&list), None);
        assert_eq!(Subvol::Id(999).resolve(&list), None);
        assert_eq!(Subvol::from_options(&opts("defaults")), None);
    }

    #[test]
    fn fstab_mounts_other_subvolumes_of_the_root_device_but_not_the_root_again() {
        let list = vec![fs("/dev/vda", "btrfs", "aaaa", "", None)];
        let root_sv = Subvolume {
            id: 256,
            path: "root".into(),
        };
        let fstab = parse_fstab(
            b"UUID=aaaa / btrfs subvol=root 0 0
UUID=aaaa /home btrfs subvol=home 0 0
UUID=aaaa /again btrfs subvol=/root 0 0
UUID=aaaa /top btrfs defaults 0 0
",
        );

        let (plan, warnings) = plan_fstab(&fstab, &list, &list[0], Some(&root_sv));

        let got: Vec<(&str, Option<Subvol>)> = plan
            .iter()
            .map(|p| (p.mountpoint.as_str(), p.subvol.clone()))
            .collect();
        assert_eq!(got, [("/home", Some(Subvol::Path("home".into())))]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    #[test]
    fn manual_assembly_takes_a_subvolume_after_at() {
        let mut list = disk();
        list.push(fs("/dev/vdb", "btrfs", "bbbb", "", None));
        let args: Vec<String> = ["/dev/vdb@@", "/dev/vdb@@home:/home"]
            .map(String::from)
            .to_vec();

        let plan = plan_manual(&args, &list).unwrap();
        let not_btrfs = plan_manual(&["2@x".to_string()], &list).unwrap_err();

        let got: Vec<(&str, Option<Subvol>)> = plan
            .iter()
            .map(|p| (p.mountpoint.as_str(), p.subvol.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("/", Some(Subvol::Path("@".into()))),
                ("/home", Some(Subvol::Path("@home".into())))
            ]
        );
        assert!(not_btrfs.contains("only btrfs"), "{not_btrfs}");
    }

    #[test]
    fn terminal_text_is_cleaned() {
        assert_eq!(shown("a\x1b[2Jb\n"), "a?[2Jb?");
    }
}
