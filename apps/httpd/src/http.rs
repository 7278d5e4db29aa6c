//! HTTP/1.1 request parsing and response heads, without I/O.
//!
//! Everything here is a pure function of its input bytes (and, for planning, of a file length),
//! which is what makes a restarted server regenerate byte-identical responses.

use serde::{Deserialize, Serialize};

mod response;

pub use response::{content_type, simple_response, ContentRange, Head};

/// Largest request head (request line + headers + blank line) accepted; larger gets 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest request target accepted; longer gets 414. Bounds the path stored in a snapshot.
pub const MAX_TARGET: usize = 2048;
/// Most header fields in one request; more gets 431.
const MAX_HEADERS: usize = 64;

/// Response status codes this server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Ok,
    PartialContent,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    UriTooLong,
    RangeNotSatisfiable,
    HeaderFieldsTooLarge,
    InternalError,
    NotImplemented,
    RequestTimeout,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::PartialContent => 206,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::UriTooLong => 414,
            Status::RangeNotSatisfiable => 416,
            Status::HeaderFieldsTooLarge => 431,
            Status::InternalError => 500,
            Status::NotImplemented => 501,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::PartialContent => "Partial Content",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::UriTooLong => "URI Too Long",
            Status::RangeNotSatisfiable => "Range Not Satisfiable",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::InternalError => "Internal Server Error",
            Status::NotImplemented => "Not Implemented",
        }
    }
}

/// The methods served; any other gets 405.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

/// What the `Connection` header of a response says; also tells whether the connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connection {
    /// HTTP/1.1 persistent connection: no header needed.
    Persistent,
    /// HTTP/1.0 client that asked for keep-alive: `Connection: keep-alive`.
    KeepAlive,
    /// `Connection: close`, and the server closes after the response.
    Close,
}

impl Connection {
    pub fn keep_alive(self) -> bool {
        self != Connection::Close
    }
}

/// One `Range: bytes=...` range as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b`, inclusive, `a <= b`.
    FromTo(u64, u64),
    /// `bytes=a-`.
    From(u64),
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

/// A range resolved against a file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// No (usable) range: the whole file, 200.
    Full,
    /// Bytes `[start, end)`, 206; never empty.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// A parsed request whose framing is known (the connection can go on after the response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `None` for a method other than GET and HEAD (405).
    pub method: Option<Method>,
    /// The file path relative to the root, normalized (see [`normalize_path`]), or the status to
    /// answer when the target is unusable.
    pub path: Result<String, Status>,
    pub range: Option<RangeSpec>,
    pub connection: Connection,
    /// `Content-Length` of a request body, which the server reads and discards.
    pub body_len: u64,
}

/// Result of looking at the start of the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// No complete head yet; read more.
    Partial,
    /// A request whose head is the first `head_len` bytes of the buffer.
    Complete { head_len: usize, request: Request },
    /// The input cannot be framed: answer with this status and close.
    Fatal(Status),
}

/// Parses the request head at the start of `buf`.
///
/// Only the first [`MAX_HEAD`] bytes are looked at, so the outcome depends on the input stream
/// alone and never on how it was split into reads.
pub fn parse(buf: &[u8]) -> Parse {
    let view = &buf[..buf.len().min(MAX_HEAD)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(view) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if view.len() >= MAX_HEAD => {
            return Parse::Fatal(Status::HeaderFieldsTooLarge)
        }
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parse::Fatal(Status::HeaderFieldsTooLarge),
        Err(_) => return Parse::Fatal(Status::BadRequest),
    };
    // httparse guarantees these on a complete parse.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parse::Fatal(Status::BadRequest);
    };

    let mut close = false;
    let mut keep_alive = false;
    let mut range_values = 0usize;
    let mut range = None;
    let mut content_length: Option<u64> = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("range") {
            range_values += 1;
            range = parse_range(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = parse_decimal(h.value.trim_ascii()) else {
                return Parse::Fatal(Status::BadRequest);
            };
            if content_length.is_some_and(|m| m != n) {
                return Parse::Fatal(Status::BadRequest);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked request bodies are not supported; without them the framing is unknown.
            return Parse::Fatal(Status::NotImplemented);
        }
    }
    if range_values > 1 {
        range = None;
    }

    let connection = match (version, close, keep_alive) {
        (_, true, _) => Connection::Close,
        (0, false, true) => Connection::KeepAlive,
        (0, false, false) => Connection::Close,
        _ => Connection::Persistent,
    };
    let method = match method {
        "GET" => Some(Method::Get),
        "HEAD" => Some(Method::Head),
        _ => None,
    };
    let path = if target.len() > MAX_TARGET {
        Err(Status::UriTooLong)
    } else {
        target_path(target)
    };
    Parse::Complete {
        head_len,
        request: Request {
            method,
            path,
            range,
            connection,
            body_len: content_length.unwrap_or(0),
        },
    }
}

/// Parses an unsigned decimal number (digits only, no sign, no overflow).
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Parses a `Range` header value. Returns `None` for anything but one syntactically valid byte
/// range, in which case the header is ignored (RFC 9110 §14.2 allows ignoring it).
pub fn parse_range(value: &[u8]) -> Option<RangeSpec> {
    let value = value.trim_ascii();
    let eq = value.iter().position(|&b| b == b'=')?;
    let (unit, set) = (value[..eq].trim_ascii(), value[eq + 1..].trim_ascii());
    if !unit.eq_ignore_ascii_case(b"bytes") || set.contains(&b',') {
        return None;
    }
    let dash = set.iter().position(|&b| b == b'-')?;
    let (first, last) = (set[..dash].trim_ascii(), set[dash + 1..].trim_ascii());
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => Some(RangeSpec::Suffix(parse_decimal(last)?)),
        (false, true) => Some(RangeSpec::From(parse_decimal(first)?)),
        (false, false) => {
            let (a, b) = (parse_decimal(first)?, parse_decimal(last)?);
            (a <= b).then_some(RangeSpec::FromTo(a, b))
        }
    }
}

/// Resolves a range against a file of `len` bytes (RFC 9110 §14.1.2). Any range of an empty
/// file is unsatisfiable.
pub fn resolve_range(range: Option<RangeSpec>, len: u64) -> Resolved {
    let Some(range) = range else {
        return Resolved::Full;
    };
    let (start, end) = match range {
        RangeSpec::FromTo(a, b) => (a, b.saturating_add(1).min(len)),
        RangeSpec::From(a) => (a, len),
        RangeSpec::Suffix(n) => (len.saturating_sub(n), len),
    };
    if start < end {
        Resolved::Partial { start, end }
    } else {
        Resolved::Unsatisfiable
    }
}

/// Turns a request target into a path relative to the root: strips an absolute-form prefix,
/// the query and the fragment, percent-decodes, and normalizes.
fn target_path(target: &str) -> Result<String, Status> {
    let mut t = target;
    if let Some(rest) = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
    {
        t = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    if !t.starts_with('/') {
        return Err(Status::BadRequest);
    }
    let end = t.find(['?', '#']).unwrap_or(t.len());
    let decoded = percent_decode(&t[..end]).ok_or(Status::BadRequest)?;
    let decoded = String::from_utf8(decoded).map_err(|_| Status::BadRequest)?;
    normalize_path(&decoded).ok_or(Status::BadRequest)
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Normalizes a decoded path: empty and `.` segments dropped, segments joined with `/`, no
/// leading slash. Returns `None` for a `..` segment (no escape from the root, whatever follows)
/// or a NUL byte. The empty string is the root itself.
pub fn normalize_path(path: &str) -> Option<String> {
    if path.contains('\0') {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => return None,
            seg => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(seg);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
