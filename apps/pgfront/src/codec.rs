//! Sans-IO framing of the PostgreSQL frontend/backend protocol, version 3.
//!
//! Every message after the first is `[tag: u8][len: i32 BE][body]`, where `len` counts itself
//! and the body but not the tag. A client's first packet (startup, SSL/GSS request, cancel) is
//! untagged: `[len: i32 BE][code: i32 BE][body]`. This module cuts messages out of a byte
//! buffer without copying ([`split_frame`] hands out the raw message as [`Bytes`]), parses only
//! the messages a front-end has to interpret (borrowing from the frame) and encodes the few a
//! front-end writes itself. Everything else is forwarded as raw bytes.
//!
//! No I/O, no panics on any input, and bounded allocation: a length field is checked against
//! the caller's limit before anything is buffered or allocated because of it. On an error
//! nothing is consumed; the connection the bytes came from cannot be resynchronised and
//! should be closed.
//!
//! The encoders (in `codec/encode.rs`, re-exported here) build the messages a front-end writes
//! itself: the server's side of a handshake for the client, and queries and authentication
//! for the backend.

use bytes::{Buf, Bytes, BytesMut};
use std::fmt;

/// Default largest message accepted from a client or backend (1 GiB is PostgreSQL's own; we
/// use less).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest startup packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP: usize = 10_000;
/// The single byte that answers an SSLRequest or GSSENCRequest: "no encryption, go on".
pub const REFUSE_ENCRYPTION: &[u8] = b"N";

/// Protocol version 3.0 as a startup code.
const PROTOCOL_3_0: i32 = 3 << 16;
const CANCEL_CODE: i32 = 80877102;
const SSL_CODE: i32 = 80877103;
const GSSENC_CODE: i32 = 80877104;
/// Tag and length.
const HEADER_LEN: usize = 5;

/// Errors decoding bytes from a client or backend. Each one ends the connection it came from.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// `tag` is 0 for a startup packet.
    #[error("invalid message length {len} for message type {}", TagName(*.tag))]
    BadLength { tag: u8, len: i64 },
    /// `len` counts the whole message, tag included.
    #[error("message of type {} is {len} bytes, over the limit of {max}", TagName(*.tag))]
    TooLarge { tag: u8, len: usize, max: usize },
    #[error("malformed {what} message: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
}

/// A message type byte as the protocol documentation writes it: `'Q'`, `startup` for 0.
struct TagName(u8);

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("startup"),
            t if t.is_ascii_graphic() => write!(f, "'{}'", t as char),
            t => write!(f, "0x{t:02x}"),
        }
    }
}

fn malformed(what: &'static str, why: &'static str) -> CodecError {
    CodecError::Malformed { what, why }
}

