//! NBD wire format: constants, limits and pure encode/decode helpers (no I/O).
//!
//! Everything here follows the NBD protocol document (`doc/proto.md` of
//! NetworkBlockDevice/nbd); section names are given in the doc comments. All integers on
//! the wire are big-endian.

use crate::bytes::{be16, be32, be64};
use crate::format::Extent;

/// Handshake: first magic sent by the server ("NBDMAGIC"). proto.md "Newstyle negotiation".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Handshake: newstyle magic, also prefixed to every client option ("IHAVEOPT").
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply. proto.md "Fixed newstyle negotiation".
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request. proto.md "Request message".
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply. proto.md "Simple reply message".
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk. proto.md "Structured reply chunk message".
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle. proto.md "Handshake flags".
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle. proto.md "Client flags".
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: do not send the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set. proto.md "Transmission flags".
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: NBD_CMD_FLUSH is accepted.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: NBD_CMD_FLAG_DF is honoured on reads (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see the same data (no per-connection cache).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose the export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts matching queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for NBD_CMD_BLOCK_STATUS.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success / end of a list. proto.md "Option reply types".
pub const REP_ACK: u32 = 1;
/// Option reply: one export of NBD_OPT_LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information (NBD_OPT_INFO / NBD_OPT_GO).
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: option known but syntactically invalid (or not allowed now).
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the request is too large to process.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type: size and transmission flags (mandatory). proto.md "NBD_REP_INFO".
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read. proto.md "Request types".
pub const CMD_READ: u16 = 0;
/// Command: write (refused: read-only export).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush (nothing to flush on a read-only export).
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (refused: read-only export).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes (refused: read-only export).
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status of the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (writes only).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status with exactly one descriptor.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Reply chunk flag: last chunk of this reply. proto.md "Structured reply flags".
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Reply chunk: no payload, only ends a reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Reply chunk: offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Reply chunk: offset + length of a range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Reply chunk: metadata context id + (length, status) descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Reply chunk: error + message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Error: operation not permitted (writes to a read-only export). proto.md "Error values".
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: invalid argument (bad range, bad flag, unknown command).
pub const EINVAL: u32 = 22;

/// base:allocation status flag: the range is not allocated. proto.md "Metadata contexts".
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation status flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Id given to `base:allocation` in NBD_REP_META_CONTEXT and block status chunks.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Smallest addressable unit advertised in NBD_INFO_BLOCK_SIZE (decoders read any byte).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred request size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest read (and write payload) accepted: the spec's portable 2^25 bound.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload parsed; larger ones get NBD_REP_ERR_TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Largest option payload skipped before replying; beyond this the connection is dropped.
pub const MAX_SKIPPED_OPTION_LEN: u32 = 1 << 20;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Most descriptors sent in one block status reply (the spec lets the server return less).
pub const MAX_DESCRIPTORS: usize = 4096;
/// Most chunks in one structured read reply; beyond, the read is sent as plain data.
pub const MAX_READ_CHUNKS: usize = 256;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// One transmission request header. proto.md "Request message".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length (for writes, also the payload that follows).
    pub length: u32,
}

impl Request {
    /// Decode a request header; `None` if the magic is wrong (the stream is out of sync).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(b, 0) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }

    /// Encode this request (used by tests and tools that act as a client).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Check that `[offset, offset + length)` lies inside an export of `size` bytes.
/// Returns the NBD error to send otherwise (overflow and past-the-end are both EINVAL,
/// as proto.md "Error values" asks for reads).
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<(), u32> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(EINVAL),
    }
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO. proto.md "NBD_OPT_INFO".
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Requested export name.
    pub name: &'a [u8],
    /// Requested information types.
    pub infos: Vec<u16>,
}

/// Decode an NBD_OPT_INFO / NBD_OPT_GO body; `None` if the lengths do not add up.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let mut r = Cursor(data);
    let name_len = usize::try_from(r.u32()?).ok()?;
    if name_len > MAX_STRING_LEN {
        return None;
    }
    let name = r.take(name_len)?;
    let count = usize::from(r.u16()?);
    let list = r.take(count.checked_mul(2)?)?;
    if !r.0.is_empty() {
        return None;
    }
    let infos = list.chunks_exact(2).map(|b| be16(b, 0)).collect();
    Some(InfoRequest { name, infos })
}

