//! The project's own NBD server (fixed newstyle, structured replies, block status).
//! See DESIGN.md for why no crate is used.
//!
//! [`Server::start`] binds a Unix socket and serves one read-only export from a tokio
//! runtime on a background thread. Each connection is one task: the handshake
//! ([`handshake`]) and then the request loop ([`transmission`]), which answers reads and
//! block status queries concurrently. Wire encoding lives in [`proto`].

pub mod handshake;
pub mod proto;
pub mod transmission;

use crate::format::BlockSource;
use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

/// Most clients in the transmission phase at once; one that completes its handshake
/// beyond this is disconnected.
pub const MAX_CONNECTIONS: usize = 64;
/// Most clients still in the handshake at once. A new connection beyond this closes the
/// one that has been negotiating longest, so clients that connect and stall can never
/// keep others out.
pub const MAX_HANDSHAKES: usize = 64;
/// How long a client may take from connecting to the end of its handshake (a real
/// client needs a few milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of reply buffers the whole server holds, whatever its clients do: each
/// transmission-phase connection gets an equal share (see [`transmission`]).
pub const MAX_REPLY_BYTES: usize = 256 << 20;
/// Mode of the server's socket unless asked otherwise: only its owner may connect.
pub const SOCKET_MODE: u32 = 0o600;
/// Read buffer per connection (request headers are 28 bytes; this batches syscalls).
const READ_BUFFER: usize = 64 << 10;
/// How long shutdown waits for blocking reads still running in the decoder.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Why one NBD connection ended abnormally. These never stop the server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("nbd connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol and was disconnected.
    #[error("nbd client broke the protocol: {0}")]
    Protocol(String),
    /// The client did not finish its handshake in time and was disconnected.
    #[error("nbd client did not finish its handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
    /// The client finished its handshake with every transmission slot taken.
    #[error("nbd: already {MAX_CONNECTIONS} clients connected, closing a new one")]
    TooManyClients,
}

/// A running NBD server on a Unix socket, serving one read-only export.
/// Dropping it stops the server and removes the socket it created, nothing else.
pub struct Server {
    socket: PathBuf,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind `socket` (which must not exist) and serve `source` as export `name` on a
    /// background thread until [`Server::stop`] or drop. The export is also reachable
    /// under the empty (default) name.
    pub fn start(source: Arc<dyn BlockSource>, socket: &Path, name: &str) -> io::Result<Server> {
        Self::start_with_mode(source, socket, name, SOCKET_MODE)
    }

    /// [`Server::start`] with the socket's permission bits set to `mode` (it is never
    /// more open than that, even for an instant, whatever the umask).
    pub fn start_with_mode(
        source: Arc<dyn BlockSource>,
        socket: &Path,
        name: &str,
        mode: u32,
    ) -> io::Result<Server> {
        if name.len() > proto::MAX_STRING_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "export name longer than 4096 bytes",
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(32)
            .thread_name("imgsafe-nbd")
            .enable_io()
            .enable_time()
            .build()?;
        let std_listener = bind_with_mode(socket, mode)?;
        let listener = {
            let _guard = runtime.enter();
            UnixListener::from_std(std_listener)
        };
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(e);
            }
        };
        let (tx, rx) = watch::channel(false);
        let export = handshake::Export {
            name: name.to_string(),
            size: source.size(),
        };
        let thread = std::thread::Builder::new()
            .name("imgsafe-nbd".into())
            .spawn(move || {
                runtime.block_on(accept_loop(listener, source, export, rx));
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(e);
            }
        };
        Ok(Server {
            socket: socket.to_path_buf(),
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The socket this server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `nbd+unix://` URI of export `name` on this server, as qemu and libnbd spell it.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Stop accepting, close connections, join the thread, remove the socket.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Bind a listening Unix socket at `path` (which must not exist) whose file has mode
/// `mode`. The mode goes on the socket before `bind` creates the file (Linux takes the
/// file's mode from the socket's inode, less the umask), so no other user can connect
/// in between; then it is set outright, as the umask may have removed bits asked for.
fn bind_with_mode(path: &Path, mode: u32) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path must be 1 to {} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `fd` is a socket we own; `addr` is a valid sockaddr_un of `len` bytes.
    let bound = unsafe {
        libc::fchmod(fd.as_raw_fd(), mode & 0o777) == 0
            && libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            ) == 0
    };
    if !bound {
        return Err(io::Error::last_os_error());
    }
    let listener = std::os::unix::net::UnixListener::from(fd);
    let listening = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))
        .and_then(|()| {
            // SAFETY: listen on a bound socket we own.
            if unsafe { libc::listen(listener.as_raw_fd(), 128) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Accept connections until shutdown; each gets its own task. Dropping the `JoinSet` on
/// shutdown aborts the connections still open.
async fn accept_loop(
    listener: UnixListener,
    source: Arc<dyn BlockSource>,
    export: handshake::Export,
    mut shutdown: watch::Receiver<bool>,
) {
    let export = Arc::new(export);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Connections still negotiating, oldest first, with a flag each sets when done.
    let mut handshaking: VecDeque<(AbortHandle, Arc<AtomicBool>)> = VecDeque::new();
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    handshaking.retain(|(h, done)| !h.is_finished() && !done.load(Ordering::Acquire));
                    if handshaking.len() >= MAX_HANDSHAKES {
                        if let Some((oldest, _)) = handshaking.pop_front() {
                            crate::trace::note("nbd: too many handshakes, closing the oldest");
                            oldest.abort();
                        }
                    }
                    let done = Arc::new(AtomicBool::new(false));
                    let (source, export, slots) = (source.clone(), export.clone(), slots.clone());
                    let flag = done.clone();
                    let handle = conns.spawn(async move {
                        if let Err(e) = connection(stream, source, &export, &slots, &flag).await {
                            crate::trace::note(&format!("{e}"));
                        }
                    });
                    handshaking.push_back((handle, done));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    crate::trace::note(&format!("nbd: accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// One client, from handshake to disconnect. Sets `negotiated` when the handshake is
/// over (whatever its outcome), taking the connection off the handshake list.
async fn connection(
    stream: UnixStream,
    source: Arc<dyn BlockSource>,
    export: &handshake::Export,
    slots: &Arc<Semaphore>,
    negotiated: &AtomicBool,
) -> Result<(), NbdError> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let neg = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::negotiate(&mut r, &mut w, export),
    )
    .await;
    negotiated.store(true, Ordering::Release);
    let neg = match neg {
        Err(_) => return Err(NbdError::HandshakeTimeout),
        Ok(neg) => neg?,
    };
    let Some(neg) = neg else {
        return Ok(());
    };
    let Ok(_slot) = slots.clone().try_acquire_owned() else {
        return Err(NbdError::TooManyClients);
    };
    transmission::serve(r, w, source, neg).await
}
