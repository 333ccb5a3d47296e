//! `imgsafe info` on raw, ploop and ploop chains, run as the real binary.

mod support;
use support::ploopwriter;

use ploopwriter::{write_ploop, write_two_delta_descriptor, Spec};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn imgsafe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgsafe"));
    cmd.args(args).env_remove("IMGSAFE_VZ_ROOT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn info_json(image: &str, extra: &[&str], env: &[(&str, &str)]) -> Value {
    let mut args = vec!["info", "--json", image];
    args.extend_from_slice(extra);
    let out = imgsafe(&args, env);
    assert!(
        out.status.success(),
        "info {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The sha256 of every file below `dir`: compared before and after `info` to prove it
/// wrote nothing (no image file changed, none added or removed).
fn hashes(dir: &Path) -> BTreeMap<PathBuf, String> {
    let files = support::walk(dir).into_iter().filter(|p| p.is_file());
    files
        .map(|p| {
            let sha = support::sha256(&p);
            (p, sha)
        })
        .collect()
}

/// A container directory `<root>/101/root.hdd` with a base and a top delta.
fn container(root: &Path) -> std::path::PathBuf {
    let hdd = root.join("101/root.hdd");
    std::fs::create_dir_all(&hdd).unwrap();
    let spec = Spec::v2(4 << 20);
    write_ploop(
        &hdd.join("root.hds"),
        &spec,
        &vec![1u8; 4 << 20],
        &[true, true, false, false],
        1,
    );
    write_ploop(
        &hdd.join("root.hds.top"),
        &spec,
        &vec![2u8; 4 << 20],
        &[false, true, true, false],
        2,
    );
    write_two_delta_descriptor(
        &hdd.join("DiskDescriptor.xml"),
        8192,
        2048,
        ("root.hds", "root.hds.top"),
        "Compressed",
    );
    hdd
}

#[test]
fn raw_image_json() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 65536], 0).unwrap();
    let before = hashes(dir.path());

    let v = info_json(raw.to_str().unwrap(), &[], &[]);

    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual_size"], 8u64 << 20);
    assert!(v["allocated_bytes"].as_u64().unwrap() >= 65536);
    assert!(
        v["allocated_bytes"].as_u64().unwrap() < 8 << 20,
        "sparse raw file reported fully allocated: {v}"
    );
    assert_eq!(v["chain"].as_array().unwrap().len(), 1);
    assert_eq!(v["chain"][0]["role"], "image");
    assert_eq!(v["chain"][0]["path"], raw.to_str().unwrap());
    assert_eq!(v["chain"][0]["allocated_bytes"], v["allocated_bytes"]);
    assert_eq!(hashes(dir.path()), before);
}

/// Regression: `info` turned a reader that went away (`imgsafe info IMG | head -c1`)
/// into exit 1, where every other command treats it as the end of its output.
#[test]
fn a_closed_reader_ends_info_quietly_a_full_disk_is_an_output_error() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();

    let closed = support::imgsafe()
        .args(["info", raw.to_str().unwrap()])
        .stdout(writer)
        .output()
        .unwrap();
    let no_space = support::imgsafe()
        .args(["info", "--json", raw.to_str().unwrap()])
        .stdout(full)
        .output()
        .unwrap();

    assert_eq!(support::code(&closed), 0, "{}", support::stderr(&closed));
    assert_eq!(support::stderr(&closed), "");
    assert_eq!(support::code(&no_space), 1);
    assert_eq!(
        support::stderr(&no_space),
        "imgsafe: writing output: No space left on device (os error 28)\n"
    );
}

