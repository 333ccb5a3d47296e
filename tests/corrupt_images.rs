//! Every corrupt container input, through the real binary: `imgsafe info` (and `ls` for
//! one case) exits 3, writes exactly one stderr line that starts with `imgsafe: `, names
//! the file at fault and says what is wrong with it, and leaves every file untouched.
//!
//! Inputs are good images from the test writers in tests/common, patched in one field
//! (checksums recomputed unless the checksum is the point of the case).

mod support;
use support::ploopwriter;

use ploopwriter::{guid, write_descriptor, write_ploop, DescImage, Spec, NONE_GUID};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use support::vhdwriter::{self, VhdImage, BAT_OFFSET, HEADER_OFFSET};
use support::{code, sha256, stderr};

/// Exit code for a missing, unreadable or corrupt image (src/error.rs `exit::IMAGE`).
const IMAGE: i32 = 3;
const MIB: u64 = 1 << 20;

/// Run imgsafe with `args` and `env`, from an empty directory (so a bare container id
/// is never a file of the working directory) and without the caller's IMGSAFE_VZ_ROOT.
fn imgsafe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = support::imgsafe();
    cmd.args(args)
        .current_dir(cwd.path())
        .env_remove("IMGSAFE_VZ_ROOT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sha_all(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|p| sha256(p)).collect()
}

/// Run `args` and check the failure: exit 3, one stderr line `imgsafe: ...` naming
/// `names` (a path, or a bare argument) and holding every phrase, nothing on stdout, and
/// `files` unchanged. Returns the line.
fn assert_refused(
    args: &[&str],
    env: &[(&str, &str)],
    names: &str,
    phrases: &[&str],
    files: &[PathBuf],
) -> String {
    let before = sha_all(files);

    let out = imgsafe(args, env);

    let err = stderr(&out);
    assert_eq!(code(&out), IMAGE, "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err:?}");
    let line = lines[0];
    assert!(line.starts_with("imgsafe: "), "{line}");
    assert!(line.contains(names), "{line:?} does not name {names}");
    for p in phrases {
        assert!(line.contains(p), "{line:?} lacks {p:?}");
    }
    assert!(out.stdout.is_empty(), "{args:?} wrote to stdout");
    assert_eq!(sha_all(files), before, "{args:?} changed a file");
    line.to_string()
}

/// A good dynamic VHD from the writer: 4 MiB of 1 MiB blocks, blocks 0 and 2 allocated.
fn good_dynamic() -> Vec<u8> {
    let mut img = VhdImage::dynamic(4 * MIB, 1 << 20);
    img.write_sectors(0, &vec![0xFF; 1 << 20]);
    img.write_sectors(2 * MIB, &vec![0x11; 1 << 20]);
    img.to_bytes()
}

/// A good fixed VHD from the writer: 1 MiB of data and the footer.
fn good_fixed() -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f.vhd");
    let mut raw = vec![0u8; MIB as usize];
    raw[5] = 1;
    vhdwriter::write_fixed(&p, &raw).unwrap();
    fs::read(p).unwrap()
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Index of the last footer's first byte.
fn end_footer(b: &[u8]) -> usize {
    b.len() - 512
}

/// Turns a good file's bytes into a corrupt one.
type Patch = fn(&mut Vec<u8>);

/// File name, the good image it starts from, the patch and the phrase the error must hold.
type VhdCase = (&'static str, fn() -> Vec<u8>, Patch, &'static str);

