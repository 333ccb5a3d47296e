//! The NBD server, driven by real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) and by a
//! raw-socket client that sends what well-behaved clients never do.
//!
//! Every test builds a sparse raw image at test time and checks its sha256 is unchanged
//! at the end: the server never writes the image.

use imgsafe::nbd::proto::*;
use imgsafe::nbd::Server;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
/// Image size: a multiple of 512 (qemu rounds export sizes up to it) but not of the
/// 4 KiB preferred block size, to exercise a short tail.
const SIZE: u64 = 2048 * KIB + 1536;
/// Data ranges of the test image; everything else is a hole.
const DATA: [(u64, u64); 3] = [(0, 256 * KIB), (1024 * KIB, 256 * KIB), (2048 * KIB, 1536)];
/// The first hole.
const HOLE: (u64, u64) = (256 * KIB, 768 * KIB);

/// A sparse raw image in a private temp dir, with its original digest.
struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    digest: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(SIZE).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for (offset, len) in DATA {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            std::os::unix::fs::FileExt::write_all_at(&file, &bytes, offset).unwrap();
        }
        drop(file);
        let digest = sha256(&image);
        Fixture { dir, image, digest }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// Start the library server on this image as export `name`.
    fn server(&self, name: &str) -> Server {
        let src = imgsafe::format::open(&self.image, &Default::default()).unwrap();
        Server::start(Arc::from(src), &self.socket(), name).unwrap()
    }

    fn assert_unchanged(&self) {
        assert_eq!(
            sha256(&self.image),
            self.digest,
            "the image file was modified"
        );
    }
}

fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap())[..].to_vec()
}

/// Run a tool; a missing tool fails the test naming the Debian package to install.
fn tool(name: &str, package: &str, args: &[&str]) -> Output {
    match Command::new(name).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{name} not found: install the Debian package {package}")
        }
        Err(e) => panic!("{name}: {e}"),
    }
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "tool failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `imgsafe serve` as a child process; SIGTERM and reaped on drop.
struct Serve {
    child: Child,
}

impl Serve {
    fn start(fx: &Fixture, name: &str) -> Serve {
        Serve::start_with(fx, &fx.image, &["--export-name", name], 0o022)
    }

    /// `imgsafe serve IMAGE --socket <fx's> ARGS...` started with umask `umask`.
    fn start_with(fx: &Fixture, image: &Path, args: &[&str], umask: u32) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_imgsafe"));
        command
            .arg("serve")
            .arg(image)
            .arg("--socket")
            .arg(fx.socket())
            .args(args)
            .stderr(Stdio::piped());
        // SAFETY: umask is async-signal-safe and allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                libc::umask(umask as libc::mode_t);
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let mut serve = Serve { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fx.socket().exists() {
            assert!(
                serve.child.try_wait().unwrap().is_none(),
                "imgsafe serve exited early"
            );
            assert!(
                Instant::now() < deadline,
                "imgsafe serve did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM)
    }

    /// Send `signal` and reap.
    fn signal(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        self.child.wait().unwrap()
    }

    /// A line of the server's /proc status, in KiB (e.g. `VmHWM`, its peak RSS).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

fn uri(fx: &Fixture, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", fx.socket().display())
}

// ---------------------------------------------------------------- real clients

#[test]
fn qemu_img_convert_copies_the_image_byte_for_byte() {
    let fx = Fixture::new();
    let _serve = Serve::start(&fx, "");
    let out = fx.dir.path().join("copy.raw");

    ok(tool(
        "qemu-img",
        "qemu-utils",
        &["convert", "-O", "raw", &uri(&fx, ""), out.to_str().unwrap()],
    ));

    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&fx.image).unwrap(),
        "the copy differs"
    );
    fx.assert_unchanged();
}

#[test]
fn qemu_img_compare_finds_the_export_identical() {
    let fx = Fixture::new();
    let _serve = Serve::start(&fx, "disk");

    let text = ok(tool(
        "qemu-img",
        "qemu-utils",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            fx.image.to_str().unwrap(),
            &uri(&fx, "disk"),
        ],
    ));

    assert!(text.contains("Images are identical"), "{text}");
    fx.assert_unchanged();
}

