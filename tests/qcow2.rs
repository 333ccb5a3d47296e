//! qcow2 images made at test time by qemu-img and qemu-io, read through
//! `imgsafe::format::open` (and `imgsafe serve`) and checked byte for byte against
//! `qemu-img convert -O raw` of the same image, the oracle for every variant: versions 2
//! and 3, cluster sizes 512 B to 2 MiB, zlib and zstd compression, extended L2, external
//! data files, backing chains over qcow2, raw, VHD and ploop, internal snapshots, and
//! damaged or hostile headers.

mod support;

use imgsafe::format::{self, BlockSource, OpenOptions};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use support::serve::{assert_same_bytes, qemu_img, s, Served};
use support::*;

const MIB: usize = 1 << 20;

/// Run qemu-io on `img` (format `fmt`) with one `-c` per command.
fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut c = tool("qemu-io", "qemu-utils");
    c.current_dir(img.parent().unwrap()).args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(img);
    let out = c.output().unwrap();
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io {cmds:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What qemu-img reads from `img` (extra args such as `-l snapshot.name=X` before it).
/// It runs in the image's folder: QEMU resolves a relative external data file name
/// against its working directory, where imgsafe (like for backing files) uses the
/// image's folder.
fn qemu_reads(img: &Path, extra: &[&str]) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qemu.raw");
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend([s(img), s(&out)]);
    must(
        tool("qemu-img", "qemu-utils")
            .current_dir(img.parent().unwrap())
            .args(&args),
    );
    fs::read(out).unwrap()
}

fn open_with(path: &Path, opts: &OpenOptions) -> Box<dyn BlockSource> {
    format::open(path, opts).unwrap_or_else(|e| panic!("{e}"))
}

fn open(path: &Path) -> Box<dyn BlockSource> {
    open_with(path, &OpenOptions::default())
}

/// The whole disk, read in odd-sized pieces that straddle clusters and subclusters.
fn read_all(src: &dyn BlockSource) -> Vec<u8> {
    let mut buf = vec![0u8; src.size() as usize];
    let mut pos = 0;
    while pos < buf.len() {
        let n = (333 * 1024 + 512).min(buf.len() - pos);
        src.read_at(&mut buf[pos..pos + n], pos as u64)
            .unwrap_or_else(|e| panic!("read at {pos}: {e}"));
        pos += n;
    }
    buf
}

/// A raw disk: pseudo-random data with every third MiB zero and small zero runs inside.
fn source_raw(dir: &Path, len: usize) -> PathBuf {
    let mut v = pseudo_random(len, 11);
    for (i, block) in v.chunks_mut(MIB).enumerate() {
        if i % 3 == 1 {
            block.fill(0);
        }
    }
    for start in (4096..len).step_by(300_000) {
        v[start..(start + 3000).min(len)].fill(0);
    }
    let p = dir.join("src.raw");
    fs::write(&p, v).unwrap();
    p
}

/// Check imgsafe reads `img` exactly as qemu-img does (and, when given, as `want`), and
/// that reading never wrote any of `files`.
fn assert_reads_like_qemu(img: &Path, want: Option<&[u8]>, files: &[&Path]) {
    let before: Vec<String> = files.iter().map(|f| sha256(f)).collect();

    let got = read_all(&*open(img));

    assert_same_bytes(
        &format!("{} vs qemu-img", img.display()),
        &got,
        &qemu_reads(img, &[]),
    );
    if let Some(w) = want {
        assert_same_bytes(&format!("{} vs source", img.display()), &got, w);
    }
    let after: Vec<String> = files.iter().map(|f| sha256(f)).collect();
    assert_eq!(after, before, "image files changed");
}

#[test]
fn versions_and_cluster_sizes_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = source_raw(dir.path(), 5 * MIB + 4096);
    let want = fs::read(&raw).unwrap();
    for opts in [
        "compat=0.10,cluster_size=65536",
        "compat=0.10,cluster_size=512",
        "compat=1.1,cluster_size=512",
        "compat=1.1,cluster_size=4096",
        "compat=1.1,cluster_size=65536",
        "compat=1.1,cluster_size=2M",
    ] {
        let img = dir
            .path()
            .join(format!("{}.qcow2", opts.replace([',', '='], "_")));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&raw),
            s(&img),
        ]);

        assert_reads_like_qemu(&img, Some(&want), &[&img]);
    }
}

