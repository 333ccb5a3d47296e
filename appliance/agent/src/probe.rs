//! blkid-like content probing: which filesystem, label and UUID a block device holds,
//! and whether it carries a partition table.
//!
//! Everything here works on any [`FileExt`], so the guest probes `/dev/vdaN` and the unit
//! tests probe image files made by the real mkfs tools. Device bytes are hostile: every
//! read is bounded ([`MAX_READ`]) and checked against the device size, and no field read
//! from the device is trusted as an offset or length before it is range-checked.

use std::os::unix::fs::FileExt;

/// Largest single read the prober makes (bounds memory on hostile sizes).
const MAX_READ: usize = 1 << 20;
/// Sector size assumed for MBR and the first GPT attempt.
const SECTOR: u64 = 512;

/// ext2/3/4: superblock offset, magic offset within it and value (ext4 disk layout, "The Super Block").
const EXT_SB: u64 = 1024;
const EXT_MAGIC: u16 = 0xEF53;
/// ext s_feature_compat: has_journal.
const EXT_COMPAT_HAS_JOURNAL: u32 = 0x0004;
/// ext s_feature_incompat: external journal device.
const EXT_INCOMPAT_JOURNAL_DEV: u32 = 0x0008;
/// ext ro_compat features ext2/ext3 drivers understand (sparse_super, large_file, btree_dir).
const EXT3_RO_COMPAT_SUPPORTED: u32 = 0x0001 | 0x0002 | 0x0004;
/// ext incompat features the ext2 driver understands (filetype, meta_bg).
const EXT2_INCOMPAT_SUPPORTED: u32 = 0x0002 | 0x0010;
/// ext incompat features the ext3 driver understands (filetype, recover, meta_bg).
const EXT3_INCOMPAT_SUPPORTED: u32 = 0x0002 | 0x0004 | 0x0010;

/// XFS superblock magic at byte 0 ("XFS Algorithms & Data Structures", 12.1).
const XFS_MAGIC: &[u8; 4] = b"XFSB";
/// Btrfs primary superblock offset and its magic at offset 0x40 within it.
const BTRFS_SB: u64 = 65536;
const BTRFS_MAGIC: &[u8; 8] = b"_BHRfS_M";
/// ISO 9660 (ECMA-119 8.4): the primary volume descriptor lives in sector 16.
const ISO_PVD: u64 = 16 * 2048;
const ISO_MAGIC: &[u8; 5] = b"CD001";
/// exFAT boot sector: FileSystemName at byte 3 (Microsoft exFAT specification, 3.1.2).
const EXFAT_NAME: &[u8; 8] = b"EXFAT   ";
/// exFAT directory entry type of the volume label (exFAT specification, 7.3).
const EXFAT_LABEL_ENTRY: u8 = 0x83;
/// Most bytes of the exFAT root directory scanned for the label entry.
const EXFAT_DIR_SCAN: u64 = 64 * 1024;
/// NTFS boot sector OEM id at byte 3.
const NTFS_NAME: &[u8; 8] = b"NTFS    ";
/// NTFS: the $Volume file's MFT record number, and its $VOLUME_NAME attribute type.
const NTFS_VOLUME_RECORD: u64 = 3;
const NTFS_ATTR_VOLUME_NAME: u32 = 0x60;
/// NTFS update sequence stride: fixups protect the last 2 bytes of every 512 bytes.
const NTFS_FIXUP_STRIDE: usize = 512;
/// squashfs superblock magic at byte 0 (squashfs_fs.h SQUASHFS_MAGIC, little-endian).
const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
/// EROFS superblock offset and magic (erofs_fs.h EROFS_SUPER_OFFSET, EROFS_SUPER_MAGIC_V1).
const EROFS_SB: u64 = 1024;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
/// ECMA-167 2/8.3: the volume recognition sequence starts at byte 32768.
const VRS_START: u64 = 32768;
/// Most volume structure descriptors looked at in the recognition sequence.
const VRS_MAX: u64 = 64;
/// ECMA-167 3/10.2: the anchor volume descriptor pointer is in logical sector 256.
const UDF_ANCHOR_SECTOR: u64 = 256;
/// ECMA-167 3/7.2.1 descriptor tag identifiers used here.
const UDF_TAG_PVD: u16 = 1;
const UDF_TAG_ANCHOR: u16 = 2;
const UDF_TAG_LVD: u16 = 6;
const UDF_TAG_TERMINATOR: u16 = 8;
/// Most descriptors read from the main volume descriptor sequence.
const UDF_VDS_MAX: u64 = 64;
/// Linux swap signatures, in the last 10 bytes of the first page.
const SWAP_MAGIC_V2: &[u8; 10] = b"SWAPSPACE2";
const SWAP_MAGIC_V1: &[u8; 10] = b"SWAP-SPACE";
/// Page sizes swap may have been made with (blkid checks the same set).
const SWAP_PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];
/// LVM2 label (lib/format_text/layout.h): in one of the first four sectors.
const LVM_LABEL: &[u8; 8] = b"LABELONE";
const LVM_TYPE: &[u8; 8] = b"LVM2 001";
/// Linux MD RAID superblock magic (include/uapi/linux/raid/md_p.h MD_SB_MAGIC), little
/// endian on x86 for both the 0.90 and the 1.x formats.
const MD_MAGIC: u32 = 0xa92b_4efc;
/// md_p.h MD_RESERVED_BYTES: a 0.90 superblock sits in the last 64 KiB-aligned 64 KiB.
const MD_090_RESERVED: u64 = 64 * 1024;
/// Where a 1.0 superblock sits: at least 8 KiB from the end, 4 KiB aligned (mdadm super1.c).
const MD_10_FROM_END: u64 = 8 * 1024;
const MD_10_ALIGN: u64 = 4 * 1024;
/// 1.1 superblocks are at the start, 1.2 ones 4 KiB in.
const MD_12_OFFSET: u64 = 4096;
/// LUKS1 and LUKS2 header magic at byte 0 (LUKS1 spec 2.1; LUKS2 on-disk format 2.1).
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// GPT header signature (UEFI 2.10, 5.3.2).
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// MBR boot signature at offset 510.
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// MBR partition types that start an extended partition chain (DOS, W95 LBA, Linux).
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
/// Most logical partitions followed in an extended chain (bounds hostile loops).
const MAX_LOGICAL: u32 = 128;