#[test]
fn qemu_img_map_shows_holes_and_data() {
    let fx = Fixture::new();
    let _server = fx.server("");

    let text = ok(tool(
        "qemu-img",
        "qemu-utils",
        &["map", "--output=json", &uri(&fx, "")],
    ));

    let map: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let data_at = |offset: u64| {
        map.iter()
            .find(|e| {
                let start = e["start"].as_u64().unwrap();
                start <= offset && offset < start + e["length"].as_u64().unwrap()
            })
            .map(|e| e["data"].as_bool().unwrap())
    };
    assert_eq!(
        [
            data_at(0),
            data_at(512 * KIB),
            data_at(1024 * KIB),
            data_at(1536 * KIB),
            data_at(SIZE - 1)
        ],
        [Some(true), Some(false), Some(true), Some(false), Some(true)],
        "{text}"
    );
    fx.assert_unchanged();
}

#[test]
fn nbdinfo_map_shows_the_holes() {
    let fx = Fixture::new();
    let _server = fx.server("");

    let text = ok(tool("nbdinfo", "libnbd-bin", &["--map", &uri(&fx, "")]));

    let holes: Vec<&str> = text.lines().filter(|l| l.contains("hole")).collect();
    assert_eq!(holes.len(), 2, "{text}");
    assert!(
        holes[0].split_whitespace().take(2).eq(["262144", "786432"]),
        "{text}"
    );
    fx.assert_unchanged();
}

#[test]
fn nbdinfo_lists_the_export() {
    let fx = Fixture::new();
    let _server = fx.server("mydisk");

    let text = ok(tool("nbdinfo", "libnbd-bin", &["--list", &uri(&fx, "")]));

    assert!(text.contains("export=\"mydisk\""), "{text}");
    fx.assert_unchanged();
}

#[test]
fn nbdinfo_shows_read_only_and_size() {
    let fx = Fixture::new();
    let _server = fx.server("mydisk");

    let text = ok(tool(
        "nbdinfo",
        "libnbd-bin",
        &["--json", &uri(&fx, "mydisk")],
    ));

    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(SIZE), "{text}");
    assert_eq!(export["is_read_only"].as_bool(), Some(true), "{text}");
    assert_eq!(export["can_multi_conn"].as_bool(), Some(true), "{text}");
    assert_eq!(
        export["block_size_maximum"].as_u64(),
        Some(u64::from(MAX_PAYLOAD)),
        "{text}"
    );
    fx.assert_unchanged();
}

#[test]
fn nbdcopy_over_several_connections_copies_the_image() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let out = fx.dir.path().join("copy.raw");
    std::fs::File::create(&out).unwrap();

    ok(tool(
        "nbdcopy",
        "libnbd-bin",
        &[
            "--connections=4",
            "--requests=16",
            &uri(&fx, ""),
            out.to_str().unwrap(),
        ],
    ));

    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&fx.image).unwrap(),
        "the copy differs"
    );
    fx.assert_unchanged();
}

#[test]
fn qemu_io_write_is_refused_and_the_file_is_unchanged() {
    let fx = Fixture::new();
    let _server = fx.server("");

    let out = tool(
        "qemu-io",
        "qemu-utils",
        &["-f", "raw", "-c", "write -P 0xaa 0 512", &uri(&fx, "")],
    );

    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.contains("Permission denied")
            || text.contains("Operation not permitted")
    );
    assert!(!text.contains("wrote 512/512"), "{text}");
    fx.assert_unchanged();
}

// ---------------------------------------------------------------- raw-socket client

/// A minimal NBD client that can send anything.
struct Client {
    s: UnixStream,
}

/// One structured reply chunk.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

impl Chunk {
    fn error(&self) -> u32 {
        assert_eq!(self.kind, REPLY_TYPE_ERROR, "not an error chunk: {self:?}");
        u32::from_be_bytes(self.payload[0..4].try_into().unwrap())
    }
}

