//! Freezing a socket: repair mode on, and the connection's state read out of it ([`freeze()`],
//! [`try_freeze`], [`try_freeze_encoded`]); [`window_probe`].

use crate::*;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

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

/// [`freeze()`], giving the socket back (out of repair mode, still serving) when it cannot.
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

impl Head {
    /// The connection's state with these sequence numbers and queues.
    fn state(
        &self,
        send_seq: u32,
        recv_seq: u32,
        send_queue: Vec<u8>,
        unsent: u32,
        recv_queue: Vec<u8>,
    ) -> TcpState {
        TcpState {
            local: self.local,
            remote: self.remote,
            send_seq,
            recv_seq,
            send_queue,
            unsent,
            recv_queue,
            mss: self.mss,
            options: self.options,
            snd_wscale: self.snd_wscale,
            rcv_wscale: self.rcv_wscale,
            timestamp: self.timestamp,
            window: self.window,
        }
    }
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
    Ok(h.state(send_seq, recv_seq, send_queue, h.unsent as u32, recv_queue))
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
    // `TCP_QUEUE_SEQ` of the send queue is the sequence number after its last byte.
    let send_seq = end_seq.wrapping_sub(h.unsent as u32);
    let st = h.state(send_seq, recv_seq, Vec::new(), 0, recv_queue);
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
