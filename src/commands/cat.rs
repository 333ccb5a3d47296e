//! `imgsafe cat`: write files of the image to stdout, binary-safe and streamed.
//!
//! A large file the guest can map is read by the host from the image itself (see
//! [`crate::bulk`]); never with `--overlay`-style writable mounts, where the image no
//! longer holds what the guest reads.

use crate::agent_client::{FileRequest, FileSink};
use crate::bulk::HostReader;
use crate::cli::CatArgs;
use crate::session::Session;
use crate::{trace, Error, Result};
use imgsafe_proto::FileMap;
use std::io::{self, Write};

/// Passes each file to stdout, from the stream or from the image.
struct CatSink<'a, W: Write> {
    out: &'a mut W,
    reader: Option<&'a HostReader>,
    total: u64,
    mapped: u64,
}

impl<W: Write> FileSink for CatSink<'_, W> {
    fn begin(&mut self, _i: usize, _size: u64) -> Result<()> {
        Ok(())
    }

    fn data(&mut self, d: &[u8]) -> io::Result<()> {
        self.out.write_all(d)?;
        self.total += d.len() as u64;
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        Ok(())
    }

    fn mapped(&mut self, _i: usize, map: FileMap) -> Result<bool> {
        let Some(reader) = self.reader else {
            return Ok(false);
        };
        let checked = match reader.accept(&map, map.size) {
            Ok(c) => c,
            Err(why) => {
                trace::note(&format!("streamed instead: {why}"));
                return Ok(false);
            }
        };
        reader
            .copy_stream(&checked, self.out)
            .map_err(Error::Output)?;
        self.total += checked.size;
        self.mapped += 1;
        Ok(true)
    }
}

/// Run `imgsafe cat`.
pub fn run(args: CatArgs) -> Result<()> {
    Session::run_mounted(
        &args.image,
        &args.image_args.spec(),
        &args.guest.guest(),
        &args.mount.choice(),
        |s| {
            let reader = s.host_reader();
            let stage = trace::stage("cat");
            let stdout = io::stdout();
            let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
            let mut sink = CatSink {
                out: &mut out,
                reader: reader.as_ref(),
                total: 0,
                mapped: 0,
            };
            let mut result = Ok(());
            for p in &args.paths {
                let req = FileRequest {
                    path: p.as_bytes().to_vec(),
                    mapped: sink.reader.is_some(),
                };
                if let Err(e) = s.fs().read_files(&[req], &mut sink) {
                    result = Err(e);
                    break;
                }
            }
            let (total, mapped) = (sink.total, sink.mapped);
            let flushed = crate::error::write_output(out.flush());
            stage.done(&format!(
                "{total} bytes ({mapped} files read from the image directly)"
            ));
            match result.and(flushed) {
                // The reader went away mid-file (`imgsafe cat ... | head`): not an error.
                Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                r => r,
            }
        },
    )
}