/// The body of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    /// Export the contexts are for.
    pub name: &'a [u8],
    /// Query strings (empty list: all contexts, for LIST only).
    pub queries: Vec<&'a [u8]>,
}

/// Decode a meta context option body; `None` if the lengths do not add up.
pub fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut r = Cursor(data);
    let name_len = usize::try_from(r.u32()?).ok()?;
    if name_len > MAX_STRING_LEN {
        return None;
    }
    let name = r.take(name_len)?;
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        // Each query needs at least its 4-byte length, so `count` cannot outrun `data`.
        let len = usize::try_from(r.u32()?).ok()?;
        if len > MAX_STRING_LEN {
            return None;
        }
        queries.push(r.take(len)?);
    }
    if !r.0.is_empty() {
        return None;
    }
    Some(MetaRequest { name, queries })
}

/// Does a meta context query select `base:allocation`? For LIST, the namespace alone
/// (`base:`) matches every context in it; SET needs the full name.
pub fn query_selects_base_allocation(query: &[u8], listing: bool) -> bool {
    query == BASE_ALLOCATION.as_bytes() || (listing && query == b"base:")
}

/// Append a fixed-newstyle option reply.
pub fn put_option_reply(buf: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    buf.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&reply.to_be_bytes());
    // Payloads are built by this server from bounded strings; they always fit.
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
}

/// Payload of NBD_INFO_EXPORT: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Payload of NBD_INFO_BLOCK_SIZE with this server's constraints.
pub fn info_block_size() -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
    b[6..10].copy_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    b[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
    b
}

/// Write a simple reply header into `out[..16]`.
pub fn put_simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Write a structured reply chunk header into `out[..20]`.
pub fn put_chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
}

/// Append a final NBD_REPLY_TYPE_ERROR chunk carrying `error` and a short message.
pub fn put_error_chunk(buf: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    let start = buf.len();
    buf.resize(start + CHUNK_HEADER_LEN, 0);
    let len = (6 + msg.len()) as u32;
    put_chunk_header(
        &mut buf[start..],
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len,
    );
    buf.extend_from_slice(&error.to_be_bytes());
    buf.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    buf.extend_from_slice(msg);
}

/// Append an error reply in whichever form the connection negotiated.
pub fn put_error_reply(buf: &mut Vec<u8>, structured: bool, cookie: u64, error: u32, msg: &str) {
    if structured {
        put_error_chunk(buf, cookie, error, msg);
    } else {
        let start = buf.len();
        buf.resize(start + SIMPLE_REPLY_LEN, 0);
        put_simple_reply(&mut buf[start..], error, cookie);
    }
}

/// Append a final NBD_REPLY_TYPE_BLOCK_STATUS chunk for `base:allocation`.
pub fn put_block_status(buf: &mut Vec<u8>, cookie: u64, runs: &[Run]) {
    let start = buf.len();
    buf.resize(start + CHUNK_HEADER_LEN, 0);
    let len = 4 + runs.len() * 8;
    put_chunk_header(
        &mut buf[start..],
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    );
    buf.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for run in runs {
        // Runs come from a request whose length is a u32, so each fits.
        buf.extend_from_slice(&(run.length as u32).to_be_bytes());
        let status = if run.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        buf.extend_from_slice(&status.to_be_bytes());
    }
}

/// A run of the export with one allocation state, clipped to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// True when the run reads as zeros and stores nothing.
    pub hole: bool,
}

/// Append `run` to `runs`, merging it into the last run when they have the same state.
fn push_run(runs: &mut Vec<Run>, run: Run) {
    if run.length == 0 {
        return;
    }
    match runs.last_mut() {
        Some(last) if last.hole == run.hole && last.offset + last.length == run.offset => {
            last.length += run.length;
        }
        _ => runs.push(run),
    }
}

