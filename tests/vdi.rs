//! VirtualBox VDI through `imgsafe serve` and `imgsafe info`: static and dynamic images
//! made by qemu-img, read back over NBD with qemu-img and compared byte for byte with the
//! raw source and with what qemu-img reads from the file itself; differencing chains
//! (which qemu-img cannot write or read) made from qemu-written dynamic images linked to
//! their parent (tests/common/vdidiff.rs) and compared with the layers they were made
//! from; broken headers refused at the command line naming the file and the field.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use support::serve::*;
use support::*;

const MIB: usize = 1 << 20;

/// A raw disk of `len` bytes: pseudo-random data with every 1 MiB block whose index is
/// 1 mod 3 zero (left unallocated by qemu-img) and short stored zero runs in the data.
fn sparse_disk(len: usize, seed: u64) -> Vec<u8> {
    let mut v = pseudo_random(len, seed);
    for (i, block) in v.chunks_mut(MIB).enumerate() {
        if i % 3 == 1 {
            block.fill(0);
        }
    }
    for start in (4096..len).step_by(700_000) {
        v[start..(start + 5000).min(len)].fill(0);
    }
    v
}

fn write(path: PathBuf, bytes: &[u8]) -> PathBuf {
    fs::write(&path, bytes).unwrap();
    path
}

/// qemu-img convert the raw disk at `raw` to a VDI at `vdi` with `-o opts` (if any).
fn to_vdi(raw: &Path, vdi: &Path, opts: &str) {
    let mut args = vec!["convert", "-f", "raw", "-O", "vdi"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(raw), s(vdi)]);
    qemu_img(&args);
}

fn info_json(image: &Path) -> serde_json::Value {
    let out = run(["info", "--json", s(image)]);
    serde_json::from_str(&ok_stdout(&out)).unwrap()
}

/// Convert a sparse raw disk of `len` bytes with `opts`, and check the served disk is the
/// raw disk and what qemu-img reads from the VDI. Returns the dir, the VDI and the raw.
fn qemu_made(opts: &str, len: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("src.raw"), &sparse_disk(len, 5));
    let vdi = dir.path().join("disk.vdi");
    to_vdi(&raw, &vdi, opts);
    let before = sha256(&vdi);

    assert_served_equals(s(&vdi), &raw);
    let qemu = qemu_reads(&vdi, "vdi");

    assert!(
        qemu == fs::read(&raw).unwrap(),
        "qemu-img reads the VDI differently"
    );
    assert_eq!(sha256(&vdi), before, "image file changed");
    (dir, vdi, raw)
}

#[test]
fn qemu_dynamic_served_equals_source_and_qemu_with_holes() {
    let (_dir, vdi, raw) = qemu_made("", 9 * MIB + 4096 + 512);

    let holes = served_holes(s(&vdi), &raw);
    let doc = info_json(&vdi);

    let hole_bytes: usize = holes.iter().map(|(a, b)| b - a).sum();
    assert_eq!(
        hole_bytes,
        3 * MIB,
        "blocks 1, 4 and 7 are holes: {holes:?}"
    );
    assert_eq!(doc["format"], "vdi", "{doc}");
    assert_eq!(doc["version"], "1.1 dynamic");
    assert_eq!(doc["cluster_size"], MIB as u64);
    assert_eq!(doc["virtual_size"], (9 * MIB + 4096 + 512) as u64);
    // Blocks 0, 2, 3, 5, 6, 8 and the partial 9th are stored.
    assert_eq!(doc["allocated_bytes"], (6 * MIB + 4096 + 512) as u64);
}

#[test]
fn qemu_static_served_equals_source_and_qemu() {
    let (_dir, vdi, _) = qemu_made("static=on", 5 * MIB);

    let doc = info_json(&vdi);

    assert_eq!(doc["version"], "1.1 static", "{doc}");
    assert_eq!(doc["chain"][0]["allocated_bytes"], (5 * MIB) as u64);
}

#[test]
fn odd_disk_size_is_rounded_up_to_a_sector_like_qemu() {
    let (dir, vdi, raw) = qemu_made("", 3 * MIB);
    let mut bytes = fs::read(&vdi).unwrap();
    // cbDisk, as VBoxManage convertfromraw writes for a raw file of odd length.
    bytes[0x170..0x178].copy_from_slice(&(3 * MIB as u64 - 100).to_le_bytes());
    let odd = write(dir.path().join("odd.vdi"), &bytes);

    assert_served_equals(s(&odd), &raw);
    assert!(qemu_reads(&odd, "vdi") == fs::read(&raw).unwrap());
}

/// A qemu-made base in `dir` and its raw disk.
fn base(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let a = sparse_disk(len, 11);
    let raw = write(dir.join("base.raw"), &a);
    let vdi = dir.join("base.vdi");
    to_vdi(&raw, &vdi, "");
    (vdi, a)
}

