//! `imgsafe serve` on every decoded container format, read back with real NBD clients.
//!
//! The oracle: the whole virtual disk read through `imgsafe serve` with `qemu-img convert`
//! equals byte for byte the raw disk the image was made from (`qemu-img compare` agrees),
//! and, where QEMU reads the format, what `qemu-img convert` reads from the file itself;
//! for VHD differencing chains, which QEMU cannot read, what libvhdi reads.
//! `qemu-img map` over the socket sees the holes of sparse images, and only over zeros.
//! Images are made at test time by qemu-img and by the test-only writers in tests/common.
//! Corrupt containers fail at the command line with the image exit code and one line
//! naming the file (the full table is in tests/corrupt_images.rs).

mod support;

use ploopwriter::{guid, write_descriptor, write_ploop, DescImage, Spec, NONE_GUID, TOP_GUID};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use support::vhdwriter::{self, VhdImage};
use support::*;

const MIB: usize = 1 << 20;

/// `imgsafe serve` in the background, stopped with SIGTERM on drop.
struct Served {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Start `imgsafe serve IMAGE_ARG` and wait for its socket; if it exits first, panic
    /// with what it wrote on stderr.
    fn start(image_arg: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("serve.log");
        let child = imgsafe()
            .arg("serve")
            .arg(image_arg)
            .arg("--socket")
            .arg(&socket)
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut served = Served {
            child,
            socket,
            _dir: dir,
        };
        let t = Instant::now();
        while !served.socket.exists() {
            if let Some(status) = served.child.try_wait().unwrap() {
                let err = fs::read_to_string(&log).unwrap_or_default();
                panic!("imgsafe serve {image_arg} exited ({status}) before listening: {err}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "imgsafe serve {image_arg} did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        served
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Run qemu-img (Debian package qemu-utils) and return its stdout; panics on failure.
fn qemu_img(args: &[&str]) -> String {
    let out = tool("qemu-img", "qemu-utils").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Where two byte strings first differ, for messages.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Copy the whole served disk with `qemu-img convert` over NBD to `out`.
fn served_copy(served: &Served, out: &Path) {
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &served.uri(), s(out)]);
}

/// Serve `image_arg` and check that the whole virtual disk, read with `qemu-img convert`
/// over NBD, is byte for byte the raw disk at `raw_path` (same size too), and that
/// `qemu-img compare` of the raw disk against the served one finds them identical.
fn assert_served_equals(image_arg: &str, raw_path: &Path) {
    let served = Served::start(image_arg);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.raw");

    served_copy(&served, &out);
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(raw_path),
        &served.uri(),
    ]);

    let got = fs::read(&out).unwrap();
    let want = fs::read(raw_path).unwrap();
    assert_eq!(
        got.len(),
        want.len(),
        "{image_arg}: served size differs from the raw disk"
    );
    assert!(
        got == want,
        "{image_arg}: served bytes differ from {} (first at byte {:?})",
        raw_path.display(),
        first_difference(&got, &want)
    );
    assert!(
        compare.contains("Images are identical"),
        "{image_arg}: {compare}"
    );
}

/// Serve `image_arg` and check that `qemu-img map` over NBD reports at least one hole
/// (`zero: true, data: false`), and that every hole reads as zeros in `raw_path`.
/// Returns the bytes in holes.
fn assert_served_holes(image_arg: &str, raw_path: &Path) -> u64 {
    let served = Served::start(image_arg);
    let map = qemu_img(&["map", "--output=json", "-f", "raw", &served.uri()]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let raw = fs::read(raw_path).unwrap();

    let holes: Vec<(usize, usize)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["zero"] == true && e["data"] == false)
        .map(|e| {
            let start = e["start"].as_u64().unwrap() as usize;
            (start, start + e["length"].as_u64().unwrap() as usize)
        })
        .collect();
    assert!(!holes.is_empty(), "{image_arg}: no hole in {map}");
    for &(start, end) in &holes {
        assert!(
            raw[start..end].iter().all(|&b| b == 0),
            "{image_arg}: hole {start}..{end} over data"
        );
    }
    holes.iter().map(|(a, b)| (b - a) as u64).sum()
}

/// Check that qemu-img itself, reading `image` as `fmt` (or a `json:` spec when `fmt` is
/// empty), sees byte for byte the raw disk at `raw_path`.
fn assert_qemu_reads_equal(image: &str, fmt: &str, raw_path: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qemu.raw");
    let mut args = vec!["convert"];
    if !fmt.is_empty() {
        args.extend(["-f", fmt]);
    }
    args.extend(["-O", "raw", image, s(&out)]);

    qemu_img(&args);

    let got = fs::read(&out).unwrap();
    let want = fs::read(raw_path).unwrap();
    assert!(
        got == want,
        "qemu-img reads {image} differently from {} (first at byte {:?})",
        raw_path.display(),
        first_difference(&got, &want)
    );
}

/// sha256 of each file, to show serving never writes them.
fn sha_all(paths: &[&Path]) -> Vec<String> {
    paths.iter().map(|p| sha256(p)).collect()
}

fn write_raw(path: &Path, bytes: &[u8]) -> PathBuf {
    fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// A raw disk of `len` bytes: pseudo-random data, except that every 2 MiB block whose
/// index is 1 mod 3 is zero (a hole for every format here) and short zero runs sit
/// inside the data (zeros that are stored, not holes).
fn sparse_disk(len: usize, seed: u64) -> Vec<u8> {
    let mut v = pseudo_random(len, seed);
    for (i, block) in v.chunks_mut(2 * MIB).enumerate() {
        if i % 3 == 1 {
            block.fill(0);
        }
    }
    for start in (4096..len).step_by(700_000) {
        v[start..(start + 5000).min(len)].fill(0);
    }
    v
}

/// 64 MiB raw disk with data only in its first and last MiB.
fn mostly_empty_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("src.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pseudo_random(1 << 20, 3), 0).unwrap();
    f.write_all_at(&pseudo_random(1 << 20, 4), 63 << 20)
        .unwrap();
    raw
}

/// A copy of the raw disk at `raw` zero-extended to `size` bytes: what a container whose
/// virtual size was rounded up (VHD CHS geometry) must read as.
fn zero_extended(raw: &Path, size: u64, out: &Path) -> PathBuf {
    assert!(
        size >= fs::metadata(raw).unwrap().len(),
        "container smaller than its source"
    );
    fs::copy(raw, out).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(out)
        .unwrap()
        .set_len(size)
        .unwrap();
    out.to_path_buf()
}

/// qemu-img convert the raw disk at `raw` to `img` with output options `fmt_args`.
fn qemu_convert(fmt_args: &[&str], raw: &Path, img: &Path) {
    let mut args = vec!["convert", "-f", "raw"];
    args.extend_from_slice(fmt_args);
    args.extend([s(raw), s(img)]);
    qemu_img(&args);
}

/// VHD virtual size as imgsafe and qemu use it: the footer's current_size in sectors.
fn vhd_size(vhd: &Path) -> u64 {
    vhdwriter::parent_info(vhd).unwrap().current_size / 512 * 512
}

fn holes_and_sparse_copy(fmt_args: &[&str], name: &str, qemu_fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let raw = mostly_empty_raw(dir.path());
    let img = dir.path().join(name);
    qemu_convert(fmt_args, &raw, &img);
    // Without force_size, qemu rounds a VHD up to its CHS geometry.
    let size = if qemu_fmt == "vpc" {
        vhd_size(&img)
    } else {
        64 << 20
    };
    let expect = zero_extended(&raw, size, &dir.path().join("expect.raw"));
    let before = sha_all(&[&img]);
    let copy = dir.path().join("copy.raw");

    assert_served_equals(s(&img), &expect);
    assert_qemu_reads_equal(s(&img), qemu_fmt, &expect);
    let holes = assert_served_holes(s(&img), &expect);
    served_copy(&Served::start(s(&img)), &copy);

    assert!(holes >= 60 << 20, "expected ~62 MiB of holes, got {holes}");
    let on_disk = fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        on_disk < 8 << 20,
        "copy is not sparse: {on_disk} bytes allocated"
    );
    assert_eq!(sha_all(&[&img]), before);
}

#[test]
fn dynamic_vhd_served_shows_holes_and_copies_sparse() {
    holes_and_sparse_copy(&["-O", "vpc", "-o", "subformat=dynamic"], "disk.vhd", "vpc");
}

#[test]
fn ploop_served_shows_holes_and_copies_sparse() {
    holes_and_sparse_copy(&["-O", "parallels"], "disk.hds", "parallels");
}

/// A qemu-made VHD of a sparse disk of `len` bytes with `-o opts`, served and compared
/// with the source (zero-extended to the VHD's size) and with qemu's own reading.
/// Returns the image argument and the expected raw disk, in `dir`.
fn qemu_vhd_served(dir: &Path, opts: &str, len: usize) -> (String, PathBuf) {
    let raw = write_raw(&dir.join("src.raw"), &sparse_disk(len, 7));
    let vhd = dir.join("disk.vhd");
    qemu_convert(&["-O", "vpc", "-o", opts], &raw, &vhd);
    let expect = zero_extended(&raw, vhd_size(&vhd), &dir.join("expect.raw"));
    let before = sha_all(&[&vhd]);

    assert_served_equals(s(&vhd), &expect);
    assert_qemu_reads_equal(s(&vhd), "vpc", &expect);

    assert_eq!(sha_all(&[&vhd]), before);
    (s(&vhd).to_string(), expect)
}

#[test]
fn vpc_dynamic_force_size_served_equals_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();

    let (vhd, expect) = qemu_vhd_served(dir.path(), "subformat=dynamic,force_size=on", 7 * MIB);

    assert_eq!(
        fs::metadata(&expect).unwrap().len(),
        7 * MIB as u64,
        "force_size kept the size"
    );
    assert_served_holes(&vhd, &expect);
}

#[test]
fn vpc_dynamic_rounded_to_geometry_served_equals_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();

