//! Host side of the agent protocol: typed calls over the framed channel.
//!
//! Everything the guest sends is hostile. Frames are bounded by the proto crate;
//! here every answer is checked to be the one expected, names are validated before they
//! leave this module, and streams are bounded by what the host asked for.

use crate::{Error, Result};
use imgsafe_proto::{
    self as proto, validate_name, Entry, ErrorKind, FileMap, Frame, FsInfo, Request, Response,
    Subvolume, WalkEntry, MAX_SUBVOLUMES,
};
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;

/// What commands need from a mounted guest filesystem. Implemented by [`AgentClient`]
/// and by fakes in tests.
pub trait GuestFs {
    /// lstat a path.
    fn stat(&mut self, path: &[u8]) -> Result<Entry>;
    /// List a directory (entries unsorted, names validated).
    fn read_dir(&mut self, path: &[u8]) -> Result<Vec<Entry>>;
    /// Stream a regular file's bytes into `out`; returns the byte count.
    fn read_file(&mut self, path: &[u8], out: &mut dyn Write) -> Result<u64>;
    /// Every entry below a directory, depth first, pre-order, symlinks not followed.
    fn walk(&mut self, path: &[u8], each: &mut dyn FnMut(WalkEntry) -> Result<()>) -> Result<()>;
    /// Read several regular files, in order, into `sink`. The requests go out together
    /// and the answers are read in order, so a tree of small files costs one round trip
    /// per batch, not per file. Only the last file may ask for a map (`mapped`); when the
    /// sink declines the map, that file is streamed. The default streams one by one.
    fn read_files(&mut self, files: &[FileRequest], sink: &mut dyn FileSink) -> Result<()> {
        for (i, f) in files.iter().enumerate() {
            let size = self.stat(&f.path)?.size;
            sink.begin(i, size)?;
            let mut w = SinkWriter { sink, failed: None };
            let r = self.read_file(&f.path, &mut w);
            finish_stream(w, r)?;
        }
        Ok(())
    }
    /// The raw channel, for a `Shell` session that takes it over (None: no agent behind).
    fn shell_channel(&mut self) -> Option<ShellChannel<'_>> {
        None
    }
}

/// One file of a [`GuestFs::read_files`] batch.
#[derive(Debug, Clone)]
pub struct FileRequest {
    /// Guest path.
    pub path: Vec<u8>,
    /// Ask for a map of where its bytes lie instead of the bytes (`ReadFileMapped`).
    pub mapped: bool,
}

/// Where [`GuestFs::read_files`] delivers each file.
pub trait FileSink {
    /// File `i` is streamed and the guest says it has `size` bytes.
    fn begin(&mut self, i: usize, size: u64) -> Result<()>;
    /// The next bytes of the file being streamed. After an error no more are given, the
    /// rest of the stream is drained, and [`FileSink::end`] is called.
    fn data(&mut self, d: &[u8]) -> std::io::Result<()>;
    /// The stream of the file begun last ended (complete, or after a `data` error, which
    /// `end` then reports).
    fn end(&mut self) -> Result<()>;
    /// The guest sent a map of file `i` instead of its bytes: Ok(true) if the sink has
    /// copied the file from it, Ok(false) to have the file streamed instead.
    fn mapped(&mut self, i: usize, map: FileMap) -> Result<bool>;
}

/// A [`FileSink`] as a `Write`, remembering a failed write.
struct SinkWriter<'a> {
    sink: &'a mut dyn FileSink,
    failed: Option<std::io::Error>,
}

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(e) = self.sink.data(buf) {
            let kind = e.kind();
            self.failed = Some(e);
            return Err(kind.into());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// End a stream fed through `w`: the sink's own error first (it knows what failed),
/// then the stream's.
fn finish_stream(w: SinkWriter<'_>, r: Result<u64>) -> Result<()> {
    if let Some(e) = w.failed {
        w.sink.end()?;
        return Err(Error::Output(e));
    }
    r?;
    w.sink.end()
}

/// Both halves of the agent channel, lent to a shell session (see
/// `commands::shell`), which speaks the session part of the protocol itself.
pub struct ShellChannel<'a> {
    /// Frames from the guest.
    pub reader: &'a mut BufReader<UnixStream>,
    /// Frames to the guest.
    pub writer: &'a mut BufWriter<UnixStream>,
}

/// Most entries a single directory listing may have before imgsafe gives up (bounds memory).
pub const MAX_DIR_ENTRIES: usize = 4_000_000;