#[test]
fn ploop_image_json_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.hds");
    let spec = Spec {
        v2: false,
        cluster_sectors: 512,
        size: 3 << 20,
        in_use: false,
    };
    let allocated: Vec<bool> = (0..12).map(|i| i % 3 == 0).collect();
    write_ploop(&img, &spec, &vec![9u8; 3 << 20], &allocated, 5);
    let before = hashes(dir.path());

    let v = info_json(img.to_str().unwrap(), &[], &[]);
    let text = imgsafe(&["info", img.to_str().unwrap()], &[]);

    assert_eq!(v["format"], "ploop");
    assert_eq!(v["version"], "v1");
    assert_eq!(v["virtual_size"], 3u64 << 20);
    assert_eq!(v["cluster_size"], 256u64 << 10);
    assert_eq!(v["allocated_bytes"], 4u64 * (256 << 10));
    assert_eq!(v["chain"][0]["allocated_bytes"], 4u64 * (256 << 10));
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("format:       ploop (v1)\n"), "{text}");
    assert!(
        text.contains("cluster size: 262144 bytes (256 KiB)\n"),
        "{text}"
    );
    assert!(
        text.contains("allocated:    1048576 bytes (1 MiB)\n"),
        "{text}"
    );
    assert_eq!(hashes(dir.path()), before);
}

#[test]
fn chain_json_through_xml_directory_and_container_id() {
    let root = tempfile::tempdir().unwrap();
    let hdd = container(root.path());
    let xml = hdd.join("DiskDescriptor.xml");
    let root_str = root.path().to_str().unwrap();
    let before = hashes(root.path());

    let by_xml = info_json(xml.to_str().unwrap(), &[], &[]);
    let by_dir = info_json(hdd.to_str().unwrap(), &[], &[]);
    let by_env = info_json("101", &[], &[("IMGSAFE_VZ_ROOT", root_str)]);
    let by_flag = info_json("101", &["--vz-root", root_str], &[]);

    assert_eq!(by_xml["format"], "ploop");
    assert_eq!(by_xml["descriptor"], xml.to_str().unwrap());
    assert_eq!(by_xml["virtual_size"], 4u64 << 20);
    assert_eq!(by_xml["allocated_bytes"], 3u64 << 20);
    let chain = by_xml["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0]["role"], "top");
    assert_eq!(chain[0]["path"], hdd.join("root.hds.top").to_str().unwrap());
    assert_eq!(chain[0]["allocated_bytes"], 2u64 << 20);
    assert_eq!(chain[1]["role"], "base");
    assert_eq!(chain[1]["version"], "v2");
    assert_eq!(by_dir, by_xml);
    assert_eq!(by_env, by_xml);
    assert_eq!(by_flag, by_xml);
    assert_eq!(hashes(root.path()), before);
}

fn assert_image_error(arg: &str, env: &[(&str, &str)], names: &str) {
    let out = imgsafe(&["info", arg], env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{arg}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{arg}: {stderr}");
    assert!(stderr.contains(names), "{arg}: {stderr}");
}

#[test]
fn missing_directory_and_empty_files_exit_3_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.hds");
    let empty = dir.path().join("empty.hds");
    std::fs::write(&empty, b"").unwrap();
    let d = dir.path().to_str().unwrap();
    let before = hashes(dir.path());

    assert_image_error(missing.to_str().unwrap(), &[], "nope.hds: No such file");
    assert_image_error(d, &[], &format!("{d}: is a directory"));
    assert_image_error(empty.to_str().unwrap(), &[], "empty.hds: empty file");
    assert_image_error(
        "4242",
        &[("IMGSAFE_VZ_ROOT", d)],
        "4242: no such file, and no container 4242 under",
    );
    assert_eq!(hashes(dir.path()), before);
}

#[test]
fn corrupt_chain_exits_3_naming_the_delta() {
    let root = tempfile::tempdir().unwrap();
    let hdd = container(root.path());
    std::fs::remove_file(hdd.join("root.hds")).unwrap();
    let before = hashes(root.path());

    assert_image_error(hdd.to_str().unwrap(), &[], "root.hds: delta file listed in");

    assert_eq!(hashes(root.path()), before);
}
