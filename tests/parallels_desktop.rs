//! Parallels Desktop disk bundles as Parallels writes them: the null-GUID `<Encryption>`
//! block, `<Miscellaneous>`, `PhysicalSectorSize` 4096, no `<TopGUID>`, the empty
//! `name.hdd` beside the descriptor, a split disk of three `<Storage>` extents each its own
//! delta chain (Plain and Compressed bases), a `<File>` recorded as an absolute path on
//! another machine, all inside a `.pvm` VM folder.
//!
//! The oracle: the disk served by `imgsafe serve` and read with `qemu-img convert` equals
//! the source raw disk byte for byte; the Compressed bases are made by
//! `qemu-img convert -O parallels` and qemu-img reads each of them back as its piece.

mod support;

use ploopwriter::{write_ploop, Spec, NONE_GUID, TOP_GUID};
use std::fs;
use std::path::{Path, PathBuf};
use support::serve::{assert_same_bytes, qemu_img, s, Served};
use support::*;

const MIB: u64 = 1 << 20;
/// GUID of the base snapshot.
const BASE_GUID: &str = "{8f0c2f1e-6b4d-4a3c-9e52-1d7a3b9c0e11}";
/// Extent boundaries in sectors: not multiples of the 1 MiB cluster, so clusters and reads
/// straddle them.
const CUTS: [u64; 4] = [0, 16_385, 32_000, 49_152];

/// The descriptor Parallels Desktop writes for a split disk (shape of public sample
/// bundles), with the given `(start, end, base file, base type, top file)` extents.
fn descriptor(disk_sectors: u64, extents: &[(u64, u64, String, &str, String)]) -> String {
    let storages: String = extents
        .iter()
        .map(|(start, end, base, kind, top)| {
            format!(
                r#"        <Storage>
            <Start>{start}</Start>
            <End>{end}</End>
            <Blocksize>2048</Blocksize>
            <Image>
                <GUID>{BASE_GUID}</GUID>
                <Type>{kind}</Type>
                <File>{base}</File>
            </Image>
            <Image>
                <GUID>{TOP_GUID}</GUID>
                <Type>Compressed</Type>
                <File>{top}</File>
            </Image>
        </Storage>
"#
            )
        })
        .collect();
    format!(
        r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{disk_sectors}</Disk_size>
        <Cylinders>{}</Cylinders>
        <PhysicalSectorSize>4096</PhysicalSectorSize>
        <LogicSectorSize>512</LogicSectorSize>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{{00000000-0000-0000-0000-000000000000}}</Engine>
            <Data></Data>
            <Salt></Salt>
        </Encryption>
        <UID>{{2b7e1516-28ae-4d2a-abf7-158809cf4f3c}}</UID>
        <Name>disk SSD</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <SuspendState>0</SuspendState>
            <Bootable>1</Bootable>
            <ChangeState>0</ChangeState>
        </Miscellaneous>
    </Disk_Parameters>
    <StorageData>
{storages}    </StorageData>
    <Snapshots>
        <Shot>
            <GUID>{BASE_GUID}</GUID>
            <ParentGUID>{NONE_GUID}</ParentGUID>
        </Shot>
        <Shot>
            <GUID>{TOP_GUID}</GUID>
            <ParentGUID>{BASE_GUID}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
"#,
        disk_sectors / (16 * 32)
    )
}

