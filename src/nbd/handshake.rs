//! Fixed newstyle handshake and option haggling. proto.md "Handshake".

use super::proto::*;
use super::NbdError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most options one connection may send before it is considered a denial of service.
const MAX_OPTIONS: usize = 1024;

/// What the server exports.
#[derive(Debug, Clone)]
pub struct Export {
    /// Export name announced by NBD_OPT_LIST (the empty name is accepted as well).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

impl Export {
    /// Does the client's export name refer to this export? The empty name is the
    /// spec's "default export", which is this one.
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What the client and server agreed on for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Structured replies are on (NBD_OPT_STRUCTURED_REPLY was acked).
    pub structured: bool,
    /// `base:allocation` was selected by NBD_OPT_SET_META_CONTEXT.
    pub base_allocation: bool,
}

impl Negotiated {
    /// Transmission flags for an export under this negotiation.
    pub fn transmission_flags(&self) -> u16 {
        let base = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        // DF only means something with structured replies; the spec forbids it otherwise.
        if self.structured {
            base | TFLAG_SEND_DF
        } else {
            base
        }
    }
}

/// One option as the client sent it, parsed into what the server decides on.
#[derive(Debug, PartialEq, Eq)]
enum ClientOption<'a> {
    /// NBD_OPT_EXPORT_NAME: the old way into transmission; it has no error reply.
    ExportName(&'a [u8]),
    Abort,
    /// NBD_OPT_LIST; `false` when the client sent data it must not.
    List {
        well_formed: bool,
    },
    /// NBD_OPT_INFO (`go: false`) or NBD_OPT_GO; `None` when malformed.
    Info {
        go: bool,
        request: Option<InfoRequest<'a>>,
    },
    StructuredReply {
        well_formed: bool,
    },
    /// NBD_OPT_LIST_META_CONTEXT (`set: false`) or NBD_OPT_SET_META_CONTEXT.
    MetaContext {
        set: bool,
        request: Option<MetaRequest<'a>>,
    },
    Unsupported,
}

impl<'a> ClientOption<'a> {
    fn parse(option: u32, data: &'a [u8]) -> Self {
        match option {
            OPT_EXPORT_NAME => Self::ExportName(data),
            OPT_ABORT => Self::Abort,
            OPT_LIST => Self::List {
                well_formed: data.is_empty(),
            },
            OPT_INFO | OPT_GO => Self::Info {
                go: option == OPT_GO,
                request: parse_info_request(data),
            },
            OPT_STRUCTURED_REPLY => Self::StructuredReply {
                well_formed: data.is_empty(),
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => Self::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                request: parse_meta_request(data),
            },
            _ => Self::Unsupported,
        }
    }
}

/// What the handshake does once a decision's reply bytes are written.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Read the next option.
    Options,
    /// Enter transmission with the negotiated state.
    Transmission,
    /// The client aborted: write the reply if it can still be written, then end.
    Close,
    /// Drop the connection without a reply (a protocol error that has no error reply).
    Refuse(String),
}

