//! ls, cat and cp through the appliance on every container format: ploop (qemu-made
//! and a two-delta DiskDescriptor.xml chain) and VHD (qemu-made dynamic, and a
//! differencing disk over it), VDI and VHDX (a qemu-made dynamic parent and a
//! differencing image over it), and VMDK (a qemu-made stream-optimized parent, a delta
//! over it written by qemu-io, and the parent inside an OVA). The chains hold a change the base does not have, so a
//! reader that ignores the top layer fails.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use support::*;

/// A raw ext4 disk `a.img` with the sample tree, and `b.img`: the same disk after
/// `debugfs` wrote /etc/added-later into it (no mount, no root).
struct Pair {
    dir: tempfile::TempDir,
    src: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

fn pair() -> Pair {
    let src = tempfile::tempdir().unwrap();
    sample_tree(
        src.path(),
        TreeOpts {
            odd_names: false,
            links: true,
            sparse: false,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    fs_image("ext4", src.path(), 24, &a);
    let b = dir.path().join("b.img");
    fs::copy(&a, &b).unwrap();
    let note = dir.path().join("note");
    fs::write(&note, b"written after the snapshot\n").unwrap();
    must(
        tool("debugfs", "e2fsprogs")
            .args([
                "-w",
                "-R",
                &format!("write {} /etc/added-later", note.display()),
            ])
            .arg(&b),
    );
    Pair { dir, src, a, b }
}

fn check_reads(image: &str, p: &Pair, with_change: bool) {
    let ls = run(["ls", image, "/etc"]);
    let cat = run(["cat", image, "/home/me/big.bin"]);
    let out = tempfile::tempdir().unwrap();
    let cp = run([
        "cp",
        &format!("{image}:/home/me/letter"),
        out.path().to_str().unwrap(),
    ]);

    let names = ok_stdout(&ls);
    assert_eq!(names.contains("added-later\n"), with_change, "{names}");
    assert!(names.contains("hostname\n"));
    assert!(
        cat.stdout == fs::read(p.src.path().join("home/me/big.bin")).unwrap(),
        "{}",
        stderr(&cat)
    );
    assert_eq!(code(&cp), 0, "{}", stderr(&cp));
    assert_eq!(
        fs::read(out.path().join("letter")).unwrap(),
        b"Dear imgsafe,\nplease copy me.\n"
    );
}

fn sha_all(paths: &[&Path]) -> Vec<String> {
    paths.iter().map(|p| sha256(p)).collect()
}

#[test]
fn ploop_made_by_qemu_img() {
    let p = pair();
    let hds = p.dir.path().join("root.hds");
    must(
        tool("qemu-img", "qemu-utils")
            .args(["convert", "-f", "raw", "-O", "parallels"])
            .arg(&p.b)
            .arg(&hds),
    );
    let before = sha_all(&[&hds]);

    check_reads(hds.to_str().unwrap(), &p, true);

    assert_eq!(sha_all(&[&hds]), before);
}

#[test]
fn ploop_snapshot_chain_through_disk_descriptor() {
    let p = pair();
    let a = fs::read(&p.a).unwrap();
    let b = fs::read(&p.b).unwrap();
    let spec = ploopwriter::Spec::v2(a.len() as u64);
    let cs = spec.cluster_size() as usize;
    let clusters = spec.clusters() as usize;
    let base_alloc: Vec<bool> = (0..clusters)
        .map(|i| {
            a[i * cs..((i + 1) * cs).min(a.len())]
                .iter()
                .any(|&x| x != 0)
        })
        .collect();
    let changed: Vec<bool> = (0..clusters)
        .map(|i| a[i * cs..((i + 1) * cs).min(a.len())] != b[i * cs..((i + 1) * cs).min(b.len())])
        .collect();
    assert!(changed.iter().any(|&c| c), "debugfs changed nothing");
    let hdd = p.dir.path().join("root.hdd");
    fs::create_dir(&hdd).unwrap();
    ploopwriter::write_ploop(&hdd.join("root.hds"), &spec, &a, &base_alloc, 1);
    ploopwriter::write_ploop(&hdd.join("root.hds.top"), &spec, &b, &changed, 2);
    ploopwriter::write_two_delta_descriptor(
        &hdd.join("DiskDescriptor.xml"),
        a.len() as u64 / 512,
        2048,
        ("root.hds", "root.hds.top"),
        "Compressed",
    );
    let files: Vec<PathBuf> = ["root.hds", "root.hds.top", "DiskDescriptor.xml"]
        .iter()
        .map(|f| hdd.join(f))
        .collect();
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let before = sha_all(&refs);

    check_reads(hdd.to_str().unwrap(), &p, true);

    assert_eq!(sha_all(&refs), before);
}

#[test]
fn vhd_dynamic_made_by_qemu_img() {
    let p = pair();
    let vhd = p.dir.path().join("disk.vhd");
    must(
        tool("qemu-img", "qemu-utils")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic",
            ])
            .arg(&p.a)
            .arg(&vhd),
    );
    let before = sha_all(&[&vhd]);

    check_reads(vhd.to_str().unwrap(), &p, false);

    assert_eq!(sha_all(&[&vhd]), before);
}

#[test]
fn vhd_differencing_over_a_dynamic_parent() {
    let p = pair();
    let parent = p.dir.path().join("parent.vhd");
    // force_size keeps the virtual size exact, so the child's sectors line up with b.img.
    must(
        tool("qemu-img", "qemu-utils")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic,force_size=on",
            ])
            .arg(&p.a)
            .arg(&parent),
    );
    let a = fs::read(&p.a).unwrap();
    let b = fs::read(&p.b).unwrap();
    let info = vhdwriter::parent_info(&parent).unwrap();
    assert_eq!(info.current_size, a.len() as u64);
    let mut child = vhdwriter::VhdImage::differencing(info, 2 << 20);
    child.parent_name = "parent.vhd".into();
    child.locators = vec![
        vhdwriter::w2ru(".\\parent.vhd"),
        vhdwriter::w2ku(parent.to_str().unwrap()),
    ];
    for (i, (sa, sb)) in a.chunks(512).zip(b.chunks(512)).enumerate() {
        if sa != sb {
            child.write_sectors(i as u64 * 512, sb);
        }
    }
    let vhd = p.dir.path().join("child.vhd");
    child.write(&vhd).unwrap();
    let before = sha_all(&[&vhd, &parent]);

    check_reads(vhd.to_str().unwrap(), &p, true);
    let info = run(["info", "--json", vhd.to_str().unwrap()]);

    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&info)).unwrap();
    let chain = doc["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{doc}");
    assert_eq!(chain[0]["version"], "differencing");
    assert_eq!(sha_all(&[&vhd, &parent]), before);
}

