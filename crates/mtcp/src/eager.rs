//! Eager mode: each connection's newest acknowledged restart point is pushed to the server's
//! backups before the agent may forget the upstream bytes it covers (COMMITTED), so the
//! connection survives its server: a destination that cannot reach the origin claims the
//! replica from a backup, and the agent resends upstream from the replica's offset.
//!
//! Fencing: a connection is handed over at most once per epoch. The origin, when it hands a
//! connection over alive, first claims it at its backups; a destination taking it from a
//! replica claims it there too; the backups grant one claim per epoch and refuse every older or
//! claimed update, so an origin that comes back (SIGCONT) can change nothing.
//!
//! Custody (decision 43): whoever handed the state out — the origin, or the backup whose
//! replica was claimed — keeps it until the destination confirms that its own backups hold the
//! new epoch. A destination that dies, hangs or is given up on before that is superseded: its
//! successor epoch is fenced at its backups ([`fence`](handover::fence)) and the state goes to
//! the next candidate one epoch up (`mtcp_proto::custody`).

pub(crate) mod claims;
pub(crate) mod handover;

pub(crate) use claims::{protect_takeover, take_from_replica, Claims};
pub(crate) use handover::{claim_here, fence_here, hand_over};

use crate::conn_state::Confirm;
use crate::conn_state::{ConnState, PhaseEvent, Shared, StateError};
use crate::framed::Out;
use crate::peer;
use crate::registry::ServerInner;
use mtcp_proto::custody::Custody;
use mtcp_proto::push::{PushFailed, RETRY};
use mtcp_proto::stream::ServerStream;
use mtcp_proto::wire::{Mode, Msg};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest output tail a replica carries (a takeover whose restart point lies past the client;
/// larger ones are not replicated and the connection waits for its next snapshot).
pub const MAX_REPLICA_TAIL: usize = 4 << 20;

pub(crate) fn eager(inner: &ServerInner) -> bool {
    inner.cluster.mode == Mode::Eager
}

/// The agent spoke on the session. For a taken-over connection this settles its gate: no keeper
/// can have this server give the epoch up any more (decision 48). False if one already did:
/// the frame must be dropped and the session ended (the connection was let go). Then a
/// COMMITTED held back goes out and, if the backups hold the epoch, the keepers are told.
pub(crate) fn agent_heard(
    inner: &Arc<ServerInner>,
    cid: mtcp_proto::Cid,
    st: &mut ConnState,
) -> bool {
    if !st.repl.commit.waits_for_agent() {
        return true;
    }
    if inner
        .gates
        .settle(cid, st.epoch, mtcp_proto::custody::GateEvent::Hear)
        == mtcp_proto::custody::Verdict::Refuse
    {
        tracing::warn!(%cid, epoch = st.epoch, "the agent spoke on a session whose epoch was given up; ending it");
        return false;
    }
    let step = st.repl.commit.on_heard();
    apply_commit(inner, st, step);
    true
}

/// The backups stored `key` (`(out_off, in_off)`): COMMITTED and the keepers' confirmation as
/// `mtcp_proto::commit` rules (decisions 43, 48).
pub(crate) fn stored(inner: &Arc<ServerInner>, st: &mut ConnState, key: (u64, u64)) {
    st.repl.at = Some(Instant::now());
    let step = st.repl.commit.stored(key);
    apply_commit(inner, st, step);
}

/// Does what a [`mtcp_proto::commit::CommitStep`] says: COMMITTED to the agent (it may trim
/// upstream before that point and forget its fallbacks), and the keepers told they may forget
/// the previous epoch.
pub(crate) fn apply_commit(
    inner: &Arc<ServerInner>,
    st: &mut ConnState,
    step: mtcp_proto::commit::CommitStep,
) {
    if let Some((out_off, in_off)) = step.tell {
        st.send(Out::Msg(Msg::Committed { in_off, out_off }));
    }
    if step.confirm {
        if let Some(c) = st.repl.confirm.take() {
            tracing::info!(cid = ?c.cid, epoch = st.epoch, "the new epoch is on the backups; its keepers may forget the previous one");
            c.send(inner);
        }
    }
}

/// Pushes an encoded record to every backup of this server; all must store it.
pub(crate) async fn push(inner: &Arc<ServerInner>, rec: Vec<u8>) -> Result<(), PushFailed> {
    if inner.limits.drop_pushes {
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Err(PushFailed {
            fenced: false,
            why: "test hook: pushes are dropped".into(),
            taken: None,
            down: false,
        });
    }
    let mut failures = Vec::new();
    for b in &inner.cluster.backups(&inner.id) {
        if let Err(e) = peer::replicate(inner, b, rec.clone()).await {
            failures.push(e);
        }
    }
    mtcp_proto::push::outcome(failures)
}

/// Starts pushing the connection's newest acknowledged restart point to the backups, if there
/// is a newer one than they hold and no push is running. On success the agent hears COMMITTED.
pub(crate) fn replicate_if_due(inner: &Arc<ServerInner>, shared: &Arc<Shared>, st: &mut ConnState) {
    if !eager(inner) || !st.phase().serves() {
        return;
    }
    if !mtcp_proto::push::may_push(st.repl.busy, st.repl.retry_at, Instant::now()) {
        return;
    }
    let Some(snap) = st.s.replicable(st.repl.commit.committed()) else {
        return;
    };
    let key = (snap.out_off, snap.in_off);
    let since = st.repl.at.map(|t| t.elapsed());
    let ahead = key.0 - st.repl.commit.committed().map_or(0, |c| c.0);
    if let Some(wait) = mtcp_proto::push::push_after(since, ahead) {
        if !st.repl.deferred {
            st.repl.deferred = true;
            let (inner, shared) = (inner.clone(), shared.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let mut st = shared.lock();
                st.repl.deferred = false;
                replicate_if_due(&inner, &shared, &mut st);
            });
        }
        return;
    }
    let epoch = st.epoch;
    let rec = ServerStream::replica_record(shared.cid, epoch, snap).encode();
    st.repl.busy = true;
    let (inner, shared) = (inner.clone(), shared.clone());
    tokio::spawn(async move {
        let r = push(&inner, rec).await;
        let mut st = shared.lock();
        st.repl.busy = false;
        // Moved on or ended while the push ran: its answer is no longer this connection's.
        if mtcp_proto::freeze::still_serves(st.epoch, st.phase(), epoch, shared.cid).is_err() {
            return;
        }
        match r {
            Ok(()) => {
                st.repl.retry_at = None;
                stored(&inner, &mut st, key);
                replicate_if_due(&inner, &shared, &mut st);
            }
            Err(e) if e.fenced => {
                // Taken over from a replica while this server was unreachable (hung, cut off,
                // or only slow): it must never serve the connection again.
                tracing::warn!(cid = %shared.cid, "connection was taken over elsewhere ({}); letting it go", e.why);
                let_go_fenced(&inner, shared.cid, st, e.taken);
                inner
                    .migrated_out
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(cid = %shared.cid, "replication failed: {}; retrying in {RETRY:?}", e.why);
                st.repl.retry_at = Some(Instant::now() + RETRY);
            }
        }
    });
}

