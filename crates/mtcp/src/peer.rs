//! The peer channel (server ↔ server state transfer) and the admin channel (drain, status).
//!
//! Both start with mutual challenge–response authentication under the cluster key: the acceptor
//! sends a nonce, the opener answers with its own nonce and an HMAC over both nonces, its id,
//! the id of the server it means to reach and the port kind; the acceptor checks that the
//! proof names itself and this kind of port, and proves itself back over the same. Until then
//! frames are limited to a few KiB, so an unauthenticated peer can make us buffer nothing
//! large. After it, every frame both ways carries a MAC under a per-channel, per-direction key
//! with a sequence number (`mtcp_proto::channel`): a frame injected, altered, replayed or
//! reordered on the path ends the channel.

use crate::config::ServerEntry;
use crate::framed::{self, ChannelError, FrameReader, MacWriter};
use crate::gate::YieldAnswer;
use crate::movetrace::Role as TraceRole;
use crate::origin::{Fetch, Frozen};
use crate::replica::Claimed;
use crate::server::ServerInner;
use crate::stream::{ReadHalf, Stream, WriteHalf};
use crate::tls::ClientTls;
use mtcp_proto::wire::{HintReason, Msg, RefuseCode, ServerStatus};
use mtcp_proto::{ChannelContext, Cid, ClusterKey, PortKind, Role, StateRecord};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const AUTH_FRAME: usize = 4 << 10;
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
const ADMIN_FRAME: usize = 64 << 10;
/// A peer channel idle this long is closed (pooled channels are reopened on demand).
const IDLE: Duration = Duration::from_secs(300);

/// An authenticated peer or admin channel: frames in and out carry MACs.
pub type Channel = (FrameReader<ReadHalf>, MacWriter<WriteHalf>);

/// Acceptor side: preamble, challenge, check the opener's proof, prove ourselves; from then on
/// every frame both ways carries a MAC. `me` is this server's id and `kind` the port the
/// connection came in on: the opener's proof must name both. Returns the channel and the
/// opener's id.
async fn accept_authenticated(
    mut s: Stream,
    key: &ClusterKey,
    me: &str,
    kind: PortKind,
) -> Result<(Channel, String), ChannelError> {
    tokio::time::timeout(AUTH_TIMEOUT, framed::exchange_preamble(&mut s))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let (r, mut w) = s.into_split();
    let mut reader = FrameReader::new(r, AUTH_FRAME);
    let nonce: [u8; 16] = rand::random();
    framed::write_msg(&mut w, &Msg::PeerChallenge { nonce }).await?;
    let (from, to, theirs, proof) = match reader.next_msg(AUTH_TIMEOUT).await? {
        Msg::PeerAuth {
            from,
            to,
            nonce,
            proof,
        } => (from, to, nonce, proof),
        other => {
            return Err(ChannelError::Unexpected(format!(
                "expected authentication, got {}",
                other.name()
            )))
        }
    };
    let ctx = ChannelContext {
        kind,
        opener: &from,
        acceptor: me,
        acceptor_nonce: nonce,
        opener_nonce: theirs,
    };
    if let Err(e) = key.verify_opener(&ctx, &to, &proof) {
        let _ = framed::write_msg(
            &mut w,
            &Msg::Refused {
                code: RefuseCode::Unauthenticated,
                reason: e.to_string(),
            },
        )
        .await;
        return Err(ChannelError::Auth(e));
    }
    let proof = key.peer_accept_proof(&ctx);
    framed::write_msg(&mut w, &Msg::PeerAccept { proof }).await?;
    let (send, recv) = key.channel_macs(&ctx, Role::Acceptor);
    reader.set_mac(recv);
    Ok(((reader, MacWriter::new(w, send)), from))
}

/// Who opens a peer or admin channel: the cluster key, the id it authenticates as and, in a
/// cluster with TLS, the client side that checks the acceptor's certificate.
#[derive(Debug, Clone, Copy)]
pub struct Opener<'a> {
    pub key: &'a ClusterKey,
    pub from: &'a str,
    pub tls: Option<&'a ClientTls>,
}

