//! A MIGRATE's takeover at the destination: check the token and the epoch, get the state record
//! from the origin (or a backup's replica), check it, restart the connection here.

use crate::conn_state::Confirm;
use crate::conn_state::{Shared, Start};
use crate::framed::Out;
use crate::movetrace::Role;
use crate::origin::Fetch;
use crate::peer;
use crate::registry::ServerInner;
use mtcp_proto::stream::Refusal;
use mtcp_proto::takeover as core;
use mtcp_proto::takeover::wait::{Event, Outcome, StateWait, Wait};
use mtcp_proto::wire::{Migrate, RefuseCode, Resumed};
use mtcp_proto::StateRecord;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// MIGRATE: check the token, get the state record from the origin, restart here. `agent`: the
/// socket of the session the MIGRATE came on (the agent closes it when it gives up on us).
pub(crate) async fn take_over(
    inner: &Arc<ServerInner>,
    m: &Migrate,
    tx: mpsc::UnboundedSender<Out>,
    agent: std::os::fd::RawFd,
) -> Result<(Arc<Shared>, Start, Resumed, Option<DirectSock>), Refusal> {
    let token_ok = inner.cluster.key.check_token(m.cid, m.epoch, &m.token);
    core::admit(
        m,
        token_ok,
        inner.draining.load(Ordering::Relaxed),
        &inner.id,
    )?;
    crate::movetrace::step(Role::Destination, m.cid, "admitted");
    crate::eager::test_delay(inner).await;
    // Counted from here to the end of the takeover, refused or not.
    // (A drain moves every connection at once: the MIGRATEs over the cap wait their turn,
    // answered WORKING meanwhile, instead of failing.)
    let _slot = inner
        .takeovers
        .take(
            inner.limits.max_takeovers,
            inner.limits.takeover_wait,
            mtcp_proto::bounds::admit_takeover,
        )
        .await
        .map_err(|why| Refusal::busy(format!("server {}: {why}", inner.id)))?;
    crate::movetrace::step(Role::Destination, m.cid, "slot");
    // Our own copy, taken over for a MIGRATE the agent gave up on (decision 73)? It is then
    // frozen here, at the epoch it is served at. Its log need not reach back to where the
    // agent's checksum range starts (its stream began at that takeover, and the agent, which
    // never read its RESUMED, kept its range): the claim over that range is the one this copy
    // was checked against when it was made (the same position and sums: the agent received
    // nothing since), so only the position is checked again here.
    let own = own_successor(inner, m);
    let (origin_id, epoch, sum_from, down_sum) = match own {
        Some(serving) => {
            tracing::info!(cid = %m.cid, epoch = m.epoch, serving, "the agent comes back for the epoch this server took the connection over from, resumed to nobody: re-attaching it here");
            (
                &inner.id,
                serving,
                m.down_recv,
                mtcp_proto::sum::checksum(&[]),
            )
        }
        None => (&m.origin, m.epoch, m.sum_from, m.down_sum),
    };
    let origin = core::check_origin(m, inner.cluster.server(origin_id).cloned())?;
    let f = Fetch {
        cid: m.cid,
        epoch,
        down_recv: m.down_recv,
        sum_from,
        down_sum,
        holding: m.holding.clone(),
    };
    let (rec, tcp, state_bytes, claims) = fetch_or_replica(inner, &origin, m, &f, agent).await?;
    // A record labelled past the MIGRATE's epoch came from a keeper's custody (decision 43):
    // a restart point, as from a replica, for the client's position now — unless it is our own
    // copy's, frozen here just now at the client's position: exact, as for any re-attach.
    let restart = match own {
        Some(_) => core::check_record(m, &rec, tcp.is_some()).map(|()| (rec, false)),
        None => core::restart_record(m, rec, claims.is_some(), tcp.is_some()),
    };
    let (rec, from_replica) = match restart {
        Ok(x) => x,
        Err(e) => {
            // A record that does not fit withdraws the claims made for it.
            if let Some(c) = claims {
                tracing::warn!(cid = %m.cid, "takeover refused after claiming ({e}); releasing the claims");
                c.release(inner).await;
            }
            return Err(e);
        }
    };
    let keepers = Confirm {
        cid: Some(m.cid),
        epoch: m.epoch,
        to: match &claims {
            Some(c) => c.at.clone(),
            None => vec![origin.clone()],
        },
    };
    crate::movetrace::step(Role::Destination, m.cid, "record_checked");
    let r = take_over_checked(inner, m, rec, tcp, state_bytes, from_replica, tx, keepers).await;
    if r.is_err() {
        if let Some(c) = claims {
            c.release(inner).await;
        }
    }
    r
}