#[test]
fn corrupt_vhd_files_exit_3_naming_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [VhdCase; 8] = [
        (
            "fixed-footer-sum.vhd",
            good_fixed,
            |b| {
                let f = end_footer(b);
                b[f + 48] ^= 1; // current_size, checksum left stale
            },
            "VHD footer at the end of the file: checksum mismatch",
        ),
        (
            "both-footers-sum.vhd",
            good_dynamic,
            |b| {
                let f = end_footer(b);
                b[f + 48] ^= 1;
                b[48] ^= 1;
            },
            "VHD footer at the end of the file: checksum mismatch",
        ),
        (
            "copy-footer-sum.vhd",
            good_dynamic,
            |b| {
                let f = end_footer(b);
                b[f..f + 8].fill(0); // no footer at the end at all
                b[48] ^= 1;
            },
            "VHD footer copy at offset 0: checksum mismatch",
        ),
        (
            "header-sum.vhd",
            good_dynamic,
            |b| b[HEADER_OFFSET + 33] ^= 0x40,
            "dynamic header at offset 512: checksum mismatch",
        ),
        (
            "block-size.vhd",
            good_dynamic,
            |b| {
                put_be32(b, HEADER_OFFSET + 32, 3 << 19);
                vhdwriter::fix_header_checksum(b);
            },
            "block size 1572864 is not a power of two",
        ),
        (
            "bat-past-end.vhd",
            good_dynamic,
            |b| put_be32(b, BAT_OFFSET + 4, 0x00FF_0000),
            "BAT entry 1 points past the end of the file",
        ),
        (
            "bat-over-header.vhd",
            good_dynamic,
            |b| {
                let at = HEADER_OFFSET + 16; // table_offset
                b[at..at + 8].copy_from_slice(&(HEADER_OFFSET as u64).to_be_bytes());
                vhdwriter::fix_header_checksum(b);
            },
            "BAT (table_offset 512) overlaps the dynamic header",
        ),
        (
            "block-over-header.vhd",
            good_dynamic,
            |b| put_be32(b, BAT_OFFSET, 2), // sector 2 is inside the header
            "BAT entry 0 overlaps the dynamic header",
        ),
    ];

    for (name, good, patch, phrase) in cases {
        let mut bytes = good();
        patch(&mut bytes);
        let p = dir.path().join(name);
        fs::write(&p, bytes).unwrap();

        assert_refused(
            &["info", s(&p)],
            &[],
            s(&p),
            &[phrase],
            std::slice::from_ref(&p),
        );
    }
}

#[test]
fn ls_on_a_corrupt_vhd_fails_like_info_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = good_dynamic();
    put_be32(&mut bytes, BAT_OFFSET + 4, 0x00FF_0000);
    let p = dir.path().join("bat-past-end.vhd");
    fs::write(&p, bytes).unwrap();

    let line = assert_refused(
        &["ls", s(&p), "/"],
        &[],
        s(&p),
        &["BAT entry 1 points past the end of the file"],
        std::slice::from_ref(&p),
    );

    assert_eq!(
        line,
        format!(
            "imgsafe: {}: BAT entry 1 points past the end of the file",
            p.display()
        )
    );
}

/// A writer-made dynamic parent `base.vhd` in `dir` and a differencing child `child.vhd`
/// over it found through a relative locator; `wrong_id` makes the child record another
/// parent id. Returns (child, parent).
fn vhd_chain(dir: &Path, wrong_id: bool) -> (PathBuf, PathBuf) {
    let parent = dir.join("base.vhd");
    let mut base = VhdImage::dynamic(4 * MIB, 2 << 20);
    base.write_sectors(0, &vec![0x33; 4096]);
    base.write(&parent).unwrap();
    let mut info = vhdwriter::parent_info(&parent).unwrap();
    if wrong_id {
        info.unique_id = [0xEE; 16];
    }
    let mut child = VhdImage::differencing(info, 2 << 20);
    child.locators = vec![vhdwriter::w2ru(".\\base.vhd")];
    child.write_sectors(512, &vec![0x44; 512]);
    let top = dir.join("child.vhd");
    child.write(&top).unwrap();
    (top, parent)
}

#[test]
fn vhd_parent_id_mismatch_is_refused_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (child, parent) = vhd_chain(dir.path(), true);
    let files = [child.clone(), parent.clone()];

    assert_refused(
        &["info", s(&child)],
        &[],
        s(&child),
        &[
            &format!("parent {} has unique id", parent.display()),
            &format!("but this disk expects {}", "ee".repeat(16)),
            "--ignore-parent-id",
        ],
        &files,
    );
    let ok = imgsafe(&["info", "--json", "--ignore-parent-id", s(&child)], &[]);

    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(stderr(&ok), "", "an accepted mismatch is not warned about");
    let doc: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(doc["chain"].as_array().unwrap().len(), 2, "{doc}");
    assert_eq!(doc["chain"][1]["path"], s(&parent));
    assert_eq!(doc["virtual_size"], 4 * MIB);
}

#[test]
fn vhd_missing_parent_is_refused_naming_the_child_and_the_path_tried() {
    let dir = tempfile::tempdir().unwrap();
    let (child, parent) = vhd_chain(dir.path(), false);
    fs::remove_file(&parent).unwrap();

    assert_refused(
        &["info", s(&child)],
        &[],
        s(&child),
        &["parent image not found", &parent.display().to_string()],
        std::slice::from_ref(&child),
    );
}