/// Opener side: connects to `addr`, the `kind` port of server `to`, and authenticates as
/// `opener.from`; the channel's frames then carry MACs both ways. With TLS, the acceptor's
/// certificate must name `to` and be signed by the cluster CA, and the handshake below runs
/// inside TLS (decision 45).
pub async fn connect_authenticated(
    addr: &str,
    opener: Opener<'_>,
    to: &str,
    kind: PortKind,
    max_frame: usize,
    limit: Duration,
) -> Result<Channel, ChannelError> {
    let (key, from) = (opener.key, opener.from);
    let s = tokio::time::timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let _ = s.set_nodelay(true);
    let mut s = match opener.tls {
        None => Stream::Tcp(s),
        Some(tls) => {
            let name =
                crate::tls::name_of_id(to).map_err(|e| ChannelError::Unexpected(e.to_string()))?;
            tokio::time::timeout(limit, tls.connect(name, s))
                .await
                .map_err(|_| ChannelError::Timeout)??
        }
    };
    tokio::time::timeout(limit, framed::exchange_preamble(&mut s))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let (r, mut w) = s.into_split();
    let mut reader = FrameReader::new(r, AUTH_FRAME);
    let theirs = match reader.next_msg(limit).await? {
        Msg::PeerChallenge { nonce } => nonce,
        // E.g. a TLS port's answer to a plain client.
        Msg::Refused { reason, .. } => {
            return Err(ChannelError::Unexpected(format!("refused: {reason}")))
        }
        _ => return Err(ChannelError::Unexpected("expected a challenge".into())),
    };
    let nonce: [u8; 16] = rand::random();
    let ctx = ChannelContext {
        kind,
        opener: from,
        acceptor: to,
        acceptor_nonce: theirs,
        opener_nonce: nonce,
    };
    let proof = key.peer_proof(&ctx);
    framed::write_msg(
        &mut w,
        &Msg::PeerAuth {
            from: from.to_string(),
            to: to.to_string(),
            nonce,
            proof,
        },
    )
    .await?;
    match reader.next_msg(limit).await? {
        Msg::PeerAccept { proof } if key.check_peer_accept_proof(&ctx, &proof) => {}
        Msg::PeerAccept { .. } => {
            return Err(ChannelError::Unexpected(format!(
                "{addr} failed to prove the cluster key as the {kind} port of {to}"
            )))
        }
        Msg::Refused { reason, .. } => {
            return Err(ChannelError::Unexpected(format!("refused: {reason}")))
        }
        other => {
            return Err(ChannelError::Unexpected(format!(
                "expected acceptance, got {}",
                other.name()
            )))
        }
    }
    reader.set_max_frame(max_frame);
    let (send, recv) = key.channel_macs(&ctx, Role::Opener);
    reader.set_mac(recv);
    Ok((reader, MacWriter::new(w, send)))
}

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
    };
    connect_authenticated(
        &to.peer,
        opener,
        &to.id,
        PortKind::Peer,
        inner.limits.max_record + crate::direct::MAX_TCP_STATE + 1024,
        limit,
    )
    .await
}

/// The test hooks `Limits::peer_delay` and `peer_loss`: what a peer-channel message waits
/// before it is written (emulated path delay and retransmissions on loopback).
async fn emulated_path(inner: &ServerInner) {
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
async fn emulated_hold(inner: &ServerInner) {
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
) -> Result<(Frozen, u64), (RefuseCode, String)> {
    let req = Msg::Fetch {
        cid: f.cid,
        epoch: f.epoch,
        down_recv: f.down_recv,
        sum_from: f.sum_from,
        down_sum: f.down_sum,
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
        (
            RefuseCode::OriginUnreachable,
            format!("origin {} ({}): {e}", origin.id, origin.peer),
        )
    })?;
    crate::movetrace::step(TraceRole::Destination, f.cid, "state_rx");
    // The frame was bounded before it was read; the record in it is held to max_record before
    // it is decoded (decoding costs about 1.6 times its size again).
    let fits = |len: usize| {
        mtcp_proto::bounds::record_fits(len, inner.limits.max_record)
            .map_err(|e| (RefuseCode::TooLarge, format!("origin {}: {e}", origin.id)))
    };
    match msg {
        Msg::State(b) if b.len() > inner.limits.max_record => Err(fits(b.len()).unwrap_err()),
        Msg::DirectState { record, .. } if record.len() > inner.limits.max_record => {
            Err(fits(record.len()).unwrap_err())
        }
        Msg::State(b) => StateRecord::decode(&b)
            .map(|rec| (Frozen { rec, tcp: None }, b.len() as u64))
            .map_err(|e| (RefuseCode::Internal, format!("origin {}: {e}", origin.id))),
        Msg::DirectState { record, tcp, fence } => StateRecord::decode(&record)
            .map(|rec| {
                let n = (record.len() + tcp.len()) as u64;
                (
                    Frozen {
                        rec,
                        tcp: Some(crate::origin::DirectTcp { tcp, fence }),
                    },
                    n,
                )
            })
            .map_err(|e| (RefuseCode::Internal, format!("origin {}: {e}", origin.id))),
        Msg::Refused { code, reason } => Err((code, format!("origin {}: {reason}", origin.id))),
        other => Err((
            RefuseCode::Internal,
            format!("origin {} answered {}", origin.id, other.name()),
        )),
    }
}

