//! VMware VMDK through `imgsafe serve` and `imgsafe info`: every subformat qemu-img
//! writes (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat,
//! streamOptimized), read back over NBD and compared byte for byte with the raw source
//! and with qemu-img's own reading; delta chains made by qemu-img and qemu-io, compared
//! with the writes made and with libvmdk's reading; broken files refused at the command
//! line naming the file and the field.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use support::serve::*;
use support::*;

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

fn to_vmdk(raw: &Path, vmdk: &Path, subformat: &str) {
    let o = format!("subformat={subformat}");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &o,
        s(raw),
        s(vmdk),
    ]);
}

fn info_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["info", "--json"];
    a.extend(args);
    serde_json::from_str(&ok_stdout(&run(&a))).unwrap()
}

/// sha256 of every file in `dir`, sorted by name.
fn shas(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.display().to_string(), sha256(&p)))
        .collect();
    v.sort();
    v
}

#[test]
fn every_qemu_subformat_served_equals_source_and_qemu() {
    let src = tempfile::tempdir().unwrap();
    let raw = write(src.path().join("src.raw"), &sparse_disk(9 * MIB + 4096, 5));
    for (subformat, sparse) in [
        ("monolithicSparse", true),
        ("monolithicFlat", false),
        ("twoGbMaxExtentSparse", true),
        ("twoGbMaxExtentFlat", false),
        ("streamOptimized", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let vmdk = dir.path().join("disk.vmdk");
        to_vmdk(&raw, &vmdk, subformat);
        let before = shas(dir.path());

        assert_served_equals(s(&vmdk), &raw);
        let qemu = qemu_reads(&vmdk, "vmdk");
        let holes = served_holes(s(&vmdk), &raw);
        let doc = info_json(&[s(&vmdk)]);

        assert!(
            qemu == fs::read(&raw).unwrap(),
            "qemu-img reads {subformat} differently"
        );
        let hole_bytes: usize = holes.iter().map(|(a, b)| b - a).sum();
        if sparse {
            assert_eq!(
                hole_bytes,
                3 * MIB,
                "{subformat}: blocks 1, 4, 7 are holes: {holes:?}"
            );
            assert_eq!(doc["cluster_size"], 65536, "{doc}");
            assert_eq!(doc["allocated_bytes"], (6 * MIB + 4096) as u64, "{doc}");
        }
        assert_eq!(doc["format"], "vmdk");
        assert!(
            doc["version"].as_str().unwrap().starts_with(subformat),
            "{doc}"
        );
        assert_eq!(shas(dir.path()), before, "{subformat}: files changed");
    }
}

/// qemu-io writes of `pattern` bytes at (offset, length) into `img`.
fn qemu_io_writes(img: &Path, writes: &[(usize, usize, u8)]) {
    let mut c = tool("qemu-io", "qemu-utils");
    c.args(["-f", "vmdk"]);
    for (off, len, pat) in writes {
        c.arg("-c").arg(format!("write -P {pat} {off} {len}"));
    }
    c.arg(img);
    must(&mut c);
}

fn apply(disk: &mut [u8], writes: &[(usize, usize, u8)]) {
    for &(off, len, pat) in writes {
        disk[off..off + len].fill(pat);
    }
}

/// The whole disk of a VMDK chain (`chain[0]` the top) as libvmdk reads it.
fn libvmdk_read(chain: &[&Path]) -> Vec<u8> {
    const SCRIPT: &str = r#"
import sys, pyvmdk
handles = []
for p in sys.argv[1:]:
    h = pyvmdk.handle()
    h.open(p)
    h.open_extent_data_files()
    handles.append(h)
for child, parent in reversed(list(zip(handles, handles[1:]))):
    child.set_parent(parent)
top, out, off = handles[0], sys.stdout.buffer, 0
size = top.get_media_size()
while off < size:
    n = min(1 << 20, size - off)
    out.write(top.read_buffer_at_offset(n, off))
    off += n
"#;
    let out = tool("python3", "python3-libvmdk")
        .arg("-c")
        .arg(SCRIPT)
        .args(chain)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "libvmdk (Debian package python3-libvmdk) could not read {chain:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// base (qemu-made monolithicSparse of a sparse disk) ← mid ← top, the deltas made with
/// `qemu-img create -b` and written with qemu-io. Returns the files and the disk.
fn chain_of_3(dir: &Path) -> ([PathBuf; 3], Vec<u8>) {
    let mut disk = sparse_disk(10 * MIB, 9);
    let raw = write(dir.join("base.raw"), &disk);
    let base = dir.join("base.vmdk");
    to_vmdk(&raw, &base, "monolithicSparse");
    let (mid, top) = (dir.join("mid.vmdk"), dir.join("top.vmdk"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&mid),
    ]);
    let w1 = [
        (512, 4096, 0x11),
        (MIB + 100 * 512, 70_000, 0x22),
        (10 * MIB - 512, 512, 0x33),
    ];
    qemu_io_writes(&mid, &w1);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "mid.vmdk",
        "-F",
        "vmdk",
        s(&top),
    ]);
    let w2 = [(0, 1024, 0x44), (5 * MIB, 65536 * 2, 0x55)];
    qemu_io_writes(&top, &w2);
    apply(&mut disk, &w1);
    apply(&mut disk, &w2);
    ([top, mid, base], disk)
}

