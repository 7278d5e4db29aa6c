//! Moving an established TCP connection from one socket to another with Linux `TCP_REPAIR`.
//!
//! This is the first piece of M-TCP's kernel fast path (DESIGN §6): instead of relaying the
//! client's bytes through the agent, the connection itself moves. [`freeze`] puts a socket in
//! repair mode (it stops sending and receiving; nothing is sent to the peer) and reads out
//! everything the kernel knows about the connection: sequence numbers, the unacknowledged and
//! unsent output, input the application has not read, window, options and timestamp clock.
//! [`Frozen::discard`] then closes the old socket silently, and [`restore`] — in this process or
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
//! [`restore`] returning), or it gets a reset: across hosts the fast path fences the flow with
//! an nftables rule first (`LINUX-NOTES.md`).

mod fence;
pub mod nfnl;
pub use fence::{lift, Fence, Fences, TABLE_PREFIX};

use serde::{Deserialize, Serialize};
use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

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
/// How long [`restore`] waits for the old socket to leave the connection table.
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
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EPERM) {
        return RepairError::NotPermitted;
    }
    RepairError::Sys { what, source }
}

/// Everything needed to recreate an established connection (`soccr`'s `libsoccr_sk_data`
/// plus the queues' bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpState {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `write_seq`: the sequence number after the last byte the application wrote.
    pub send_seq: u32,
    /// `rcv_nxt`: the sequence number after the last byte received.
    pub recv_seq: u32,
    /// Output not yet acknowledged by the peer, oldest first (`SIOCOUTQ` bytes).
    #[serde(with = "serde_bytes")]
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were never sent (`SIOCOUTQNSD`).
    pub unsent: u32,
    /// Input received but not read by the application (`SIOCINQ` bytes).
    #[serde(with = "serde_bytes")]
    pub recv_queue: Vec<u8>,
    pub mss: u32,
    /// `tcpi_options` (timestamps, SACK, window scaling).
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// The connection's TCP timestamp clock (`TCP_TIMESTAMP`), if timestamps are on.
    pub timestamp: u32,
    pub window: Window,
}

/// Version of [`TcpState::encode`]'s format (its first byte).
pub const STATE_VERSION: u8 = 1;

impl TcpState {
    /// The state as bytes to carry to another process or host: a version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        // Sized for the queues up front: one copy of them, no reallocation.
        let mut out = Vec::with_capacity(self.send_queue.len() + self.recv_queue.len() + 128);
        out.push(STATE_VERSION);
        postcard::to_extend(self, out).expect("a TcpState always serializes")
    }

    /// [`TcpState::encode`]'s bytes for this state with a send queue of `len` bytes that `fill`
    /// appends where it belongs (this state's own send queue must be empty): the queue is
    /// written once, straight into the encoding.
    fn encode_around(
        &self,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), RepairError>,
    ) -> Result<Vec<u8>, RepairError> {
        debug_assert!(self.send_queue.is_empty());
        let ser = |e: postcard::Error| RepairError::Invalid(format!("encoding the state: {e}"));
        let mut out = Vec::with_capacity(len + self.recv_queue.len() + 128);
        out.push(STATE_VERSION);
        // The fields in declaration order, as postcard writes a struct; a byte string is its
        // length (a varint, as a `usize` is written) and its bytes.
        let mut out = postcard::to_extend(
            &(self.local, self.remote, self.send_seq, self.recv_seq, len),
            out,
        )
        .map_err(ser)?;
        let start = out.len();
        fill(&mut out)?;
        if out.len() != start + len {
            return Err(RepairError::Invalid(format!(
                "send queue of {} bytes, expected {len}",
                out.len() - start
            )));
        }
        postcard::to_extend(
            &(
                self.unsent,
                serde_bytes::Bytes::new(&self.recv_queue),
                self.mss,
                self.options,
                self.snd_wscale,
                self.rcv_wscale,
                self.timestamp,
                self.window,
            ),
            out,
        )
        .map_err(ser)
    }

    /// Reads a state [`TcpState::encode`] wrote, checking it as [`restore`] would: an unknown
    /// version, trailing bytes, oversized queues or inconsistent fields are errors.
    pub fn decode(bytes: &[u8]) -> Result<TcpState, RepairError> {
        let Some((&v, body)) = bytes.split_first() else {
            return Err(RepairError::Invalid("empty TCP state".into()));
        };
        if v != STATE_VERSION {
            return Err(RepairError::Invalid(format!(
                "TCP state version {v}, this build reads {STATE_VERSION}"
            )));
        }
        if body.len() > 2 * MAX_QUEUE + 4096 {
            return Err(RepairError::Invalid("TCP state too large".into()));
        }
        let (st, rest): (TcpState, &[u8]) = postcard::take_from_bytes(body)
            .map_err(|e| RepairError::Invalid(format!("malformed TCP state: {e}")))?;
        if !rest.is_empty() {
            return Err(RepairError::Invalid(format!(
                "{} bytes after the TCP state",
                rest.len()
            )));
        }
        st.check()?;
        Ok(st)
    }

    /// What [`restore`] requires of a state before it touches a socket.
    fn check(&self) -> Result<(), RepairError> {
        if self.send_queue.len() > MAX_QUEUE || self.recv_queue.len() > MAX_QUEUE {
            return Err(RepairError::Invalid(
                "queue larger than any socket buffer".into(),
            ));
        }
        if self.unsent as usize > self.send_queue.len() {
            return Err(RepairError::Invalid("more unsent bytes than queued".into()));
        }
        if self.local.is_ipv4() != self.remote.is_ipv4() {
            return Err(RepairError::Invalid(
                "local and remote address families differ".into(),
            ));
        }
        Ok(())
    }

    /// Forgets the output that was queued but never sent (the new socket's owner will
    /// regenerate it instead of carrying it); returns how many bytes that was. The sequence
    /// numbers stay consistent: the connection continues as if those bytes had never been
    /// written.
    pub fn drop_unsent(&mut self) -> usize {
        let n = (self.unsent as usize).min(self.send_queue.len());
        self.send_queue.truncate(self.send_queue.len() - n);
        self.send_seq = self.send_seq.wrapping_sub(n as u32);
        self.unsent = 0;
        n
    }

    /// The output queued but never sent, which the new socket's owner must write first.
    pub fn unsent_bytes(&self) -> &[u8] {
        let n = (self.unsent as usize).min(self.send_queue.len());
        &self.send_queue[self.send_queue.len() - n..]
    }
}

