//! The peer channel (server ↔ server state transfer) and the admin channel (drain, status): the
//! opening side's calls (FETCH, REPLICATE, CLAIMREPLICA, …; the serving side is `peer_serve`,
//! the pool of idle channels `peer_pool`).
//!
//! Both start with mutual challenge–response authentication under the cluster key: the acceptor
//! sends a nonce, the opener answers with its own nonce and an HMAC over both nonces, its id,
//! the id of the server it means to reach and the port kind; the acceptor checks that the
//! proof names itself and this kind of port, and proves itself back over the same. Until then
//! frames are limited to a few KiB, so an unauthenticated peer can make us buffer nothing
//! large. After it, every frame both ways carries a MAC under a per-channel, per-direction key
//! with a sequence number (`mtcp_proto::channel`): a frame injected, altered, replayed or
//! reordered on the path ends the channel.

mod auth;

pub use crate::peer_pool::Channel;
pub(crate) use auth::accept_authenticated;
pub use auth::{connect_authenticated, Opener};

use crate::config::ServerEntry;
use crate::framed::ChannelError;
use crate::movetrace::Role as TraceRole;
use crate::origin::{Fetch, Frozen};
use crate::registry::ServerInner;
use crate::replica::Claimed;
use crate::tls::ClientTls;
use mtcp_proto::answers::{self, NotStored};
use mtcp_proto::custody::YieldAnswer;
use mtcp_proto::stream::Refusal;
use mtcp_proto::wire::{Holding, Msg, ServerStatus};
use mtcp_proto::{Cid, ClusterKey, PortKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(crate) const ADMIN_FRAME: usize = 64 << 10;
/// A peer channel idle this long is closed (pooled channels are reopened on demand).
pub(crate) const IDLE: Duration = Duration::from_secs(300);

/// One request to server `to` over a pooled authenticated channel. The first answer must come
/// within `first` (an origin answers [`Msg::Working`] at once, then the result within
/// `total`). The time to the first answer feeds the RTT estimate towards `to`.
pub(crate) async fn call(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    req: &Msg,
    first: Duration,
    total: Duration,
) -> Result<Msg, ChannelError> {
    call_noting(inner, to, req, first, total, None).await
}

/// [`call`], setting `answered` once the first answer (WORKING or the result) arrived.
async fn call_noting(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    req: &Msg,
    first: Duration,
    total: Duration,
    answered: Option<&AtomicBool>,
) -> Result<Msg, ChannelError> {
    // An authenticated channel from the pool saves three round trips. One the peer has closed
    // since fails before the peer saw the request, so it is safe to retry on a fresh one.
    if let Some(ch) = inner.peer_pool.take(&to.id) {
        match ask(inner, ch, req, first, total, answered).await {
            Ok((m, ch, rtt)) => {
                inner.peer_pool.sample(&to.id, rtt);
                inner.peer_pool.put(&to.id, ch);
                return Ok(m);
            }
            Err(ChannelError::Closed | ChannelError::Io(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let ch = dial(inner, to, first.min(inner.limits.fetch_timeout)).await?;
    let (m, ch, rtt) = ask(inner, ch, req, first, total, answered).await?;
    inner.peer_pool.sample(&to.id, rtt);
    inner.peer_pool.put(&to.id, ch);
    Ok(m)
}

/// Opens an authenticated peer channel from this server to `to`, each step within `limit`,
/// taking frames as large as a state record with a fast-path connection's TCP state.
async fn dial(
    inner: &ServerInner,
    to: &ServerEntry,
    limit: Duration,
) -> Result<Channel, ChannelError> {
    let opener = Opener {
        key: &inner.cluster.key,
        from: &inner.id,
        tls: inner.tls.as_ref().map(|t| &t.client),
        hedge: mtcp_proto::timing::hedge_after(&inner.peer_pool.rtt(&to.id)),
    };
    connect_authenticated(
        &to.peer,
        opener,
        &to.id,
        PortKind::Peer,
        inner.limits.max_record + crate::direct_state::MAX_TCP_STATE + 1024,
        limit,
    )
    .await
}

/// The test hooks `Limits::peer_delay` and `peer_loss`: what a peer-channel message waits
/// before it is written (emulated path delay and retransmissions on loopback).
pub(crate) async fn emulated_path(inner: &ServerInner) {
    let l = &inner.limits;
    let mut d = l.peer_delay;
    if l.peer_loss > 0.0 && rand::random::<f64>() < l.peer_loss {
        d += mtcp_proto::trigger::MIN_RTO;
    }
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Test hook `Limits::hold_handover`: a hand-over holds its slot this long first.
pub(crate) async fn emulated_hold(inner: &ServerInner) {
    if !inner.limits.hold_handover.is_zero() {
        tokio::time::sleep(inner.limits.hold_handover).await;
    }
}

/// One request on an authenticated peer channel; the channel comes back for reuse, with the
/// time the first answer took.
async fn ask(
    inner: &ServerInner,
    mut ch: Channel,
    req: &Msg,
    first: Duration,
    total: Duration,
    answered: Option<&AtomicBool>,
) -> Result<(Msg, Channel, Duration), ChannelError> {
    let t0 = std::time::Instant::now();
    emulated_path(inner).await;
    ch.1.write_msg(req).await?;
    let mut m = ch.0.next_msg(first).await?;
    let rtt = t0.elapsed();
    if let Some(a) = answered {
        a.store(true, Ordering::Relaxed);
    }
    if m == Msg::Working {
        // The origin may wait for a lock_state section to end before it answers.
        m = ch.0.next_msg(total).await?;
    }
    Ok((m, ch, rtt))
}

/// The longest a FETCH's result may take once the origin answered WORKING (it may wait for a
/// lock_state section to end).
pub(crate) fn fetch_bound(inner: &ServerInner) -> Duration {
    inner.limits.fetch_timeout + inner.limits.lock_timeout
}

/// Destination side of a migration: asks `origin` to freeze `cid` and send its state; returns
/// the record (with the TCP connection of a fast-path connection) and its size on the wire.
/// `answered` is set once the origin's first answer arrived. The first answer is waited for
/// `fetch_timeout` here; in eager mode the caller gives up sooner (`origin_wait`) and takes the
/// connection over from a replica, but keeps this future to read the origin's answer if the
/// replica cannot be had (see `takeover::fetch_or_replica`).
pub(crate) async fn fetch(
    inner: &Arc<ServerInner>,
    origin: &ServerEntry,
    f: &Fetch,
    answered: &AtomicBool,
) -> Result<(Frozen, u64), Refusal> {
    let req = Msg::Fetch {
        cid: f.cid,
        epoch: f.epoch,
        down_recv: f.down_recv,
        sum_from: f.sum_from,
        down_sum: f.down_sum,
        holding: f.holding.clone(),
    };
    crate::movetrace::step(TraceRole::Destination, f.cid, "fetch_call");
    let msg = call_noting(
        inner,
        origin,
        &req,
        inner.limits.fetch_timeout,
        fetch_bound(inner),
        Some(answered),
    )
    .await
    .map_err(|e| {
        Refusal::origin_unreachable(format!("origin {} ({}): {e}", origin.id, origin.peer))
    })?;
    crate::movetrace::step(TraceRole::Destination, f.cid, "state_rx");
    answers::read_state(&origin.id, msg, inner.limits.max_record)
}

/// Eager mode: stores an encoded record at backup `to`.
pub(crate) async fn replicate(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    rec: Vec<u8>,
) -> Result<(), NotStored> {
    let t = inner.limits.fetch_timeout;
    match call(inner, to, &Msg::Replicate(rec), t, t).await {
        Ok(reply) => answers::read_replicated(&to.id, reply),
        Err(e) => Err(NotStored {
            code: None,
            why: format!("{} ({}): {e}", to.id, to.peer),
            taken: None,
            down: matches!(&e, ChannelError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused),
        }),
    }
}

/// Eager mode: claims connection `cid` at `epoch` at backup `to` (see [`crate::replica`]).
/// An unreachable backup is `OriginUnreachable`. The answer is waited for an RTT-derived
/// bound ([`mtcp_proto::timing::answer_bound`]): a claim granted but given up on would fence
/// the connection for nobody (such a claim is released, see [`release`]). Twice that bound:
/// a backup may first have to fence a silent holder at that holder's backups
/// ([`crate::eager::claim_here`]).
pub(crate) async fn claim(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    cid: Cid,
    epoch: u64,
    holding: &Holding,
) -> Result<Claimed, Refusal> {
    let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&to.id)) * 2;
    let holding = holding.clone();
    let m = Msg::ClaimReplica {
        cid,
        epoch,
        holding,
    };
    claim_msg(inner, to, &m, t).await
}

/// Eager mode: fences epoch `epoch` of `cid` at backup `to`: a plain claim (see
/// [`crate::eager::handover::fence`]). Answered as [`claim`]. Twice the answer bound: the backup may
/// first ask a candidate holding the epoch to give it up ([`crate::eager::fence_here`]).
pub(crate) async fn fence(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    cid: Cid,
    epoch: u64,
    by: &str,
    holding: &Holding,
) -> Result<Claimed, Refusal> {
    let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&to.id)) * 2;
    let (by, holding) = (by.to_string(), holding.clone());
    let m = Msg::FenceEpoch {
        cid,
        epoch,
        by,
        holding,
    };
    claim_msg(inner, to, &m, t).await
}

/// Eager mode: asks `to`, the holder of a connection's state, to give up `epoch` for a request
/// made under the agent's word `attempt` (see [`crate::eager::handover::ask_to_yield`]). An
/// error: not reached.
pub(crate) async fn ask_yield(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    cid: Cid,
    epoch: u64,
    attempt: u64,
) -> Result<YieldAnswer, String> {
    let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&to.id));
    match call(
        inner,
        to,
        &Msg::Yield {
            cid,
            epoch,
            attempt,
        },
        t,
        t,
    )
    .await
    {
        Ok(reply) => YieldAnswer::read(&reply).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn claim_msg(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    m: &Msg,
    t: Duration,
) -> Result<Claimed, Refusal> {
    match call(inner, to, m, t, t).await {
        Ok(reply) => Ok(match answers::read_claimed(&to.id, reply)? {
            Some(b) => Claimed::Record(b),
            None => Claimed::Nothing,
        }),
        Err(e) => Err(Refusal::origin_unreachable(format!(
            "backup {} ({}): {e}",
            to.id, to.peer
        ))),
    }
}

/// Eager mode: withdraws this server's claim on `cid` at `epoch` at backup `to` (best effort):
/// the takeover failed before anything was served, so the next candidate may claim it.
pub(crate) async fn release(inner: &Arc<ServerInner>, to: &ServerEntry, cid: Cid, epoch: u64) {
    let t = inner.limits.fetch_timeout;
    match call(inner, to, &Msg::ReleaseClaim { cid, epoch }, t, t).await {
        Ok(reply) => {
            if let Err(name) = answers::read_released(&reply) {
                tracing::warn!(%cid, backup = %to.id, "releasing the claim: answered {name}")
            }
        }
        Err(e) => tracing::warn!(%cid, backup = %to.id, "could not release the claim: {e}"),
    }
}

/// Eager mode: tells backup `to` the connection ended (best effort).
pub(crate) async fn drop_replica(inner: &Arc<ServerInner>, to: &ServerEntry, cid: Cid, epoch: u64) {
    // Best effort and in the background: a burst of them (a drain's confirmations) takes turns
    // on a few pooled channels instead of dialling one each (`PeerPool::background`).
    let turns = inner.peer_pool.background(&to.id);
    let _turn = turns.acquire().await;
    let t = inner.limits.fetch_timeout;
    if let Err(e) = call(inner, to, &Msg::DropReplica { cid, epoch }, t, t).await {
        tracing::debug!(%cid, backup = %to.id, "could not drop the replica: {e}");
    }
}

/// How often an eager server checks its channel to each backup (see [`keep_warm`]).
const WARM_EVERY: Duration = Duration::from_secs(1);
/// How long dialling a backup in the background may take: long enough for TCP to retransmit a
/// lost SYN twice (1 s, then 3 s after a retransmitted handshake on Linux).
const WARM_DIAL: Duration = Duration::from_secs(10);

/// Eager mode: keeps one authenticated channel to backup `to` ready in the pool and its round
/// trip measured, for as long as the server runs. A destination that took a connection over
/// must store the new epoch on its backups before it answers RESUMED (decision 32); on a lossy
/// path a fresh channel's handshake alone can take seconds (a lost SYN or SYN-ACK costs 1 s, and
/// Linux then starts the connection with a 3 s retransmission timeout), so that push must not
/// wait for one. A restarted backup is redialled within [`WARM_EVERY`].
pub(crate) async fn keep_warm(inner: std::sync::Weak<ServerInner>, to: ServerEntry) {
    loop {
        tokio::time::sleep(WARM_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&to.id)) * 2;
        let ping = Msg::Ping { t: 0 };
        // A pooled channel answers the probe (its peer may have died since); without one, a
        // fresh channel is dialled with time for TCP's own retransmissions.
        let ch = match inner.peer_pool.take(&to.id) {
            Some(ch) => ch,
            None => match dial(&inner, &to, WARM_DIAL).await {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::debug!(backup = %to.id, "keeping a channel warm: {e}");
                    continue;
                }
            },
        };
        match ask(&inner, ch, &ping, t, t, None).await {
            Ok((Msg::Pong { .. }, ch, rtt)) => {
                inner.peer_pool.sample(&to.id, rtt);
                inner.peer_pool.put(&to.id, ch);
            }
            Ok((other, _, _)) => {
                tracing::debug!(backup = %to.id, "keep-warm probe answered {}", other.name())
            }
            Err(e) => tracing::debug!(backup = %to.id, "keep-warm probe: {e}"),
        }
    }
}

