//! Several disks as one guest (`--add IMAGE`): a root on the first image whose fstab
//! mounts a logical volume of a volume group spanning the second and third images,
//! built at test time by the test LVM writer (no block device, no root), checked by
//! `pvck` and for real by the guest's lvm. On the warm path, the cold path and q35.

mod support;

use std::fs;
use support::lvm::{lvm_spanning_disks, Lv};
use support::*;

/// The data file on the spanning LV: larger than one 4 MiB extent, so its bytes sit on
/// both disks.
const BIG: usize = 6 << 20;

/// The guest's three disks: root (ext4, whole disk), then the two PVs of `vgspan`.
struct Guest {
    root: Image,
    pv1: Image,
    pv2: Image,
    /// What the LV's filesystem holds.
    data: tempfile::TempDir,
}

impl Guest {
    fn args(&self) -> Vec<String> {
        vec![
            self.root.arg(),
            "--add".into(),
            self.pv1.arg(),
            "--add".into(),
            self.pv2.arg(),
        ]
    }

    fn assert_unchanged(&self) {
        self.root.assert_unchanged();
        self.pv1.assert_unchanged();
        self.pv2.assert_unchanged();
    }
}

fn guest() -> Guest {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    sample_tree(&root, TreeOpts::PLAIN);
    fs::create_dir_all(root.join("data")).unwrap();
    fs::write(
        root.join("etc/fstab"),
        "LABEL=rootfs / ext4 defaults 0 1\n/dev/vgspan/data /data ext4 defaults 0 2\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    fs::write(data.path().join("big.bin"), pseudo_random(BIG, 11)).unwrap();
    fs::write(data.path().join("note.txt"), b"on two disks\n").unwrap();
    let lv = t.path().join("lv.img");
    fs_image("ext4", data.path(), 12, &lv);
    let dirs = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let paths = dirs.each_ref().map(|d| d.path().join("disk.img"));
    must(
        tool("mke2fs", "e2fsprogs")
            .args(["-q", "-F", "-t", "ext4", "-L", "rootfs", "-d"])
            .arg(&root)
            .arg(&paths[0])
            .arg("16M"),
    );
    lvm_spanning_disks(
        "vgspan",
        &Lv {
            name: "data",
            image: &lv,
        },
        [&paths[1], &paths[2]],
    );
    let [d0, d1, d2] = dirs;
    let [p0, p1, p2] = paths;
    Guest {
        root: Image::new(d0, p0),
        pv1: Image::new(d1, p1),
        pv2: Image::new(d2, p2),
        data,
    }
}

fn with_args(cmd: &[&str], g: &Guest, rest: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    a.extend(g.args());
    a.extend(rest.iter().map(|s| s.to_string()));
    a
}

#[test]
fn spanning_writer_output_passes_pvck_on_each_disk() {
    let g = guest();

    for pv in [&g.pv1, &g.pv2] {
        let out = tool("pvck", "lvm2")
            .args(["--dump", "metadata"])
            .arg(&pv.path)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("segment_count = 2"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn filesystems_lists_every_disk_in_order_and_the_spanning_volume() {
    let g = guest();

    // A cold boot probes disks present at boot on two vCPUs, in any order, until the
    // agent puts them in order: run it a few times.
    let warm = run(with_args(&["filesystems", "--json"], &g, &[]));
    let cold: Vec<_> = (0..3)
        .map(|_| {
            imgsafe()
                .env("IMGSAFE_WARM", "0")
                .args(with_args(&["filesystems", "--json"], &g, &[]))
                .output()
                .unwrap()
        })
        .collect();

    let size = |i: &Image| fs::metadata(&i.path).unwrap().len();
    for out in std::iter::once(&warm).chain(&cold) {
        let doc: serde_json::Value = serde_json::from_str(&ok_stdout(out)).unwrap();
        let got: Vec<(&str, Option<&str>, u64)> = doc["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["device"].as_str().unwrap(),
                    f["type"].as_str(),
                    f["size"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("/dev/vda", Some("ext4"), size(&g.root)),
                ("/dev/vdb", Some("LVM2_member"), size(&g.pv1)),
                ("/dev/vdc", Some("LVM2_member"), size(&g.pv2)),
                ("/dev/vgspan/data", Some("ext4"), 12 << 20),
            ]
        );
    }
    g.assert_unchanged();
}

#[test]
fn fstab_mounts_the_volume_spanning_the_added_disks_warm_and_cold_and_on_q35() {
    let g = guest();
    let want = fs::read(g.data.path().join("big.bin")).unwrap();

    let warm = run(with_args(&["cat"], &g, &["/data/big.bin"]));
    let cold = imgsafe()
        .env("IMGSAFE_WARM", "0")
        .args(with_args(&["cat"], &g, &["/data/big.bin"]))
        .output()
        .unwrap();
    let q35 = imgsafe()
        .env("IMGSAFE_MACHINE", "q35")
        .args(with_args(&["cat"], &g, &["/data/note.txt"]))
        .output()
        .unwrap();

    for out in [&warm, &cold] {
        ok_stdout(out);
        assert!(out.stdout == want, "{}", stderr(out));
        assert!(!stderr(out).contains("warning"), "{}", stderr(out));
    }
    assert_eq!(ok_stdout(&q35), "on two disks\n");
    g.assert_unchanged();
}

#[test]
fn cp_takes_added_disks_between_its_sources_and_dest() {
    let g = guest();
    let dest = tempfile::tempdir().unwrap();
    let src = format!("{}:/data", g.root.arg());

    let out = run([
        "cp",
        &src,
        "--add",
        &g.pv1.arg(),
        "--add",
        &g.pv2.arg(),
        dest.path().to_str().unwrap(),
    ]);

    ok_stdout(&out);
    for name in ["big.bin", "note.txt"] {
        assert_eq!(
            fs::read(dest.path().join("data").join(name)).unwrap(),
            fs::read(g.data.path().join(name)).unwrap(),
            "{name}"
        );
    }
    g.assert_unchanged();
}

#[test]
fn shell_sees_the_disks_as_vda_vdb_vdc_in_the_order_given() {
    let g = guest();
    let script = "for d in vda vdb vdc; do echo $d $(cat /sys/block/$d/serial) $(cat /sys/block/$d/ro); done; ls /sysroot/data";

    let out = run(with_args(&["shell"], &g, &["-c", script]));

    assert_eq!(
        ok_stdout(&out),
        "vda imgsafe0 1\nvdb imgsafe1 1\nvdc imgsafe2 1\nbig.bin\nlost+found\nnote.txt\n"
    );
    g.assert_unchanged();
}

#[test]
fn a_missing_added_image_is_an_image_error_naming_it() {
    let g = guest();
    let missing = g.root.dir.path().join("no-such.img");

    let out = run(["ls", &g.root.arg(), "--add", missing.to_str().unwrap(), "/"]);

    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(missing.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn more_disks_than_root_ports_are_refused_before_booting() {
    let g = guest();
    let mut args = vec!["ls".to_string(), g.root.arg()];
    for _ in 0..8 {
        args.push("--add".into());
        args.push(g.pv1.arg());
    }

    let out = run(&args);

    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("at most 8"), "{}", stderr(&out));
}