/// `set_state_durable` in eager mode: pushes the newest restart point (with the output the
/// client still lacks before it as its tail) to every backup now, and returns once all of them
/// store it; the agent then hears COMMITTED for it. Bounded by `bound`.
pub(crate) async fn push_durable(
    inner: &Arc<ServerInner>,
    shared: &Arc<Shared>,
    bound: Duration,
) -> Result<(), StateError> {
    let (rec, key, epoch) = {
        let st = shared.lock();
        st.ensure_live()?;
        let rec = st.s.durable_record(shared.cid, st.epoch).ok_or_else(|| {
            StateError::NotDurable("no restart point to push (replay still being checked)".into())
        })?;
        if rec.tail.len() > MAX_REPLICA_TAIL {
            return Err(StateError::NotDurable(format!(
                "{} bytes of output the client lacks exceed the replica limit of {MAX_REPLICA_TAIL}",
                rec.tail.len()
            )));
        }
        let key = (rec.snap_out, rec.snap_in);
        (rec.encode(), key, st.epoch)
    };
    let r = tokio::time::timeout(bound, push(inner, rec)).await;
    let mut st = shared.lock();
    match r {
        Ok(Ok(())) => {
            // The epoch only, not the phase: the backups do hold this restart point whatever
            // became of the connection meanwhile, and `ensure_live` below tells the caller.
            // (Another epoch's bookkeeping is not this record's.)
            if st.epoch == epoch && st.repl.commit.committed().is_none_or(|c| c < key) {
                stored(inner, &mut st, key);
            }
            st.ensure_live()
        }
        Ok(Err(e)) if e.fenced => {
            // Taken over elsewhere meanwhile: this server must let it go.
            let_go_fenced(inner, shared.cid, st, e.taken);
            Err(StateError::Migrated)
        }
        Ok(Err(e)) => Err(StateError::NotDurable(e.why)),
        Err(_) => Err(StateError::NotDurable(format!(
            "the backups did not store the restart point within {bound:?}"
        ))),
    }
}

