//! The protocol between the imgsafe host process and the guest agent.
//!
//! Transport: a byte stream (virtio-serial port in the guest, Unix socket on the host).
//! Every message is one frame:
//!
//! ```text
//! u32 little-endian  length of what follows (kind byte + payload), 1 ..= MAX_FRAME
//! u8                 kind: KIND_MSG (payload = JSON Request/Response) or KIND_DATA (raw bytes)
//! payload
//! ```
//!
//! The host speaks first with `Request::Hello`; every request gets exactly one
//! `Response`, except the streaming ones documented on their variants. The host treats
//! every frame from the guest as hostile: lengths are bounded before allocation and
//! names are validated with [`validate_name`] before use.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

mod escape;
pub mod fstypes;
pub mod lvm_names;
pub use escape::unescape_octal;

/// The file the appliance builder writes last into the initramfs; the agent checks it
/// is there before anything else (see the builder).
pub const INITRAMFS_COMPLETE: &str = "/etc/imgsafe/complete";

/// Kernel argument the host boots the appliance with, and the agent's sign that it is
/// the appliance's init. Having no dot in its name, the kernel passes it to init as the
/// environment variable [`APPLIANCE_MARKER_VAR`] = `1`.
pub const APPLIANCE_MARKER: &str = "imgsafe_appliance=1";
/// The environment variable the kernel makes of [`APPLIANCE_MARKER`].
pub const APPLIANCE_MARKER_VAR: &str = "imgsafe_appliance";

/// Bumped whenever a message changes shape (5: mapped reads, btrfs subvolumes and LUKS
/// unlock together).
pub const PROTOCOL_VERSION: u32 = 5;
/// Largest frame (kind byte + payload) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk the agent sends in one `KIND_DATA` frame.
pub const CHUNK: usize = 256 * 1024;
/// Longest file name component (Linux NAME_MAX).
pub const MAX_NAME: usize = 255;
/// Longest path the host sends (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most entries one `ReadDir` answer may carry before it is split.
pub const MAX_DIR_ENTRIES_PER_FRAME: usize = 2048;
/// Most extents one `FileMap` carries; a file in more pieces is streamed instead.
pub const MAX_MAP_EXTENTS: usize = 8192;
/// Files smaller than this are streamed even when a map is asked for: their bytes are a
/// frame or two, cheaper than a map and the reads of its check.
pub const MAP_MIN: u64 = 256 * 1024;
/// Bytes at each end of a mapped file the agent hashes through the filesystem
/// (`FileMap::edge_sha256`), so the host can check the map against what the file holds.
pub const MAP_EDGE: u64 = 64 * 1024;
/// Frame kind: a JSON-encoded [`Request`] or [`Response`].
pub const KIND_MSG: u8 = 1;
/// Frame kind: raw file bytes (a chunk of a file being read).
pub const KIND_DATA: u8 = 2;
/// Frame kind: raw bytes a guest shell wrote to its stderr (only during a `Shell`
/// session, read with [`read_shell_frame`]; [`read_frame`] refuses it).
pub const KIND_STDERR: u8 = 3;
/// Name of the virtio-serial port the agent opens (`/dev/virtio-ports/<name>`).
pub const PORT_NAME: &str = "org.imgsafe.agent";

/// Most bytes of entropy one `Hello` carries.
pub const MAX_ENTROPY: usize = 256;
/// Most btrfs subvolumes one `Subvolumes` answer lists.
pub const MAX_SUBVOLUMES: usize = 1024;
/// The id of a btrfs filesystem's top-level subvolume (BTRFS_FS_TREE_OBJECTID).
pub const BTRFS_TOP_LEVEL: u64 = 5;

/// Most bytes of a LUKS key (`Unlock`): far more than any passphrase or key file in
/// use (4 KiB random files are the usual), and one frame.
pub const MAX_KEY: usize = 64 * 1024;
/// Most LUKS containers one `Unlock` answer names.
pub const MAX_UNLOCKED: usize = 256;
/// Most disks one `Hello` asks the agent to wait for.
pub const MAX_HELLO_DISKS: usize = 16;
/// Longest virtio-blk serial (the device's ID string is 20 bytes).
pub const MAX_DISK_SERIAL: usize = 20;

/// Wall-clock time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WallClock {
    pub secs: u64,
    pub nanos: u32,
}

impl WallClock {
    /// The current time of this machine.
    pub fn now() -> WallClock {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        WallClock {
            secs: d.as_secs(),
            nanos: d.subsec_nanos(),
        }
    }
}