#[test]
fn compressed_zlib_and_zstd_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = source_raw(dir.path(), 3 * MIB + 512);
    let want = fs::read(&raw).unwrap();
    for opts in [
        "compression_type=zlib",
        "compression_type=zstd",
        "compression_type=zlib,cluster_size=4096",
        "compression_type=zstd,cluster_size=2M",
        "compat=0.10",
    ] {
        let img = dir
            .path()
            .join(format!("{}.qcow2", opts.replace([',', '='], "_")));
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&raw),
            s(&img),
        ]);

        assert_reads_like_qemu(&img, Some(&want), &[&img]);
    }
}

#[test]
fn extended_l2_subclusters_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = source_raw(dir.path(), 4 * MIB);
    let base = dir.path().join("base.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    for cs in ["64K", "16K", "2M"] {
        let img = dir.path().join(format!("ext-{cs}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("extended_l2=on,cluster_size={cs}"),
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&img),
        ]);
        // Writes and zeroes smaller than a cluster: some subclusters allocated, some zero,
        // the rest still from the backing file.
        qemu_io(
            "qcow2",
            &img,
            &[
                "write -P 0x5a 4096 8192",
                "write -z 20480 4096",
                "write -P 0x33 1048576 1536",
                "write -z 2097152 65536",
                "write -P 0x77 3145728 300000",
            ],
        );

        assert_reads_like_qemu(&img, None, &[&img, &base]);
    }
    let compressed = dir.path().join("ext-c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        s(&raw),
        s(&compressed),
    ]);
    assert_reads_like_qemu(&compressed, Some(&fs::read(&raw).unwrap()), &[&compressed]);
}

#[test]
fn external_data_file_raw_and_not_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (name, raw_flag) in [("raw", "on"), ("plain", "off")] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let data = format!("{name}.data");
        // Run in the folder: the name is recorded as given, relative, and QEMU (like
        // imgsafe) then finds it beside the image.
        must(
            tool("qemu-img", "qemu-utils")
                .current_dir(dir.path())
                .args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("data_file={data},data_file_raw={raw_flag}"),
                    &format!("{name}.qcow2"),
                    "6M",
                ]),
        );
        qemu_io(
            "qcow2",
            &img,
            &[
                "write -P 0x11 0 1M",
                "write -P 0x22 3M 65536",
                "write -z 512K 64K",
                "write -P 0x44 5M 4096",
            ],
        );
        let data_path = dir.path().join(&data);
        assert!(data_path.exists(), "qemu-img made no {data}");

        assert_reads_like_qemu(&img, None, &[&img, &data_path]);
        let info = open(&img).layers();
        assert!(
            info[0].version.as_deref().unwrap().contains("data file"),
            "{info:?}"
        );
    }
}

/// A 3-deep chain: raw base, qcow2 middle with writes and zeroes, qcow2 top with more,
/// backing names relative to the images' folder.
fn three_deep_chain(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let base = dir.join("base.raw");
    fs::write(&base, pseudo_random(8 * MIB, 5)).unwrap();
    let mid = dir.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    qemu_io(
        "qcow2",
        &mid,
        &["write -P 0xaa 1M 2M", "write -z 4M 1M", "write -z 6M 4096"],
    );
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0xbb 1536K 64K",
            "write -z 2M 512K",
            "write -P 0xcc 4M 8192",
            "write -z 7M 1M",
        ],
    );
    (top.clone(), vec![top, mid, base])
}

#[test]
fn three_deep_chain_of_qcow2_and_raw_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (top, files) = three_deep_chain(dir.path());
    let paths: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();

    assert_reads_like_qemu(&top, None, &paths);

    let layers = open(&top).layers();
    let roles: Vec<(&str, &str)> = layers
        .iter()
        .map(|l| (l.role.as_str(), l.format.as_str()))
        .collect();
    assert_eq!(
        roles,
        [("top", "qcow2"), ("backing", "qcow2"), ("backing", "raw")]
    );
}

