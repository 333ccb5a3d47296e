//! Transmission phase: read requests, answer them concurrently, one write per reply.
//!
//! The reader loop validates every request before doing any work; reads and block status
//! queries then run as their own tasks (the decoder is synchronous, so the actual I/O goes
//! to the blocking pool) and each task writes its whole reply under the writer lock, so
//! replies go out as they finish, never interleaved. A per-connection byte budget bounds
//! the memory held by in-flight requests.

use super::handshake::Negotiated;
use super::proto::*;
use super::NbdError;
use crate::format::BlockSource;
use std::sync::{Arc, Mutex as SyncMutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};

/// Accounting unit of the in-flight budget.
const BUDGET_UNIT: u32 = 64 << 10;
/// In-flight budget per connection, in units (64 MiB: two maximal reads).
const BUDGET_UNITS: u32 = 1024;
/// Reply buffers kept for reuse per connection.
const POOL_BUFFERS: usize = 8;
/// Reply buffers larger than this are freed rather than kept.
const POOL_MAX_BUFFER: usize = (4 << 20) + (64 << 10);
/// Block status asks the decoder about at most this much at a time, so a fragmented
/// image cannot make one request build an enormous extent list.
const STATUS_WINDOW: u64 = crate::format::EXTENT_WINDOW;

/// State shared by the reader loop and the request tasks of one connection.
struct Conn<W> {
    writer: Mutex<W>,
    source: Arc<dyn BlockSource>,
    neg: Negotiated,
    pool: SyncMutex<Vec<Vec<u8>>>,
}

impl<W: AsyncWrite + Unpin> Conn<W> {
    /// Write one whole reply. A failed write means the client is gone; the reader loop
    /// notices on its own, so the error is only traced.
    async fn send(&self, bytes: &[u8]) {
        let mut w = self.writer.lock().await;
        if let Err(e) = w.write_all(bytes).await {
            crate::trace::note(&format!("nbd: reply not sent: {e}"));
        }
    }

    /// Send an error reply for `req`.
    async fn send_error(&self, req: &Request, error: u32, msg: &str) {
        let mut buf = Vec::with_capacity(64);
        put_error_reply(&mut buf, self.neg.structured, req.cookie, error, msg);
        self.send(&buf).await;
    }

    /// Send a successful reply without payload.
    async fn send_ok(&self, req: &Request) {
        let mut buf = [0u8; SIMPLE_REPLY_LEN];
        put_simple_reply(&mut buf, 0, req.cookie);
        self.send(&buf).await;
    }

    fn take_buffer(&self) -> Vec<u8> {
        self.pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
    }

    fn return_buffer(&self, buf: Vec<u8>) {
        if buf.capacity() <= POOL_MAX_BUFFER {
            if let Ok(mut p) = self.pool.lock() {
                if p.len() < POOL_BUFFERS {
                    p.push(buf);
                }
            }
        }
    }
}

/// Serve requests until the client disconnects (NBD_CMD_DISC or EOF), then wait for the
/// replies still in flight.
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    source: Arc<dyn BlockSource>,
    neg: Negotiated,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let size = source.size();
    let conn = Arc::new(Conn {
        writer: Mutex::new(writer),
        source,
        neg,
        pool: SyncMutex::new(Vec::new()),
    });
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let result = loop {
        let mut head = [0u8; REQUEST_LEN];
        match reader.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let Some(req) = Request::parse(&head) else {
            break Err(NbdError::Protocol("bad request magic".into()));
        };
        match req.kind {
            CMD_DISC => break Ok(()),
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    // The payload cannot be skipped within bounds: refuse and hang up.
                    conn.send_error(&req, EPERM, "read-only export").await;
                    break Err(NbdError::Protocol(format!(
                        "write payload of {} bytes",
                        req.length
                    )));
                }
                let copied = tokio::io::copy(
                    &mut (&mut reader).take(u64::from(req.length)),
                    &mut tokio::io::sink(),
                )
                .await?;
                if copied != u64::from(req.length) {
                    break Ok(());
                }
                conn.send_error(&req, EPERM, "read-only export").await;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => conn.send_error(&req, EPERM, "read-only export").await,
            CMD_FLUSH => {
                if req.flags != 0 {
                    conn.send_error(&req, EINVAL, "unexpected command flags")
                        .await;
                } else {
                    conn.send_ok(&req).await;
                }
            }
            CMD_READ => {
                if let Err((error, msg)) = check_read(&req, size, neg) {
                    conn.send_error(&req, error, msg).await;
                    continue;
                }
                let units = req.length.div_ceil(BUDGET_UNIT).max(1);
                let Ok(permit) = budget.clone().acquire_many_owned(units).await else {
                    break Ok(());
                };
                let conn = conn.clone();
                tokio::spawn(async move {
                    let buf = conn.take_buffer();
                    let src = conn.source.clone();
                    let structured = conn.neg.structured;
                    match tokio::task::spawn_blocking(move || {
                        read_reply(&*src, buf, &req, structured)
                    })
                    .await
                    {
                        Ok((buf, len)) => {
                            conn.send(&buf[..len]).await;
                            conn.return_buffer(buf);
                        }
                        Err(_) => conn.send_error(&req, EIO, "read failed").await,
                    }
                    drop(permit);
                });
            }
            CMD_BLOCK_STATUS => {
                if let Err((error, msg)) = check_block_status(&req, size, neg) {
                    conn.send_error(&req, error, msg).await;
                    continue;
                }
                let Ok(permit) = budget.clone().acquire_owned().await else {
                    break Ok(());
                };
                let conn = conn.clone();
                tokio::spawn(async move {
                    let src = conn.source.clone();
                    match tokio::task::spawn_blocking(move || block_status_reply(&*src, &req)).await
                    {
                        Ok(buf) => conn.send(&buf).await,
                        Err(_) => conn.send_error(&req, EIO, "block status failed").await,
                    }
                    drop(permit);
                });
            }
            _ => conn.send_error(&req, EINVAL, "unknown command").await,
        }
    };
    // Let in-flight replies finish before the connection closes (proto.md "Terminating
    // the transmission phase").
    let _all = budget.acquire_many(BUDGET_UNITS).await;
    let mut w = conn.writer.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
}

