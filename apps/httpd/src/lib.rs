//! `mtcp-httpd`: an HTTP/1.1 file server written against the M-TCP state API (the seed's
//! Example 1). GET and HEAD, keep-alive and pipelining, single `Range`s; responses are a pure
//! function of the request and the file (no `Date`, no validators), so a restart regenerates
//! them byte for byte.
//!
//! # Snapshot scheme
//!
//! A snapshot is taken with [`Snapshots::set_state`] and describes the app given exactly the
//! bytes read and written so far. It is a small postcard record, `[version: u16 BE][body]`,
//! at most [`MAX_SNAPSHOT_LEN`] bytes (a few dozen in practice):
//!
//! 1. **Idle** `{ leftover }` — after each complete response on a connection that goes on. No
//!    snapshot is taken before the first request: restarting without one replays the input from
//!    offset 0 as a new connection, which is the same thing.
//! 2. **Body** `{ path, file_len, start, end, partial, connection, sent: 0, leftover }` — after a
//!    GET's head is parsed and the file opened and stat'ed, before anything of the response is
//!    written. The head is written together with the first body chunk, so `sent == 0` means
//!    "head not written yet"; a restart regenerates the head from these fields.
//! 3. **Body** with `sent = k * snapshot_every` — each time that many body bytes have been
//!    written. A restart reopens the file, reads from `start + sent`, and carries on.
//!
//! HEAD responses, error responses and empty bodies are written in one `write_all` and followed
//! by an Idle snapshot (when the connection goes on); a restart from the snapshot before them
//! re-parses the request. After the last response of a closing connection no snapshot is taken:
//! a restart from the previous one regenerates the response and closes again.
//!
//! **Exact consumption.** Bytes read from the connection but not yet consumed (pipelined
//! requests) are app state, so *every* snapshot carries them as `leftover`. Reads are made only
//! while no complete request head is buffered and are at most [`READ_SIZE`] bytes, so the
//! leftover is always shorter than one read; request bodies (discarded) are read no further
//! than their end.
//!
//! **Exact output.** The app never buffers output across a snapshot: every response piece goes
//! out with `write_all` on the connection before the next `set_state`.
//!
//! **Files don't change.** A Body snapshot assumes the file is unchanged when the connection
//! resumes. A restart checks that the file exists with the same length and fails with an
//! `io::Error` otherwise; a file that shrinks while being sent also ends the connection with
//! an error. Never are different bytes sent silently — but a same-length rewrite of the file
//! cannot be noticed here (the runtime's output verification catches it).
//!
//! Errors from `read`, `write` or `set_state` (for instance "this connection migrated") end
//! [`serve`] with that error: the connection is gone from this server.

mod files;
mod http;
mod server;
mod snapshot;

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use http::{MAX_HEAD, MAX_TARGET};
pub use snapshot::{inspect_snapshot, SnapshotInfo, MAX_SNAPSHOT_LEN, SNAPSHOT_VERSION};

/// The pure request parsers, for the fuzz targets in `fuzz/`. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::{
        normalize_path, parse, parse_range, resolve_range, Connection, Method, Parse, RangeSpec,
        Request, Resolved, Status,
    };
}

/// Most bytes read from the connection at once while looking for a request head.
pub const READ_SIZE: usize = 1024;
/// Default body bytes between two Body snapshots.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 256 << 10;
/// Default size of the file chunks read and written.
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;

/// What the app needs from its transport beyond `AsyncRead + AsyncWrite`.
pub trait Snapshots {
    /// Export a restart point: `snapshot` must describe the app's state given exactly the bytes
    /// read from the connection so far and exactly the bytes written so far.
    fn set_state(&self, snapshot: bytes::Bytes) -> io::Result<()>;
}

/// Plain TCP (or any stream) with no migration: `set_state` is a no-op.
#[derive(Debug)]
pub struct Plain<S>(pub S);

impl<S> Snapshots for Plain<S> {
    fn set_state(&self, _snapshot: bytes::Bytes) -> io::Result<()> {
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Plain<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Plain<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory served; request paths resolve under it (`..` is refused, symlinks followed).
    pub root: PathBuf,
    /// Body bytes between two Body snapshots; 0 takes none inside bodies.
    pub snapshot_every: u64,
    /// Size of the file chunks read and written (at least 1).
    pub chunk_size: usize,
    /// Test hook: XOR every body byte with this key. A cluster whose servers pick different
    /// keys is a deliberately non-deterministic application (a restart regenerates different
    /// bytes), which M-TCP must catch rather than hand the client a corrupted stream.
    pub scramble: Option<u8>,
    /// A request head once begun must be complete within this long, or the client gets `408`
    /// and the connection is closed (a client trickling a head cannot hold its connection open;
    /// a quiet keep-alive connection between requests is not timed).
    pub head_timeout: std::time::Duration,
}

/// The default [`Config::head_timeout`].
pub const DEFAULT_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

impl Config {
    /// Serves `root` with the default snapshot interval and chunk size.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            chunk_size: DEFAULT_CHUNK_SIZE,
            scramble: None,
            head_timeout: DEFAULT_HEAD_TIMEOUT,
        }
    }
}

/// Serves one connection with the default [`Config`] for `root`. See [`serve_with`].
pub async fn serve<C>(conn: C, restart: Option<bytes::Bytes>, root: &Path) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Snapshots,
{
    serve_with(conn, restart, &Config::new(root)).await
}

/// Serves one connection until it ends: `restart == None` for a new connection, `Some(snapshot)`
/// to resume a migrated one from a snapshot this crate took (see the crate docs).
///
/// Returns `Ok(())` when the client or the server closed the connection in an orderly way,
/// and the error otherwise (including a snapshot that cannot be resumed).
pub async fn serve_with<C>(
    conn: C,
    restart: Option<bytes::Bytes>,
    config: &Config,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Snapshots,
{
    server::Server::new(conn, config).run(restart).await
}

/// The M-TCP runtime's connection: snapshots go to the runtime, which makes them restart points.
impl Snapshots for mtcp::Connection {
    fn set_state(&self, snapshot: bytes::Bytes) -> io::Result<()> {
        mtcp::Connection::set_state(self, snapshot).map_err(io::Error::from)
    }
}

/// The file server as an application of `mtcp server` (see [`mtcp::App`]).
pub struct Httpd(pub Config);

impl mtcp::App for Httpd {
    fn name(&self) -> &str {
        "httpd"
    }

    fn serve(self: std::sync::Arc<Self>, conn: mtcp::Connection) -> mtcp::app::Serving {
        Box::pin(async move {
            let restart = match conn.start() {
                mtcp::Start::New => None,
                mtcp::Start::Migrated(s) => Some(s.clone()),
            };
            serve_with(conn, restart, &self.0).await
        })
    }
}