/// What the probe found on one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// Filesystem type as `mount` names it, None when nothing was recognised.
    pub fstype: Option<String>,
    /// Volume label.
    pub label: Option<String>,
    /// Filesystem UUID in blkid's format.
    pub uuid: Option<String>,
    /// True when the device carries a partition table (then `fstype` is None).
    pub partitioned: bool,
}

/// One partition of a partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartEntry {
    /// Partition number as Linux numbers it (GPT: entry index + 1; MBR: 1-4, logical 5+).
    pub number: u32,
    /// blkid's PARTUUID for it, when the table provides one.
    pub partuuid: Option<String>,
}

/// Read exactly `len` bytes at `off`, or None if out of range or the read fails.
fn read<F: FileExt>(dev: &F, size: u64, off: u64, len: usize) -> Option<Vec<u8>> {
    if len > MAX_READ || off.checked_add(len as u64)? > size {
        return None;
    }
    let mut buf = vec![0u8; len];
    dev.read_exact_at(&mut buf, off).ok()?;
    Some(buf)
}

/// Little-endian integers at fixed offsets of a superblock or tree item (the buffers
/// are read whole, of the size their parser needs).
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A label field: up to the first NUL, trailing spaces dropped, None when empty.
fn label(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]);
    let t = s.trim_end_matches(' ');
    (!t.is_empty()).then(|| t.to_string())
}

/// A 16-byte UUID in big-endian byte order as 8-4-4-4-12 lowercase hex; None if all zero.
fn uuid_be(b: &[u8]) -> Option<String> {
    if b.iter().all(|&c| c == 0) {
        return None;
    }
    let h: Vec<String> = b.iter().map(|c| format!("{c:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}

/// A GUID as GPT stores it (first three fields little-endian) in lowercase text form.
fn guid_le(b: &[u8]) -> Option<String> {
    let mut be = [0u8; 16];
    be[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
    be[4..6].copy_from_slice(&[b[5], b[4]]);
    be[6..8].copy_from_slice(&[b[7], b[6]]);
    be[8..16].copy_from_slice(&b[8..16]);
    uuid_be(&be)
}

/// Probe one device: partition table first, then the filesystems.
pub fn probe<F: FileExt>(dev: &F, size: u64) -> Probe {
    // A RAID member first: a mirror's member with its superblock at the end (0.90,
    // 1.0) also shows the array's content (a partition table, a filesystem) at its start.
    if let Some(p) = probe_md(dev, size) {
        return p;
    }
    if partition_table(dev, size).is_some() {
        return Probe {
            partitioned: true,
            ..Probe::default()
        };
    }
    // UDF before ISO 9660: a hybrid disc is read through its UDF side, as blkid does.
    let probers: [fn(&F, u64) -> Option<Probe>; 13] = [
        probe_luks,
        probe_ext,
        probe_xfs,
        probe_btrfs,
        probe_udf,
        probe_iso9660,
        probe_swap,
        probe_lvm2,
        probe_exfat,
        probe_ntfs,
        probe_vfat,
        probe_squashfs,
        probe_erofs,
    ];
    probers
        .iter()
        .find_map(|p| p(dev, size))
        .unwrap_or_default()
}

fn found(fstype: &str, label: Option<String>, uuid: Option<String>) -> Option<Probe> {
    Some(Probe {
        fstype: Some(fstype.to_string()),
        label,
        uuid,
        partitioned: false,
    })
}

/// ext2/ext3/ext4, told apart by feature flags the way libblkid does.
fn probe_ext<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let sb = read(dev, size, EXT_SB, 1024)?;
    if le16(&sb, 56) != EXT_MAGIC {
        return None;
    }
    let compat = le32(&sb, 92);
    let incompat = le32(&sb, 96);
    let ro_compat = le32(&sb, 100);
    if incompat & EXT_INCOMPAT_JOURNAL_DEV != 0 {
        return found("jbd", label(&sb[120..136]), uuid_be(&sb[104..120]));
    }
    let ro_ok = ro_compat & !EXT3_RO_COMPAT_SUPPORTED == 0;
    let fstype = if compat & EXT_COMPAT_HAS_JOURNAL == 0
        && ro_ok
        && incompat & !EXT2_INCOMPAT_SUPPORTED == 0
    {
        "ext2"
    } else if compat & EXT_COMPAT_HAS_JOURNAL != 0
        && ro_ok
        && incompat & !EXT3_INCOMPAT_SUPPORTED == 0
    {
        "ext3"
    } else {
        "ext4"
    };
    found(fstype, label(&sb[120..136]), uuid_be(&sb[104..120]))
}

fn probe_xfs<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let sb = read(dev, size, 0, 512)?;
    if &sb[0..4] != XFS_MAGIC {
        return None;
    }
    let blocksize = u32::from_be_bytes([sb[4], sb[5], sb[6], sb[7]]);
    let agcount = u32::from_be_bytes([sb[88], sb[89], sb[90], sb[91]]);
    if !(512..=65536).contains(&blocksize) || !blocksize.is_power_of_two() || agcount == 0 {
        return None;
    }
    found("xfs", label(&sb[108..120]), uuid_be(&sb[32..48]))
}

fn probe_btrfs<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let sb = read(dev, size, BTRFS_SB, 4096)?;
    if &sb[64..72] != BTRFS_MAGIC {
        return None;
    }
    found(
        "btrfs",
        label(&sb[0x12b..0x12b + 256]),
        uuid_be(&sb[32..48]),
    )
}

/// ISO 9660: label = volume identifier; UUID = the modification (else creation) date as
/// libblkid formats it, YYYY-MM-DD-HH-MM-SS-CC.
fn probe_iso9660<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let pvd = read(dev, size, ISO_PVD, 2048)?;
    if pvd[0] != 1 || &pvd[1..6] != ISO_MAGIC {
        return None;
    }
    let uuid = iso_date(&pvd[830..847]).or_else(|| iso_date(&pvd[813..830]));
    found("iso9660", label(&pvd[40..72]), uuid)
}