    let (vhd, expect) = qemu_vhd_served(dir.path(), "subformat=dynamic", 5 * MIB + 512 * 9);

    assert_served_holes(&vhd, &expect);
}

#[test]
fn vpc_fixed_served_equals_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();

    qemu_vhd_served(dir.path(), "subformat=fixed", 3 * MIB + 512 * 7);
}

#[test]
fn vpc_fixed_force_size_served_equals_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();

    let (_, expect) = qemu_vhd_served(dir.path(), "subformat=fixed,force_size=on", 3 * MIB + 512);

    assert_eq!(fs::metadata(&expect).unwrap().len(), 3 * MIB as u64 + 512);
}

/// Clusters of `disk` that hold any non-zero byte: the ones a writer stores.
fn nonzero_clusters(disk: &[u8], spec: &Spec) -> Vec<bool> {
    disk.chunks(spec.cluster_size() as usize)
        .map(|c| c.iter().any(|&b| b != 0))
        .collect()
}

/// A ploop file of a sparse disk written by the test writer (clusters in shuffled
/// order), served and compared with the source and with qemu's parallels driver.
/// Returns the image path and the source raw disk.
fn written_ploop_served(dir: &Path, spec: Spec) -> (PathBuf, PathBuf) {
    let disk = sparse_disk(spec.size as usize, 11);
    let raw = write_raw(&dir.join("src.raw"), &disk);
    let img = dir.join("root.hds");
    write_ploop(&img, &spec, &disk, &nonzero_clusters(&disk, &spec), 5);
    let before = sha_all(&[&img]);

    assert_served_equals(s(&img), &raw);
    assert_qemu_reads_equal(s(&img), "parallels", &raw);
    assert_served_holes(s(&img), &raw);

    assert_eq!(sha_all(&[&img]), before);
    (img, raw)
}

