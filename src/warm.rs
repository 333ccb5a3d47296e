//! Warm start: the saved state of a booted appliance, kept per user in the appliance
//! cache, so that a command restores a guest whose agent is already waiting instead of
//! booting one.
//!
//! A state is taken once the agent has answered its first hello and *before any image
//! disk is attached*, so it never holds anything read from an image. It is two files in
//! a directory of its own: `ram`, the guest's memory (QEMU ran with it as a shared
//! file-backed memory, so it is complete when the VM stops), and `dev`, the device state
//! QEMU migrated to a file with `x-ignore-shared` (a few hundred KiB). A restoring QEMU
//! maps `ram` private and read-only, so sessions share its pages through the page cache
//! and none can change it.
//!
//! Layout of `$XDG_CACHE_HOME/imgsafe/warm/` (0700):
//!
//! ```text
//! KEY -> KEY.RANDOM        symlink: the current state for KEY, replaced atomically
//! KEY.RANDOM/ram, dev      one state, never changed after it is published
//! KEY.lock                 held (flock) by the one process saving a state for KEY
//! ```
//!
//! A reader resolves the symlink once and uses the concrete directory, so it never mixes
//! the files of two states; writers build a new directory and swap the link. KEY is a
//! hash of everything that would make a state wrong elsewhere (see [`key`]).

use crate::vm::{GuestRam, VmConfig};
use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Bumped when the layout or the way a state is taken changes.
const LAYOUT_VERSION: &str = "imgsafe-warm-1";
/// Largest device state accepted (QEMU writes ~150 KiB for the appliance).
pub const MAX_DEVICE_STATE: u64 = 64 << 20;
/// How many configurations keep a saved state (tests and users switch between
/// machine types and accelerators; each state is mostly sparse RAM).
const MAX_STATES: usize = 4;
/// A state directory no link points to is removed once it is this old (a reader that
/// resolved the link just before it was swapped has long opened its files by then).
const ORPHAN_AGE: Duration = Duration::from_secs(120);
/// Characters of the hex key used in file names.
const KEY_CHARS: usize = 32;

/// Why the warm path could not be used; shown in one `-v` line, never as an error.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The cache directory could not be made or read.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A saved state is not what it should be.
    #[error("saved state {}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WarmError + '_ {
    move |source| WarmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether commands use the warm path: `IMGSAFE_WARM=0` turns it off (every command
/// then boots cold, as for benchmarks); unset or `1` leaves it on.
pub fn enabled() -> Result<bool, String> {
    match std::env::var_os("IMGSAFE_WARM") {
        None => Ok(true),
        Some(v) if v.is_empty() || v == "1" => Ok(true),
        Some(v) if v == "0" => Ok(false),
        Some(v) => Err(format!(
            "IMGSAFE_WARM={:?}: expected 0 or 1",
            v.to_string_lossy()
        )),
    }
}

/// The key of the state a VM made from `cfg` would save or restore: a hash of the
/// layout version, the agent protocol, the QEMU command line without its per-run
/// paths (machine and its options, accelerator, CPU model, memory, vCPUs, kernel and
/// initramfs paths — the appliance's own hash is part of them — and kernel arguments),
/// and the identity (path, size, mtime, inode) of the QEMU binary, its firmware, the
/// kernel and the initramfs, and the host processor's model and features (not the
/// TSC rate measured for the first boot, which jitters from process to process). Any change gives another key, so a stale state is never
/// restored: the next command boots cold and saves a new one.
pub fn key(cfg: &VmConfig) -> String {
    let mut shape = cfg.clone();
    shape.qmp_socket = PathBuf::from("qmp");
    shape.agent_socket = PathBuf::from("agent");
    shape.console_log = shape.console_log.map(|_| PathBuf::from("console"));
    shape.ram = GuestRam::Anonymous;
    shape.incoming = false;
    shape.disks.clear();
    // Measured anew by every process when sysfs does not say, with tens of MHz of
    // jitter on a loaded host (a rounded value still straddled buckets, so two
    // commands got two keys). Only the first boot uses it; a restored guest's clock is
    // set at every hello, and the host processor is in the key below instead.
    shape.tsc_khz = None;
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update(imgsafe_proto::PROTOCOL_VERSION.to_le_bytes());
    for arg in shape.argv() {
        h.update(arg.as_encoded_bytes());
        h.update([0]);
    }
    let qemu = crate::vm::machine::resolve(&cfg.qemu).unwrap_or_else(|| cfg.qemu.clone());
    for file in [Some(qemu.as_path()), cfg.firmware.as_deref()]
        .into_iter()
        .flatten()
        .chain([cfg.kernel.as_path(), cfg.initrd.as_path()])
    {
        h.update(file.as_os_str().as_encoded_bytes());
        h.update([0]);
        if let Ok(m) = fs::metadata(file) {
            h.update(m.len().to_le_bytes());
            h.update(m.mtime().to_le_bytes());
            h.update(m.mtime_nsec().to_le_bytes());
            h.update(m.ino().to_le_bytes());
        }
    }
    // Under KVM `-cpu host` is whatever this processor is, and under TCG the guest
    // calibrated its clock against this host's TSC: a cache shared between machines
    // (a network home) must not restore one CPU's state on another.
    h.update(host_cpu_identity());
    let digest = h.finalize();
    digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .chars()
        .take(KEY_CHARS)
        .collect()
}

/// The first processor's model name and feature flags from /proc/cpuinfo.
fn host_cpu_identity() -> Vec<u8> {
    let text = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    text.lines()
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| {
            [
                "vendor_id",
                "cpu family",
                "model",
                "model name",
                "stepping",
                "flags",
            ]
            .iter()
            .any(|k| l.split(':').next().is_some_and(|f| f.trim() == *k))
        })
        .flat_map(|l| l.bytes().chain([b'\n']))
        .collect()
}