#[test]
fn delta_chain_of_depth_3_served_equals_writes_qemu_and_libvmdk() {
    let dir = tempfile::tempdir().unwrap();
    let ([top, mid, base], disk) = chain_of_3(dir.path());
    let expect = write(dir.path().join("expect.raw"), &disk);
    let before = [sha256(&top), sha256(&mid), sha256(&base)];

    let libvmdk = libvmdk_read(&[&top, &mid, &base]);
    let qemu = qemu_reads(&top, "vmdk");
    assert_served_equals(s(&top), &expect);
    let holes = served_holes(s(&top), &expect);
    let doc = info_json(&[s(&top)]);

    assert!(
        libvmdk == disk,
        "libvmdk reads the chain differently (first at {:?})",
        first_difference(&libvmdk, &disk)
    );
    assert!(qemu == disk, "qemu-img reads the chain differently");
    assert!(!holes.is_empty(), "the base's holes should show through");
    let roles: Vec<&str> = doc["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["top", "parent", "parent"]);
    assert_eq!([sha256(&top), sha256(&mid), sha256(&base)], before);
}

/// `bytes` with the first occurrence of `from` replaced by `to` (same length).
fn replaced(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not found"));
    let mut b = bytes.to_vec();
    b[at..at + to.len()].copy_from_slice(to.as_bytes());
    b
}

#[test]
fn parent_cid_mismatch_is_refused_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ([top, mid, _], disk) = chain_of_3(dir.path());
    let text = String::from_utf8_lossy(&fs::read(&mid).unwrap()).into_owned();
    // qemu writes parentCID without zero padding ("%x"): take the whole token and
    // flip its lowest bit, keeping its width so the embedded descriptor keeps its size.
    let cid = text.split("parentCID=").nth(1).unwrap();
    let cid = &cid[..cid.find(|c: char| c.is_whitespace()).unwrap()];
    let value = u32::from_str_radix(cid, 16).unwrap() ^ 1;
    let wrong = format!("{value:0width$x}", width = cid.len());
    fs::write(
        &mid,
        replaced(
            &fs::read(&mid).unwrap(),
            &format!("parentCID={cid}"),
            &format!("parentCID={wrong}"),
        ),
    )
    .unwrap();
    let expect = write(dir.path().join("expect.raw"), &disk);

    let out = run(["info", s(&top)]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mid.vmdk") && stderr(&out).contains(&format!("expects {value:08x}")),
        "{}",
        stderr(&out)
    );
    let served = Served::start_with(&["--ignore-parent-id", s(&top)]);
    let copy = dir.path().join("copy.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &served.uri(), s(&copy)]);
    assert!(fs::read(copy).unwrap() == fs::read(expect).unwrap());
}

#[test]
fn parent_cycle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("data.raw"), vec![0u8; 4096]).unwrap();
    let desc = |hint: &str| {
        format!("# Disk DescriptorFile\nversion=1\nCID=0000000a\nparentCID=0000000a\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"{hint}\"\nRW 8 FLAT \"data.raw\" 0\n")
    };
    let a = write(dir.path().join("a.vmdk"), desc("b.vmdk").as_bytes());
    write(dir.path().join("b.vmdk"), desc("a.vmdk").as_bytes());

    let out = run(["info", s(&a)]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("a.vmdk: parent loop"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn corrupt_files_exit_3_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("src.raw"), &sparse_disk(4 * MIB, 2));
    let vmdk = dir.path().join("good.vmdk");
    to_vmdk(&raw, &vmdk, "monolithicSparse");
    let flat = dir.path().join("flat.vmdk");
    to_vmdk(&raw, &flat, "monolithicFlat");
    let good = fs::read(&vmdk).unwrap();
    let le64 = |at: usize| u64::from_le_bytes(good[at..at + 8].try_into().unwrap()) as usize;
    let gd = le64(56) * 512;
    let rgd = le64(48) * 512;
    let gt = u32::from_le_bytes(good[gd..gd + 4].try_into().unwrap()) as usize * 512;
    let patched = |name: &str, at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        write(dir.path().join(name), &b)
    };
    let flat_text = fs::read(&flat).unwrap();
    let both_gds = {
        let mut b = good.clone();
        b[gd..gd + 4].copy_from_slice(&1u32.to_le_bytes());
        b[rgd..rgd + 4].copy_from_slice(&1u32.to_le_bytes());
        write(dir.path().join("gtdesc.vmdk"), &b)
    };
    let cases = [
        (
            both_gds,
            "grain directory entry 0 points a grain table into the embedded descriptor",
        ),
        (
            patched("gte.vmdk", gt, &3u32.to_le_bytes()),
            "grain table entry for grain 0 (3) points into the extent's metadata",
        ),
        (
            patched("gteeof.vmdk", gt, &0x00ff_ffffu32.to_le_bytes()),
            "grain table entry for grain 0 points past the end of the file",
        ),
        (
            {
                // Both grain directories past the end: no fallback left.
                let mut b = good.clone();
                b[48..56].copy_from_slice(&0xffff_fff0u64.to_le_bytes());
                b[56..64].copy_from_slice(&0xffff_ffffu64.to_le_bytes());
                write(dir.path().join("gdeof.vmdk"), &b)
            },
            "grain directory (sector 4294967295",
        ),
        (
            patched("grain.vmdk", 20, &3u64.to_le_bytes()),
            "grain size of 3 sectors is not a power of two",
        ),
        (
            write(
                dir.path().join("escape.vmdk"),
                &replaced(&flat_text, "\"flat-flat.vmdk\"", "\"../a-flat.vmdk\""),
            ),
            "extent \"../a-flat.vmdk\" lies outside the descriptor's folder",
        ),
        (
            write(
                dir.path().join("sum.vmdk"),
                &replaced(&flat_text, "RW 8192 FLAT", "RW 9192 FLAT"),
            ),
            "flat extent of 9192 sectors from sector 0 is longer than the file",
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
            assert!(err.contains(words), "{err} lacks {words:?}");
        }
        assert_eq!(sha256(img), before);
    }
}