#[test]
fn ploop_v1_served_equals_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        v2: false,
        cluster_sectors: 2048,
        size: 6 << 20,
        in_use: false,
    };

    written_ploop_served(dir.path(), spec);
}

#[test]
fn ploop_256k_clusters_served_equals_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // The last cluster is cut short by the disk's end.
    let spec = Spec {
        v2: true,
        cluster_sectors: 512,
        size: (5 << 20) + 4096,
        in_use: false,
    };

    written_ploop_served(dir.path(), spec);
}

#[test]
fn ploop_noncontiguous_clusters_served_equals_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // 63-sector clusters (not a power of two), stored in shuffled order.
    let spec = Spec {
        v2: false,
        cluster_sectors: 63,
        size: 3_000_000 / 512 * 512,
        in_use: false,
    };

    let (img, _) = written_ploop_served(dir.path(), spec);

    let bytes = fs::read(img).unwrap();
    let bat: Vec<u32> = bytes[64..64 + 4 * spec.clusters() as usize]
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .filter(|&e| e != 0)
        .collect();
    assert!(
        bat.windows(2).any(|w| w[0] > w[1]),
        "fixture: clusters are stored in order, not shuffled"
    );
}

/// A ploop chain in `hdd`: `layers` top first, each a file name, its full disk and the
/// clusters it stores. Writes the files and a DiskDescriptor.xml (no TopGUID, so the top
/// is the predefined GUID) and returns what the chain reads as.
fn ploop_chain(hdd: &Path, spec: &Spec, layers: &[(&str, Vec<u8>, Vec<bool>)]) -> Vec<u8> {
    let cs = spec.cluster_size() as usize;
    let mut expect = vec![0u8; spec.size as usize];
    let mut owned = vec![false; spec.clusters() as usize];
    for (n, (name, disk, allocated)) in layers.iter().enumerate() {
        write_ploop(&hdd.join(name), spec, disk, allocated, 20 + n as u64);
        for c in 0..owned.len() {
            if !allocated[c] || owned[c] {
                continue;
            }
            owned[c] = true;
            let end = ((c + 1) * cs).min(expect.len());
            expect[c * cs..end].copy_from_slice(&disk[c * cs..end]);
        }
    }
    let guids: Vec<String> = (0..layers.len())
        .map(|i| {
            if i == 0 {
                TOP_GUID.to_string()
            } else {
                guid(i)
            }
        })
        .collect();
    let images: Vec<DescImage> = layers
        .iter()
        .zip(&guids)
        .map(|((name, _, _), g)| DescImage {
            guid: g,
            file: name,
            kind: "Compressed",
        })
        .collect();
    let shots: Vec<(&str, &str)> = (0..layers.len())
        .map(|i| {
            (
                guids[i].as_str(),
                guids.get(i + 1).map_or(NONE_GUID, |g| g.as_str()),
            )
        })
        .collect();
    let xml = hdd.join("DiskDescriptor.xml");
    write_descriptor(
        &xml,
        spec.size / 512,
        spec.cluster_sectors,
        &images,
        &shots,
        None,
    );
    expect
}