/// Whether the other end of the socket `fd` closed it (its end of stream, or a reset, is
/// waiting): a destination that gave up on a FETCH drops the channel.
pub(crate) fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a non-blocking peek of at most one byte into a live buffer, on a socket this
    // channel owns (open for as long as the channel is).
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNRESET))
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin {addr}: {err}")]
    Channel { addr: String, err: ChannelError },
}

/// Client side of the admin channel: one request (`AdminDrain`, `AdminUndrain`, `AdminStatus`)
/// to the admin port `addr` of server `id` (the handshake names it, so a proof made for one
/// server's admin port is refused by every other port). Plain TCP: see [`admin_request_over`].
pub async fn admin_request(
    addr: &str,
    key: &ClusterKey,
    id: &str,
    req: Msg,
) -> Result<ServerStatus, AdminError> {
    admin_request_over(addr, key, None, id, req).await
}

/// [`admin_request`] over TLS when `tls` is given (a cluster with `[tls]`).
pub async fn admin_request_over(
    addr: &str,
    key: &ClusterKey,
    tls: Option<&ClientTls>,
    id: &str,
    req: Msg,
) -> Result<ServerStatus, AdminError> {
    AdminChannel::open(addr, key, tls, id)
        .await?
        .request(&req)
        .await
}

/// An authenticated admin channel to one server, for requests one after another (a drain's
/// status polls), so that each costs the server no handshake.
pub struct AdminChannel {
    addr: String,
    ch: Channel,
}