/// The connection to the guest agent.
pub struct AgentClient {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    /// The guest kernel version, from the handshake.
    pub kernel: String,
    /// Ask for read-write mounts: set only when the disk sits under a throwaway
    /// copy-on-write layer (`shell --overlay`).
    pub writable_mounts: bool,
}

/// Most characters of a guest error message shown to the user.
const MAX_GUEST_MESSAGE: usize = 300;

/// Map an agent-side error to the host error, naming `path`.
fn agent_error(kind: ErrorKind, message: String, path: &[u8]) -> Error {
    let shown = String::from_utf8_lossy(path).into_owned();
    // Fixed wording for the kinds users see most; the guest's own text is not needed.
    let fixed = match kind {
        ErrorKind::NotFound => Some("no such file or directory in the image"),
        ErrorKind::IsDirectory => Some("is a directory"),
        ErrorKind::NotDirectory => Some("not a directory"),
        ErrorKind::TooManyLinks => Some("too many levels of symbolic links"),
        _ => None,
    };
    match kind {
        ErrorKind::NotFound
        | ErrorKind::IsDirectory
        | ErrorKind::NotDirectory
        | ErrorKind::TooManyLinks => Error::NotFound {
            image: Default::default(),
            path: shown,
            what: fixed.unwrap_or_default().to_string(),
        },
        ErrorKind::Mount => Error::Filesystem {
            image: Default::default(),
            what: message,
        },
        ErrorKind::BadRequest | ErrorKind::Other => {
            let message = crate::terminal::printable_max(&message, MAX_GUEST_MESSAGE);
            // The agent's messages name the path already; a request without a path
            // (unlocking) gives the message alone.
            if shown.is_empty() {
                return Error::guest(message);
            }
            match message.strip_prefix(&format!("{shown}: ")) {
                Some(rest) => Error::guest(format!("{shown}: {rest}")),
                None => Error::guest(format!("{shown}: {message}")),
            }
        }
    }
}

