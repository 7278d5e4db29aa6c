//! The fast path's local hand-over (decision 56): on one host an origin gives the client's TCP
//! socket itself to the destination (`SCM_RIGHTS` over a Unix socket) instead of freezing it
//! with `TCP_REPAIR` and recreating it. The socket never stops existing, so nothing the client
//! sends meanwhile is dropped (no fence, no retransmission timer); its queues stay in the kernel
//! and only the application's state record crosses the peer channel.
//!
//! Every fast-path server listens on an abstract Unix socket named after its data address
//! ([`name`]); abstract names live in the network namespace, like the TCP ports the fast path
//! already shares. A server takes sockets only from processes of its own uid or root
//! (`SO_PEERCRED`, as fast-path sessions are admitted), and a sender checks the listener is the
//! server's ([`connect`]). A received socket is kept only under a fresh random nonce that the
//! sender then names on its authenticated channel ([`mtcp_proto::wire::Msg::HandedState`] from
//! an origin, [`mtcp_proto::wire::Msg::AdoptHanded`] from an agent handing a new connection);
//! a socket nobody claims within `KEEP` is closed.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream as StdUnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio::sync::Notify;

/// A nonce naming one handed socket.
pub type Nonce = [u8; 16];

/// How long a received socket waits for its destination's takeover to claim it.
const KEEP: Duration = Duration::from_secs(5);
/// Most sockets held unclaimed at once (each is a descriptor): more are closed at once.
const MAX_HELD: usize = 1024;

/// The abstract Unix socket name of the server whose data address is `data`.
pub fn name(data: &str) -> String {
    format!("mtcp-handoff/{data}")
}

/// Sockets handed to this server, by nonce, until its takeovers claim them.
#[derive(Default)]
pub(crate) struct Handoff {
    held: Mutex<HashMap<Nonce, (OwnedFd, Instant)>>,
    arrived: Notify,
    /// Whether this server listens (a fast-path cluster whose listener could be bound).
    pub listening: std::sync::atomic::AtomicBool,
}

impl Handoff {
    /// Listens on [`name`]`(data)` and keeps every socket handed to it (a task; ends with the
    /// server). An error if the name is taken (another process on this host uses it).
    pub fn listen(self: &Arc<Self>, data: &str) -> io::Result<tokio::task::JoinHandle<()>> {
        let addr = UnixAddr::from_abstract_name(name(data).as_bytes())?;
        let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
        l.set_nonblocking(true)?;
        let l = UnixListener::from_std(l)?;
        self.listening
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let me = Arc::downgrade(self);
        Ok(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let Some(me) = me.upgrade() else { return };
                // One task each: a silent sender must not hold the next hand-over up.
                tokio::spawn(async move {
                    if let Err(e) = me.receive(s).await {
                        tracing::warn!(target: "mtcp::handoff", "hand-over refused: {e}");
                    }
                });
            }
        }))
    }

    /// Reads one handed socket (a nonce and one descriptor) from `s`.
    async fn receive(&self, s: tokio::net::UnixStream) -> io::Result<()> {
        let who = s.peer_cred()?;
        if mtcp_proto::adopt::admit_session(Some(who.uid()), own_uid()).is_err() {
            return Err(io::Error::other(format!(
                "from uid {} (pid {:?}); only root and this server's uid may hand sockets over",
                who.uid(),
                who.pid()
            )));
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        let (nonce, fd) = loop {
            match tokio::time::timeout_at(until, s.readable()).await {
                Err(_) => return Err(io::Error::other("nothing sent within 1 s")),
                Ok(r) => r?,
            }
            match s.try_io(tokio::io::Interest::READABLE, || recv_fd(s.as_raw_fd())) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r?,
            }
        };
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, (_, at)| at.elapsed() < KEEP);
        if held.len() >= MAX_HELD {
            return Err(io::Error::other(format!(
                "{MAX_HELD} handed sockets are already waiting to be claimed"
            )));
        }
        held.insert(nonce, (fd, Instant::now()));
        drop(held);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// The socket handed over under `nonce`, waiting up to `within` for it to arrive.
    pub async fn take(&self, nonce: &Nonce, within: Duration) -> Option<OwnedFd> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let arrived = self.arrived.notified();
            if let Some((fd, _)) = self
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(nonce)
            {
                return Some(fd);
            }
            if tokio::time::timeout_at(until, arrived).await.is_err() {
                return None;
            }
        }
    }
}

