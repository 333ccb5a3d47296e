//! VHD decoding, checked against the raw source and against qemu-img (`-f vpc`), plus
//! differencing chains and broken files made by the test writer in tests/common.
mod support;

use imgsafe::format::{self, BlockSource, OpenOptions};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::vhdwriter::{self, macx, w2ku, w2ru, VhdImage, BAT_OFFSET, HEADER_OFFSET};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img not runnable ({e}): install the Debian package qemu-utils")
        });
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// A deterministic raw disk of `len` bytes: pseudo-random data with zero holes (whole
/// 2 MiB blocks and smaller runs) so qemu leaves some blocks unallocated.
fn raw_disk(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let block = i / (2 << 20);
        let in_hole = block % 3 == 1 || (i / 40_000) % 5 == 2;
        *b = if in_hole { 0 } else { x as u8 };
    }
    v
}

/// Read the whole virtual disk through `src` in uneven chunks (crossing block edges).
fn read_all(src: &dyn BlockSource) -> Vec<u8> {
    let size = src.size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0;
    let mut step = 1_000_448; // not a divisor of the block size
    while pos < size {
        let n = step.min(size - pos);
        src.read_at(&mut out[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = if step == 1_000_448 {
            3 * 512 + 7
        } else {
            1_000_448
        };
    }
    out
}

fn open(path: &Path) -> Box<dyn BlockSource> {
    format::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_err(path: &Path, opts: &OpenOptions) -> String {
    match format::open(path, opts) {
        Ok(_) => panic!("{} opened but should have failed", path.display()),
        Err(e) => e.to_string(),
    }
}

/// qemu-img convert FILE (`-f vpc`) to raw; returns the bytes.
fn qemu_to_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-out.raw");
    qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// Convert a raw disk with qemu-img to VHD with `opts`, decode it with imgsafe, and
/// compare with the source and with qemu's own decoding.
fn check_qemu_made(opts: &str, raw_len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(raw_len, 7);
    let raw_path = dir.path().join("src.raw");
    std::fs::write(&raw_path, &raw).unwrap();
    let vhd = dir.path().join("disk.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        opts,
        raw_path.to_str().unwrap(),
        vhd.to_str().unwrap(),
    ]);
    let before = sha(&vhd);

    let src = open(&vhd);
    let got = read_all(src.as_ref());

    let qemu = qemu_to_raw(&vhd, dir.path());
    assert_eq!(got.len(), qemu.len(), "virtual size differs from qemu's");
    assert!(
        got == qemu,
        "imgsafe and qemu-img decode {opts} differently"
    );
    assert!(got.len() >= raw.len());
    assert!(
        got[..raw.len()] == raw[..],
        "decoded disk differs from the raw source"
    );
    assert!(got[raw.len()..].iter().all(|&b| b == 0));
    assert_eq!(sha(&vhd), before, "image file changed");
    (dir, vhd, raw)
}

#[test]
fn qemu_dynamic_matches_source_and_qemu() {
    let (_dir, vhd, raw) = check_qemu_made("subformat=dynamic", 9 * MIB as usize + 4321);

    let src = open(&vhd);
    let ext = src.extents(0, src.size()).unwrap();
    let layers = src.layers();

    assert!(
        ext.iter().any(|e| !e.allocated),
        "qemu should leave the all-zero block unallocated"
    );
    for e in ext.iter().filter(|e| !e.allocated) {
        let end = (e.offset + e.length).min(raw.len() as u64) as usize;
        assert!(
            raw[e.offset as usize..end].iter().all(|&b| b == 0),
            "hole over data at {}",
            e.offset
        );
    }
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), src.size());
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].version.as_deref(), Some("dynamic"));
    assert_eq!(layers[0].role, "image");
    assert_eq!(layers[0].cluster_size, Some(2 * MIB));
}

#[test]
fn qemu_dynamic_force_size_matches_source_and_qemu() {
    check_qemu_made("subformat=dynamic,force_size=on", 5 * MIB as usize + 1000);
}

#[test]
fn qemu_fixed_matches_source_and_qemu() {
    let (_dir, vhd, _) = check_qemu_made("subformat=fixed", 3 * MIB as usize + 12345);

    let layers = open(&vhd).layers();

    assert_eq!(layers[0].version.as_deref(), Some("fixed"));
    assert_eq!(layers[0].format, "vhd");
}