/// Validate a read request; the error and message to send if it is not acceptable.
pub fn check_read(req: &Request, size: u64, neg: Negotiated) -> Result<(), (u32, &'static str)> {
    let allowed = if neg.structured { CMD_FLAG_DF } else { 0 };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "unexpected command flags"));
    }
    if req.length > MAX_PAYLOAD {
        return Err((EINVAL, "read longer than the maximum block size"));
    }
    check_range(req.offset, u64::from(req.length), size)
        .map_err(|e| (e, "read beyond the end of the export"))
}

/// Validate a block status request.
pub fn check_block_status(
    req: &Request,
    size: u64,
    neg: Negotiated,
) -> Result<(), (u32, &'static str)> {
    if !neg.structured || !neg.base_allocation {
        return Err((EINVAL, "no metadata context selected"));
    }
    if req.flags & !CMD_FLAG_REQ_ONE != 0 {
        return Err((EINVAL, "unexpected command flags"));
    }
    if req.length == 0 {
        return Err((EINVAL, "empty block status request"));
    }
    check_range(req.offset, u64::from(req.length), size)
        .map_err(|e| (e, "block status beyond the end of the export"))
}

/// Allocation runs of `[offset, end)`; on a decoder error the whole range is data.
fn runs_of(source: &dyn BlockSource, runs: &mut Vec<Run>, offset: u64, end: u64) {
    match source.extents(offset, end - offset) {
        Ok(extents) => extents_to_runs(runs, offset, end, &extents),
        Err(_) => extents_to_runs(runs, offset, end, &[]),
    }
}