/// ECMA-119 8.4.26.1 date: 16 ASCII digits + a timezone byte; all zero means unset.
fn iso_date(d: &[u8]) -> Option<String> {
    let digits = &d[..16];
    if !digits.iter().all(u8::is_ascii_digit) || digits.iter().all(|&c| c == b'0') {
        return None;
    }
    let s = std::str::from_utf8(digits).ok()?;
    Some(format!(
        "{}-{}-{}-{}-{}-{}-{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[8..10],
        &s[10..12],
        &s[12..14],
        &s[14..16]
    ))
}

/// Linux swap: signature at page_size - 10; v2 headers carry a UUID and label.
fn probe_swap<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    for page in SWAP_PAGE_SIZES {
        let Some(magic) = read(dev, size, page - 10, 10) else {
            continue;
        };
        if magic.as_slice() == SWAP_MAGIC_V1 {
            return found("swap", None, None);
        }
        if magic.as_slice() == SWAP_MAGIC_V2 {
            let hdr = read(dev, size, 1024, 44)?;
            return found("swap", label(&hdr[28..44]), uuid_be(&hdr[12..28]));
        }
    }
    None
}

/// LVM2 physical volume: label header in one of sectors 0-3, PV UUID in the pv_header.
fn probe_lvm2<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let head = read(dev, size, 0, 4 * SECTOR as usize)?;
    for s in 0..4usize {
        let sec = &head[s * 512..(s + 1) * 512];
        if &sec[0..8] != LVM_LABEL || &sec[24..32] != LVM_TYPE {
            continue;
        }
        let pv_off = le32(sec, 20) as usize;
        let uuid = sec.get(pv_off..pv_off.checked_add(32)?).and_then(lvm_uuid);
        return found("LVM2_member", None, uuid);
    }
    None
}

/// Linux MD RAID member, as blkid's mdraid prober: a 0.90 superblock at the end (UUID
/// from set_uuid0 and set_uuid1..3), else 1.0 at the end, 1.1 at 0 or 1.2 at 4 KiB whose
/// recorded super_offset matches where it was found (UUID = set_uuid, label = set_name;
/// struct mdp_superblock_1 in md_p.h).
fn probe_md<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let (sb, v090) = md_superblock(dev, size)?;
    if v090 {
        let mut uuid = [0u8; 16];
        uuid[0..4].copy_from_slice(&sb[20..24]);
        uuid[4..16].copy_from_slice(&sb[52..64]);
        return found("linux_raid_member", None, uuid_be(&uuid));
    }
    found(
        "linux_raid_member",
        label(&sb[32..64]),
        uuid_be(&sb[16..32]),
    )
}

/// The RAID level an MD member's superblock records (0.90: `level` at byte 28; 1.x: at
/// byte 72; -1 is linear), None when it is not a member.
pub fn md_level<F: FileExt>(dev: &F, size: u64) -> Option<i32> {
    let (sb, v090) = md_superblock(dev, size)?;
    let at = if v090 { 28 } else { 72 };
    Some(le32(&sb, at) as i32)
}

/// The first 256 bytes of an MD superblock and whether it is the 0.90 format.
fn md_superblock<F: FileExt>(dev: &F, size: u64) -> Option<(Vec<u8>, bool)> {
    if size >= 2 * MD_090_RESERVED {
        let off = (size & !(MD_090_RESERVED - 1)) - MD_090_RESERVED;
        if let Some(sb) = read(dev, size, off, 256) {
            if le32(&sb, 0) == MD_MAGIC && le32(&sb, 4) == 0 {
                return Some((sb, true));
            }
        }
    }
    let end = size
        .checked_sub(MD_10_FROM_END)
        .map(|o| o & !(MD_10_ALIGN - 1));
    for off in [end, Some(0), Some(MD_12_OFFSET)].into_iter().flatten() {
        let Some(sb) = read(dev, size, off, 256) else {
            continue;
        };
        // major_version 1; super_offset (sectors) at byte 144 says where it belongs.
        if le32(&sb, 0) == MD_MAGIC && le32(&sb, 4) == 1 && le64(&sb, 144) == off / SECTOR {
            return Some((sb, false));
        }
    }
    None
}

/// LUKS1 or LUKS2 container: magic and version, UUID as text at byte 168, and (LUKS2
/// only) a label at byte 24.
fn probe_luks<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let hdr = read(dev, size, 0, 208)?;
    if &hdr[0..6] != LUKS_MAGIC {
        return None;
    }
    let version = u16::from_be_bytes([hdr[6], hdr[7]]);
    let uuid =
        label(&hdr[168..208]).filter(|u| u.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
    let name = match version {
        2 => label(&hdr[24..72]),
        _ => None,
    };
    found("crypto_LUKS", name, uuid)
}

/// LVM's 32-character id shown 6-4-4-4-4-4-6 with dashes, as blkid and pvs do.
fn lvm_uuid(raw: &[u8]) -> Option<String> {
    if !raw.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let s = std::str::from_utf8(raw).ok()?;
    let cuts = [0, 6, 10, 14, 18, 22, 26, 32];
    Some(
        cuts.windows(2)
            .map(|w| &s[w[0]..w[1]])
            .collect::<Vec<_>>()
            .join("-"),
    )
}

/// UTF-16LE text up to the first NUL, as a label (None when empty).
fn utf16le(raw: &[u8]) -> Option<String> {
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    label(String::from_utf16_lossy(&units).as_bytes())
}

/// exFAT: serial number as blkid shows it (XXXX-XXXX), label from the root directory's
/// volume label entry (looked for in the root directory's first cluster only).
fn probe_exfat<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let bs = read(dev, size, 0, 512)?;
    let (sector_shift, cluster_shift) = (bs[108], bs[109]);
    if &bs[3..11] != EXFAT_NAME
        || !(9..=12).contains(&sector_shift)
        || u32::from(sector_shift) + u32::from(cluster_shift) > 25
    {
        return None;
    }
    let v = &bs[100..104];
    let uuid = format!("{:02X}{:02X}-{:02X}{:02X}", v[3], v[2], v[1], v[0]);
    found("exfat", exfat_label(dev, size, &bs), Some(uuid))
}