/// Whether `s` is a disk serial the agent may look for: 1 to [`MAX_DISK_SERIAL`] ASCII
/// letters, digits, `-` or `_` (it is compared with sysfs text, never used as a path).
pub fn valid_disk_serial(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_DISK_SERIAL
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First message of every session; the agent answers `Hello` with its own version
    /// and the same `nonce`. A guest restored from a saved state is a copy of one that
    /// already said hello, so this message is also what makes it fresh: it credits
    /// `entropy` to the guest's random pool, sets the clock to `time`, and waits for the
    /// disks named in `disks` (hot-added after the restore) before it answers.
    Hello {
        version: u32,
        /// Chosen at random per session and echoed: an answer that does not carry it
        /// belongs to another session (or to the saved guest's past) and is refused.
        nonce: u64,
        /// Fresh random bytes from the host, at most [`MAX_ENTROPY`].
        entropy: Vec<u8>,
        /// The host's wall-clock time.
        time: WallClock,
        /// Serials of the virtio disks the agent must see before it answers (at most
        /// [`MAX_HELLO_DISKS`], each a short ASCII name, see [`valid_disk_serial`]).
        disks: Vec<String>,
    },
    /// Probe every block device and partition (and LVM volume) the guest sees.
    ListFilesystems,
    /// Open every LUKS container on the disks (RAID arrays are assembled first; LVM
    /// volumes are activated after, and containers on them opened too) read-only with
    /// a key, which follows as one DATA frame of exactly `len` bytes (at most
    /// [`MAX_KEY`]); it is never in a message, so never in JSON or a request log.
    /// Answered by `Unlocked`.
    Unlock { len: u32 },
    /// Mount `device` at the guest's sysroot + `mountpoint` ("/" for the root).
    /// `fstype` None = the type the probe found. Read-only, journals never replayed,
    /// unless `writable` (only asked when the host put a throwaway copy-on-write layer
    /// over the disk): then read-write if the filesystem allows it, else read-only.
    Mount {
        device: String,
        mountpoint: String,
        fstype: Option<String>,
        writable: bool,
        /// btrfs only: mount this subvolume (an id from `Subvolumes`) instead of the
        /// filesystem's default one.
        subvolid: Option<u64>,
    },
    /// The subvolumes of the btrfs on `device` (mounted privately, read-only, for as
    /// long as it takes to list them). Answered by `Subvolumes`.
    Subvolumes { device: String },
    /// List a directory of the mounted tree. Answered by one or more `DirEntries` frames,
    /// the last with `done: true`.
    ReadDir { path: Vec<u8> },
    /// lstat one path of the mounted tree. Answered by `Stat`.
    Stat { path: Vec<u8> },
    /// Read a regular file: answered by `FileStart`, then DATA frames, then `FileEnd`
    /// (or `Error` at any point, which ends the stream).
    ReadFile { path: Vec<u8> },
    /// Like `ReadFile`, but the agent may answer `FileMap` instead of the stream when it
    /// can say where the file's bytes lie on the image disk (see [`FileMap`]); the host
    /// then reads them itself. Any file it cannot map is streamed as for `ReadFile`.
    ReadFileMapped { path: Vec<u8> },
    /// Recursive walk below a directory, depth first, pre-order, never following symlinks:
    /// answered by `WalkEntries` frames, the last with `done: true`.
    Walk { path: Vec<u8> },
    /// Read a symlink's target. Answered by `Link`.
    ReadLink { path: Vec<u8> },
    /// Unmount whatever is mounted at (and below) sysroot + `mountpoint`. Answered by
    /// `Unmounted`.
    Unmount { mountpoint: String },
    /// Unmount everything, sync and power the guest off. Answered by `Bye` first.
    Shutdown,
    /// Run busybox sh in the guest with cwd `/sysroot`. Answered by `ShellStarted` (or
    /// `Error`); then the session owns the channel: the host sends DATA frames (stdin),
    /// `ShellResize` and `ShellEof`; the guest sends DATA (stdout, or the pty's output)
    /// and STDERR frames, then `ShellExit` once the shell has exited and its output is
    /// drained. The host answers `ShellDone`; the guest discards everything before it
    /// and then goes back to answering requests.
    Shell(ShellStart),
    /// New terminal size for the shell's pty (ignored in pipe mode).
    ShellResize { rows: u16, cols: u16 },
    /// The host's stdin ended: close the shell's stdin (pipe mode).
    ShellEof,
    /// The host's stdout is gone (a closed pipe, as in `imgsafe shell -c yes | head -1`):
    /// end the shell's process group as a broken pipe would (SIGPIPE; SIGHUP on a pty).
    ShellOutputClosed,
    /// The host saw `ShellExit`; the session is over.
    ShellDone,
}

