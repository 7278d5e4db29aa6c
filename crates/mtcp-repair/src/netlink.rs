//! What the two netlink users of this crate share: a socket opened with a receive timeout
//! (every wait for the kernel is bounded), the `recv` loop around it, and the reading of
//! native-endian fields from its replies. `nfnl` changes nftables sets over
//! `NETLINK_NETFILTER`; `sockdiag` dumps the TCP socket tables over `NETLINK_SOCK_DIAG`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `struct nlmsghdr`.
pub(crate) const NLMSG_HDRLEN: usize = 16;

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// A netlink socket of `kind` (`SOCK_RAW`/`SOCK_DGRAM`) for `protocol`, whose `recv` gives up
/// after `timeout` (`EAGAIN`) instead of blocking forever on a kernel that does not answer.
pub(crate) fn open(
    kind: libc::c_int,
    protocol: libc::c_int,
    timeout: Duration,
) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, kind | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid pointer to a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends one request (an unconnected netlink socket sends to the kernel).
pub(crate) fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is valid for reads of its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One datagram from the kernel into `buf`; its length. Retries on `EINTR`; the socket's
/// receive timeout ends a wait with `WouldBlock`.
pub(crate) fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_within_the_buffer_only() {
        let b = [1u8, 0, 2, 0, 0, 0];
        assert_eq!(u16_at(&b, 0), Some(u16::from_ne_bytes([1, 0])));
        assert_eq!(u32_at(&b, 2), Some(u32::from_ne_bytes([2, 0, 0, 0])));
        assert_eq!(u32_at(&b, 3), None);
        assert_eq!(u16_at(&b, usize::MAX - 1), None);
    }

    #[test]
    fn a_kernel_that_does_not_answer_is_waited_for_no_longer_than_the_timeout() {
        // Nothing was asked: nothing comes, and the recv ends.
        let fd = open(
            libc::SOCK_DGRAM,
            libc::NETLINK_SOCK_DIAG,
            Duration::from_millis(30),
        )
        .unwrap();
        let t = std::time::Instant::now();
        let e = recv(&fd, &mut [0u8; 64]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