impl Client {
    fn connect(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s };
        let hello = c.read(18);
        assert_eq!(&hello[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&hello[8..16], &IHAVEOPT.to_be_bytes());
        c.s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        c
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// Send an option header announcing `len` bytes, then `data`.
    fn option_with_len(&mut self, opt: u32, len: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.option_with_len(opt, data.len() as u32, data);
    }

    /// Read one option reply: (option, reply type, payload).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let head = self.read(20);
        assert_eq!(&head[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        (opt, kind, self.read(len as usize))
    }

    /// NBD_OPT_GO for `name` (optionally after structured replies + base:allocation);
    /// returns the export size.
    fn go(&mut self, name: &str, structured: bool) -> u64 {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.reply().1, REP_ACK);
            let mut meta = (name.len() as u32).to_be_bytes().to_vec();
            meta.extend_from_slice(name.as_bytes());
            meta.extend_from_slice(&1u32.to_be_bytes());
            meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.option(OPT_SET_META_CONTEXT, &meta);
            assert_eq!(self.reply().1, REP_META_CONTEXT);
            assert_eq!(self.reply().1, REP_ACK);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.option(OPT_GO, &d);
        let mut size = None;
        loop {
            let (_, kind, payload) = self.reply();
            match kind {
                REP_INFO if payload[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => return size.expect("NBD_INFO_EXPORT before the ack"),
                other => panic!("NBD_OPT_GO failed with reply {other:#x}"),
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.s
            .write_all(
                &Request {
                    flags,
                    kind,
                    cookie,
                    offset,
                    length,
                }
                .encode(),
            )
            .unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let head = self.read(16);
        assert_eq!(&head[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(head[4..8].try_into().unwrap()),
            u64::from_be_bytes(head[8..16].try_into().unwrap()),
        )
    }

    fn chunk(&mut self) -> Chunk {
        let head = self.read(20);
        assert_eq!(&head[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        Chunk {
            flags: u16::from_be_bytes(head[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(head[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(head[8..16].try_into().unwrap()),
            payload: self.read(len as usize),
        }
    }

    /// True when the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn raw_unknown_option_then_go_on_the_same_connection() {
    let fx = Fixture::new();
    let _server = fx.server("disk");
    let mut c = Client::connect(&fx.socket());

    c.option(0x4242, b"whatever");
    let (opt, kind, _) = c.reply();
    let size = c.go("disk", false);

    assert_eq!((opt, kind), (0x4242, REP_ERR_UNSUP));
    assert_eq!(size, SIZE);
    fx.assert_unchanged();
}

#[test]
fn raw_oversized_option_gets_too_big_and_negotiation_continues() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());

    c.option(OPT_GO, &vec![0u8; 64 << 10]);
    let (_, kind, _) = c.reply();
    let size = c.go("", false);

    assert_eq!(kind, REP_ERR_TOO_BIG);
    assert_eq!(size, SIZE);
}

#[test]
fn raw_absurd_option_length_drops_only_that_client() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut bad = Client::connect(&fx.socket());

    bad.option_with_len(OPT_GO, u32::MAX, &[]);
    let mut good = Client::connect(&fx.socket());
    let size = good.go("", true);

    assert!(bad.closed());
    assert_eq!(size, SIZE);
}

#[test]
fn raw_go_for_unknown_export_is_refused() {
    let fx = Fixture::new();
    let _server = fx.server("disk");
    let mut c = Client::connect(&fx.socket());
    let mut d = 5u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"other");
    d.extend_from_slice(&0u16.to_be_bytes());

    c.option(OPT_GO, &d);
    let (_, kind, _) = c.reply();

    assert_eq!(kind, REP_ERR_UNKNOWN);
}

#[test]
fn raw_export_name_fallback_honours_no_zeroes() {
    let fx = Fixture::new();
    let _server = fx.server("disk");
    let mut c = Client::connect(&fx.socket());

    c.option(OPT_EXPORT_NAME, b"disk");
    let reply = c.read(10);
    c.request(CMD_READ, 0, 1, 0, 512);
    let (err, cookie) = c.simple();
    let data = c.read(512);

    assert_eq!(&reply[0..8], &SIZE.to_be_bytes());
    assert_ne!(
        u16::from_be_bytes([reply[8], reply[9]]) & TFLAG_READ_ONLY,
        0
    );
    assert_eq!((err, cookie), (0, 1));
    assert!(data == std::fs::read(&fx.image).unwrap()[..512]);
}

#[test]
fn raw_bad_requests_get_einval_and_the_connection_keeps_serving() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());
    c.go("", false);

    c.request(CMD_READ, 0, 1, SIZE - 100, 512);
    let past_end = c.simple();
    c.request(CMD_READ, 0, 2, u64::MAX - 100, 512);
    let overflow = c.simple();
    c.request(CMD_READ, 0, 3, 0, MAX_PAYLOAD + 1);
    let too_long = c.simple();
    c.request(77, 0, 4, 0, 512);
    let unknown = c.simple();
    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 512);
    let no_context = c.simple();
    c.request(CMD_READ, 0, 6, SIZE - 1000, 1000);
    let good = c.simple();
    let tail = c.read(1000);

    assert_eq!(
        [past_end, overflow, too_long, unknown, no_context, good],
        [
            (EINVAL, 1),
            (EINVAL, 2),
            (EINVAL, 3),
            (EINVAL, 4),
            (EINVAL, 5),
            (0, 6)
        ]
    );
    assert!(tail == std::fs::read(&fx.image).unwrap()[(SIZE - 1000) as usize..]);
    fx.assert_unchanged();
}

#[test]
fn raw_structured_errors_come_as_error_chunks() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());
    c.go("", true);

    c.request(CMD_READ, 0, 1, SIZE, 1);
    let past_end = c.chunk();
    c.request(CMD_BLOCK_STATUS, 0, 2, u64::MAX, 1);
    let overflow = c.chunk();

    assert_eq!(
        (past_end.error(), past_end.cookie, past_end.flags),
        (EINVAL, 1, REPLY_FLAG_DONE)
    );
    assert_eq!((overflow.error(), overflow.cookie), (EINVAL, 2));
}

#[test]
fn raw_writes_trims_and_zeroes_get_eperm_and_the_file_is_unchanged() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());
    c.go("", false);