fn exfat_label<F: FileExt>(dev: &F, size: u64, bs: &[u8]) -> Option<String> {
    let sector = 1u64 << bs[108];
    let cluster = sector << bs[109];
    let heap = u64::from(le32(bs, 88)).checked_mul(sector)?;
    let root = u64::from(le32(bs, 96)).checked_sub(2)?;
    let off = heap.checked_add(root.checked_mul(cluster)?)?;
    let dir = read(dev, size, off, cluster.min(EXFAT_DIR_SCAN) as usize)?;
    for e in dir.chunks_exact(32) {
        match e[0] {
            0 => return None,
            EXFAT_LABEL_ENTRY => {
                let n = usize::from(e[1].min(11));
                return utf16le(&e[2..2 + 2 * n]);
            }
            _ => {}
        }
    }
    None
}

/// NTFS: UUID = the 64-bit volume serial as blkid shows it (16 hex digits), label from
/// the $VOLUME_NAME attribute of the $Volume file's MFT record.
fn probe_ntfs<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let bs = read(dev, size, 0, 512)?;
    if &bs[3..11] != NTFS_NAME {
        return None;
    }
    let sector = u64::from(le16(&bs, 11));
    let spc = bs[13];
    // Values above 128 are a negative power of two (large clusters, Windows 10 1903+).
    let per_cluster = if spc <= 128 {
        u64::from(spc)
    } else {
        1u64.checked_shl(u32::from(spc.wrapping_neg()))?
    };
    if !matches!(sector, 256..=4096) || !sector.is_power_of_two() || per_cluster == 0 {
        return None;
    }
    let cluster = sector.checked_mul(per_cluster)?;
    let rec = bs[0x40] as i8;
    let record = if rec > 0 {
        cluster.checked_mul(rec as u64)?
    } else {
        1u64.checked_shl(u32::from(rec.unsigned_abs()))?
    };
    let uuid = format!("{:016X}", le64(&bs, 0x48));
    let label = le64(&bs, 0x30)
        .checked_mul(cluster)
        .and_then(|mft| mft.checked_add(NTFS_VOLUME_RECORD.checked_mul(record)?))
        .filter(|_| (1024..=65536).contains(&record))
        .and_then(|off| read(dev, size, off, record as usize))
        .and_then(ntfs_volume_name);
    found("ntfs", label, Some(uuid))
}

/// The $VOLUME_NAME of one MFT record, after its update sequence fixups are applied.
fn ntfs_volume_name(mut r: Vec<u8>) -> Option<String> {
    if &r[0..4] != b"FILE" {
        return None;
    }
    let usa = usize::from(le16(&r, 4));
    let count = usize::from(le16(&r, 6));
    if count < 2 || (count - 1) * NTFS_FIXUP_STRIDE > r.len() || usa + 2 * count > r.len() {
        return None;
    }
    let check = [r[usa], r[usa + 1]];
    for i in 1..count {
        let end = i * NTFS_FIXUP_STRIDE;
        if r[end - 2..end] != check {
            return None;
        }
        let fix = [r[usa + 2 * i], r[usa + 2 * i + 1]];
        r[end - 2..end].copy_from_slice(&fix);
    }
    let mut at = usize::from(le16(&r, 0x14));
    while at + 24 <= r.len() {
        let kind = le32(&r, at);
        let len = le32(&r, at + 4) as usize;
        if kind == 0xFFFF_FFFF || len < 24 || at + len > r.len() {
            return None;
        }
        if kind == NTFS_ATTR_VOLUME_NAME && r[at + 8] == 0 {
            let vlen = le32(&r, at + 0x10) as usize;
            let voff = usize::from(le16(&r, at + 0x14));
            let value = r.get(at + voff..(at + voff).checked_add(vlen)?)?;
            return utf16le(value);
        }
        at += len;
    }
    None
}

/// squashfs 4 (the only version Linux mounts): no label or UUID.
fn probe_squashfs<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let sb = read(dev, size, 0, 96)?;
    (&sb[0..4] == SQUASHFS_MAGIC && le16(&sb, 28) == 4).then_some(())?;
    found("squashfs", None, None)
}

/// EROFS: uuid at 48, volume_name at 64 of the superblock (erofs_fs.h).
fn probe_erofs<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let sb = read(dev, size, EROFS_SB, 128)?;
    if le32(&sb, 0) != EROFS_MAGIC || !(9..=16).contains(&sb[12]) {
        return None;
    }
    found("erofs", label(&sb[64..80]), uuid_be(&sb[48..64]))
}

/// UDF: an NSR descriptor in the volume recognition sequence, then the anchor and the
/// main volume descriptor sequence for the labels. LABEL is the logical volume
/// identifier and UUID comes from the volume set identifier, as blkid derives them.
fn probe_udf<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    udf_has_nsr(dev, size).then_some(())?;
    let (block, vds, vds_len) = [512u64, 1024, 2048, 4096]
        .into_iter()
        .find_map(|b| udf_anchor(dev, size, b))?;
    let (mut lvid, mut vsid) = (None, None);
    for i in 0..(u64::from(vds_len) / block).min(UDF_VDS_MAX) {
        let off = (u64::from(vds) + i).checked_mul(block)?;
        let Some(d) = read(dev, size, off, 512) else {
            break;
        };
        match le16(&d, 0) {
            UDF_TAG_PVD if vsid.is_none() => vsid = Some(d[72..200].to_vec()),
            UDF_TAG_LVD if lvid.is_none() => lvid = dstring(&d[84..212]),
            UDF_TAG_TERMINATOR => break,
            _ => {}
        }
    }
    let uuid = vsid.as_deref().and_then(udf_uuid);
    found(
        "udf",
        lvid.as_deref().and_then(|l| label(l.as_bytes())),
        uuid,
    )
}

/// Whether the volume recognition sequence holds an NSR02/NSR03 descriptor (ECMA-167
/// 3/9.1). Descriptors are 2048 bytes apart, or one block apart for larger blocks.
fn udf_has_nsr<F: FileExt>(dev: &F, size: u64) -> bool {
    for step in [2048u64, 4096] {
        for i in 0..VRS_MAX {
            let Some(d) = read(dev, size, VRS_START + i * step, 6) else {
                break;
            };
            match &d[1..6] {
                b"NSR02" | b"NSR03" => return true,
                b"BEA01" | b"CD001" | b"CDW02" | b"BOOT2" => {}
                _ => break,
            }
        }
    }
    false
}

