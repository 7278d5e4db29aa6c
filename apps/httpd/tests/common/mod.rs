//! Shared test helpers: a served root with known files, an HTTP response parser, and an
//! in-memory connection that records snapshots with the byte counts they were taken at.

#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use mtcp_httpd::Snapshots;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Length of `data.bin`: a few MiB and not a multiple of any chunk size.
pub const DATA_LEN: usize = 4 * 1024 * 1024 + 321;
pub const SMALL: &[u8] = b"hello, migratory world\n";
pub const JSON: &[u8] = b"{\"ok\":true}\n";

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// xorshift64*: small, seeded, good enough for test data and split points.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `1..=max`.
    pub fn size(&mut self, max: usize) -> usize {
        1 + (self.next() % max as u64) as usize
    }
}

/// A temporary root: `small.txt`, `data.bin` (`DATA_LEN` bytes), `empty.bin`,
/// `sub/file.json`, `sub/a b.txt`, and the directory `sub`.
pub fn make_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    std::fs::write(root.join("small.txt"), SMALL).unwrap();
    std::fs::write(root.join("data.bin"), pattern(DATA_LEN, 7)).unwrap();
    std::fs::write(root.join("empty.bin"), b"").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/file.json"), JSON).unwrap();
    std::fs::write(root.join("sub/a b.txt"), SMALL).unwrap();
    dir
}

pub fn read(root: &Path, name: &str) -> Vec<u8> {
    std::fs::read(root.join(name)).unwrap()
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn content_length(&self) -> usize {
        self.header("content-length")
            .expect("content-length")
            .parse()
            .expect("a number")
    }
}

/// Parses one response at the start of `buf`; `None` when incomplete. Returns it with its size.
pub fn parse_response(buf: &[u8], head_only: bool) -> Option<(Response, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf).expect("a well-formed response head") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let headers: Vec<(String, String)> = res
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8(h.value.to_vec()).unwrap(),
            )
        })
        .collect();
    let mut response = Response {
        status: res.code.unwrap(),
        headers,
        body: Vec::new(),
    };
    let body_len = if head_only {
        0
    } else {
        response.content_length()
    };
    if buf.len() < head_len + body_len {
        return None;
    }
    response.body = buf[head_len..head_len + body_len].to_vec();
    Some((response, head_len + body_len))
}

/// Parses a whole conversation's output; `head_only[i]` says whether response `i` answers HEAD.
pub fn parse_all(mut buf: &[u8], head_only: &[bool]) -> Vec<Response> {
    let mut out = Vec::new();
    for &h in head_only {
        let (r, n) = parse_response(buf, h).expect("a complete response");
        out.push(r);
        buf = &buf[n..];
    }
    assert!(
        buf.is_empty(),
        "{} unexpected bytes after the responses",
        buf.len()
    );
    out
}

/// Reads one response from `stream`, keeping extra bytes in `buf` for the next one.
pub async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> Response {
    loop {
        if let Some((r, n)) = parse_response(buf, head_only) {
            buf.drain(..n);
            return r;
        }
        let mut chunk = vec![0u8; 256 * 1024];
        let n = stream.read(&mut chunk).await.expect("read a response");
        assert!(
            n > 0,
            "connection closed inside a response ({} bytes buffered)",
            buf.len()
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Asserts that the server closed the connection with nothing more to say.
pub async fn expect_eof<S: AsyncRead + Unpin>(stream: &mut S, buf: &[u8]) {
    assert!(
        buf.is_empty(),
        "unexpected bytes before EOF: {:?}",
        String::from_utf8_lossy(buf)
    );
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.expect("read to EOF");
    assert!(
        rest.is_empty(),
        "unexpected bytes before EOF: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// Compares two byte strings, reporting the first difference instead of dumping megabytes.
#[track_caller]
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: outputs differ at byte {at} (got {} bytes, want {}); got {:?}, want {:?}",
        got.len(),
        want.len(),
        String::from_utf8_lossy(&got[at..got.len().min(at + 80)]),
        String::from_utf8_lossy(&want[at..want.len().min(at + 80)]),
    );
}

/// One `set_state` call and the byte counts it was taken at.
#[derive(Debug, Clone)]
pub struct Snap {
    pub snapshot: Bytes,
    pub read: usize,
    pub written: usize,
}

/// What a [`MemConn`] saw.
#[derive(Debug, Default)]
pub struct Log {
    pub output: Vec<u8>,
    pub snaps: Vec<Snap>,
    pub read: usize,
    pub shutdown: bool,
}

type Hook = Box<dyn Fn(&Snap) -> io::Result<()> + Send + Sync>;

/// In-memory connection: reads come from a fixed input in seeded random sizes (then EOF),
/// writes are accepted in random partial amounts and logged, snapshots are recorded.
pub struct MemConn {
    input: Vec<u8>,
    pos: usize,
    rng: Rng,
    max_read: usize,
    log: Arc<Mutex<Log>>,
    hook: Option<Hook>,
}

impl MemConn {
    pub fn new(input: Vec<u8>, seed: u64, max_read: usize) -> (Self, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let conn = Self {
            input,
            pos: 0,
            rng: Rng::new(seed),
            max_read,
            log: log.clone(),
            hook: None,
        };
        (conn, log)
    }

    /// Runs `hook` on each snapshot after recording it; its error is `set_state`'s.
    pub fn with_hook(
        mut self,
        hook: impl Fn(&Snap) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }
}

impl Snapshots for MemConn {
    fn set_state(&self, snapshot: Bytes) -> io::Result<()> {
        let snap = {
            let mut log = self.log.lock().unwrap();
            let snap = Snap {
                snapshot,
                read: log.read,
                written: log.output.len(),
            };
            log.snaps.push(snap.clone());
            snap
        };
        match &self.hook {
            Some(hook) => hook(&snap),
            None => Ok(()),
        }
    }
}

impl AsyncRead for MemConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let avail = this.input.len() - this.pos;
        let n = avail.min(buf.remaining()).min(this.rng.size(this.max_read));
        buf.put_slice(&this.input[this.pos..this.pos + n]);
        this.pos += n;
        this.log.lock().unwrap().read += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MemConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(self.rng.size(128 * 1024));
        let mut log = self.log.lock().unwrap();
        assert!(!log.shutdown, "write after shutdown");
        log.output.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.log.lock().unwrap().shutdown = true;
        Poll::Ready(Ok(()))
    }
}
