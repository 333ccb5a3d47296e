//! `imgsafe serve` on decoded container formats: real NBD clients see the allocation
//! map (holes) and copy sparse output; corrupt containers fail at the command line with
//! the image exit code and one line naming the file.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// `imgsafe serve` in the background, stopped with SIGTERM on drop.
struct Served {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(image: &Path) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let child = imgsafe()
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "imgsafe serve did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Served { child, socket, _dir: dir }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// 64 MiB raw disk with data only in its first and last MiB.
fn mostly_empty_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("src.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pseudo_random(1 << 20, 3), 0).unwrap();
    f.write_all_at(&pseudo_random(1 << 20, 4), 63 << 20).unwrap();
    raw
}

fn qemu_img(args: &[&str]) -> String {
    let out = tool("qemu-img", "qemu-utils").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn holes_and_sparse_copy(fmt_args: &[&str], name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let raw = mostly_empty_raw(dir.path());
    let img = dir.path().join(name);
    let mut args = vec!["convert", "-f", "raw"];
    args.extend_from_slice(fmt_args);
    args.push(raw.to_str().unwrap());
    args.push(img.to_str().unwrap());
    qemu_img(&args);
    let before = sha256(&img);
    let served = Served::start(&img);

    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "raw", &served.uri()])).unwrap();
    let copy = dir.path().join("copy.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &served.uri(), copy.to_str().unwrap()]);

    let holes: u64 = map.as_array().unwrap().iter().filter(|e| e["data"] == false).map(|e| e["length"].as_u64().unwrap()).sum();
    assert!(holes >= 60 << 20, "expected ~62 MiB of holes in {map}");
    let copied = fs::read(&copy).unwrap();
    assert!(copied[..64 << 20] == fs::read(&raw).unwrap()[..], "served bytes differ from the source");
    let on_disk = fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(on_disk < 8 << 20, "copy is not sparse: {on_disk} bytes allocated");
    assert_eq!(sha256(&img), before);
}

#[test]
fn dynamic_vhd_served_shows_holes_and_copies_sparse() {
    holes_and_sparse_copy(&["-O", "vpc", "-o", "subformat=dynamic"], "disk.vhd");
}

#[test]
fn ploop_served_shows_holes_and_copies_sparse() {
    holes_and_sparse_copy(&["-O", "parallels"], "disk.hds");
}

fn corrupt_copy(src: &Path, name: &str, at: usize, bytes: &[u8]) -> PathBuf {
    let mut b = fs::read(src).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    let p = src.with_file_name(name);
    fs::write(&p, b).unwrap();
    p
}

#[test]
fn corrupt_containers_exit_3_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let raw = mostly_empty_raw(dir.path());
    let vhd = dir.path().join("good.vhd");
    let hds = dir.path().join("good.hds");
    qemu_img(&["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw.to_str().unwrap(), vhd.to_str().unwrap()]);
    qemu_img(&["convert", "-f", "raw", "-O", "parallels", raw.to_str().unwrap(), hds.to_str().unwrap()]);
    let vhd_len = fs::metadata(&vhd).unwrap().len() as usize;
    // Footer checksum (offset 64 of the footer) broken in both copies.
    let bad_sum = corrupt_copy(&vhd, "badsum.vhd", vhd_len - 512 + 64, &[0xde, 0xad, 0xbe, 0xef]);
    let bad_sum = corrupt_copy(&bad_sum, "badsum.vhd", 64, &[0xde, 0xad, 0xbe, 0xef]);
    // ploop: first BAT entry points far past the end of the file.
    let bad_bat = corrupt_copy(&hds, "badbat.hds", 64, &0x00ff_ffffu32.to_le_bytes());
    let cases: [(&Path, &[&str]); 2] = [(&bad_sum, &["checksum"]), (&bad_bat, &["BAT entry 0", "past the end"])];

    for (img, words) in cases {
        let before = sha256(img);
        for cmd in [vec!["info"], vec!["ls"], vec!["cat"]] {
            let mut c = Command::new(env!("CARGO_BIN_EXE_imgsafe"));
            c.args(&cmd).arg(img);
            if cmd[0] == "cat" {
                c.arg("/etc/hostname");
            }
            let out = c.output().unwrap();

            assert_eq!(code(&out), 3, "{cmd:?} {}: {}", img.display(), stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(img.file_name().unwrap().to_str().unwrap()), "{err}");
            assert!(words.iter().all(|w| err.contains(w)), "{err} lacks {words:?}");
        }
        assert_eq!(sha256(img), before);
    }
}