/// The anchor at sector 256 for block size `block`: (main VDS location, length).
fn udf_anchor<F: FileExt>(dev: &F, size: u64, block: u64) -> Option<(u64, u32, u32)> {
    let a = read(dev, size, UDF_ANCHOR_SECTOR * block, 512)?;
    let tagged_here = u64::from(le32(&a, 12)) == UDF_ANCHOR_SECTOR;
    (le16(&a, 0) == UDF_TAG_ANCHOR && tagged_here).then(|| (block, le32(&a, 20), le32(&a, 16)))
}

/// An OSTA CS0 dstring (UDF 2.1.1 and 2.1.3): compression id 8 (8-bit) or 16 (UTF-16BE),
/// the used length in the last byte.
fn dstring(d: &[u8]) -> Option<String> {
    let used = usize::from(*d.last()?).min(d.len() - 1);
    let body = d.get(1..used)?;
    match d[0] {
        8 => Some(body.iter().map(|&b| char::from(b)).collect()),
        16 => {
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Some(String::from_utf16_lossy(&units))
        }
        _ => None,
    }
}

/// blkid's UUID from a volume set identifier: its first 16 characters when they are hex
/// digits (as mkudffs and Windows write it), else the leading hex digits completed with
/// the hex of the bytes after them, 16 characters in all; None with fewer than 8 bytes.
fn udf_uuid(vsid: &[u8]) -> Option<String> {
    let used = usize::from(*vsid.last()?).min(vsid.len() - 1);
    let body = vsid.get(1..used)?;
    let bytes: Vec<u8> = match vsid[0] {
        8 => body.to_vec(),
        16 => body
            .chunks_exact(2)
            .map(|c| if c[0] == 0 { c[1] } else { b'?' })
            .collect(),
        _ => return None,
    };
    // blkid reads the identifier into a zeroed 16-byte buffer: bytes past its end are 0.
    let len = bytes.iter().take_while(|&&b| b != 0).count();
    if len < 8 {
        return None;
    }
    let mut buf = [0u8; 16];
    let n = len.min(16);
    buf[..n].copy_from_slice(&bytes[..n]);
    let hex = buf[..n]
        .iter()
        .take_while(|b| b.is_ascii_hexdigit())
        .count();
    let lower = |b: &[u8]| String::from_utf8_lossy(b).to_ascii_lowercase();
    let as_hex = |b: &[u8]| b.iter().map(|c| format!("{c:02x}")).collect::<String>();
    Some(if hex >= 16 {
        lower(&buf)
    } else if hex >= 8 {
        lower(&buf[..8]) + &as_hex(&buf[8..12])
    } else {
        as_hex(&buf[..8])
    })
}

/// FAT boot sector BPB sanity checks (Microsoft FAT spec, section 3.1).
fn is_fat_boot_sector(bs: &[u8]) -> bool {
    let jump_ok = (bs[0] == 0xEB && bs[2] == 0x90) || bs[0] == 0xE9;
    let bytes_per_sector = le16(bs, 11);
    let per_cluster = bs[13];
    let reserved = le16(bs, 14);
    let fats = bs[16];
    let media = bs[21];
    jump_ok
        && matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        && per_cluster != 0
        && per_cluster.is_power_of_two()
        && reserved != 0
        && fats != 0
        && (media == 0xF0 || media >= 0xF8)
}

/// vfat (FAT12/16/32): label and volume serial from the boot sector.
fn probe_vfat<F: FileExt>(dev: &F, size: u64) -> Option<Probe> {
    let bs = read(dev, size, 0, 512)?;
    if !is_fat_boot_sector(&bs) {
        return None;
    }
    // FAT32 has a zero 16-bit FAT size and its extended BPB 28 bytes further on.
    let ext = if le16(&bs, 22) == 0 { 64 } else { 36 };
    let (label_v, uuid) = if bs[ext + 2] == 0x29 {
        let id = &bs[ext + 3..ext + 7];
        let uuid = format!("{:02X}{:02X}-{:02X}{:02X}", id[3], id[2], id[1], id[0]);
        (
            label(&bs[ext + 7..ext + 18]).filter(|l| l != "NO NAME"),
            Some(uuid),
        )
    } else {
        (None, None)
    };
    found("vfat", label_v, uuid)
}

/// The partition table on a whole disk, or None when there is none. GPT wins over the
/// protective MBR; a FAT boot sector is not an MBR even though it ends in 0x55AA.
pub fn partition_table<F: FileExt>(dev: &F, size: u64) -> Option<Vec<PartEntry>> {
    gpt(dev, size, SECTOR)
        .or_else(|| gpt(dev, size, 4096))
        .or_else(|| mbr(dev, size))
}

fn gpt<F: FileExt>(dev: &F, size: u64, lba: u64) -> Option<Vec<PartEntry>> {
    let hdr = read(dev, size, lba, lba as usize)?;
    if &hdr[0..8] != GPT_SIGNATURE {
        return None;
    }
    let hdr_size = le32(&hdr, 12) as usize;
    if !(92..=hdr.len()).contains(&hdr_size) {
        return None;
    }
    let mut h = hdr[..hdr_size].to_vec();
    h[16..20].fill(0);
    if crc32(&h) != le32(&hdr, 16) {
        return None;
    }
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80) as usize;
    let entry_size = le32(&hdr, 84) as usize;
    if entry_size < 128 || !entry_size.is_multiple_of(8) {
        return None;
    }
    let table_len = count.checked_mul(entry_size).filter(|&n| n <= MAX_READ)?;
    let table = read(dev, size, entries_lba.checked_mul(lba)?, table_len)?;
    if crc32(&table) != le32(&hdr, 88) {
        return None;
    }
    let parts = table
        .chunks_exact(entry_size)
        .enumerate()
        .filter(|(_, e)| e[0..16].iter().any(|&c| c != 0))
        .map(|(i, e)| PartEntry {
            number: i as u32 + 1,
            partuuid: guid_le(&e[16..32]),
        })
        .collect();
    Some(parts)
}