/// How to start a guest shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellStart {
    /// `sh -c COMMAND`; None = read commands from stdin (or interactive with `tty`).
    pub command: Option<Vec<u8>>,
    /// Some(size) = run on a pty of that size (interactive); None = stdin, stdout and
    /// stderr are three pipes.
    pub tty: Option<WinSize>,
    /// TERM for the shell (interactive only).
    pub term: Option<String>,
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// One filesystem mounted below the guest sysroot, as the guest's mount table says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellMount {
    /// Device (or `overlay`).
    pub device: String,
    /// Mount point in the guest (`/sysroot`, `/sysroot/boot`).
    pub path: String,
    pub fstype: String,
    /// Mounted read-write (only with `--overlay`, and not every filesystem can be).
    pub writable: bool,
}

/// How a guest shell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShellStatus {
    /// exit(code).
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// Kind of a directory entry, from lstat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// lstat fields of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// One name component, raw bytes (not necessarily UTF-8). Empty for `Stat` of "/".
    pub name: Vec<u8>,
    pub kind: FileType,
    /// Permission bits and set-id/sticky bits (st_mode & 0o7777).
    pub mode: u32,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    /// Symlink target, raw bytes, for symlinks only.
    pub target: Option<Vec<u8>>,
}

/// One entry of a `Walk`: its path below the walked directory, as name components.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalkEntry {
    /// Components from the walked directory to this entry, each a single name.
    pub path: Vec<Vec<u8>>,
    pub entry: Entry,
}

/// Where a regular file's bytes lie on the image disk: FIEMAP's extents translated to
/// byte offsets of the whole virtual disk (through the partition's start and linear
/// device-mapper tables). Logical ranges not covered are holes (zeros).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMap {
    /// The file's size (st_size of the open file).
    pub size: u64,
    /// Serial of the virtio disk the offsets point into.
    pub disk: String,
    /// In logical order, not overlapping.
    pub extents: Vec<MapExtent>,
    /// SHA-256 of the file's first `min(MAP_EDGE, size)` bytes followed by its last
    /// `min(MAP_EDGE, size)` bytes, read through the filesystem.
    pub edge_sha256: Vec<u8>,
}

/// One extent of a [`FileMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapExtent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset in the whole virtual disk.
    pub physical: u64,
    pub length: u64,
    /// Allocated but never written (preallocated): reads as zeros.
    pub unwritten: bool,
}

/// One block device, partition or logical volume the guest found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfo {
    /// Guest device path, e.g. `/dev/vda2` or `/dev/mapper/vg-lv`.
    pub device: String,
    /// Size in bytes.
    pub size: u64,
    /// Filesystem type as the probe names it: one of [`fstypes::FILESYSTEMS`], or
    /// `swap`, `LVM2_member`, `jbd`; None when nothing was recognised.
    pub fstype: Option<String>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// Partition number (1-based) for partitions.
    pub partition: Option<u32>,
    /// GPT partition UUID, if any.
    pub partuuid: Option<String>,
    /// True for a whole disk that carries a partition table.
    pub partitioned: bool,
}

/// One btrfs subvolume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subvolume {
    /// Its id (256 and up; [`BTRFS_TOP_LEVEL`] is the top level itself).
    pub id: u64,
    /// Its path from the top level, without a leading `/` (`@home`,
    /// `@/.snapshots/1/snapshot`), as `subvol=` takes it.
    pub path: String,
}

/// Category of an agent-side failure, so the host can pick an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The path does not exist in the image.
    NotFound,
    /// A directory where a file was needed.
    IsDirectory,
    /// A non-directory where a directory was needed.
    NotDirectory,
    /// Resolving the path met a symlink loop (ELOOP, or more links than the agent
    /// follows).
    TooManyLinks,
    /// Nothing mountable, or mount failed.
    Mount,
    /// The request was malformed or out of order.
    BadRequest,
    /// Anything else (I/O error reading the filesystem, ...).
    Other,
}

