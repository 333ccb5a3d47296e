//! Transmission phase: read requests, answer them concurrently, one write per reply piece.
//!
//! The reader loop validates every request before doing any work; reads and block status
//! queries then run as their own tasks (the decoder is synchronous, so the actual I/O goes
//! to the blocking pool). A read is answered piece by piece, each at most [`PIECE`] bytes
//! of data: structured replies as one or more chunks per piece (other replies' chunks may
//! come between them), simple replies as the header and then the data in a row under the
//! writer lock. Each task holds a share of the connection's byte budget while it runs;
//! the reader waits for a share before taking the next request, so a client that does
//! not read its replies stops being read (backpressure), and the server's reply buffers
//! never exceed [`super::MAX_REPLY_BYTES`] whatever its clients do.

use super::handshake::Negotiated;
use super::proto::*;
use super::NbdError;
use crate::format::BlockSource;
use std::sync::{Arc, Mutex as SyncMutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};

/// Most data bytes read and sent in one piece of a read reply.
pub const PIECE: u32 = 1 << 20;
/// Accounting unit of the in-flight budget.
const BUDGET_UNIT: usize = 64 << 10;
/// Reply buffers kept for reuse, for the whole process.
const POOL_BUFFERS: usize = 8;
/// Reply buffers larger than this are freed rather than kept (a piece, plus the chunk
/// headers of up to [`MAX_READ_CHUNKS`] holes).
const POOL_MAX_BUFFER: usize = PIECE as usize + BUDGET_UNIT;
/// In-flight budget per connection, in units: an equal share of what the whole server
/// may hold, less the pool. Every connection has its own, so a stalled client can only
/// ever block itself.
const BUDGET_UNITS: u32 = ((super::MAX_REPLY_BYTES - POOL_BUFFERS * POOL_MAX_BUFFER)
    / super::MAX_CONNECTIONS
    / BUDGET_UNIT) as u32;
/// Units one read piece takes: its data, plus one for its headers.
const PIECE_UNITS: u32 = (POOL_MAX_BUFFER / BUDGET_UNIT) as u32;
const _: () = assert!(
    BUDGET_UNITS >= PIECE_UNITS,
    "a connection must fit one piece"
);
/// Block status asks the decoder about at most this much at a time, so a fragmented
/// image cannot make one request build an enormous extent list.
const STATUS_WINDOW: u64 = crate::format::EXTENT_WINDOW;
/// First window of a one-extent block status query (widened ×8 up to [`STATUS_WINDOW`]).
const FIRST_STATUS_WINDOW: u64 = 4 << 20;

/// Reply buffers kept for reuse (sparing the zeroing and page faults of a fresh one).
static POOL: SyncMutex<Vec<Vec<u8>>> = SyncMutex::new(Vec::new());

/// A reply buffer from the pool, or a new one.
fn take_buffer() -> Vec<u8> {
    POOL.lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_default()
}

/// Keep `buf` for reuse if it is not too large and the pool has room.
fn return_buffer(buf: Vec<u8>) {
    if buf.capacity() <= POOL_MAX_BUFFER {
        if let Ok(mut p) = POOL.lock() {
            if p.len() < POOL_BUFFERS {
                p.push(buf);
            }
        }
    }
}

/// State shared by the reader loop and the request tasks of one connection.
struct Conn<W> {
    writer: Mutex<W>,
    source: Arc<dyn BlockSource>,
    neg: Negotiated,
}

/// Write `bytes` whole. A failed write means the client is gone; the reader loop
/// notices on its own, so the error is only traced.
async fn write_traced<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) {
    if let Err(e) = w.write_all(bytes).await {
        crate::trace::note(&format!("nbd: reply not sent: {e}"));
    }
}