/// A bundle made from the raw disk `disk`: `VM.pvm/disk.hdd/` with three extents. In each,
/// the base holds the piece with every other cluster scrambled and the top delta holds the
/// right data for exactly those clusters, so only a correct chain reads the source back.
/// Extent 1's base is Plain (a raw file), extents 2 and 3 are qemu-made ploop files;
/// extent 3's top is recorded as an absolute path from another machine.
struct Bundle {
    vm: PathBuf,
    hdd: PathBuf,
    files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

fn make_bundle(disk: &[u8]) -> Bundle {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("VM.pvm");
    let hdd = vm.join("disk.hdd");
    fs::create_dir_all(&hdd).unwrap();
    fs::write(vm.join("config.pvs"), "<ParallelsVirtualMachine/>").unwrap();
    fs::write(hdd.join("disk.hdd"), "").unwrap();
    let cs = MIB as usize;
    let mut extents = Vec::new();
    let mut files = Vec::new();
    for n in 0..3 {
        let (a, b) = (CUTS[n], CUTS[n + 1]);
        let piece = &disk[(a * 512) as usize..(b * 512) as usize];
        let mut base = piece.to_vec();
        let spec = Spec::v2(piece.len() as u64);
        let patched: Vec<bool> = (0..spec.clusters()).map(|i| i % 2 == 0).collect();
        for (i, chunk) in base.chunks_mut(cs).enumerate() {
            if patched[i] {
                chunk.copy_from_slice(&pseudo_random(chunk.len(), 1000 + i as u64));
            }
        }
        let (base_name, kind) = if n == 0 {
            let name = format!("disk.hdd.{n}.{BASE_GUID}.hds");
            fs::write(hdd.join(&name), &base).unwrap();
            (name, "Plain")
        } else {
            let raw = dir.path().join(format!("base{n}.raw"));
            fs::write(&raw, &base).unwrap();
            let name = format!("disk.hdd.{n}.{BASE_GUID}.hds");
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "parallels",
                s(&raw),
                s(&hdd.join(&name)),
            ]);
            let back = dir.path().join(format!("back{n}.raw"));
            qemu_img(&[
                "convert",
                "-f",
                "parallels",
                "-O",
                "raw",
                s(&hdd.join(&name)),
                s(&back),
            ]);
            assert_same_bytes(
                "qemu's own reading of its piece",
                &fs::read(back).unwrap(),
                &base,
            );
            (name, "Compressed")
        };
        let top_name = format!("disk.hdd.{n}.{TOP_GUID}.hds");
        write_ploop(&hdd.join(&top_name), &spec, piece, &patched, 7 + n as u64);
        files.push(hdd.join(&base_name));
        files.push(hdd.join(&top_name));
        let top_file = if n == 2 {
            format!("/Users/someone/Parallels/Old VM.pvm/disk.hdd/{top_name}")
        } else {
            top_name
        };
        extents.push((a, b, base_name, kind, top_file));
    }
    fs::write(
        hdd.join("DiskDescriptor.xml"),
        descriptor(CUTS[3], &extents),
    )
    .unwrap();
    files.push(hdd.join("DiskDescriptor.xml"));
    files.push(hdd.join("disk.hdd"));
    Bundle {
        vm,
        hdd,
        files,
        _dir: dir,
    }
}

fn shas(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|f| sha256(f)).collect()
}

/// An ext4 disk of `CUTS[3]` sectors holding the sample tree.
fn source_disk(dir: &Path) -> Vec<u8> {
    let tree = dir.join("tree");
    sample_tree(&tree, TreeOpts::PLAIN);
    let img = dir.join("src.raw");
    fs_image("ext4", &tree, CUTS[3] * 512 / MIB, &img);
    let disk = fs::read(&img).unwrap();
    assert_eq!(disk.len() as u64, CUTS[3] * 512);
    disk
}

#[test]
fn split_bundle_in_a_vm_folder_serves_the_source_disk() {
    let src = tempfile::tempdir().unwrap();
    let disk = source_disk(src.path());
    let b = make_bundle(&disk);
    let before = shas(&b.files);

    for arg in [&b.vm, &b.hdd, &b.hdd.join("disk.hdd")] {
        let served = Served::start(s(arg));

        assert_same_bytes(
            &format!("served {}", arg.display()),
            &served.read_all(),
            &disk,
        );
    }
    assert_eq!(shas(&b.files), before, "image files changed");
}

