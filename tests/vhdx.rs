//! Microsoft VHDX through `imgsafe serve` and `imgsafe info`: fixed and dynamic files made
//! by qemu-img with several block sizes, read back over NBD and compared byte for byte
//! with the raw source and with what qemu-img reads from the file; differencing chains
//! (which qemu-img cannot write) made from qemu-written dynamic files
//! (tests/common/vhdxdiff.rs), with partially present blocks, compared with the layers
//! they were made from and with libvhdi's reading; dirty logs and broken structures
//! refused at the command line naming the file and the field.

mod support;

use imgsafe::format::vhdx::crc32c::crc32c_with_hole;
use std::fs;
use std::path::{Path, PathBuf};
use support::serve::*;
use support::*;
use vhdxdiff::{make_differencing, Diff};

const MIB: usize = 1 << 20;

/// A raw disk of `len` bytes: pseudo-random data with every 1 MiB block whose index is
/// 1 mod 3 zero, and short stored zero runs in the data.
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

fn to_vhdx(raw: &Path, vhdx: &Path, opts: &str) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        opts,
        s(raw),
        s(vhdx),
    ]);
}

fn info_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["info", "--json"];
    a.extend(args);
    serde_json::from_str(&ok_stdout(&run(&a))).unwrap()
}

/// Convert a sparse raw disk with `opts`; check the served disk is the raw disk and what
/// qemu-img reads from the file, and that the file is unchanged.
fn qemu_made(opts: &str, len: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("src.raw"), &sparse_disk(len, 5));
    let vhdx = dir.path().join("disk.vhdx");
    to_vhdx(&raw, &vhdx, opts);
    let before = sha256(&vhdx);

    assert_served_equals(s(&vhdx), &raw);
    let qemu = qemu_reads(&vhdx, "vhdx");

    assert!(
        qemu == fs::read(&raw).unwrap(),
        "qemu-img reads {opts} differently"
    );
    assert_eq!(sha256(&vhdx), before, "image file changed");
    (dir, vhdx, raw)
}

#[test]
fn qemu_dynamic_1m_blocks_served_equals_source_and_qemu_with_holes() {
    let (_dir, vhdx, raw) = qemu_made("subformat=dynamic,block_size=1M", 9 * MIB + 4096);

    let holes = served_holes(s(&vhdx), &raw);
    let doc = info_json(&[s(&vhdx)]);

    let hole_bytes: usize = holes.iter().map(|(a, b)| b - a).sum();
    assert_eq!(
        hole_bytes,
        3 * MIB,
        "blocks 1, 4 and 7 are holes: {holes:?}"
    );
    assert_eq!(doc["format"], "vhdx", "{doc}");
    assert_eq!(doc["version"], "dynamic");
    assert_eq!(doc["cluster_size"], MIB as u64);
    // The file stores 7 of its 10 blocks (the last one partly used); 6 MiB + 4 KiB of
    // the disk is in them.
    assert_eq!(doc["chain"][0]["allocated_bytes"], (7 * MIB) as u64);
    assert_eq!(doc["allocated_bytes"], (6 * MIB + 4096) as u64);
}

#[test]
fn qemu_dynamic_default_and_32m_blocks_served_equal_source_and_qemu() {
    let (_d1, v1, _) = qemu_made("subformat=dynamic", 5 * MIB + 512);
    let (_d2, v2, _) = qemu_made("subformat=dynamic,block_size=32M", 40 * MIB);

    assert_eq!(info_json(&[s(&v2)])["cluster_size"], (32 * MIB) as u64);
    assert_eq!(info_json(&[s(&v1)])["version"], "dynamic");
}

#[test]
fn qemu_fixed_served_equals_source_and_qemu() {
    let (_dir, vhdx, _) = qemu_made("subformat=fixed,block_size=2M", 7 * MIB);

    let doc = info_json(&[s(&vhdx)]);

    assert_eq!(doc["version"], "fixed", "{doc}");
}

