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
//! successor epoch is fenced at its backups ([`fence`]) and the state goes to the next
//! candidate one epoch up (`mtcp_proto::custody`).

use crate::config::ServerEntry;
use crate::conn_state::{ConnState, Phase, Shared};
use crate::custody::Fenced;
use crate::framed::Out;
use crate::gate::YieldAnswer;
use crate::origin::Fetch;
use crate::peer;
use crate::replica::{ClaimError, Claimed};
use crate::server::ServerInner;
use mtcp_proto::custody::{Custody, Fence, GaveUp};
use mtcp_proto::stream::{replica_for_client, Refusal, ServerStream, Snap};
use mtcp_proto::wire::{Migrate, Mode, Msg, RefuseCode};
use mtcp_proto::StateRecord;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest output tail a replica carries (a takeover whose restart point lies past the client;
/// larger ones are not replicated and the connection waits for its next snapshot).
pub const MAX_REPLICA_TAIL: usize = 4 << 20;
/// After a failed push, wait this long before trying again.
const RETRY: Duration = Duration::from_millis(250);
/// At most this many pushes of a taken-over connection's new epoch run at once (see
/// [`protect_takeover`]).
const MAX_OVERLAPPING: usize = 3;
/// Pushes are spaced: a newer restart point is pushed at once when it is this many output
/// bytes past the one the backups hold, otherwise after [`PUSH_GAP`] since the last push. With
/// snapshots every few KiB this bounds the replication work without letting replicas lag.
const PUSH_BYTES: u64 = 1 << 20;
const PUSH_GAP: Duration = Duration::from_millis(2);

pub(crate) fn eager(inner: &ServerInner) -> bool {
    inner.cluster.mode == Mode::Eager
}

/// Replication bookkeeping of one connection at its server.
#[derive(Debug, Default)]
pub(crate) struct Repl {
    /// `(out_off, in_off)` of the restart point the backups hold.
    pub committed: Option<(u64, u64)>,
    pub busy: bool,
    pub retry_at: Option<Instant>,
    /// A deferred push is scheduled (see [`PUSH_GAP`]).
    pub deferred: bool,
    /// When the backups were last updated (refreshed well within their TTL).
    pub at: Option<Instant>,
    /// A taken-over connection's keepers, to be told they may forget the previous epoch once
    /// the backups hold the new one *and* the agent has spoken on the new session (so it has
    /// the new epoch: until then it may come back with the old one) (decision 43).
    pub confirm: Option<Confirm>,
    /// The agent has sent something on this session.
    pub heard: bool,
    /// A COMMITTED held back until the agent speaks on the session ([`tell_committed`]).
    pub withheld: Option<(u64, u64)>,
    /// Fenced: a destination took the connection over from a backup's replica of this epoch
    /// (the custody it would hand out, and since when). The connection is let go but its stream
    /// is kept for a while, so that this server can act as that destination's keeper
    /// ([`adopt_taken`], decision 48).
    pub taken: Option<(Custody, Instant)>,
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
    if st.repl.heard {
        return true;
    }
    if st.repl.confirm.is_some()
        && inner
            .gates
            .settle(cid, st.epoch, mtcp_proto::custody::GateEvent::Hear)
            == mtcp_proto::custody::Verdict::Refuse
    {
        tracing::warn!(%cid, epoch = st.epoch, "the agent spoke on a session whose epoch was given up; ending it");
        return false;
    }
    st.repl.heard = true;
    if let Some((out_off, in_off)) = st.repl.withheld.take() {
        st.send(Out::Msg(Msg::Committed { in_off, out_off }));
    }
    if st.repl.committed.is_some() {
        if let Some(c) = st.repl.confirm.take() {
            c.send(inner);
        }
    }
    true
}

/// Tells the agent that the backups hold `(out_off, in_off)` (COMMITTED: it may trim upstream
/// before it and forget its fallbacks). On a taken-over connection only once the agent has
/// spoken on the session (decision 48): until then a keeper may still have this server give
/// the epoch up, and the agent must then still be able to fall back to the previous epoch.
pub(crate) fn tell_committed(st: &mut ConnState, (out_off, in_off): (u64, u64)) {
    if st.repl.confirm.is_some() && !st.repl.heard {
        st.repl.withheld = Some((out_off, in_off));
        return;
    }
    st.send(Out::Msg(Msg::Committed { in_off, out_off }));
}

/// Why a push failed.
pub(crate) struct PushError {
    /// A backup says the connection moved on (it was taken over elsewhere): this server must
    /// let it go.
    pub fenced: bool,
    pub why: String,
    /// Who took it over from a backup's replica (TAKEN), if a backup said so.
    pub taken: Option<Custody>,
    /// Every backup that failed refused the connection: their processes are not running.
    pub down: bool,
}

/// Pushes an encoded record to every backup of this server; all must store it.
pub(crate) async fn push(inner: &Arc<ServerInner>, rec: Vec<u8>) -> Result<(), PushError> {
    if inner.limits.drop_pushes {
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Err(PushError {
            fenced: false,
            why: "test hook: pushes are dropped".into(),
            taken: None,
            down: false,
        });
    }
    let backups = inner.cluster.backups(&inner.id);
    let mut errs = Vec::new();
    let mut fenced = false;
    let mut taken = None;
    let mut down = true;
    for b in &backups {
        if let Err(e) = peer::replicate(inner, b, rec.clone()).await {
            fenced |= e.code == Some(RefuseCode::StaleEpoch);
            taken = taken.or(e.taken);
            down &= e.down;
            errs.push(e.why);
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(PushError {
            fenced,
            why: errs.join("; "),
            taken,
            down,
        })
    }
}

/// Starts pushing the connection's newest acknowledged restart point to the backups, if there
/// is a newer one than they hold and no push is running. On success the agent hears COMMITTED.
pub(crate) fn replicate_if_due(inner: &Arc<ServerInner>, shared: &Arc<Shared>, st: &mut ConnState) {
    if !eager(inner) || st.repl.busy || !matches!(st.phase(), Phase::Live | Phase::AppClosed) {
        return;
    }
    if st.repl.retry_at.is_some_and(|t| Instant::now() < t) {
        return;
    }
    let Some(snap) = st.s.replicable(st.repl.committed) else {
        return;
    };
    let key = (snap.out_off, snap.in_off);
    let since = st.repl.at.map(|t| t.elapsed());
    let ahead = key.0 - st.repl.committed.map_or(0, |c| c.0);
    if since.is_some_and(|d| d < PUSH_GAP) && ahead < PUSH_BYTES {
        if !st.repl.deferred {
            st.repl.deferred = true;
            let wait = PUSH_GAP - since.unwrap_or_default();
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
        if st.epoch != epoch || !matches!(st.phase(), Phase::Live | Phase::AppClosed) {
            return;
        }
        match r {
            Ok(()) => {
                st.repl.committed = Some(key);
                st.repl.at = Some(Instant::now());
                st.repl.retry_at = None;
                if st.repl.heard {
                    if let Some(c) = st.repl.confirm.take() {
                        tracing::info!(cid = %shared.cid, epoch, "the new epoch is on the backups; its keepers may forget the previous one");
                        c.send(&inner);
                    }
                }
                tell_committed(&mut st, key);
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
) -> Result<(), crate::StateError> {
    use crate::StateError;
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
            if st.epoch == epoch && st.repl.committed.is_none_or(|c| c < key) {
                st.repl.committed = Some(key);
                st.repl.at = Some(Instant::now());
                tell_committed(&mut st, key);
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
    st.enter(Phase::Migrated);
    st.repl.confirm = None;
    st.wake_all();
    match taken.filter(|c| c.epoch == st.epoch) {
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

/// A FETCH for `f.epoch` found the connection let go after a fence that named its taker: the
/// stream becomes a custody (its record built for the agent's position in the FETCH), as if it
/// had been handed over to that taker. `None`: no such connection here.
fn adopt_taken(inner: &Arc<ServerInner>, f: &Fetch) -> Option<Result<(), Refusal>> {
    let shared = inner.get(&f.cid)?;
    let st = shared.lock();
    let (c, _) = st.repl.taken.clone().filter(|(c, _)| c.epoch == f.epoch)?;
    let r =
        st.s.record(f.cid, f.epoch, f.down_recv, f.sum_from, f.down_sum)
            .and_then(|rec| {
                mtcp_proto::bounds::record_fits(rec.encoded_len_bound(), inner.limits.max_record)
                    .map_err(|e| (RefuseCode::TooLarge, format!("state record too large: {e}")))?;
                Ok(rec)
            });
    drop(st);
    inner.forget(f.cid);
    Some(r.map(|rec| inner.custody.keep(f.cid, c, &rec)))
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
        st.repl.committed = None;
    }
    replicate_if_due(inner, shared, &mut st);
}

/// The origin's side of a migration: freeze the connection and, in eager mode, claim it at the
/// backups so that no destination can also take it from a replica.
/// `to` is the destination asking. In eager mode the origin keeps the handed-over state in its
/// custody until `to` confirms, and hands it again to the next destination asking for the same
/// epoch once `to`'s successor epoch is fenced ([`rehand`]).
///
/// `waiting` says whether `to` still waits for the answer: a FETCH can reach this server after
/// its destination gave up on it (a lossy path, a slow origin) — handing the state to it then
/// would freeze the connection, or supersede the holder the agent now uses, for nobody.
pub(crate) async fn hand_over(
    inner: &Arc<ServerInner>,
    f: &Fetch,
    to: &str,
    waiting: &(dyn Fn() -> bool + Sync),
) -> Result<crate::origin::Frozen, Refusal> {
    if !waiting() {
        return Err(gave_up(to));
    }
    let rec = match inner.freeze_local(f).await {
        Ok(rec) => rec,
        Err((RefuseCode::UnknownConnection, why)) if eager(inner) => {
            return rehand(inner, f, to, waiting)
                .await
                .unwrap_or(Err((RefuseCode::UnknownConnection, why)));
        }
        Err(e) => return Err(e),
    };
    if !eager(inner) {
        return Ok(rec);
    }
    // Kept at once, before the fences: they may take seconds (a dead backup on a lossy path),
    // and a FETCH for this epoch meanwhile (the agent gave up on `to`) must find the custody,
    // not a forgotten connection (decision 48) — once these fences are done (`Turn`).
    let _turn = inner.custody.turn(f.cid).await;
    let kept = rec.tcp.is_none();
    let custody = Custody::new(f.epoch, to);
    if kept {
        inner.custody.keep(f.cid, custody.clone(), &rec.rec);
    }
    // A fence that had to pass a failed candidate's claim over returns the epoch it reached:
    // the destination then resumes past it (decision 48).
    let mut rec = rec;
    let mut label = f.epoch;
    for b in inner.cluster.backups(&inner.id) {
        // A plain fence: this origin keeps the custody itself.
        let r = if b.id == inner.id {
            fence_here(inner, f.cid, f.epoch, &inner.id).await
        } else {
            peer::fence(inner, &b, f.cid, f.epoch).await
        };
        match r {
            Ok(Claimed::Record(bytes)) => {
                if let Ok(r) = StateRecord::decode(&bytes) {
                    label = label.max(r.epoch);
                }
            }
            Ok(Claimed::Nothing) => {}
            Err((RefuseCode::OriginUnreachable, why)) => {
                tracing::warn!(cid = %f.cid, "cannot fence backup: {why}");
            }
            Err((code, why)) => {
                tracing::warn!(cid = %f.cid, "connection was taken over from a replica meanwhile: {why}");
                if kept {
                    inner.custody.settle(f.cid, &custody, None);
                }
                return Err((code, why));
            }
        }
    }
    if label > f.epoch {
        tracing::info!(cid = %f.cid, epoch = f.epoch, label, "handing the connection over one past a failed candidate's epoch");
        rec.rec.epoch = label;
        if kept {
            let raised = Custody {
                label,
                ..custody.clone()
            };
            inner
                .custody
                .settle(f.cid, &custody, Some((raised, &rec.rec)));
        }
    }
    Ok(rec)
}

/// A FETCH for a connection this origin no longer serves: if it handed the connection over at
/// that epoch and keeps it in custody, fence the holder's successor epoch and hand the state
/// to `to` one epoch up. `None`: no custody here.
async fn rehand(
    inner: &Arc<ServerInner>,
    f: &Fetch,
    to: &str,
    waiting: &(dyn Fn() -> bool + Sync),
) -> Option<Result<crate::origin::Frozen, Refusal>> {
    // One hand-out of this connection at a time: this one sees what an earlier one did.
    let _turn = inner.custody.turn(f.cid).await;
    // The turn may have taken seconds: superseding the holder for a destination that left
    // meanwhile would take the connection from the one the agent now uses (stop 16).
    if !waiting() {
        return Some(Err(gave_up(to)));
    }
    let seen = match inner.custody.get(f.cid) {
        Some(c) => c,
        None => {
            if let Err(e) = adopt_taken(inner, f)? {
                return Some(Err(e));
            }
            inner.custody.get(f.cid)?
        }
    };
    let next = match seen.successor(f.epoch) {
        Ok(n) => n,
        Err(e) => return Some(Err(e)),
    };
    tracing::warn!(cid = %f.cid, epoch = f.epoch, holder = %seen.holder, "the connection's state is asked for again: fencing epoch {next} at {}'s backups", seen.holder);
    let unanswered = match ask_to_yield(inner, &seen.holder, f.cid, next).await {
        Ok(u) => u,
        Err(e) => return Some(Err(e)),
    };
    let fenced = Fenced {
        unanswered,
        ..fence(inner, f.cid, next, &seen.holder).await
    };
    let r = inner.custody.supersede(f.cid, &seen, to, &fenced);
    match &r {
        Ok(rec) => {
            tracing::info!(cid = %f.cid, to, label = rec.epoch, restart_at = rec.snap_out, "connection handed over again from custody")
        }
        Err(e) => tracing::warn!(cid = %f.cid, "cannot hand the connection over again: {}", e.1),
    }
    Some(r.map(|rec| crate::origin::Frozen { rec, tcp: None }))
}

/// The refusal of a hand-out whose destination no longer waits for it.
fn gave_up(to: &str) -> Refusal {
    (
        RefuseCode::Busy,
        format!("{to} gave up on this FETCH before it was served"),
    )
}

/// Before superseding `holder`: asks it to give up `epoch` (the one it resumes at). Refused if
/// the agent has used that epoch (spoken on the session its RESUMED went out on: whoever asks
/// for the older one is not the agent's current move). A holder that cannot be reached is left
/// to the fence: dead, or cut off from everyone, so it serves no one. `Ok(true)`: the holder
/// gave the epoch up before any RESUMED for it went out — no agent holds its token, so the
/// fence is not needed (`Custody::supersede`'s `unanswered`).
pub(crate) async fn ask_to_yield(
    inner: &Arc<ServerInner>,
    holder: &str,
    cid: mtcp_proto::Cid,
    epoch: u64,
) -> Result<bool, Refusal> {
    let answer = if holder == inner.id {
        inner.give_up(cid, epoch)
    } else {
        let Some(to) = inner.cluster.server(holder).cloned() else {
            return Ok(false);
        };
        match peer::ask_yield(inner, &to, cid, epoch).await {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(%cid, holder, "holder not reached ({e}); fencing its epoch {epoch}");
                return Ok(false);
            }
        }
    };
    match answer {
        YieldAnswer::Unanswered => Ok(true),
        YieldAnswer::LetGo => Ok(false),
        YieldAnswer::Refused => Err((
            RefuseCode::StaleEpoch,
            format!("{holder} already resumed the connection at epoch {epoch}"),
        )),
    }
}

/// A fence of `epoch` of `cid` for `by` at this server's replica store (FENCEEPOCH, or this
/// server fencing at its own store): a plain claim. If a candidate holds that epoch there (it
/// claimed the replica and has not confirmed), it is asked to give its successor epoch up: a
/// takeover that failed with its RELEASECLAIM lost, or whose RESUMED the agent never used,
/// yields, and the claim passes to `by` one epoch up (`Custody::pass`, decision 48) — so a
/// failed takeover never leaves the connection unclaimable. A holder that refuses (the agent
/// uses its epoch: the connection moved on) or cannot be reached keeps it: refused.
pub(crate) async fn fence_here(
    inner: &Arc<ServerInner>,
    cid: mtcp_proto::Cid,
    epoch: u64,
    by: &str,
) -> Result<Claimed, Refusal> {
    let seen = match inner.replicas.claim(cid, epoch, by, false) {
        Ok(c) => return Ok(c),
        Err(ClaimError::Refused(r)) => return Err(r),
        Err(ClaimError::Held(seen)) => seen,
    };
    let next = seen.label + 1;
    let answer = if seen.holder == inner.id {
        Some(inner.give_up(cid, next))
    } else {
        match inner.cluster.server(&seen.holder).cloned() {
            Some(h) => match peer::ask_yield(inner, &h, cid, next).await {
                Ok(y) => Some(y),
                Err(e) => {
                    tracing::warn!(%cid, holder = %seen.holder, "cannot ask the claimer to give epoch {next} up: {e}");
                    None
                }
            },
            None => None,
        }
    };
    let gave_up = match answer {
        Some(YieldAnswer::Unanswered) => GaveUp::Unanswered,
        // It answered RESUMED for `next` (the agent may hold that token): the epoch is fenced
        // at its own backups before the claim passes over (`Custody::pass`; issue 15's open
        // question, settled by the simulation).
        Some(YieldAnswer::LetGo) => {
            GaveUp::Answered(Box::pin(fence(inner, cid, next, &seen.holder)).await.fences)
        }
        Some(YieldAnswer::Refused) | None => {
            return Err((
                RefuseCode::StaleEpoch,
                format!(
                    "epoch {epoch} of {cid} is held by {} (resuming at {next}), which keeps it",
                    seen.holder
                ),
            ));
        }
    };
    tracing::info!(%cid, epoch, holder = %seen.holder, by, "a fence found the epoch claimed by a candidate that gave it up; passing the claim over");
    inner.replicas.pass(cid, &seen, by, &gave_up)
}

/// Fences epoch `next` of `cid` at every backup of `holder` (a plain claim by this server), so
/// `holder` can never store it — and so never confirm or serve it: a destination answers the
/// agent only once its backups hold its epoch. Returns each backup's answer, with the record
/// it had at that epoch, and the highest epoch label an answer carried (past `next` when a
/// backup passed a failed candidate's claim over, [`fence_here`]). A record that is only the
/// start of the connection (nothing was stored) counts as nothing. (`unanswered` is left
/// false: the caller sets it from the holder's answer to YIELD.)
pub(crate) async fn fence(
    inner: &Arc<ServerInner>,
    cid: mtcp_proto::Cid,
    next: u64,
    holder: &str,
) -> Fenced {
    let mut fences = Vec::new();
    let mut records = Vec::new();
    let mut floor = next;
    for b in inner.cluster.backups(holder) {
        let r = if b.id == inner.id {
            fence_here(inner, cid, next, &inner.id).await
        } else {
            peer::fence(inner, &b, cid, next).await
        };
        let (f, rec) = match r {
            Ok(Claimed::Nothing) => (Fence::Nothing, None),
            Ok(Claimed::Record(bytes)) => match StateRecord::decode(&bytes) {
                Ok(r) => {
                    floor = floor.max(r.epoch);
                    if is_start(&r) {
                        (Fence::Nothing, None)
                    } else {
                        (Fence::Record(r.snap_out, r.snap_in), Some(bytes))
                    }
                }
                Err(_) => (Fence::Refused(RefuseCode::Internal), None),
            },
            Err((RefuseCode::OriginUnreachable, _)) => (Fence::Unreachable, None),
            Err((code, why)) => {
                tracing::warn!(%cid, backup = %b.id, "fence of epoch {next} refused: {why}");
                (Fence::Refused(code), None)
            }
        };
        fences.push(f);
        records.push(rec);
    }
    Fenced {
        fences,
        records,
        floor,
        unanswered: false,
    }
}

/// The implicit restart point of a new connection (what a relabelled tombstone hands out).
fn is_start(r: &StateRecord) -> bool {
    r.snapshot.is_none()
        && (r.snap_out, r.snap_in) == (0, 0)
        && r.input.is_empty()
        && r.tail.is_empty()
}

/// A claim at this server's replica store by `by` (a destination taking a connection from a
/// replica). If another destination holds the entry (it took the replica and has not
/// confirmed its new epoch), its successor epoch is fenced first and the entry goes to `by`
/// one epoch up: a destination that died or was given up on does not block the next.
pub(crate) async fn claim_here(
    inner: &Arc<ServerInner>,
    cid: mtcp_proto::Cid,
    epoch: u64,
    by: &str,
) -> Result<Claimed, Refusal> {
    match inner.replicas.claim(cid, epoch, by, true) {
        Ok(c) => Ok(c),
        Err(ClaimError::Refused(r)) => Err(r),
        Err(ClaimError::Held(seen)) => {
            let next = seen.successor(epoch)?;
            tracing::warn!(%cid, epoch, holder = %seen.holder, by, "replica held by a destination that has not confirmed: fencing its epoch {next}");
            let unanswered = ask_to_yield(inner, &seen.holder, cid, next).await?;
            let fenced = Fenced {
                unanswered,
                ..fence(inner, cid, next, &seen.holder).await
            };
            inner.replicas.supersede(cid, &seen, by, &fenced)
        }
    }
}

/// Where a destination confirms, once its backups hold its new epoch, that the keepers of the
/// state it took may forget it: the origin it fetched from and the backups it claimed at.
#[derive(Debug, Default)]
pub(crate) struct Confirm {
    pub cid: Option<mtcp_proto::Cid>,
    /// The epoch the agent's MIGRATE named (the keepers' custody epoch).
    pub epoch: u64,
    pub to: Vec<ServerEntry>,
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
            tracing::info!(%cid, "test hook: the claims' releases are dropped");
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
            tracing::warn!(cid = %m.cid, epoch = m.epoch, "takeover from a replica failed ({:?}: {}); releasing its claims", e.0, e.1);
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
    let backups = inner.cluster.backups(&origin.id);
    let mut best: Option<(StateRecord, u64)> = None;
    let mut reached = 0;
    let mut unreachable = Vec::new();
    for b in &backups {
        let r = if b.id == inner.id {
            claim_here(inner, m.cid, m.epoch, &inner.id).await
        } else {
            peer::claim(inner, b, m.cid, m.epoch).await
        };
        match r {
            Ok(Claimed::Record(bytes)) => {
                reached += 1;
                claims.at.push(b.clone());
                let rec = StateRecord::decode(&bytes)
                    .map_err(|e| (RefuseCode::Internal, format!("replica at {}: {e}", b.id)))?;
                // A record labelled past the MIGRATE's epoch: a silent holder was superseded.
                if rec.cid != m.cid || rec.epoch < m.epoch {
                    return Err((
                        RefuseCode::Internal,
                        format!("backup {} sent the replica of another connection", b.id),
                    ));
                }
                let newer = best.as_ref().is_none_or(|(r, _)| {
                    (rec.epoch, rec.snap_out, rec.snap_in) > (r.epoch, r.snap_out, r.snap_in)
                });
                if newer {
                    best = Some((rec, bytes.len() as u64));
                }
            }
            Ok(Claimed::Nothing) => {
                reached += 1;
                claims.at.push(b.clone());
            }
            Err((RefuseCode::OriginUnreachable, why)) => {
                // The claim may have been granted with its answer lost: withdraw it too.
                claims.at.push(b.clone());
                unreachable.push(why)
            }
            Err(e) => return Err(e),
        }
    }
    if reached == 0 {
        return Err((
            RefuseCode::OriginUnreachable,
            format!(
                "origin {} and its backups are unreachable: {}",
                origin.id,
                unreachable.join("; ")
            ),
        ));
    }
    let (rec, size) = match best {
        Some(x) => x,
        None => {
            // No snapshot was ever committed: the implicit restart point of a new connection.
            let start = Snap {
                state: None,
                in_off: 0,
                out_off: 0,
            };
            let rec = ServerStream::replica_record(m.cid, m.epoch, &start);
            let n = rec.encode().len() as u64;
            (rec, n)
        }
    };
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
        tracing::warn!(cid = %rec.cid, "the taken-over connection's tail ({} bytes) exceeds the replica limit; unconfirmed until its next snapshot is pushed", rec.tail.len());
        return Ok(None);
    }
    let bytes = ServerStream::restarted_replica(rec, epoch).encode();
    let backups = inner.cluster.backups(&inner.id);
    let slowest = backups
        .iter()
        .map(|b| inner.peer_pool.rtt(&b.id))
        .max_by_key(mtcp_proto::timing::answer_bound)
        .unwrap_or_default();
    let bound = mtcp_proto::timing::protect_bound(&slowest);
    let attempt =
        (mtcp_proto::timing::answer_bound(&slowest) * 2).max(mtcp_proto::timing::UNMEASURED);
    // Attempts overlap instead of replacing each other: an attempt that outlives `attempt` keeps
    // running (a lost SYN is retransmitted after 1 s, a record on a lossy path may need several
    // retransmission timeouts) while a fresh one starts beside it. The first to succeed wins.
    let t0 = Instant::now();
    let mut tries = 0;
    let mut last = String::new();
    // Attempts that found every failing backup down (its peer port refused).
    let mut found_down = 0;
    let mut inflight = tokio::task::JoinSet::new();
    let mut next_try = t0;
    loop {
        let left = bound.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break;
        }
        let now = Instant::now();
        let room = inflight.len() < MAX_OVERLAPPING;
        if room && now >= next_try {
            tries += 1;
            let (inner, bytes) = (inner.clone(), bytes.clone());
            inflight.spawn(async move { push(&inner, bytes).await });
            next_try = now + attempt;
            continue;
        }
        let wake = if room {
            next_try.saturating_duration_since(now).min(left)
        } else {
            left
        };
        tokio::select! {
            Some(r) = inflight.join_next(), if !inflight.is_empty() => match r {
                Ok(Ok(())) => {
                    if tries > 1 {
                        tracing::info!(cid = %rec.cid, tries, took = ?t0.elapsed(), "taken-over connection protected on its backups");
                    }
                    return Ok(Some((rec.snap_out, rec.snap_in)));
                }
                Ok(Err(e)) if e.fenced => {
                    tracing::warn!(cid = %rec.cid, epoch, "a backup refuses the taken-over connection's new epoch (superseded): {}", e.why);
                    return Err((
                        RefuseCode::StaleEpoch,
                        format!("epoch {epoch} was fenced by the next destination: {}", e.why),
                    ));
                }
                Ok(Err(e)) => {
                    last = e.why;
                    found_down += u32::from(e.down);
                    if found_down >= DOWN_TRIES {
                        // No process listens at a backup: waiting out the bound (seconds on a
                        // lossy path) protects nothing; the keepers and the agent keep the
                        // previous restart point meanwhile (decision 48).
                        break;
                    }
                    next_try = next_try.min(Instant::now() + Duration::from_millis(20));
                }
                Err(e) => last = format!("push task: {e}"),
            },
            _ = tokio::time::sleep(wake) => {}
        }
    }
    if last.is_empty() {
        last = format!("{tries} overlapping attempt(s) unanswered");
    }
    tracing::warn!(cid = %rec.cid, tries, "backups did not store the taken-over connection within {bound:?} ({last}); resuming unconfirmed (its keepers and the agent keep the previous restart point) until a push reaches them");
    Ok(None)
}

/// Attempts that must find the backups down (their peer ports refusing connections; others
/// may have timed out on a lossy path meanwhile) before a takeover stops waiting for them and
/// resumes unconfirmed.
const DOWN_TRIES: u32 = 2;

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

/// The connection ended in order at `epoch`: the backups may forget it.
pub(crate) fn closed(inner: &Arc<ServerInner>, cid: mtcp_proto::Cid, epoch: u64) {
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
