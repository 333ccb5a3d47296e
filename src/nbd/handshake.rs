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

/// Run the handshake. Returns `Ok(None)` when the client ended the negotiation without
/// entering transmission (NBD_OPT_ABORT or a clean close between options).
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

        match option {
            OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    return Err(NbdError::Protocol(
                        "NBD_OPT_EXPORT_NAME for an unknown export".into(),
                    ));
                }
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&state.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.resize(out.len() + 124, 0);
                }
                w.write_all(&out).await?;
                w.flush().await?;
                return Ok(Some(state));
            }
            OPT_ABORT => {
                put_option_reply(&mut out, option, REP_ACK, &[]);
                // The client may already have closed; a failed ack does not matter.
                let _ = w.write_all(&out).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut server = (export.name.len() as u32).to_be_bytes().to_vec();
                    server.extend_from_slice(export.name.as_bytes());
                    put_option_reply(&mut out, option, REP_SERVER, &server);
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                } else {
                    put_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    );
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"malformed info request")
                }
                Some(req) if !export.matches(req.name) => {
                    put_option_reply(&mut out, option, REP_ERR_UNKNOWN, b"no such export")
                }
                Some(req) => {
                    put_option_reply(
                        &mut out,
                        option,
                        REP_INFO,
                        &info_export(export.size, state.transmission_flags()),
                    );
                    // Block size is always sent: our maximum is not the spec's default.
                    put_option_reply(&mut out, option, REP_INFO, &info_block_size());
                    if req.infos.contains(&INFO_NAME) {
                        let mut name = INFO_NAME.to_be_bytes().to_vec();
                        name.extend_from_slice(export.name.as_bytes());
                        put_option_reply(&mut out, option, REP_INFO, &name);
                    }
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                    if option == OPT_GO {
                        w.write_all(&out).await?;
                        w.flush().await?;
                        return Ok(Some(state));
                    }
                }
            },
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    state.structured = true;
                    put_option_reply(&mut out, option, REP_ACK, &[]);
                } else {
                    put_option_reply(&mut out, option, REP_ERR_INVALID, b"takes no data");
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let setting = option == OPT_SET_META_CONTEXT;
                match parse_meta_request(&data) {
                    None => put_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    ),
                    Some(_) if setting && !state.structured => put_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"structured replies not negotiated",
                    ),
                    Some(req) if !export.matches(req.name) => {
                        put_option_reply(&mut out, option, REP_ERR_UNKNOWN, b"no such export")
                    }
                    Some(req) => {
                        let selected = if setting {
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
                        if setting {
                            state.base_allocation = selected;
                        }
                        if selected {
                            // LIST replies carry a reserved id of 0 (proto.md).
                            let id = if setting { BASE_ALLOCATION_ID } else { 0 };
                            let mut ctx = id.to_be_bytes().to_vec();
                            ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
                            put_option_reply(&mut out, option, REP_META_CONTEXT, &ctx);
                        }
                        put_option_reply(&mut out, option, REP_ACK, &[]);
                    }
                }
            }
            _ => put_option_reply(&mut out, option, REP_ERR_UNSUP, b"option not supported"),
        }
        w.write_all(&out).await?;
        w.flush().await?;
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
    fn reply_types(out: &[u8]) -> Vec<u32> {
        let mut types = Vec::new();
        let mut at = 18;
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