#[test]
fn qemu_fixed_force_size_matches_source_and_qemu() {
    check_qemu_made("subformat=fixed,force_size=on", 3 * MIB as usize + 512);
}

/// A base made by qemu and its decoded bytes.
fn qemu_base(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let raw_path = dir.join(format!("{name}.raw"));
    std::fs::write(&raw_path, raw_disk(len, 3)).unwrap();
    let vhd = dir.join(name);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic",
        raw_path.to_str().unwrap(),
        vhd.to_str().unwrap(),
    ]);
    let bytes = read_all(open(&vhd).as_ref());
    (vhd, bytes)
}

/// Pseudo-random sectors to write into a child.
fn sectors(n: usize, seed: u8) -> Vec<u8> {
    (0..n * 512)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Overlays that leave partial bitmaps: single sectors, runs across a block edge, a
/// sector in an otherwise unallocated region of the parent.
fn overlays(seed: u8) -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, sectors(1, seed)),
        (512 * 9, sectors(3, seed + 1)),
        (2 * MIB - 1024, sectors(4, seed + 2)),
        (2 * MIB + 77 * 512, sectors(1, seed + 3)),
        (5 * MIB, sectors(20, seed + 4)),
    ]
}

fn apply(base: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (off, data) in writes {
        base[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
}

fn child_over(
    parent: &Path,
    locators: Vec<vhdwriter::Locator>,
    writes: &[(u64, Vec<u8>)],
) -> VhdImage {
    let info = vhdwriter::parent_info(parent).unwrap();
    let mut img = VhdImage::differencing(info, 2 << 20);
    img.locators = locators;
    for (off, data) in writes {
        img.write_sectors(*off, data);
    }
    img
}

#[test]
fn differencing_via_relative_w2ru_reads_child_then_parent() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("base")).unwrap();
    let (base, mut expect) = qemu_base(&dir.path().join("base"), "base.vhd", 7 * MIB as usize);
    let child = dir.path().join("child.vhd");
    let writes = overlays(10);
    child_over(&base, vec![w2ru(".\\base\\base.vhd")], &writes)
        .write(&child)
        .unwrap();
    apply(&mut expect, &writes);
    let (b0, c0) = (sha(&base), sha(&child));

    let src = open(&child);
    let got = read_all(src.as_ref());
    let layers = src.layers();
    let ext = src.extents(0, src.size()).unwrap();

    assert!(
        got == expect,
        "differencing read differs from parent + overlays"
    );
    assert_eq!(
        layers.iter().map(|l| l.role.as_str()).collect::<Vec<_>>(),
        ["top", "parent"]
    );
    assert_eq!(layers[0].version.as_deref(), Some("differencing"));
    assert_eq!(layers[0].allocated_bytes, Some(3 * 2 * MIB));
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), src.size());
    assert!(
        ext.iter().any(|e| !e.allocated),
        "the parent's hole should show through"
    );
    assert_eq!((sha(&base), sha(&child)), (b0, c0), "image files changed");
}

#[test]
fn differencing_via_absolute_w2ku() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (base, mut expect) = qemu_base(other.path(), "b.vhd", 3 * MIB as usize);
    let child = dir.path().join("c.vhd");
    let writes = overlays(20);
    let writes: Vec<_> = writes.into_iter().filter(|(o, _)| *o < 3 * MIB).collect();
    child_over(
        &base,
        vec![w2ru(".\\nowhere.vhd"), w2ku(base.to_str().unwrap())],
        &writes,
    )
    .write(&child)
    .unwrap();
    apply(&mut expect, &writes);

    let got = read_all(open(&child).as_ref());

    assert!(got == expect);
}

#[test]
fn differencing_via_macx_url() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("a dir");
    std::fs::create_dir(&sub).unwrap();
    let (base, mut expect) = qemu_base(&sub, "b.vhd", 3 * MIB as usize);
    let child = dir.path().join("c.vhd");
    let url = format!("file://{}", base.to_str().unwrap().replace(' ', "%20"));
    let writes = vec![(4096, sectors(2, 5))];
    child_over(&base, vec![macx(&url)], &writes)
        .write(&child)
        .unwrap();
    apply(&mut expect, &writes);

    let got = read_all(open(&child).as_ref());

    assert!(got == expect);
}