/// Build the reply to a validated read in `buf` (reused, grown as needed). Returns the
/// buffer and the reply length. A decoder error becomes an EIO reply.
pub fn read_reply(
    source: &dyn BlockSource,
    mut buf: Vec<u8>,
    req: &Request,
    structured: bool,
) -> (Vec<u8>, usize) {
    let offset = req.offset;
    let len = u64::from(req.length);
    if !structured {
        let total = SIMPLE_REPLY_LEN + req.length as usize;
        if buf.len() < total {
            buf.resize(total, 0);
        }
        put_simple_reply(&mut buf, 0, req.cookie);
        if let Err(e) = source.read_at(&mut buf[SIMPLE_REPLY_LEN..total], offset) {
            crate::trace::note(&format!("nbd: read at {offset}: {e}"));
            put_simple_reply(&mut buf, EIO, req.cookie);
            return (buf, SIMPLE_REPLY_LEN);
        }
        return (buf, total);
    }
    if len == 0 {
        if buf.len() < CHUNK_HEADER_LEN {
            buf.resize(CHUNK_HEADER_LEN, 0);
        }
        put_chunk_header(&mut buf, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
        return (buf, CHUNK_HEADER_LEN);
    }
    let mut runs = Vec::new();
    if req.flags & CMD_FLAG_DF == 0 {
        runs_of(source, &mut runs, offset, offset + len);
    }
    if req.flags & CMD_FLAG_DF != 0 || runs.len() > MAX_READ_CHUNKS {
        runs.clear();
        runs.push(Run {
            offset,
            length: len,
            hole: false,
        });
    }
    let total = structured_read_len(&runs);
    if buf.len() < total {
        buf.resize(total, 0);
    }
    for (range, at) in layout_structured_read(&mut buf[..total], req.cookie, &runs) {
        if let Err(e) = source.read_at(&mut buf[range], at) {
            crate::trace::note(&format!("nbd: read at {at}: {e}"));
            let mut err = Vec::new();
            put_error_chunk(&mut err, req.cookie, EIO, "read failed");
            let n = err.len();
            return (err, n);
        }
    }
    (buf, total)
}

/// Build the reply to a validated block status request.
pub fn block_status_reply(source: &dyn BlockSource, req: &Request) -> Vec<u8> {
    let end = req.offset + u64::from(req.length);
    let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_DESCRIPTORS
    };
    let mut runs = Vec::new();
    let mut pos = req.offset;
    while pos < end && runs.len() < limit {
        let window_end = end.min(pos.saturating_add(STATUS_WINDOW));
        runs_of(source, &mut runs, pos, window_end);
        pos = window_end;
    }
    runs.truncate(limit);
    let mut buf = Vec::with_capacity(CHUNK_HEADER_LEN + 4 + runs.len() * 8);
    put_block_status(&mut buf, req.cookie, &runs);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Extent, LayerInfo};
    use std::io;

    /// 1 MiB: bytes are `offset % 251`; `[256 KiB, 768 KiB)` is a hole of zeros.
    struct Mem;

    const SIZE: u64 = 1 << 20;
    const HOLE: std::ops::Range<u64> = (256 << 10)..(768 << 10);

    impl BlockSource for Mem {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            check_range(offset, buf.len() as u64, SIZE)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            for (i, b) in buf.iter_mut().enumerate() {
                let at = offset + i as u64;
                *b = if HOLE.contains(&at) {
                    0
                } else {
                    (at % 251) as u8
                };
            }
            Ok(())
        }
        fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
            Ok(vec![
                Extent {
                    offset: 0,
                    length: HOLE.start,
                    allocated: true,
                },
                Extent {
                    offset: HOLE.start,
                    length: HOLE.end - HOLE.start,
                    allocated: false,
                },
                Extent {
                    offset: HOLE.end,
                    length: SIZE - HOLE.end,
                    allocated: true,
                },
            ]
            .into_iter()
            .filter(|e| e.offset < offset + length && e.offset + e.length > offset)
            .collect())
        }
        fn layers(&self) -> Vec<LayerInfo> {
            Vec::new()
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 42,
            offset,
            length,
        }
    }

    const STRUCTURED: Negotiated = Negotiated {
        structured: true,
        base_allocation: true,
    };

    #[test]
    fn simple_read_reply_is_header_then_data() {
        let r = req(CMD_READ, 0, 1000, 16);

        let (buf, len) = read_reply(&Mem, Vec::new(), &r, false);

        assert_eq!(len, 32);
        assert_eq!(&buf[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&buf[4..8], &[0, 0, 0, 0]);
        assert_eq!(buf[16], (1000 % 251) as u8);
    }

    #[test]
    fn structured_read_across_a_hole_gives_data_hole_data_chunks() {
        let r = req(
            CMD_READ,
            0,
            HOLE.start - 512,
            (HOLE.end - HOLE.start + 1024) as u32,
        );

        let (buf, len) = read_reply(&Mem, Vec::new(), &r, true);

        assert_eq!(len, 28 + 512 + 32 + 28 + 512);
        let types: Vec<u16> = [0, 28 + 512, 28 + 512 + 32]
            .iter()
            .map(|&at| u16::from_be_bytes([buf[at + 6], buf[at + 7]]))
            .collect();
        assert_eq!(
            types,
            vec![
                REPLY_TYPE_OFFSET_DATA,
                REPLY_TYPE_OFFSET_HOLE,
                REPLY_TYPE_OFFSET_DATA
            ]
        );
    }

    #[test]
    fn df_read_is_one_data_chunk() {
        let r = req(CMD_READ, CMD_FLAG_DF, 0, SIZE as u32);

        let (buf, len) = read_reply(&Mem, Vec::new(), &r, true);

        assert_eq!(len, 28 + SIZE as usize);
        assert_eq!(&buf[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert!(buf[28 + HOLE.start as usize..28 + HOLE.end as usize]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn read_checks_reject_bad_requests() {
        let got = [
            check_read(&req(CMD_READ, 0, SIZE, 1), SIZE, STRUCTURED),
            check_read(&req(CMD_READ, 0, u64::MAX, 512), SIZE, STRUCTURED),
            check_read(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), u64::MAX, STRUCTURED),
            check_read(&req(CMD_READ, 1 << 9, 0, 1), SIZE, STRUCTURED),
            check_read(
                &req(CMD_READ, CMD_FLAG_DF, 0, 1),
                SIZE,
                Negotiated::default(),
            ),
        ];

        assert!(got.iter().all(|r| matches!(r, Err((EINVAL, _)))));
    }

    #[test]
    fn block_status_without_context_is_einval() {
        let r = req(CMD_BLOCK_STATUS, 0, 0, 512);

        let got = check_block_status(
            &r,
            SIZE,
            Negotiated {
                structured: true,
                base_allocation: false,
            },
        );

        assert!(matches!(got, Err((EINVAL, _))));
    }

    #[test]
    fn block_status_reports_the_hole() {
        let r = req(CMD_BLOCK_STATUS, 0, 0, SIZE as u32);

        let buf = block_status_reply(&Mem, &r);

        assert_eq!(buf.len(), 20 + 4 + 3 * 8);
        assert_eq!(&buf[32..40], &[0, 8, 0, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn block_status_req_one_gives_one_descriptor() {
        let r = req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, SIZE as u32);

        let buf = block_status_reply(&Mem, &r);

        assert_eq!(buf.len(), 20 + 4 + 8);
        assert_eq!(&buf[24..32], &[0, 4, 0, 0, 0, 0, 0, 0]);
    }
}