/// A cursor over a message body that names the message in its errors.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.b.len() < n {
            return Err(malformed(self.what, "truncated"));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, CodecError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string, without the NUL.
    fn cstr(&mut self) -> Result<&'a [u8], CodecError> {
        let n = memchr::memchr(0, self.b);
        let n = n.ok_or_else(|| malformed(self.what, "string without a NUL terminator"))?;
        let s = &self.b[..n];
        self.b = &self.b[n + 1..];
        Ok(s)
    }

    fn utf8(&mut self) -> Result<&'a str, CodecError> {
        let what = self.what;
        std::str::from_utf8(self.cstr()?).map_err(|_| malformed(what, "string is not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    /// The body must be used up.
    fn end(&self) -> Result<(), CodecError> {
        match self.b.is_empty() {
            true => Ok(()),
            false => Err(malformed(self.what, "trailing bytes")),
        }
    }
}

/// The first packet of a client connection (untagged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Code 80877103: the client asks for TLS. Answer [`REFUSE_ENCRYPTION`] (or upgrade).
    SslRequest,
    /// Code 80877104: the client asks for GSSAPI encryption.
    GssEncRequest,
    /// Code 80877102: cancel the query running on the backend with this key.
    Cancel { pid: i32, secret: i32 },
    /// Protocol 3.x startup: (name, value) pairs in order; always contains `user`.
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

impl Startup {
    /// The value of startup parameter `name`, if the packet is a startup message holding it.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup { params, .. } => params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Splits one startup packet off the front of `buf` (consumes it); `Ok(None)` if incomplete.
/// Lengths under 8 or over `max` are errors as soon as the length field is there. A major
/// version other than 3 is [`CodecError::UnsupportedProtocol`]. Parameter names and values
/// are NUL-terminated UTF-8 strings, the list ends with an extra NUL as the packet's last byte,
/// and it must contain `user`.
pub fn decode_startup(buf: &mut BytesMut, max: usize) -> Result<Option<Startup>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(CodecError::BadLength {
            tag: 0,
            len: len.into(),
        });
    }
    let len = len as usize;
    if len > max {
        return Err(CodecError::TooLarge { tag: 0, len, max });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut r = Reader::new(&buf[4..len], "startup");
    let code = r.i32()?;
    let startup = match code {
        SSL_CODE | GSSENC_CODE => {
            r.end()?;
            match code {
                SSL_CODE => Startup::SslRequest,
                _ => Startup::GssEncRequest,
            }
        }
        CANCEL_CODE => {
            r.what = "CancelRequest";
            let (pid, secret) = (r.i32()?, r.i32()?);
            r.end()?;
            Startup::Cancel { pid, secret }
        }
        _ => {
            let (major, minor) = ((code as u32 >> 16) as u16, code as u16);
            if major != 3 {
                return Err(CodecError::UnsupportedProtocol { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let name = r.utf8()?;
                if name.is_empty() {
                    break;
                }
                params.push((name.to_owned(), r.utf8()?.to_owned()));
            }
            r.end()?;
            if !params.iter().any(|(n, _)| n == "user") {
                return Err(malformed("startup", "no user name"));
            }
            Startup::Startup { minor, params }
        }
    };
    buf.advance(len);
    Ok(Some(startup))
}

/// One tagged message, raw: `raw` holds the whole message including tag and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub raw: Bytes,
}

impl Frame {
    /// The message type byte (0 if `raw` is empty, which [`split_frame`] never makes).
    pub fn tag(&self) -> u8 {
        self.raw.first().copied().unwrap_or(0)
    }

    /// The message body: everything after the length field.
    pub fn body(&self) -> &[u8] {
        self.raw.get(HEADER_LEN..).unwrap_or_default()
    }
}

/// Splits one tagged message off the front of `buf` (consumes it, without copying);
/// `Ok(None)` if incomplete. A length field under 4 is [`CodecError::BadLength`]; a message
/// (tag included) longer than `max` is [`CodecError::TooLarge`] as soon as its 5-byte header
/// is there, before the body arrives.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, CodecError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(CodecError::BadLength {
            tag,
            len: len.into(),
        });
    }
    let total = 1 + len as usize;
    if total > max {
        return Err(CodecError::TooLarge {
            tag,
            len: total,
            max,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        raw: buf.split_to(total).freeze(),
    }))
}