#[test]
fn differencing_via_parent_name_next_to_child() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mut expect) = qemu_base(dir.path(), "named.vhd", 3 * MIB as usize);
    let child = dir.path().join("c.vhd");
    let writes = vec![(512, sectors(1, 9))];
    let mut img = child_over(&base, vec![], &writes);
    img.parent_name = "C:\\old\\place\\named.vhd".into();
    img.write(&child).unwrap();
    apply(&mut expect, &writes);

    let got = read_all(open(&child).as_ref());

    assert!(got == expect);
}

#[test]
fn chain_of_three_stacks_overlays_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mut expect) = qemu_base(dir.path(), "base.vhd", 7 * MIB as usize);
    let mid = dir.path().join("mid.vhd");
    let top = dir.path().join("top.vhd");
    let w1 = overlays(40);
    let w2 = overlays(80);
    vhdwriter::write_differencing(&mid, &base, &w1).unwrap();
    let mut w2 = w2;
    w2.remove(0); // sector 0 stays from mid
    vhdwriter::write_differencing(&top, &mid, &w2).unwrap();
    apply(&mut expect, &w1);
    apply(&mut expect, &w2);

    let src = open(&top);
    let got = read_all(src.as_ref());

    assert!(got == expect);
    assert_eq!(
        src.layers()
            .iter()
            .map(|l| l.role.as_str())
            .collect::<Vec<_>>(),
        ["top", "parent", "parent"]
    );
}

#[test]
fn parent_id_mismatch_is_an_error_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (base, expect) = qemu_base(dir.path(), "base.vhd", 3 * MIB as usize);
    let child = dir.path().join("child.vhd");
    let mut img = child_over(&base, vec![w2ru("base.vhd")], &[]);
    img.parent.as_mut().unwrap().unique_id = [0xEE; 16];
    img.write(&child).unwrap();

    let err = open_err(&child, &OpenOptions::default());
    let ok = format::open(
        &child,
        &OpenOptions {
            ignore_parent_id: true,
            ..Default::default()
        },
    )
    .unwrap();

    assert!(
        err.contains("child.vhd") && err.contains("unique id") && err.contains("eeeeeeee"),
        "{err}"
    );
    assert!(read_all(ok.as_ref()) == expect);
}

#[test]
fn missing_parent_names_the_file_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = qemu_base(dir.path(), "gone.vhd", MIB as usize);
    let child = dir.path().join("child.vhd");
    child_over(&base, vec![w2ru(".\\gone.vhd")], &[])
        .write(&child)
        .unwrap();
    std::fs::remove_file(&base).unwrap();

    let err = open_err(&child, &OpenOptions::default());

    assert!(
        err.contains("parent image not found") && err.contains("gone.vhd"),
        "{err}"
    );
}

#[test]
fn parent_loop_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let child = dir.path().join("self.vhd");
    let fake_parent = vhdwriter::ParentInfo {
        unique_id: [1; 16],
        timestamp: 0,
        current_size: 4 * MIB,
    };
    let mut img = VhdImage::differencing(fake_parent, 2 << 20);
    img.locators = vec![w2ru(".\\self.vhd")];
    img.write(&child).unwrap();

    let err = open_err(
        &child,
        &OpenOptions {
            ignore_parent_id: true,
            ..Default::default()
        },
    );

    assert!(
        err.contains("parent loop") && err.contains("self.vhd"),
        "{err}"
    );
}

#[test]
fn parent_that_is_not_a_vhd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.raw"), vec![0u8; MIB as usize]).unwrap();
    let child = dir.path().join("c.vhd");
    let p = vhdwriter::ParentInfo {
        unique_id: [1; 16],
        timestamp: 0,
        current_size: MIB,
    };
    let mut img = VhdImage::differencing(p, 2 << 20);
    img.locators = vec![w2ru("p.raw")];
    img.write(&child).unwrap();

    let err = open_err(&child, &OpenOptions::default());

    assert!(
        err.contains("p.raw") && err.contains("must be a VHD"),
        "{err}"
    );
}