/// qemu's own reading of a chain of parallels files (top first), as a `json:` spec.
fn qemu_chain_spec(files: &[PathBuf]) -> String {
    let mut spec = String::new();
    for (i, f) in files.iter().enumerate().rev() {
        let file = format!(r#""file":{{"driver":"file","filename":"{}"}}"#, f.display());
        let backing = if i + 1 == files.len() {
            String::new()
        } else {
            format!(r#","backing":{spec}"#)
        };
        spec = format!(r#"{{"driver":"parallels",{file}{backing}}}"#);
    }
    format!("json:{spec}")
}

#[test]
fn descriptor_chain_served_through_xml_and_directory() {
    let dir = tempfile::tempdir().unwrap();
    let hdd = dir.path().join("root.hdd");
    fs::create_dir(&hdd).unwrap();
    let spec = Spec::v2(6 << 20);
    let base = sparse_disk(spec.size as usize, 21);
    let mut top = base.clone();
    // Change clusters 0 and 2 (2 was a hole of the base); cluster 3 stays a hole.
    top[..MIB].copy_from_slice(&pseudo_random(MIB, 22));
    top[2 * MIB..3 * MIB].copy_from_slice(&pseudo_random(MIB, 23));
    let changed: Vec<bool> = (0..6)
        .map(|c| top[c * MIB..(c + 1) * MIB] != base[c * MIB..(c + 1) * MIB])
        .collect();
    let expect = ploop_chain(
        &hdd,
        &spec,
        &[
            ("root.hds.top", top, changed),
            ("root.hds", base.clone(), nonzero_clusters(&base, &spec)),
        ],
    );
    let raw = write_raw(&dir.path().join("expect.raw"), &expect);
    let xml = hdd.join("DiskDescriptor.xml");
    let files = [hdd.join("root.hds.top"), hdd.join("root.hds"), xml.clone()];
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let before = sha_all(&refs);

    assert_served_equals(s(&xml), &raw);
    assert_served_equals(s(&hdd), &raw);
    assert_served_holes(s(&hdd), &raw);
    assert_qemu_reads_equal(&qemu_chain_spec(&files[..2]), "", &raw);

    assert_eq!(sha_all(&refs), before);
}

#[test]
fn descriptor_depth_3_chain_served_equals_layers_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let hdd = dir.path().join("root.hdd");
    fs::create_dir(&hdd).unwrap();
    let spec = Spec {
        v2: true,
        cluster_sectors: 512,
        size: 12 << 18,
        in_use: false,
    };
    let mask = |set: &[usize]| (0..12).map(|c| set.contains(&c)).collect::<Vec<bool>>();
    // Overlapping clusters; 10 and 11 are in no layer.
    let expect = ploop_chain(
        &hdd,
        &spec,
        &[
            (
                "root.hds.top",
                pseudo_random(3 << 20, 31),
                mask(&[0, 4, 7, 9]),
            ),
            (
                "root.hds.mid",
                pseudo_random(3 << 20, 32),
                mask(&[3, 4, 5, 6, 7, 8]),
            ),
            (
                "root.hds",
                pseudo_random(3 << 20, 33),
                mask(&[0, 1, 2, 3, 4, 5]),
            ),
        ],
    );
    let raw = write_raw(&dir.path().join("expect.raw"), &expect);
    let files: Vec<PathBuf> = [
        "root.hds.top",
        "root.hds.mid",
        "root.hds",
        "DiskDescriptor.xml",
    ]
    .iter()
    .map(|f| hdd.join(f))
    .collect();
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let before = sha_all(&refs);

    assert_served_equals(s(&hdd.join("DiskDescriptor.xml")), &raw);
    let holes = assert_served_holes(s(&hdd), &raw);
    assert_qemu_reads_equal(&qemu_chain_spec(&files[..3]), "", &raw);

    assert_eq!(holes, 2 << 18, "holes should be exactly clusters 10 and 11");
    assert_eq!(sha_all(&refs), before);
}

/// A qemu-made dynamic VHD (force_size, so its size is exact) of a sparse disk of `len`
/// bytes, in `dir`; returns the image and its disk.
fn qemu_vhd_parent(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let disk = sparse_disk(len, 41);
    let raw = write_raw(&dir.join("parent.raw"), &disk);
    let vhd = dir.join("parent.vhd");
    qemu_convert(
        &["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
        &raw,
        &vhd,
    );
    assert_eq!(vhd_size(&vhd), len as u64);
    (vhd, disk)
}

/// Pseudo-random whole sectors to write into a child.
fn sectors(n: usize, seed: u64) -> Vec<u8> {
    pseudo_random(n * 512, seed)
}

/// Writes that leave partial bitmaps (so the rest of each touched block is junk with
/// clear bits): single sectors, a run across a block edge, a sector in a block that is a
/// hole of the parent. Blocks 3 and later stay untouched, so parent holes show through.
fn partial_writes(seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mib = MIB as u64;
    vec![
        (0, sectors(1, seed)),
        (512 * 9, sectors(3, seed + 1)),
        (2 * mib - 1024, sectors(4, seed + 2)),
        (2 * mib + 77 * 512, sectors(1, seed + 3)),
        (5 * mib + 512, sectors(20, seed + 4)),
    ]
}

fn apply(disk: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (off, data) in writes {
        disk[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
}

/// The whole virtual disk of a VHD chain (`chain[0]` the top, each next file its parent)
/// as libvhdi reads it: an independent VHD implementation, as the oracle for the
/// differencing disks QEMU cannot read (its vpc driver ignores the parent).
///
/// Debian 12's libvhdi (20210425) reads a sector bitmap a byte at a time without masking
/// the bit (`byte >> (7 - bit)`), so a set bit makes the rest of its byte's 8 sectors
/// count as present in the child too. It therefore agrees with the VHD specification
/// only where the bitmap is set in whole 4 KiB runs; the tests with partial bitmaps
/// check against the layers they wrote instead.
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

#[test]
fn vhd_differencing_with_partial_bitmaps_and_junk_served_equals_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, mut expect) = qemu_vhd_parent(dir.path(), 14 * MIB);
    let writes = partial_writes(50);
    let mut child = VhdImage::differencing(vhdwriter::parent_info(&parent).unwrap(), 2 << 20);
    child.locators = vec![vhdwriter::w2ru(".\\parent.vhd")];
    for (off, data) in &writes {
        child.write_sectors(*off, data);
    }
    let top = dir.path().join("child.vhd");
    child.write(&top).unwrap();
    apply(&mut expect, &writes);
    let raw = write_raw(&dir.path().join("expect.raw"), &expect);
    let before = sha_all(&[&top, &parent]);

    assert_served_equals(s(&top), &raw);
    assert_served_holes(s(&top), &raw);

    assert_eq!(sha_all(&[&top, &parent]), before);
}

/// A VHD chain of depth 3 in `dir`: `mid.vhd` holding `w1` over a qemu-made base, and
/// `top.vhd` holding `w2` over mid. Returns the files (top first), the disk the chain
/// must read as, and that disk written out as a raw file.
fn vhd_chain_of_3(
    dir: &Path,
    w1: &[(u64, Vec<u8>)],
    w2: &[(u64, Vec<u8>)],
) -> ([PathBuf; 3], Vec<u8>, PathBuf) {
    let (base, mut expect) = qemu_vhd_parent(dir, 14 * MIB);
    let mid = dir.join("mid.vhd");
    let top = dir.join("top.vhd");
    vhdwriter::write_differencing(&mid, &base, w1).unwrap();
    vhdwriter::write_differencing(&top, &mid, w2).unwrap();
    apply(&mut expect, w1);
    apply(&mut expect, w2);
    let raw = write_raw(&dir.join("expect.raw"), &expect);
    ([top, mid, base], expect, raw)
}

#[test]
fn vhd_differencing_chain_of_depth_3_served_equals_layers() {
    let dir = tempfile::tempdir().unwrap();
    let w1 = partial_writes(60);
    // The top overwrites some of mid's sectors and leaves sector 0 to it.
    let w2: Vec<_> = partial_writes(70).into_iter().skip(1).collect();
    let ([top, mid, base], _, raw) = vhd_chain_of_3(dir.path(), &w1, &w2);
    let before = sha_all(&[&top, &mid, &base]);

    assert_served_equals(s(&top), &raw);
    assert_served_holes(s(&top), &raw);

    assert_eq!(sha_all(&[&top, &mid, &base]), before);
}

#[test]
fn vhd_differencing_chain_of_depth_3_served_equals_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    // Whole 4 KiB runs (see libvhdi_read): at the start, across the first block edge,
    // in a block that is a hole of the base, and one the top writes over mid's.
    let kib = 1024;
    let w1 = vec![
        (0, sectors(8, 90)),
        (2 * MIB as u64 - 8 * kib, sectors(32, 91)),
        (5 * MIB as u64 + 4 * kib, sectors(8, 92)),
    ];
    let w2 = vec![
        (4 * kib, sectors(16, 93)),
        (2 * MIB as u64, sectors(8, 94)),
        (5 * MIB as u64 + 4 * kib, sectors(8, 95)),
    ];
    let ([top, mid, base], expect, raw) = vhd_chain_of_3(dir.path(), &w1, &w2);
    let before = sha_all(&[&top, &mid, &base]);

    let libvhdi = libvhdi_read(&[&top, &mid, &base]);

    assert!(
        libvhdi == expect,
        "libvhdi reads the chain differently from its layers"
    );
    assert_served_equals(s(&top), &raw);
    assert_eq!(sha_all(&[&top, &mid, &base]), before);
}

fn corrupt_copy(src: &Path, name: &str, at: usize, bytes: &[u8]) -> PathBuf {
    let mut b = fs::read(src).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    let p = src.with_file_name(name);
    fs::write(&p, b).unwrap();
    p
}

#[test]
fn corrupt_containers_exit_3_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let raw = mostly_empty_raw(dir.path());
    let vhd = dir.path().join("good.vhd");
    let hds = dir.path().join("good.hds");
    qemu_convert(&["-O", "vpc", "-o", "subformat=dynamic"], &raw, &vhd);
    qemu_convert(&["-O", "parallels"], &raw, &hds);
    let vhd_len = fs::metadata(&vhd).unwrap().len() as usize;
    // Footer checksum (offset 64 of the footer) broken in both copies.
    let bad_sum = corrupt_copy(
        &vhd,
        "badsum.vhd",
        vhd_len - 512 + 64,
        &[0xde, 0xad, 0xbe, 0xef],
    );
    let bad_sum = corrupt_copy(&bad_sum, "badsum.vhd", 64, &[0xde, 0xad, 0xbe, 0xef]);
    // ploop: first BAT entry points far past the end of the file.
    let bad_bat = corrupt_copy(&hds, "badbat.hds", 64, &0x00ff_ffffu32.to_le_bytes());
    let cases: [(&Path, &[&str]); 2] = [
        (&bad_sum, &["checksum"]),
        (&bad_bat, &["BAT entry 0", "past the end"]),
    ];

    for (img, words) in cases {
        let before = sha256(img);
        for cmd in [vec!["info"], vec!["ls"], vec!["cat"]] {
            let mut c = Command::new(env!("CARGO_BIN_EXE_imgsafe"));
            c.args(&cmd).arg(img);
            if cmd[0] == "cat" {
                c.arg("/etc/hostname");
            }
            let out = c.output().unwrap();

            assert_eq!(code(&out), 3, "{cmd:?} {}: {}", img.display(), stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains(img.file_name().unwrap().to_str().unwrap()),
                "{err}"
            );
            assert!(
                words.iter().all(|w| err.contains(w)),
                "{err} lacks {words:?}"
            );
        }
        assert_eq!(sha256(img), before);
    }
}
