//! Deterministic corruption of real images (made by qemu-img and tar) for every decoder
//! added with VDI, VHDX, VMDK and OVA: bytes of the headers, tables and metadata are
//! changed at random, and opening, mapping and reading the result must return (data or
//! an error), never panic or hang. A quick, repeatable complement to the fuzz targets in
//! fuzz/, run with the ordinary tests.

mod support;

use imgsafe::format::{self, OpenOptions};
use std::fs;
use std::path::Path;
use support::serve::{qemu_img, s};
use support::*;

/// Mutated copies tried per image.
const ROUNDS: usize = 150;

/// xorshift64, seeded per image so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Open, map and read `path` whatever it holds; panics only if a decoder does.
fn exercise(path: &Path) {
    let Ok(src) = format::open(path, &OpenOptions::default()) else {
        return;
    };
    let size = src.size();
    let _ = src.layers();
    let _ = src.extents(0, size.min(64 << 20));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size.min(64 << 20) {
        let n = (buf.len() as u64).min(size - off) as usize;
        let _ = src.read_at(&mut buf[..n], off);
        off += n as u64;
    }
    assert!(src.read_at(&mut buf[..1], size).is_err());
}

/// Corrupt `good` ROUNDS times in `hot` (byte ranges where the structures are) and
/// exercise each copy, written as `name` in `dir`.
fn mutate(dir: &Path, name: &str, good: &[u8], hot: &[(usize, usize)], seed: u64) {
    let mut rng = Rng(seed);
    let path = dir.join(name);
    for _ in 0..ROUNDS {
        let mut b = good.to_vec();
        for _ in 0..1 + rng.next() % 8 {
            let (a, z) = hot[(rng.next() % hot.len() as u64) as usize];
            let z = z.min(b.len());
            if z <= a {
                continue;
            }
            let at = a + (rng.next() % (z - a) as u64) as usize;
            b[at] = match rng.next() % 4 {
                0 => 0,
                1 => 0xff,
                2 => b[at] ^ (1 << (rng.next() % 8)),
                _ => rng.next() as u8,
            };
        }
        fs::write(&path, &b).unwrap();
        exercise(&path);
    }
}

fn qemu_image(dir: &Path, fmt: &str, opts: &str, name: &str) -> Vec<u8> {
    let raw = dir.join("src.raw");
    let mut disk = pseudo_random(3 << 20, 7);
    disk[1 << 20..2 << 20].fill(0);
    fs::write(&raw, &disk).unwrap();
    let img = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&raw), s(&img)]);
    qemu_img(&args);
    fs::read(&img).unwrap()
}

#[test]
fn corrupted_vdi_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = qemu_image(dir.path(), "vdi", "", "good.vdi");

    mutate(
        dir.path(),
        "m.vdi",
        &good,
        &[(0x40, 0x200), (0x200, 0x220)],
        1,
    );
}

#[test]
fn corrupted_vhdx_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = qemu_image(dir.path(), "vhdx", "block_size=1M", "good.vhdx");
    // Headers and region tables would just fail their checksums: the BAT and metadata
    // (at 1 MiB and later, no checksum) are where a decoder's checks matter.
    let (bat, meta) = (2 << 20, 3 << 20);

    mutate(
        dir.path(),
        "m.vhdx",
        &good,
        &[
            (bat, bat + 64),
            (meta, meta + 256),
            (meta + (64 << 10), meta + (64 << 10) + 64),
        ],
        2,
    );
}

#[test]
fn corrupted_vmdk_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = qemu_image(
        dir.path(),
        "vmdk",
        "subformat=monolithicSparse",
        "good.vmdk",
    );
    let stream = qemu_image(dir.path(), "vmdk", "subformat=streamOptimized", "so.vmdk");
    let n = stream.len();

    mutate(
        dir.path(),
        "m.vmdk",
        &sparse,
        &[(0, 80), (512, 1024), (21 * 512, 40 * 512)],
        3,
    );
    mutate(
        dir.path(),
        "s.vmdk",
        &stream,
        &[(0, 80), (128 * 512, 128 * 512 + 64), (n - 1536, n)],
        4,
    );
}

#[test]
fn corrupted_ova_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    qemu_image(dir.path(), "vmdk", "subformat=streamOptimized", "d.vmdk");
    must(
        tool("tar", "tar")
            .current_dir(dir.path())
            .args(["-cf", "good.ova", "d.vmdk"]),
    );
    let good = fs::read(dir.path().join("good.ova")).unwrap();

    mutate(dir.path(), "m.ova", &good, &[(0, 512), (512, 600)], 5);
}