#[test]
fn vhd_damaged_end_footer_reads_from_the_copy_with_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = good_dynamic();
    let f = end_footer(&bytes);
    bytes[f + 12] ^= 0xFF;
    let p = dir.path().join("damaged.vhd");
    fs::write(&p, bytes).unwrap();
    let before = sha256(&p);

    let out = imgsafe(&["info", "--json", s(&p)], &[]);

    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err:?}");
    assert!(
        lines[0].starts_with(&format!(
            "imgsafe: warning: {}: footer at the end of the file is damaged (checksum mismatch",
            p.display()
        )),
        "{err}"
    );
    assert!(lines[0].ends_with("using the copy at offset 0"), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["virtual_size"], 4 * MIB);
    assert_eq!(doc["version"], "dynamic");
    assert_eq!(sha256(&p), before);
}

/// A good small ploop v2 file at `path`: 64 KiB of 4 KiB clusters, all allocated.
fn small_ploop(path: &Path) -> Spec {
    let spec = Spec {
        v2: true,
        cluster_sectors: 8,
        size: 64 << 10,
        in_use: false,
    };
    let disk: Vec<u8> = (0..spec.size).map(|i| (i % 251) as u8 + 1).collect();
    write_ploop(path, &spec, &disk, &vec![true; spec.clusters() as usize], 2);
    spec
}

#[test]
fn corrupt_ploop_files_exit_3_naming_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Patch, &str); 5] = [
        (
            "truncated-header.hds",
            |b| b.truncate(40),
            "file too short for a ploop header (40 bytes, need 64)",
        ),
        (
            "header-version.hds",
            |b| put_le32(b, 16, 1),
            "unsupported header version 1 (m_Type)",
        ),
        (
            "cluster-0.hds",
            |b| put_le32(b, 28, 0),
            "cluster size m_Sectors=0 sectors is out of range",
        ),
        (
            "bat-past-end.hds",
            |b| put_le32(b, 64 + 4 * 5, 4096),
            "BAT entry 5 points past the end of the file",
        ),
        (
            "truncated-bat.hds",
            |b| b.truncate(64 + 8),
            "BAT (16 entries) extends past the end of the file",
        ),
    ];

    for (name, patch, phrase) in cases {
        let p = dir.path().join(name);
        small_ploop(&p);
        let mut bytes = fs::read(&p).unwrap();
        patch(&mut bytes);
        fs::write(&p, bytes).unwrap();

        assert_refused(
            &["info", s(&p)],
            &[],
            s(&p),
            &[phrase],
            std::slice::from_ref(&p),
        );
    }
}

/// One DiskDescriptor.xml case, built next to a good `root.hds`.
struct DescCase {
    name: &'static str,
    /// Writes the descriptor (and any extra file) into the folder; returns the argument to
    /// pass and the path the error must name.
    build: fn(&Path) -> (PathBuf, PathBuf),
    phrase: &'static str,
}

fn xml_in(dir: &Path) -> PathBuf {
    dir.join("DiskDescriptor.xml")
}

/// One image `file` as the whole chain, with the given Disk_size and Blocksize.
fn single(dir: &Path, file: &str, disk_sectors: u64, block_sectors: u32) -> PathBuf {
    let g = guid(1);
    let images = [DescImage {
        guid: &g,
        file,
        kind: "Compressed",
    }];
    write_descriptor(
        &xml_in(dir),
        disk_sectors,
        block_sectors,
        &images,
        &[(&g, NONE_GUID)],
        Some(&g),
    );
    xml_in(dir)
}

/// The chain `guids[0]` (top) → ... → root, every GUID naming `root.hds`.
fn chain_of(dir: &Path, depth: usize) -> PathBuf {
    let guids: Vec<String> = (0..depth).map(guid).collect();
    let images: Vec<DescImage> = guids
        .iter()
        .map(|g| DescImage {
            guid: g,
            file: "root.hds",
            kind: "Compressed",
        })
        .collect();
    let shots: Vec<(&str, &str)> = (0..depth)
        .map(|i| {
            (
                guids[i].as_str(),
                guids.get(i + 1).map_or(NONE_GUID, |p| p.as_str()),
            )
        })
        .collect();
    write_descriptor(&xml_in(dir), 128, 8, &images, &shots, Some(&guids[0]));
    xml_in(dir)
}

