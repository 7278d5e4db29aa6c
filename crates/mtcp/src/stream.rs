//! A channel's byte stream: plain TCP, or TLS over TCP when the cluster has a `[tls]` section
//! (decision 45). The read and write halves are enums rather than boxed trait objects, so a
//! plain session's reads and writes are the same calls on `OwnedReadHalf`/`OwnedWriteHalf`
//! as before, behind one match. Both kinds expose the TCP socket (`AsRawFd`) for the socket
//! options and queue sizes some callers read.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

type Tls = tokio_rustls::TlsStream<TcpStream>;

/// A connected channel, before it is split.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<Tls>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl Stream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(t) => t.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Splits into halves that can be used from different tasks. A TLS stream's halves share it
    /// under a lock (`tokio::io::split`); a plain stream's are the socket's own halves.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Tls(t) => {
                let fd = t.get_ref().0.as_raw_fd();
                let (r, w) = tokio::io::split(*t);
                (ReadHalf::Tls { r, fd }, WriteHalf::Tls { w, fd })
            }
        }
    }
}

/// The reading half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    /// `fd` is the socket's descriptor, open as long as either half lives.
    Tls {
        r: tokio::io::ReadHalf<Tls>,
        fd: RawFd,
    },
}

/// The writing half of a [`Stream`]. Writes to a TLS half may leave encrypted bytes buffered
/// until a flush: the framed writers (`crate::framed`) flush after each batch.
#[derive(Debug)]
pub enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Tls {
        w: tokio::io::WriteHalf<Tls>,
        fd: RawFd,
    },
}

impl AsRawFd for ReadHalf {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            ReadHalf::Tcp(r) => r.as_ref().as_raw_fd(),
            ReadHalf::Tls { fd, .. } => *fd,
        }
    }
}

impl AsRawFd for WriteHalf {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            WriteHalf::Tcp(w) => w.as_ref().as_raw_fd(),
            WriteHalf::Tls { fd, .. } => *fd,
        }
    }
}

/// A TLS peer that closes its TCP connection without a `close_notify` alert reads as the end of
/// the stream, as a plain connection's FIN does: M-TCP ends its channels with messages of its
/// own (CLOSED, CLOSE, MACed peer frames), so TLS's truncation alarm adds nothing and would turn
/// every dropped channel into an error in the logs.
fn eof_without_notify(r: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
    match r {
        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
        r => r,
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => eof_without_notify(Pin::new(t.as_mut()).poll_read(cx, buf)),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, b),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, b),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ReadHalf {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls { r, .. } => eof_without_notify(Pin::new(r).poll_read(cx, buf)),
        }
    }
}

impl AsyncWrite for WriteHalf {
    #[inline]
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write(cx, b),
            WriteHalf::Tls { w, .. } => Pin::new(w).poll_write(cx, b),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write_vectored(cx, b),
            WriteHalf::Tls { w, .. } => Pin::new(w).poll_write_vectored(cx, b),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Tcp(w) => w.is_write_vectored(),
            WriteHalf::Tls { w, .. } => w.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tls { w, .. } => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tls { w, .. } => Pin::new(w).poll_shutdown(cx),
        }
    }
}