#[test]
fn served_chain_equals_qemu_and_block_status_follows_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (top, files) = three_deep_chain(dir.path());
    let sparse = dir.path().join("sparse.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&sparse), "64M"]);
    qemu_io(
        "qcow2",
        &sparse,
        &["write -P 1 0 1M", "write -P 2 40M 64K", "write -z 50M 1M"],
    );

    let served = Served::start(s(&top));
    assert_same_bytes("served chain", &served.read_all(), &qemu_reads(&top, &[]));
    let sparse_served = Served::start(s(&sparse));
    let map = sparse_served.map();

    let data: u64 = map.iter().filter(|m| m.2).map(|m| m.1).sum();
    assert_eq!(data, (1 << 20) + 65536, "{map:?}");
    assert_same_bytes(
        "served sparse",
        &sparse_served.read_all(),
        &qemu_reads(&sparse, &[]),
    );
    for f in &files {
        assert!(f.exists());
    }
}

#[test]
fn qcow2_over_vhd_and_over_ploop_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = source_raw(dir.path(), 6 * MIB);
    for (fmt, ext) in [("vpc", "vhd"), ("parallels", "hds")] {
        let base = dir.path().join(format!("base.{ext}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if fmt == "vpc" {
            args.extend(["-o", "subformat=dynamic,force_size=on"]);
        }
        args.extend([s(&raw), s(&base)]);
        qemu_img(&args);
        let top = dir.path().join(format!("over-{ext}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &format!("base.{ext}"),
            "-F",
            fmt,
            s(&top),
        ]);
        qemu_io("qcow2", &top, &["write -P 0x42 1M 100K", "write -z 3M 1M"]);

        assert_reads_like_qemu(&top, None, &[&top, &base]);
        let layers = open(&top).layers();
        assert_eq!(layers[1].format, if fmt == "vpc" { "vhd" } else { "ploop" });
    }
}

#[test]
fn backing_file_shorter_than_the_image_reads_zeros_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("short.raw");
    fs::write(&base, pseudo_random(3 * MIB + 512, 9)).unwrap();
    let top = dir.path().join("long.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "short.raw",
        "-F",
        "raw",
        s(&top),
        "8M",
    ]);
    qemu_io("qcow2", &top, &["write -P 7 6M 4096"]);

    assert_reads_like_qemu(&top, None, &[&top, &base]);
    let got = read_all(&*open(&top));
    assert!(got[3 * MIB + 512..6 * MIB].iter().all(|&b| b == 0));
}

#[test]
fn raw_backing_format_is_never_probed() {
    let dir = tempfile::tempdir().unwrap();
    // A raw backing file that happens to start with a qcow2 header: -F raw says it is raw.
    let inner = dir.path().join("inner.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&inner), "4M"]);
    let base = dir.path().join("looks-like-qcow2.raw");
    let mut bytes = fs::read(&inner).unwrap();
    bytes.resize(4 * MIB, 0);
    fs::write(&base, &bytes).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "looks-like-qcow2.raw",
        "-F",
        "raw",
        s(&top),
    ]);

    let got = read_all(&*open(&top));

    assert_same_bytes("raw backing read as raw", &got, &bytes);
    assert_eq!(open(&top).layers()[1].format, "raw");
}

