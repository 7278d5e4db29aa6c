//! Reads of a tokio `TcpStream` that clear its read readiness after a short read, as tokio's
//! own `poll_read` does and its `try_read*` do not: otherwise the next read would find the
//! socket drained and cost a wasted `recv` (one per message on a request/response connection).

use bytes::BytesMut;
use std::io;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;

/// One `recv` into the unfilled part of `buf` (its filled part grows by what arrived), without
/// zeroing that part first as `ReadBuf::initialize_unfilled` would: the application's buffer
/// is often kilobytes larger than a request.
///
/// A read shorter than the room it had drained the socket, so it also clears the socket's read
/// readiness, as tokio's own `poll_read` does; otherwise the next read would find nothing and
/// cost a wasted `recv`. The clear happens inside the same `try_io` call, which clears with the
/// readiness tick it saw before the `recv`: data arriving after the `recv` has a newer tick and
/// stays ready, so no wake-up is lost.
pub fn recv_uninit(sock: &TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    let mut short = None;
    let got = sock.try_io(tokio::io::Interest::READABLE, || {
        // SAFETY: nothing de-initializes bytes of `dst`: `recv` only writes into it, at most
        // `dst.len()` bytes, and reads none of them.
        let dst = unsafe { buf.unfilled_mut() };
        let fd = std::os::fd::AsRawFd::as_raw_fd(sock);
        let r = unsafe { libc::recv(fd, dst.as_mut_ptr().cast(), dst.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = r as usize;
        if r > 0 && r < dst.len() {
            short = Some(r);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(r)
    });
    let n = match (got, short) {
        (_, Some(n)) => n,
        (got, None) => got?,
    };
    // SAFETY: `recv` initialized the first `n` bytes of the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}

/// [`recv_uninit`] into the spare capacity of `buf` (its length grows by what arrived; room for
/// at least 1 KiB is made first if it has none). `WouldBlock` when nothing was there.
pub fn try_read_buf(sock: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(1024);
    }
    let mut rb = ReadBuf::uninit(buf.spare_capacity_mut());
    let n = recv_uninit(sock, &mut rb)?;
    // SAFETY: `recv_uninit` initialized the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

#[cfg(test)]
mod tests;