/// `a` with `writes` applied.
fn changed(a: &[u8], writes: &[(usize, usize, u64)]) -> Vec<u8> {
    let mut b = a.to_vec();
    for &(off, len, seed) in writes {
        b[off..off + len].copy_from_slice(&pseudo_random(len, seed));
    }
    b
}

/// A differencing VDI `name` in `dir` over `parent` (whose disk is `a`) holding the
/// blocks where `b` differs; written by qemu-img as a dynamic image, then linked.
fn child(dir: &Path, name: &str, parent: &Path, a: &[u8], b: &[u8]) -> PathBuf {
    let raw = write(dir.join(format!("{name}.raw")), &vdidiff::overlay(a, b));
    let vdi = dir.join(name);
    to_vdi(&raw, &vdi, "");
    vdidiff::link_to_parent(&vdi, parent);
    vdi
}

#[test]
fn differencing_chain_of_depth_3_found_beside_the_child_served_equals_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a) = base(dir.path(), 10 * MIB);
    // Mid changes block 0, block 1 (a hole of the base) and the tail; top changes block 0
    // again and block 5.
    let b = changed(
        &a,
        &[(100, 5000, 1), (MIB + 7, 600, 2), (10 * MIB - 512, 512, 3)],
    );
    let mid = child(dir.path(), "mid.vdi", &base, &a, &b);
    let c = changed(&b, &[(4096, 4096, 4), (5 * MIB, 3 * 512, 5)]);
    let top = child(dir.path(), "top.vdi", &mid, &b, &c);
    let expect = write(dir.path().join("expect.raw"), &c);
    let before = [sha256(&top), sha256(&mid), sha256(&base)];

    assert_served_equals(s(&top), &expect);
    let holes = served_holes(s(&top), &expect);
    let doc = info_json(&top);

    // Block 1 is stored by mid now; blocks 4 and 7 remain holes of every layer.
    let hole_bytes: usize = holes.iter().map(|(a, b)| b - a).sum();
    assert_eq!(hole_bytes, 2 * MIB, "{holes:?}");
    let chain: Vec<(String, String)> = doc["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["role"].to_string(),
                l["path"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        chain,
        [
            ("\"top\"".to_string(), "top.vdi".to_string()),
            ("\"parent\"".to_string(), "mid.vdi".to_string()),
            ("\"parent\"".to_string(), "base.vdi".to_string())
        ]
    );
    assert_eq!(doc["version"], "1.1 differencing");
    assert_eq!([sha256(&top), sha256(&mid), sha256(&base)], before);
}

#[test]
fn differencing_without_its_parent_exits_3_naming_the_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (base, a) = base(other.path(), 2 * MIB);
    let b = changed(&a, &[(0, 512, 9)]);
    let top = child(dir.path(), "top.vdi", &base, &a, &b);

    let out = run(["info", s(&top)]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("top.vdi")
            && err.contains("parent image with UUID")
            && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn corrupt_headers_exit_3_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("src.raw"), &sparse_disk(4 * MIB, 2));
    let vdi = dir.path().join("good.vdi");
    to_vdi(&raw, &vdi, "");
    let good = fs::read(&vdi).unwrap();
    let patched = |name: &str, at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        write(dir.path().join(name), &b)
    };
    let cases = [
        // Block map entry 0 far past the end of the file.
        (
            patched("entry.vdi", 0x200, &0x0000_fff0u32.to_le_bytes()),
            "block map entry 0 (65520) is not below",
        ),
        // cBlocks not matching cbDisk.
        (
            patched("count.vdi", 0x180, &2u32.to_le_bytes()),
            "disk size 4194304 is larger than its 2 blocks",
        ),
        // cBlocks huge: its block map would extend far past the file.
        (
            patched("huge.vdi", 0x180, &u32::MAX.to_le_bytes()),
            "extends past the end of the file",
        ),
        // The block map pointing into the header.
        (
            patched("overlap.vdi", 0x154, &0x100u32.to_le_bytes()),
            "overlaps the header",
        ),
    ];

    for (img, words) in &cases {
        let before = sha256(img);
        for cmd in [vec!["info"], vec!["ls"], vec!["cat", "/etc/hostname"]] {
            let mut args = vec![cmd[0], s(img)];
            args.extend(&cmd[1..]);
            let out = run(&args);

            assert_eq!(code(&out), 3, "{cmd:?} {}: {}", img.display(), stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains(s(img)) && err.contains(words),
                "{err} lacks {words:?}"
            );
        }
        assert_eq!(sha256(img), before);
    }
}

#[test]
fn format_vdi_on_a_raw_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("disk.raw"), &vec![0u8; MIB]);

    let out = run(["info", "--format", "vdi", s(&raw)]);

    assert_eq!(code(&out), 3);
    assert!(
        stderr(&out).contains("no VDI signature"),
        "{}",
        stderr(&out)
    );
}