/// Eager mode: stores an encoded record at backup `to`.
pub(crate) async fn replicate(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    rec: Vec<u8>,
) -> Result<(), ReplicateError> {
    let t = inner.limits.fetch_timeout;
    let err = |code, why| ReplicateError {
        code,
        why,
        taken: None,
        down: false,
    };
    match call(inner, to, &Msg::Replicate(rec), t, t).await {
        Ok(Msg::ReplicaStored { .. }) => Ok(()),
        Ok(Msg::Taken {
            cid,
            epoch,
            by,
            label,
        }) => Err(ReplicateError {
            code: Some(RefuseCode::StaleEpoch),
            why: format!(
                "{}: connection {cid} at epoch {epoch} was taken over by {by}",
                to.id
            ),
            taken: Some(mtcp_proto::custody::Custody {
                epoch,
                holder: by,
                label,
            }),
            down: false,
        }),
        Ok(Msg::Refused { code, reason }) => Err(err(
            Some(code),
            format!("{} refused ({code:?}): {reason}", to.id),
        )),
        Ok(other) => Err(err(None, format!("{} answered {}", to.id, other.name()))),
        Err(e) => Err(ReplicateError {
            down: matches!(&e, ChannelError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused),
            ..err(None, format!("{} ({}): {e}", to.id, to.peer))
        }),
    }
}

/// Why a REPLICATE failed.
pub(crate) struct ReplicateError {
    pub code: Option<RefuseCode>,
    pub why: String,
    /// A destination took the connection over from that backup's replica (TAKEN).
    pub taken: Option<mtcp_proto::custody::Custody>,
    /// The backup's peer port refused the connection: no server process runs there.
    pub down: bool,
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
) -> Result<Claimed, (RefuseCode, String)> {
    let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&to.id)) * 2;
    claim_msg(inner, to, &Msg::ClaimReplica { cid, epoch }, t).await
}

/// Eager mode: fences epoch `epoch` of `cid` at backup `to`: a plain claim (see
/// [`crate::eager::fence`]). Answered as [`claim`]. Twice the answer bound: the backup may
/// first ask a candidate holding the epoch to give it up ([`crate::eager::fence_here`]).
pub(crate) async fn fence(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    cid: Cid,
    epoch: u64,
) -> Result<Claimed, (RefuseCode, String)> {
    let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&to.id)) * 2;
    claim_msg(inner, to, &Msg::FenceEpoch { cid, epoch }, t).await
}

/// Eager mode: asks `to`, the holder of a connection's state, to give up `epoch` (see
/// [`crate::eager::ask_to_yield`]). An error: not reached.
pub(crate) async fn ask_yield(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    cid: Cid,
    epoch: u64,
) -> Result<YieldAnswer, String> {
    let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&to.id));
    match call(inner, to, &Msg::Yield { cid, epoch }, t, t).await {
        Ok(Msg::State(b)) if b.is_empty() => Ok(YieldAnswer::Unanswered),
        Ok(Msg::State(_)) => Ok(YieldAnswer::LetGo),
        Ok(Msg::Refused { .. }) => Ok(YieldAnswer::Refused),
        Ok(other) => Err(format!("answered {}", other.name())),
        Err(e) => Err(e.to_string()),
    }
}

async fn claim_msg(
    inner: &Arc<ServerInner>,
    to: &ServerEntry,
    m: &Msg,
    t: Duration,
) -> Result<Claimed, (RefuseCode, String)> {
    match call(inner, to, m, t, t).await {
        Ok(Msg::State(b)) if b.is_empty() => Ok(Claimed::Nothing),
        Ok(Msg::State(b)) => Ok(Claimed::Record(b)),
        Ok(Msg::Refused { code, reason }) => Err((code, format!("backup {}: {reason}", to.id))),
        Ok(other) => Err((
            RefuseCode::Internal,
            format!("backup {} answered {}", to.id, other.name()),
        )),
        Err(e) => Err((
            RefuseCode::OriginUnreachable,
            format!("backup {} ({}): {e}", to.id, to.peer),
        )),
    }
}

