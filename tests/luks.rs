//! LUKS1 and LUKS2 containers opened in the guest with `--key-file`.
//!
//! Made at test time without root or dm-crypt on the host: an ext4 image (mke2fs -d)
//! is encrypted in place by `cryptsetup reencrypt --encrypt` (LUKS2, done in user
//! space on a plain file, locking off), and `cryptsetup convert --type luks1` turns a
//! copy into LUKS1. PBKDF2 with few iterations keeps the guest's key check fast.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use support::*;

/// The passphrase of every test container: its bytes are searched for afterwards.
const KEY: &[u8] = b"imgsafe-luks-test-passphrase-7d41c2\n";

struct Container {
    image: Image,
    key: PathBuf,
    tree: tempfile::TempDir,
}

fn cryptsetup() -> std::process::Command {
    tool("cryptsetup", "cryptsetup-bin")
}

/// A LUKS `version` (1 or 2) container holding an ext4 of the sample tree, its key
/// slot made with PBKDF2.
fn container(version: u32) -> Container {
    container_with(
        version,
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
    )
}

/// [`container`] with the key slot made by cryptsetup `pbkdf` options.
fn container_with(version: u32, pbkdf: &[&str]) -> Container {
    container_keyed(version, pbkdf, KEY)
}

/// [`container_with`] for the key `key`.
fn container_keyed(version: u32, pbkdf: &[&str], key_bytes: &[u8]) -> Container {
    let tree = tempfile::tempdir().unwrap();
    sample_tree(tree.path(), TreeOpts::PLAIN);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    fs::write(&key, key_bytes).unwrap();
    let img = dir.path().join("disk.img");
    fs_image("ext4", tree.path(), 16, &img);
    // Room for the header: reencrypt takes it from the end of the file.
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    must(
        cryptsetup()
            .args([
                "reencrypt",
                "--encrypt",
                "-q",
                "--disable-locks",
                "--type",
                "luks2",
            ])
            .args(pbkdf)
            .args(["--reduce-device-size", "16M", "--key-file"])
            .arg(&key)
            .arg(&img),
    );
    if version == 1 {
        must(
            cryptsetup()
                .args(["convert", "-q", "--disable-locks", "--type", "luks1"])
                .arg(&img),
        );
    }
    let out = cryptsetup().arg("luksDump").arg(&img).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("Version:       \t{version}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Container {
        image: Image::new(dir, img),
        key,
        tree,
    }
}

/// Files below `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    walk(dir)
        .into_iter()
        .filter(|p| {
            fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
                && fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

#[test]
fn luks1_and_luks2_open_with_the_key_file_and_the_key_is_left_nowhere() {
    let tmp = tempfile::tempdir().unwrap();
    for version in [1, 2] {
        let c = container(version);
        let (img, key) = (c.image.arg(), c.key.to_str().unwrap().to_string());

        let list = imgsafe()
            .env("TMPDIR", tmp.path())
            .args(["filesystems", "--json", &img, "--key-file", &key])
            .output()
            .unwrap();
        let cat = imgsafe()
            .env("TMPDIR", tmp.path())
            .args(["cat", &img, "--key-file", &key, "/home/me/big.bin"])
            .output()
            .unwrap();
        let dest = tempfile::tempdir().unwrap();
        let cp = imgsafe()
            .env("TMPDIR", tmp.path())
            .args(["cp", &format!("{img}:/etc"), "--key-file", &key])
            .arg(dest.path())
            .output()
            .unwrap();

        let doc: serde_json::Value = serde_json::from_str(&ok_stdout(&list)).unwrap();
        let got: Vec<(&str, Option<&str>)> = doc["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["device"].as_str().unwrap(), f["type"].as_str()))
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], ("/dev/vda", Some("crypto_LUKS")));
        assert!(got[1].0.starts_with("/dev/mapper/luks-"), "{got:?}");
        assert_eq!(got[1].1, Some("ext4"));
        ok_stdout(&cat);
        assert!(cat.stdout == fs::read(c.tree.path().join("home/me/big.bin")).unwrap());
        ok_stdout(&cp);
        assert_eq!(
            fs::read(dest.path().join("etc/os-release")).unwrap(),
            fs::read(c.tree.path().join("etc/os-release")).unwrap()
        );
        c.image.assert_unchanged();
    }
    // The key itself and its words alone, in the cache (appliance, saved states) and
    // in every temp dir the runs used.
    let needle = &KEY[..KEY.len() - 1];
    for dir in [test_cache(), tmp.path().to_path_buf()] {
        assert_eq!(files_containing(&dir, needle), Vec::<PathBuf>::new());
    }
}

#[test]
fn a_wrong_key_is_one_clear_error_with_exit_5() {
    let c = container(2);
    let bad = c.image.dir.path().join("bad-key");
    fs::write(&bad, b"not the key").unwrap();

    let out = run([
        "ls",
        &c.image.arg(),
        "--key-file",
        bad.to_str().unwrap(),
        "/",
    ]);

    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains("TCG")).collect();
    assert_eq!(
        lines,
        [format!(
            "imgsafe: {}: /dev/vda: wrong key (it opens no key slot of the LUKS container)",
            c.image.arg()
        )]
    );
    c.image.assert_unchanged();
}

