//! Recreating a frozen connection in a new socket ([`restore`](crate::restore())).

use crate::*;
use std::mem::size_of;
use std::net::TcpStream;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `struct tcp_repair_opt`.
#[repr(C)]
struct RepairOpt {
    code: u32,
    val: u32,
}

/// Recreates the connection `st` describes in a new socket (blocking mode). The old socket must
/// be gone ([`Frozen::discard`]); the new one binds the same local address and port even if a
/// listener holds that port (repair mode forces the reuse).
///
/// The output that was queued but never sent ([`TcpState::unsent_bytes`]) is *not* written:
/// it was never on the wire, so it is ordinary output again, and the caller writes it first,
/// at the pace the peer takes it (writing it here could block on a peer that is not reading).
/// Socket options (buffer sizes, `TCP_NODELAY`, keepalive) are not part of the state: the new
/// owner sets them as it sets them on any socket.
pub fn restore(st: &TcpState) -> Result<TcpStream, RepairError> {
    st.check()?;
    let family = if st.local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(sys("socket"));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    repair(raw, true)?;
    // Room for the queues: a queue written in repair mode still waits for buffer space, and a
    // fresh socket starts with small buffers. Nonblocking, so a queue that does not fit is an
    // error instead of a hang.
    fit_buffer(
        raw,
        libc::SO_SNDBUFFORCE,
        st.send_queue.len() - st.unsent as usize,
    )?;
    fit_buffer(raw, libc::SO_RCVBUFFORCE, st.recv_queue.len())?;
    set_nonblocking(raw, true)?;
    let (la, ll) = to_storage(&st.local);
    // SAFETY: `la` is a valid sockaddr of length `ll`.
    if unsafe { libc::bind(raw, (&la as *const libc::sockaddr_storage).cast(), ll) } < 0 {
        return Err(sys("bind"));
    }
    // Each queue starts at the sequence number of its first byte.
    let recv_start = st.recv_seq.wrapping_sub(st.recv_queue.len() as u32);
    set_queue_seq(raw, TCP_RECV_QUEUE, recv_start)?;
    let send_start = st.send_seq.wrapping_sub(st.send_queue.len() as u32);
    set_queue_seq(raw, TCP_SEND_QUEUE, send_start)?;
    let (ra, rl) = to_storage(&st.remote);
    // The old socket leaves the connection table when its last reference goes, which a
    // process forking at that moment can delay for a moment (its copy of every descriptor lives
    // until it execs): until then the address pair is taken. Retry briefly.
    let t0 = std::time::Instant::now();
    loop {
        // SAFETY: `ra` is a valid sockaddr of length `rl`. In repair mode connect sends nothing.
        if unsafe { libc::connect(raw, (&ra as *const libc::sockaddr_storage).cast(), rl) } == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) || t0.elapsed() > CONNECT_RETRY {
            return Err(RepairError::Sys {
                what: "connect (repair)",
                source: e,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut opts = Vec::with_capacity(4);
    if st.options & TCPI_OPT_SACK != 0 {
        opts.push(RepairOpt {
            code: TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if st.options & TCPI_OPT_WSCALE != 0 {
        opts.push(RepairOpt {
            code: TCPOPT_WINDOW,
            val: st.snd_wscale as u32 | (st.rcv_wscale as u32) << 16,
        });
    }
    if st.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push(RepairOpt {
            code: TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    opts.push(RepairOpt {
        code: TCPOPT_MAXSEG,
        val: st.mss,
    });
    // SAFETY: `opts` is a contiguous array of `struct tcp_repair_opt`.
    let r = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_TCP,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            (opts.len() * size_of::<RepairOpt>()) as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(sys("TCP_REPAIR_OPTIONS"));
    }
    if st.options & TCPI_OPT_TIMESTAMPS != 0 {
        set_int(
            raw,
            libc::SOL_TCP,
            libc::TCP_TIMESTAMP,
            st.timestamp as libc::c_int,
            "TCP_TIMESTAMP",
        )?;
    }
    write_queue(raw, TCP_RECV_QUEUE, &st.recv_queue)?;
    let sent = st.send_queue.len() - st.unsent as usize;
    write_queue(raw, TCP_SEND_QUEUE, &st.send_queue[..sent])?;
    let w = [
        st.window.snd_wl1,
        st.window.snd_wnd,
        st.window.max_window,
        st.window.rcv_wnd,
        st.window.rcv_wup,
    ];
    // SAFETY: `w` has the layout of `struct tcp_repair_window`.
    let r = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_TCP,
            libc::TCP_REPAIR_WINDOW,
            w.as_ptr().cast(),
            size_of::<[u32; 5]>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(sys("TCP_REPAIR_WINDOW"));
    }
    // Leaving repair mode sends a window probe: the peer answers with an ACK at once, so the
    // flow (and any retransmission of the restored, unacknowledged output) restarts without
    // waiting for a timer.
    repair(raw, false)?;
    set_nonblocking(raw, false)?;
    Ok(TcpStream::from(fd))
}

/// Makes a socket buffer hold at least `len` bytes of queue (the kernel doubles the value for
/// its bookkeeping). An empty queue needs nothing, and buffers that are already large enough
/// are left alone, so they keep autotuning. A buffer set by hand stops autotuning for good, so
/// it is set to at least the size autotuning could reach (`tcp_wmem`/`tcp_rmem`'s maximum):
/// a small locked buffer would cap the connection's throughput ever after.
fn fit_buffer(fd: RawFd, opt: libc::c_int, len: usize) -> Result<(), RepairError> {
    if len == 0 {
        return Ok(());
    }
    let (plain, sysctl) = if opt == libc::SO_SNDBUFFORCE {
        (libc::SO_SNDBUF, "/proc/sys/net/ipv4/tcp_wmem")
    } else {
        (libc::SO_RCVBUF, "/proc/sys/net/ipv4/tcp_rmem")
    };
    let (cur, _) = get::<libc::c_int>(fd, libc::SOL_SOCKET, plain, "SO_SNDBUF/SO_RCVBUF")?;
    let want = len + (64 << 10);
    if (cur.max(0) as usize) / 2 >= want {
        return Ok(());
    }
    let autotune_max = std::fs::read_to_string(sysctl)
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    let v = want.max(autotune_max / 2).min(i32::MAX as usize) as libc::c_int;
    set_int(
        fd,
        libc::SOL_SOCKET,
        opt,
        v,
        "SO_SNDBUFFORCE/SO_RCVBUFFORCE",
    )
}

fn set_nonblocking(fd: RawFd, on: bool) -> Result<(), RepairError> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(sys("fcntl"));
    }
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(sys("fcntl"));
    }
    Ok(())
}

/// Writes `bytes` into a queue in repair mode (they count as received, or as sent and not yet
/// acknowledged). Large writes are split when the kernel refuses them whole.
fn write_queue(fd: RawFd, queue: libc::c_int, mut bytes: &[u8]) -> Result<(), RepairError> {
    if bytes.is_empty() {
        return Ok(());
    }
    select_queue(fd, queue)?;
    let mut chunk = bytes.len();
    while !bytes.is_empty() {
        let n = chunk.min(bytes.len());
        // SAFETY: `bytes[..n]` is valid for reads.
        let r = unsafe { libc::send(fd, bytes.as_ptr().cast(), n, 0) };
        if r <= 0 {
            // The receive queue is rebuilt from linear buffers of the size given: too large a
            // one fails with ENOMEM. Try smaller pieces.
            if chunk > 1024 {
                chunk /= 2;
                continue;
            }
            return Err(sys("restoring a queue"));
        }
        bytes = &bytes[r as usize..];
    }
    Ok(())
}
