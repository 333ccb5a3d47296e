//! `imgsafe serve`: expose the decoded image read-only over NBD until SIGINT/SIGTERM.

use crate::cli::ServeArgs;
use crate::nbd::Server;
use crate::{Error, Result};
use tokio::signal::unix::{signal, SignalKind};

/// Run `imgsafe serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let source = crate::image::open(&args.image, &args.image_args.spec())?;
    let size = source.size();
    // Signal handlers go in before the socket exists, so a signal sent as soon as a
    // client sees the socket still gets a clean shutdown.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the signal handler: {e}")))?;
    let (mut int, mut term) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .map_err(|e| Error::Other(format!("cannot install signal handlers: {e}")))?;

    let server = Server::start_with_mode(source, &args.socket, &args.export_name, args.socket_mode)
        .map_err(|e| Error::Other(format!("{}: cannot listen: {e}", args.socket.display())))?;
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