#[test]
fn without_a_key_the_container_is_listed_as_encrypted() {
    let c = container(1);

    let out = run(["filesystems", &c.image.arg()]);

    let text = ok_stdout(&out);
    assert!(
        text.contains("/dev/vda") && text.contains("crypto_LUKS"),
        "{text}"
    );
    assert!(!text.contains("/dev/mapper"), "{text}");
}

#[test]
fn a_key_from_stdin_when_it_is_not_a_terminal_is_its_exact_bytes() {
    let c = container(2);

    let mut child = imgsafe()
        .args(["cat", &c.image.arg(), "--key-file", "-", "/etc/hostname"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(KEY).unwrap();
    }
    let out = child.wait_with_output().unwrap();

    assert_eq!(ok_stdout(&out), "sample-host\n");
    c.image.assert_unchanged();
}

#[test]
fn an_argon2_key_slot_needing_more_memory_than_the_plain_appliance_opens() {
    // 320 MiB of Argon2 memory: more than the plain 256 MiB appliance has, so this opens only
    // because a session with a key gets the memory LUKS2's defaults can ask for.
    let c = container_with(
        2,
        &[
            "--pbkdf",
            "argon2id",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-memory",
            "327680",
        ],
    );
    let (img, key) = (c.image.arg(), c.key.to_str().unwrap().to_string());

    let cat = imgsafe()
        .args(["cat", &img, "--key-file", &key, "/etc/hostname"])
        .output()
        .unwrap();

    assert_eq!(
        ok_stdout(&cat).as_bytes(),
        fs::read(c.tree.path().join("etc/hostname")).unwrap()
    );
    c.image.assert_unchanged();
}

#[test]
fn a_passphrase_typed_on_the_terminal_opens_the_container_and_is_not_echoed() {
    let pass = "typed-passphrase-5e0b93";
    let c = container_keyed(
        2,
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
        pass.as_bytes(),
    );
    let cmd = format!(
        "env XDG_CACHE_HOME={} IMGSAFE_ACCEL=tcg {} cat --key-file - {} /etc/hostname; \
         echo \"rc=$?\"; sleep 600",
        test_cache().display(),
        env!("CARGO_BIN_EXE_imgsafe"),
        c.image.arg()
    );
    let t = support::tmux::Tmux::start(&cmd, 120, 20);
    t.wait_for("the prompt", std::time::Duration::from_secs(60), |s| {
        s.contains("imgsafe: key:")
    });

    t.keys(&["-l", pass]);
    t.keys(&["Enter"]);
    let screen = t.wait_for(
        "the command to end",
        std::time::Duration::from_secs(300),
        |s| s.contains("rc="),
    );

    assert!(screen.contains("rc=0"), "{screen}");
    assert!(screen.contains("sample-host"), "{screen}");
    assert!(
        !screen.contains(pass),
        "the passphrase was echoed:\n{screen}"
    );
    c.image.assert_unchanged();
}
