//! A test-only writer of the LVM2 on-disk format, because `pvcreate`/`vgcreate`/
//! `lvcreate` need a block device (root and loop devices) and the tests run as an
//! ordinary user. It writes a whole-disk physical volume holding one volume group with
//! linear logical volumes, each filled with a filesystem image, laid out as
//! lib/format_text/layout.h and lib/label/label.c describe:
//!
//! ```text
//! sector 1        label_header "LABELONE" (crc over the rest of the sector), then
//!                 pv_header: PV UUID, device size, data areas, metadata areas,
//!                 pv_header_extension (version 2, flags "in use")
//! 4096            mda_header: checksum, " LVM2 x[5A%r0N*>", version 1, start, size,
//!                 raw_locn { offset 512, size, checksum of the text }
//! 4096 + 512      the VG metadata text, NUL-terminated (the size counts the NUL)
//! 1 MiB           pe_start: the extents, 4 MiB each, LVs back to back
//! ```
//!
//! Checked by `pvck --dump metadata` on the file (no device needed) and, for real, by
//! the guest's lvm activating it and the guest kernel mounting the LVs.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Offset of the label sector (lib/label/label.h: the label may be in sectors 0-3).
const LABEL_SECTOR: u64 = 1;
const SECTOR: u64 = 512;
/// lib/label/label.h LABEL_ID.
const LABEL_ID: &[u8; 8] = b"LABELONE";
/// lib/format_text/layout.h LVM2_LABEL.
const LVM2_LABEL: &[u8; 8] = b"LVM2 001";
/// lib/format_text/layout.h FMTT_MAGIC.
const FMTT_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// lib/format_text/layout.h FMTT_VERSION.
const FMTT_VERSION: u32 = 1;
/// lib/format_text/layout.h PV_HEADER_EXTENSION_VSN.
const PV_EXT_VERSION: u32 = 2;
/// lib/format_text/layout.h PV_EXT_USED: the PV belongs to a VG.
const PV_EXT_USED: u32 = 1;
/// lib/misc/crc.h INITIAL_CRC.
const INITIAL_CRC: u32 = 0xf597_a6cf;
/// Where the metadata area starts and where the extents start (LVM's defaults).
const MDA_START: u64 = 4096;
const PE_START: u64 = 1 << 20;
/// mda_header size (MDA_HEADER_SIZE).
const MDA_HEADER_SIZE: u64 = 512;
/// Extent size: 4 MiB, LVM's default.
const EXTENT: u64 = 4 << 20;

/// One logical volume: its name and the filesystem image it holds.
pub struct Lv<'a> {
    pub name: &'a str,
    pub image: &'a Path,
}

/// LVM's CRC (lib/misc/crc.c): reflected CRC-32 (polynomial 0xEDB88320) started at
/// [`INITIAL_CRC`], without the final inversion.
pub fn crc(data: &[u8]) -> u32 {
    let mut c = INITIAL_CRC;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    c
}

/// A 32-character LVM id (lib/uuid/uuid.c alphabet) derived from `seed`.
fn id(seed: u64) -> String {
    const CHARS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    // pseudo_random ignores the seed's lowest bit: spread seeds so each gives its own id.
    super::pseudo_random(32, seed.wrapping_mul(2).wrapping_add(1))
        .iter()
        .map(|&b| CHARS[b as usize % CHARS.len()] as char)
        .collect()
}