/// One 16-byte MBR/EBR entry: (boot flag, type, start LBA, sectors).
fn mbr_entry(sec: &[u8], i: usize) -> (u8, u8, u32, u32) {
    let e = &sec[446 + 16 * i..446 + 16 * (i + 1)];
    (e[0], e[4], le32(e, 8), le32(e, 12))
}

fn mbr<F: FileExt>(dev: &F, size: u64) -> Option<Vec<PartEntry>> {
    let sec = read(dev, size, 0, 512)?;
    // exFAT and NTFS boot sectors also end in 0x55AA, with boot code where MBR
    // entries would be.
    let vbr = &sec[3..11] == EXFAT_NAME || &sec[3..11] == NTFS_NAME;
    if sec[510..512] != MBR_SIGNATURE || is_fat_boot_sector(&sec) || vbr {
        return None;
    }
    let entries: Vec<_> = (0..4).map(|i| mbr_entry(&sec, i)).collect();
    if entries.iter().any(|&(boot, ..)| boot != 0 && boot != 0x80) {
        return None;
    }
    let used = |&(_, t, start, len): &(u8, u8, u32, u32)| t != 0 && start != 0 && len != 0;
    if !entries.iter().any(used) {
        return None;
    }
    let sig = le32(&sec, 440);
    let partuuid = |n: u32| (sig != 0).then(|| format!("{sig:08x}-{n:02x}"));
    let mut parts: Vec<PartEntry> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if used(e) {
            parts.push(PartEntry {
                number: i as u32 + 1,
                partuuid: partuuid(i as u32 + 1),
            });
        }
    }
    if let Some(&(_, _, ext_start, _)) = entries
        .iter()
        .find(|e| used(e) && MBR_EXTENDED.contains(&e.1))
    {
        for n in logical_numbers(dev, size, ext_start) {
            parts.push(PartEntry {
                number: n,
                partuuid: partuuid(n),
            });
        }
    }
    Some(parts)
}

