//! Eager mode, the side that hands a connection out: at most once per epoch, with custody kept
//! until the destination confirms (hand-over and re-hand-over by the origin or a keeper, YIELD,
//! fences and claims at the backups).

use super::eager;
use crate::custody::Fenced;
use crate::origin::Fetch;
use crate::peer;
use crate::registry::ServerInner;
use crate::replica::{ClaimError, Claimed};
use mtcp_proto::custody::YieldAnswer;
use mtcp_proto::custody::{
    after_freeze, before_pass, before_supersede, prefence_own, read_fence, rehand_from,
    AfterFreeze, AfterYield, Custody, Fence, GaveUp, OwnFence, OwnFences, RehandFrom,
};
use mtcp_proto::stream::Refusal;
use mtcp_proto::wire::{Holding, RefuseCode};
use std::sync::Arc;
/// A FETCH for `f.epoch` found the connection let go after a fence that named its taker: the
/// stream becomes a custody (its record built for the agent's position in the FETCH), as if it
/// had been handed over to that taker. `None`: no such connection here.
fn adopt_taken(inner: &Arc<ServerInner>, f: &Fetch) -> Option<Result<(), Refusal>> {
    let shared = inner.get(&f.cid)?;
    let st = shared.lock();
    // Not `still_serves`: a fenced connection no longer serves by definition. The FETCH must be
    // for the epoch its taker's custody is at; the phase needs no check (only a let-go
    // connection has `taken`).
    let (c, _) = st.repl.taken.clone().filter(|(c, _)| c.epoch == f.epoch)?;
    let r =
        st.s.record(f.cid, f.epoch, f.down_recv, f.sum_from, f.down_sum)
            .and_then(|rec| {
                mtcp_proto::bounds::record_fits(rec.encoded_len_bound(), inner.limits.max_record)
                    .map_err(|e| Refusal::too_large(format!("state record too large: {e}")))?;
                Ok(rec)
            });
    drop(st);
    inner.forget(f.cid);
    Some(r.map(|rec| inner.custody.keep(f.cid, c, &rec)))
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
    let rec = match inner.freeze_local(f, to).await {
        Ok(rec) => rec,
        // Not served here any more: maybe in custody. Or its own re-hand to itself, to nobody,
        // took the holder the agent had just read RESUMED from, and the agent comes back for
        // the kept epoch (decision 64).
        Err(e) => {
            return match after_freeze(Some(e.code), eager(inner), holds_own(inner, f)) {
                AfterFreeze::Rehand => rehand(inner, f, to, waiting).await.unwrap_or(Err(e)),
                AfterFreeze::HandOver | AfterFreeze::Refuse => Err(e),
            };
        }
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
    let mut fences = OwnFences::new(f.epoch);
    for b in inner.cluster.backups(&inner.id) {
        // A plain fence: this origin keeps the custody itself.
        let r = if b.id == inner.id {
            fence_here(inner, f.cid, f.epoch, &inner.id, &f.holding).await
        } else {
            peer::fence(inner, &b, f.cid, f.epoch, &inner.id, &f.holding).await
        };
        let (fenced, seen) = read_fence(answer(&r));
        let e = match (fences.on(&fenced, seen), r) {
            (OwnFence::Fenced, _) => continue,
            (OwnFence::Unreached, r) => {
                let why = r.err().map(|e| e.reason).unwrap_or_default();
                tracing::warn!(target: "mtcp::eager", cid = %f.cid, "cannot fence backup: {why}");
                continue;
            }
            (OwnFence::Stop(_), Err(e)) => {
                tracing::warn!(target: "mtcp::eager", cid = %f.cid, "connection was taken over from a replica meanwhile: {}", e.reason);
                e
            }
            // The label to hand out at is unknown (`read_fence`): not handed out.
            (OwnFence::Stop(code), Ok(_)) => {
                let e = Refusal::new(
                    code,
                    format!("backup {} answered the fence of epoch {} with a record that does not decode", b.id, f.epoch),
                );
                tracing::warn!(target: "mtcp::eager", cid = %f.cid, "{}", e.reason);
                e
            }
        };
        if kept {
            inner.custody.settle(f.cid, &custody, None);
        }
        return Err(e);
    }
    if fences.raised() {
        let label = fences.label();
        tracing::info!(target: "mtcp::eager", cid = %f.cid, epoch = f.epoch, label, "handing the connection over one past a failed candidate's epoch");
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

/// This keeper holds the connection itself, detached and unheard, one epoch past its custody
/// of `f.epoch`: a re-hand to itself of a MIGRATE the agent had given up on
/// (`custody::rehands_own`, decision 64).
fn holds_own(inner: &Arc<ServerInner>, f: &Fetch) -> bool {
    let (Some(c), Some(shared)) = (inner.custody.get(f.cid), inner.get(&f.cid)) else {
        return false;
    };
    let (serving, detached) = {
        let st = shared.lock();
        (st.epoch, st.detached_at.is_some() && st.phase().serves())
    };
    let gate = inner.gates.peek(f.cid, serving);
    mtcp_proto::custody::rehands_own(&c, &inner.id, f.epoch, serving, gate, detached)
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
    // A stream kept for the taker of this very epoch (decision 48) comes before a custody of
    // another epoch: that one is an older move's, still unconfirmed because this server took
    // the connection back itself and went on from there (the simulation's `fetch` does the
    // same; a lab run lost the connection to the older custody's `StaleEpoch`).
    let kept = inner.custody.get(f.cid);
    let taken = inner.get(&f.cid).and_then(|s| {
        let st = s.lock();
        st.repl.taken.as_ref().map(|(c, _)| c.epoch)
    });
    let seen = match rehand_from(kept.as_ref().map(|c| c.epoch), taken, f.epoch) {
        RehandFrom::Nothing => return None,
        RehandFrom::Custody => kept?,
        RehandFrom::Taken => match adopt_taken(inner, f) {
            Some(Err(e)) => return Some(Err(e)),
            Some(Ok(())) => inner.custody.get(f.cid)?,
            // Gone meanwhile (another hand-out took it): as if it never was.
            None => kept?,
        },
    };
    let next = match seen.successor(f.epoch) {
        Ok(n) => n,
        Err(e) => return Some(Err(e)),
    };
    tracing::warn!(target: "mtcp::eager", cid = %f.cid, epoch = f.epoch, holder = %seen.holder, "the connection's state is asked for again: fencing epoch {next} at {}'s backups", seen.holder);
    let own = inner.gates.served(f.cid, next);
    if prefence_own(holds_own(inner, f), f.holding.rules_out(own, next)) {
        // The holder is this server: its epoch is fenced before its copy is given up, and a
        // fence that lands nowhere keeps the copy (decision 64) — unless the agent's word
        // rules that epoch out: no agent will use it (decision 66). The fence below repeats it
        // for the same claimer, which is granted.
        let pre = fence(inner, f.cid, next, &inner.id, &inner.id, &f.holding).await;
        if !mtcp_proto::custody::prefenced(&pre.fences) {
            return Some(Err(Refusal::stale_epoch(format!(
                "connection {} is held here at epoch {next}, whose fence reached no backup: kept",
                f.cid
            ))));
        }
    }
    let unanswered = match ask_to_yield(inner, &seen.holder, f.cid, next, &f.holding).await {
        Ok(u) => u,
        Err(e) => return Some(Err(e)),
    };
    let fenced = Fenced {
        unanswered,
        ..fence(inner, f.cid, next, &seen.holder, &inner.id, &f.holding).await
    };
    let r = inner.custody.supersede(f.cid, &seen, to, &fenced);
    match &r {
        Ok(rec) => {
            tracing::info!(target: "mtcp::eager", cid = %f.cid, to, label = rec.epoch, restart_at = rec.snap_out, "connection handed over again from custody")
        }
        Err(e) => {
            tracing::warn!(target: "mtcp::eager", cid = %f.cid, "cannot hand the connection over again: {}", e.reason)
        }
    }
    Some(r.map(|rec| crate::origin::Frozen { rec, tcp: None }))
}

/// The refusal of a hand-out whose destination no longer waits for it.
fn gave_up(to: &str) -> Refusal {
    Refusal::busy(format!("{to} gave up on this FETCH before it was served"))
}

/// Before superseding `holder`: asks it to give up `epoch` (the one it resumes at), for a
/// request under the agent's word `word`. Refused if the agent has used that epoch (spoken on
/// the session its RESUMED went out on: whoever asks for the older one is not the agent's
/// current move), or if the holder resumed for a later MIGRATE than the word's (decision 66).
/// A holder that cannot be reached is left to the fence: dead, or cut off from everyone, so it
/// serves no one. `Ok(true)`: no agent will ever use the epoch — the holder gave it up before
/// any RESUMED for it went out, or after, for a MIGRATE the word rules out (decision 66) — so
/// the fence is not needed (`Custody::supersede`'s `unanswered`).
pub(crate) async fn ask_to_yield(
    inner: &Arc<ServerInner>,
    holder: &str,
    cid: mtcp_proto::Cid,
    epoch: u64,
    word: &Holding,
) -> Result<bool, Refusal> {
    let answer = ask_holder(inner, holder, cid, epoch, word).await;
    match noted(
        before_supersede(answer, word, epoch),
        answer,
        cid,
        holder,
        epoch,
    ) {
        AfterYield::Keeps => Err(Refusal::stale_epoch(format!(
            "{holder} already resumed the connection at epoch {epoch}"
        ))),
        AfterYield::Unanswered => Ok(true),
        AfterYield::Fence => Ok(false),
    }
}

/// YIELD of `epoch` of `cid` to `holder` (this server, or over a peer channel), for a request
/// under the agent's word `word`. `None`: not reached (down, cut off, not in the cluster).
async fn ask_holder(
    inner: &Arc<ServerInner>,
    holder: &str,
    cid: mtcp_proto::Cid,
    epoch: u64,
    word: &Holding,
) -> Option<YieldAnswer> {
    if holder == inner.id {
        return Some(inner.give_up(cid, epoch, word.attempt));
    }
    let to = inner.cluster.server(holder).cloned()?;
    match peer::ask_yield(inner, &to, cid, epoch, word.attempt).await {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::info!(target: "mtcp::eager", %cid, holder, "holder not reached ({e}) when asked to give epoch {epoch} up");
            None
        }
    }
}

/// A holder's answer to YIELD with what the fencer does next, logged when the agent's word
/// made a fence of `epoch` needless (decision 66).
fn noted(
    then: AfterYield,
    answer: Option<YieldAnswer>,
    cid: mtcp_proto::Cid,
    holder: &str,
    epoch: u64,
) -> AfterYield {
    if then == AfterYield::Unanswered && matches!(answer, Some(YieldAnswer::LetGo(_))) {
        tracing::info!(target: "mtcp::eager", %cid, holder, epoch, "the holder let go of an epoch the agent's word rules out: no fence needed");
    }
    then
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
    word: &Holding,
) -> Result<Claimed, Refusal> {
    let seen = match inner.replicas.claim(cid, epoch, by, false) {
        Ok(c) => return Ok(c),
        Err(ClaimError::Refused(r)) => return Err(r),
        Err(ClaimError::Held(seen)) => seen,
    };
    // The holder's successor epoch, as for a supersede: `Custody::pass` gives that very epoch
    // to `by` (a held entry names the claimed epoch, so this is never refused).
    let next = seen.successor(epoch)?;
    let answer = ask_holder(inner, &seen.holder, cid, next, word).await;
    let gave_up = match noted(
        before_pass(answer, word, next),
        answer,
        cid,
        &seen.holder,
        next,
    ) {
        AfterYield::Keeps => {
            return Err(Refusal::stale_epoch(format!(
                "epoch {epoch} of {cid} is held by {} (resuming at {next}), which keeps it",
                seen.holder
            )));
        }
        AfterYield::Unanswered => GaveUp::Unanswered,
        // It answered RESUMED for `next` (the agent may hold that token): the epoch is fenced
        // at its own backups before the claim passes over (`Custody::pass`; issue 15's open
        // question, settled by the simulation).
        AfterYield::Fence => GaveUp::Answered(
            Box::pin(fence(inner, cid, next, &seen.holder, by, word))
                .await
                .fences,
        ),
    };
    tracing::info!(target: "mtcp::eager", %cid, epoch, holder = %seen.holder, by, "a fence found the epoch claimed by a candidate that gave it up; passing the claim over");
    inner.replicas.pass(cid, &seen, by, &gave_up)
}

/// Fences epoch `next` of `cid` at every backup of `holder` (a plain claim for `by`: this
/// server, or the destination whose takeover supersedes `holder`), so
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
    by: &str,
    word: &Holding,
) -> Fenced {
    let mut fences = Vec::new();
    let mut records = Vec::new();
    let mut floor = next;
    for b in inner.cluster.backups(holder) {
        let r = if b.id == inner.id {
            fence_here(inner, cid, next, by, word).await
        } else {
            peer::fence(inner, &b, cid, next, by, word).await
        };
        let (f, seen) = read_fence(answer(&r));
        floor = floor.max(seen.unwrap_or(floor));
        let rec = match (&f, r) {
            (Fence::Record(..), Ok(Claimed::Record(bytes))) => Some(bytes),
            (Fence::Refused(_), Err(e)) => {
                tracing::warn!(target: "mtcp::eager", %cid, backup = %b.id, "fence of epoch {next} refused: {}", e.reason);
                None
            }
            _ => None,
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

/// A backup's answer to a fence as `custody::read_fence` reads it.
fn answer(r: &Result<Claimed, Refusal>) -> Result<Option<&[u8]>, RefuseCode> {
    match r {
        Ok(Claimed::Record(bytes)) => Ok(Some(bytes)),
        Ok(Claimed::Nothing) => Ok(None),
        Err(e) => Err(e.code),
    }
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
    word: &Holding,
) -> Result<Claimed, Refusal> {
    match inner.replicas.claim(cid, epoch, by, true) {
        Ok(c) => Ok(c),
        Err(ClaimError::Refused(r)) => Err(r),
        Err(ClaimError::Held(seen)) => {
            let next = seen.successor(epoch)?;
            tracing::warn!(target: "mtcp::eager", %cid, epoch, holder = %seen.holder, by, "replica held by a destination that has not confirmed: fencing its epoch {next}");
            let unanswered = ask_to_yield(inner, &seen.holder, cid, next, word).await?;
            // Fenced for `by`: its claims at the origin's other backups fence the same epoch
            // again (a backup of both), which must not refuse its own takeover (decision 63).
            let fenced = Fenced {
                unanswered,
                ..fence(inner, cid, next, &seen.holder, by, word).await
            };
            inner.replicas.supersede(cid, &seen, by, &fenced)
        }
    }
}
