//! Eager mode, a destination that cannot reach the origin: claims at the backups, the record
//! built from the newest replica, and the protection of the new epoch until the backups hold it.

use super::{claim_here, eager, push, MAX_REPLICA_TAIL};
use crate::config::ServerEntry;
use crate::peer;
use crate::registry::ServerInner;
use crate::replica::Claimed;
use mtcp_proto::push::{Attempt, Protect, ProtectStep, Protected};
use mtcp_proto::stream::{replica_for_client, Refusal, ServerStream};
use mtcp_proto::takeover::pick::Pick;
use mtcp_proto::wire::{Migrate, RefuseCode};
use mtcp_proto::StateRecord;
use std::sync::Arc;
use std::time::Instant;
/// Claims this destination made (or may have made: the answer was lost) at backups during a
/// takeover from a replica. Until the takeover is sure to succeed they are released on every
/// failure ([`Claims::release`]), so the next candidate can claim the connection (decision 32).
#[derive(Default)]
pub(crate) struct Claims {
    cid: Option<mtcp_proto::Cid>,
    epoch: u64,
    pub(crate) at: Vec<ServerEntry>,
}

impl Claims {
    /// Withdraws every claim before the refusal goes out, so the agent's next candidate finds
    /// the entries free (best effort, bounded by one answer bound per backup: a backup that
    /// cannot be reached keeps the claim, and the next candidate supersedes it).
    pub(crate) async fn release(self, inner: &Arc<ServerInner>) {
        let Some(cid) = self.cid else { return };
        if inner.limits.drop_releases {
            tracing::info!(target: "mtcp::eager", %cid, "test hook: the claims' releases are dropped");
            return;
        }
        for b in self.at {
            if b.id == inner.id {
                inner.replicas.release(cid, self.epoch, &inner.id);
            } else {
                let t = mtcp_proto::timing::answer_bound(&inner.peer_pool.rtt(&b.id));
                let _ = tokio::time::timeout(t, peer::release(inner, &b, cid, self.epoch)).await;
            }
        }
    }
}

/// A destination that cannot reach the origin: claims the connection at the origin's backups
/// and builds the record for the client's position from the newest replica. With no replica
/// anywhere, the connection restarts from its beginning when the agent still has everything
/// from there. On failure every claim made here is released again; on success the claims come
/// back, to be released if the takeover fails later before anything was served.
pub(crate) async fn take_from_replica(
    inner: &Arc<ServerInner>,
    origin: &ServerEntry,
    m: &Migrate,
) -> Result<(StateRecord, u64, Claims), Refusal> {
    let mut claims = Claims {
        cid: Some(m.cid),
        epoch: m.epoch,
        at: Vec::new(),
    };
    match claim_and_build(inner, origin, m, &mut claims).await {
        Ok((rec, n)) => Ok((rec, n, claims)),
        Err(e) => {
            tracing::warn!(target: "mtcp::eager", cid = %m.cid, epoch = m.epoch, "takeover from a replica failed ({e}); releasing its claims");
            claims.release(inner).await;
            Err(e)
        }
    }
}

async fn claim_and_build(
    inner: &Arc<ServerInner>,
    origin: &ServerEntry,
    m: &Migrate,
    claims: &mut Claims,
) -> Result<(StateRecord, u64), Refusal> {
    let mut pick = Pick::new(m.cid, m.epoch);
    for b in &inner.cluster.backups(&origin.id) {
        let r = if b.id == inner.id {
            claim_here(inner, m.cid, m.epoch, &inner.id, &m.holding).await
        } else {
            peer::claim(inner, b, m.cid, m.epoch, &m.holding).await
        };
        match r {
            Ok(Claimed::Record(bytes)) => {
                claims.at.push(b.clone());
                let rec = StateRecord::decode(&bytes)
                    .map_err(|e| Refusal::internal(format!("replica at {}: {e}", b.id)))?;
                pick.granted(&b.id, rec, bytes.len() as u64)?;
            }
            Ok(Claimed::Nothing) => {
                claims.at.push(b.clone());
                pick.granted_nothing();
            }
            Err(Refusal {
                code: RefuseCode::OriginUnreachable,
                reason: why,
            }) => {
                // The claim may have been granted with its answer lost: withdraw it too.
                claims.at.push(b.clone());
                pick.unreachable(why);
            }
            Err(e) => return Err(e),
        }
    }
    let (rec, size) = pick.finish(&origin.id)?;
    let rec = replica_for_client(rec, m.down_recv, &m.ranges(), m.up_base)?;
    Ok((rec, size))
}