#[test]
fn corrupt_compressed_grain_fails_the_read_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("src.raw"), &sparse_disk(2 * MIB, 3));
    let vmdk = dir.path().join("so.vmdk");
    to_vmdk(&raw, &vmdk, "streamOptimized");
    let mut b = fs::read(&vmdk).unwrap();
    // The first grain's marker follows the 128-sector overhead; break its deflate data.
    let at = 128 * 512 + 12;
    for x in &mut b[at + 2..at + 40] {
        *x ^= 0x5a;
    }
    fs::write(&vmdk, &b).unwrap();
    let src = imgsafe::format::open(&vmdk, &Default::default()).unwrap();

    let err = src.read_at(&mut vec![0u8; 4096], 0).unwrap_err();

    assert!(
        err.to_string().contains("so.vmdk") && err.to_string().contains("does not inflate"),
        "{err}"
    );
}

#[test]
fn damaged_grain_directory_falls_back_to_the_redundant_one() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path().join("src.raw"), &sparse_disk(3 * MIB, 8));
    let vmdk = dir.path().join("rgd.vmdk");
    to_vmdk(&raw, &vmdk, "monolithicSparse");
    let mut b = fs::read(&vmdk).unwrap();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    b[gd..gd + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    fs::write(&vmdk, &b).unwrap();

    let out = run(["info", s(&vmdk)]);
    assert_served_equals(s(&vmdk), &raw);

    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("using the redundant grain directory"),
        "{}",
        stderr(&out)
    );
}

