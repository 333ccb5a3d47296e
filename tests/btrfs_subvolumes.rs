//! btrfs roots kept in subvolumes, as Fedora (`root`, `home`) and Ubuntu (`@`, `@home`)
//! install them: images made rootless by `mkfs.btrfs --rootdir DIR --subvol ...`
//! (btrfs-progs 6.13 or newer), with an fstab naming the subvolumes.

mod support;

use std::fs;
use support::*;

const UUID: &str = "5a8c3c7e-1f2b-4d6a-9e0f-112233445566";

/// A btrfs image of `tree` in which each of `subvols` (directories of `tree`) is a
/// subvolume; `default` becomes the default subvolume when given.
fn btrfs_with_subvolumes(tree: &std::path::Path, subvols: &[&str], default: Option<&str>) -> Image {
    let help = tool("mkfs.btrfs", "btrfs-progs")
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--subvol")
            || String::from_utf8_lossy(&help.stderr).contains("--subvol"),
        "mkfs.btrfs has no --subvol: install btrfs-progs 6.13 or newer (Debian 12: from bookworm-backports)"
    );
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    fs::File::create(&img).unwrap().set_len(160 << 20).unwrap();
    let mut c = tool("mkfs.btrfs", "btrfs-progs");
    c.args(["-q", "-f", "-L", "fedora", "-U", UUID, "--rootdir"])
        .arg(tree);
    for s in subvols {
        let kind = if Some(*s) == default { "default" } else { "rw" };
        c.args(["--subvol", &format!("{kind}:{s}")]);
    }
    must(c.arg(&img));
    Image::new(dir, img)
}

fn write(root: &std::path::Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// `root/` and `home/` (or `@` and `@home`) trees with an fstab naming them.
fn layout(root_name: &str, home_name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let fstab = format!(
        "UUID={UUID} / btrfs subvol={root_name},compress=zstd:1 0 0\n\
         UUID={UUID} /home btrfs subvol=/{home_name},compress=zstd:1 0 0\n"
    );
    write(
        t.path(),
        &format!("{root_name}/etc/fstab"),
        fstab.as_bytes(),
    );
    write(
        t.path(),
        &format!("{root_name}/etc/os-release"),
        b"ID=fedora\nVERSION_ID=41\n",
    );
    fs::create_dir_all(t.path().join(root_name).join("home")).unwrap();
    write(
        t.path(),
        &format!("{home_name}/me/letter"),
        b"Dear imgsafe,\n",
    );
    write(
        t.path(),
        &format!("{home_name}/me/big.bin"),
        &pseudo_random(1 << 20, 3),
    );
    t
}

#[test]
fn fedora_root_and_home_subvolumes_are_assembled_from_fstab() {
    let tree = layout("root", "home");
    let img = btrfs_with_subvolumes(tree.path(), &["root", "home"], None);
    let out = tempfile::tempdir().unwrap();

    let fsl = run(["filesystems", "--json", &img.arg()]);
    let ls = run(["ls", &img.arg(), "/etc"]);
    let cat = run(["cat", &img.arg(), "/home/me/letter"]);
    let cp = run([
        "cp",
        &format!("{}:/home/me", img.arg()),
        out.path().to_str().unwrap(),
    ]);

    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&fsl)).unwrap();
    let fs0 = &doc["filesystems"][0];
    let paths: Vec<&str> = fs0["subvolumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["root", "home"], "{doc}");
    assert_eq!(fs0["default_subvolume"], 5);
    assert_eq!(fs0["root"], true, "{doc}");
    assert_eq!(ok_stdout(&ls), "fstab\nos-release\n");
    assert_eq!(ok_stdout(&cat), "Dear imgsafe,\n");
    assert_eq!(ok_stdout(&cp), "");
    assert_same_tree(&tree.path().join("home/me"), &out.path().join("me"));
    img.assert_unchanged();
}

#[test]
fn ubuntu_at_subvolumes_and_m_dev_at_subvol() {
    let tree = layout("@", "@home");
    let img = btrfs_with_subvolumes(tree.path(), &["@", "@home"], None);

    let ls = run(["ls", &img.arg(), "/home/me"]);
    let by_hand = run(["ls", "-m", "/dev/vda@@home", &img.arg(), "/me"]);
    let nested = run([
        "ls",
        "-m",
        "/dev/vda@@",
        "-m",
        "/dev/vda@@home:/home",
        &img.arg(),
        "/home",
    ]);
    let missing = run(["ls", "-m", "/dev/vda@nope", &img.arg(), "/"]);

    assert_eq!(ok_stdout(&ls), "big.bin\nletter\n");
    assert_eq!(ok_stdout(&by_hand), "big.bin\nletter\n");
    assert_eq!(ok_stdout(&nested), "me\n");
    assert_eq!(code(&missing), 5, "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("no btrfs subvolume nope"),
        "{}",
        stderr(&missing)
    );
    img.assert_unchanged();
}

#[test]
fn a_default_subvolume_root_is_found_as_before() {
    let tree = layout("@", "@home");
    let img = btrfs_with_subvolumes(tree.path(), &["@", "@home"], Some("@"));

    let cat = run(["cat", &img.arg(), "/etc/os-release"]);
    let home = run(["ls", &img.arg(), "/home/me"]);

    assert_eq!(ok_stdout(&cat), "ID=fedora\nVERSION_ID=41\n");
    assert_eq!(ok_stdout(&home), "big.bin\nletter\n");
    img.assert_unchanged();
}

/// Regression for the path of a nested subvolume: the kernel gives each subvolume's
/// place inside its parent (`1/` of `@/.snapshots`), which must be joined up to the
/// top level.
#[test]
fn a_root_in_a_nested_snapper_snapshot_is_found_and_named_by_its_full_path() {
    let t = tempfile::tempdir().unwrap();
    let snap = "@/.snapshots/1/snapshot";
    write(
        t.path(),
        &format!("{snap}/etc/os-release"),
        b"ID=opensuse-tumbleweed\n",
    );
    write(t.path(), "@/readme", b"not a root\n");
    let img = btrfs_with_subvolumes(t.path(), &["@", "@/.snapshots", snap], None);

    let found = run(["cat", &img.arg(), "/etc/os-release"]);
    let by_hand = run(["ls", "-m", &format!("/dev/vda@{snap}"), &img.arg(), "/etc"]);
    let top = run(["ls", "-m", "/dev/vda@/", &img.arg(), "/"]);

    assert_eq!(ok_stdout(&found), "ID=opensuse-tumbleweed\n");
    assert_eq!(ok_stdout(&by_hand), "os-release\n");
    assert_eq!(ok_stdout(&top), "@\n");
    img.assert_unchanged();
}
