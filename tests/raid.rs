//! MD RAID members on several images, assembled read-only by the guest's mdadm.
//!
//! The arrays are made at test time without root or a host md driver: blank member
//! files are attached to the appliance with `shell --overlay`, the guest's own mdadm
//! creates the array on them and copies an ext4 image (made by mke2fs -d) into it, and
//! the members' bytes come back on the shell's stdout. `mdadm --examine` and `blkid -p`
//! then check the member files on the host before imgsafe reads them.

mod support;

use std::fs;
use std::path::Path;
use support::*;

/// An array made at test time: its members (each an image file) and the tree inside.
struct Array {
    members: Vec<Image>,
    tree: tempfile::TempDir,
}

impl Array {
    /// `IMAGE --add IMAGE ...` for the members at `which` (indexes into `members`).
    fn args(&self, which: &[usize]) -> Vec<String> {
        let mut a = Vec::new();
        for (n, &i) in which.iter().enumerate() {
            if n > 0 {
                a.push("--add".to_string());
            }
            a.push(self.members[i].arg());
        }
        a
    }

    fn assert_unchanged(&self) {
        for m in &self.members {
            m.assert_unchanged();
        }
    }
}

/// Make a RAID `level` array named `name` with `metadata` over `count` members of
/// `member_mib` MiB each, holding an ext4 filesystem of the sample tree plus a 6 MiB
/// file (larger than a stripe, so it spans every member).
fn array(level: u32, metadata: &str, count: usize, member_mib: u64, name: &str) -> Array {
    let tree = tempfile::tempdir().unwrap();
    sample_tree(tree.path(), TreeOpts::PLAIN);
    fs::write(tree.path().join("spread.bin"), pseudo_random(6 << 20, 5)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let fsimg = work.path().join("fs.img");
    fs_image("ext4", tree.path(), 16, &fsimg);
    let blanks: Vec<_> = (0..count)
        .map(|i| {
            let p = work.path().join(format!("blank{i}"));
            fs::File::create(&p)
                .unwrap()
                .set_len(member_mib << 20)
                .unwrap();
            p
        })
        .collect();
    let devs: Vec<String> = (0..count)
        .map(|i| format!("/dev/vd{}", (b'a' + i as u8) as char))
        .collect();
    let fs_dev = format!("/dev/vd{}", (b'a' + count as u8) as char);
    let chunk = if level == 1 { "" } else { "--chunk=64" };
    // The guest kernel may still hold a disk for its partition scan (mdadm then says
    // "Device or resource busy"): the create is tried a few times.
    let script = format!(
        "set -e; for m in $(cat /etc/imgsafe/fs/md /etc/imgsafe/fs/md_parity); do insmod $m 2>/dev/null || :; done; made=0; \
         for try in 1 2 3 4 5; do if mdadm --create /dev/md/{name} --run --assume-clean \
         --homehost=any --level={level} --metadata={metadata} {chunk} --raid-devices={count} \
         {} >&2; then made=1; break; fi; sleep 1; done; [ $made = 1 ]; \
         dd if={fs_dev} of=/dev/md/{name} bs=1M 2>/dev/null; sync; \
         mdadm --stop /dev/md/{name} >&2; cat {}",
        devs.join(" "),
        devs.join(" ")
    );
    let mut cmd = imgsafe();
    cmd.args(["shell", "--overlay"]).arg(&blanks[0]);
    for b in &blanks[1..] {
        cmd.arg("--add").arg(b);
    }
    cmd.arg("--add").arg(&fsimg).arg("-c").arg(&script);
    let out = cmd.output().unwrap();
    ok_stdout(&out);
    let size = usize::try_from(member_mib << 20).unwrap();
    assert_eq!(out.stdout.len(), size * count, "{}", stderr(&out));
    let members = out
        .stdout
        .chunks(size)
        .map(|bytes| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("member.img");
            fs::write(&p, bytes).unwrap();
            Image::new(dir, p)
        })
        .collect();
    Array { members, tree }
}

/// `mdadm --examine` and `blkid -p` on a member file: its level and that it is a member.
fn assert_member(path: &Path, level: u32, metadata: &str) {
    let out = tool("mdadm", "mdadm")
        .arg("--examine")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains(&format!("Raid Level : raid{level}"))
            && text.contains(&format!("Version : {metadata}")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tool("blkid", "util-linux")
        .args(["-p", "-s", "TYPE", "-o", "value"])
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "linux_raid_member\n");
}

