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
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Most simultaneous connections; more are accepted and closed at once.
const MAX_CONNECTIONS: usize = 64;
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
            .build()?;
        let std_listener = std::os::unix::net::UnixListener::bind(socket)?;
        std_listener.set_nonblocking(true)?;
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
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        crate::trace::note("nbd: too many connections, closing a new one");
                        continue;
                    };
                    let (source, export) = (source.clone(), export.clone());
                    conns.spawn(async move {
                        if let Err(e) = connection(stream, source, &export).await {
                            crate::trace::note(&format!("{e}"));
                        }
                        drop(slot);
                    });
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

/// One client, from handshake to disconnect.
async fn connection(
    stream: UnixStream,
    source: Arc<dyn BlockSource>,
    export: &handshake::Export,
) -> Result<(), NbdError> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    match handshake::negotiate(&mut r, &mut w, export).await? {
        Some(neg) => transmission::serve(r, w, source, neg).await,
        None => Ok(()),
    }
}