/// An id as the metadata text writes it: 6-4-4-4-4-4-6 groups.
fn formatted(id: &str) -> String {
    let mut out = String::new();
    let mut pos = 0;
    for (i, n) in [6, 4, 4, 4, 4, 4, 6].iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.push_str(&id[pos..pos + n]);
        pos += n;
    }
    out
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The VG metadata text for `lvs` of `extents` extents each, in order from extent 0.
fn metadata(vg: &str, pv_id: &str, dev_sectors: u64, pe_count: u64, lvs: &[(&str, u64)]) -> String {
    let mut t = format!(
        "{vg} {{\nid = \"{}\"\nseqno = 1\nformat = \"lvm2\"\nstatus = [\"RESIZEABLE\", \"READ\", \"WRITE\"]\nflags = []\n\
         extent_size = {}\nmax_lv = 0\nmax_pv = 0\nmetadata_copies = 0\n\nphysical_volumes {{\n\npv0 {{\nid = \"{}\"\n\
         device = \"/dev/vda\"\n\nstatus = [\"ALLOCATABLE\"]\nflags = []\ndev_size = {dev_sectors}\npe_start = {}\npe_count = {pe_count}\n}}\n}}\n\n\
         logical_volumes {{\n",
        formatted(&id(0x76_67)),
        EXTENT / SECTOR,
        formatted(pv_id),
        PE_START / SECTOR,
    );
    let mut first = 0;
    for (i, (name, extents)) in lvs.iter().enumerate() {
        t.push_str(&format!(
            "\n{name} {{\nid = \"{}\"\nstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\nflags = []\ncreation_time = 1600000000\n\
             creation_host = \"imgsafe-test\"\nsegment_count = 1\n\nsegment1 {{\nstart_extent = 0\nextent_count = {extents}\n\n\
             type = \"striped\"\nstripe_count = 1\n\nstripes = [\n\"pv0\", {first}\n]\n}}\n}}\n",
            formatted(&id(0x1000 + i as u64)),
        ));
        first += extents;
    }
    t.push_str(
        "}\n\n}\n# Generated by the imgsafe test LVM writer\n\ncontents = \"Text Format Volume Group\"\nversion = 1\n\n\
         description = \"\"\n\ncreation_host = \"imgsafe-test\"\ncreation_time = 1600000000\n\n",
    );
    t
}

/// Write a disk image at `out`: one whole-disk PV, VG `vg`, and one linear LV per
/// entry of `lvs`, holding that filesystem image.
pub fn lvm_disk(vg: &str, lvs: &[Lv], out: &Path) {
    let sized: Vec<(&str, u64)> = lvs
        .iter()
        .map(|l| {
            (
                l.name,
                fs::metadata(l.image).unwrap().len().div_ceil(EXTENT).max(1),
            )
        })
        .collect();
    // One spare extent, as a real VG usually has free space.
    let pe_count: u64 = sized.iter().map(|(_, n)| n).sum::<u64>() + 1;
    let dev_size = PE_START + pe_count * EXTENT;
    let pv_id = id(0x7076);
    let mut text = metadata(vg, &pv_id, dev_size / SECTOR, pe_count, &sized).into_bytes();
    text.push(0);
    let f = write_pv(out, &pv_id, dev_size, &text);
    let mut extent = 0;
    for (l, (_, n)) in lvs.iter().zip(&sized) {
        super::copy_sparse(l.image, &f, PE_START + extent * EXTENT);
        extent += n;
    }
}

/// Create `out` as a physical volume of `dev_size` bytes with id `pv_id`: the label
/// sector, the metadata area header and the NUL-terminated metadata `text`. Returns the
/// file, for the caller to fill the extents from [`PE_START`].
fn write_pv(out: &Path, pv_id: &str, dev_size: u64, text: &[u8]) -> fs::File {
    let mda_size = PE_START - MDA_START;
    assert!(
        (text.len() as u64) < mda_size - MDA_HEADER_SIZE,
        "metadata too large"
    );
    let mut label = [0u8; SECTOR as usize];
    label[0..8].copy_from_slice(LABEL_ID);
    put_u64(&mut label, 8, LABEL_SECTOR);
    put_u32(&mut label, 20, 32);
    label[24..32].copy_from_slice(LVM2_LABEL);
    label[32..64].copy_from_slice(pv_id.as_bytes());
    put_u64(&mut label, 64, dev_size);
    // Data areas: {pe_start, 0 = to the end}, then the terminating {0, 0}.
    put_u64(&mut label, 72, PE_START);
    // Metadata areas at 104: {MDA_START, size}, then {0, 0}.
    put_u64(&mut label, 104, MDA_START);
    put_u64(&mut label, 112, mda_size);
    // pv_header_extension at 136: version, flags, empty bootloader-area list.
    put_u32(&mut label, 136, PV_EXT_VERSION);
    put_u32(&mut label, 140, PV_EXT_USED);
    let c = crc(&label[20..]);
    put_u32(&mut label, 16, c);

    let mut mda = [0u8; MDA_HEADER_SIZE as usize];
    mda[4..20].copy_from_slice(FMTT_MAGIC);
    put_u32(&mut mda, 20, FMTT_VERSION);
    put_u64(&mut mda, 24, MDA_START);
    put_u64(&mut mda, 32, mda_size);
    // raw_locn[0] at 40: offset from MDA_START, size, checksum, flags.
    put_u64(&mut mda, 40, MDA_HEADER_SIZE);
    put_u64(&mut mda, 48, text.len() as u64);
    put_u32(&mut mda, 56, crc(text));
    let c = crc(&mda[4..]);
    put_u32(&mut mda, 0, c);

    let f = fs::File::create(out).unwrap();
    f.set_len(dev_size).unwrap();
    f.write_all_at(&label, LABEL_SECTOR * SECTOR).unwrap();
    f.write_all_at(&mda, MDA_START).unwrap();
    f.write_all_at(text, MDA_START + MDA_HEADER_SIZE).unwrap();
    f
}