#[test]
fn block_status_spans_the_extents() {
    let src = tempfile::tempdir().unwrap();
    // Data in the first and last MiB only: the qemu-made bases store no clusters between,
    // and the raw base of extent 1 is sparse there.
    let mut disk = vec![0u8; (CUTS[3] * 512) as usize];
    disk[..MIB as usize].copy_from_slice(&pseudo_random(MIB as usize, 1));
    let len = disk.len();
    disk[len - MIB as usize..].copy_from_slice(&pseudo_random(MIB as usize, 2));
    let b = make_bundle(&disk);
    let _ = src;

    let served = Served::start(s(&b.vm));
    let map = served.map();

    let covered: u64 = map.iter().map(|(_, l, _)| l).sum();
    assert_eq!(covered, CUTS[3] * 512, "{map:?}");
    for &(start, length, data) in &map {
        if !data {
            let (a, z) = (start as usize, (start + length) as usize);
            assert!(
                disk[a..z].iter().all(|&x| x == 0),
                "hole {a}..{z} over data"
            );
        }
    }
    // Extent 2 (sectors 16385..32000) lies wholly in the zero middle: its clusters that no
    // delta stores are holes, whatever its neighbours hold.
    assert!(
        map.iter()
            .any(|&(st, l, d)| !d && st < 32_000 * 512 && st + l > 16_385 * 512),
        "{map:?}"
    );
    assert_same_bytes("served", &served.read_all(), &disk);
}

#[test]
fn info_shows_every_file_and_says_where_an_absolute_file_was_found() {
    let src = tempfile::tempdir().unwrap();
    let disk = source_disk(src.path());
    let b = make_bundle(&disk);

    let json = run(["info", "--json", s(&b.vm)]);
    let verbose = run(["info", "-v", s(&b.vm)]);

    let info: serde_json::Value = serde_json::from_str(&ok_stdout(&json)).unwrap();
    let layers = info["chain"].as_array().unwrap_or_else(|| panic!("{info}"));
    assert_eq!(layers.len(), 6, "{info}");
    let formats: Vec<&str> = layers
        .iter()
        .map(|l| l["format"].as_str().unwrap())
        .collect();
    assert_eq!(
        formats,
        ["ploop", "raw", "ploop", "ploop", "ploop", "ploop"]
    );
    assert!(
        layers[5]["role"]
            .as_str()
            .unwrap()
            .contains("extent 3/3 (sectors 32000..49152)"),
        "{info}"
    );
    assert!(
        stderr(&verbose).contains("is an absolute path; using \"disk.hdd.2.{5fbaabe3-6958-40ff-92a7-860e329aab41}.hds\" inside the bundle folder"),
        "{}",
        stderr(&verbose)
    );
    assert_eq!(info["virtual_size"], CUTS[3] * 512, "{info}");
}

#[test]
fn vm_folder_with_two_bundles_is_refused_listing_them() {
    let src = tempfile::tempdir().unwrap();
    let disk = source_disk(src.path());
    let b = make_bundle(&disk);
    let second = b.vm.join("data.hdd");
    fs::create_dir(&second).unwrap();
    fs::copy(
        b.hdd.join("DiskDescriptor.xml"),
        second.join("DiskDescriptor.xml"),
    )
    .unwrap();

    let out = run(["info", s(&b.vm)]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("VM.pvm: unsupported: the folder holds 2 disk bundles (data.hdd, disk.hdd); name the one to open"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn encrypted_bundle_is_refused_by_name() {
    let src = tempfile::tempdir().unwrap();
    let disk = source_disk(src.path());
    let b = make_bundle(&disk);
    let xml = b.hdd.join("DiskDescriptor.xml");
    let text = fs::read_to_string(&xml).unwrap().replace(
        "<Engine>{00000000-0000-0000-0000-000000000000}</Engine>",
        "<Engine>{6c3c0f0a-b0c1-4d53-8d67-2a1e2f000001}</Engine>",
    );
    fs::write(&xml, text).unwrap();

    let out = run(["info", s(&b.hdd)]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unsupported: the disk is encrypted (Encryption/Engine \"{6c3c0f0a-b0c1-4d53-8d67-2a1e2f000001}\")"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ls_and_cat_read_the_split_bundle_through_the_appliance() {
    let src = tempfile::tempdir().unwrap();
    let disk = source_disk(src.path());
    let b = make_bundle(&disk);
    let before = shas(&b.files);

    let ls = run(["ls", s(&b.vm), "/etc"]);
    let cat = run(["cat", s(&b.vm), "/home/me/big.bin"]);

    let names = ok_stdout(&ls);
    assert!(
        names.contains("hostname\n") && names.contains("os-release\n"),
        "{names}"
    );
    assert!(cat.status.success(), "{}", stderr(&cat));
    assert!(cat.stdout == pseudo_random(3 << 20, 7), "big.bin differs");
    assert_eq!(shas(&b.files), before, "image files changed");
}