/// (device, type, label) of every entry of `filesystems --json`.
fn listing(args: &[String]) -> Vec<(String, Option<String>, Option<String>)> {
    let mut a = vec!["filesystems".to_string(), "--json".to_string()];
    a.extend(args.iter().cloned());
    let out = run(&a);
    let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&out)).unwrap();
    doc["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["device"].as_str().unwrap().to_string(),
                f["type"].as_str().map(String::from),
                f["label"].as_str().map(String::from),
            )
        })
        .collect()
}

fn cat(args: &[String], path: &str) -> Vec<u8> {
    let mut a = vec!["cat".to_string()];
    a.extend(args.iter().cloned());
    a.push(path.to_string());
    let out = run(&a);
    ok_stdout(&out);
    out.stdout
}

fn member(label: &str) -> (String, Option<String>, Option<String>) {
    (
        String::new(),
        Some("linux_raid_member".into()),
        Some(label.into()),
    )
}

#[test]
fn raid1_is_assembled_read_only_listed_with_its_members_and_read_degraded() {
    let a = array(1, "1.2", 2, 24, "mirror");
    for m in &a.members {
        assert_member(&m.path, 1, "1.2");
    }
    let both = a.args(&[0, 1]);

    let list = listing(&both);
    let state = run([
        vec!["shell".to_string()],
        both.clone(),
        vec!["-c".into(), "cat /sys/block/md*/md/array_state".into()],
    ]
    .concat());
    let dest = tempfile::tempdir().unwrap();
    let cp = run([
        vec!["cp".to_string(), format!("{}:/home/me", a.members[0].arg())],
        vec!["--add".into(), a.members[1].arg()],
        vec![dest.path().to_str().unwrap().to_string()],
    ]
    .concat());
    let degraded = cat(&a.args(&[1]), "/spread.bin");

    let named: Vec<_> = list
        .iter()
        .map(|(d, t, l)| {
            let d = if d.starts_with("/dev/vd") {
                String::new()
            } else {
                d.clone()
            };
            (d, t.clone(), l.clone())
        })
        .collect();
    assert_eq!(
        named,
        [
            member("any:mirror"),
            member("any:mirror"),
            (
                "/dev/md/mirror".into(),
                Some("ext4".into()),
                Some("ext4fs".into())
            ),
        ]
    );
    assert_eq!(list[0].0, "/dev/vda");
    assert_eq!(list[1].0, "/dev/vdb");
    assert_eq!(ok_stdout(&state), "readonly\n");
    ok_stdout(&cp);
    assert_eq!(
        fs::read(dest.path().join("me/letter")).unwrap(),
        fs::read(a.tree.path().join("home/me/letter")).unwrap()
    );
    assert!(degraded == fs::read(a.tree.path().join("spread.bin")).unwrap());
    a.assert_unchanged();
}

#[test]
fn raid5_over_three_images_reads_whole_and_with_one_member_missing() {
    let a = array(5, "1.2", 3, 16, "parity");
    for m in &a.members {
        assert_member(&m.path, 5, "1.2");
    }
    let want = fs::read(a.tree.path().join("spread.bin")).unwrap();

    let whole = cat(&a.args(&[0, 1, 2]), "/spread.bin");
    let missing_middle = cat(&a.args(&[0, 2]), "/spread.bin");

    assert!(whole == want);
    assert!(missing_middle == want);
    a.assert_unchanged();
}

#[test]
fn superblocks_at_the_end_and_raid0_are_assembled_not_read_as_their_content() {
    // 0.90 and 1.0 keep the superblock at the end: a mirror member starts with the
    // filesystem itself, which must not be mounted on its own.
    for (level, metadata) in [(1, "0.90"), (0, "1.0")] {
        let a = array(level, metadata, 2, 24, "tail");
        assert_member(&a.members[0].path, level, metadata);

        let list = listing(&a.args(&[0, 1]));
        let got = cat(&a.args(&[0, 1]), "/spread.bin");

        let types: Vec<Option<&str>> = list.iter().map(|(_, t, _)| t.as_deref()).collect();
        assert_eq!(
            types,
            [
                Some("linux_raid_member"),
                Some("linux_raid_member"),
                Some("ext4")
            ],
            "{list:?}"
        );
        assert!(list[2].0.starts_with("/dev/md"), "{list:?}");
        assert!(got == fs::read(a.tree.path().join("spread.bin")).unwrap());
        a.assert_unchanged();
    }
}