#[test]
fn internal_snapshots_are_listed_and_each_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 1M"]);
    qemu_img(&["snapshot", "-c", "first", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 2 512K 1M", "write -z 3M 64K"]);
    qemu_img(&["snapshot", "-c", "second", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 3 2M 4096", "discard 0 64K"]);
    let before = sha256(&img);

    let active = read_all(&*open(&img));
    let by_name = read_all(&*open_with(
        &img,
        &OpenOptions {
            snapshot: Some("first".into()),
            ..Default::default()
        },
    ));
    let by_id = read_all(&*open_with(
        &img,
        &OpenOptions {
            snapshot: Some("2".into()),
            ..Default::default()
        },
    ));
    let missing = format::open(
        &img,
        &OpenOptions {
            snapshot: Some("third".into()),
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    let info = run(["info", "--json", s(&img)]);

    assert_same_bytes("active", &active, &qemu_reads(&img, &[]));
    assert_same_bytes(
        "first",
        &by_name,
        &qemu_reads(&img, &["-l", "snapshot.name=first"]),
    );
    assert_same_bytes("id 2", &by_id, &qemu_reads(&img, &["-l", "snapshot.id=2"]));
    assert_ne!(by_name, active);
    assert!(
        missing
            .ends_with("no internal snapshot \"third\" (the image has 1 \"first\", 2 \"second\")"),
        "{missing}"
    );
    let info: serde_json::Value = serde_json::from_str(&ok_stdout(&info)).unwrap();
    let snaps = info["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("{info}"));
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[1]["name"], "second");
    assert_eq!(snaps[1]["id"], "2");
    assert_eq!(snaps[1]["disk_size"], 4 << 20);
    assert!(snaps[0]["date"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(sha256(&img), before);
}

#[test]
fn snapshot_option_reaches_serve() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "2M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 1M"]);
    qemu_img(&["snapshot", "-c", "old", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 9 0 2M"]);

    let served = Served::start_with(&["--snapshot", "old", s(&img)]);

    assert_same_bytes(
        "served snapshot",
        &served.read_all(),
        &qemu_reads(&img, &["-l", "snapshot.name=old"]),
    );
}

/// `imgsafe info IMAGE` must fail with exit 3 and one line containing `want`.
fn assert_refused(img: &Path, want: &str) {
    let out = run(["info", s(img)]);
    assert_eq!(code(&out), 3, "{}: {}", img.display(), stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(want) && err.contains(s(img).rsplit('/').next().unwrap()),
        "{err}"
    );
}

#[test]
fn encrypted_images_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (format, name) in [("luks", "LUKS"), ("aes", "AES")] {
        let img = dir.path().join(format!("{format}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=password",
            "-f",
            "qcow2",
            "-o",
            &format!("encrypt.format={format},encrypt.key-secret=sec0"),
            s(&img),
            "4M",
        ]);

        assert_refused(
            &img,
            &format!("unsupported: the image is encrypted ({name})"),
        );
    }
}

#[test]
fn missing_backing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("gone.raw");
    fs::write(&base, vec![1u8; MIB]).unwrap();
    let top = dir.path().join("orphan.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    fs::remove_file(&base).unwrap();

    assert_refused(&top, "gone.raw: backing file of");
}

#[test]
fn backing_cycle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
    ]);
    // Point a back at b, by patching a's header: a backing name after the extensions.
    let mut bytes = fs::read(&a).unwrap();
    let name = b"b.qcow2";
    let at = 0x400usize;
    bytes[at..at + name.len()].copy_from_slice(name);
    bytes[8..16].copy_from_slice(&(at as u64).to_be_bytes());
    bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    fs::write(&a, bytes).unwrap();

    assert_refused(&b, "backing chain loops back to this file");
}

#[test]
fn chain_deeper_than_64_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&dir.path().join("l0.qcow2")),
        "1M",
    ]);
    for i in 1..=65 {
        // -u: do not open the chain below at each step (the sizes are given).
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &format!("l{}.qcow2", i - 1),
            "-F",
            "qcow2",
            s(&dir.path().join(format!("l{i}.qcow2"))),
            "1M",
        ]);
    }

    let out = run(["info", s(&dir.path().join("l65.qcow2"))]);

    assert_eq!(code(&out), 3);
    assert!(
        stderr(&out).contains("l1.qcow2: backing chain is deeper than 64 files"),
        "{}",
        stderr(&out)
    );
    assert_eq!(open(&dir.path().join("l63.qcow2")).layers().len(), 64);
}

/// A small v3 image with data, for patching.
fn patched(dir: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io("qcow2", &img, &["write -P 5 0 256K"]);
    let mut bytes = fs::read(&img).unwrap();
    patch(&mut bytes);
    fs::write(&img, bytes).unwrap();
    img
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn hostile_headers_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let l1_past_eof = patched(d, "l1.qcow2", |b| {
        b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())
    });
    let huge_l1 = patched(d, "hugel1.qcow2", |b| {
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())
    });
    let bits = patched(d, "bits.qcow2", |b| {
        b[20..24].copy_from_slice(&30u32.to_be_bytes())
    });
    let unknown = patched(d, "feat.qcow2", |b| {
        b[72..80].copy_from_slice(&(1u64 << 17).to_be_bytes())
    });
    let version = patched(d, "v4.qcow2", |b| {
        b[4..8].copy_from_slice(&4u32.to_be_bytes())
    });

    assert_refused(
        &l1_past_eof,
        "L1 table (1 entries at offset 1099511627776) extends past the end of the file",
    );
    assert_refused(&huge_l1, "more than the 4194304 qcow2 allows");
    assert_refused(&bits, "cluster_bits 30 is out of range (9..=21)");
    assert_refused(
        &unknown,
        "unsupported: incompatible feature bit 17 (not known to imgsafe)",
    );
    assert_refused(&version, "unsupported: qcow2 version 4");
}

