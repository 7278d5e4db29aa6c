//! HTTP/1.1 response heads, without I/O: the status line and headers of a file or range, and
//! the small complete responses of errors.

use std::fmt::Write as _;

use super::{Connection, Status};

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