/// Decide on one option: the reply bytes to send (appended to `out`), the change to the
/// negotiated `state`, and what comes next. Pure: no I/O, so every decision is tested
/// without sockets.
fn decide(
    option: u32,
    parsed: ClientOption<'_>,
    export: &Export,
    no_zeroes: bool,
    state: &mut Negotiated,
    out: &mut Vec<u8>,
) -> Next {
    let mut reply = |kind: u32, payload: &[u8]| put_option_reply(out, option, kind, payload);
    match parsed {
        ClientOption::ExportName(name) => {
            if !export.matches(name) {
                return Next::Refuse("NBD_OPT_EXPORT_NAME for an unknown export".into());
            }
            out.extend_from_slice(&export.size.to_be_bytes());
            out.extend_from_slice(&state.transmission_flags().to_be_bytes());
            if !no_zeroes {
                out.resize(out.len() + 124, 0);
            }
            Next::Transmission
        }
        ClientOption::Abort => {
            reply(REP_ACK, &[]);
            Next::Close
        }
        ClientOption::List { well_formed: true } => {
            let mut server = (export.name.len() as u32).to_be_bytes().to_vec();
            server.extend_from_slice(export.name.as_bytes());
            reply(REP_SERVER, &server);
            reply(REP_ACK, &[]);
            Next::Options
        }
        ClientOption::List { well_formed: false } => {
            reply(REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
            Next::Options
        }
        ClientOption::Info { request: None, .. } => {
            reply(REP_ERR_INVALID, b"malformed info request");
            Next::Options
        }
        ClientOption::Info {
            request: Some(req), ..
        } if !export.matches(req.name) => {
            reply(REP_ERR_UNKNOWN, b"no such export");
            Next::Options
        }
        ClientOption::Info {
            go,
            request: Some(req),
        } => {
            reply(
                REP_INFO,
                &info_export(export.size, state.transmission_flags()),
            );
            // Block size is always sent: our maximum is not the spec's default.
            reply(REP_INFO, &info_block_size());
            if req.infos.contains(&INFO_NAME) {
                let mut name = INFO_NAME.to_be_bytes().to_vec();
                name.extend_from_slice(export.name.as_bytes());
                reply(REP_INFO, &name);
            }
            reply(REP_ACK, &[]);
            if go {
                Next::Transmission
            } else {
                Next::Options
            }
        }
        ClientOption::StructuredReply { well_formed: true } => {
            state.structured = true;
            reply(REP_ACK, &[]);
            Next::Options
        }
        ClientOption::StructuredReply { well_formed: false } => {
            reply(REP_ERR_INVALID, b"takes no data");
            Next::Options
        }
        ClientOption::MetaContext { request: None, .. } => {
            reply(REP_ERR_INVALID, b"malformed meta context request");
            Next::Options
        }
        ClientOption::MetaContext {
            set: true,
            request: Some(_),
        } if !state.structured => {
            reply(REP_ERR_INVALID, b"structured replies not negotiated");
            Next::Options
        }
        ClientOption::MetaContext {
            request: Some(req), ..
        } if !export.matches(req.name) => {
            reply(REP_ERR_UNKNOWN, b"no such export");
            Next::Options
        }
        ClientOption::MetaContext {
            set,
            request: Some(req),
        } => {
            let selected = if set {
                req.queries
                    .iter()
                    .any(|q| query_selects_base_allocation(q, false))
            } else {
                req.queries.is_empty()
                    || req
                        .queries
                        .iter()
                        .any(|q| query_selects_base_allocation(q, true))
            };
            if set {
                state.base_allocation = selected;
            }
            if selected {
                // LIST replies carry a reserved id of 0 (proto.md).
                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                let mut ctx = id.to_be_bytes().to_vec();
                ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
                reply(REP_META_CONTEXT, &ctx);
            }
            reply(REP_ACK, &[]);
            Next::Options
        }
        ClientOption::Unsupported => {
            reply(REP_ERR_UNSUP, b"option not supported");
            Next::Options
        }
    }
}

/// Run the handshake. Returns `Ok(None)` when the client ended the negotiation without
/// entering transmission (NBD_OPT_ABORT or a clean close between options). This part
/// only reads, bounds and writes; [`decide`] makes every decision.
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    export: &Export,
) -> Result<Option<Negotiated>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut state = Negotiated::default();
    let mut out = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; 16];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let magic = u64::from_be_bytes(head[0..8].try_into().expect("8 bytes"));
        let option = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        out.clear();
        if len > MAX_OPTION_LEN {
            // NBD_OPT_EXPORT_NAME cannot answer with an error; everything else can.
            if option == OPT_EXPORT_NAME || len > MAX_SKIPPED_OPTION_LEN {
                return Err(NbdError::Protocol(format!(
                    "option {option} of {len} bytes is too big"
                )));
            }
            skip(r, u64::from(len)).await?;
            put_option_reply(&mut out, option, REP_ERR_TOO_BIG, b"option too big");
            w.write_all(&out).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        let parsed = ClientOption::parse(option, &data);
        match decide(option, parsed, export, no_zeroes, &mut state, &mut out) {
            Next::Options => {
                w.write_all(&out).await?;
                w.flush().await?;
            }
            Next::Transmission => {
                w.write_all(&out).await?;
                w.flush().await?;
                return Ok(Some(state));
            }
            Next::Close => {
                // The client may already have closed; a failed ack does not matter.
                let _ = w.write_all(&out).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            Next::Refuse(why) => return Err(NbdError::Protocol(why)),
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

/// Read and discard `len` bytes without allocating them.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied != len {
        return Err(NbdError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decide on one option from a fresh or given state: (next, reply types, state).
    fn decide_one(
        option: u32,
        data: &[u8],
        state: Negotiated,
    ) -> (Next, Vec<u32>, Negotiated, Vec<u8>) {
        let mut state = state;
        let mut out = Vec::new();
        let next = decide(
            option,
            ClientOption::parse(option, data),
            &export(),
            true,
            &mut state,
            &mut out,
        );
        (next, reply_types_from(&out, 0), state, out)
    }

    fn info_body(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_body(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn decide_info_answers_and_keeps_negotiating_go_enters_transmission() {
        let (next, types, ..) = decide_one(
            OPT_INFO,
            &info_body("disk", &[INFO_NAME]),
            Negotiated::default(),
        );
        assert_eq!(next, Next::Options);
        assert_eq!(types, [REP_INFO, REP_INFO, REP_INFO, REP_ACK]);

        let (next, types, ..) = decide_one(OPT_GO, &info_body("", &[]), Negotiated::default());
        assert_eq!(next, Next::Transmission);
        assert_eq!(types, [REP_INFO, REP_INFO, REP_ACK]);
    }

    #[test]
    fn decide_refuses_bad_info_and_unknown_exports_without_leaving() {
        let (next, types, ..) = decide_one(OPT_GO, b"\0\0", Negotiated::default());
        assert_eq!((next, types), (Next::Options, vec![REP_ERR_INVALID]));
        let (next, types, ..) = decide_one(OPT_GO, &info_body("other", &[]), Negotiated::default());
        assert_eq!((next, types), (Next::Options, vec![REP_ERR_UNKNOWN]));
    }

    #[test]
    fn decide_export_name_for_another_export_drops_the_connection() {
        let (next, types, ..) = decide_one(OPT_EXPORT_NAME, b"other", Negotiated::default());
        assert!(matches!(next, Next::Refuse(_)));
        assert!(types.is_empty());
    }

    #[test]
    fn decide_set_meta_context_needs_structured_replies_first() {
        let body = meta_body("disk", &[BASE_ALLOCATION]);
        let (next, types, state, _) =
            decide_one(OPT_SET_META_CONTEXT, &body, Negotiated::default());
        assert_eq!((next, types), (Next::Options, vec![REP_ERR_INVALID]));
        assert!(!state.base_allocation);

        let (_, _, structured, _) = decide_one(OPT_STRUCTURED_REPLY, &[], Negotiated::default());
        assert!(structured.structured);
        let (_, types, state, _) = decide_one(OPT_SET_META_CONTEXT, &body, structured);
        assert_eq!(types, [REP_META_CONTEXT, REP_ACK]);
        assert!(state.base_allocation);
    }

    #[test]
    fn decide_list_meta_context_with_no_query_lists_base_allocation_without_selecting() {
        let (_, types, state, out) = decide_one(
            OPT_LIST_META_CONTEXT,
            &meta_body("", &[]),
            Negotiated::default(),
        );
        assert_eq!(types, [REP_META_CONTEXT, REP_ACK]);
        assert!(!state.base_allocation);
        // LIST replies carry context id 0.
        assert_eq!(&out[20..24], &0u32.to_be_bytes());
    }

    #[test]
    fn decide_options_that_take_no_data_refuse_data() {
        for opt in [OPT_LIST, OPT_STRUCTURED_REPLY] {
            let (next, types, state, _) = decide_one(opt, b"x", Negotiated::default());
            assert_eq!((next, types), (Next::Options, vec![REP_ERR_INVALID]));
            assert_eq!(state, Negotiated::default());
        }
    }

    #[test]
    fn decide_abort_acks_then_closes_and_unknown_options_are_unsupported() {
        let (next, types, ..) = decide_one(OPT_ABORT, &[], Negotiated::default());
        assert_eq!((next, types), (Next::Close, vec![REP_ACK]));
        let (next, types, ..) = decide_one(0x7777, &[], Negotiated::default());
        assert_eq!((next, types), (Next::Options, vec![REP_ERR_UNSUP]));
    }

    fn export() -> Export {
        Export {
            name: "disk".into(),
            size: 1 << 20,
        }
    }

    /// Run `negotiate` against `client_bytes`; return its result and what it wrote.
    async fn run(client_bytes: Vec<u8>) -> (Result<Option<Negotiated>, NbdError>, Vec<u8>) {
        let mut input = &client_bytes[..];
        let mut output = Vec::new();
        let res = negotiate(&mut input, &mut output, &export()).await;
        (res, output)
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(OPT_GO, &d)
    }

    /// Reply types of the option replies in `out` after the 18-byte greeting.
    /// The reply types in a server's output after its 18-byte greeting.
    fn reply_types(out: &[u8]) -> Vec<u32> {
        reply_types_from(out, 18)
    }

    fn reply_types_from(out: &[u8], mut at: usize) -> Vec<u32> {
        let mut types = Vec::new();
        while at + 20 <= out.len() {
            types.push(u32::from_be_bytes(
                out[at + 12..at + 16].try_into().unwrap(),
            ));
            let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
            at += 20 + len;
        }
        types
    }

    #[tokio::test]
    async fn go_after_unknown_option_enters_transmission() {
        let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(option(99, b"junk"));
        c.extend(go("disk"));

        let (res, out) = run(c).await;

        assert_eq!(res.unwrap(), Some(Negotiated::default()));
        assert_eq!(
            reply_types(&out),
            vec![REP_ERR_UNSUP, REP_INFO, REP_INFO, REP_ACK]
        );
    }

    #[tokio::test]
    async fn go_for_unknown_export_is_refused_and_negotiation_continues() {
        let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(go("other"));
        c.extend(go(""));

        let (res, out) = run(c).await;

        assert!(res.unwrap().is_some());
        assert_eq!(reply_types(&out)[0], REP_ERR_UNKNOWN);
    }

    #[tokio::test]
    async fn oversized_option_gets_too_big() {
        let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(option(OPT_LIST, &vec![0u8; MAX_OPTION_LEN as usize + 1]));

        let (res, out) = run(c).await;

        assert!(res.unwrap().is_none());
        assert_eq!(reply_types(&out), vec![REP_ERR_TOO_BIG]);
    }

    #[tokio::test]
    async fn export_name_with_no_zeroes_sends_ten_bytes() {
        let mut c = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        c.extend(option(OPT_EXPORT_NAME, b"disk"));

        let (res, out) = run(c).await;

        assert!(res.unwrap().is_some());
        assert_eq!(out.len(), 18 + 10);
        assert_eq!(&out[18..26], &(1u64 << 20).to_be_bytes());
    }

    #[tokio::test]
    async fn unknown_client_flags_drop_the_connection() {
        let c = 0x80u32.to_be_bytes().to_vec();

        let (res, _) = run(c).await;

        assert!(matches!(res, Err(NbdError::Protocol(_))));
    }

    #[tokio::test]
    async fn set_meta_context_selects_base_allocation() {
        let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(option(OPT_STRUCTURED_REPLY, &[]));
        let mut meta = 0u32.to_be_bytes().to_vec();
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend_from_slice(BASE_ALLOCATION.as_bytes());
        c.extend(option(OPT_SET_META_CONTEXT, &meta));
        c.extend(go(""));

        let (res, out) = run(c).await;

        assert_eq!(
            res.unwrap(),
            Some(Negotiated {
                structured: true,
                base_allocation: true
            })
        );
        assert_eq!(
            &reply_types(&out)[..3],
            &[REP_ACK, REP_META_CONTEXT, REP_ACK]
        );
    }
}