/// After a takeover: push the restart point to this server's backups before the agent hears
/// RESUMED, so the connection survives this server from its first byte here (decision 32: the
/// move is not finished before the new epoch's restart point is on every backup). Tried again
/// and again, each attempt bounded by the measured round trip to the backup, for up to
/// [`mtcp_proto::timing::protect_bound`] (at least 3 s); a backup that stays unreachable that
/// long leaves the new epoch unconfirmed: the state stays in its keepers' custody and the
/// agent keeps upstream from the last confirmed point (decision 43) until the regular pushes
/// reach a backup. Returns `(out_off, in_off)` of what the backups hold, or `None` when
/// nothing was pushed; an error when a backup refuses the epoch: another destination
/// superseded this one (it fenced this epoch), which must then not resume.
pub(crate) async fn protect_takeover(
    inner: &Arc<ServerInner>,
    rec: &StateRecord,
    epoch: u64,
) -> Result<Option<(u64, u64)>, Refusal> {
    if !eager(inner) {
        return Ok(None);
    }
    if rec.tail.len() > MAX_REPLICA_TAIL {
        tracing::warn!(target: "mtcp::eager", cid = %rec.cid, "the taken-over connection's tail ({} bytes) exceeds the replica limit; unconfirmed until its next snapshot is pushed", rec.tail.len());
        return Ok(None);
    }
    let bytes = ServerStream::restarted_replica(rec, epoch).encode();
    let backups = inner.cluster.backups(&inner.id);
    let slowest = backups
        .iter()
        .map(|b| inner.peer_pool.rtt(&b.id))
        .max_by_key(mtcp_proto::timing::answer_bound)
        .unwrap_or_default();
    // Attempts overlap instead of replacing each other: an attempt that outlives its bound keeps
    // running (a lost SYN is retransmitted after 1 s, a record on a lossy path may need several
    // retransmission timeouts) while a fresh one starts beside it. The first to succeed wins
    // (`mtcp_proto::push::Protect`).
    let t0 = Instant::now();
    let mut p = Protect::new(t0, &slowest);
    let bound = p.bound();
    let mut last = String::new();
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        let wake = match p.poll(Instant::now()) {
            ProtectStep::GiveUp => break,
            ProtectStep::Start => {
                let (inner, bytes) = (inner.clone(), bytes.clone());
                inflight.spawn(async move { push(&inner, bytes).await });
                continue;
            }
            ProtectStep::Wait(d) => d,
        };
        tokio::select! {
            Some(r) = inflight.join_next(), if !inflight.is_empty() => {
                let attempt = match r {
                    Ok(Ok(())) => Attempt::Stored,
                    Ok(Err(e)) => {
                        let a = e.attempt();
                        last = e.why;
                        a
                    }
                    Err(e) => {
                        last = format!("push task: {e}");
                        Attempt::Lost
                    }
                };
                match p.on_attempt(Instant::now(), attempt) {
                    Some(Protected::Stored) => {
                        if p.tries() > 1 {
                            tracing::info!(target: "mtcp::eager", cid = %rec.cid, tries = p.tries(), took = ?t0.elapsed(), "taken-over connection protected on its backups");
                        }
                        return Ok(Some((rec.snap_out, rec.snap_in)));
                    }
                    Some(Protected::Fenced) => {
                        tracing::warn!(target: "mtcp::eager", cid = %rec.cid, epoch, "a backup refuses the taken-over connection's new epoch (superseded): {last}");
                        return Err(Refusal::stale_epoch(format!(
                            "epoch {epoch} was fenced by the next destination: {last}"
                        )));
                    }
                    // No process listens at a backup: waiting out the bound (seconds on a
                    // lossy path) protects nothing; the keepers and the agent keep the
                    // previous restart point meanwhile (decision 48).
                    Some(Protected::Down) => break,
                    None => {}
                }
            },
            _ = tokio::time::sleep(wake) => {}
        }
    }
    let tries = p.tries();
    if last.is_empty() {
        last = format!("{tries} overlapping attempt(s) unanswered");
    }
    tracing::warn!(target: "mtcp::eager", cid = %rec.cid, tries, "backups did not store the taken-over connection within {bound:?} ({last}); resuming unconfirmed (its keepers and the agent keep the previous restart point) until a push reaches them");
    Ok(None)
}