/// A response from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        version: u32,
        kernel: String,
        /// The request's nonce, echoed.
        nonce: u64,
    },
    Filesystems {
        list: Vec<FsInfo>,
    },
    /// The LUKS containers (guest devices) the key opened, and those where it opened
    /// no key slot; each list at most [`MAX_UNLOCKED`]. Any other failure to open one
    /// is an `Error`.
    Unlocked {
        opened: Vec<String>,
        refused: Vec<String>,
    },
    Mounted {
        device: String,
        fstype: String,
    },
    /// At most [`MAX_SUBVOLUMES`], in id order.
    Subvolumes {
        /// The subvolume a mount without `subvolid` gets.
        default: u64,
        list: Vec<Subvolume>,
    },
    DirEntries {
        entries: Vec<Entry>,
        done: bool,
    },
    Stat {
        entry: Entry,
    },
    FileStart {
        size: u64,
    },
    FileEnd,
    /// Answer to `ReadFileMapped` for a file the agent could map.
    FileMap(FileMap),
    WalkEntries {
        entries: Vec<WalkEntry>,
        done: bool,
    },
    Link {
        target: Vec<u8>,
    },
    /// Answer to `Unmount`: how many mounts were removed (0 = nothing was mounted there).
    Unmounted {
        count: u32,
    },
    Bye,
    /// The shell runs; what is mounted where.
    ShellStarted {
        mounts: Vec<ShellMount>,
    },
    /// The shell exited and all its output was sent.
    ShellExit {
        status: ShellStatus,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<T> {
    Msg(T),
    Data(Vec<u8>),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or failed.
    #[error("agent channel: {0}")]
    Io(#[from] io::Error),
    /// A length of 0 or above [`MAX_FRAME`].
    #[error("agent sent a frame of {0} bytes (limit {MAX_FRAME})")]
    TooLarge(usize),
    /// A kind byte other than the two known.
    #[error("agent sent a frame of unknown kind {0}")]
    UnknownKind(u8),
    /// The JSON did not decode to the expected message.
    #[error("agent sent a malformed message: {0}")]
    Malformed(String),
}

/// Write one message frame.
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let json =
        serde_json::to_vec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    write_frame(w, KIND_MSG, &json)
}

/// Write one data frame (`data.len()` must be below [`MAX_FRAME`]).
pub fn write_data<W: Write>(w: &mut W, data: &[u8]) -> io::Result<()> {
    write_frame(w, KIND_DATA, data)
}

fn write_frame<W: Write>(w: &mut W, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = payload.len() + 1;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = kind;
    w.write_all(&head)?;
    w.write_all(payload)?;
    Ok(())
}

/// Read one frame, bounded by [`MAX_FRAME`], and decode a message frame as `T`.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Frame<T>, FrameError> {
    match read_shell_frame(r)? {
        ShellFrame::Msg(m) => Ok(Frame::Msg(m)),
        ShellFrame::Data(d) => Ok(Frame::Data(d)),
        // Stderr frames belong to shell sessions only; anywhere else the kind is unknown.
        ShellFrame::Stderr(_) => Err(FrameError::UnknownKind(KIND_STDERR)),
    }
}

/// A frame of a shell session.
#[derive(Debug, PartialEq, Eq)]
pub enum ShellFrame<T> {
    Msg(T),
    /// stdin (host to guest), stdout or pty output (guest to host).
    Data(Vec<u8>),
    /// The shell's stderr (guest to host).
    Stderr(Vec<u8>),
}

/// Write one stderr frame (`data.len()` must be below [`MAX_FRAME`]).
pub fn write_stderr<W: Write>(w: &mut W, data: &[u8]) -> io::Result<()> {
    write_frame(w, KIND_STDERR, data)
}

/// Like [`read_frame`], also accepting [`KIND_STDERR`] frames (shell sessions only).
pub fn read_shell_frame<R: Read, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<ShellFrame<T>, FrameError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload)?;
    match head[4] {
        KIND_MSG => serde_json::from_slice(&payload)
            .map(ShellFrame::Msg)
            .map_err(|e| FrameError::Malformed(e.to_string())),
        KIND_DATA => Ok(ShellFrame::Data(payload)),
        KIND_STDERR => Ok(ShellFrame::Stderr(payload)),
        k => Err(FrameError::UnknownKind(k)),
    }
}

/// Why a name from the guest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name is . or ..")]
    Dot,
    #[error("name contains '/'")]
    Slash,
    #[error("name contains a NUL byte")]
    Nul,
    #[error("name longer than {MAX_NAME} bytes")]
    TooLong,
}