/// Eager mode: withdraws this server's claim on `cid` at `epoch` at backup `to` (best effort):
/// the takeover failed before anything was served, so the next candidate may claim it.
pub(crate) async fn release(inner: &Arc<ServerInner>, to: &ServerEntry, cid: Cid, epoch: u64) {
    let t = inner.limits.fetch_timeout;
    match call(inner, to, &Msg::ReleaseClaim { cid, epoch }, t, t).await {
        Ok(Msg::ReplicaStored { .. }) => {}
        Ok(other) => {
            tracing::warn!(%cid, backup = %to.id, "releasing the claim: answered {}", other.name())
        }
        Err(e) => tracing::warn!(%cid, backup = %to.id, "could not release the claim: {e}"),
    }
}

/// Eager mode: tells backup `to` the connection ended (best effort).
pub(crate) async fn drop_replica(inner: &Arc<ServerInner>, to: &ServerEntry, cid: Cid, epoch: u64) {
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

/// Idle authenticated channels to other servers, by server id, and the round-trip estimate
/// towards each (time to a peer's immediate first answer).
#[derive(Default)]
pub(crate) struct PeerPool {
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Channel>>>,
    rtts: std::sync::Mutex<std::collections::HashMap<String, mtcp_proto::trigger::Rtt>>,
}

impl PeerPool {
    /// The RTT estimate towards server `id` (empty before the first answer).
    pub(crate) fn rtt(&self, id: &str) -> mtcp_proto::trigger::Rtt {
        self.rtts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or_default()
    }

    fn sample(&self, id: &str, d: Duration) {
        self.rtts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .sample(d);
    }

    /// Channels kept per peer.
    const MAX_IDLE: usize = 4;

    fn take(&self, id: &str) -> Option<Channel> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)?
            .pop()
    }

    fn put(&self, id: &str, ch: Channel) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let v = idle.entry(id.to_string()).or_default();
        if v.len() < Self::MAX_IDLE {
            v.push(ch);
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

/// Serves one connection on the peer port.
pub(crate) async fn serve_peer(inner: Arc<ServerInner>, s: Stream) {
    let addr = s
        .tcp()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let fd = std::os::fd::AsRawFd::as_raw_fd(s.tcp());
    let ((mut reader, mut w), from) =
        match accept_authenticated(s, &inner.cluster.key, &inner.id, PortKind::Peer).await {
            Ok(x) => x,
            Err(e) => {
                if let Some(suppressed) = crate::session::noisy_event_admitted() {
                    tracing::warn!(peer = %addr, suppressed, "peer port: {e}; closing");
                }
                return;
            }
        };
    if inner.cluster.server(&from).is_none() {
        tracing::warn!(peer = %addr, "peer port: {from:?} is not a server of the cluster; closing");
        return;
    }
    // Replicas carry a snapshot and at most a small output tail.
    reader.set_max_frame(inner.limits.max_snapshot + crate::eager::MAX_REPLICA_TAIL + 4096);
    loop {
        // Held from a FETCH until its reply is acknowledged (see `ServerInner::handing_over`).
        let mut handover: Option<HandingOver> = None;
        // The connection a FETCH here is moving, for its trace (`crate::movetrace`).
        let mut traced: Option<Cid> = None;
        let reply = match reader.next_msg(IDLE).await {
            Ok(Msg::Fetch {
                cid,
                epoch,
                down_recv,
                sum_from,
                down_sum,
            }) => {
                handover = Some(HandingOver::new(&inner));
                crate::movetrace::open(TraceRole::Origin, cid, epoch, "fetch_rx");
                traced = Some(cid);
                // Tell the destination we are alive before a lock_state section may delay us.
                emulated_path(&inner).await;
                if w.write_msg(&Msg::Working).await.is_err() {
                    return;
                }
                crate::movetrace::step(TraceRole::Origin, cid, "working_tx");
                let f = Fetch {
                    cid,
                    epoch,
                    down_recv,
                    sum_from,
                    down_sum,
                };
                // At most `max_handovers` connections frozen and encoded at once (each record
                // may be up to `max_record`); over the cap, refused after a short wait and the
                // connection stays served here.
                let slot = inner
                    .handovers
                    .take(
                        inner.limits.max_handovers,
                        inner.limits.handover_wait,
                        mtcp_proto::bounds::admit_handover,
                    )
                    .await;
                match slot {
                    Err(why) => {
                        crate::metrics::refused(RefuseCode::Busy);
                        tracing::warn!(%cid, by = %from, "FETCH refused: {why}");
                        Msg::Refused {
                            code: RefuseCode::Busy,
                            reason: format!("origin {}: {why}", inner.id),
                        }
                    }
                    Ok(_slot) => {
                        emulated_hold(&inner).await;
                        // A destination that gave up on this FETCH closed the channel.
                        let waiting = || !peer_closed(fd);
                        crate::movetrace::step(TraceRole::Origin, cid, "slot");
                        let r = crate::eager::hand_over(&inner, &f, &from, &waiting).await;
                        crate::movetrace::step(TraceRole::Origin, cid, "frozen");
                        let encode = |rec: StateRecord| {
                            let b = rec.encode();
                            crate::movetrace::step(TraceRole::Origin, cid, "encoded");
                            b
                        };
                        match r {
                            Ok(Frozen { rec, tcp: None }) => Msg::State(encode(rec)),
                            Ok(Frozen {
                                rec,
                                tcp: Some(crate::origin::DirectTcp { tcp, fence }),
                            }) => Msg::DirectState {
                                record: encode(rec),
                                tcp,
                                fence,
                            },
                            Err((code, reason)) => Msg::Refused { code, reason },
                        }
                    }
                }
            }
            Ok(Msg::Replicate(rec)) => match inner.replicas.store_or_taken(&from, rec) {
                Ok((cid, epoch, out_off)) => Msg::ReplicaStored {
                    cid,
                    epoch,
                    out_off,
                },
                Err((_, Some((cid, c)))) => {
                    tracing::warn!(peer = %from, %cid, epoch = c.epoch, by = %c.holder, "replica refused: taken over from here");
                    Msg::Taken {
                        cid,
                        epoch: c.epoch,
                        by: c.holder,
                        label: c.label,
                    }
                }
                Err(((code, reason), None)) => {
                    tracing::warn!(peer = %from, "replica refused: {reason}");
                    Msg::Refused { code, reason }
                }
            },
            Ok(Msg::ClaimReplica { cid, epoch }) => {
                match crate::eager::claim_here(&inner, cid, epoch, &from).await {
                    Ok(Claimed::Record(b)) => {
                        tracing::info!(%cid, epoch, by = %from, "replica claimed");
                        Msg::State(b)
                    }
                    Ok(Claimed::Nothing) => Msg::State(Vec::new()),
                    Err((code, reason)) => Msg::Refused { code, reason },
                }
            }
            Ok(Msg::Yield { cid, epoch }) => match inner.give_up(cid, epoch) {
                YieldAnswer::Unanswered => {
                    tracing::info!(%cid, epoch, keeper = %from, "epoch given up before RESUMED went out");
                    Msg::State(Vec::new())
                }
                YieldAnswer::LetGo => {
                    tracing::info!(%cid, epoch, keeper = %from, "epoch given up after RESUMED went out (the agent never used it)");
                    Msg::State(vec![1])
                }
                YieldAnswer::Refused => Msg::Refused {
                    code: RefuseCode::StaleEpoch,
                    reason: format!(
                        "server {} already answered the agent for epoch {epoch} of {cid}",
                        inner.id
                    ),
                },
            },
            Ok(Msg::FenceEpoch { cid, epoch }) => {
                match crate::eager::fence_here(&inner, cid, epoch, &from).await {
                    Ok(Claimed::Record(b)) => {
                        tracing::info!(%cid, epoch, by = %from, "epoch fenced (its replica handed to the keeper)");
                        Msg::State(b)
                    }
                    Ok(Claimed::Nothing) => Msg::State(Vec::new()),
                    Err((code, reason)) => Msg::Refused { code, reason },
                }
            }
            Ok(Msg::ReleaseClaim { cid, epoch }) => {
                if inner.replicas.release(cid, epoch, &from) {
                    tracing::info!(%cid, epoch, by = %from, "claim released (the takeover failed)");
                }
                Msg::ReplicaStored {
                    cid,
                    epoch,
                    out_off: 0,
                }
            }
            // A keep-warm probe (see [`keep_warm`]): answered at once.
            Ok(Msg::Ping { t }) => Msg::Pong { t },
            Ok(Msg::DropReplica { cid, epoch }) => {
                inner.replicas.drop_upto(cid, epoch, &from);
                inner.custody.confirmed(cid, epoch, &from);
                Msg::ReplicaStored {
                    cid,
                    epoch,
                    out_off: 0,
                }
            }
            Ok(other) => {
                tracing::warn!(peer = %from, "peer port: unexpected {}; closing", other.name());
                return;
            }
            Err(ChannelError::Closed) => return,
            Err(e) => {
                tracing::warn!(peer = %from, "peer port: {e}; closing");
                return;
            }
        };
        emulated_path(&inner).await;
        if w.write_msg(&reply).await.is_err() {
            return;
        }
        if let (Some(cid), Msg::State(_) | Msg::DirectState { .. }) = (traced, &reply) {
            crate::movetrace::finish(TraceRole::Origin, cid, "state_tx");
        }
        if handover.is_some() {
            acknowledged(w.get_ref(), HANDOVER_ACK_WAIT).await;
        }
        drop(handover);
    }
}

/// Longest wait for a handed-over state record to be acknowledged by the destination.
const HANDOVER_ACK_WAIT: Duration = Duration::from_secs(2);

/// Counts one hand-over in [`ServerInner::handing_over`] while it lives.
struct HandingOver(Arc<ServerInner>);

impl HandingOver {
    fn new(inner: &Arc<ServerInner>) -> Self {
        inner.handing_over.fetch_add(1, Ordering::Relaxed);
        HandingOver(inner.clone())
    }
}

impl Drop for HandingOver {
    fn drop(&mut self) {
        self.0.handing_over.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits (at most `limit`) until everything written to `w` has been acknowledged by the peer's
/// kernel (the send queue is empty): from then on the bytes survive this process's death.
async fn acknowledged(w: &WriteHalf, limit: Duration) {
    use std::os::fd::AsRawFd;
    let fd = w.as_raw_fd();
    let t0 = Instant::now();
    loop {
        let mut outq: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int; `fd` is the live socket `w` borrows.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) };
        if r < 0 || outq <= 0 || t0.elapsed() >= limit {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves one connection on the admin port.
pub(crate) async fn serve_admin(inner: Arc<ServerInner>, s: Stream) {
    let addr = s
        .tcp()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let ((mut reader, mut w), from) =
        match accept_authenticated(s, &inner.cluster.key, &inner.id, PortKind::Admin).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(peer = %addr, "admin port: {e}; closing");
                return;
            }
        };
    reader.set_max_frame(ADMIN_FRAME);
    loop {
        match reader.next_msg(IDLE).await {
            Ok(Msg::AdminDrain) => {
                tracing::info!(by = %from, "draining: hinting every connection away");
                inner.draining.store(true, Ordering::Relaxed);
                inner.hint_all(HintReason::Drain);
            }
            Ok(Msg::AdminUndrain) => inner.draining.store(false, Ordering::Relaxed),
            Ok(Msg::AdminStatus) => {
                if inner.draining.load(Ordering::Relaxed) {
                    // Hints can be lost with a session that breaks; repeat them (each at
                    // most once a second).
                    inner.rehint_all(HintReason::Drain);
                }
            }
            Ok(other) => {
                tracing::warn!(peer = %addr, "admin port: unexpected {}; closing", other.name());
                return;
            }
            Err(ChannelError::Closed) => return,
            Err(e) => {
                tracing::warn!(peer = %addr, "admin port: {e}; closing");
                return;
            }
        }
        if w.write_msg(&Msg::AdminStatusReply(inner.status()))
            .await
            .is_err()
        {
            return;
        }
    }
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
    let err = |err: ChannelError| AdminError::Channel {
        addr: addr.to_string(),
        err,
    };
    let lim = Duration::from_secs(5);
    let opener = Opener {
        key,
        from: "admin",
        tls,
    };
    let (mut reader, mut w) =
        connect_authenticated(addr, opener, id, PortKind::Admin, ADMIN_FRAME, lim)
            .await
            .map_err(err)?;
    w.write_msg(&req).await.map_err(|e| err(e.into()))?;
    match reader.next_msg(lim).await.map_err(err)? {
        Msg::AdminStatusReply(s) => Ok(s),
        other => Err(err(ChannelError::Unexpected(other.name().to_string()))),
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