/// Janitor duty: retry failed pushes and refresh replicas well within the backups' TTL.
pub(crate) fn tend(inner: &Arc<ServerInner>, shared: &Arc<Shared>, now: Instant) {
    let mut st = shared.lock();
    if st
        .repl
        .taken
        .as_ref()
        .is_some_and(|(_, t)| now.duration_since(*t) > inner.limits.dead_session)
    {
        // Nobody asked for it: the taker confirmed or the agent went on without it.
        drop(st);
        inner.forget(shared.cid);
        return;
    }
    if st.detached_at.is_some() {
        return;
    }
    if st
        .repl
        .at
        .is_some_and(|t| now.duration_since(t) > inner.limits.replica_ttl / 3)
    {
        // Push the newest restart point again even if it is the one they hold.
        st.repl.commit.push_again();
    }
    replicate_if_due(inner, shared, &mut st);
}

impl Confirm {
    /// Sends DROPREPLICA to every keeper, in the background.
    pub(crate) fn send(self, inner: &Arc<ServerInner>) {
        let Some(cid) = self.cid else { return };
        let inner = inner.clone();
        tokio::spawn(async move {
            for k in self.to {
                if k.id == inner.id {
                    inner.replicas.drop_upto(cid, self.epoch, &inner.id);
                    inner.custody.confirmed(cid, self.epoch, &inner.id);
                } else {
                    peer::drop_replica(&inner, &k, cid, self.epoch).await;
                }
            }
        });
    }
}

/// Test hook (`delay_takeover`): the destination waits before its takeover (it answers WORKING
/// meanwhile, so the agent waits for it).
pub(crate) async fn test_delay(inner: &ServerInner) {
    if !inner.limits.delay_takeover.is_zero() {
        tracing::info!(
            "test hook: delaying the takeover by {:?}",
            inner.limits.delay_takeover
        );
        tokio::time::sleep(inner.limits.delay_takeover).await;
    }
}

/// The connection ended in order at `epoch`: the server forgets it, but remembers for a while
/// that it did, so a migration the agent requests just before it sees the end is answered
/// `Closed` (the agent has every byte) rather than "unknown connection"; in eager mode the
/// backups may forget it too.
pub(crate) fn closed_in_order(inner: &Arc<ServerInner>, cid: mtcp_proto::Cid, epoch: u64) {
    inner.forget(cid);
    inner
        .closed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(cid, (epoch, Instant::now()));
    closed(inner, cid, epoch);
}

/// The connection ended in order at `epoch`: the backups may forget it.
fn closed(inner: &Arc<ServerInner>, cid: mtcp_proto::Cid, epoch: u64) {
    if !eager(inner) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        for b in inner.cluster.backups(&inner.id) {
            peer::drop_replica(&inner, &b, cid, epoch).await;
        }
    });
}

/// A push was refused because the connection was taken over elsewhere: it never serves again.
/// If a backup said who took it over from its replica at this epoch, the stream is kept (the
/// connection stays in the table, migrated) so that this server can be that destination's
/// keeper: the destination may be the backup itself, which then holds the only other copy,
/// and die before the agent has its RESUMED (decision 48). Otherwise it is forgotten.
fn let_go_fenced(
    inner: &Arc<ServerInner>,
    cid: mtcp_proto::Cid,
    mut st: std::sync::MutexGuard<'_, ConnState>,
    taken: Option<Custody>,
) {
    st.apply(PhaseEvent::LetGo);
    st.repl.confirm = None;
    st.repl.commit.let_go();
    // Not a re-check of the connection (it was just let go): the taker's custody is kept only
    // for the epoch this connection is at — a custody of another epoch is not its state's.
    match mtcp_proto::push::keeps_for(taken, st.epoch) {
        Some(c) => {
            tracing::info!(%cid, epoch = c.epoch, holder = %c.holder, "keeping the fenced connection's state until its taker confirms");
            st.repl.taken = Some((c, Instant::now()));
        }
        None => {
            drop(st);
            inner.forget(cid);
        }
    }
}