impl<W: AsyncWrite + Unpin> Conn<W> {
    /// Write one whole reply (or structured chunk).
    async fn send(&self, bytes: &[u8]) {
        write_traced(&mut *self.writer.lock().await, bytes).await;
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
}

impl<W: AsyncWrite + Unpin + Send + 'static> Conn<W> {
    /// Answer a validated read, piece by piece (see the module doc).
    async fn answer_read(&self, req: Request) {
        let structured = self.neg.structured;
        let src = self.source.clone();
        let Ok(pieces) =
            tokio::task::spawn_blocking(move || read_pieces(&*src, &req, structured)).await
        else {
            self.send_error(&req, EIO, "read failed").await;
            return;
        };
        // A simple reply is one header and then all its data: nothing may come between.
        let mut held = if structured {
            None
        } else {
            Some(self.writer.lock().await)
        };
        let mut buf = take_buffer();
        let count = pieces.len();
        for (i, runs) in pieces.into_iter().enumerate() {
            let (first, last) = (i == 0, i + 1 == count);
            let src = self.source.clone();
            let filled = tokio::task::spawn_blocking(move || {
                let piece = Piece {
                    req: &req,
                    structured,
                    runs: &runs,
                    first,
                    last,
                };
                let len = fill_piece(&*src, &mut buf, piece);
                (buf, len)
            })
            .await;
            let (b, len) = match filled {
                Ok((b, Ok(len))) => (b, len),
                failed => {
                    if let Ok((_, Err(e))) = failed {
                        crate::trace::note(&format!("nbd: read at {}: {e}", req.offset));
                    }
                    let mut err = Vec::with_capacity(64);
                    put_error_reply(&mut err, structured, req.cookie, EIO, "read failed");
                    match held.as_mut() {
                        None => self.send(&err).await,
                        Some(w) if first => write_traced(&mut **w, &err).await,
                        // The header already said success: all the protocol allows now
                        // is hanging up (proto.md "Simple reply message").
                        Some(w) => {
                            crate::trace::note("nbd: read failed mid-reply, disconnecting");
                            let _ = w.shutdown().await;
                        }
                    }
                    return;
                }
            };
            match held.as_mut() {
                Some(w) => write_traced(&mut **w, &b[..len]).await,
                None => self.send(&b[..len]).await,
            }
            buf = b;
        }
        return_buffer(buf);
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
                let units = PIECE_UNITS.min(req.length.div_ceil(BUDGET_UNIT as u32) + 1);
                let Ok(permit) = budget.clone().acquire_many_owned(units).await else {
                    break Ok(());
                };
                let conn = conn.clone();
                tokio::spawn(async move {
                    conn.answer_read(req).await;
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

/// The pieces a validated read is answered in, each a list of runs holding at most
/// [`PIECE`] data bytes (holes take none). Simple replies have only data runs; a
/// zero-length read is one piece without runs.
pub fn read_pieces(source: &dyn BlockSource, req: &Request, structured: bool) -> Vec<Vec<Run>> {
    let offset = req.offset;
    let end = offset + u64::from(req.length);
    let mut runs = Vec::new();
    if structured && req.flags & CMD_FLAG_DF == 0 && req.length > 0 {
        runs_of(source, &mut runs, offset, end);
    }
    if runs.is_empty() || runs.len() > MAX_READ_CHUNKS {
        runs.clear();
        if req.length > 0 {
            runs.push(Run {
                offset,
                length: end - offset,
                hole: false,
            });
        }
    }
    let mut pieces = vec![Vec::new()];
    let mut room = u64::from(PIECE);
    for mut run in runs {
        loop {
            let take = if run.hole {
                run.length
            } else {
                run.length.min(room)
            };
            if take == 0 {
                pieces.push(Vec::new());
                room = u64::from(PIECE);
                continue;
            }
            if let Some(piece) = pieces.last_mut() {
                piece.push(Run {
                    length: take,
                    ..run
                });
            }
            if !run.hole {
                room -= take;
            }
            if take == run.length {
                break;
            }
            run.offset += take;
            run.length -= take;
        }
    }
    pieces
}

/// Which piece of which read reply [`fill_piece`] builds.
#[derive(Clone, Copy)]
pub struct Piece<'a> {
    /// The validated read request.
    pub req: &'a Request,
    /// Whether the connection negotiated structured replies.
    pub structured: bool,
    /// This piece's runs, from [`read_pieces`].
    pub runs: &'a [Run],
    /// The reply's first piece (a simple reply's header goes in it).
    pub first: bool,
    /// The reply's last piece (its last structured chunk is marked done).
    pub last: bool,
}

/// Build `piece` in `buf` (reused, grown as needed) and return its length: for a simple
/// reply the header (first piece only) and the data, for a structured one its chunks.
/// Fails with the decoder's error (the reply is then an error, or a hang-up).
pub fn fill_piece(
    source: &dyn BlockSource,
    buf: &mut Vec<u8>,
    piece: Piece,
) -> std::io::Result<usize> {
    let Piece {
        req,
        structured,
        runs,
        first,
        last,
    } = piece;
    let (total, data) = if structured {
        if runs.is_empty() {
            buf.resize(buf.len().max(CHUNK_HEADER_LEN), 0);
            put_chunk_header(buf, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            return Ok(CHUNK_HEADER_LEN);
        }
        let total = structured_read_len(runs);
        buf.resize(buf.len().max(total), 0);
        (
            total,
            layout_structured_read(&mut buf[..total], req.cookie, runs, last),
        )
    } else {
        let header = if first { SIMPLE_REPLY_LEN } else { 0 };
        let mut at = header;
        let mut data = Vec::new();
        for run in runs {
            let len = run.length as usize;
            data.push((at..at + len, run.offset));
            at += len;
        }
        buf.resize(buf.len().max(at), 0);
        if first {
            put_simple_reply(buf, 0, req.cookie);
        }
        (at, data)
    };
    for (range, at) in data {
        source.read_at(&mut buf[range], at)?;
    }
    Ok(total)
}

/// The whole reply to a validated read, all pieces in a row, or the error reply its
/// first failure gives. For tests and tools; the server sends piece by piece.
pub fn read_reply(source: &dyn BlockSource, req: &Request, structured: bool) -> Vec<u8> {
    let pieces = read_pieces(source, req, structured);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for (i, runs) in pieces.iter().enumerate() {
        let piece = Piece {
            req,
            structured,
            runs,
            first: i == 0,
            last: i + 1 == pieces.len(),
        };
        match fill_piece(source, &mut buf, piece) {
            Ok(len) => out.extend_from_slice(&buf[..len]),
            Err(_) => {
                put_error_reply(&mut out, structured, req.cookie, EIO, "read failed");
                break;
            }
        }
    }
    out
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
    if limit == 1 {
        // One extent wanted (QEMU's client always asks so, once per extent): map a small
        // window and widen it only while one run covers all of it, so the cost follows
        // the extent's length rather than the request's.
        let mut window = FIRST_STATUS_WINDOW;
        loop {
            runs.clear();
            let window_end = end.min(req.offset.saturating_add(window));
            runs_of(source, &mut runs, req.offset, window_end);
            if runs.len() > 1 || window_end == end || window >= STATUS_WINDOW {
                break;
            }
            window = (window * 8).min(STATUS_WINDOW);
        }
    } else {
        let mut pos = req.offset;
        while pos < end && runs.len() < limit {
            let window_end = end.min(pos.saturating_add(STATUS_WINDOW));
            runs_of(source, &mut runs, pos, window_end);
            pos = window_end;
        }
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

        let buf = read_reply(&Mem, &r, false);
        let len = buf.len();

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

        let buf = read_reply(&Mem, &r, true);
        let len = buf.len();

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

        let buf = read_reply(&Mem, &r, true);
        let len = buf.len();

        assert_eq!(len, 28 + SIZE as usize);
        assert_eq!(&buf[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert!(buf[28 + HOLE.start as usize..28 + HOLE.end as usize]
            .iter()
            .all(|&b| b == 0));
    }

    /// 8 MiB of allocated zeros.
    struct Zeros;

    impl BlockSource for Zeros {
        fn size(&self) -> u64 {
            8 << 20
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn layers(&self) -> Vec<LayerInfo> {
            Vec::new()
        }
    }

    #[test]
    fn a_long_read_is_answered_in_pieces_of_at_most_piece_bytes() {
        let r = req(CMD_READ, 0, 5, 3 * PIECE + 7);

        let pieces = read_pieces(&Zeros, &r, false);

        let sizes: Vec<u64> = pieces
            .iter()
            .map(|p| p.iter().map(|run| run.length).sum())
            .collect();
        let p = u64::from(PIECE);
        assert_eq!(sizes, vec![p, p, p, 7]);
        assert_eq!(pieces[1][0].offset, 5 + p);
    }

    #[test]
    fn only_the_last_piece_of_a_structured_read_is_done() {
        let r = req(CMD_READ, 0, 0, 2 * PIECE + 1);

        let buf = read_reply(&Zeros, &r, true);

        let piece = 28 + PIECE as usize;
        let flags: Vec<u16> = [0, piece, 2 * piece]
            .iter()
            .map(|&at| u16::from_be_bytes([buf[at + 4], buf[at + 5]]))
            .collect();
        assert_eq!(buf.len(), 2 * piece + 28 + 1);
        assert_eq!(flags, vec![0, 0, REPLY_FLAG_DONE]);
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

    /// 1 GiB: data up to 100 MiB, a hole after; records the longest range it was asked
    /// to map.
    struct LongExtent(std::sync::Mutex<u64>);

    const LONG: u64 = 100 << 20;

    impl BlockSource for LongExtent {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
            buf.fill(1);
            Ok(())
        }
        fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
            let mut asked = self.0.lock().unwrap();
            *asked = (*asked).max(length);
            let end = offset + length;
            let split = LONG.clamp(offset, end);
            Ok([(offset, split, true), (split, end, false)]
                .into_iter()
                .filter(|(a, b, _)| a < b)
                .map(|(a, b, allocated)| Extent {
                    offset: a,
                    length: b - a,
                    allocated,
                })
                .collect())
        }
        fn layers(&self) -> Vec<LayerInfo> {
            Vec::new()
        }
    }

    #[test]
    fn req_one_reports_a_long_extent_whole_mapping_little_beyond_it() {
        let src = LongExtent(std::sync::Mutex::new(0));
        let r = req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, u32::MAX);

        let buf = block_status_reply(&src, &r);

        assert_eq!(buf.len(), 20 + 4 + 8);
        assert_eq!(&buf[24..28], &(LONG as u32).to_be_bytes());
        assert_eq!(&buf[28..32], &[0, 0, 0, 0]);
        let asked = *src.0.lock().unwrap();
        assert!(asked > LONG && asked <= 8 * LONG, "mapped {asked} bytes");
    }
}