/// The per-user store of saved states.
pub struct Store {
    dir: PathBuf,
}

/// One published state.
#[derive(Debug, Clone)]
pub struct State {
    /// The key it was saved under.
    pub key: String,
    /// Its own directory (`KEY.RANDOM`).
    pub dir: PathBuf,
    /// Guest RAM (sparse; its length is the guest's memory size).
    pub ram: PathBuf,
    /// QEMU's device state.
    pub dev: PathBuf,
}

impl State {
    /// Bytes the state takes on disk (the RAM file is sparse).
    pub fn disk_usage(&self) -> u64 {
        [&self.ram, &self.dev]
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

/// A state being saved: its directory, not yet published, and the save lock.
pub struct Pending {
    key: String,
    dir: PathBuf,
    /// Guest RAM to map shared while booting (already sized).
    pub ram: PathBuf,
    /// Where QEMU writes the device state.
    pub dev: PathBuf,
    _lock: fs::File,
}

impl Drop for Pending {
    /// A save that was not published leaves nothing behind.
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Store {
    /// The store under the appliance cache root, made 0700 if missing.
    pub fn open(cache_root: &Path) -> Result<Store, WarmError> {
        let dir = cache_root.join("warm");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        Ok(Store { dir })
    }

    /// The published state for `key`, if there is one that looks whole: a RAM file of
    /// exactly `memory_bytes` and a device state of sane size. What it holds is only
    /// known once QEMU has restored it; any failure then is reported by the caller,
    /// which [`discard`](Store::discard)s it.
    pub fn lookup(&self, key: &str, memory_bytes: u64) -> Result<Option<State>, WarmError> {
        let link = self.dir.join(key);
        let target = match fs::read_link(&link) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&link)(e)),
        };
        let name = target.to_string_lossy();
        let ok_name = name
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()));
        let state = State {
            key: key.to_string(),
            dir: self.dir.join(&target),
            ram: self.dir.join(&target).join("ram"),
            dev: self.dir.join(&target).join("dev"),
        };
        let invalid = |what: String| WarmError::Invalid {
            path: state.dir.clone(),
            what,
        };
        if !ok_name {
            return Err(invalid(format!("link points to {name:?}")));
        }
        let ram = fs::symlink_metadata(&state.ram).map_err(|e| invalid(format!("ram: {e}")))?;
        let dev = fs::symlink_metadata(&state.dev).map_err(|e| invalid(format!("dev: {e}")))?;
        if !ram.is_file() || ram.len() != memory_bytes {
            return Err(invalid(format!(
                "ram is {} bytes, expected {memory_bytes}",
                ram.len()
            )));
        }
        if !dev.is_file() || dev.len() == 0 || dev.len() > MAX_DEVICE_STATE {
            return Err(invalid(format!("device state is {} bytes", dev.len())));
        }
        Ok(Some(state))
    }

    /// Forget a state that failed: the link goes if it still points to it, then its
    /// directory (a session that already mapped its files keeps them until it ends).
    pub fn discard(&self, state: &State) {
        let link = self.dir.join(&state.key);
        if fs::read_link(&link).is_ok_and(|t| self.dir.join(t) == state.dir) {
            let _ = fs::remove_file(&link);
        }
        let _ = fs::remove_dir_all(&state.dir);
    }

    /// Forget whatever is published for `key` (a broken link, a state that does not
    /// look whole).
    pub fn discard_key(&self, key: &str) {
        let link = self.dir.join(key);
        if let Ok(t) = fs::read_link(&link) {
            let _ = fs::remove_file(&link);
            let dir = self.dir.join(t);
            if dir.parent() == Some(self.dir.as_path()) {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }

    /// Start saving a state for `key`, unless another process is saving one (then
    /// `None`: this command boots cold without saving, rather than wait).
    pub fn begin_save(&self, key: &str, memory_bytes: u64) -> Result<Option<Pending>, WarmError> {
        let lock_path = self.dir.join(format!("{key}.lock"));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let dir = self.dir.join(format!("{key}.{}", random_suffix()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        let ram = dir.join("ram");
        let dev = dir.join("dev");
        let pending = Pending {
            key: key.to_string(),
            dir,
            ram,
            dev,
            _lock: lock,
        };
        // Sized here, so QEMU never extends it (it runs under a file-size limit).
        fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&pending.ram)
            .and_then(|f| f.set_len(memory_bytes))
            .map_err(io_err(&pending.ram))?;
        Ok(Some(pending))
    }

    /// Publish a saved state: its link replaces any older one for the key in one
    /// rename, then states beyond the newest [`MAX_STATES`] and orphaned directories
    /// are removed.
    pub fn publish(&self, mut pending: Pending) -> Result<State, WarmError> {
        let name = pending
            .dir
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        let tmp_link = self.dir.join(format!(".{}.link", name.display()));
        std::os::unix::fs::symlink(&name, &tmp_link).map_err(io_err(&tmp_link))?;
        let link = self.dir.join(&pending.key);
        if let Err(e) = fs::rename(&tmp_link, &link) {
            let _ = fs::remove_file(&tmp_link);
            return Err(io_err(&link)(e));
        }
        let state = State {
            key: pending.key.clone(),
            dir: pending.dir.clone(),
            ram: pending.ram.clone(),
            dev: pending.dev.clone(),
        };
        // Published: Drop must not remove it.
        pending.dir = PathBuf::new();
        self.collect_garbage();
        Ok(state)
    }

    /// Remove the oldest states beyond [`MAX_STATES`], and directories no link points
    /// to once they are [`ORPHAN_AGE`] old (left by a process killed while saving).
    fn collect_garbage(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut links: Vec<(SystemTime, PathBuf, PathBuf)> = Vec::new();
        let mut dirs: Vec<PathBuf> = Vec::new();
        for e in rd.filter_map(Result::ok) {
            let path = e.path();
            let Ok(m) = fs::symlink_metadata(&path) else {
                continue;
            };
            if m.file_type().is_symlink() {
                if let Ok(t) = fs::read_link(&path) {
                    links.push((
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        path,
                        self.dir.join(t),
                    ));
                }
            } else if m.is_dir() {
                dirs.push(path);
            }
        }
        links.sort_by_key(|l| std::cmp::Reverse(l.0));
        for (_, link, target) in links.iter().skip(MAX_STATES) {
            let _ = fs::remove_file(link);
            let _ = fs::remove_dir_all(target);
        }
        let live: Vec<&PathBuf> = links.iter().take(MAX_STATES).map(|l| &l.2).collect();
        for d in dirs {
            let old = fs::metadata(&d)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > ORPHAN_AGE);
            if old && !live.contains(&&d) {
                let _ = fs::remove_dir_all(&d);
            }
        }
    }
}

/// 16 random alphanumeric characters for a state directory's name.
fn random_suffix() -> String {
    let mut bytes = [0u8; 16];
    if crate::agent_client::random_bytes(&mut bytes).is_err() {
        // Uniqueness is all that matters here (create() refuses an existing name).
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Accel;

    fn cfg(run_dir: &Path) -> VmConfig {
        VmConfig::new(Accel::Tcg, Path::new("/k"), Path::new("/i"), run_dir)
    }

    #[test]
    fn key_ignores_per_run_paths_and_disks() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut other = cfg(b.path());
        other.disks.push(crate::vm::DiskSpec {
            nbd_socket: b.path().join("nbd.sock"),
            export: String::new(),
            read_only: true,
            overlay: None,
        });
        other.ram = GuestRam::SaveTo(b.path().join("ram"));

        assert_eq!(key(&cfg(a.path())), key(&other));
    }

    #[test]
    fn key_ignores_jitter_in_the_measured_tsc_rate() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = cfg(dir.path());
        let mut b = cfg(dir.path());
        a.tsc_khz = Some(2_595_764);
        b.tsc_khz = Some(2_542_601);

        assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn key_changes_with_what_makes_a_state_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let base = key(&cfg(dir.path()));
        type Change = Box<dyn Fn(&mut VmConfig)>;
        let changes: Vec<Change> = vec![
            Box::new(|c| c.memory_mib += 1),
            Box::new(|c| c.cpus += 1),
            Box::new(|c| c.accel = Accel::Kvm),
            Box::new(|c| c.machine = crate::vm::Machine::Q35),
            Box::new(|c| c.kernel = PathBuf::from("/k2")),
            Box::new(|c| c.qemu = PathBuf::from("/other/qemu")),
            Box::new(|c| c.extra_cmdline.push("imgsafe.debug=1".into())),
        ];

        for change in changes {
            let mut c = cfg(dir.path());
            change(&mut c);
            assert_ne!(key(&c), base);
        }
    }

    #[test]
    fn a_published_state_is_found_and_a_discarded_one_is_gone() {
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let pending = store.begin_save("k1", 4096).unwrap().unwrap();
        fs::write(&pending.dev, b"device state").unwrap();

        let state = store.publish(pending).unwrap();
        let found = store.lookup("k1", 4096).unwrap().unwrap();
        store.discard(&found);

        assert_eq!(found.dir, state.dir);
        assert!(store.lookup("k1", 4096).unwrap().is_none());
        assert!(!state.dir.exists());
    }

    #[test]
    fn a_state_with_the_wrong_memory_size_is_invalid() {
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let pending = store.begin_save("k1", 4096).unwrap().unwrap();
        fs::write(&pending.dev, b"device state").unwrap();
        store.publish(pending).unwrap();

        let err = store.lookup("k1", 8192).unwrap_err();

        assert!(err.to_string().contains("expected 8192"), "{err}");
    }

    #[test]
    fn only_one_process_saves_a_key_at_a_time_and_an_unpublished_save_leaves_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();

        let first = store.begin_save("k1", 4096).unwrap().unwrap();
        let second = Store::open(cache.path())
            .unwrap()
            .begin_save("k1", 4096)
            .unwrap();
        let dir = first.dir.clone();
        drop(first);

        assert!(second.is_none());
        assert!(!dir.exists());
        assert!(store.begin_save("k1", 4096).unwrap().is_some());
    }

    #[test]
    fn the_store_is_private_to_its_user() {
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let pending = store.begin_save("k1", 4096).unwrap().unwrap();

        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;

        assert_eq!(mode(&cache.path().join("warm")), 0o700);
        assert_eq!(mode(&pending.dir), 0o700);
        assert_eq!(mode(&pending.ram), 0o600);
    }

    #[test]
    fn older_states_beyond_the_limit_are_removed() {
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let mut states = Vec::new();
        for i in 0..MAX_STATES + 2 {
            let p = store.begin_save(&format!("k{i}"), 4096).unwrap().unwrap();
            fs::write(&p.dev, b"d").unwrap();
            states.push(store.publish(p).unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }

        let kept = (0..MAX_STATES + 2)
            .filter(|i| store.lookup(&format!("k{i}"), 4096).unwrap().is_some())
            .count();

        assert_eq!(kept, MAX_STATES);
        assert!(store
            .lookup(&format!("k{}", MAX_STATES + 1), 4096)
            .unwrap()
            .is_some());
        assert!(!states[0].dir.exists());
    }
}
