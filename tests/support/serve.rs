//! `imgsafe serve` in the background and the qemu-img oracles that read it back, for the
//! per-format test files (VDI, VHDX, ...): the served disk must equal the raw disk the
//! image was made from, and what qemu-img reads from the image file itself.
#![allow(dead_code)]

use super::{imgsafe, tool};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// `imgsafe serve` in the background, stopped with SIGTERM on drop.
pub struct Served {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Start `imgsafe serve IMAGE_ARG` and wait for its socket; if it exits first, panic
    /// with what it wrote on stderr.
    pub fn start(image_arg: &str) -> Served {
        Served::start_with(&[image_arg])
    }

    /// Start `imgsafe serve ARGS...` (options and the image) and wait for its socket.
    pub fn start_with(args: &[&str]) -> Served {
        let image_arg = args.join(" ");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("serve.log");
        let child = imgsafe()
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut served = Served {
            child,
            socket,
            _dir: dir,
        };
        let t = Instant::now();
        while !served.socket.exists() {
            if let Some(status) = served.child.try_wait().unwrap() {
                let err = fs::read_to_string(&log).unwrap_or_default();
                panic!("imgsafe serve {image_arg} exited ({status}) before listening: {err}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "imgsafe serve {image_arg} did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        served
    }

    /// The NBD URI of the socket.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The whole served disk, read with `qemu-img convert` over NBD.
    pub fn read_all(&self) -> Vec<u8> {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("served.raw");
        qemu_img(&["convert", "-f", "raw", "-O", "raw", &self.uri(), s(&out)]);
        fs::read(out).unwrap()
    }

    /// `qemu-img map --output=json` over NBD: `(start, length, data)` of each run.
    pub fn map(&self) -> Vec<(u64, u64, bool)> {
        let map = qemu_img(&["map", "--output=json", "-f", "raw", &self.uri()]);
        let map: serde_json::Value = serde_json::from_str(&map).unwrap();
        map.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["data"] == true,
                )
            })
            .collect()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Run qemu-img (Debian package qemu-utils) and return its stdout; panics on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = tool("qemu-img", "qemu-utils").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A path as a string argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Where two byte strings first differ, for messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Serve `image_arg` and check that the whole virtual disk, read with `qemu-img convert`
/// over NBD, is byte for byte the raw disk at `raw_path` (same size too).
pub fn assert_served_equals(image_arg: &str, raw_path: &Path) {
    let served = Served::start(image_arg);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.raw");

    qemu_img(&["convert", "-f", "raw", "-O", "raw", &served.uri(), s(&out)]);

    let got = fs::read(&out).unwrap();
    let want = fs::read(raw_path).unwrap();
    assert_eq!(
        got.len(),
        want.len(),
        "{image_arg}: served size differs from the raw disk"
    );
    assert!(
        got == want,
        "{image_arg}: served bytes differ from {} (first at byte {:?})",
        raw_path.display(),
        first_difference(&got, &want)
    );
}

/// Serve `image_arg` and return the holes `qemu-img map` sees over NBD (`zero: true,
/// data: false`), checking each reads as zeros in `raw_path`.
pub fn served_holes(image_arg: &str, raw_path: &Path) -> Vec<(usize, usize)> {
    let served = Served::start(image_arg);
    let map = qemu_img(&["map", "--output=json", "-f", "raw", &served.uri()]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let raw = fs::read(raw_path).unwrap();
    let holes: Vec<(usize, usize)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["zero"] == true && e["data"] == false)
        .map(|e| {
            let start = e["start"].as_u64().unwrap() as usize;
            (start, start + e["length"].as_u64().unwrap() as usize)
        })
        .collect();
    for &(start, end) in &holes {
        assert!(
            raw[start..end].iter().all(|&b| b == 0),
            "{image_arg}: hole {start}..{end} over data"
        );
    }
    holes
}

/// What qemu-img itself reads from `image` as `fmt`, as raw bytes.
pub fn qemu_reads(image: &Path, fmt: &str) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qemu.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(image), s(&out)]);
    fs::read(&out).unwrap()
}

/// Panic with where they differ unless `got` is byte for byte `want`.
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    assert!(
        got == want,
        "{what}: bytes differ (first at byte {:?})",
        first_difference(got, want)
    );
}