/// Client (frontend) messages, borrowed from a [`Frame`]'s body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontMsg<'a> {
    /// `Q`: a simple query (without its NUL).
    Query { sql: &'a [u8] },
    /// `P`: prepare `sql` as statement `name` (empty: the unnamed one).
    Parse {
        name: &'a [u8],
        sql: &'a [u8],
        types: Vec<u32>,
    },
    /// `B`: bind a portal; the parameters and formats after the names are not interpreted.
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
    },
    /// `D`: describe a statement (`kind` `b'S'`) or a portal (`b'P'`).
    Describe { kind: u8, name: &'a [u8] },
    /// `E`: run a portal, at most `max_rows` rows (0: all).
    Execute { portal: &'a [u8], max_rows: i32 },
    /// `C`: close a statement (`kind` `b'S'`) or a portal (`b'P'`).
    Close { kind: u8, name: &'a [u8] },
    /// `S`
    Sync,
    /// `H`
    Flush,
    /// `X`
    Terminate,
    /// `d`
    CopyData,
    /// `c`
    CopyDone,
    /// `f`: the client aborts a COPY FROM STDIN.
    CopyFail { message: &'a [u8] },
    /// `p` (password or SASL response), `F` (function call) and anything else: not
    /// interpreted.
    Other { tag: u8 },
}

/// Parses a client message. The messages PostgreSQL checks for trailing bytes must not have
/// any; Terminate, CopyDone and Bind's tail are not looked at, as PostgreSQL does not.
pub fn parse_front(frame: &Frame) -> Result<FrontMsg<'_>, CodecError> {
    let tag = frame.tag();
    let b = frame.body();
    let msg = match tag {
        b'Q' => {
            let mut r = Reader::new(b, "Query");
            let sql = r.cstr()?;
            r.end()?;
            FrontMsg::Query { sql }
        }
        b'P' => {
            let mut r = Reader::new(b, "Parse");
            let (name, sql) = (r.cstr()?, r.cstr()?);
            // PostgreSQL reads the count as unsigned.
            let n = r.u16()? as usize;
            if r.b.len() != 4 * n {
                return Err(malformed("Parse", "parameter type count does not match"));
            }
            let types = r.rest().chunks_exact(4);
            let types = types.map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            FrontMsg::Parse {
                name,
                sql,
                types: types.collect(),
            }
        }
        b'B' => {
            let mut r = Reader::new(b, "Bind");
            FrontMsg::Bind {
                portal: r.cstr()?,
                statement: r.cstr()?,
            }
        }
        b'D' | b'C' => {
            let what = if tag == b'D' { "Describe" } else { "Close" };
            let mut r = Reader::new(b, what);
            let kind = r.u8()?;
            if kind != b'S' && kind != b'P' {
                return Err(malformed(what, "kind is neither 'S' nor 'P'"));
            }
            let name = r.cstr()?;
            r.end()?;
            match tag {
                b'D' => FrontMsg::Describe { kind, name },
                _ => FrontMsg::Close { kind, name },
            }
        }
        b'E' => {
            let mut r = Reader::new(b, "Execute");
            let (portal, max_rows) = (r.cstr()?, r.i32()?);
            r.end()?;
            FrontMsg::Execute { portal, max_rows }
        }
        b'S' | b'H' => {
            Reader::new(b, if tag == b'S' { "Sync" } else { "Flush" }).end()?;
            match tag {
                b'S' => FrontMsg::Sync,
                _ => FrontMsg::Flush,
            }
        }
        b'X' => FrontMsg::Terminate,
        b'd' => FrontMsg::CopyData,
        b'c' => FrontMsg::CopyDone,
        b'f' => {
            let mut r = Reader::new(b, "CopyFail");
            let message = r.cstr()?;
            r.end()?;
            FrontMsg::CopyFail { message }
        }
        tag => FrontMsg::Other { tag },
    };
    Ok(msg)
}

/// Backend messages the front-end interprets, borrowed from a [`Frame`]'s body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackMsg<'a> {
    /// `R`: 0 ok, 3 cleartext password, 5 MD5 (`data` the salt), 10/11/12 SASL, ...
    Authentication { code: i32, data: &'a [u8] },
    /// `S` (UTF-8 required).
    ParameterStatus { name: &'a str, value: &'a str },
    /// `K`
    BackendKeyData { pid: i32, secret: i32 },
    /// `Z`: `status` is `b'I'` (idle), `b'T'` (in a transaction) or `b'E'` (failed one).
    ReadyForQuery { status: u8 },
    /// `C`
    CommandComplete { tag: &'a [u8] },
    /// `E`: (field code, value) pairs; see [`field`].
    ErrorResponse { fields: Vec<(u8, &'a [u8])> },
    /// `N`
    NoticeResponse { fields: Vec<(u8, &'a [u8])> },
    /// `G`
    CopyInResponse,
    /// `H`
    CopyOutResponse,
    /// `W`
    CopyBothResponse,
    /// `1`
    ParseComplete,
    /// `2`
    BindComplete,
    /// `3`
    CloseComplete,
    /// `n`
    NoData,
    /// `I`
    EmptyQueryResponse,
    /// `s`
    PortalSuspended,
    /// `A`
    NotificationResponse,
    /// `T`, `D`, `t`, `d`, `c`, `v` and anything else: not interpreted.
    Other { tag: u8 },
}

/// Parses a backend message. Messages without a body must have an empty one.
pub fn parse_back(frame: &Frame) -> Result<BackMsg<'_>, CodecError> {
    let tag = frame.tag();
    let b = frame.body();
    let empty = |what, msg| Reader::new(b, what).end().map(|()| msg);
    let msg = match tag {
        b'R' => {
            let mut r = Reader::new(b, "Authentication");
            BackMsg::Authentication {
                code: r.i32()?,
                data: r.rest(),
            }
        }
        b'S' => {
            let mut r = Reader::new(b, "ParameterStatus");
            let (name, value) = (r.utf8()?, r.utf8()?);
            r.end()?;
            BackMsg::ParameterStatus { name, value }
        }
        b'K' => {
            let mut r = Reader::new(b, "BackendKeyData");
            let (pid, secret) = (r.i32()?, r.i32()?);
            r.end()?;
            BackMsg::BackendKeyData { pid, secret }
        }
        b'Z' => {
            let mut r = Reader::new(b, "ReadyForQuery");
            let status = r.u8()?;
            r.end()?;
            if !matches!(status, b'I' | b'T' | b'E') {
                return Err(malformed("ReadyForQuery", "unknown transaction status"));
            }
            BackMsg::ReadyForQuery { status }
        }
        b'C' => {
            let mut r = Reader::new(b, "CommandComplete");
            let tag = r.cstr()?;
            r.end()?;
            BackMsg::CommandComplete { tag }
        }
        b'E' => BackMsg::ErrorResponse {
            fields: fields(b, "ErrorResponse")?,
        },
        b'N' => BackMsg::NoticeResponse {
            fields: fields(b, "NoticeResponse")?,
        },
        b'G' => BackMsg::CopyInResponse,
        b'H' => BackMsg::CopyOutResponse,
        b'W' => BackMsg::CopyBothResponse,
        b'1' => empty("ParseComplete", BackMsg::ParseComplete)?,
        b'2' => empty("BindComplete", BackMsg::BindComplete)?,
        b'3' => empty("CloseComplete", BackMsg::CloseComplete)?,
        b'n' => empty("NoData", BackMsg::NoData)?,
        b'I' => empty("EmptyQueryResponse", BackMsg::EmptyQueryResponse)?,
        b's' => empty("PortalSuspended", BackMsg::PortalSuspended)?,
        b'A' => BackMsg::NotificationResponse,
        tag => BackMsg::Other { tag },
    };
    Ok(msg)
}

/// The fields of an ErrorResponse or NoticeResponse: `[code: u8][value\0]...` then a 0 byte.
fn fields<'a>(b: &'a [u8], what: &'static str) -> Result<Vec<(u8, &'a [u8])>, CodecError> {
    let mut r = Reader::new(b, what);
    let mut out = Vec::new();
    loop {
        match r.u8()? {
            0 => break,
            code => out.push((code, r.cstr()?)),
        }
    }
    r.end()?;
    Ok(out)
}

/// The value of field `code` of an ErrorResponse/NoticeResponse field list, if any: `b'C'`
/// the SQLSTATE, `b'S'` the severity, `b'M'` the message.
pub fn field<'a>(fields: &[(u8, &'a [u8])], code: u8) -> Option<&'a [u8]> {
    fields.iter().find(|(c, _)| *c == code).map(|(_, v)| *v)
}

mod encode;
pub use encode::*;

#[cfg(test)]
mod tests;
