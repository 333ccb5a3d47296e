//! `imgsafe serve` in the background and the qemu-img oracle over its socket, for test files
//! that compare a served disk with a raw one.

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
    /// Start `imgsafe serve IMAGE_ARG EXTRA...` and wait for its socket; if it exits first,
    /// panic with what it wrote on stderr.
    pub fn start(image_arg: &str, extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("serve.log");
        let child = imgsafe()
            .arg("serve")
            .arg(image_arg)
            .args(extra)
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

/// Panic with where they differ unless `got` is byte for byte `want`.
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    assert!(
        got == want,
        "{what}: bytes differ (first at byte {:?})",
        first_difference(got, want)
    );
}
