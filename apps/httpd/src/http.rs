//! HTTP/1.1 request parsing and response heads, without I/O.
//!
//! Everything here is a pure function of its input bytes (and, for planning, of a file length),
//! which is what makes a restarted server regenerate byte-identical responses.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

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

/// `Content-Type` from the file name's extension.
pub fn content_type(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = match name.rfind('.') {
        Some(i) if i > 0 => &name[i + 1..],
        _ => return "application/octet-stream",
    };
    const TYPES: &[(&str, &str)] = &[
        ("html", "text/html; charset=utf-8"),
        ("htm", "text/html; charset=utf-8"),
        ("txt", "text/plain; charset=utf-8"),
        ("css", "text/css"),
        ("js", "text/javascript"),
        ("json", "application/json"),
        ("png", "image/png"),
        ("jpg", "image/jpeg"),
        ("jpeg", "image/jpeg"),
        ("gif", "image/gif"),
        ("svg", "image/svg+xml"),
        ("pdf", "application/pdf"),
        ("mp4", "video/mp4"),
    ];
    TYPES
        .iter()
        .find(|(e, _)| e.eq_ignore_ascii_case(ext))
        .map_or("application/octet-stream", |&(_, t)| t)
}

/// `Content-Range` of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes start-(end-1)/total` (206), `end` exclusive.
    Bytes { start: u64, end: u64, total: u64 },
    /// `bytes */total` (416).
    Unsatisfied { total: u64 },
}

/// A response head; [`Head::render`] is its only serialization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: Status,
    pub content_type: &'static str,
    pub content_length: u64,
    pub content_range: Option<ContentRange>,
    pub connection: Connection,
}

impl Head {
    /// Appends the head to `out`. Deterministic: no date, no validators, fixed header order.
    pub fn render(&self, out: &mut Vec<u8>) {
        let mut s = String::with_capacity(192);
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "HTTP/1.1 {} {}\r\nServer: mtcp-httpd\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Accept-Ranges: bytes\r\n",
            self.status.code(),
            self.status.reason(),
            self.content_type,
            self.content_length,
        );
        match self.content_range {
            Some(ContentRange::Bytes { start, end, total }) => {
                let _ = write!(s, "Content-Range: bytes {start}-{}/{total}\r\n", end - 1);
            }
            Some(ContentRange::Unsatisfied { total }) => {
                let _ = write!(s, "Content-Range: bytes */{total}\r\n");
            }
            None => {}
        }
        if self.status == Status::MethodNotAllowed {
            s.push_str("Allow: GET, HEAD\r\n");
        }
        match self.connection {
            Connection::Persistent => {}
            Connection::KeepAlive => s.push_str("Connection: keep-alive\r\n"),
            Connection::Close => s.push_str("Connection: close\r\n"),
        }
        s.push_str("\r\n");
        out.extend_from_slice(s.as_bytes());
    }
}