/// The epoch this server serves `m`'s connection at, when [`core::reattaches_own`] says its
/// own copy serves the MIGRATE.
fn own_successor(inner: &Arc<ServerInner>, m: &Migrate) -> Option<u64> {
    let shared = inner.get(&m.cid)?;
    let st = shared.lock();
    let eager = crate::eager::eager(inner);
    core::reattaches_own(m, eager, st.epoch, st.phase().serves(), st.resumed_for)
        .then_some(st.epoch)
}

/// The state record of the connection for the MIGRATE `m`: from the origin, or in eager mode,
/// when the origin does not answer within `origin_wait`, from a replica at its backups (with
/// the claims made there). The FETCH sent to a silent origin is not given up on: the origin
/// may have frozen the connection, fenced its backups and sent the state with a segment lost
/// on the way — the connection then exists only in that answer. So when the replica cannot
/// be had, the destination keeps reading the origin's answer
/// ([`mtcp_proto::timing::origin_grace`]). The order and every bound are
/// [`StateWait`]'s; this function only waits and reports.
pub(crate) async fn fetch_or_replica(
    inner: &Arc<ServerInner>,
    origin: &crate::config::ServerEntry,
    m: &Migrate,
    f: &Fetch,
    agent: std::os::fd::RawFd,
) -> Result<
    (
        StateRecord,
        Option<crate::origin::DirectTcp>,
        u64,
        Option<crate::eager::Claims>,
    ),
    Refusal,
> {
    if origin.id == inner.id {
        // Local re-attach: nothing crosses the network; the size is what it would have been.
        // Handed out only while the agent still waits on its MIGRATE: a re-attach it gave up on
        // (its turn at the custody came late) would otherwise supersede the holder the agent
        // has just resumed with, and the connection would be lost (found by the simulation,
        // decision 52's `LateHandOut`).
        let waiting = || !peer::peer_closed(agent);
        let fr = crate::eager::hand_over(inner, f, &inner.id, &waiting).await?;
        let size = (fr.rec.encode().len() + fr.tcp.as_ref().map_or(0, |d| d.len())) as u64;
        return Ok((fr.rec, fr.tcp, size, None));
    }
    let answered = AtomicBool::new(false);
    let fetch = peer::fetch(inner, origin, f, &answered);
    tokio::pin!(fetch);
    let to_origin = inner.peer_pool.rtt(&origin.id);
    let first = mtcp_proto::timing::origin_wait(inner.cluster.origin_wait, &to_origin);
    let eager = crate::eager::eager(inner);
    let mut plan = StateWait::new(eager, first, to_origin, peer::fetch_bound(inner));
    // What the origin and the replica answered; the plan says which one ends the takeover.
    let mut from_origin = None;
    let mut from_replica = None;
    loop {
        let working = || answered.load(Ordering::Relaxed);
        match plan.wait() {
            Wait::Origin(bound) => {
                let got = match bound {
                    Some(b) => tokio::time::timeout(b, &mut fetch).await.ok(),
                    None => Some((&mut fetch).await),
                };
                let ev = match &got {
                    None => Event::Timeout,
                    Some(r) => Event::Origin {
                        ok: r.is_ok(),
                        unreachable: matches!(r, Err(e) if mtcp_proto::takeover::wait::origin_lost(e.code)),
                    },
                };
                if got.is_some() && from_replica.is_some() {
                    tracing::info!(cid = %m.cid, "origin {} answered after all", origin.id);
                }
                from_origin = got;
                plan.on(ev, working());
            }
            Wait::Replica => {
                let why = match &from_origin {
                    Some(Err(e)) => e.reason.clone(),
                    _ => format!(
                        "origin {} ({}): no answer within {first:?}",
                        origin.id, origin.peer
                    ),
                };
                tracing::warn!(cid = %m.cid, "{why}; taking the connection over from a replica");
                let got = crate::eager::take_from_replica(inner, origin, m).await;
                let ev = Event::Replica(got.as_ref().err().map(|e| e.code));
                from_replica = Some(got);
                plan.on(ev, working());
                if let (Wait::Origin(Some(grace)), Some(Err(e))) = (plan.wait(), &from_replica) {
                    tracing::warn!(cid = %m.cid, "takeover from a replica failed ({e}); waiting up to {grace:?} more for origin {}'s answer", origin.id);
                }
            }
            Wait::Done(outcome) => {
                let missing = || Refusal::new(RefuseCode::Internal, "takeover: no answer kept");
                return match (outcome, from_origin, from_replica) {
                    (Outcome::Origin, Some(r), _) => r.map(|(fr, n)| (fr.rec, fr.tcp, n, None)),
                    (Outcome::Replica, _, Some(Ok((rec, n, claims)))) => {
                        Ok((rec, None, n, Some(claims)))
                    }
                    (Outcome::ReplicaRefused, _, Some(Err(e))) => Err(e),
                    (Outcome::BothRefused, Some(Err(o)), Some(Err(e))) => Err(Refusal::new(
                        e.code,
                        format!("{}; origin {}: {}", e.reason, origin.id, o.reason),
                    )),
                    _ => Err(missing()),
                };
            }
        }
    }
}