/// Connects to the hand-over listener of the server at data address `data`, if it runs on this
/// host as uid `owner` (an origin: its own; an agent: the uid listening on `data`, see
/// [`listener_uid`]).
pub fn connect(data: &str, owner: u32) -> io::Result<StdUnixStream> {
    let addr = UnixAddr::from_abstract_name(name(data).as_bytes())?;
    let s = StdUnixStream::connect_addr(&addr)?;
    let who = peer_uid(&s)?;
    if who != owner {
        return Err(io::Error::other(format!(
            "{} is held by uid {who}, not the server's ({owner})",
            name(data)
        )));
    }
    Ok(s)
}

/// The uid of the process listening on TCP address `data` on this host, if any.
pub fn listener_uid(data: &str) -> Option<u32> {
    let a: std::net::SocketAddr = data.parse().ok()?;
    crate::sockowner::listener_owner(a)
}

/// A fresh random nonce.
pub fn new_nonce() -> Nonce {
    rand::random()
}

/// This process's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn peer_uid(s: &StdUnixStream) -> io::Result<u32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    Ok(getsockopt(s, PeerCredentials)
        .map_err(io::Error::from)?
        .uid())
}

/// Sends `fd` under `nonce` on `s` (from [`connect`]).
pub fn give(s: &StdUnixStream, nonce: &Nonce, fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let iov = [io::IoSlice::new(nonce)];
    let n = sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if n != nonce.len() {
        return Err(io::Error::other("short hand-over message"));
    }
    Ok(())
}

/// Reads a nonce and exactly one descriptor from `s`.
fn recv_fd(s: std::os::fd::RawFd) -> io::Result<(Nonce, OwnedFd)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut nonce = [0u8; 16];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let mut iov = [io::IoSliceMut::new(&mut nonce)];
    let msg = recvmsg::<()>(
        s,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let got = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: descriptors received with SCM_RIGHTS are new in this process and owned
            // by nobody else; each is wrapped exactly once.
            fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if got != nonce.len() || fds.len() != 1 {
        return Err(io::Error::other(format!(
            "a hand-over carries a 16-byte nonce and one descriptor, not {got} bytes and {}",
            fds.len()
        )));
    }
    Ok((nonce, fds.pop().expect("one")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_crosses_under_its_nonce_only() {
        let peer = format!("test-{}-{}", std::process::id(), rand::random::<u64>());
        let h = Arc::new(Handoff::default());
        let task = h.listen(&peer).expect("listen");
        // A second listener on the same name is refused (the name is this server's).
        assert!(Arc::new(Handoff::default()).listen(&peer).is_err());
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let a = a.into_std().expect("std");
        let nonce: Nonce = rand::random();
        let s = connect(&peer, own_uid()).expect("connect");
        give(&s, &nonce, std::os::fd::AsFd::as_fd(&a)).expect("give");
        drop(a);
        let other: Nonce = rand::random();
        assert!(h.take(&other, Duration::from_millis(50)).await.is_none());
        let fd = h
            .take(&nonce, Duration::from_secs(2))
            .await
            .expect("handed");
        // The same socket: what is written to the handed end arrives at `b`.
        let mut a = StdUnixStream::from(fd);
        std::io::Write::write_all(&mut a, b"still the same socket").expect("write");
        let mut got = vec![0u8; 21];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut got)
            .await
            .expect("read");
        assert_eq!(&got, b"still the same socket");
        assert!(h.take(&nonce, Duration::from_millis(10)).await.is_none());
        task.abort();
    }

    #[tokio::test]
    async fn garbage_on_the_listener_is_refused_and_the_next_hand_over_works() {
        let peer = format!("test-{}-{}", std::process::id(), rand::random::<u64>());
        let h = Arc::new(Handoff::default());
        let task = h.listen(&peer).expect("listen");
        // No descriptor, wrong length, then silence: each refused, none kept.
        let mut s = connect(&peer, own_uid()).expect("connect");
        std::io::Write::write_all(&mut s, b"garbage").expect("write");
        drop(s);
        let silent = connect(&peer, own_uid()).expect("connect");
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let nonce: Nonce = rand::random();
        let s = connect(&peer, own_uid()).expect("connect");
        give(&s, &nonce, std::os::fd::AsFd::as_fd(&a)).expect("give");
        assert!(h.take(&nonce, Duration::from_secs(3)).await.is_some());
        assert!(h.held.lock().unwrap().is_empty());
        drop(silent);
        task.abort();
    }
}