/// Turn a decoder's extents into runs that cover `[offset, end)` exactly, in order.
///
/// Decoders are trusted to be correct but not relied on: extents outside the range are
/// clipped, overlapping or backwards ones skipped, and any gap is reported as data
/// (always a safe answer). Appends to `runs` so windows can be accumulated.
pub fn extents_to_runs(runs: &mut Vec<Run>, offset: u64, end: u64, extents: &[Extent]) {
    let mut pos = offset;
    for e in extents {
        if pos >= end {
            break;
        }
        let e_end = e.offset.saturating_add(e.length).min(end);
        if e_end <= pos {
            continue;
        }
        if e.offset > pos {
            let gap_end = e.offset.min(end);
            push_run(
                runs,
                Run {
                    offset: pos,
                    length: gap_end - pos,
                    hole: false,
                },
            );
            pos = gap_end;
        }
        if e_end > pos {
            push_run(
                runs,
                Run {
                    offset: pos,
                    length: e_end - pos,
                    hole: !e.allocated,
                },
            );
            pos = e_end;
        }
    }
    if pos < end {
        push_run(
            runs,
            Run {
                offset: pos,
                length: end - pos,
                hole: false,
            },
        );
    }
}

/// Bytes a structured read reply takes for `runs` (the caller bounds the total).
pub fn structured_read_len(runs: &[Run]) -> usize {
    runs.iter()
        .map(|r| {
            if r.hole {
                CHUNK_HEADER_LEN + 12
            } else {
                CHUNK_HEADER_LEN + 8 + r.length as usize
            }
        })
        .sum()
}