/// The whole virtual disk of a VHDX chain (`chain[0]` the top) as libvhdi reads it.
fn libvhdi_read(chain: &[&Path]) -> Vec<u8> {
    const SCRIPT: &str = r#"
import sys, pyvhdi
files = []
for p in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(p)
    files.append(f)
for child, parent in reversed(list(zip(files, files[1:]))):
    child.set_parent(parent)
top, out, off = files[0], sys.stdout.buffer, 0
size = top.get_media_size()
while off < size:
    n = min(1 << 20, size - off)
    out.write(top.read_buffer_at_offset(n, off))
    off += n
"#;
    let out = tool("python3", "python3-libvhdi")
        .arg("-c")
        .arg(SCRIPT)
        .args(chain)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "libvhdi (Debian package python3-libvhdi) could not read {chain:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `a` with every 1 MiB block listed in `blocks` replaced by fresh data.
fn changed(a: &[u8], blocks: &[usize], seed: u64) -> Vec<u8> {
    let mut b = a.to_vec();
    for &i in blocks {
        b[i * MIB..(i + 1) * MIB].copy_from_slice(&pseudo_random(MIB, seed + i as u64));
    }
    b
}

/// A differencing child `name` in `dir` of `parent`: qemu-img writes the blocks of
/// `blocks` from `new` as a dynamic file with 1 MiB blocks, then it is linked to the
/// parent with `partial` blocks partially present. Returns the file and the disk the
/// child must read as over `old` (the parent's disk).
fn child(
    dir: &Path,
    name: &str,
    parent: &Path,
    (old, new): (&[u8], &[u8]),
    blocks: &[usize],
    partial: Vec<(usize, Vec<(usize, usize)>)>,
) -> (PathBuf, Vec<u8>) {
    let mut overlay = vec![0u8; new.len()];
    let mut expect = old.to_vec();
    for &i in blocks {
        let r = i * MIB..(i + 1) * MIB;
        overlay[r.clone()].copy_from_slice(&new[r.clone()]);
        match partial.iter().find(|(b, _)| *b == i) {
            None => expect[r.clone()].copy_from_slice(&new[r]),
            Some((_, ranges)) => {
                for &(a, b) in ranges {
                    let (x, y) = (i * MIB + a * 512, i * MIB + b * 512);
                    expect[x..y].copy_from_slice(&new[x..y]);
                }
            }
        }
    }
    let raw = write(dir.join(format!("{name}.raw")), &overlay);
    let vhdx = dir.join(name);
    // block_state_zero=off: the zero blocks of the overlay stay not present (read from
    // the parent) instead of becoming zero blocks (which hide it).
    to_vhdx(
        &raw,
        &vhdx,
        "subformat=dynamic,block_size=1M,block_state_zero=off",
    );
    let linkage = vhdxdiff::data_write_guid(parent);
    let rel = parent.file_name().unwrap().to_str().unwrap().to_string();
    make_differencing(
        &vhdx,
        &Diff {
            locator: vec![
                ("parent_linkage", linkage),
                ("relative_path", format!(".\\{rel}")),
                ("absolute_win32_path", format!("\\\\?\\C:\\vms\\{rel}")),
            ],
            partial,
        },
    );
    (vhdx, expect)
}

/// base (qemu, 10 MiB) ← mid (blocks 0, 1, 5; block 5 partial) ← top (blocks 0, 2, 9;
/// block 0 partial over mid's, block 9 partial over the base).
fn chain_of_3(dir: &Path) -> ([PathBuf; 3], Vec<u8>) {
    let a = sparse_disk(10 * MIB, 21);
    let base_raw = write(dir.join("base.raw"), &a);
    let base = dir.join("base.vhdx");
    to_vhdx(&base_raw, &base, "subformat=dynamic,block_size=1M");
    let b = changed(&a, &[0, 1, 5], 100);
    let (mid, mid_disk) = child(
        dir,
        "mid.vhdx",
        &base,
        (&a, &b),
        &[0, 1, 5],
        vec![(5, vec![(0, 8), (100, 101), (2040, 2048)])],
    );
    let c = changed(&mid_disk, &[0, 2, 9], 200);
    let (top, expect) = child(
        dir,
        "top.vhdx",
        &mid,
        (&mid_disk, &c),
        &[0, 2, 9],
        vec![(0, vec![(8, 16), (1000, 1500)]), (9, vec![(1, 2047)])],
    );
    ([top, mid, base], expect)
}

#[test]
fn differencing_chain_of_depth_3_served_equals_layers_and_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let ([top, mid, base], expect) = chain_of_3(dir.path());
    let raw = write(dir.path().join("expect.raw"), &expect);
    let before = [sha256(&top), sha256(&mid), sha256(&base)];

    let libvhdi = libvhdi_read(&[&top, &mid, &base]);
    assert_served_equals(s(&top), &raw);
    let holes = served_holes(s(&top), &raw);
    let doc = info_json(&[s(&top)]);

    assert!(
        libvhdi == expect,
        "libvhdi reads the chain differently from its layers (first at {:?})",
        first_difference(&libvhdi, &expect)
    );
    assert!(!holes.is_empty(), "the base's holes should show through");
    let roles: Vec<&str> = doc["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["top", "parent", "parent"]);
    assert_eq!(doc["version"], "differencing");
    assert_eq!([sha256(&top), sha256(&mid), sha256(&base)], before);
}

#[test]
fn parent_with_another_data_write_guid_is_refused_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ([top, mid, _], expect) = chain_of_3(dir.path());
    // Make a copy of the chain whose top links to a GUID mid does not have.
    let bytes = fs::read(&top).unwrap();
    let want = vhdxdiff::data_write_guid(&mid);
    let needle: Vec<u8> = want.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let mut other = bytes.clone();
    other[at + 2..at + 4].copy_from_slice(&utf16_unit(if want.as_bytes()[1] == b'0' {
        '1'
    } else {
        '0'
    }));
    let top2 = write(dir.path().join("top2.vhdx"), &other);

    let out = run(["info", s(&top2)]);
    let raw = write(dir.path().join("expect.raw"), &expect);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("DataWriteGuid") && stderr(&out).contains("--ignore-parent-id"),
        "{}",
        stderr(&out)
    );
    let served = Served::start_with(&["--ignore-parent-id", s(&top2)]);
    let copy = dir.path().join("copy.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &served.uri(), s(&copy)]);
    assert!(fs::read(copy).unwrap() == fs::read(raw).unwrap());
}