    c.request(CMD_WRITE, 0, 1, 0, 4096);
    c.s.write_all(&[0xaa; 4096]).unwrap();
    let write = c.simple();
    c.request(CMD_TRIM, 0, 2, 0, 4096);
    let trim = c.simple();
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    let zeroes = c.simple();
    c.request(CMD_FLUSH, 0, 4, 0, 0);
    let flush = c.simple();
    c.request(CMD_READ, 0, 5, 0, 4096);
    let read = c.simple();
    let data = c.read(4096);

    assert_eq!(
        [write, trim, zeroes, flush, read],
        [(EPERM, 1), (EPERM, 2), (EPERM, 3), (0, 4), (0, 5)]
    );
    assert!(data == std::fs::read(&fx.image).unwrap()[..4096]);
    fx.assert_unchanged();
}

#[test]
fn raw_write_above_max_payload_is_refused_and_disconnected() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());
    c.go("", false);

    c.request(CMD_WRITE, 0, 1, 0, u32::MAX);
    let reply = c.simple();

    assert_eq!(reply, (EPERM, 1));
    assert!(c.closed());
    fx.assert_unchanged();
}

#[test]
fn raw_structured_read_across_a_hole_uses_a_hole_chunk() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());
    c.go("", true);

    c.request(CMD_READ, 0, 9, HOLE.0 - 4096, (4096 + HOLE.1) as u32);
    let first = c.chunk();
    let second = c.chunk();

    assert_eq!(
        (first.kind, first.flags, first.payload.len()),
        (REPLY_TYPE_OFFSET_DATA, 0, 8 + 4096)
    );
    assert!(
        first.payload[8..]
            == std::fs::read(&fx.image).unwrap()[(HOLE.0 - 4096) as usize..HOLE.0 as usize]
    );
    assert_eq!(
        (second.kind, second.flags, second.cookie),
        (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE, 9)
    );
    assert_eq!(
        &second.payload[..],
        &[&HOLE.0.to_be_bytes()[..], &(HOLE.1 as u32).to_be_bytes()].concat()
    );
}

#[test]
fn raw_block_status_req_one_returns_one_descriptor() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());
    c.go("", true);

    c.request(
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        3,
        512 * KIB,
        (1024 * KIB) as u32,
    );
    let chunk = c.chunk();

    assert_eq!(
        (chunk.kind, chunk.flags),
        (REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE)
    );
    assert_eq!(chunk.payload.len(), 4 + 8);
    assert_eq!(
        u32::from_be_bytes(chunk.payload[4..8].try_into().unwrap()),
        (512 * KIB) as u32
    );
    assert_eq!(
        u32::from_be_bytes(chunk.payload[8..12].try_into().unwrap()),
        STATE_HOLE | STATE_ZERO
    );
}