/// Check that `name` is one safe path component: not empty, not `.` or `..`, no `/`, no
/// NUL, at most [`MAX_NAME`] bytes. The host calls this on every name the guest sends
/// before it uses the name for anything.
pub fn validate_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == b"." || name == b".." {
        return Err(NameError::Dot);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    if name.contains(&b'/') {
        return Err(NameError::Slash);
    }
    if name.contains(&0) {
        return Err(NameError::Nul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_the_host_boots_with_is_the_variable_the_agent_reads() {
        let var = format!("{APPLIANCE_MARKER_VAR}=1");

        assert_eq!(APPLIANCE_MARKER, var);
        assert!(!APPLIANCE_MARKER_VAR.contains('.'));
    }

    #[test]
    fn message_round_trips() {
        let mut buf = Vec::new();
        let req = Request::ReadFile {
            path: b"/etc/\xffname".to_vec(),
        };

        write_msg(&mut buf, &req).unwrap();
        let back: Frame<Request> = read_frame(&mut buf.as_slice()).unwrap();

        assert_eq!(back, Frame::Msg(req));
    }

    #[test]
    fn data_round_trips() {
        let mut buf = Vec::new();

        write_data(&mut buf, b"\0\x01binary").unwrap();
        let back: Frame<Request> = read_frame(&mut buf.as_slice()).unwrap();

        assert_eq!(back, Frame::Data(b"\0\x01binary".to_vec()));
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let head = [0xff, 0xff, 0xff, 0x7f, KIND_DATA];

        let err = read_frame::<_, Response>(&mut head.as_slice()).unwrap_err();

        assert!(matches!(err, FrameError::TooLarge(_)));
    }

    #[test]
    fn zero_length_frame_is_refused() {
        let head = [0, 0, 0, 0, KIND_DATA];

        let err = read_frame::<_, Response>(&mut head.as_slice()).unwrap_err();

        assert!(matches!(err, FrameError::TooLarge(0)));
    }

    #[test]
    fn unknown_kind_is_refused() {
        let head = [1, 0, 0, 0, 9];

        let err = read_frame::<_, Response>(&mut head.as_slice()).unwrap_err();

        assert!(matches!(err, FrameError::UnknownKind(9)));
    }

    #[test]
    fn shell_frames_keep_stdout_and_stderr_apart() {
        let mut buf = Vec::new();
        write_data(&mut buf, b"out\xff").unwrap();
        write_stderr(&mut buf, b"err\0").unwrap();
        write_msg(
            &mut buf,
            &Response::ShellExit {
                status: ShellStatus::Exited(3),
            },
        )
        .unwrap();
        let mut r = buf.as_slice();

        let frames: Vec<ShellFrame<Response>> =
            (0..3).map(|_| read_shell_frame(&mut r).unwrap()).collect();

        assert_eq!(
            frames,
            vec![
                ShellFrame::Data(b"out\xff".to_vec()),
                ShellFrame::Stderr(b"err\0".to_vec()),
                ShellFrame::Msg(Response::ShellExit {
                    status: ShellStatus::Exited(3)
                })
            ]
        );
    }

    #[test]
    fn stderr_frames_are_refused_outside_a_shell() {
        let mut buf = Vec::new();
        write_stderr(&mut buf, b"x").unwrap();

        let err = read_frame::<_, Response>(&mut buf.as_slice()).unwrap_err();

        assert!(matches!(err, FrameError::UnknownKind(KIND_STDERR)));
    }

    #[test]
    fn hostile_names_are_refused() {
        assert_eq!(validate_name(b""), Err(NameError::Empty));
        assert_eq!(validate_name(b"."), Err(NameError::Dot));
        assert_eq!(validate_name(b".."), Err(NameError::Dot));
        assert_eq!(validate_name(b"a/b"), Err(NameError::Slash));
        assert_eq!(validate_name(b"a\0b"), Err(NameError::Nul));
        assert_eq!(validate_name(&[b'x'; 256]), Err(NameError::TooLong));
    }

    #[test]
    fn odd_but_safe_names_are_accepted() {
        assert_eq!(validate_name(b"with space"), Ok(()));
        assert_eq!(validate_name(b"new\nline\\back"), Ok(()));
        assert_eq!(validate_name("naïve".as_bytes()), Ok(()));
        assert_eq!(validate_name(b"..."), Ok(()));
        assert_eq!(validate_name(&[0xff, 0xfe]), Ok(()));
    }
}
