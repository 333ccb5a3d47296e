//! `imgsafe cp` end to end: real ext4 images built with mke2fs -d, the real appliance,
//! and the tree the image was built from as the oracle.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use support::*;

#[test]
fn whole_image_copies_out_as_the_tree_it_was_built_from() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(
        src.path(),
        TreeOpts {
            odd_names: true,
            links: true,
            sparse: true,
        },
    );
    let img = ext4_image(src.path(), "48M");
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("copy");

    let res = run(["cp", &format!("{}:/", img.arg()), dest.to_str().unwrap()]);

    assert_eq!(ok_stdout(&res), "");
    assert_same_tree(src.path(), &dest);
    let sparse = fs::metadata(dest.join("home/me/sparse.img")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "sparse file copied dense: {} blocks",
        sparse.blocks()
    );
    assert!(
        fs::read_dir(out.path()).unwrap().count() == 1,
        "something was written next to DEST"
    );
    img.assert_unchanged();
}

#[test]
fn several_sources_go_into_a_directory_and_existing_files_need_force() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let img = ext4_image(src.path(), "16M");
    let out = tempfile::tempdir().unwrap();
    fs::write(out.path().join("hostname"), b"mine\n").unwrap();
    let (letter, hostname) = (
        format!("{}:/home/me/letter", img.arg()),
        format!("{}:/etc/hostname", img.arg()),
    );
    let dest = out.path().to_str().unwrap();

    let refused = run(["cp", &letter, &hostname, dest]);
    let forced = run(["cp", "--force", &letter, &hostname, dest]);

    assert_eq!(code(&refused), 1, "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("hostname: already exists"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(ok_stdout(&forced), "");
    assert_eq!(
        fs::read(out.path().join("hostname")).unwrap(),
        b"sample-host\n"
    );
    let letter_md = fs::metadata(out.path().join("letter")).unwrap();
    assert_eq!(
        (letter_md.permissions().mode() & 0o777, letter_md.mtime()),
        (0o640, MTIME)
    );
    img.assert_unchanged();
}

#[test]
fn missing_path_exits_4_naming_the_image() {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path(), TreeOpts::PLAIN);
    let img = ext4_image(src.path(), "16M");
    let out = tempfile::tempdir().unwrap();

    let res = run([
        "cp",
        &format!("{}:/no/such", img.arg()),
        out.path().to_str().unwrap(),
    ]);

    assert_eq!(code(&res), 4, "{}", stderr(&res));
    assert!(stderr(&res).contains("disk.img"), "{}", stderr(&res));
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
    img.assert_unchanged();
}

#[test]
fn source_without_image_path_is_a_usage_error() {
    let out = tempfile::tempdir().unwrap();

    let res = run(["cp", "disk.img", out.path().to_str().unwrap()]);

    assert_eq!(code(&res), 2, "{}", stderr(&res));
    assert!(stderr(&res).contains("IMAGE:/PATH"), "{}", stderr(&res));
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop (needs root, as
/// the suite runs in CI).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test mounts a small tmpfs: run it as root"
        );
        must(
            tool("mount", "mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "imgsafe-test"])
                .arg(dir.path()),
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Regression: `cp -r` onto a full filesystem left the directories it had made at mode
/// 0700 (the image's were 0755 and 0750).
#[test]
fn cp_onto_a_full_filesystem_leaves_complete_files_with_final_modes_and_no_partial_file() {
    let src = tempfile::tempdir().unwrap();
    let sub = src.path().join("tree/sub");
    fs::create_dir_all(&sub).unwrap();
    fs::write(sub.join("a-small"), b"small\n").unwrap();
    fs::write(sub.join("b-big"), pseudo_random(6 << 20, 3)).unwrap();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o750)).unwrap();
    let img = ext4_image(src.path(), "32M");
    let full = SmallFs::mount("2M");

    let out = run([
        "cp".as_ref(),
        format!("{}:/tree", img.arg()).as_ref(),
        full.dir.path().as_os_str(),
    ]);

    let copy = full.dir.path().join("tree");
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    let mut names: Vec<String> = walk(&copy)
        .iter()
        .map(|p| p.strip_prefix(&copy).unwrap().display().to_string())
        .collect();
    names.sort();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("b-big"), "{}", stderr(&out));
    // The walk's order is the filesystem's: a-small may come before b-big or not.
    assert!(
        names == ["sub"] || names == ["sub", "sub/a-small"],
        "a partial or stray file was left: {names:?}"
    );
    if names.len() == 2 {
        assert_eq!(fs::read(copy.join("sub/a-small")).unwrap(), b"small\n");
    }
    assert_eq!((mode(&copy), mode(&copy.join("sub"))), (0o755, 0o750));
    img.assert_unchanged();
}
