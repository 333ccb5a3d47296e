//! The appliance's initramfs: its completeness marker comes last, and the guest
//! unpacks all of it (a guest with too little memory silently loses the archive's tail).

mod support;

use support::*;

#[test]
fn the_initramfs_ends_with_its_marker_and_the_guest_unpacks_all_of_it() {
    let out = imgsafe().args(["appliance", "--json"]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    let initrd = doc["initrd"].as_str().unwrap().to_string();
    let listing = tool("cpio", "cpio")
        .arg("-t")
        .stdin(std::fs::File::open(&initrd).unwrap())
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert_eq!(
        names.lines().last(),
        Some("etc/imgsafe/complete"),
        "{names}"
    );

    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let shell = imgsafe()
        .args(["shell", blank.to_str().unwrap(), "-c"])
        .arg("ls /etc/imgsafe/complete /etc/imgsafe/fs/crypt /etc/imgsafe/fs/md")
        .output()
        .unwrap();

    let seen = ok_stdout(&shell);
    assert!(seen.contains("/etc/imgsafe/complete"), "{seen}");
    assert!(seen.contains("/etc/imgsafe/fs/crypt"), "{seen}");
}
