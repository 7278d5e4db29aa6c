//! Moving an established TCP connection from one socket to another with Linux `TCP_REPAIR`.
//!
//! This is the first piece of M-TCP's kernel fast path (DESIGN §6): instead of relaying the
//! client's bytes through the agent, the connection itself moves. [`freeze()`] puts a socket in
//! repair mode (nothing the application does reaches the peer any more — but the kernel may still
//! transmit output already queued, unless the flow is fenced both ways: see `fence`) and reads out
//! everything the kernel knows about the connection: sequence numbers, the unacknowledged and
//! unsent output, input the application has not read, window, options and timestamp clock.
//! [`Frozen::discard`] then closes the old socket silently, and [`restore()`] — in this process or
//! any other on the same host — recreates the connection from that [`TcpState`]: the peer keeps
//! talking to the same address and port and never learns that the socket changed.
//!
//! The procedure is CRIU's (`soccr`): sequence numbers are set before `connect`, the
//! acknowledged-but-sent part of the output queue is written in repair mode, the unsent part
//! after repair mode is left briefly, and the window last. Only established connections are
//! handled (no FIN in either queue); others are refused with [`RepairError::State`].
//!
//! Needs `CAP_NET_ADMIN` ([`RepairError::NotPermitted`] otherwise). The peer must not send to the
//! connection while no socket holds it (between the [`Frozen`] socket being discarded and
//! [`restore()`] returning), or it gets a reset: the fast path fences the flow with an element of
//! an nftables set first ([`Fences`]).
//!
//! Modules: `state` (the [`TcpState`] and its encoding), `freeze`, `restore`, `fence` and `nfnl`
//! (the fences over netlink); the system-call helpers they share are here.

mod fence;
mod freeze;
mod netlink;
pub mod nfnl;
mod restore;
pub mod sockdiag;
mod state;
pub use fence::{lift, Fence, Fences, LazyFences, TABLE_PREFIX};
pub use freeze::{freeze, try_freeze, try_freeze_encoded, window_probe, Frozen, FrozenEncoded};
pub use restore::restore;
pub use state::{TcpState, Window, STATE_VERSION};

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// `TCP_REPAIR_QUEUE` values (linux/tcp.h).
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `TCP_REPAIR` values: off with a window probe to the peer (so it answers at once), and on.
const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_REPAIR_ON: libc::c_int = 1;
/// TCP option kinds for `TCP_REPAIR_OPTIONS`.
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
/// `TCP_ESTABLISHED` in `tcpi_state`.
const TCP_ESTABLISHED: u8 = 1;
/// How long [`restore()`] waits for the old socket to leave the connection table.
const CONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(200);
/// Largest queue accepted from a [`TcpState`]: more than any socket buffer this host allows.
pub const MAX_QUEUE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("TCP_REPAIR needs CAP_NET_ADMIN (run as root)")]
    NotPermitted,
    #[error("only established connections can move (this one is in TCP state {0})")]
    State(u8),
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn sys(what: &'static str) -> RepairError {
    sys_error(what, io::Error::last_os_error())
}

/// `source`, the error of the system call `what`, as a [`RepairError`].
fn sys_error(what: &'static str, source: io::Error) -> RepairError {
    if source.raw_os_error() == Some(libc::EPERM) {
        return RepairError::NotPermitted;
    }
    RepairError::Sys { what, source }
}

fn set_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    what: &'static str,
) -> Result<(), RepairError> {
    setsockopt_int(fd, level, opt, v).map_err(|e| sys_error(what, e))
}

/// `setsockopt` of an `int` option, for the options the libc and socket2 crates do not name
/// (`TCP_REPAIR*`, `TCP_RTO_MIN_US`).
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` outlives the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Turns repair mode on or off (off sends a window probe, so the peer answers at once).
fn repair(fd: RawFd, on: bool) -> Result<(), RepairError> {
    let (v, what) = if on {
        (TCP_REPAIR_ON, "TCP_REPAIR on")
    } else {
        (TCP_REPAIR_OFF, "TCP_REPAIR off")
    };
    set_int(fd, libc::SOL_TCP, libc::TCP_REPAIR, v, what)
}

/// Points the queue operations (`TCP_QUEUE_SEQ`, reads and writes in repair mode) at `queue`.
fn select_queue(fd: RawFd, queue: libc::c_int) -> Result<(), RepairError> {
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR_QUEUE,
        queue,
        "TCP_REPAIR_QUEUE",
    )
}

/// Sets `queue`'s sequence number (`TCP_QUEUE_SEQ`), before `connect` in repair mode.
fn set_queue_seq(fd: RawFd, queue: libc::c_int, seq: u32) -> Result<(), RepairError> {
    select_queue(fd, queue)?;
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_QUEUE_SEQ,
        seq as libc::c_int,
        "TCP_QUEUE_SEQ",
    )
}

fn get<T: Default>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    what: &'static str,
) -> Result<(T, usize), RepairError> {
    let mut v = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v`, which is that large.
    let r = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut T).cast(), &mut len) };
    if r < 0 {
        return Err(sys(what));
    }
    Ok((v, len as usize))
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, what: &'static str) -> Result<usize, RepairError> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    if unsafe { libc::ioctl(fd, req as _, &mut v) } < 0 {
        return Err(sys(what));
    }
    Ok(v.max(0) as usize)
}

fn addr_of(fd: RawFd, peer: bool) -> Result<SocketAddr, RepairError> {
    // SAFETY: a zeroed sockaddr_storage is valid, and the kernel is told its size.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if r < 0 {
        return Err(sys("getsockname/getpeername"));
    }
    from_storage(&ss).ok_or_else(|| RepairError::Invalid("not an IP socket".into()))
}

fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((
                a.sin6_addr.s6_addr,
                u16::from_be(a.sin6_port),
            )))
        }
        _ => None,
    }
}

fn to_storage(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid; we fill the variant the family names.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let p = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            // SAFETY: sockaddr_storage is large enough for sockaddr_in.
            unsafe {
                (*p).sin_family = libc::AF_INET as libc::sa_family_t;
                (*p).sin_port = v4.port().to_be();
                (*p).sin_addr.s_addr = u32::from_be_bytes(v4.ip().octets()).to_be();
            }
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            let p = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            // SAFETY: sockaddr_storage is large enough for sockaddr_in6.
            unsafe {
                (*p).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*p).sin6_port = v6.port().to_be();
                (*p).sin6_addr.s6_addr = v6.ip().octets();
                (*p).sin6_flowinfo = v6.flowinfo();
                (*p).sin6_scope_id = v6.scope_id();
            }
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}