/// The rest of a takeover, once the record is known to fit: restart the connection here.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn take_over_checked(
    inner: &Arc<ServerInner>,
    m: &Migrate,
    rec: mtcp_proto::StateRecord,
    tcp: Option<crate::origin::DirectTcp>,
    state_bytes: u64,
    from_replica: bool,
    tx: mpsc::UnboundedSender<Out>,
    keepers: Confirm,
) -> Result<(Arc<Shared>, Start, Resumed, Option<DirectSock>), Refusal> {
    // One past the record's label: the MIGRATE's epoch + 1, or more when a silent holder was
    // superseded (its epoch is fenced).
    let epoch = core::next_epoch(&rec);
    let at = inner.destination();
    let token = inner.cluster.key.token(m.cid, epoch);
    let resumed = core::resumed(&rec, at, token, state_bytes, from_replica);
    let start = rec
        .snapshot
        .clone()
        .map(Start::Migrated)
        .unwrap_or(Start::New);
    use mtcp_proto::adopt;
    let sock = match tcp {
        Some(crate::origin::DirectTcp::Handed { nonce }) => {
            let fd = inner
                .handoff
                .take(&nonce, adopt::HANDED_WAIT)
                .await
                .ok_or_else(adopt::handed_late)?;
            let (sock, _) = crate::handed::adopt_handed(
                fd,
                &inner.cluster.fast_path,
                adopt::Hander::Origin,
                &[],
            )
            .map_err(|e| {
                tracing::error!(cid = %m.cid, "fast-path connection lost: {e}");
                Refusal::internal(e)
            })?;
            crate::movetrace::step(Role::Destination, m.cid, "restored");
            Some(DirectSock {
                sock,
                written: rec.client_down(),
                flow: adopt::flow(adopt::Recreated::OriginHanded),
            })
        }
        Some(crate::origin::DirectTcp::Repaired { tcp, fence }) => {
            let sock = crate::direct::adopt(tcp, &inner.cluster.fast_path, None)
                .await
                .map_err(|e| {
                    tracing::error!(cid = %m.cid, "fast-path connection lost: {e}");
                    Refusal::internal(e)
                })?;
            crate::movetrace::step(Role::Destination, m.cid, "restored");
            // The connection has a socket again: the origin's fence comes down, and the pump
            // restarts the flow at once (decision 54).
            let lifted = crate::direct::lift_fence(&sock, &fence);
            crate::movetrace::step(Role::Destination, m.cid, "lifted");
            if !lifted {
                tracing::warn!(cid = %m.cid, %fence, "the origin's fence was not up; output waits for the agent's KICK");
            }
            Some(DirectSock {
                sock,
                written: rec.client_down(),
                flow: adopt::flow(adopt::Recreated::OriginRepaired {
                    fence_lifted: lifted,
                }),
            })
        }
        None => None,
    };
    let protected = crate::eager::protect_takeover(inner, &rec, epoch).await?;
    let shared = Shared::from_record(rec, epoch, tx);
    if crate::eager::eager(inner) {
        let mut st = shared.lock();
        if protected.is_some() {
            st.repl.at = Some(Instant::now());
        }
        // Told once the backups hold the epoch and the agent has it (`eager::agent_heard`);
        // COMMITTED is held back until the agent speaks on the new session (decision 48).
        st.repl.confirm = Some(keepers);
        st.repl.commit = mtcp_proto::commit::Commit::taken_over(protected);
    }
    inner
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(m.cid, shared.clone());
    crate::movetrace::step(Role::Destination, m.cid, "restarted");
    Ok((shared, start, resumed, sock))
}

/// A fast-path connection's socket, recreated here, before its pump runs.
pub(crate) struct DirectSock {
    pub(crate) sock: TcpStream,
    /// Downstream offset the socket continues at.
    pub(crate) written: u64,
    /// How its client flow starts.
    pub(crate) flow: crate::direct::Flow,
}

impl DirectSock {
    /// Starts the pump; the session's writer then carries what the pump passes on (`ctl_rx`).
    pub(crate) fn start(
        self,
        rx: mpsc::UnboundedReceiver<Out>,
        shared: &Arc<Shared>,
        inner: &Arc<ServerInner>,
    ) -> mpsc::UnboundedReceiver<Out> {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        shared.lock().fast = crate::direct_state::FastOut::at(self.written);
        crate::direct_state::Pump::new(self.sock, rx, ctl_tx, self.flow).start(shared, inner);
        ctl_rx
    }
}
