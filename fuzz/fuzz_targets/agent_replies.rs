//! Fuzz what the host decodes from the guest agent: after a valid handshake, the
//! "guest" answers every request with the fuzzer's bytes (frames, JSON, data streams,
//! file maps). The host must never panic, hang or over-allocate, and whatever it
//! accepts passes its own checks (names, targets, sizes); errors are fine.
#![no_main]

use imgsafe::agent_client::{AgentClient, FileRequest, FileSink, GuestFs};
use imgsafe_proto::{self as proto, FileMap, Frame, Request, Response, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Bytes a sink keeps at most (the client bounds streams by what the guest announced).
const SINK_LIMIT: usize = 8 << 20;

struct Sink(usize);

impl FileSink for Sink {
    fn begin(&mut self, _i: usize, _size: u64) -> imgsafe::Result<()> {
        Ok(())
    }
    fn data(&mut self, d: &[u8]) -> std::io::Result<()> {
        self.0 += d.len();
        assert!(
            self.0 <= SINK_LIMIT * 64,
            "a stream beyond any announced size"
        );
        Ok(())
    }
    fn end(&mut self) -> imgsafe::Result<()> {
        Ok(())
    }
    fn mapped(&mut self, _i: usize, _map: FileMap) -> imgsafe::Result<bool> {
        // Decline: the client must then stream the file instead.
        Ok(false)
    }
}

/// The "guest": one thread for the whole run, fed a socket and the fuzzer's replies per
/// input. A thread per input made the run's memory grow under ASan by ~200 bytes a
/// thread (its own bookkeeping: flat without ASan), and cost a thread start per input.
type Work = (UnixStream, Vec<u8>);

fn guest_worker() -> &'static (Sender<Work>, Mutex<Receiver<()>>) {
    static WORKER: OnceLock<(Sender<Work>, Mutex<Receiver<()>>)> = OnceLock::new();
    WORKER.get_or_init(|| {
        let (work_tx, work_rx) = channel::<Work>();
        let (done_tx, done_rx) = channel();
        std::thread::spawn(move || {
            for (guest, replies) in work_rx {
                answer(guest, &replies);
                done_tx.send(()).unwrap();
            }
        });
        (work_tx, Mutex::new(done_rx))
    })
}

/// Answer the handshake properly, then say only what the fuzzer says.
fn answer(mut guest: UnixStream, replies: &[u8]) {
    let mut r = std::io::BufReader::new(guest.try_clone().unwrap());
    let Ok(Frame::Msg(Request::Hello { nonce, .. })) = proto::read_frame::<_, Request>(&mut r)
    else {
        return;
    };
    let hello = Response::Hello {
        version: PROTOCOL_VERSION,
        kernel: "fuzz".into(),
        nonce,
    };
    let _ = proto::write_msg(&mut guest, &hello);
    let _ = guest.write_all(replies);
    let _ = guest.shutdown(std::net::Shutdown::Write);
    // Keep reading requests until the host is done, so its writes never block.
    let _ = std::io::copy(&mut r, &mut std::io::sink());
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, replies)) = data.split_first() else {
        return;
    };
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (tx, done) = guest_worker();
    tx.send((guest, replies.to_vec())).unwrap();
    if let Ok(mut c) = AgentClient::connect(host, &[]) {
        let _ = match which % 8 {
            0 => c.list_filesystems().map(|_| ()),
            1 => c.stat(b"/etc").map(|_| ()),
            2 => c.read_dir(b"/").map(|_| ()),
            3 => c.read_file(b"/f", &mut std::io::sink()).map(|_| ()),
            4 => c.walk(b"/", &mut |_| Ok(())),
            5 => c.subvolumes("/dev/vda").map(|_| ()),
            6 => {
                let files = [
                    FileRequest {
                        path: b"/a".to_vec(),
                        mapped: false,
                    },
                    FileRequest {
                        path: b"/b".to_vec(),
                        mapped: true,
                    },
                ];
                c.read_files(&files, &mut Sink(0))
            }
            _ => c.mount("/dev/vda1", "/", None, None).map(|_| ()),
        };
        drop(c);
    }
    // The guest side is done with this input before the next one starts.
    done.lock().unwrap().recv().unwrap();
});