impl AdminChannel {
    /// Each request's and the opening's steps are bounded by this.
    const LIMIT: Duration = Duration::from_secs(5);

    /// Opens the channel to the admin port `addr` of server `id` (over TLS when `tls` is
    /// given).
    pub async fn open(
        addr: &str,
        key: &ClusterKey,
        tls: Option<&ClientTls>,
        id: &str,
    ) -> Result<Self, AdminError> {
        let opener = Opener {
            key,
            from: "admin",
            tls,
            hedge: mtcp_proto::trigger::MIN_RTO,
        };
        let ch = connect_authenticated(addr, opener, id, PortKind::Admin, ADMIN_FRAME, Self::LIMIT)
            .await
            .map_err(|err| AdminError::Channel {
                addr: addr.to_string(),
                err,
            })?;
        Ok(AdminChannel {
            addr: addr.to_string(),
            ch,
        })
    }

    /// One request (`AdminDrain`, `AdminUndrain`, `AdminStatus`) and the server's status after
    /// it.
    pub async fn request(&mut self, req: &Msg) -> Result<ServerStatus, AdminError> {
        let err = |err: ChannelError| AdminError::Channel {
            addr: self.addr.clone(),
            err,
        };
        let (reader, w) = &mut self.ch;
        w.write_msg(req).await.map_err(|e| err(e.into()))?;
        match reader.next_msg(Self::LIMIT).await.map_err(err)? {
            Msg::AdminStatusReply(s) => Ok(s),
            other => Err(err(ChannelError::Unexpected(other.name().to_string()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::peer_closed;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_channel_whose_destination_left_reads_as_closed() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut dest = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (here, _) = l.accept().unwrap();
        assert!(!peer_closed(here.as_raw_fd()), "open and quiet");
        dest.write_all(b"x").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!peer_closed(here.as_raw_fd()), "data waiting is not an end");
        let mut one = [0u8; 1];
        std::io::Read::read_exact(&mut &here, &mut one).unwrap();
        drop(dest);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(peer_closed(here.as_raw_fd()), "the other end closed");
    }
}
