//! Socket options of the connections between M-TCP's own parties (agent–server sessions, MIGRATE
//! connections, spares and watches, peer and admin channels; also pgfront's backend
//! connections, decision 76): no Nagle delay, and a
//! retransmission timeout floor of [`mtcp_proto::timing::RTO_FLOOR`] instead of Linux's 200 ms
//! where the kernel offers it per socket (decision 72).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `TCP_RTO_MIN_US` (`linux/tcp.h`, Linux 6.15; not in the libc crate).
const TCP_RTO_MIN_US: libc::c_int = 45;

/// Sets the options on `s`. Best effort: an older kernel without `TCP_RTO_MIN_US` keeps its
/// 200 ms floor (said once in the log), and the connection works as before.
pub fn internal(s: &tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    if let Err(e) = rto_floor(s, mtcp_proto::timing::RTO_FLOOR) {
        static SAID: AtomicBool = AtomicBool::new(false);
        if !SAID.swap(true, Ordering::Relaxed) {
            tracing::info!("TCP_RTO_MIN_US not set ({e}): lost segments on M-TCP's own connections (and a front-end's to its database) wait for the kernel's 200 ms retransmission floor");
        }
    }
}

/// The floor of `s`'s retransmission timeout.
pub fn rto_floor(s: &impl AsFd, floor: std::time::Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let us = libc::c_int::try_from(floor.as_micros()).unwrap_or(libc::c_int::MAX);
    mtcp_repair::setsockopt_int(s.as_fd().as_raw_fd(), libc::IPPROTO_TCP, TCP_RTO_MIN_US, us)
}

/// The floor set on `s`, as the kernel keeps it (rounded up to its clock's ticks).
#[cfg(test)]
pub fn rto_floor_of(s: &impl AsFd) -> std::io::Result<std::time::Duration> {
    use std::os::fd::AsRawFd;
    let mut us: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to an int and its length.
    let r = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MIN_US,
            (&mut us as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    match r {
        0 => Ok(std::time::Duration::from_micros(us.max(0) as u64)),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_internal_connection_gets_the_floor_where_the_kernel_has_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let before = rto_floor_of(&s);
        internal(&s);
        assert!(s.nodelay().unwrap());
        match (before, rto_floor_of(&s)) {
            // This machine's kernel (6.18): the default floor, then ours, rounded up to a tick.
            (Ok(d), Ok(f)) => {
                assert!(d >= Duration::from_millis(200), "default {d:?}");
                let floor = mtcp_proto::timing::RTO_FLOOR;
                assert!(f >= floor && f < floor + Duration::from_millis(20), "{f:?}");
            }
            // An older kernel: the option is unknown, and the connection is left as it was.
            (Err(_), Err(_)) => {
                eprintln!("!!! TCP_RTO_MIN_US unknown to this kernel: floor NOT checked !!!")
            }
            other => panic!("inconsistent answers: {other:?}"),
        }
    }
}
