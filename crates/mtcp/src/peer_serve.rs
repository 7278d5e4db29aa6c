//! Serving the peer port (FETCH, REPLICATE, CLAIMREPLICA, FENCEEPOCH, YIELD, …: the state
//! transfer between servers) and the admin port (drain, status), once a channel is
//! authenticated.

use crate::framed::ChannelError;
use crate::movetrace::Role as TraceRole;
use crate::origin::{Fetch, Frozen};
use crate::peer::{
    accept_authenticated, emulated_hold, emulated_path, peer_closed, ADMIN_FRAME, IDLE,
};
use crate::registry::ServerInner;
use crate::replica::Claimed;
use crate::stream::{Stream, WriteHalf};
use mtcp_proto::answers;
use mtcp_proto::custody::YieldAnswer;
use mtcp_proto::peering::{self, Screened};
use mtcp_proto::wire::{Msg, RefuseCode};
use mtcp_proto::{Cid, PortKind, StateRecord};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
/// Serves one connection on the peer port.
pub(crate) async fn serve_peer(inner: Arc<ServerInner>, s: Stream, addr: SocketAddr) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(s.tcp());
    let ((mut reader, mut w), from) = match accept_authenticated(
        s,
        &inner.cluster.key,
        &inner.id,
        PortKind::Peer,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            if let Some(suppressed) = crate::session_io::noisy_event_admitted() {
                tracing::warn!(target: "mtcp::peer", peer = %addr, suppressed, "peer port: {e}; closing");
            }
            return;
        }
    };
    if let Err(e) = peering::admit_opener(&from, inner.cluster.server(&from).is_some()) {
        tracing::warn!(target: "mtcp::peer", peer = %addr, "peer port: {e}; closing");
        return;
    }
    // Replicas carry a snapshot and at most a small output tail.
    reader.set_max_frame(inner.limits.max_snapshot + crate::eager::MAX_REPLICA_TAIL + 4096);
    loop {
        // Held from a FETCH until its reply is acknowledged (see `ServerInner::handing_over`).
        let mut handover: Option<HandingOver> = None;
        // The connection a FETCH here is moving, for its trace (`crate::movetrace`).
        let mut traced: Option<Cid> = None;
        let msg = match reader.next_msg(IDLE).await {
            Ok(m) => m,
            Err(ChannelError::Closed) => return,
            Err(e) => {
                tracing::warn!(target: "mtcp::peer", peer = %from, "peer port: {e}; closing");
                return;
            }
        };
        let is_server = |id: &str| inner.cluster.server(id).is_some();
        let msg = match peering::screen(&msg, is_server) {
            Ok(Screened::Serve) => Ok(msg),
            Ok(Screened::Refuse(r)) => Err(Msg::from(r)),
            Err(e) => {
                tracing::warn!(target: "mtcp::peer", peer = %from, "peer port: {e}; closing");
                return;
            }
        };
        let reply = match msg {
            Err(refused) => refused,
            Ok(Msg::Fetch {
                cid,
                epoch,
                down_recv,
                sum_from,
                down_sum,
                holding,
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
                    holding,
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
                        tracing::warn!(target: "mtcp::peer", %cid, by = %from, "FETCH refused: {why}");
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
                            Ok(Frozen { rec, tcp }) => answers::state_msg(encode(rec), tcp),
                            Err(r) => Msg::from(r),
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
                    tracing::warn!(target: "mtcp::peer", peer = %from, %cid, epoch = c.epoch, by = %c.holder, "replica refused: taken over from here");
                    Msg::Taken {
                        cid,
                        epoch: c.epoch,
                        by: c.holder,
                        label: c.label,
                    }
                }
                Err((r, None)) => {
                    tracing::warn!(target: "mtcp::peer", peer = %from, "replica refused: {}", r.reason);
                    Msg::from(r)
                }
            },
            Ok(Msg::ClaimReplica {
                cid,
                epoch,
                holding,
            }) => match crate::eager::claim_here(&inner, cid, epoch, &from, &holding).await {
                Ok(Claimed::Record(b)) => {
                    tracing::info!(target: "mtcp::peer", %cid, epoch, by = %from, "replica claimed");
                    Msg::State(b)
                }
                Ok(Claimed::Nothing) => Msg::State(Vec::new()),
                Err(r) => Msg::from(r),
            },
            Ok(Msg::Yield {
                cid,
                epoch,
                attempt,
            }) => {
                let answer = inner.give_up(cid, epoch, attempt);
                match answer {
                    YieldAnswer::Unanswered => {
                        tracing::info!(target: "mtcp::peer", %cid, epoch, keeper = %from, "epoch given up before RESUMED went out");
                    }
                    YieldAnswer::LetGo(_) => {
                        tracing::info!(target: "mtcp::peer", %cid, epoch, keeper = %from, "epoch given up after RESUMED went out (the agent never used it)");
                    }
                    YieldAnswer::Refused => {}
                }
                answer.to_msg(&inner.id, cid, epoch)
            }
            Ok(Msg::FenceEpoch {
                cid,
                epoch,
                by,
                holding,
            }) => match crate::eager::fence_here(&inner, cid, epoch, &by, &holding).await {
                Ok(Claimed::Record(b)) => {
                    tracing::info!(target: "mtcp::peer", %cid, epoch, by = %by, from = %from, "epoch fenced (its replica handed to the fencer)");
                    Msg::State(b)
                }
                Ok(Claimed::Nothing) => Msg::State(Vec::new()),
                Err(r) => Msg::from(r),
            },
            Ok(Msg::ReleaseClaim { cid, epoch }) => {
                if inner.replicas.release(cid, epoch, &from) {
                    tracing::info!(target: "mtcp::peer", %cid, epoch, by = %from, "claim released (the takeover failed)");
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
            // Screened out above.
            Ok(other) => {
                tracing::warn!(target: "mtcp::peer", peer = %from, "peer port: unexpected {}; closing", other.name());
                return;
            }
        };
        emulated_path(&inner).await;
        if w.write_msg(&reply).await.is_err() {
            return;
        }
        if let (Some(cid), Msg::State(_) | Msg::DirectState { .. } | Msg::HandedState { .. }) =
            (traced, &reply)
        {
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
pub(crate) async fn serve_admin(inner: Arc<ServerInner>, s: Stream, addr: SocketAddr) {
    use mtcp_proto::admin::Request;
    let ((mut reader, mut w), from) =
        match accept_authenticated(s, &inner.cluster.key, &inner.id, PortKind::Admin).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target: "mtcp::peer", peer = %addr, "admin port: {e}; closing");
                return;
            }
        };
    reader.set_max_frame(ADMIN_FRAME);
    loop {
        let request = match reader.next_msg(IDLE).await {
            Ok(m) => mtcp_proto::admin::request(&m),
            Err(ChannelError::Closed) => return,
            Err(e) => {
                tracing::warn!(target: "mtcp::peer", peer = %addr, "admin port: {e}; closing");
                return;
            }
        };
        match request {
            Ok(Request::Drain) => {
                tracing::info!(target: "mtcp::peer", by = %from, "draining: hinting every connection away");
                inner.drain();
            }
            Ok(Request::Undrain) => inner.undrain(),
            Ok(Request::Status) => {}
            Err(e) => {
                tracing::warn!(target: "mtcp::peer", peer = %addr, "admin port: {e}; closing");
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