#[test]
fn raw_pipelined_reads_all_get_answers() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let mut c = Client::connect(&fx.socket());
    c.go("", false);
    let image = std::fs::read(&fx.image).unwrap();

    for cookie in 0..32u64 {
        c.request(CMD_READ, 0, cookie, cookie * 65536, 65536);
    }
    let mut seen = Vec::new();
    for _ in 0..32 {
        let (err, cookie) = c.simple();
        let data = c.read(65536);
        assert_eq!(err, 0);
        assert!(
            data == image[(cookie * 65536) as usize..((cookie + 1) * 65536) as usize],
            "cookie {cookie}"
        );
        seen.push(cookie);
    }
    seen.sort();

    assert_eq!(seen, (0..32).collect::<Vec<_>>());
}

#[test]
fn server_refuses_an_existing_socket_path() {
    let fx = Fixture::new();
    std::fs::write(fx.socket(), b"").unwrap();
    let src = imgsafe::format::open(&fx.image, &Default::default()).unwrap();

    let err = Server::start(Arc::from(src), &fx.socket(), "").err();

    assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::AddrInUse));
}

#[test]
fn server_stop_removes_its_socket() {
    let fx = Fixture::new();
    let server = fx.server("");

    server.stop();

    assert!(!fx.socket().exists());
}

// ---------------------------------------------------------------- imgsafe serve

#[test]
fn serve_missing_file_fails_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");

    let out = Command::new(env!("CARGO_BIN_EXE_imgsafe"))
        .arg("serve")
        .arg(&missing)
        .arg("--socket")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();

    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    assert!(!dir.path().join("s").exists());
}

#[test]
fn serve_exits_zero_on_sigterm_and_removes_its_socket() {
    let fx = Fixture::new();
    let mut serve = Serve::start(&fx, "disk");
    let mut c = Client::connect(&fx.socket());
    c.go("disk", true);

    let status = serve.terminate();
    let mut stderr = String::new();
    serve
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();

    assert!(status.success(), "{status:?}");
    assert!(!fx.socket().exists());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(fx.socket().to_str().unwrap()), "{stderr}");
    fx.assert_unchanged();
}

#[test]
fn serve_exits_zero_on_sigint_too() {
    let fx = Fixture::new();
    let mut serve = Serve::start(&fx, "");

    let status = serve.signal(libc::SIGINT);

    assert!(status.success(), "{status:?}");
    assert!(!fx.socket().exists());
}

// ---------------------------------------------------------------- hostile clients

/// Permission bits of `path`.
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Regression: with umask 000 the socket was created srwxrwxrwx, so any user could read
/// the image through it.
#[test]
fn serve_socket_is_owner_only_even_with_umask_000() {
    let fx = Fixture::new();

    let _serve = Serve::start_with(&fx, &fx.image, &[], 0o000);

    assert_eq!(mode_of(&fx.socket()), 0o600);
}

#[test]
fn serve_socket_mode_sets_the_bits_asked_for_whatever_the_umask() {
    let fx = Fixture::new();

    let _serve = Serve::start_with(&fx, &fx.image, &["--socket-mode", "660"], 0o077);

    assert_eq!(mode_of(&fx.socket()), 0o660);
}

#[test]
fn serve_socket_mode_that_is_not_octal_is_a_usage_error() {
    let fx = Fixture::new();

    let out = Command::new(env!("CARGO_BIN_EXE_imgsafe"))
        .arg("serve")
        .arg(&fx.image)
        .arg("--socket")
        .arg(fx.socket())
        .args(["--socket-mode", "0o999"])
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(2));
    assert!(!fx.socket().exists());
}