/// `tar -cf NAME FILES...` in `dir` (GNU tar's default format, or `--format=FORMAT`).
fn tar(dir: &Path, name: &str, format: &str, files: &[&str]) -> PathBuf {
    let mut c = tool("tar", "tar");
    c.current_dir(dir).arg("-cf").arg(name);
    if !format.is_empty() {
        c.arg(format!("--format={format}"));
    }
    must(c.args(files));
    dir.join(name)
}

#[test]
fn ova_disks_are_read_in_place_and_chosen_with_disk_n() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = write(dir.path().join("one.raw"), &sparse_disk(3 * MIB, 31));
    let r2 = write(dir.path().join("two.raw"), &sparse_disk(2 * MIB + 512, 32));
    to_vmdk(&r1, &dir.path().join("disk1.vmdk"), "streamOptimized");
    to_vmdk(&r2, &dir.path().join("disk2.vmdk"), "streamOptimized");
    fs::write(
        dir.path().join("vm.ovf"),
        "<?xml version=\"1.0\"?>\n<Envelope/>\n",
    )
    .unwrap();
    let one = tar(dir.path(), "one.ova", "", &["vm.ovf", "disk1.vmdk"]);
    let pax = tar(dir.path(), "pax.ova", "pax", &["vm.ovf", "disk2.vmdk"]);
    let two = tar(
        dir.path(),
        "two.ova",
        "ustar",
        &["vm.ovf", "disk1.vmdk", "disk2.vmdk"],
    );
    let before = [sha256(&one), sha256(&pax), sha256(&two)];

    assert_served_equals(s(&one), &r1);
    assert_served_equals(s(&pax), &r2);
    let several = run(["info", s(&two)]);
    let served = Served::start_with(&["--disk", "2", s(&two)]);
    let copy = dir.path().join("copy.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &served.uri(), s(&copy)]);
    let doc = info_json(&[s(&one)]);

    assert_eq!(code(&several), 3, "{}", stderr(&several));
    let err = stderr(&several);
    assert!(
        err.contains("OVA holds 2 disks")
            && err.contains("1 disk1.vmdk")
            && err.contains("2 disk2.vmdk")
            && err.contains("--disk N"),
        "{err}"
    );
    assert!(fs::read(&copy).unwrap() == fs::read(&r2).unwrap());
    assert_eq!(doc["version"], "streamOptimized v3 in OVA", "{doc}");
    assert_eq!([sha256(&one), sha256(&pax), sha256(&two)], before);
}

#[test]
fn tar_without_a_vmdk_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), "hello\n").unwrap();
    let t = tar(dir.path(), "notes.tar", "", &["notes.txt"]);

    let out = run(["info", s(&t)]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no .vmdk disk inside: extract the disk image"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn hand_written_descriptors_with_offsets_and_vmfs_extents_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 * MIB, 41);
    fs::write(dir.path().join("data.raw"), &data).unwrap();
    // An ESXi-style vmfs descriptor, and one of two flat extents: the data file from
    // sector 2048, then its first MiB again.
    let vmfs = write(
        dir.path().join("esxi.vmdk"),
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 6144 VMFS \"data.raw\"\n\nddb.adapterType = \"lsilogic\"\n",
    );
    let pieces = write(
        dir.path().join("pieces.vmdk"),
        b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"data.raw\" 2048\nRW 2048 FLAT \"data.raw\" 0\n",
    );
    let mut expect = data[MIB..2 * MIB].to_vec();
    expect.extend(&data[..MIB]);
    let expect_raw = write(dir.path().join("expect.raw"), &expect);
    let data_raw = dir.path().join("data.raw");
    let before = shas(dir.path());

    assert_served_equals(s(&vmfs), &data_raw);
    assert_served_equals(s(&pieces), &expect_raw);

    assert!(
        qemu_reads(&vmfs, "vmdk") == data,
        "qemu-img reads the vmfs descriptor differently"
    );
    assert!(
        qemu_reads(&pieces, "vmdk") == expect,
        "qemu-img reads the pieces differently"
    );
    assert_eq!(shas(dir.path()), before);
}

