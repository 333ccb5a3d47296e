//! What every benchmark group shares: timing, medians, work files, NBD servers under
//! test, and the synthetic images.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// The median of `samples` (mean of the middle two for an even count); None when empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    })
}

/// `peer / imgsafe`: above 1 means imgsafe was faster. None when either is unusable.
pub fn ratio(imgsafe: f64, peer: f64) -> Option<f64> {
    (imgsafe > 0.0 && peer.is_finite() && imgsafe.is_finite()).then(|| peer / imgsafe)
}

/// Samples as `1.23 1.25 1.31` for the detail lines.
pub fn fmt_samples(samples: &[f64]) -> String {
    samples
        .iter()
        .map(|s| format!("{s:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a timed command printed, and how long it took.
pub struct Timed {
    /// Wall-clock seconds from spawn to exit.
    pub secs: f64,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Run `cmd` to completion, timing it; a non-zero exit is an error carrying its stderr.
pub fn timed(cmd: &mut Command) -> Result<Timed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            stderr_summary(&stderr)
        );
    }
    Ok(Timed {
        secs,
        stdout: out.stdout,
        stderr,
    })
}

/// A command as a short shell-like line for messages.
pub fn describe(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    std::iter::once(prog)
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `n` non-empty lines of `text`, joined with " | " (error messages stay one line).
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    let joined = lines[start..].join(" | ");
    if joined.is_empty() {
        "(no output on stderr)".to_string()
    } else {
        joined
    }
}

/// What a failed command's stderr says, on one line: its lines that mention an error
/// (tools such as libguestfs end every error with the same advice, so the last lines say
/// nothing), else its last lines.
pub fn stderr_summary(stderr: &str) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.to_ascii_lowercase().contains("error"))
        .take(3)
        .collect();
    if errors.is_empty() {
        last_lines(stderr, 6)
    } else {
        errors.join(" | ")
    }
}

/// Read a file through once so the timed runs all start with a warm page cache (the
/// only state a non-root user can set consistently: dropping caches needs root).
pub fn warm_page_cache(path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    while f
        .read(&mut buf)
        .with_context(|| format!("{}: cannot read", path.display()))?
        > 0
    {}
    Ok(())
}