fn utf16_unit(c: char) -> [u8; 2] {
    (c as u16).to_le_bytes()
}

/// Set the current header's field at `at` to `v` and fix its CRC-32C (both headers).
fn patch_headers(bytes: &mut [u8], at: usize, v: &[u8]) {
    for h in [64 << 10, 128 << 10] {
        bytes[h + at..h + at + v.len()].copy_from_slice(v);
        let c = crc32c_with_hole(&bytes[h..h + 4096], 4);
        bytes[h + 4..h + 8].copy_from_slice(&c.to_le_bytes());
    }
}

#[test]
fn corrupt_files_exit_3_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("src.raw"), &sparse_disk(4 * MIB, 2));
    let vhdx = dir.path().join("good.vhdx");
    to_vhdx(&raw, &vhdx, "subformat=dynamic,block_size=1M");
    let good = fs::read(&vhdx).unwrap();
    let bat =
        u64::from_le_bytes(good[(192 << 10) + 32..(192 << 10) + 40].try_into().unwrap()) as usize;
    let meta =
        u64::from_le_bytes(good[(192 << 10) + 64..(192 << 10) + 72].try_into().unwrap()) as usize;
    let patched = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        write(dir.path().join(name), &b)
    };
    // The virtual disk size item: the first item qemu writes after the file parameters.
    let size_item = {
        let t = &good[meta..];
        let e = (0..6)
            .map(|i| 32 + i * 32)
            .find(|&e| t[e..e + 4] == [0x24, 0x42, 0xa5, 0x2f])
            .unwrap();
        meta + u32::from_le_bytes(t[e + 16..e + 20].try_into().unwrap()) as usize
    };
    let cases = [
        (
            patched("log.vhdx", &|b| patch_headers(b, 48, &[0x5a; 16])),
            "VHDX log 5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a (at offset",
        ),
        (
            patched("sums.vhdx", &|b| {
                b[(64 << 10) + 100] ^= 1;
                b[(128 << 10) + 100] ^= 1;
            }),
            "neither VHDX header is valid (header 1: checksum mismatch",
        ),
        (
            patched("eof.vhdx", &|b| {
                b[bat..bat + 8].copy_from_slice(&((0xFFFFu64 << 20) | 6).to_le_bytes())
            }),
            "BAT payload entry 0 points past the end of the file",
        ),
        (
            patched("intohdr.vhdx", &|b| {
                b[bat..bat + 8].copy_from_slice(&6u64.to_le_bytes())
            }),
            "BAT payload entry 0 points into the header section",
        ),
        (
            patched("count.vhdx", &|b| {
                b[size_item..size_item + 8].copy_from_slice(&(1u64 << 45).to_le_bytes())
            }),
            "BAT region of 1048576 bytes holds fewer than the",
        ),
        (
            patched("state.vhdx", &|b| b[bat] = (b[bat] & !7) | 4),
            "BAT payload entry 0 has reserved state 4",
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
fn parent_cycle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("r.raw"), &sparse_disk(2 * MIB, 4));
    let (a, b) = (dir.path().join("a.vhdx"), dir.path().join("b.vhdx"));
    to_vhdx(&raw, &a, "subformat=dynamic,block_size=1M");
    to_vhdx(&raw, &b, "subformat=dynamic,block_size=1M");
    let (ga, gb) = (vhdxdiff::data_write_guid(&a), vhdxdiff::data_write_guid(&b));
    let link = |to: &str, guid: String| Diff {
        locator: vec![("parent_linkage", guid), ("relative_path", to.to_string())],
        partial: vec![],
    };
    make_differencing(&a, &link("b.vhdx", gb));
    make_differencing(&b, &link("a.vhdx", ga));

    let out = run(["info", s(&a)]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("parent loop"), "{}", stderr(&out));
}

#[test]
fn chains_deeper_than_64_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("r.raw"), &vec![0u8; MIB]);
    // f00 ← f01 ← ... ← f64: 65 files, each differencing over the next but the last.
    let files: Vec<PathBuf> = (0..65)
        .map(|i| dir.path().join(format!("f{i:02}.vhdx")))
        .collect();
    for f in &files {
        to_vhdx(
            &raw,
            f,
            "subformat=dynamic,block_size=1M,block_state_zero=off",
        );
    }
    for i in 0..64 {
        let guid = vhdxdiff::data_write_guid(&files[i + 1]);
        let name = format!("f{:02}.vhdx", i + 1);
        make_differencing(
            &files[i],
            &Diff {
                locator: vec![("parent_linkage", guid), ("relative_path", name)],
                partial: vec![],
            },
        );
    }

    let ok = run(["info", s(&files[1])]);
    let deep = run(["info", s(&files[0])]);

    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(code(&deep), 3, "{}", stderr(&deep));
    assert!(
        stderr(&deep).contains("chain deeper than 64 files"),
        "{}",
        stderr(&deep)
    );
}
