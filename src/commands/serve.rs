//! `imgsafe serve`: expose the decoded image read-only over NBD until SIGINT/SIGTERM.

use crate::cli::ServeArgs;
use crate::nbd::Server;
use crate::Result;
use std::io;
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};

/// A step of `serve` that failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The runtime that waits for signals could not be made.
    #[error("cannot start the signal handler: {0}")]
    Runtime(#[source] io::Error),
    /// SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// The socket could not be bound or listened on.
    #[error("{}: cannot listen: {source}", socket.display())]
    Listen {
        /// The socket path asked for.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Run `imgsafe serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let source = crate::image::open(&args.image, &args.image_args.spec())?;
    let size = source.size();
    // Signal handlers go in before the socket exists, so a signal sent as soon as a
    // client sees the socket still gets a clean shutdown.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(ServeError::Runtime)?;
    let (mut int, mut term) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .map_err(ServeError::Signals)?;

    let server = Server::start_with_mode(source, &args.socket, &args.export_name, args.socket_mode)
        .map_err(|source| ServeError::Listen {
            socket: args.socket.clone(),
            source,
        })?;
    eprintln!(
        "imgsafe: serving {} ({size} bytes, read-only) on {}",
        args.image.display(),
        server.uri(&args.export_name)
    );
    runtime.block_on(async {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    });
    server.stop();
    Ok(())
}