/// Write two disk images, `outs[0]` and `outs[1]`, each one whole-disk physical volume
/// of VG `vg`, holding one linear LV `lv` that spans both: its first half of extents on
/// the first disk, the rest on the second (two segments), filled with `image`.
pub fn lvm_spanning_disks(vg: &str, lv: &Lv, outs: [&Path; 2]) {
    let total = fs::metadata(lv.image)
        .unwrap()
        .len()
        .div_ceil(EXTENT)
        .max(2);
    let first = total / 2;
    let counts = [first, total - first];
    let ids = [id(0x7076), id(0x7077)];
    // Each PV has one spare extent, as a real VG usually has free space.
    let sizes = counts.map(|n| PE_START + (n + 1) * EXTENT);
    let mut t = format!(
        "{vg} {{\nid = \"{}\"\nseqno = 1\nformat = \"lvm2\"\nstatus = [\"RESIZEABLE\", \"READ\", \"WRITE\"]\nflags = []\n\
         extent_size = {}\nmax_lv = 0\nmax_pv = 0\nmetadata_copies = 0\n\nphysical_volumes {{\n",
        formatted(&id(0x76_68)),
        EXTENT / SECTOR,
    );
    for (i, ((pv_id, size), n)) in ids.iter().zip(sizes).zip(counts).enumerate() {
        t.push_str(&format!(
            "\npv{i} {{\nid = \"{}\"\ndevice = \"/dev/vd{}\"\n\nstatus = [\"ALLOCATABLE\"]\nflags = []\n\
             dev_size = {}\npe_start = {}\npe_count = {}\n}}\n",
            formatted(pv_id),
            (b'b' + i as u8) as char,
            size / SECTOR,
            PE_START / SECTOR,
            n + 1,
        ));
    }
    t.push_str(&format!(
        "}}\n\nlogical_volumes {{\n\n{} {{\nid = \"{}\"\nstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\nflags = []\n\
         creation_time = 1600000000\ncreation_host = \"imgsafe-test\"\nsegment_count = 2\n",
        lv.name,
        formatted(&id(0x2000)),
    ));
    let mut start = 0;
    for (i, n) in counts.iter().enumerate() {
        t.push_str(&format!(
            "\nsegment{} {{\nstart_extent = {start}\nextent_count = {n}\n\ntype = \"striped\"\nstripe_count = 1\n\n\
             stripes = [\n\"pv{i}\", 0\n]\n}}\n",
            i + 1
        ));
        start += n;
    }
    t.push_str(
        "}\n}\n\n}\n# Generated by the imgsafe test LVM writer\n\ncontents = \"Text Format Volume Group\"\nversion = 1\n\n\
         description = \"\"\n\ncreation_host = \"imgsafe-test\"\ncreation_time = 1600000000\n\n",
    );
    let mut text = t.into_bytes();
    text.push(0);
    let data = fs::read(lv.image).unwrap();
    let split = usize::try_from(first * EXTENT).unwrap().min(data.len());
    for (i, out) in outs.iter().enumerate() {
        let f = write_pv(out, &ids[i], sizes[i], &text);
        let part = if i == 0 {
            &data[..split]
        } else {
            &data[split..]
        };
        f.write_all_at(part, PE_START).unwrap();
    }
}