/// A complete error (or other body-less-file) response: head plus a short text body, or the
/// head alone for HEAD.
pub fn simple_response(
    status: Status,
    content_range: Option<ContentRange>,
    connection: Connection,
    head_only: bool,
) -> Vec<u8> {
    let body = format!("{} {}\n", status.code(), status.reason());
    let head = Head {
        status,
        content_type: "text/plain; charset=utf-8",
        content_length: body.len() as u64,
        content_range,
        connection,
    };
    let mut out = Vec::with_capacity(256);
    head.render(&mut out);
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(buf: &[u8]) -> (usize, Request) {
        match parse(buf) {
            Parse::Complete { head_len, request } => (head_len, request),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_simple_get() {
        let buf = b"GET /a/b.txt HTTP/1.1\r\nHost: x\r\n\r\nGET";
        let (n, r) = complete(buf);
        assert_eq!(n, buf.len() - 3);
        assert_eq!(r.method, Some(Method::Get));
        assert_eq!(r.path, Ok("a/b.txt".to_string()));
        assert_eq!(r.connection, Connection::Persistent);
        assert_eq!(r.range, None);
        assert_eq!(r.body_len, 0);
    }

    #[test]
    fn connection_semantics() {
        let c = |s: &str| complete(s.as_bytes()).1.connection;
        assert_eq!(
            c("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"),
            Connection::Close
        );
        assert_eq!(
            c("GET / HTTP/1.1\r\nConnection: te, close\r\n\r\n"),
            Connection::Close
        );
        assert_eq!(c("GET / HTTP/1.0\r\n\r\n"), Connection::Close);
        assert_eq!(
            c("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            Connection::KeepAlive
        );
        assert_eq!(
            c("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"),
            Connection::Persistent
        );
    }

    #[test]
    fn partial_and_fatal() {
        assert_eq!(parse(b""), Parse::Partial);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parse::Partial);
        assert_eq!(
            parse(b"\x01\x02 garbage\r\n\r\n"),
            Parse::Fatal(Status::BadRequest)
        );
        assert_eq!(
            parse(b"GET / HTTP/2.0\r\n\r\n"),
            Parse::Fatal(Status::BadRequest)
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse(&big), Parse::Fatal(Status::HeaderFieldsTooLarge));
        let many: String = (0..100).map(|i| format!("H{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse(req.as_bytes()),
            Parse::Fatal(Status::HeaderFieldsTooLarge)
        );
        let te = b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(te), Parse::Fatal(Status::NotImplemented));
        let cl = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse(cl), Parse::Fatal(Status::BadRequest));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Parse::Fatal(Status::BadRequest)
        );
    }

    #[test]
    fn body_length_and_methods() {
        let (_, r) = complete(b"POST /x HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(r.method, None);
        assert_eq!(r.body_len, 12);
        assert_eq!(
            complete(b"HEAD /x HTTP/1.1\r\n\r\n").1.method,
            Some(Method::Head)
        );
    }

    #[test]
    fn targets() {
        let p = |t: &str| target_path(t);
        assert_eq!(p("/"), Ok(String::new()));
        assert_eq!(p("/a//./b?q=1#f"), Ok("a/b".into()));
        assert_eq!(p("/a%20b/%41"), Ok("a b/A".into()));
        assert_eq!(p("http://host:80/x/y"), Ok("x/y".into()));
        assert_eq!(p("/../etc/passwd"), Err(Status::BadRequest));
        assert_eq!(p("/a/%2e%2e/%2E%2E/x"), Err(Status::BadRequest));
        assert_eq!(p("/a/..%2fb"), Err(Status::BadRequest));
        assert_eq!(p("/a%00"), Err(Status::BadRequest));
        assert_eq!(p("/a%zz"), Err(Status::BadRequest));
        assert_eq!(p("/a%ff"), Err(Status::BadRequest));
        assert_eq!(p("*"), Err(Status::BadRequest));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET));
        assert_eq!(complete(long.as_bytes()).1.path, Err(Status::UriTooLong));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(b"bytes=0-9"), Some(RangeSpec::FromTo(0, 9)));
        assert_eq!(parse_range(b" Bytes = 5- "), Some(RangeSpec::From(5)));
        assert_eq!(parse_range(b"bytes=-7"), Some(RangeSpec::Suffix(7)));
        assert_eq!(parse_range(b"bytes=9-0"), None);
        assert_eq!(parse_range(b"bytes=0-1,3-4"), None);
        assert_eq!(parse_range(b"items=0-1"), None);
        assert_eq!(parse_range(b"bytes=-"), None);
        assert_eq!(parse_range(b"bytes=99999999999999999999999-"), None);
        assert_eq!(resolve_range(None, 10), Resolved::Full);
        let r = |s, len| resolve_range(parse_range(s), len);
        assert_eq!(r(b"bytes=2-4", 10), Resolved::Partial { start: 2, end: 5 });
        assert_eq!(
            r(b"bytes=2-400", 10),
            Resolved::Partial { start: 2, end: 10 }
        );
        assert_eq!(r(b"bytes=9-", 10), Resolved::Partial { start: 9, end: 10 });
        assert_eq!(r(b"bytes=10-", 10), Resolved::Unsatisfiable);
        assert_eq!(r(b"bytes=-3", 10), Resolved::Partial { start: 7, end: 10 });
        assert_eq!(r(b"bytes=-30", 10), Resolved::Partial { start: 0, end: 10 });
        assert_eq!(r(b"bytes=-0", 10), Resolved::Unsatisfiable);
        assert_eq!(r(b"bytes=0-", 0), Resolved::Unsatisfiable);
        assert_eq!(
            r(b"bytes=0-18446744073709551615", 10),
            Resolved::Partial { start: 0, end: 10 }
        );
    }

    #[test]
    fn head_rendering_is_fixed() {
        let head = Head {
            status: Status::PartialContent,
            content_type: content_type("x/y.BIN"),
            content_length: 3,
            content_range: Some(ContentRange::Bytes {
                start: 2,
                end: 5,
                total: 10,
            }),
            connection: Connection::Close,
        };
        let mut out = Vec::new();
        head.render(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 206 Partial Content\r\nServer: mtcp-httpd\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: 3\r\n\
             Accept-Ranges: bytes\r\nContent-Range: bytes 2-4/10\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(content_type("index.HTML"), "text/html; charset=utf-8");
        assert_eq!(content_type(".hidden"), "application/octet-stream");
    }

    proptest! {
        /// A resolved partial range always lies inside the file and is non-empty, and matches a
        /// direct reading of RFC 9110.
        #[test]
        fn resolved_ranges_are_inside_the_file(a in 0u64..200, b in 0u64..200, len in 0u64..150) {
            for spec in [RangeSpec::FromTo(a.min(b), a.max(b)), RangeSpec::From(a), RangeSpec::Suffix(a)] {
                match resolve_range(Some(spec), len) {
                    Resolved::Partial { start, end } => {
                        prop_assert!(start < end && end <= len);
                        let expect = match spec {
                            RangeSpec::FromTo(x, y) => (x, (y + 1).min(len)),
                            RangeSpec::From(x) => (x, len),
                            RangeSpec::Suffix(n) => (len - n.min(len), len),
                        };
                        prop_assert_eq!((start, end), expect);
                    }
                    Resolved::Unsatisfiable => {
                        let unsat = match spec {
                            RangeSpec::FromTo(x, _) | RangeSpec::From(x) => x >= len,
                            RangeSpec::Suffix(n) => n == 0 || len == 0,
                        };
                        prop_assert!(unsat);
                    }
                    Resolved::Full => prop_assert!(false, "a range never resolves to Full"),
                }
            }
        }

        /// The parse outcome for any prefix-closed split is the same as for the whole input:
        /// a prefix either is Partial or gives the same answer as the full buffer.
        #[test]
        fn prefixes_never_contradict_the_whole(extra in proptest::collection::vec(any::<u8>(), 0..64), cut in 0usize..200) {
            let mut buf = b"GET /f HTTP/1.1\r\nRange: bytes=1-2\r\n".to_vec();
            buf.extend_from_slice(&extra);
            buf.extend_from_slice(b"\r\n\r\n");
            let whole = parse(&buf);
            let cut = cut.min(buf.len());
            match parse(&buf[..cut]) {
                Parse::Partial => {}
                other => prop_assert_eq!(other, whole),
            }
        }

        #[test]
        fn normalized_paths_never_escape(s in "[a-z./%]{0,40}") {
            if let Some(p) = normalize_path(&s) {
                prop_assert!(!p.starts_with('/'));
                prop_assert!(p.is_empty() || p.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
                prop_assert_eq!(normalize_path(&p), Some(p.clone()));
            }
        }
    }
}