/// A small dynamic image from the writer, with two allocated blocks.
fn small_dynamic() -> (VhdImage, Vec<u8>) {
    let mut img = VhdImage::dynamic(4 * MIB, 1 << 20);
    img.write_sectors(0, &vec![0xFF; 1 << 20]);
    img.write_sectors(2 * MIB, &vec![0x11; 1 << 20]);
    let bytes = img.to_bytes();
    (img, bytes)
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn writer_dynamic_reads_zero_in_unallocated_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = small_dynamic();
    let p = write_tmp(dir.path(), "d.vhd", &bytes);

    let got = read_all(open(&p).as_ref());

    assert!(got[..MIB as usize].iter().all(|&b| b == 0xFF));
    assert!(got[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(got[2 * MIB as usize..3 * MIB as usize]
        .iter()
        .all(|&b| b == 0x11));
}

#[test]
fn bad_footer_checksum_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = vec![0u8; MIB as usize];
    raw[5] = 1;
    let p = dir.path().join("f.vhd");
    vhdwriter::write_fixed(&p, &raw).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 48] ^= 0x01; // current_size
    std::fs::write(&p, &bytes).unwrap();

    let err = open_err(&p, &OpenOptions::default());

    assert!(
        err.contains("f.vhd") && err.contains("footer") && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn bad_header_checksum_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut bytes) = small_dynamic();
    bytes[HEADER_OFFSET + 33] ^= 0x40;
    let p = write_tmp(dir.path(), "h.vhd", &bytes);

    let err = open_err(&p, &OpenOptions::default());

    assert!(
        err.contains("h.vhd: dynamic header") && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn bat_entry_past_eof_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut bytes) = small_dynamic();
    bytes[BAT_OFFSET + 4..BAT_OFFSET + 8].copy_from_slice(&0x00FF_0000u32.to_be_bytes());
    let p = write_tmp(dir.path(), "b.vhd", &bytes);

    let err = open_err(&p, &OpenOptions::default());

    assert_eq!(
        err,
        format!(
            "{}: BAT entry 1 points past the end of the file",
            p.display()
        )
    );
}

#[test]
fn bat_entry_over_the_header_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut bytes) = small_dynamic();
    bytes[BAT_OFFSET..BAT_OFFSET + 4].copy_from_slice(&2u32.to_be_bytes());
    let p = write_tmp(dir.path(), "o.vhd", &bytes);

    let err = open_err(&p, &OpenOptions::default());

    assert!(
        err.ends_with("BAT entry 0 overlaps the dynamic header"),
        "{err}"
    );
}

#[test]
fn block_size_not_power_of_two_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = VhdImage::dynamic(4 * MIB, 3 << 19);
    img.max_table_entries = Some(3);
    let p = write_tmp(dir.path(), "bs.vhd", &img.to_bytes());

    let err = open_err(&p, &OpenOptions::default());

    assert!(
        err.contains("block size 1572864 is not a power of two"),
        "{err}"
    );
}

#[test]
fn huge_max_table_entries_is_reported_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = VhdImage::dynamic(4 * MIB, 2 << 20);
    img.max_table_entries = Some(0xFFFF_FFF0);
    let p = write_tmp(dir.path(), "m.vhd", &img.to_bytes());

    let err = open_err(&p, &OpenOptions::default());

    assert!(
        err.contains("max_table_entries 4294967280) extends past the end of the file"),
        "{err}"
    );
}

#[test]
fn too_small_max_table_entries_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = VhdImage::dynamic(4 * MIB, 2 << 20);
    img.max_table_entries = Some(1);
    let p = write_tmp(dir.path(), "s.vhd", &img.to_bytes());

    let err = open_err(&p, &OpenOptions::default());

    assert!(err.contains("max_table_entries 1 is too small"), "{err}");
}

#[test]
fn damaged_end_footer_falls_back_to_copy_at_offset_0() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut bytes) = small_dynamic();
    let p0 = write_tmp(dir.path(), "good.vhd", &bytes);
    let expect = read_all(open(&p0).as_ref());
    let n = bytes.len();
    bytes[n - 500] ^= 0xFF;
    let p = write_tmp(dir.path(), "damaged.vhd", &bytes);

    let got = read_all(open(&p).as_ref());

    assert!(got == expect);
}

#[test]
fn truncated_dynamic_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = small_dynamic();
    let p = write_tmp(dir.path(), "t.vhd", &bytes[..bytes.len() - 4096]);

    let err = open_err(&p, &OpenOptions::default());

    assert!(
        err.contains("t.vhd") && err.contains("points past the end of the file"),
        "{err}"
    );
}