/// Compare two files byte for byte; `Ok(None)` when equal, else a description of the
/// first difference (or of the sizes, when one is a prefix of the other).
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<String>> {
    let (la, lb) = (std::fs::metadata(a)?.len(), std::fs::metadata(b)?.len());
    let mut fa = File::open(a).with_context(|| format!("{}: cannot open", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("{}: cannot open", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        let n = n.min(m);
        if n == 0 {
            // One file ended: equal so far, so only the sizes can differ.
            return Ok((la != lb).then(|| {
                format!(
                    "sizes differ: {la} vs {lb} bytes (the first {} bytes are equal)",
                    la.min(lb)
                )
            }));
        }
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(format!(
                "first difference at byte {}",
                offset + i as u64
            )));
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// A directory of work files, removed (with everything in it) when dropped.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Create `path` afresh (a leftover from an interrupted run is removed first).
    pub fn create(path: PathBuf) -> Result<WorkDir> {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("{}: cannot remove", path.display()))?;
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        Ok(WorkDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Free bytes on the filesystem holding `dir` (None if statvfs fails).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a properly sized out-buffer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let (blocks, block_size) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    blocks.checked_mul(block_size)
}

/// Where a copy's output goes: a tmpfs (/dev/shm) when it has room for `need` bytes, so
/// the disk's write speed does not hide the servers' read speed; else `fallback`.
pub fn output_dir(fallback: &Path, need: u64) -> Result<WorkDir> {
    let shm = Path::new("/dev/shm");
    let on_tmpfs =
        shm.is_dir() && free_bytes(shm).is_some_and(|free| free > need.saturating_add(GIB));
    let path = if on_tmpfs {
        // One name per user, so a run that was interrupted is cleaned up by the next.
        // SAFETY: getuid(2) has no preconditions and cannot fail.
        shm.join(format!("imgsafe-bench-{}", unsafe { libc::getuid() }))
    } else {
        fallback.join("out")
    };
    WorkDir::create(path)
}

/// An NBD server under test, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Child,
    socket: PathBuf,
    /// The export's size in bytes, as an NBD client (nbdinfo) sees it.
    pub size: u64,
}

/// How long a server may take to start listening.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(20);

impl Server {
    /// Spawn `cmd` (which must listen on `socket`), wait until an NBD client can connect,
    /// and learn the export size. The server's stderr goes to `log`; `name` is for
    /// messages ("imgsafe", "qemu-nbd").
    pub fn start(
        name: &'static str,
        mut cmd: Command,
        socket: &Path,
        log: &Path,
    ) -> Result<Server> {
        let _ = std::fs::remove_file(socket);
        let log_file =
            File::create(log).with_context(|| format!("{}: cannot create", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", describe(&cmd)))?;
        let mut server = Server {
            child,
            socket: socket.to_path_buf(),
            size: 0,
        };
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                let msg = std::fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "{name} exited before serving ({status}): {}",
                    last_lines(&msg, 4)
                );
            }
            if socket.exists() {
                // The socket file exists from bind(); nbdinfo proves the server answers.
                let mut info = crate::tool("nbdinfo", "libnbd-bin")?;
                info.args(["--size", &server.uri()]);
                if let Ok(t) = timed(&mut info) {
                    server.size = String::from_utf8_lossy(&t.stdout)
                        .trim()
                        .parse()
                        .with_context(|| format!("{name}: nbdinfo printed no size"))?;
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                let msg = std::fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "{name} did not serve {} within {SERVER_START_TIMEOUT:?}: {}",
                    socket.display(),
                    last_lines(&msg, 4)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The NBD URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A tiny deterministic generator (SplitMix64): reproducible image contents without a
/// dependency, fast enough to fill a GiB in a debug build.
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fill `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// What one 1 MiB extent of the synthetic disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Never written: a hole in the raw file.
    Hole,
    /// Text-like, compressible data (logs, configuration, source).
    Text,
    /// Incompressible data (binaries, compressed archives, media).
    Random,
    /// Data followed by a zero tail, as a partly used filesystem block group looks.
    Partial,
}

/// The layout of extent `index`: about 20 % holes, 15 % text, 50 % random, 15 % partial,
/// spread deterministically so every run measures the same disk.
pub fn extent_kind(index: u64) -> Extent {
    let mut g = SplitMix::new(index ^ 0x1f2e_3d4c_5b6a_7988);
    match g.next_u64() % 20 {
        0..=3 => Extent::Hole,
        4..=6 => Extent::Text,
        7..=16 => Extent::Random,
        _ => Extent::Partial,
    }
}

/// The number in environment variable `name`, or `default` when it is not set.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?}: expected a number")),
    }
}

/// Write a raw disk image of `size` bytes (a multiple of 1 MiB) with realistic content:
/// mostly data, some holes (see [`extent_kind`]). Returns the bytes of data written.
pub fn make_raw_image(path: &Path, size: u64) -> Result<u64> {
    if !size.is_multiple_of(MIB) {
        bail!("raw image size {size} is not a multiple of 1 MiB");
    }
    let mut f = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    f.set_len(size)?;
    let text: Vec<u8> = (0..)
        .map(|i| {
            format!(
                "Nov 22 04:{:02}:{:02} host kernel: [{i:8}] eth0: link up, 1000 Mbps\n",
                i % 60,
                i % 60
            )
        })
        .flat_map(String::into_bytes)
        .take(MIB as usize)
        .collect();
    let mut buf = vec![0u8; MIB as usize];
    let mut rng = SplitMix::new(0x0069_6d67_7361_6665);
    let mut written = 0u64;
    for index in 0..size / MIB {
        let data: &[u8] = match extent_kind(index) {
            Extent::Hole => continue,
            Extent::Text => &text,
            Extent::Random => {
                rng.fill(&mut buf);
                &buf
            }
            Extent::Partial => {
                let used = (rng.next_u64() % 192 + 32) as usize * 4096;
                rng.fill(&mut buf[..used]);
                buf[used..].fill(0);
                &buf
            }
        };
        f.seek(SeekFrom::Start(index * MIB))?;
        f.write_all(data)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        written += MIB;
    }
    f.sync_all()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_count_is_the_middle() {
        let samples = [3.0, 1.0, 2.0];

        let m = median(&samples);

        assert_eq!(m, Some(2.0));
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_two() {
        let samples = [4.0, 1.0, 3.0, 2.0];

        let m = median(&samples);

        assert_eq!(m, Some(2.5));
    }

    #[test]
    fn median_of_nothing_is_none() {
        let m = median(&[]);

        assert_eq!(m, None);
    }

    #[test]
    fn ratio_above_one_means_imgsafe_faster() {
        let r = ratio(2.0, 3.0);

        assert_eq!(r, Some(1.5));
    }

    #[test]
    fn ratio_with_zero_imgsafe_time_is_none() {
        let r = ratio(0.0, 3.0);

        assert_eq!(r, None);
    }

    #[test]
    fn last_lines_keeps_the_tail_on_one_line() {
        let text = "a\n\nb\nc\n";

        let s = last_lines(text, 2);

        assert_eq!(s, "b | c");
    }

    #[test]
    fn stderr_summary_prefers_error_lines() {
        let stderr = "libguestfs: error: launch failed\nDo:\n  export LIBGUESTFS_DEBUG=1\n";

        let s = stderr_summary(stderr);

        assert_eq!(s, "libguestfs: error: launch failed");
    }

    #[test]
    fn stderr_summary_without_errors_keeps_the_tail() {
        let stderr = "one\ntwo\n";

        let s = stderr_summary(stderr);

        assert_eq!(s, "one | two");
    }

    #[test]
    fn layout_is_mostly_data_with_some_holes() {
        let kinds: Vec<Extent> = (0..1024).map(extent_kind).collect();

        let holes = kinds.iter().filter(|k| **k == Extent::Hole).count();

        assert!(
            (100..=320).contains(&holes),
            "{holes} holes in 1024 extents"
        );
    }

    #[test]
    fn generator_is_deterministic() {
        let (mut a, mut b) = (SplitMix::new(7), SplitMix::new(7));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);

        a.fill(&mut x);
        b.fill(&mut y);

        assert_eq!(x, y);
    }

    #[test]
    fn raw_image_has_holes_and_data() {
        let dir = tempdir();
        let path = dir.path().join("disk.raw");

        let written = make_raw_image(&path, 16 * MIB).unwrap();

        assert!(written > 0 && written < 16 * MIB, "{written} bytes of data");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB);
    }

    #[test]
    fn equal_files_have_no_difference() {
        let dir = tempdir();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"same bytes").unwrap();
        std::fs::write(&b, b"same bytes").unwrap();

        let d = first_difference(&a, &b).unwrap();

        assert_eq!(d, None);
    }

    #[test]
    fn different_files_report_the_first_differing_byte() {
        let dir = tempdir();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"same bytes").unwrap();
        std::fs::write(&b, b"same bytEs").unwrap();

        let d = first_difference(&a, &b).unwrap();

        assert_eq!(d.as_deref(), Some("first difference at byte 8"));
    }

    #[test]
    fn a_prefix_reports_the_sizes() {
        let dir = tempdir();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"same").unwrap();
        std::fs::write(&b, b"same bytes").unwrap();

        let d = first_difference(&a, &b).unwrap();

        assert_eq!(
            d.as_deref(),
            Some("sizes differ: 4 vs 10 bytes (the first 4 bytes are equal)")
        );
    }

    fn tempdir() -> WorkDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        WorkDir::create(
            std::env::temp_dir().join(format!("xtask-bench-test-{}-{n}", std::process::id())),
        )
        .unwrap()
    }
}