/// Follow the extended partition's EBR chain; logical partitions are numbered from 5.
fn logical_numbers<F: FileExt>(dev: &F, size: u64, ext_start: u32) -> Vec<u32> {
    let mut numbers = Vec::new();
    let mut ebr = u64::from(ext_start);
    for n in 5..5 + MAX_LOGICAL {
        let Some(sec) = ebr
            .checked_mul(SECTOR)
            .and_then(|off| read(dev, size, off, 512))
        else {
            break;
        };
        if sec[510..512] != MBR_SIGNATURE {
            break;
        }
        let (_, t, start, len) = mbr_entry(&sec, 0);
        if t != 0 && start != 0 && len != 0 {
            numbers.push(n);
        }
        let (_, next_t, next, _) = mbr_entry(&sec, 1);
        if next_t == 0 || next == 0 {
            break;
        }
        ebr = u64::from(ext_start) + u64::from(next);
    }
    numbers
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses), bitwise: the inputs are small.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_tools::run;
    use std::collections::HashMap;
    use std::fs::File;
    use std::path::Path;
    use std::process::Command;

    /// libblkid's low-level probe of a file, as KEY=value pairs: the oracle.
    fn blkid(path: &Path) -> HashMap<String, String> {
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(path)
            .output()
            .expect("blkid not runnable: install the Debian package util-linux");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), unescape(v)))
            .collect()
    }

    /// Undo `blkid -o export`'s backslash escaping of special characters.
    fn unescape(v: &str) -> String {
        let mut out = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            out.push(if c == '\\' {
                chars.next().unwrap_or(c)
            } else {
                c
            });
        }
        out
    }

    fn image(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    /// A `size`-byte image `dir/name` formatted by `tool args... <image>` (from `package`).
    fn formatted(
        dir: &Path,
        name: &str,
        size: u64,
        (package, tool): (&str, &str),
        args: &[&str],
    ) -> std::path::PathBuf {
        let p = image(dir, name, size);
        let mut argv = args.to_vec();
        argv.push(p.to_str().unwrap());
        run(package, tool, &argv);
        p
    }

    fn probe_file(path: &Path) -> Probe {
        let f = File::open(path).unwrap();
        let size = f.metadata().unwrap().len();
        probe(&f, size)
    }

    /// Probe a fresh mkfs image and compare TYPE, LABEL and UUID with blkid.
    fn assert_matches_blkid(path: &Path, fstype: &str) {
        let want = blkid(path);

        let got = probe_file(path);

        assert_eq!(
            got.fstype.as_deref(),
            Some(fstype),
            "type of {}",
            path.display()
        );
        assert_eq!(want.get("TYPE").map(String::as_str), Some(fstype));
        assert_eq!(
            got.label,
            want.get("LABEL").cloned(),
            "label of {}",
            path.display()
        );
        assert_eq!(
            got.uuid,
            want.get("UUID").cloned(),
            "uuid of {}",
            path.display()
        );
        assert!(!got.partitioned);
    }

    #[test]
    fn ext2_ext3_ext4_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        for (tool, fstype) in [
            ("mkfs.ext2", "ext2"),
            ("mkfs.ext3", "ext3"),
            ("mkfs.ext4", "ext4"),
        ] {
            let p = formatted(
                dir.path(),
                fstype,
                8 << 20,
                ("e2fsprogs", tool),
                &["-q", "-F", "-L", "lbl-x"],
            );

            assert_matches_blkid(&p, fstype);
            assert_eq!(probe_file(&p).label.as_deref(), Some("lbl-x"));
        }
    }

    #[test]
    fn ext2_with_extents_is_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let p = formatted(
            dir.path(),
            "e",
            8 << 20,
            ("e2fsprogs", "mkfs.ext4"),
            &["-q", "-F", "-O", "^has_journal"],
        );

        assert_matches_blkid(&p, "ext4");
    }

    #[test]
    fn vfat_12_16_32_label_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        for bits in ["12", "16", "32"] {
            let p = formatted(
                dir.path(),
                bits,
                40 << 20,
                ("dosfstools", "mkfs.vfat"),
                &["-F", bits, "-n", "MYLABEL", "-i", "1234abcd"],
            );

            assert_matches_blkid(&p, "vfat");
            assert_eq!(probe_file(&p).uuid.as_deref(), Some("1234-ABCD"));
            assert_eq!(partition_table(&File::open(&p).unwrap(), 40 << 20), None);
        }
    }

    #[test]
    fn btrfs_label_and_fsid() {
        let dir = tempfile::tempdir().unwrap();
        let p = formatted(
            dir.path(),
            "b",
            128 << 20,
            ("btrfs-progs", "mkfs.btrfs"),
            &["-q", "-f", "-L", "bt label"],
        );

        assert_matches_blkid(&p, "btrfs");
    }

    #[test]
    fn xfs_label_and_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let p = formatted(
            dir.path(),
            "x",
            320 << 20,
            ("xfsprogs", "mkfs.xfs"),
            &["-q", "-f", "-L", "xfslbl"],
        );

        assert_matches_blkid(&p, "xfs");
    }

    #[test]
    fn iso9660_volume_id_and_date_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello.txt"), b"hi\n").unwrap();
        let p = dir.path().join("cd.iso");
        run(
            "genisoimage",
            "genisoimage",
            &[
                "-quiet",
                "-V",
                "MY_CD",
                "-o",
                p.to_str().unwrap(),
                src.to_str().unwrap(),
            ],
        );

        assert_matches_blkid(&p, "iso9660");
    }

    #[test]
    fn exfat_label_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        let exfat = ("exfatprogs", "mkfs.exfat");
        let ascii = formatted(dir.path(), "ex", 16 << 20, exfat, &["-L", "Ex lab"]);
        let unicode = formatted(dir.path(), "ex2", 16 << 20, exfat, &["-L", "\u{e9}t\u{e9}"]);

        assert_matches_blkid(&ascii, "exfat");
        assert_eq!(probe_file(&ascii).label.as_deref(), Some("Ex lab"));
        assert_eq!(probe_file(&unicode).label.as_deref(), Some("\u{e9}t\u{e9}"));
        assert_eq!(
            partition_table(&File::open(&ascii).unwrap(), 16 << 20),
            None
        );
    }

    /// A directory with one file, for the tools that build a filesystem from one.
    fn tree(dir: &Path) -> std::path::PathBuf {
        let src = dir.join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello.txt"), b"hi\n").unwrap();
        src
    }

    #[test]
    fn ntfs_label_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        let ntfs = ("ntfs-3g", "mkntfs");
        let ascii = formatted(
            dir.path(),
            "n",
            16 << 20,
            ntfs,
            &["-F", "-Q", "-q", "-L", "Win lab"],
        );
        let unicode = formatted(
            dir.path(),
            "u",
            16 << 20,
            ntfs,
            &["-F", "-Q", "-q", "-L", "\u{e9}t\u{e9} \u{263a}"],
        );

        assert_matches_blkid(&ascii, "ntfs");
        assert_eq!(probe_file(&ascii).label.as_deref(), Some("Win lab"));
        assert_eq!(
            probe_file(&unicode).label.as_deref(),
            Some("\u{e9}t\u{e9} \u{263a}")
        );
        assert_eq!(
            partition_table(&File::open(&ascii).unwrap(), 16 << 20),
            None
        );
    }

    #[test]
    fn squashfs_4() {
        let dir = tempfile::tempdir().unwrap();
        let src = tree(dir.path());
        let p = dir.path().join("sq");
        run(
            "squashfs-tools",
            "mksquashfs",
            &[
                src.to_str().unwrap(),
                p.to_str().unwrap(),
                "-quiet",
                "-noappend",
            ],
        );

        assert_matches_blkid(&p, "squashfs");
    }

    #[test]
    fn erofs_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let src = tree(dir.path());
        let p = dir.path().join("ero");
        let uuid = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";
        run(
            "erofs-utils",
            "mkfs.erofs",
            &[
                "--quiet",
                &format!("-U{uuid}"),
                p.to_str().unwrap(),
                src.to_str().unwrap(),
            ],
        );

        assert_matches_blkid(&p, "erofs");
        assert_eq!(probe_file(&p).uuid.as_deref(), Some(uuid));
    }

    #[test]
    fn udf_label_and_volume_set_uuid_for_each_block_size() {
        let dir = tempfile::tempdir().unwrap();
        let udf = ("udftools", "mkudffs");
        for (block, vsid) in [("512", "0123456789ABCDEF"), ("2048", "cafe"), ("4096", "x")] {
            let vsid = format!("--vsid={vsid}");
            let args = ["-b", block, "--media-type=hd", "--lvid=Udf lab", &vsid];
            let p = formatted(dir.path(), block, 16 << 20, udf, &args);

            assert_matches_blkid(&p, "udf");
            assert_eq!(probe_file(&p).label.as_deref(), Some("Udf lab"));
        }
        let unicode = formatted(
            dir.path(),
            "u",
            16 << 20,
            udf,
            &["--lvid=\u{e9}t\u{e9} \u{263a}"],
        );
        assert_eq!(
            probe_file(&unicode).label.as_deref(),
            Some("\u{e9}t\u{e9} \u{263a}")
        );
    }

    /// Overwrite the volume set identifier of every primary volume descriptor in the
    /// main sequence of a `block`-byte-block UDF image (blkid does not check tag CRCs).
    fn set_udf_vsid(p: &Path, block: u64, vsid: &[u8]) {
        let f = File::options().read(true).write(true).open(p).unwrap();
        let size = f.metadata().unwrap().len();
        let (_, vds, len) = udf_anchor(&f, size, block).unwrap();
        let mut field = [0u8; 128];
        field[0] = 8;
        field[1..1 + vsid.len()].copy_from_slice(vsid);
        field[127] = vsid.len() as u8 + 1;
        for i in 0..u64::from(len) / block {
            let off = (u64::from(vds) + i) * block;
            let d = read(&f, size, off, 2).unwrap();
            if le16(&d, 0) == UDF_TAG_PVD {
                f.write_all_at(&field, off + 72).unwrap();
            }
        }
    }

    #[test]
    fn udf_uuid_from_any_volume_set_identifier_as_blkid_derives_it() {
        let dir = tempfile::tempdir().unwrap();
        let vsids: [&[u8]; 5] = [
            b"12345678xyz",
            b"123456789Zq",
            b"xyzxyzxyzxyz",
            b"abc",
            b"0123456789abcdefghij",
        ];
        for (i, vsid) in vsids.into_iter().enumerate() {
            let p = formatted(
                dir.path(),
                &format!("u{i}"),
                8 << 20,
                ("udftools", "mkudffs"),
                &["-b", "512", "--media-type=hd"],
            );
            set_udf_vsid(&p, 512, vsid);

            assert_matches_blkid(&p, "udf");
        }
    }

    #[test]
    fn swap_label_and_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";
        let p = formatted(
            dir.path(),
            "s",
            4 << 20,
            ("util-linux", "mkswap"),
            &["-q", "-L", "swp", "-U", uuid],
        );

        assert_matches_blkid(&p, "swap");
        assert_eq!(probe_file(&p).uuid.as_deref(), Some(uuid));
    }

    #[test]
    fn luks1_and_luks2_containers_match_blkid() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, b"probe key").unwrap();
        for (version, extra) in [("luks1", &[][..]), ("luks2", &["--label", "vault"][..])] {
            let img = dir.path().join(format!("{version}.img"));
            File::create(&img).unwrap().set_len(20 << 20).unwrap();
            let mut args = vec![
                "luksFormat",
                "-q",
                "--disable-locks",
                "--type",
                version,
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                key.to_str().unwrap(),
            ];
            if version == "luks2" {
                args.extend(["--pbkdf", "pbkdf2"]);
            }
            args.extend(extra);
            args.push(img.to_str().unwrap());
            run("cryptsetup-bin", "cryptsetup", &args);

            assert_matches_blkid(&img, "crypto_LUKS");
        }
    }

    #[test]
    fn lvm2_physical_volume_label() {
        // pvcreate needs a block device, so build the label as lib/format_text/layout.h
        // describes it: label_header in sector 1, pv_header (id first) right after it.
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "pv", 4 << 20);
        let mut sec = [0u8; 512];
        sec[0..8].copy_from_slice(LVM_LABEL);
        sec[8..16].copy_from_slice(&1u64.to_le_bytes());
        sec[20..24].copy_from_slice(&32u32.to_le_bytes());
        sec[24..32].copy_from_slice(LVM_TYPE);
        sec[32..64].copy_from_slice(b"AbCdEf0123456789GhIjKlMnOpQrStUv");
        let crc = lvm_crc(&sec[20..]);
        sec[16..20].copy_from_slice(&crc.to_le_bytes());
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&sec, 512)
            .unwrap();

        assert_matches_blkid(&p, "LVM2_member");
        assert_eq!(
            probe_file(&p).uuid.as_deref(),
            Some("AbCdEf-0123-4567-89Gh-IjKl-MnOp-QrStUv")
        );
    }

    /// LVM's label CRC (lib/misc/crc.c: initial 0xf597a6cf, no final inversion).
    fn lvm_crc(data: &[u8]) -> u32 {
        let mut crc = 0xf597_a6cfu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    #[test]
    fn gpt_partuuids_are_the_unique_guids() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "gpt", 16 << 20);
        let path = p.to_str().unwrap();
        run(
            "gdisk",
            "sgdisk",
            &["-n", "1:2048:+4M", "-n", "3:0:+4M", path],
        );
        run(
            "gdisk",
            "sgdisk",
            &[
                "-u",
                "1:6F1E2D3C-4B5A-4978-8695-A4B3C2D1E0F9",
                "-u",
                "3:00112233-4455-6677-8899-AABBCCDDEEFF",
                path,
            ],
        );
        let f = File::open(&p).unwrap();

        let table = partition_table(&f, 16 << 20);
        let whole = probe(&f, 16 << 20);

        assert_eq!(
            table,
            Some(vec![
                PartEntry {
                    number: 1,
                    partuuid: Some("6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".into())
                },
                PartEntry {
                    number: 3,
                    partuuid: Some("00112233-4455-6677-8899-aabbccddeeff".into())
                },
            ])
        );
        assert!(whole.partitioned);
        assert_eq!(whole.fstype, None);
    }

    #[test]
    fn mbr_partuuids_use_the_disk_signature_including_logicals() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "mbr", 32 << 20);
        let script = "label: dos\nlabel-id: 0x1a2b3c4d\n,4M,L\n,4M,L\n,,E\n,4M,L\n,4M,L\n";
        let mut child = Command::new("sfdisk")
            .args(["-q", p.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk not runnable: install the Debian package fdisk");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        let f = File::open(&p).unwrap();

        let numbers: Vec<(u32, Option<String>)> = partition_table(&f, 32 << 20)
            .unwrap()
            .into_iter()
            .map(|e| (e.number, e.partuuid))
            .collect();

        let want: Vec<(u32, Option<String>)> = [1, 2, 3, 5, 6]
            .iter()
            .map(|&n| (n, Some(format!("1a2b3c4d-{n:02x}"))))
            .collect();
        assert_eq!(numbers, want);
        assert!(probe(&f, 32 << 20).partitioned);
    }

    #[test]
    fn blank_and_tiny_devices_are_unrecognised() {
        let dir = tempfile::tempdir().unwrap();
        let blank = image(dir.path(), "blank", 1 << 20);
        let tiny = image(dir.path(), "tiny", 100);

        assert_eq!(probe_file(&blank), Probe::default());
        assert_eq!(probe_file(&tiny), Probe::default());
    }

    #[test]
    fn hostile_gpt_entry_count_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "bad", 1 << 20);
        let mut hdr = [0u8; 92];
        hdr[0..8].copy_from_slice(GPT_SIGNATURE);
        hdr[12..16].copy_from_slice(&92u32.to_le_bytes());
        hdr[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        hdr[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
        let crc = crc32(&hdr);
        hdr[16..20].copy_from_slice(&crc.to_le_bytes());
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&hdr, 512)
            .unwrap();

        assert_eq!(partition_table(&File::open(&p).unwrap(), 1 << 20), None);
    }
}