#[test]
fn vdi_differencing_over_a_dynamic_parent() {
    let p = pair();
    let parent = p.dir.path().join("parent.vdi");
    let child = p.dir.path().join("child.vdi");
    let overlay = p.dir.path().join("overlay.raw");
    let a = fs::read(&p.a).unwrap();
    let b = fs::read(&p.b).unwrap();
    fs::write(&overlay, vdidiff::overlay(&a, &b)).unwrap();
    for (src, dst) in [(&p.a, &parent), (&overlay, &child)] {
        must(
            tool("qemu-img", "qemu-utils")
                .args(["convert", "-f", "raw", "-O", "vdi"])
                .arg(src)
                .arg(dst),
        );
    }
    vdidiff::link_to_parent(&child, &parent);
    let before = sha_all(&[&child, &parent]);

    check_reads(parent.to_str().unwrap(), &p, false);
    check_reads(child.to_str().unwrap(), &p, true);

    assert_eq!(sha_all(&[&child, &parent]), before);
}

#[test]
fn vhdx_differencing_over_a_dynamic_parent() {
    let p = pair();
    let parent = p.dir.path().join("parent.vhdx");
    let child = p.dir.path().join("child.vhdx");
    let overlay = p.dir.path().join("overlay.raw");
    let a = fs::read(&p.a).unwrap();
    let b = fs::read(&p.b).unwrap();
    // 1 MiB blocks for both, so the overlay's changed blocks are the child's blocks.
    fs::write(&overlay, vdidiff::overlay(&a, &b)).unwrap();
    for (src, dst, opts) in [
        (&p.a, &parent, "subformat=dynamic,block_size=1M"),
        (
            &overlay,
            &child,
            "subformat=dynamic,block_size=1M,block_state_zero=off",
        ),
    ] {
        must(
            tool("qemu-img", "qemu-utils")
                .args(["convert", "-f", "raw", "-O", "vhdx", "-o", opts])
                .arg(src)
                .arg(dst),
        );
    }
    vhdxdiff::make_differencing(
        &child,
        &vhdxdiff::Diff {
            locator: vec![
                ("parent_linkage", vhdxdiff::data_write_guid(&parent)),
                ("relative_path", ".\\parent.vhdx".to_string()),
            ],
            partial: vec![],
        },
    );
    let before = sha_all(&[&child, &parent]);

    check_reads(parent.to_str().unwrap(), &p, false);
    check_reads(child.to_str().unwrap(), &p, true);

    assert_eq!(sha_all(&[&child, &parent]), before);
}

#[test]
fn vmdk_delta_over_a_stream_optimized_parent() {
    let p = pair();
    let parent = p.dir.path().join("parent.vmdk");
    let child = p.dir.path().join("child.vmdk");
    must(
        tool("qemu-img", "qemu-utils")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
            ])
            .arg(&p.a)
            .arg(&parent),
    );
    must(
        tool("qemu-img", "qemu-utils")
            .args([
                "create",
                "-q",
                "-f",
                "vmdk",
                "-b",
                "parent.vmdk",
                "-F",
                "vmdk",
            ])
            .arg(&child),
    );
    // qemu-io writes the 64 KiB grains that debugfs changed into the delta.
    let a = fs::read(&p.a).unwrap();
    let b = fs::read(&p.b).unwrap();
    let mut io = tool("qemu-io", "qemu-utils");
    io.args(["-f", "vmdk"]);
    for (i, (ga, gb)) in a.chunks(65536).zip(b.chunks(65536)).enumerate() {
        if ga != gb {
            let piece = p.dir.path().join(format!("grain{i}"));
            fs::write(&piece, gb).unwrap();
            io.arg("-c").arg(format!(
                "write -s {} {} {}",
                piece.display(),
                i * 65536,
                gb.len()
            ));
        }
    }
    must(io.arg(&child));
    // The stream-optimized parent also goes into an OVA, read in place.
    fs::write(
        p.dir.path().join("vm.ovf"),
        "<?xml version=\"1.0\"?>\n<Envelope/>\n",
    )
    .unwrap();
    must(tool("tar", "tar").current_dir(p.dir.path()).args([
        "-cf",
        "vm.ova",
        "vm.ovf",
        "parent.vmdk",
    ]));
    let ova = p.dir.path().join("vm.ova");
    let before = sha_all(&[&child, &parent, &ova]);

    check_reads(parent.to_str().unwrap(), &p, false);
    check_reads(child.to_str().unwrap(), &p, true);
    check_reads(ova.to_str().unwrap(), &p, false);

    assert_eq!(sha_all(&[&child, &parent, &ova]), before);
}