/// Lay out a structured read reply for `runs` in `out` (exactly
/// [`structured_read_len`] bytes): headers and hole chunks are written, data chunks get
/// their header and offset. Returns, for each data chunk, where its bytes go in `out` and
/// which export offset they come from. With `done`, the last chunk carries
/// NBD_REPLY_FLAG_DONE.
pub fn layout_structured_read(
    out: &mut [u8],
    cookie: u64,
    runs: &[Run],
    done: bool,
) -> Vec<(std::ops::Range<usize>, u64)> {
    let mut data = Vec::new();
    let mut at = 0;
    for (i, run) in runs.iter().enumerate() {
        let flags = if done && i + 1 == runs.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        if run.hole {
            put_chunk_header(&mut out[at..], flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            out[at + 20..at + 28].copy_from_slice(&run.offset.to_be_bytes());
            out[at + 28..at + 32].copy_from_slice(&(run.length as u32).to_be_bytes());
            at += 32;
        } else {
            let len = run.length as usize;
            put_chunk_header(
                &mut out[at..],
                flags,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                (8 + len) as u32,
            );
            out[at + 20..at + 28].copy_from_slice(&run.offset.to_be_bytes());
            data.push((at + 28..at + 28 + len, run.offset));
            at += 28 + len;
        }
    }
    data
}

/// A bounds-checked reader over an option payload.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| be16(b, 0))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| be32(b, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, allocated: bool) -> Extent {
        Extent {
            offset,
            length,
            allocated,
        }
    }

    #[test]
    fn request_round_trips() {
        let req = Request {
            flags: CMD_FLAG_DF,
            kind: CMD_READ,
            cookie: 7,
            offset: 1 << 40,
            length: 512,
        };

        let parsed = Request::parse(&req.encode());

        assert_eq!(parsed, Some(req));
    }

    #[test]
    fn request_with_bad_magic_is_rejected() {
        let mut b = Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 1,
        }
        .encode();
        b[0] ^= 0xff;

        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn range_check_rejects_overflow_and_past_end() {
        let size = 1 << 20;

        let results = [
            check_range(0, size, size),
            check_range(size, 1, size),
            check_range(u64::MAX - 10, 512, u64::MAX),
        ];

        assert_eq!(results, [Ok(()), Err(EINVAL), Err(EINVAL)]);
    }

    #[test]
    fn info_request_parses_name_and_infos() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());

        let req = parse_info_request(&data);

        assert_eq!(
            req,
            Some(InfoRequest {
                name: b"abc",
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
    }

    #[test]
    fn info_request_with_lying_name_length_is_rejected() {
        let mut data = u32::MAX.to_be_bytes().to_vec();
        data.extend_from_slice(&[0, 0]);

        assert_eq!(parse_info_request(&data), None);
    }

    #[test]
    fn info_request_with_trailing_bytes_is_rejected() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&0u16.to_be_bytes());
        data.push(9);

        assert_eq!(parse_info_request(&data), None);
    }

    #[test]
    fn meta_request_parses_queries() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q);
        }

        let req = parse_meta_request(&data).unwrap();

        assert_eq!(
            req.queries,
            vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]
        );
    }

    #[test]
    fn meta_request_with_huge_query_count_is_rejected() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_be_bytes());

        assert_eq!(parse_meta_request(&data), None);
    }

    #[test]
    fn base_namespace_matches_only_when_listing() {
        let got = [
            query_selects_base_allocation(b"base:", true),
            query_selects_base_allocation(b"base:", false),
            query_selects_base_allocation(b"base:allocation", false),
            query_selects_base_allocation(b"qemu:allocation-depth", true),
        ];

        assert_eq!(got, [true, false, true, false]);
    }

    #[test]
    fn extents_are_clipped_merged_and_gaps_filled_as_data() {
        let extents = [
            ext(0, 100, true),
            ext(100, 50, true),
            ext(150, 100, false),
            ext(400, 100, false),
        ];
        let mut runs = Vec::new();

        extents_to_runs(&mut runs, 50, 450, &extents);

        assert_eq!(
            runs,
            vec![
                Run {
                    offset: 50,
                    length: 100,
                    hole: false
                },
                Run {
                    offset: 150,
                    length: 100,
                    hole: true
                },
                Run {
                    offset: 250,
                    length: 150,
                    hole: false
                },
                Run {
                    offset: 400,
                    length: 50,
                    hole: true
                },
            ]
        );
    }

    #[test]
    fn bogus_extents_still_cover_the_range() {
        let extents = [
            ext(500, 10, false),
            ext(0, 0, false),
            ext(u64::MAX - 1, 5, false),
        ];
        let mut runs = Vec::new();

        extents_to_runs(&mut runs, 0, 100, &extents);

        assert_eq!(
            runs,
            vec![Run {
                offset: 0,
                length: 100,
                hole: false
            }]
        );
    }

    #[test]
    fn structured_read_layout_marks_last_chunk_done() {
        let runs = [
            Run {
                offset: 0,
                length: 4,
                hole: false,
            },
            Run {
                offset: 4,
                length: 8,
                hole: true,
            },
        ];
        let mut out = vec![0u8; structured_read_len(&runs)];

        let data = layout_structured_read(&mut out, 9, &runs, true);

        assert_eq!(out.len(), 28 + 4 + 32);
        assert_eq!(data, vec![(28..32, 0)]);
        assert_eq!(be16(&out, 4), 0);
        assert_eq!(be16(&out, 6), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be16(&out, 32 + 4), REPLY_FLAG_DONE);
        assert_eq!(be16(&out, 32 + 6), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(be64(&out, 32 + 20), 4);
        assert_eq!(be32(&out, 32 + 28), 8);
    }

    #[test]
    fn block_status_encodes_hole_as_hole_and_zero() {
        let runs = [
            Run {
                offset: 0,
                length: 512,
                hole: false,
            },
            Run {
                offset: 512,
                length: 1024,
                hole: true,
            },
        ];
        let mut buf = Vec::new();

        put_block_status(&mut buf, 3, &runs);

        assert_eq!(buf.len(), 20 + 4 + 16);
        assert_eq!(be32(&buf, 16), 20);
        assert_eq!(be32(&buf, 20), BASE_ALLOCATION_ID);
        assert_eq!(
            &buf[24..40],
            &[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn error_chunk_carries_errno_and_message() {
        let mut buf = Vec::new();

        put_error_chunk(&mut buf, 5, EINVAL, "bad");

        assert_eq!(be16(&buf, 4), REPLY_FLAG_DONE);
        assert_eq!(be16(&buf, 6), REPLY_TYPE_ERROR);
        assert_eq!(be32(&buf, 16), 9);
        assert_eq!(be32(&buf, 20), EINVAL);
        assert_eq!(&buf[24..], &[0, 3, b'b', b'a', b'd']);
    }
}
