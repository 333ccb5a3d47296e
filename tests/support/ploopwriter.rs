//! Test-only ploop writer: v1 and v2 images with any cluster size, data clusters written in
//! a shuffled order, and DiskDescriptor.xml files for delta chains.
//!
#![allow(dead_code)]

use std::path::Path;

/// How to lay out one ploop file.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// `WithouFreSpacExt` (cluster-index BAT) instead of `WithoutFreeSpace` (sector BAT).
    pub v2: bool,
    /// Cluster size in 512-byte sectors (63, 512 = 256 KiB, 2048 = 1 MiB, ...).
    pub cluster_sectors: u32,
    /// Virtual disk size in bytes (a multiple of 512).
    pub size: u64,
    /// Write m_DiskInUse = 0x746F6E59.
    pub in_use: bool,
}

impl Spec {
    /// A v2 image with 1 MiB clusters.
    pub fn v2(size: u64) -> Spec {
        Spec {
            v2: true,
            cluster_sectors: 2048,
            size,
            in_use: false,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.cluster_sectors) * 512
    }

    /// Number of clusters of the virtual disk (= BAT entries).
    pub fn clusters(&self) -> u64 {
        self.size.div_ceil(self.cluster_size())
    }
}

/// A small deterministic PRNG (xorshift64*), so tests need no extra crate.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (seed 0 is remapped).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// Next pseudo-random value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fill `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Shuffle in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Write a ploop file whose virtual cluster `i` holds `disk[i * cs..]` when `allocated[i]`;
/// the data clusters are placed in the file in an order shuffled by `seed`.
pub fn write_ploop(path: &Path, spec: &Spec, disk: &[u8], allocated: &[bool], seed: u64) {
    assert_eq!(disk.len() as u64, spec.size);
    assert_eq!(allocated.len() as u64, spec.clusters());
    let cs = spec.cluster_size();
    let bat_entries = spec.clusters();
    let bat_end = 64 + 4 * bat_entries;
    // ploop and QEMU start the data area at a cluster boundary after the BAT.
    let data_start = bat_end.div_ceil(cs) * cs;
    let mut order: Vec<u64> = (0..bat_entries)
        .filter(|&i| allocated[i as usize])
        .collect();
    Rng::new(seed).shuffle(&mut order);
    let mut img = vec![0u8; (data_start + cs * order.len() as u64) as usize];
    img[..16].copy_from_slice(if spec.v2 {
        b"WithouFreSpacExt"
    } else {
        b"WithoutFreeSpace"
    });
    img[16..20].copy_from_slice(&2u32.to_le_bytes());
    img[20..24].copy_from_slice(&16u32.to_le_bytes());
    img[24..28].copy_from_slice(&((spec.size / 512 / 16 / 32) as u32).to_le_bytes());
    img[28..32].copy_from_slice(&spec.cluster_sectors.to_le_bytes());
    img[32..36].copy_from_slice(&(bat_entries as u32).to_le_bytes());
    img[36..44].copy_from_slice(&(spec.size / 512).to_le_bytes());
    if spec.in_use {
        img[44..48].copy_from_slice(&0x746F_6E59u32.to_le_bytes());
    }
    img[48..52].copy_from_slice(&((data_start / 512) as u32).to_le_bytes());
    for (slot, &index) in order.iter().enumerate() {
        let host = data_start + slot as u64 * cs;
        let entry = if spec.v2 { host / cs } else { host / 512 };
        let at = (64 + 4 * index) as usize;
        img[at..at + 4].copy_from_slice(&(entry as u32).to_le_bytes());
        let from = (index * cs) as usize;
        let to = ((index + 1) * cs).min(spec.size) as usize;
        img[host as usize..host as usize + (to - from)].copy_from_slice(&disk[from..to]);
    }
    std::fs::write(path, img).unwrap();
}

/// One image of a descriptor: GUID, file name, `Compressed` or `Plain`.
pub struct DescImage<'a> {
    /// `{...}` GUID.
    pub guid: &'a str,
    /// File name relative to the descriptor.
    pub file: &'a str,
    /// `Compressed` or `Plain`.
    pub kind: &'a str,
}

/// Write a DiskDescriptor.xml with the given images, shots `(guid, parent)` and TopGUID.
pub fn write_descriptor(
    path: &Path,
    disk_sectors: u64,
    block_sectors: u32,
    images: &[DescImage<'_>],
    shots: &[(&str, &str)],
    top: Option<&str>,
) {
    let mut x = String::from("<?xml version=\"1.0\"?>\n<Parallels_disk_image Version=\"1.0\">\n");
    x += &format!(
        "  <Disk_Parameters>\n    <Disk_size>{disk_sectors}</Disk_size>\n    <Cylinders>{}</Cylinders>\n    <Heads>16</Heads>\n    <Sectors>32</Sectors>\n    <Padding>0</Padding>\n  </Disk_Parameters>\n",
        disk_sectors / 512
    );
    x += &format!("  <StorageData>\n    <Storage>\n      <Start>0</Start>\n      <End>{disk_sectors}</End>\n      <Blocksize>{block_sectors}</Blocksize>\n");
    for i in images {
        x += &format!(
            "      <Image>\n        <GUID>{}</GUID>\n        <Type>{}</Type>\n        <File>{}</File>\n      </Image>\n",
            i.guid, i.kind, i.file
        );
    }
    x += "    </Storage>\n  </StorageData>\n  <Snapshots>\n";
    if let Some(t) = top {
        x += &format!("    <TopGUID>{t}</TopGUID>\n");
    }
    for (g, p) in shots {
        x += &format!(
            "    <Shot>\n      <GUID>{g}</GUID>\n      <ParentGUID>{p}</ParentGUID>\n    </Shot>\n"
        );
    }
    x += "  </Snapshots>\n</Parallels_disk_image>\n";
    std::fs::write(path, x).unwrap();
}

/// Write a DiskDescriptor.xml for a two-delta chain: `base` (snapshot [`guid`]`(1)`) under
/// `top` ([`TOP_GUID`]), both images of `kind`, without a TopGUID element.
pub fn write_two_delta_descriptor(
    path: &Path,
    disk_sectors: u64,
    block_sectors: u32,
    (base, top): (&str, &str),
    kind: &str,
) {
    let g = guid(1);
    let images = [
        DescImage {
            guid: &g,
            file: base,
            kind,
        },
        DescImage {
            guid: TOP_GUID,
            file: top,
            kind,
        },
    ];
    let shots = [(g.as_str(), NONE_GUID), (TOP_GUID, g.as_str())];
    write_descriptor(path, disk_sectors, block_sectors, &images, &shots, None);
}

/// The root snapshot's ParentGUID.
pub const NONE_GUID: &str = "{00000000-0000-0000-0000-000000000000}";
/// The predefined top GUID.
pub const TOP_GUID: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";

/// A GUID numbered `n`, for chains.
pub fn guid(n: usize) -> String {
    format!("{{11111111-2222-3333-4444-{n:012}}}")
}