#[test]
fn l2_table_in_the_header_is_a_read_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = patched(dir.path(), "l2.qcow2", |b| {
        let l1 = be64(b, 40) as usize;
        b[l1..l1 + 8].copy_from_slice(&(512u64 | 1 << 63).to_be_bytes());
    });

    let src = open(&img);
    let err = src.read_at(&mut [0u8; 4096], 0).unwrap_err().to_string();

    assert!(
        err.contains("l2.qcow2: L2 table at offset 512 is unaligned or overlaps the header"),
        "{err}"
    );
}

#[test]
fn compressed_cluster_running_past_eof_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    // Compressible (random data would be stored uncompressed).
    let text: String = (0..MIB / 16).map(|i| format!("line {i:010}\n")).collect();
    fs::write(&raw, text).unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    // Cut the file inside the last compressed cluster.
    let len = fs::metadata(&img).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len - 20_000)
        .unwrap();

    let src = open(&img);
    let mut buf = vec![0u8; MIB];
    let err = src.read_at(&mut buf, 0).unwrap_err().to_string();

    assert!(
        err.contains("c.qcow2: compressed cluster at offset"),
        "{err}"
    );
}

#[test]
fn dirty_and_corrupt_images_read_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    for (bit, warning) in [
        (1u8, "not closed cleanly (dirty); reading it anyway"),
        (2, "image is marked corrupt by QEMU; reading it anyway"),
    ] {
        let img = patched(dir.path(), &format!("flag{bit}.qcow2"), |b| b[79] |= bit);

        let out = run(["info", s(&img)]);
        let got = read_all(&*open(&img));

        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains(warning), "{}", stderr(&out));
        assert!(got[..256 << 10].iter().all(|&b| b == 5));
    }
}

#[test]
fn hostile_l1_is_not_allocated_up_front() {
    let dir = tempfile::tempdir().unwrap();
    // 2^61 bytes at 2 MiB clusters needs 4 Mi L1 entries (32 MiB): the table is declared
    // and lies in a sparse file, but only the page a read touches is loaded.
    let img = dir.path().join("big.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        s(&img),
        "2E",
    ]);
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0u8; 1], 1 << 40).unwrap();

    let src = open(&img);
    let mut buf = [1u8; 4096];
    src.read_at(&mut buf, (1 << 61) - 4096).unwrap();

    assert_eq!(src.size(), 1 << 61);
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn ls_cat_and_cp_read_a_qcow2_chain_through_the_appliance() {
    let tree = tempfile::tempdir().unwrap();
    sample_tree(tree.path(), TreeOpts::PLAIN);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("fs.raw");
    fs_image("ext4", tree.path(), 32, &raw);
    let base = dir.path().join("base.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&raw),
        s(&base),
    ]);
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let before = (sha256(&top), sha256(&base));

    let out = tempfile::tempdir().unwrap();

    let ls = run(["ls", s(&top), "/etc"]);
    let cat = run(["cat", s(&top), "/home/me/big.bin"]);
    let cp = run(["cp", &format!("{}:/home/me/letter", s(&top)), s(out.path())]);

    ok_stdout(&cp);
    assert_eq!(
        fs::read(out.path().join("letter")).unwrap(),
        b"Dear imgsafe,\nplease copy me.\n"
    );
    let names = ok_stdout(&ls);
    assert!(
        names.contains("hostname\n") && names.contains("os-release\n"),
        "{names}"
    );
    assert!(cat.status.success(), "{}", stderr(&cat));
    assert!(cat.stdout == pseudo_random(3 << 20, 7), "big.bin differs");
    assert_eq!((sha256(&top), sha256(&base)), before);
}