/// `struct tcp_repair_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

fn set_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    what: &'static str,
) -> Result<(), RepairError> {
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
    if r < 0 {
        return Err(sys(what));
    }
    Ok(())
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

/// The first fields of `struct tcp_info`, up to the window scales.
#[repr(C)]
#[derive(Default)]
struct TcpInfoHead {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    /// `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4` (little-endian bitfield: snd in the low bits).
    wscales: u8,
    delivery_rate_app_limited: u8,
}

/// `struct tcp_repair_opt`.
#[repr(C)]
struct RepairOpt {
    code: u32,
    val: u32,
}

/// A socket in repair mode and the state read out of it.
pub struct Frozen {
    fd: OwnedFd,
    pub state: TcpState,
}

/// A socket in repair mode and its state, already encoded ([`TcpState::encode`]'s bytes), without
/// the output the kernel never sent (as after [`TcpState::drop_unsent`]): see
/// [`try_freeze_encoded`].
pub struct FrozenEncoded {
    fd: OwnedFd,
    /// The encoded state.
    pub encoded: Vec<u8>,
    /// Bytes of output the kernel never sent, left out of the state.
    pub dropped: usize,
}

/// Puts `sock` in repair mode and reads its connection's state. From here on the socket neither
/// sends nor receives; [`Frozen::discard`] closes it without a FIN or reset, and
/// [`Frozen::thaw`] gives it back unchanged if the move is abandoned.
pub fn freeze(sock: TcpStream) -> Result<Frozen, RepairError> {
    try_freeze(sock).map_err(|(e, _)| e)
}

/// [`freeze`], giving the socket back (out of repair mode, still serving) when it cannot.
pub fn try_freeze(sock: TcpStream) -> Result<Frozen, (RepairError, TcpStream)> {
    let fd = OwnedFd::from(sock);
    let raw = fd.as_raw_fd();
    if let Err(e) = repair(raw, true) {
        return Err((e, TcpStream::from(fd)));
    }
    match read_state(raw) {
        Ok(state) => Ok(Frozen { fd, state }),
        Err(e) => {
            let _ = repair(raw, false);
            Err((e, TcpStream::from(fd)))
        }
    }
}

/// [`try_freeze`] for an owner that only carries the state elsewhere and regenerates the output
/// the kernel never sent: that output is not read (a full send buffer holds megabytes of it),
/// and the rest of the send queue is peeked straight into the encoding, so its bytes are copied
/// once. `mark` is called after each step (`repair_on`, `info_read`, `recv_queue_read`,
/// `send_queue_read`), for a caller that times them.
pub fn try_freeze_encoded(
    sock: TcpStream,
    mark: &mut dyn FnMut(&'static str),
) -> Result<FrozenEncoded, (RepairError, TcpStream)> {
    let fd = OwnedFd::from(sock);
    let raw = fd.as_raw_fd();
    if let Err(e) = repair(raw, true) {
        return Err((e, TcpStream::from(fd)));
    }
    mark("repair_on");
    match read_encoded(raw, mark) {
        Ok((encoded, dropped)) => Ok(FrozenEncoded {
            fd,
            encoded,
            dropped,
        }),
        Err(e) => {
            let _ = repair(raw, false);
            Err((e, TcpStream::from(fd)))
        }
    }
}

/// What a frozen socket says about its connection, apart from the queues' bytes and sequence
/// numbers.
struct Head {
    local: SocketAddr,
    remote: SocketAddr,
    /// `SIOCOUTQ`, `SIOCOUTQNSD` (at most `outq`), `SIOCINQ`.
    outq: usize,
    unsent: usize,
    inq: usize,
    mss: u32,
    options: u8,
    snd_wscale: u8,
    rcv_wscale: u8,
    timestamp: u32,
    window: Window,
}

fn read_head(fd: RawFd) -> Result<Head, RepairError> {
    let (ti, _) = get::<TcpInfoHead>(fd, libc::SOL_TCP, libc::TCP_INFO, "TCP_INFO")?;
    if ti.state != TCP_ESTABLISHED {
        return Err(RepairError::State(ti.state));
    }
    let outq = ioctl_int(fd, libc::TIOCOUTQ as libc::c_ulong, "SIOCOUTQ")?;
    let unsent = ioctl_int(fd, 0x894B, "SIOCOUTQNSD")?;
    let inq = ioctl_int(fd, libc::FIONREAD as libc::c_ulong, "SIOCINQ")?;
    let (mss, _) = get::<libc::c_int>(fd, libc::SOL_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")?;
    let timestamp = if ti.options & TCPI_OPT_TIMESTAMPS != 0 {
        get::<u32>(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")?.0
    } else {
        0
    };
    let (w, _) = get::<[u32; 5]>(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR_WINDOW,
        "TCP_REPAIR_WINDOW",
    )?;
    Ok(Head {
        local: addr_of(fd, false)?,
        remote: addr_of(fd, true)?,
        outq,
        unsent: unsent.min(outq),
        inq,
        mss: mss.max(0) as u32,
        options: ti.options,
        snd_wscale: ti.wscales & 0xf,
        rcv_wscale: ti.wscales >> 4,
        timestamp,
        window: Window {
            snd_wl1: w[0],
            snd_wnd: w[1],
            max_window: w[2],
            rcv_wnd: w[3],
            rcv_wup: w[4],
        },
    })
}

fn read_state(fd: RawFd) -> Result<TcpState, RepairError> {
    let h = read_head(fd)?;
    let (recv_seq, recv_queue) = read_queue(fd, TCP_RECV_QUEUE, h.inq, h.inq)?;
    let (send_seq, send_queue) = read_queue(fd, TCP_SEND_QUEUE, h.outq, h.outq)?;
    Ok(TcpState {
        local: h.local,
        remote: h.remote,
        send_seq,
        recv_seq,
        send_queue,
        unsent: h.unsent as u32,
        recv_queue,
        mss: h.mss,
        options: h.options,
        snd_wscale: h.snd_wscale,
        rcv_wscale: h.rcv_wscale,
        timestamp: h.timestamp,
        window: h.window,
    })
}

/// The encoded state without the unsent output, and how many unsent bytes it leaves out.
fn read_encoded(
    fd: RawFd,
    mark: &mut dyn FnMut(&'static str),
) -> Result<(Vec<u8>, usize), RepairError> {
    let h = read_head(fd)?;
    mark("info_read");
    let (recv_seq, recv_queue) = read_queue(fd, TCP_RECV_QUEUE, h.inq, h.inq)?;
    mark("recv_queue_read");
    let sent = h.outq - h.unsent;
    select_queue(fd, TCP_SEND_QUEUE)?;
    let (end_seq, _) = get::<u32>(fd, libc::SOL_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")?;
    let st = TcpState {
        local: h.local,
        remote: h.remote,
        // `TCP_QUEUE_SEQ` of the send queue is the sequence number after its last byte.
        send_seq: end_seq.wrapping_sub(h.unsent as u32),
        recv_seq,
        send_queue: Vec::new(),
        unsent: 0,
        recv_queue,
        mss: h.mss,
        options: h.options,
        snd_wscale: h.snd_wscale,
        rcv_wscale: h.rcv_wscale,
        timestamp: h.timestamp,
        window: h.window,
    };
    let out = st.encode_around(sent, |out| peek_into(fd, out, h.outq, sent))?;
    mark("send_queue_read");
    Ok((out, h.unsent))
}

/// Appends the first `want` bytes of the selected queue, which holds `len`, to `out`, peeked
/// straight into its spare room.
fn peek_into(fd: RawFd, out: &mut Vec<u8>, len: usize, want: usize) -> Result<(), RepairError> {
    // One byte more than the queue holds proves its size when all of it is wanted.
    let room = if want == len { want + 1 } else { want };
    out.reserve(room);
    if want > 0 {
        let dst = &mut out.spare_capacity_mut()[..room];
        // SAFETY: `dst` is valid for writes of `room` bytes; `recv` writes only into it.
        let n = unsafe {
            libc::recv(
                fd,
                dst.as_mut_ptr().cast(),
                room,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // A peek of the send queue in repair mode fills the buffer with the queue's first
        // bytes and returns the whole queue's length (Linux's `tcp_peek_sndq` counts every
        // buffer it walks); a kernel that counted only the bytes copied would return `want`.
        // Either way the first `want` bytes are written; anything else, and the queue is read
        // the plain way.
        if n >= 0 && (n as usize == len || n as usize == want) {
            // SAFETY: the kernel wrote the first `want` bytes of the spare room (`want` of a
            // queue that holds at least that many, into a buffer at least that large).
            unsafe { out.set_len(out.len() + want) };
            return Ok(());
        }
    }
    let (_, q) = read_queue(fd, TCP_SEND_QUEUE, len, want)?;
    out.extend_from_slice(&q);
    Ok(())
}

/// A queue's sequence number (`TCP_QUEUE_SEQ`) and its first `want` bytes (of `len`, which
/// the queue must hold), peeked in repair mode.
fn read_queue(
    fd: RawFd,
    queue: libc::c_int,
    len: usize,
    want: usize,
) -> Result<(u32, Vec<u8>), RepairError> {
    select_queue(fd, queue)?;
    let (seq, _) = get::<u32>(fd, libc::SOL_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")?;
    // One byte more than expected proves the size.
    let mut buf = vec![0u8; len + 1];
    let got = if len > 0 { peek(fd, &mut buf)? } else { 0 };
    if got != len {
        return Err(RepairError::Invalid(format!(
            "queue {queue} held {got} bytes, expected {len}"
        )));
    }
    buf.truncate(want.min(len));
    Ok((seq, buf))
}

/// One `recv(MSG_PEEK)` into `buf`: what it returned.
fn peek(fd: RawFd, buf: &mut [u8]) -> Result<usize, RepairError> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(sys("reading a queue in repair mode"))
    } else {
        Ok(n as usize)
    }
}

/// Makes an established socket send a window probe, so the peer answers with an ACK at once:
/// after a fence ([`Fence`]) comes down, this restarts a flow whose ACKs were dropped instead of
/// waiting for a retransmission timer. Enters and leaves repair mode (CAP_NET_ADMIN).
pub fn window_probe(sock: &impl AsRawFd) -> Result<(), RepairError> {
    let fd = sock.as_raw_fd();
    repair(fd, true)?;
    repair(fd, false)
}

impl FrozenEncoded {
    /// Closes the socket while still in repair mode (the peer is sent nothing), and gives the
    /// encoded state to carry.
    pub fn discard(self) -> Vec<u8> {
        drop(self.fd);
        self.encoded
    }

    /// Leaves repair mode and gives the socket back, unchanged (the move was abandoned).
    pub fn thaw(self) -> Result<TcpStream, RepairError> {
        repair(self.fd.as_raw_fd(), false)?;
        Ok(TcpStream::from(self.fd))
    }
}

impl Frozen {
    /// Closes the socket while still in repair mode (the peer is sent nothing), and gives the
    /// state to carry.
    pub fn discard(self) -> TcpState {
        drop(self.fd);
        self.state
    }

    /// Leaves repair mode and gives the socket back, unchanged (the move was abandoned).
    pub fn thaw(self) -> Result<TcpStream, RepairError> {
        repair(self.fd.as_raw_fd(), false)?;
        Ok(TcpStream::from(self.fd))
    }
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

impl AsRawFd for Frozen {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Frozen {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(v6: bool, port: u16) -> SocketAddr {
        if v6 {
            SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port))
        } else {
            SocketAddr::from(([127, 0, 0, 1], port))
        }
    }

    prop_compose! {
        fn states()(
            v6 in any::<bool>(),
            ports in any::<(u16, u16)>(),
            seqs in any::<(u32, u32)>(),
            send_queue in proptest::collection::vec(any::<u8>(), 0..2000),
            unsent_frac in 0.0f64..=1.0,
            recv_queue in proptest::collection::vec(any::<u8>(), 0..2000),
            mss in any::<u32>(),
            options in any::<u8>(),
            scales in (0u8..15, 0u8..15),
            timestamp in any::<u32>(),
            w in any::<[u32; 5]>(),
        ) -> TcpState {
            let unsent = (send_queue.len() as f64 * unsent_frac) as u32;
            TcpState {
                local: addr(v6, ports.0),
                remote: addr(v6, ports.1),
                send_seq: seqs.0,
                recv_seq: seqs.1,
                send_queue,
                unsent,
                recv_queue,
                mss,
                options,
                snd_wscale: scales.0,
                rcv_wscale: scales.1,
                timestamp,
                window: Window { snd_wl1: w[0], snd_wnd: w[1], max_window: w[2], rcv_wnd: w[3], rcv_wup: w[4] },
            }
        }
    }

    proptest! {
        #[test]
        fn states_round_trip(st in states()) {
            let b = st.encode();
            prop_assert_eq!(TcpState::decode(&b).unwrap(), st.clone());
            prop_assert_eq!(st.unsent_bytes().len(), st.unsent as usize);
        }

        #[test]
        fn a_state_encoded_around_its_send_queue_is_the_plain_encoding(st in states()) {
            let mut st = st;
            st.drop_unsent();
            let q = std::mem::take(&mut st.send_queue);
            let b = st
                .encode_around(q.len(), |out| {
                    out.extend_from_slice(&q);
                    Ok(())
                })
                .unwrap();
            st.send_queue = q;
            prop_assert_eq!(b, st.encode());
        }

        #[test]
        fn damaged_states_are_errors_not_panics(st in states(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
            let b = st.encode();
            let _ = TcpState::decode(&b[..cut.index(b.len())]);
            let mut d = b.clone();
            let i = flip.0.index(d.len());
            d[i] ^= flip.1 | 1;
            if let Ok(got) = TcpState::decode(&d) {
                prop_assert!(got.check().is_ok());
            }
        }
    }

    #[test]
    fn wrong_version_trailing_bytes_and_inconsistent_fields_are_refused() {
        let st = TcpState {
            local: addr(false, 1),
            remote: addr(false, 2),
            send_seq: 0,
            recv_seq: 0,
            send_queue: vec![1, 2, 3],
            unsent: 1,
            recv_queue: Vec::new(),
            mss: 1460,
            options: 0,
            snd_wscale: 0,
            rcv_wscale: 0,
            timestamp: 0,
            window: Window::default(),
        };
        let mut b = st.encode();
        b[0] = 9;
        assert!(TcpState::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        let mut b = st.encode();
        b.push(0);
        assert!(TcpState::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("after the TCP state"));
        let bad = TcpState {
            unsent: 4,
            ..st.clone()
        };
        // Refused by `decode` and, before any socket call, by `restore`.
        assert!(TcpState::decode(&bad.encode()).is_err());
        assert!(matches!(restore(&bad), Err(RepairError::Invalid(_))));
        let mixed = TcpState {
            remote: addr(true, 2),
            ..st
        };
        assert!(TcpState::decode(&mixed.encode()).is_err());
        assert!(matches!(restore(&mixed), Err(RepairError::Invalid(_))));
        assert!(TcpState::decode(&[]).is_err());
    }

    #[test]
    fn a_send_queue_filled_short_or_long_is_an_error() {
        let st = TcpState {
            local: addr(false, 1),
            remote: addr(false, 2),
            send_seq: 0,
            recv_seq: 0,
            send_queue: Vec::new(),
            unsent: 0,
            recv_queue: vec![5; 3],
            mss: 1460,
            options: 0,
            snd_wscale: 0,
            rcv_wscale: 0,
            timestamp: 0,
            window: Window::default(),
        };
        for n in [3, 5] {
            let r = st.encode_around(4, |out| {
                out.extend(std::iter::repeat_n(1, n));
                Ok(())
            });
            assert!(matches!(r, Err(RepairError::Invalid(_))), "{n} bytes");
        }
    }
}