#[test]
fn corrupt_descriptor_chains_exit_3_naming_the_file_and_problem() {
    let cases = [
        DescCase {
            name: "encrypted",
            build: |d| {
                let xml = single(d, "root.hds", 128, 8);
                let text = fs::read_to_string(&xml).unwrap().replace(
                    "<Padding>0</Padding>",
                    "<Padding>0</Padding><Encryption><Engine>2</Engine></Encryption>",
                );
                fs::write(&xml, text).unwrap();
                (xml.clone(), xml)
            },
            phrase: "unsupported: the disk is encrypted (Encryption/Engine \"2\")",
        },
        DescCase {
            name: "cycle, given as the folder",
            build: |d| {
                let (a, b) = (guid(1), guid(2));
                let images = [
                    DescImage {
                        guid: &a,
                        file: "root.hds",
                        kind: "Compressed",
                    },
                    DescImage {
                        guid: &b,
                        file: "root.hds",
                        kind: "Compressed",
                    },
                ];
                write_descriptor(&xml_in(d), 128, 8, &images, &[(&a, &b), (&b, &a)], Some(&a));
                (d.to_path_buf(), xml_in(d))
            },
            phrase: "cycle in the snapshot chain at GUID",
        },
        DescCase {
            name: "delta size mismatch",
            build: |d| (single(d, "root.hds", 256, 8), d.join("root.hds")),
            phrase:
                "disk size 65536 bytes disagrees with DiskDescriptor.xml Disk_size (131072 bytes)",
        },
        DescCase {
            name: "cluster size mismatch",
            build: |d| (single(d, "root.hds", 128, 16), d.join("root.hds")),
            phrase: "cluster size 4096 bytes disagrees with the chain's 8192 bytes",
        },
        DescCase {
            name: "deeper than the limit",
            build: |d| (chain_of(d, 66), xml_in(d)),
            phrase: "snapshot chain is deeper than 64 deltas",
        },
        DescCase {
            name: "Compressed delta without ploop magic",
            build: |d| {
                fs::write(d.join("plain.img"), vec![7u8; 64 << 10]).unwrap();
                (single(d, "plain.img", 128, 8), d.join("plain.img"))
            },
            phrase: "declared Compressed but is not a ploop image (bad header magic)",
        },
    ];

    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        small_ploop(&dir.path().join("root.hds"));
        let (arg, names) = (case.build)(dir.path());
        let files: Vec<PathBuf> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();

        // Shown with the failure: the paths alone do not say which case it was.
        eprintln!("case: {}", case.name);

        assert_refused(&["info", s(&arg)], &[], s(&names), &[case.phrase], &files);
    }
}

#[test]
fn missing_delta_names_the_delta_and_its_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let xml = single(dir.path(), "root.hds.gone", 128, 8);

    let line = assert_refused(
        &["info", s(&xml)],
        &[],
        s(&dir.path().join("root.hds.gone")),
        &[],
        std::slice::from_ref(&xml),
    );

    assert!(
        line.ends_with(&format!(
            "delta file listed in {} does not exist",
            xml.display()
        )),
        "{line}"
    );
}

/// `<root>/101/root.hdd` with a one-delta chain; returns the descriptor.
fn container(root: &Path) -> PathBuf {
    let hdd = root.join("101/root.hdd");
    fs::create_dir_all(&hdd).unwrap();
    small_ploop(&hdd.join("root.hds"));
    single(&hdd, "root.hds", 128, 8)
}

#[test]
fn bare_container_id_opens_under_vz_root_flag_and_env() {
    let root = tempfile::tempdir().unwrap();
    let xml = container(root.path());
    let r = s(root.path());

    let by_flag = imgsafe(&["info", "--json", "101", "--vz-root", r], &[]);
    let by_env = imgsafe(&["info", "--json", "101"], &[("IMGSAFE_VZ_ROOT", r)]);

    for out in [&by_flag, &by_env] {
        assert_eq!(code(out), 0, "{}", stderr(out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["descriptor"], s(&xml), "{doc}");
        assert_eq!(doc["format"], "ploop");
        assert_eq!(doc["virtual_size"], 64u64 << 10);
    }
}

#[test]
fn missing_container_id_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    container(root.path());
    let r = s(root.path());
    let expect = |root: &str| {
        format!(
            "imgsafe: 4242: no such file, and no container 4242 under {root} ({root}/4242/root.hdd/DiskDescriptor.xml does not exist; set --vz-root or IMGSAFE_VZ_ROOT)"
        )
    };

    let by_flag = assert_refused(&["info", "4242", "--vz-root", r], &[], "4242", &[], &[]);
    let by_env = assert_refused(
        &["info", "4242"],
        &[("IMGSAFE_VZ_ROOT", r)],
        "4242",
        &[],
        &[],
    );
    let by_default = assert_refused(&["info", "4242"], &[], "4242", &[], &[]);

    assert_eq!(by_flag, expect(r));
    assert_eq!(by_env, expect(r));
    assert_eq!(by_default, expect("/vz/private"));
}