/// qemu-img and libvmdk do not read ZERO extents as the VMDK specification writes them
/// (no file name; qemu skips such lines and RDONLY ones, libvmdk refuses the file), so
/// this one is checked against the bytes the extents name.
#[test]
fn zero_extent_and_rdonly_lines_read_as_the_specification_says() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(2 * MIB, 42);
    fs::write(dir.path().join("data.raw"), &data).unwrap();
    let desc = write(
        dir.path().join("zero.vmdk"),
        b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"data.raw\" 2048\nRW 1024 ZERO\nRDONLY 2048 FLAT \"data.raw\" 0\n",
    );
    let mut expect = data[MIB..].to_vec();
    expect.extend(vec![0u8; 512 * 1024]);
    expect.extend(&data[..MIB]);
    let expect_raw = write(dir.path().join("expect.raw"), &expect);

    assert_served_equals(s(&desc), &expect_raw);
    let holes = served_holes(s(&desc), &expect_raw);

    assert_eq!(holes, [(MIB, MIB + 512 * 1024)]);
}

#[test]
fn grain_directory_sharing_one_table_and_device_extents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 40 MiB: more than the 32 MiB one grain table covers, so the GD has two entries.
    let raw = write(dir.path().join("src.raw"), &sparse_disk(40 * MIB, 6));
    let vmdk = dir.path().join("share.vmdk");
    to_vmdk(&raw, &vmdk, "monolithicSparse");
    let mut b = fs::read(&vmdk).unwrap();
    // Both directories: entry 1 names the table of entry 0.
    for at in [48, 56] {
        let gd = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize * 512;
        let first: [u8; 4] = b[gd..gd + 4].try_into().unwrap();
        b[gd + 4..gd + 8].copy_from_slice(&first);
    }
    fs::write(&vmdk, &b).unwrap();
    let dev = write(
        dir.path().join("dev.vmdk"),
        b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/dev/null\" 0\n",
    );

    let shared = run(["info", s(&vmdk)]);
    let device = run(["info", s(&dev)]);

    assert_eq!(code(&shared), 3, "{}", stderr(&shared));
    assert!(
        stderr(&shared).contains("entries 0 and 1 point to overlapping grain tables"),
        "{}",
        stderr(&shared)
    );
    assert_eq!(code(&device), 3, "{}", stderr(&device));
    assert!(
        stderr(&device).contains("/dev/null") && stderr(&device).contains("not a regular file"),
        "{}",
        stderr(&device)
    );
}

#[test]
fn delta_chains_deeper_than_64_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("data.raw"), vec![7u8; 4096]).unwrap();
    // d00 ← d01 ← ... ← d64: 65 descriptors, each a flat disk over the next.
    for i in 0..65 {
        let parent = if i < 64 {
            format!(
                "parentCID={:08x}\nparentFileNameHint=\"d{:02}.vmdk\"\n",
                i + 1,
                i + 1
            )
        } else {
            "parentCID=ffffffff\n".to_string()
        };
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID={i:08x}\n{parent}createType=\"monolithicFlat\"\nRW 8 FLAT \"data.raw\" 0\n"
        );
        fs::write(dir.path().join(format!("d{i:02}.vmdk")), text).unwrap();
    }

    let ok = run(["info", s(&dir.path().join("d01.vmdk"))]);
    let deep = run(["info", s(&dir.path().join("d00.vmdk"))]);

    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(code(&deep), 3, "{}", stderr(&deep));
    assert!(
        stderr(&deep).contains("delta chain deeper than 64 files"),
        "{}",
        stderr(&deep)
    );
}