/// Whether the server closes `s` within `within` (reading and dropping what it sent).
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    // At least a moment, so a close already made is seen once the deadline has passed.
    let deadline = Instant::now() + within.max(Duration::from_millis(50));
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Regression: 64 connections that never sent a byte made every further client fail for
/// as long as they were held.
#[test]
fn idle_connections_neither_lock_clients_out_nor_stay_past_the_handshake_timeout() {
    let fx = Fixture::new();
    let _serve = Serve::start(&fx, "");
    let connected = Instant::now();
    let mut idle: Vec<UnixStream> = (0..imgsafe::nbd::MAX_HANDSHAKES * 2)
        .map(|_| UnixStream::connect(fx.socket()).unwrap())
        .collect();

    let mut c = Client::connect(&fx.socket());
    let size = c.go("", true);
    c.request(CMD_READ, CMD_FLAG_DF, 1, 0, 4096);
    let chunk = c.chunk();
    let deadline = connected + imgsafe::nbd::HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    let still_open = idle
        .iter_mut()
        .map(|s| closed_within(s, deadline.saturating_duration_since(Instant::now())))
        .filter(|closed| !closed)
        .count();

    c.request(CMD_READ, CMD_FLAG_DF, 2, 4096, 4096);
    let later = c.chunk();

    assert_eq!(size, SIZE);
    assert_eq!(chunk.kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(
        still_open, 0,
        "idle connections outlived the handshake timeout"
    );
    assert_eq!(
        (later.kind, later.cookie),
        (REPLY_TYPE_OFFSET_DATA, 2),
        "the negotiated client was dropped with the idle ones"
    );
    fx.assert_unchanged();
}

/// Regression: clients sending 32 MiB reads and never reading the replies pinned ~66 MiB
/// each (63 clients: 4.2 GB of server memory).
#[test]
fn clients_that_never_read_cannot_grow_the_server_past_its_reply_budget() {
    const CLIENTS: usize = 48;
    const READS: u64 = 4;
    let fx = Fixture::new();
    let big = fx.dir.path().join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(CLIENTS as u64 * READS * u64::from(MAX_PAYLOAD))
        .unwrap();
    let serve = Serve::start_with(&fx, &big, &[], 0o022);
    let base = serve.status_kib("VmRSS");
    let mut stalled = Vec::new();
    for i in 0..CLIENTS as u64 {
        let mut c = Client::connect(&fx.socket());
        // Structured replies with DF, the costliest form: every byte asked for is sent
        // as data (holes included), and the pieces of one reply do not wait for each
        // other.
        c.go("", true);
        for r in 0..READS {
            let offset = (i * READS + r) * u64::from(MAX_PAYLOAD);
            c.request(CMD_READ, CMD_FLAG_DF, r, offset, MAX_PAYLOAD);
        }
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_secs(3));

    let mut fresh = Client::connect(&fx.socket());
    fresh.go("", false);
    fresh.request(CMD_READ, 0, 7, 0, 4096);
    let (error, cookie) = fresh.simple();
    let data = fresh.read(4096);
    let peak_kib = serve.status_kib("VmHWM");

    assert_eq!((error, cookie), (0, 7));
    assert!(data.iter().all(|&b| b == 0));
    let grown = (peak_kib.saturating_sub(base) << 10) as usize;
    assert!(
        grown <= imgsafe::nbd::MAX_REPLY_BYTES,
        "server grew by {} MiB with {CLIENTS} stalled clients (peak RSS {} MiB)",
        grown >> 20,
        peak_kib >> 10
    );
    drop(stalled);
}

/// Reads longer than one reply piece come back whole and exact, in both reply forms.
#[test]
fn raw_reads_longer_than_a_piece_are_exact() {
    let fx = Fixture::new();
    let _server = fx.server("");
    let image = std::fs::read(&fx.image).unwrap();
    let len = SIZE as u32 - 512;
    let mut simple = Client::connect(&fx.socket());
    simple.go("", false);
    let mut structured = Client::connect(&fx.socket());
    structured.go("", true);

    simple.request(CMD_READ, 0, 1, 512, len);
    let (error, cookie) = simple.simple();
    let simple_data = simple.read(len as usize);
    structured.request(CMD_READ, CMD_FLAG_DF, 2, 512, len);
    let mut chunks = Vec::new();
    loop {
        let chunk = structured.chunk();
        let done = chunk.flags & REPLY_FLAG_DONE != 0;
        chunks.push(chunk);
        if done {
            break;
        }
    }
    let mut structured_data = vec![0u8; len as usize];
    for c in &chunks {
        assert_eq!(c.kind, REPLY_TYPE_OFFSET_DATA, "{c:?}");
        let at = u64::from_be_bytes(c.payload[0..8].try_into().unwrap()) as usize - 512;
        structured_data[at..at + c.payload.len() - 8].copy_from_slice(&c.payload[8..]);
    }

    assert_eq!((error, cookie), (0, 1));
    assert!(simple_data == image[512..], "simple read differs");
    assert!(chunks.len() > 1, "one chunk: the read was not split");
    assert!(structured_data == image[512..], "structured read differs");
    fx.assert_unchanged();
}
