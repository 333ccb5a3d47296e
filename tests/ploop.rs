//! ploop images and DiskDescriptor.xml chains, read through `imgsafe::format::open` and
//! checked byte for byte against the raw source and against `qemu-img convert -f parallels`.
mod support;
use support::ploopwriter;

use imgsafe::format::{self, BlockSource, Extent, OpenOptions};
use ploopwriter::{
    guid, write_descriptor, write_ploop, write_two_delta_descriptor, DescImage, Rng, Spec,
    NONE_GUID, TOP_GUID,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

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

fn open(path: &Path) -> Box<dyn BlockSource> {
    format::open(path, &OpenOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn read_all(src: &dyn BlockSource) -> Vec<u8> {
    let mut buf = vec![0u8; src.size() as usize];
    // Odd-sized reads exercise requests that straddle clusters.
    let mut pos = 0;
    while pos < buf.len() {
        let n = (777 * 1024 + 512).min(buf.len() - pos);
        src.read_at(&mut buf[pos..pos + n], pos as u64).unwrap();
        pos += n;
    }
    buf
}

/// What qemu reads from a parallels file, as raw bytes.
fn qemu_read(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-out.raw");
    qemu_img(&[
        "convert",
        "-f",
        "parallels",
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// A disk with random data, some zero clusters and a partly-zero cluster.
fn random_disk(size: u64, seed: u64) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    Rng::new(seed).fill(&mut disk);
    let len = disk.len();
    disk[len / 4..len / 2].fill(0);
    disk
}

fn sha(paths: &[PathBuf]) -> Vec<[u8; 32]> {
    paths
        .iter()
        .map(|p| Sha256::digest(std::fs::read(p).unwrap()).into())
        .collect()
}

#[test]
fn qemu_made_images_read_like_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let disk = random_disk(6 << 20, 7);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &disk).unwrap();
    for cluster in ["1M", "256K", "64K"] {
        let img = dir.path().join(format!("q-{cluster}.hds"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "parallels",
            "-o",
            &format!("cluster_size={cluster}"),
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let before = sha(std::slice::from_ref(&img));

        let got = read_all(&*open(&img));

        assert!(
            got == disk,
            "cluster {cluster}: imgsafe differs from the source"
        );
        assert!(
            got == qemu_read(&img, dir.path()),
            "cluster {cluster}: imgsafe differs from qemu"
        );
        assert_eq!(sha(&[img]), before, "image bytes changed");
    }
}

#[test]
fn written_images_read_like_source_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, (v2, cluster_sectors, size)) in [
        (false, 63u32, 3_000_000u64 / 512 * 512),
        (true, 63, 2_000_384),
        (false, 512, 5 << 20),
        (true, 512, (5 << 20) + 4096),
        (true, 2048, 4 << 20),
        (false, 2048, 3 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = Spec {
            v2,
            cluster_sectors,
            size,
            in_use: false,
        };
        let disk = random_disk(size, n as u64 + 1);
        let allocated: Vec<bool> = (0..spec.clusters()).map(|i| i % 5 != 3).collect();
        let mut expect = disk.clone();
        for (i, a) in allocated.iter().enumerate() {
            if !a {
                let from = i * spec.cluster_size() as usize;
                let to = (from + spec.cluster_size() as usize).min(expect.len());
                expect[from..to].fill(0);
            }
        }
        let img = dir.path().join(format!("w{n}.hds"));
        write_ploop(&img, &spec, &disk, &allocated, 99 + n as u64);

        let src = open(&img);
        let got = read_all(&*src);

        let what = format!("v2={v2} cluster_sectors={cluster_sectors} size={size}");
        assert_eq!(src.size(), size, "{what}");
        assert!(got == expect, "{what}: imgsafe differs from the source");
        assert!(
            got == qemu_read(&img, dir.path()),
            "{what}: imgsafe differs from qemu"
        );
        let layer = &src.layers()[0];
        assert_eq!(layer.cluster_size, Some(spec.cluster_size()), "{what}");
        assert_eq!(
            layer.version.as_deref(),
            Some(if v2 { "v2" } else { "v1" }),
            "{what}"
        );
    }
}

/// A depth-3 chain with overlapping clusters, its expected contents and its files.
struct ChainFixture {
    dir: tempfile::TempDir,
    xml: PathBuf,
    expect: Vec<u8>,
    allocated_any: Vec<bool>,
    files: Vec<PathBuf>,
}

const CHAIN_CLUSTERS: u64 = 12;

fn chain_fixture() -> ChainFixture {
    let dir = tempfile::tempdir().unwrap();
    let hdd = dir.path().join("101").join("root.hdd");
    std::fs::create_dir_all(&hdd).unwrap();
    let spec = Spec {
        v2: true,
        cluster_sectors: 512,
        size: CHAIN_CLUSTERS * (256 << 10),
        in_use: false,
    };
    // base has clusters 0-5, mid 3-8, top 0, 4, 7, 9; clusters 10 and 11 are holes.
    let masks: [&[u64]; 3] = [&[0, 4, 7, 9], &[3, 4, 5, 6, 7, 8], &[0, 1, 2, 3, 4, 5]];
    let names = ["root.hds.top", "root.hds.mid", "root.hds"];
    let guids = [TOP_GUID.to_string(), guid(2), guid(1)];
    let mut expect = vec![0u8; spec.size as usize];
    let mut owner: Vec<Option<usize>> = vec![None; CHAIN_CLUSTERS as usize];
    let mut files = Vec::new();
    for (layer, mask) in masks.iter().enumerate() {
        let disk = random_disk(spec.size, 40 + layer as u64);
        let allocated: Vec<bool> = (0..CHAIN_CLUSTERS).map(|i| mask.contains(&i)).collect();
        let path = hdd.join(names[layer]);
        write_ploop(&path, &spec, &disk, &allocated, layer as u64 + 5);
        for &c in mask.iter() {
            if owner[c as usize].is_none() {
                owner[c as usize] = Some(layer);
                let r =
                    (c * spec.cluster_size()) as usize..((c + 1) * spec.cluster_size()) as usize;
                expect[r.clone()].copy_from_slice(&disk[r]);
            }
        }
        files.push(path);
    }
    let xml = hdd.join("DiskDescriptor.xml");
    let images: Vec<DescImage> = (0..3)
        .rev()
        .map(|i| DescImage {
            guid: &guids[i],
            file: names[i],
            kind: "Compressed",
        })
        .collect();
    write_descriptor(
        &xml,
        spec.size / 512,
        512,
        &images,
        &[
            (&guids[2], NONE_GUID),
            (&guids[1], &guids[2]),
            (&guids[0], &guids[1]),
        ],
        None,
    );
    files.push(xml.clone());
    ChainFixture {
        dir,
        xml,
        expect,
        allocated_any: owner.iter().map(Option::is_some).collect(),
        files,
    }
}

#[test]
fn depth_3_chain_reads_top_first() {
    let fx = chain_fixture();
    let before = sha(&fx.files);

    let src = open(&fx.xml);
    let got = read_all(&*src);

    assert!(
        got == fx.expect,
        "chain contents differ from the layered source"
    );
    let roles: Vec<String> = src.layers().iter().map(|l| l.role.clone()).collect();
    assert_eq!(roles, ["top", "delta", "base"]);
    assert_eq!(src.layers()[0].allocated_bytes, Some(4 * (256 << 10)));
    assert_eq!(sha(&fx.files), before, "image bytes changed");
}

#[test]
fn depth_3_chain_matches_qemu_backing_chain() {
    let fx = chain_fixture();
    let hdd = fx.xml.parent().unwrap();
    let file = |n: &str| {
        format!(
            r#"{{"driver":"file","filename":"{}"}}"#,
            hdd.join(n).display()
        )
    };
    let spec = format!(
        r#"json:{{"driver":"parallels","file":{},"backing":{{"driver":"parallels","file":{},"backing":{{"driver":"parallels","file":{}}}}}}}"#,
        file("root.hds.top"),
        file("root.hds.mid"),
        file("root.hds")
    );
    let out = fx.dir.path().join("chain.raw");

    qemu_img(&["convert", "-O", "raw", &spec, out.to_str().unwrap()]);

    assert!(
        std::fs::read(out).unwrap() == read_all(&*open(&fx.xml)),
        "imgsafe differs from qemu's backing chain"
    );
}

#[test]
fn chain_extents_report_holes_only_where_no_delta_has_data() {
    let fx = chain_fixture();
    let src = open(&fx.xml);
    let cs = 256u64 << 10;

    let ext = src.extents(0, src.size()).unwrap();

    let mut expect: Vec<Extent> = Vec::new();
    for (i, &a) in fx.allocated_any.iter().enumerate() {
        match expect.last_mut() {
            Some(l) if l.allocated == a => l.length += cs,
            _ => expect.push(Extent {
                offset: i as u64 * cs,
                length: cs,
                allocated: a,
            }),
        }
    }
    assert_eq!(ext, expect);
}

#[test]
fn chain_opens_through_directory_and_container_id() {
    let fx = chain_fixture();
    let hdd = fx.xml.parent().unwrap();

    let by_dir = imgsafe::image::resolve(hdd, Path::new("/nonexistent")).unwrap();
    let by_id = imgsafe::image::resolve(Path::new("101"), fx.dir.path()).unwrap();

    assert_eq!(by_dir, fx.xml);
    assert_eq!(by_id, fx.xml);
    assert!(read_all(&*open(&by_id)) == fx.expect);
}

#[test]
fn plain_base_under_ploop_delta() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::v2(4 << 20);
    let base = random_disk(spec.size, 3);
    std::fs::write(dir.path().join("root.hds"), &base).unwrap();
    let top = random_disk(spec.size, 4);
    write_ploop(
        &dir.path().join("root.hds.top"),
        &spec,
        &top,
        &[false, true, false, false],
        1,
    );
    let xml = dir.path().join("DiskDescriptor.xml");
    let files = ("root.hds", "root.hds.top");
    write_two_delta_descriptor(&xml, spec.size / 512, 2048, files, "Plain");

    let src = open(&xml);
    let got = read_all(&*src);

    let mut expect = base;
    expect[1 << 20..2 << 20].copy_from_slice(&top[1 << 20..2 << 20]);
    assert!(got == expect);
    assert_eq!(src.layers()[1].format, "raw");
}

/// Write a one-image descriptor around `root.hds` (already written) and return its path.
fn single_chain(dir: &Path, disk_sectors: u64, block_sectors: u32) -> PathBuf {
    let xml = dir.join("DiskDescriptor.xml");
    let g = guid(1);
    let images = [DescImage {
        guid: &g,
        file: "root.hds",
        kind: "Compressed",
    }];
    write_descriptor(
        &xml,
        disk_sectors,
        block_sectors,
        &images,
        &[(&g, NONE_GUID)],
        Some(&g),
    );
    xml
}

fn open_err(path: &Path) -> String {
    match format::open(path, &OpenOptions::default()) {
        Ok(_) => panic!("{} opened but should have been refused", path.display()),
        Err(e) => e.to_string(),
    }
}

fn small_image(path: &Path) -> Spec {
    let spec = Spec {
        v2: true,
        cluster_sectors: 8,
        size: 64 << 10,
        in_use: false,
    };
    let disk = random_disk(spec.size, 11);
    write_ploop(path, &spec, &disk, &vec![true; spec.clusters() as usize], 2);
    spec
}

#[test]
fn refuses_encrypted_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    small_image(&dir.path().join("root.hds"));
    let xml = single_chain(dir.path(), 128, 8);
    let text = std::fs::read_to_string(&xml).unwrap().replace(
        "<Padding>0</Padding>",
        "<Padding>0</Padding><Encryption><Engine>2</Engine></Encryption>",
    );
    std::fs::write(&xml, text).unwrap();

    let err = open_err(&xml);

    assert!(
        err.starts_with(&format!(
            "{}: unsupported: the disk is encrypted",
            xml.display()
        )),
        "{err}"
    );
}

#[test]
fn refuses_cycle_missing_delta_and_unlisted_guid() {
    let dir = tempfile::tempdir().unwrap();
    small_image(&dir.path().join("root.hds"));
    let xml = dir.path().join("DiskDescriptor.xml");
    let (a, b, c) = (guid(1), guid(2), guid(3));
    let two = [
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

    write_descriptor(&xml, 128, 8, &two, &[(&a, &b), (&b, &a)], Some(&a));
    let cycle = open_err(&xml);
    write_descriptor(&xml, 128, 8, &two, &[(&a, &c), (&b, NONE_GUID)], Some(&a));
    let unlisted = open_err(&xml);
    let missing = [DescImage {
        guid: &a,
        file: "root.hds.gone",
        kind: "Compressed",
    }];
    write_descriptor(&xml, 128, 8, &missing, &[(&a, NONE_GUID)], Some(&a));
    let gone = open_err(&xml);

    assert!(
        cycle.contains("DiskDescriptor.xml: cycle in the snapshot chain"),
        "{cycle}"
    );
    assert!(
        unlisted.contains(&format!(
            "DiskDescriptor.xml: GUID {c} is referenced but not listed"
        )),
        "{unlisted}"
    );
    assert!(
        gone.contains("root.hds.gone: delta file listed in") && gone.contains("does not exist"),
        "{gone}"
    );
}

#[test]
fn refuses_size_and_cluster_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    small_image(&dir.path().join("root.hds"));

    let size = open_err(&single_chain(dir.path(), 256, 8));
    let cluster = open_err(&single_chain(dir.path(), 128, 16));

    assert!(
        size.contains("root.hds: disk size 65536 bytes disagrees with DiskDescriptor.xml Disk_size (131072 bytes)"),
        "{size}"
    );
    assert!(
        cluster.contains("root.hds: cluster size 4096 bytes disagrees with the chain's 8192 bytes"),
        "{cluster}"
    );
}

#[test]
fn refuses_delta_cluster_size_disagreeing_with_other_deltas() {
    let dir = tempfile::tempdir().unwrap();
    small_image(&dir.path().join("root.hds"));
    let spec = Spec {
        v2: true,
        cluster_sectors: 16,
        size: 64 << 10,
        in_use: false,
    };
    write_ploop(
        &dir.path().join("top.hds"),
        &spec,
        &vec![1u8; spec.size as usize],
        &[true; 8],
        1,
    );
    let xml = dir.path().join("DiskDescriptor.xml");
    // No Blocksize check can catch it here: the descriptor matches the top delta.
    write_two_delta_descriptor(&xml, 128, 16, ("root.hds", "top.hds"), "Compressed");

    let err = open_err(&xml);

    assert!(
        err.contains("root.hds: cluster size 4096 bytes disagrees with the chain's 8192 bytes"),
        "{err}"
    );
}

#[test]
fn refuses_chain_deeper_than_64() {
    let dir = tempfile::tempdir().unwrap();
    small_image(&dir.path().join("root.hds"));
    let guids: Vec<String> = (0..66).map(guid).collect();
    let images: Vec<DescImage> = guids
        .iter()
        .map(|g| DescImage {
            guid: g,
            file: "root.hds",
            kind: "Compressed",
        })
        .collect();
    let shots: Vec<(&str, &str)> = (0..66)
        .map(|i| {
            (
                guids[i].as_str(),
                if i == 0 {
                    NONE_GUID
                } else {
                    guids[i - 1].as_str()
                },
            )
        })
        .collect();
    let xml = dir.path().join("DiskDescriptor.xml");
    write_descriptor(&xml, 128, 8, &images, &shots, Some(&guids[65]));

    let err = open_err(&xml);

    assert!(
        err.contains("DiskDescriptor.xml: snapshot chain is deeper than 64 deltas"),
        "{err}"
    );
}

/// Patch bytes of a valid small image and return the open error.
fn corrupt(at: usize, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.hds");
    small_image(&img);
    let mut data = std::fs::read(&img).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(&img, data).unwrap();
    open_err(&img)
}

#[test]
fn corrupt_headers_and_bats_are_refused_with_the_field_named() {
    let cases: [(usize, Vec<u8>, &str); 5] = [
        (
            64 + 4 * 5,
            4096u32.to_le_bytes().to_vec(),
            "root.hds: BAT entry 5 points past the end of the file",
        ),
        (
            28,
            0u32.to_le_bytes().to_vec(),
            "root.hds: cluster size m_Sectors=0 sectors is out of range",
        ),
        (
            28,
            200_000u32.to_le_bytes().to_vec(),
            "root.hds: cluster size m_Sectors=200000 sectors is out of range",
        ),
        (
            32,
            3u32.to_le_bytes().to_vec(),
            "root.hds: BAT size m_Size=3 is too small",
        ),
        (
            16,
            1u32.to_le_bytes().to_vec(),
            "root.hds: unsupported header version 1 (m_Type)",
        ),
    ];
    for (at, bytes, want) in &cases {
        let err = corrupt(*at, bytes);

        assert!(
            err.contains(want),
            "patch at {at}: got {err:?}, want {want:?}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}

#[test]
fn bat_entry_pointing_into_the_bat_is_refused() {
    // v1 entries count sectors: sector 0 is "unallocated", so use a BAT that spans sectors.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.hds");
    let spec = Spec {
        v2: false,
        cluster_sectors: 1,
        size: 300 * 512,
        in_use: false,
    };
    write_ploop(
        &img,
        &spec,
        &vec![5u8; spec.size as usize],
        &vec![true; 300],
        3,
    );
    let mut data = std::fs::read(&img).unwrap();
    data[64 + 4 * 7..64 + 4 * 8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&img, data).unwrap();

    let err = open_err(&img);

    assert!(
        err.contains("root.hds: BAT entry 7 points into the header or BAT"),
        "{err}"
    );
}

#[test]
fn huge_bat_claims_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.hds");
    let mut data = vec![0u8; 64];
    data[..16].copy_from_slice(b"WithouFreSpacExt");
    data[16..20].copy_from_slice(&2u32.to_le_bytes());
    data[28..32].copy_from_slice(&1u32.to_le_bytes());
    data[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    data[36..44].copy_from_slice(&u64::from(u32::MAX).to_le_bytes());
    std::fs::write(&img, data).unwrap();

    let err = open_err(&img);

    assert!(
        err.contains("root.hds: disk needs 4294967295 BAT entries, more than"),
        "{err}"
    );
}

#[test]
fn in_use_image_reads_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.hds");
    let spec = Spec {
        in_use: true,
        ..Spec::v2(2 << 20)
    };
    let disk = random_disk(spec.size, 8);
    write_ploop(&img, &spec, &disk, &[true, true], 4);

    let out = Command::new(env!("CARGO_BIN_EXE_imgsafe"))
        .args(["info", img.to_str().unwrap()])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("root.hds: image is marked in use (m_DiskInUse)"),
        "{stderr}"
    );
    assert!(read_all(&*open(&img)) == disk);
}

#[test]
fn refuses_one_file_listed_twice_in_a_chain() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_image(&dir.path().join("root.hds"));
    let xml = dir.path().join("DiskDescriptor.xml");
    write_two_delta_descriptor(
        &xml,
        spec.size / 512,
        spec.cluster_sectors,
        ("root.hds", "root.hds"),
        "Compressed",
    );

    let err = open_err(&xml);

    assert!(
        err.contains("root.hds: listed twice in the chain of"),
        "{err}"
    );
}
