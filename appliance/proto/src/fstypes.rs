//! The one list of filesystem types imgsafe mounts: the host uses it to decide what is
//! mountable and where a Linux root may be, the agent to choose mount options, and the
//! appliance builder to know which kernel modules each type needs. A type that is not
//! here is never mounted.

/// How the agent mounts one type, and what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsType {
    /// The type as the agent's probe reports it.
    pub name: &'static str,
    /// Kernel modules the appliance loads just before mounting this type (their own
    /// dependencies come from modules.dep); empty when the driver is built in.
    pub modules: &'static [&'static str],
    /// Read-only (kernel type, options) attempts, in order; the next one is tried only
    /// when the kernel refuses a type or an option. None may replay a journal.
    pub read_only: &'static [(&'static str, &'static str)],
    /// Read-write attempts for a mount over a throwaway copy-on-write layer (`shell
    /// --overlay`); empty means the type is always mounted read-only.
    pub writable: &'static [(&'static str, &'static str)],
    /// A Linux root usually has this type: tried first when looking for the root.
    pub linux_root: bool,
    /// Mounted by this FUSE program in the appliance rather than by a kernel driver
    /// (then `read_only` gives its `-o` options).
    pub fuse: Option<&'static str>,
}

/// The FUSE NTFS driver in the appliance: lowntfs-3g, copied from the host's ntfs-3g
/// package (Debian's cloud kernel has no ntfs3).
pub const NTFS_3G: &str = "/usr/bin/lowntfs-3g";

/// Every type imgsafe mounts, in the order a root is looked for among equals.
pub const FILESYSTEMS: &[FsType] = &[
    // The ext4 driver serves ext2/ext3 too (and is built into Debian kernels);
    // `noload` skips the journal entirely.
    FsType {
        name: "ext4",
        modules: &[],
        read_only: &[("ext4", "noload")],
        writable: &[("ext4", "")],
        linux_root: true,
        fuse: None,
    },
    FsType {
        name: "ext3",
        modules: &[],
        read_only: &[("ext3", "noload"), ("ext4", "noload")],
        writable: &[("ext3", ""), ("ext4", "")],
        linux_root: true,
        fuse: None,
    },
    FsType {
        name: "ext2",
        modules: &[],
        read_only: &[("ext2", "noload"), ("ext2", ""), ("ext4", "noload")],
        writable: &[("ext2", ""), ("ext4", "")],
        linux_root: true,
        fuse: None,
    },
    FsType {
        name: "xfs",
        modules: &["xfs"],
        read_only: &[("xfs", "norecovery")],
        writable: &[("xfs", "")],
        linux_root: true,
        fuse: None,
    },
    // `rescue=` appeared in Linux 5.9; older kernels spell it `nologreplay`.
    FsType {
        name: "btrfs",
        modules: &["crc32c_intel", "blake2b_generic", "xxhash_generic", "btrfs"],
        read_only: &[("btrfs", "rescue=nologreplay"), ("btrfs", "nologreplay")],
        writable: &[("btrfs", "")],
        linux_root: true,
        fuse: None,
    },
    FsType {
        name: "vfat",
        modules: &[
            "vfat",
            "nls_ascii",
            "nls_utf8",
            "nls_cp437",
            "nls_iso8859_1",
        ],
        read_only: &[("vfat", "utf8"), ("vfat", "")],
        writable: &[("vfat", "utf8"), ("vfat", "")],
        linux_root: false,
        fuse: None,
    },
    FsType {
        name: "iso9660",
        modules: &["isofs", "nls_utf8"],
        read_only: &[("iso9660", "utf8"), ("iso9660", "")],
        writable: &[],
        linux_root: false,
        fuse: None,
    },
    FsType {
        name: "udf",
        modules: &["udf", "nls_utf8"],
        read_only: &[("udf", "utf8"), ("udf", "")],
        writable: &[],
        linux_root: false,
        fuse: None,
    },
    FsType {
        name: "exfat",
        modules: &["exfat", "nls_utf8"],
        read_only: &[("exfat", "")],
        writable: &[("exfat", "")],
        linux_root: false,
        fuse: None,
    },
    // Read-only by design: the kernel never writes either.
    FsType {
        name: "squashfs",
        modules: &["squashfs"],
        read_only: &[("squashfs", "")],
        writable: &[],
        linux_root: false,
        fuse: None,
    },
    FsType {
        name: "erofs",
        modules: &["erofs"],
        read_only: &[("erofs", "")],
        writable: &[],
        linux_root: false,
        fuse: None,
    },
    // Alternate data streams are not shown (streams_interface=none); reparse points
    // (junctions, symlinks) are shown as symlinks, which the agent never follows
    // out of the mounted tree. NTFS has no POSIX modes and ntfs-3g would show every
    // file as 0777: files are 0644 and directories 0755 instead, so `cp` makes no
    // world-writable or executable copies.
    FsType {
        name: "ntfs",
        modules: &["fuse"],
        read_only: &[(
            "ntfs",
            "ro,streams_interface=none,noatime,fmask=0133,dmask=0022",
        )],
        writable: &[],
        linux_root: false,
        fuse: Some(NTFS_3G),
    },
];

/// The entry for a type the probe reported, if imgsafe mounts it.
pub fn fs_type(name: &str) -> Option<&'static FsType> {
    FILESYSTEMS.iter().find(|t| t.name == name)
}

/// Whether imgsafe mounts filesystems of this type.
pub fn is_mountable(name: &str) -> bool {
    fs_type(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journaled_types_never_fall_back_to_replaying() {
        for t in ["ext3", "ext4", "xfs", "btrfs"] {
            let ro = fs_type(t).unwrap().read_only;

            assert!(ro.iter().all(|(_, o)| !o.is_empty()), "{t}: {ro:?}");
        }
    }

    #[test]
    fn every_type_has_a_read_only_attempt_and_a_unique_name() {
        for (i, t) in FILESYSTEMS.iter().enumerate() {
            assert!(!t.read_only.is_empty(), "{}", t.name);
            assert!(
                FILESYSTEMS[..i].iter().all(|u| u.name != t.name),
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn read_only_media_have_no_writable_attempts() {
        assert!(fs_type("iso9660").unwrap().writable.is_empty());
        assert!(fs_type("udf").unwrap().writable.is_empty());
        assert!(!is_mountable("swap"));
        assert!(!is_mountable("LVM2_member"));
    }
}