/// A call the host could not make, through no fault of the guest's.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kernel gave no random bytes for the session nonce and the guest's entropy.
    #[error("getrandom: {0}")]
    Entropy(#[source] std::io::Error),
    /// A path to ask the guest about is longer than the protocol carries, or holds a NUL.
    #[error("{path}: path too long or contains NUL")]
    BadPath {
        /// The path, lossily decoded.
        path: String,
    },
    /// The agent channel's socket could not be duplicated into reader and writer.
    #[error("opening the agent channel: {0}")]
    Channel(#[source] std::io::Error),
    /// The agent channel's read timeout could not be set.
    #[error("setting the agent channel's timeout: {0}")]
    Timeout(#[source] std::io::Error),
    /// A batch asked for the map of a file other than its last.
    #[error("only the last file of a batch may be mapped")]
    MappedNotLast,
}

/// Set the agent channel's read timeout (None = wait forever).
pub(crate) fn set_channel_timeout(
    channel: &UnixStream,
    t: Option<std::time::Duration>,
) -> Result<()> {
    Ok(channel.set_read_timeout(t).map_err(ClientError::Timeout)?)
}

/// A frame that could not be read from the agent channel: no answer in time, or a
/// channel closed under it, is the appliance's failure; anything else is the guest
/// breaking the protocol.
pub(crate) fn channel_error(e: proto::FrameError) -> Error {
    match e {
        proto::FrameError::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.kind() == std::io::ErrorKind::TimedOut =>
        {
            Error::appliance("the guest agent did not answer in time")
        }
        proto::FrameError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::appliance("the appliance closed the agent channel (guest crashed or was killed)")
        }
        other => Error::GuestFrame(other),
    }
}

/// A request that could not be written to the agent channel.
pub(crate) fn send_error(e: std::io::Error) -> Error {
    Error::guest(format!("sending request: {e}"))
}

/// How often a wait for the agent's first answer asks whether to go on.
pub const ANSWER_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Bytes of entropy each session gives the guest (the kernel credits at most 256 bits
/// at a time to its pool; more is harmless).
const HELLO_ENTROPY: usize = 32;

/// Fill `buf` from the host kernel's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl AgentClient {
    /// Handshake on a connected stream: a fresh nonce, entropy and the time for the
    /// guest (which may be a restored copy of an earlier one), and the serials of the
    /// disks it must see before it answers.
    pub fn connect(stream: UnixStream, disks: &[String]) -> Result<Self> {
        Self::connect_waiting(stream, disks, &mut || true)
    }

    /// [`AgentClient::connect`], asking `keep_waiting` every [`ANSWER_POLL`] until the
    /// answer starts to arrive: a booting guest may take long, and the caller decides
    /// how long is too long (returning false ends the wait with a timeout error).
    pub fn connect_waiting(
        stream: UnixStream,
        disks: &[String],
        keep_waiting: &mut dyn FnMut() -> bool,
    ) -> Result<Self> {
        let reader = BufReader::new(stream.try_clone().map_err(ClientError::Channel)?);
        let writer = BufWriter::new(stream);
        let mut c = AgentClient {
            reader,
            writer,
            kernel: String::new(),
            writable_mounts: false,
        };
        let mut fresh = [0u8; 8 + HELLO_ENTROPY];
        random_bytes(&mut fresh).map_err(ClientError::Entropy)?;
        let (nonce, entropy) = fresh.split_at(8);
        let nonce = u64::from_le_bytes(nonce.try_into().expect("8 bytes"));
        c.send(&Request::Hello {
            version: proto::PROTOCOL_VERSION,
            nonce,
            entropy: entropy.to_vec(),
            time: proto::WallClock::now(),
            disks: disks.to_vec(),
        })?;
        c.wait_readable(keep_waiting)?;
        match c.recv_msg()? {
            Response::Hello {
                version,
                kernel,
                nonce: echoed,
            } if version == proto::PROTOCOL_VERSION && echoed == nonce => {
                c.kernel = kernel.chars().take(256).collect();
                Ok(c)
            }
            Response::Hello { version, .. } if version == proto::PROTOCOL_VERSION => Err(
                Error::guest("the agent answered the handshake of another session"),
            ),
            Response::Hello { version, .. } => Err(Error::guest(format!(
                "protocol version {version}, expected {}",
                proto::PROTOCOL_VERSION
            ))),
            other => Err(unexpected(&other)),
        }
    }

    /// Wait until the agent's answer starts to arrive, asking `keep_waiting` between
    /// polls. Waiting here rather than in a read keeps the frame in step: a read that
    /// timed out halfway through a frame would lose its place.
    fn wait_readable(&mut self, keep_waiting: &mut dyn FnMut() -> bool) -> Result<()> {
        if !self.reader.buffer().is_empty() {
            return Ok(());
        }
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(self.reader.get_ref());
        loop {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(ANSWER_POLL.as_millis()).unwrap_or(100);
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n > 0 {
                return Ok(());
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::guest(format!("waiting for the agent: {e}")));
                }
            }
            if !keep_waiting() {
                return Err(Error::appliance("the guest agent did not answer in time"));
            }
        }
    }

    /// Set a read timeout for every later answer (None = wait forever).
    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> Result<()> {
        set_channel_timeout(self.reader.get_ref(), t)
    }

    fn send(&mut self, req: &Request) -> Result<()> {
        proto::write_msg(&mut self.writer, req)
            .and_then(|_| self.writer.flush())
            .map_err(send_error)
    }

    fn recv(&mut self) -> Result<Frame<Response>> {
        proto::read_frame(&mut self.reader).map_err(channel_error)
    }

    fn recv_msg(&mut self) -> Result<Response> {
        match self.recv()? {
            Frame::Msg(m) => Ok(m),
            Frame::Data(_) => Err(Error::guest("unexpected data frame")),
        }
    }

    /// Send one request and read one message.
    fn call(&mut self, req: &Request) -> Result<Response> {
        self.send(req)?;
        self.recv_msg()
    }

    /// Probe block devices, partitions and volumes.
    pub fn list_filesystems(&mut self) -> Result<Vec<FsInfo>> {
        match self.call(&Request::ListFilesystems)? {
            Response::Filesystems { list } if list.len() <= 4096 => Ok(list),
            Response::Filesystems { .. } => Err(Error::guest("too many filesystems")),
            Response::Error { kind, message } => Err(agent_error(kind, message, b"")),
            other => Err(unexpected(&other)),
        }
    }

    /// Open the LUKS containers with `key`: (opened, refused) guest devices. The key goes
    /// in a DATA frame of its own written straight to the socket, so no buffer of this
    /// process but the caller's holds it.
    pub fn unlock(&mut self, key: &[u8]) -> Result<(Vec<String>, Vec<String>)> {
        let len = u32::try_from(key.len()).map_err(|_| Error::Usage("key too large".into()))?;
        self.send(&Request::Unlock { len })?;
        proto::write_data(self.writer.get_mut(), key)
            .map_err(|e| Error::guest(format!("sending the key: {e}")))?;
        match self.recv_msg()? {
            Response::Unlocked { opened, refused }
                if opened.len() <= proto::MAX_UNLOCKED && refused.len() <= proto::MAX_UNLOCKED =>
            {
                Ok((opened, refused))
            }
            Response::Unlocked { .. } => Err(Error::guest("too many LUKS containers")),
            Response::Error { kind, message } => Err(agent_error(kind, message, b"")),
            other => Err(unexpected(&other)),
        }
    }

    /// Mount `device` read-only at `mountpoint` below the guest sysroot (a btrfs: its
    /// subvolume `subvolid`, or its default one).
    pub fn mount(
        &mut self,
        device: &str,
        mountpoint: &str,
        fstype: Option<&str>,
        subvolid: Option<u64>,
    ) -> Result<String> {
        let req = Request::Mount {
            device: device.into(),
            mountpoint: mountpoint.into(),
            fstype: fstype.map(Into::into),
            writable: self.writable_mounts,
            subvolid,
        };
        match self.call(&req)? {
            Response::Mounted { fstype, .. } => Ok(fstype),
            Response::Error { message, .. } => Err(Error::Filesystem {
                image: Default::default(),
                what: format!("mounting {device}: {message}"),
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// The default subvolume's id and the subvolumes of the btrfs on `device`, each
    /// checked: an id of a real subvolume and a relative path without `.`, `..` or
    /// empty components.
    pub fn subvolumes(&mut self, device: &str) -> Result<(u64, Vec<Subvolume>)> {
        let req = Request::Subvolumes {
            device: device.into(),
        };
        match self.call(&req)? {
            Response::Subvolumes { default, list }
                if list.len() <= MAX_SUBVOLUMES && list.iter().all(valid_subvolume) =>
            {
                Ok((default, list))
            }
            Response::Subvolumes { .. } => Err(Error::guest("a bad subvolume list")),
            Response::Error { message, .. } => Err(Error::Filesystem {
                image: Default::default(),
                what: format!("listing the subvolumes of {device}: {message}"),
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Unmount whatever is mounted at (and below) `mountpoint`; returns how many mounts.
    pub fn unmount(&mut self, mountpoint: &str) -> Result<u32> {
        match self.call(&Request::Unmount {
            mountpoint: mountpoint.into(),
        })? {
            Response::Unmounted { count } => Ok(count),
            Response::Error { message, .. } => Err(Error::Filesystem {
                image: Default::default(),
                what: format!("unmounting {mountpoint}: {message}"),
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Ask the agent to unmount and power off; waits for its answer.
    pub fn shutdown(&mut self) -> Result<()> {
        match self.call(&Request::Shutdown)? {
            Response::Bye => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

impl AgentClient {
    /// The data frames and `FileEnd` of a file stream announced as `size` bytes.
    fn recv_stream(&mut self, path: &[u8], size: u64, out: &mut dyn Write) -> Result<u64> {
        let mut got: u64 = 0;
        let mut out_err: Option<std::io::Error> = None;
        loop {
            match self.recv()? {
                Frame::Data(d) if d.is_empty() => return Err(Error::guest("empty data frame")),
                Frame::Data(d) => {
                    got = got
                        .checked_add(d.len() as u64)
                        .ok_or_else(|| Error::guest("file too large"))?;
                    if got > size {
                        return Err(Error::guest("file stream longer than announced"));
                    }
                    // Keep draining the stream after a local write error so the channel
                    // stays in sync, then report the error.
                    if out_err.is_none() {
                        if let Err(e) = out.write_all(&d) {
                            out_err = Some(e);
                        }
                    }
                }
                Frame::Msg(Response::FileEnd) => break,
                Frame::Msg(Response::Error { kind, message }) => {
                    return Err(agent_error(kind, message, path))
                }
                Frame::Msg(other) => return Err(unexpected(&other)),
            }
        }
        if let Some(e) = out_err {
            return Err(Error::Output(e));
        }
        if got != size {
            // The file changed size while read (cannot happen read-only) or the agent lied.
            return Err(Error::guest(format!(
                "file stream ended after {got} of {size} bytes"
            )));
        }
        Ok(got)
    }
}

fn check_path(path: &[u8]) -> Result<()> {
    if path.len() > proto::MAX_PATH || path.contains(&0) {
        return Err(ClientError::BadPath {
            path: String::from_utf8_lossy(path).into_owned(),
        }
        .into());
    }
    Ok(())
}

fn check_entry(e: &Entry) -> Result<()> {
    validate_name(&e.name).map_err(|err| {
        Error::guest(format!(
            "unsafe name {:?}: {err}",
            String::from_utf8_lossy(&e.name)
        ))
    })?;
    if let Some(t) = &e.target {
        if t.len() > proto::MAX_PATH {
            return Err(Error::guest("symlink target too long"));
        }
    }
    Ok(())
}

/// A subvolume as the agent may report one (see [`AgentClient::subvolumes`]).
fn valid_subvolume(s: &Subvolume) -> bool {
    s.id > imgsafe_proto::BTRFS_TOP_LEVEL
        && s.path.len() <= imgsafe_proto::MAX_PATH
        && !s.path.contains('\0')
        && s.path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn unexpected(r: &Response) -> Error {
    // Cut by characters: the guest's text may be any UTF-8, and a byte cut could fall
    // inside a character.
    let s: String = format!("{r:?}").chars().take(120).collect();
    Error::guest(format!("unexpected answer {s}"))
}

/// Most bytes (names, targets and bookkeeping) one listing or walk may deliver before
/// imgsafe stops: the answers come from a hostile guest and callers keep them.
pub const MAX_LISTING_BYTES: usize = 512 << 20;

/// What an entry costs in host memory, roughly: fixed overhead plus its byte strings.
fn entry_cost(e: &Entry) -> usize {
    std::mem::size_of::<Entry>() + e.name.len() + e.target.as_ref().map_or(0, Vec::len)
}

/// Charge `cost` against a listing's byte budget.
fn charge(used: &mut usize, cost: usize) -> Result<()> {
    *used = used.saturating_add(cost);
    if *used > MAX_LISTING_BYTES {
        return Err(Error::guest(format!(
            "listing larger than {} MiB",
            MAX_LISTING_BYTES >> 20
        )));
    }
    Ok(())
}

impl GuestFs for AgentClient {
    fn shell_channel(&mut self) -> Option<ShellChannel<'_>> {
        Some(ShellChannel {
            reader: &mut self.reader,
            writer: &mut self.writer,
        })
    }

    fn stat(&mut self, path: &[u8]) -> Result<Entry> {
        check_path(path)?;
        match self.call(&Request::Stat {
            path: path.to_vec(),
        })? {
            Response::Stat { entry } if entry.name.is_empty() || check_entry(&entry).is_ok() => {
                Ok(entry)
            }
            Response::Stat { .. } => Err(Error::guest("unsafe name in stat answer")),
            Response::Error { kind, message } => Err(agent_error(kind, message, path)),
            other => Err(unexpected(&other)),
        }
    }

    fn read_dir(&mut self, path: &[u8]) -> Result<Vec<Entry>> {
        check_path(path)?;
        self.send(&Request::ReadDir {
            path: path.to_vec(),
        })?;
        let mut all = Vec::new();
        let mut used = 0usize;
        loop {
            match self.recv_msg()? {
                // An empty frame that is not the last one makes no progress: a guest
                // could send them forever, each within the answer timeout.
                Response::DirEntries {
                    entries,
                    done: false,
                } if entries.is_empty() => {
                    return Err(Error::guest("empty directory frame"));
                }
                Response::DirEntries { entries, done } => {
                    for e in &entries {
                        check_entry(e)?;
                        charge(&mut used, entry_cost(e))?;
                    }
                    all.extend(entries);
                    if all.len() > MAX_DIR_ENTRIES {
                        return Err(Error::guest("directory listing too large"));
                    }
                    if done {
                        return Ok(all);
                    }
                }
                Response::Error { kind, message } => return Err(agent_error(kind, message, path)),
                other => return Err(unexpected(&other)),
            }
        }
    }

    fn read_file(&mut self, path: &[u8], out: &mut dyn Write) -> Result<u64> {
        check_path(path)?;
        self.send(&Request::ReadFile {
            path: path.to_vec(),
        })?;
        let size = match self.recv_msg()? {
            Response::FileStart { size } => size,
            Response::Error { kind, message } => return Err(agent_error(kind, message, path)),
            other => return Err(unexpected(&other)),
        };
        self.recv_stream(path, size, out)
    }

    fn read_files(&mut self, files: &[FileRequest], sink: &mut dyn FileSink) -> Result<()> {
        let Some((_, head)) = files.split_last() else {
            return Ok(());
        };
        if head.iter().any(|f| f.mapped) {
            return Err(ClientError::MappedNotLast.into());
        }
        for f in files {
            check_path(&f.path)?;
            let path = f.path.clone();
            let req = if f.mapped {
                Request::ReadFileMapped { path }
            } else {
                Request::ReadFile { path }
            };
            proto::write_msg(&mut self.writer, &req).map_err(send_error)?;
        }
        self.writer.flush().map_err(send_error)?;
        for (i, f) in files.iter().enumerate() {
            let size = match self.recv_msg()? {
                Response::FileStart { size } => size,
                Response::FileMap(map) if f.mapped => {
                    if sink.mapped(i, map)? {
                        continue;
                    }
                    // Nothing else is in flight: the mapped file is the batch's last.
                    self.send(&Request::ReadFile {
                        path: f.path.clone(),
                    })?;
                    match self.recv_msg()? {
                        Response::FileStart { size } => size,
                        Response::Error { kind, message } => {
                            return Err(agent_error(kind, message, &f.path))
                        }
                        other => return Err(unexpected(&other)),
                    }
                }
                Response::Error { kind, message } => {
                    return Err(agent_error(kind, message, &f.path))
                }
                other => return Err(unexpected(&other)),
            };
            sink.begin(i, size)?;
            let mut w = SinkWriter { sink, failed: None };
            let r = self.recv_stream(&f.path, size, &mut w);
            finish_stream(w, r)?;
        }
        Ok(())
    }

    fn walk(&mut self, path: &[u8], each: &mut dyn FnMut(WalkEntry) -> Result<()>) -> Result<()> {
        check_path(path)?;
        self.send(&Request::Walk {
            path: path.to_vec(),
        })?;
        let mut first_err: Option<Error> = None;
        let mut used = 0usize;
        loop {
            match self.recv_msg()? {
                Response::WalkEntries {
                    entries,
                    done: false,
                } if entries.is_empty() => {
                    return Err(Error::guest("empty walk frame"));
                }
                Response::WalkEntries { entries, done } => {
                    for w in entries {
                        if first_err.is_some() {
                            continue;
                        }
                        let ok =
                            w.path.len() <= 2048 && w.path.iter().all(|c| validate_name(c).is_ok());
                        let cost = entry_cost(&w.entry)
                            + w.path.iter().map(|c| c.len() + 24).sum::<usize>();
                        let r = if !ok {
                            Err(Error::guest("unsafe path in walk"))
                        } else {
                            check_entry(&w.entry)
                                .and_then(|_| charge(&mut used, cost))
                                .and_then(|_| each(w))
                        };
                        if let Err(e) = r {
                            first_err = Some(e);
                        }
                    }
                    if done {
                        return first_err.map_or(Ok(()), Err);
                    }
                }
                Response::Error { kind, message } => return Err(agent_error(kind, message, path)),
                other => return Err(unexpected(&other)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A fake agent: answers the handshake, then sends `frames` after the next request.
    fn fake_agent(frames: Vec<(u8, Vec<u8>)>) -> AgentClient {
        let (host, guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut g = guest;
            let Frame::Msg(Request::Hello { nonce, .. }) = proto::read_frame(&mut g).unwrap()
            else {
                panic!("the first request is not Hello");
            };
            proto::write_msg(
                &mut g,
                &Response::Hello {
                    version: proto::PROTOCOL_VERSION,
                    kernel: "k".into(),
                    nonce,
                },
            )
            .unwrap();
            let _: Frame<Request> = proto::read_frame(&mut g).unwrap();
            for (kind, payload) in frames {
                let mut head = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
                head.push(kind);
                let _ = g.write_all(&head).and_then(|_| g.write_all(&payload));
            }
        });
        AgentClient::connect(host, &[]).unwrap()
    }

    fn msg(r: &Response) -> (u8, Vec<u8>) {
        (proto::KIND_MSG, serde_json::to_vec(r).unwrap())
    }

    /// Connect to a fake agent whose hello answer is made from the request by `answer`.
    fn handshake_with(
        answer: impl FnOnce(Request) -> Response + Send + 'static,
        keep_waiting: &mut dyn FnMut() -> bool,
    ) -> (Result<AgentClient>, Option<Request>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = thread::spawn(move || {
            let mut g = guest;
            let Frame::Msg(req) = proto::read_frame::<_, Request>(&mut g).unwrap() else {
                panic!("a data frame");
            };
            let _ = proto::write_msg(&mut g, &answer(req.clone()));
            req
        });
        let r = AgentClient::connect_waiting(host, &["imgsafe0".into()], keep_waiting);
        (r, agent.join().ok())
    }

    #[test]
    fn hello_carries_a_fresh_nonce_entropy_the_time_and_the_disks() {
        let echo = |req: Request| match req {
            Request::Hello { nonce, .. } => Response::Hello {
                version: proto::PROTOCOL_VERSION,
                kernel: "k".into(),
                nonce,
            },
            _ => Response::Bye,
        };

        let (first, req1) = handshake_with(echo, &mut || true);
        let (_, req2) = handshake_with(echo, &mut || true);

        assert!(first.is_ok());
        let (
            Some(Request::Hello {
                nonce: n1,
                entropy: e1,
                time,
                disks,
                ..
            }),
            Some(Request::Hello {
                nonce: n2,
                entropy: e2,
                ..
            }),
        ) = (req1, req2)
        else {
            panic!("not two hellos");
        };
        assert_ne!(n1, n2);
        assert_ne!(e1, e2);
        assert_eq!(e1.len(), HELLO_ENTROPY);
        let now = proto::WallClock::now().secs;
        assert!(time.secs + 60 > now && time.secs <= now);
        assert_eq!(disks, vec!["imgsafe0".to_string()]);
    }

    #[test]
    fn an_answer_with_another_sessions_nonce_is_refused() {
        let stale = |req: Request| match req {
            Request::Hello { nonce, .. } => Response::Hello {
                version: proto::PROTOCOL_VERSION,
                kernel: "k".into(),
                nonce: nonce.wrapping_add(1),
            },
            _ => Response::Bye,
        };

        let (r, _) = handshake_with(stale, &mut || true);

        assert!(
            r.err().unwrap().to_string().contains("another session"),
            "a stale hello was accepted"
        );
    }

    #[test]
    fn waiting_for_the_hello_ends_when_the_caller_says_so() {
        let (host, _guest) = UnixStream::pair().unwrap();
        let mut asked = 0;

        let r = AgentClient::connect_waiting(host, &[], &mut || {
            asked += 1;
            asked < 3
        });

        assert!(r
            .err()
            .unwrap()
            .to_string()
            .contains("did not answer in time"));
        assert_eq!(asked, 3);
    }

    #[test]
    fn subvolumes_from_the_guest_are_checked() {
        let sv = |id, p: &str| Subvolume { id, path: p.into() };

        assert!(valid_subvolume(&sv(256, "@/.snapshots/1/snapshot")));
        assert!(!valid_subvolume(&sv(5, "top")));
        assert!(!valid_subvolume(&sv(256, "/abs")));
        assert!(!valid_subvolume(&sv(256, "a/../b")));
        assert!(!valid_subvolume(&sv(256, "a//b")));
        assert!(!valid_subvolume(&sv(256, "")));
        assert!(!valid_subvolume(&sv(256, "nul\0")));
    }

    #[test]
    fn unexpected_answer_with_multibyte_text_is_an_error_not_a_panic() {
        let mut c = fake_agent(vec![msg(&Response::Mounted {
            device: "é".repeat(100),
            fstype: "x".into(),
        })]);

        let err = c.stat(b"/").unwrap_err();

        assert!(
            err.to_string()
                .starts_with("guest agent: unexpected answer"),
            "{err}"
        );
    }

    #[test]
    fn empty_data_frames_are_refused() {
        let mut c = fake_agent(vec![
            msg(&Response::FileStart { size: 10 }),
            (proto::KIND_DATA, Vec::new()),
        ]);

        let err = c.read_file(b"/f", &mut Vec::new()).unwrap_err();

        assert!(err.to_string().contains("empty data frame"), "{err}");
    }

    #[test]
    fn endless_empty_listing_frames_are_refused() {
        let empty = Response::DirEntries {
            entries: Vec::new(),
            done: false,
        };
        let mut c = fake_agent(vec![msg(&empty), msg(&empty), msg(&empty)]);

        let err = c.read_dir(b"/").unwrap_err();

        assert!(err.to_string().contains("empty directory frame"), "{err}");
    }

    #[test]
    fn stream_longer_than_announced_is_refused() {
        let mut c = fake_agent(vec![
            msg(&Response::FileStart { size: 2 }),
            (proto::KIND_DATA, b"abc".to_vec()),
        ]);

        let err = c.read_file(b"/f", &mut Vec::new()).unwrap_err();

        assert!(err.to_string().contains("longer than announced"), "{err}");
    }

    /// What a batch delivered: each file's bytes as streamed, and the maps offered.
    #[derive(Default)]
    struct Collect {
        files: Vec<(usize, Vec<u8>)>,
        maps: Vec<usize>,
        take_maps: bool,
    }

    impl FileSink for Collect {
        fn begin(&mut self, i: usize, _size: u64) -> Result<()> {
            self.files.push((i, Vec::new()));
            Ok(())
        }
        fn data(&mut self, d: &[u8]) -> std::io::Result<()> {
            self.files.last_mut().unwrap().1.extend_from_slice(d);
            Ok(())
        }
        fn end(&mut self) -> Result<()> {
            Ok(())
        }
        fn mapped(&mut self, i: usize, _map: FileMap) -> Result<bool> {
            self.maps.push(i);
            Ok(self.take_maps)
        }
    }

    fn req(path: &str, mapped: bool) -> FileRequest {
        FileRequest {
            path: path.as_bytes().to_vec(),
            mapped,
        }
    }

    #[test]
    fn a_batch_is_answered_in_order_by_the_real_agent_over_one_channel() {
        let root = tempfile::tempdir().unwrap();
        let none = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(root.path().join("a"), b"abc").unwrap();
        std::fs::write(root.path().join("empty"), b"").unwrap();
        std::fs::write(root.path().join("big"), &big).unwrap();
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = imgsafe_agent::serve::Agent {
            sysroot: root.path().to_path_buf(),
            devices: imgsafe_agent::devices::DeviceRoots {
                sys: none.path().to_path_buf(),
                dev: none.path().to_path_buf(),
            },
            debug: false,
            tools: Default::default(),
            disk_wait: std::time::Duration::from_millis(50),
            is_init: false,
        };
        thread::spawn(move || {
            let mut r = std::io::BufReader::new(guest.try_clone().unwrap());
            let mut w = std::io::BufWriter::new(guest);
            agent.serve(&mut r, &mut w)
        });
        let mut c = AgentClient::connect(host, &[]).unwrap();
        let mut sink = Collect::default();

        // No sysfs behind the agent here: the big file cannot be mapped and is streamed.
        c.read_files(
            &[req("/a", false), req("/empty", false), req("/big", true)],
            &mut sink,
        )
        .unwrap();

        assert_eq!(
            sink.files,
            vec![(0, b"abc".to_vec()), (1, Vec::new()), (2, big)]
        );
        assert!(sink.maps.is_empty());
    }

    /// A fake agent that reads `requests` requests after the handshake, then sends
    /// `frames` (which may answer requests the host sends later).
    fn fake_agent_batch(requests: usize, frames: Vec<(u8, Vec<u8>)>) -> AgentClient {
        let (host, guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut g = guest;
            let Frame::Msg(Request::Hello { nonce, .. }) = proto::read_frame(&mut g).unwrap()
            else {
                panic!("the first request is not Hello");
            };
            let hello = Response::Hello {
                version: proto::PROTOCOL_VERSION,
                kernel: "k".into(),
                nonce,
            };
            proto::write_msg(&mut g, &hello).unwrap();
            for _ in 0..requests {
                let _: Frame<Request> = proto::read_frame(&mut g).unwrap();
            }
            for (kind, payload) in frames {
                let mut head = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
                head.push(kind);
                let _ = g.write_all(&head).and_then(|_| g.write_all(&payload));
            }
            // Keep the channel open until the host is done.
            let _ = proto::read_frame::<_, Request>(&mut g);
            let _ = proto::read_frame::<_, Request>(&mut g);
        });
        AgentClient::connect(host, &[]).unwrap()
    }

    fn file_map() -> FileMap {
        FileMap {
            size: 4,
            disk: "imgsafe0".into(),
            extents: Vec::new(),
            edge_sha256: Vec::new(),
        }
    }

    #[test]
    fn a_declined_map_is_streamed_after_it() {
        let frames = vec![
            msg(&Response::FileStart { size: 3 }),
            (proto::KIND_DATA, b"abc".to_vec()),
            msg(&Response::FileEnd),
            msg(&Response::FileMap(file_map())),
            msg(&Response::FileStart { size: 4 }),
            (proto::KIND_DATA, b"wxyz".to_vec()),
            msg(&Response::FileEnd),
        ];
        let mut c = fake_agent_batch(2, frames);
        let mut sink = Collect::default();

        c.read_files(&[req("/a", false), req("/b", true)], &mut sink)
            .unwrap();

        assert_eq!(sink.maps, vec![1]);
        assert_eq!(
            sink.files,
            vec![(0, b"abc".to_vec()), (1, b"wxyz".to_vec())]
        );
    }

    #[test]
    fn hostile_map_for_a_file_not_asked_to_be_mapped_is_refused() {
        let frames = vec![msg(&Response::FileMap(file_map()))];
        let mut c = fake_agent_batch(1, frames);
        let mut sink = Collect {
            take_maps: true,
            ..Collect::default()
        };

        let err = c.read_files(&[req("/a", false)], &mut sink).unwrap_err();

        assert!(matches!(err, Error::Guest { .. }), "{err}");
        assert!(sink.maps.is_empty());
    }

    #[test]
    fn only_the_last_file_of_a_batch_may_be_mapped() {
        let mut c = fake_agent_batch(0, Vec::new());

        let err = c
            .read_files(
                &[req("/a", true), req("/b", false)],
                &mut Collect::default(),
            )
            .unwrap_err();

        assert!(err.to_string().contains("only the last file"), "{err}");
    }
}
