//! A move: the agent's plan, the destination's takeover, the FETCH (from the origin, a
//! keeper's custody or a backup's replica).

use super::*;
use mtcp_proto::agent::{self, MoveError, MovePlan};
use mtcp_proto::custody::{
    self, AfterYield, GateEvent, Handout, OwnFence, Step, Verdict, YieldAnswer,
};
use mtcp_proto::stream::{replica_for_client, Refusal, ServerStream};
use mtcp_proto::sum::checksum;
use mtcp_proto::takeover::{self, pick::Pick, ResumedFor};
use mtcp_proto::wire::{Migrate, Msg, RefuseCode};
use mtcp_proto::Token;
use rand::Rng;

/// What a FETCH got: the state, or the refusal the destination passes on.
pub(super) type Got = Result<Fetched, Refusal>;

/// How a move ended.
pub(crate) enum Moved {
    Done,
    /// No candidate took the connection: the refusals, and their codes.
    Failed(String, Vec<RefuseCode>),
}

impl World {
    /// A move: MIGRATE to candidates in order until one resumes the connection.
    pub(super) fn move_connection(&mut self, broken: bool) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        if !broken {
            // The agent closes the session it leaves: what was in flight is lost with it.
            self.link.up.clear();
            self.link.down.clear();
            if let Some(h) = self.servers[self.serving].conn.as_mut() {
                h.attached = false;
            }
        }
        self.retry_at = None;
        match self.try_move()? {
            Moved::Done => Ok(()),
            Moved::Failed(why, codes) => self.move_failed(why, codes),
        }
    }

    fn try_move(&mut self) -> Result<Moved, String> {
        let to = self
            .rng
            .gen_bool(0.5)
            .then(|| SERVERS[self.rng.gen_range(0..SERVERS.len())]);
        let mut plan =
            MovePlan::new(&self.at, self.stream.position(), to).map_err(|e| e.to_string())?;
        let cands = self.at.candidates(to).map_err(|e| e.to_string())?;
        let mut tried = 0;
        // Rounds in which the agent gave up on the one server holding its own copy (asked, it
        // would have re-attached it: so at a failure, every round since the copy was made).
        let mut own_silent = 0;
        let lineage = self.stream.lineage.clone();
        while let Some(mut a) = plan.next(&lineage, &mut self.at.migrates) {
            if !self.knobs.words {
                a.migrate.holding = Default::default();
            }
            tried += 1;
            let dest = server_index(&a.cand.id);
            let refuse = |code, why: &str| MoveError::Refused {
                code,
                reason: why.into(),
            };
            if !self.reachable(dest) {
                plan.refused(
                    &a.cand,
                    &MoveError::Silent(std::time::Duration::from_millis(700)),
                );
                continue;
            }
            // A candidate may be busy while a live one comes after it in this round.
            let i = (tried - 1) % cands.len();
            let later_live = cands[i + 1..]
                .iter()
                .any(|c| self.reachable(server_index(&c.id)));
            if later_live && self.rng.gen_bool(0.2) {
                own_silent += self.would_reattach(&a.migrate, dest) as u32;
                self.gave_up_on(&a.migrate, dest);
                plan.refused(&a.cand, &refuse(RefuseCode::Busy, "busy"));
                continue;
            }
            let m = a.migrate.clone();
            takeover::admit(&m, true, false, SERVERS[dest]).map_err(|e| e.to_string())?;
            self.maybe_race(&m, dest, true)?;
            let own = self.own_copy(&m, dest)?;
            let f = match own.map_or_else(|| self.fetch(&m, dest), |f| Ok(Ok(f)))? {
                Ok(f) => f,
                Err(r) => {
                    plan.refused(&a.cand, &refuse(r.code, &r.reason));
                    continue;
                }
            };
            match self.take_over(&m, dest, f, true)? {
                Some(epoch) => {
                    self.moves += 1;
                    self.trace(format!(
                        "moved: MIGRATE epoch {} origin {} -> {} at epoch {epoch} (protected {}, lineage {:?})",
                        m.epoch, m.origin, SERVERS[dest],
                        self.servers[dest].conn.as_ref().is_some_and(|h| h.commit.committed().is_some()),
                        self.stream.lineage
                    ));
                    self.maybe_race(&m, dest, false)?;
                    return Ok(Moved::Done);
                }
                None => plan.refused(&a.cand, &refuse(RefuseCode::Internal, "protect refused")),
            }
        }
        self.silent_every_round = own_silent > 0;
        Ok(Moved::Failed(plan.failure(), plan.refuse_codes().to_vec()))
    }

    /// `dest` takes the connection over with what it fetched for `m`, and (`agent`) answers
    /// the agent, or (a racer whose MIGRATE the agent gave up on) a session nobody reads.
    /// Returns the epoch it resumed at, or `None` if it refused (its backup refused the new
    /// epoch: fenced).
    pub(super) fn take_over(
        &mut self,
        m: &Migrate,
        dest: usize,
        f: Fetched,
        agent: bool,
    ) -> Result<Option<u64>, String> {
        let Fetched {
            rec,
            claimed,
            keeper,
            claim_at,
            own,
        } = f;
        let kept = rec.clone();
        let refused = |Refusal { code, reason }| {
            format!("destination refused the record ({code:?}): {reason}")
        };
        let (rec, from_replica) = match own {
            // Its own copy, frozen at the client's position: exact, as for any re-attach.
            true => takeover::check_record(m, &rec, false)
                .map(|()| (rec, false))
                .map_err(refused)?,
            false => takeover::restart_record(m, rec, claimed, false).map_err(refused)?,
        };
        let epoch = takeover::next_epoch(&rec);
        if let Some((k, label)) = keeper {
            // Whoever gave the state out keeps it (right after the freeze) until the
            // destination confirms.
            self.keep(k, m.epoch, label, dest, kept);
        }
        let mut committed = None;
        if self.eager && self.rng.gen_bool(self.knobs.protect) {
            // The destination's backup holds the new epoch before RESUMED (the runtime's
            // `protect_takeover`). Refused there (fenced): the takeover is refused. Down or
            // timed out (the other 40 %): it resumes unconfirmed — the keeper's custody and the
            // agent's lineage cover it until a later push.
            let replica = ServerStream::restarted_replica(&rec, epoch);
            let pushed = self.push(dest, &replica);
            if !pushed.refused_at.is_empty() {
                self.release(&claim_at, m.epoch, dest);
                return Ok(None);
            }
            if pushed.stored {
                committed = Some((rec.snap_out, rec.snap_in));
            }
        }
        if self.settle(dest, epoch, GateEvent::Answer) != Verdict::Go {
            // Given up (YIELD) before its RESUMED went out: it never answers.
            return Ok(None);
        }
        if let Some(o) = (0..SERVERS.len()).find(|&o| {
            self.servers[o]
                .conn
                .as_ref()
                .is_some_and(|h| h.epoch == epoch)
        }) {
            // Two custody chains: one owner per epoch is gone (issue 15's pass question).
            self.same_epoch += 1;
            return Err(format!(
                "{} resumes at epoch {epoch}, which {} holds too",
                SERVERS[dest], SERVERS[o]
            ));
        }
        self.servers[dest].served.insert(epoch, m.holding.attempt);
        let (stream, tail) = ServerStream::restart(&rec);
        let mut held = Held::new(stream, App::restore(rec.snapshot.as_ref()), epoch);
        held.commit = Commit::taken_over(committed);
        held.attached = agent;
        held.resumed_for = ResumedFor {
            attempt: m.holding.attempt,
            from: m.epoch,
        };
        if !agent {
            self.servers[dest].conn = Some(held);
            self.races_resumed += 1;
            self.trace(format!(
                "racer {} resumed at epoch {epoch}, to nobody",
                SERVERS[dest]
            ));
            return Ok(Some(epoch));
        }
        let at = takeover::Destination {
            id: SERVERS[dest],
            alternates: self.at.alternates.clone(),
            heartbeat_ms: 100,
            idle_ms: 30_000,
        };
        let token = Token([epoch as u8; 32]);
        let resumed = takeover::resumed(&rec, at, token, 0, from_replica);
        let r = agent::answer(Msg::Resumed(resumed)).map_err(|e| e.to_string())?;
        let from = Step {
            server: m.origin.clone(),
            epoch: m.epoch,
            token: m.token,
        };
        let resend = self.stream.resume(&r, from).map_err(|e| e.to_string())?;
        let addr = format!("addr-{}", SERVERS[dest]);
        self.at.resumed(&r, &addr);
        // Whatever was in flight on the old session is gone with it.
        self.link.up.clear();
        self.link.down.clear();
        self.cut = false;
        let now = self.now + self.link.delay;
        if !tail.is_empty() {
            self.link.down.push_back((now, Down::Data(tail.clone())));
        }
        self.servers[dest].conn = Some(held);
        self.serving = dest;
        self.heard_at = self.now;
        self.stalled_since = None;
        if self.rng.gen_bool(self.knobs.crash_soon) {
            self.crash_at = Some(self.now + self.rng.gen_range(0..=self.link.delay + 1));
        }
        // The agent speaks first on a new eager session (a PING with the resent upstream).
        self.send_up(Up::Ping);
        for c in resend.chunks {
            self.send_up(Up::Data(c));
        }
        if let Some(total) = resend.up_fin {
            self.send_up(Up::Fin(total));
        }
        Ok(Some(epoch))
    }

    /// Lazy mode: `dest` serves MIGRATE `m` with its own copy of the connection when it took it
    /// over for an earlier MIGRATE of the agent from `m`'s epoch, which the agent gave up on
    /// (`takeover::reattaches_own`, decision 73): the copy is frozen here at the client's
    /// position, as the runtime's re-attach does (its checksum range starts there: the agent
    /// received nothing since it left the origin).
    fn own_copy(&mut self, m: &Migrate, dest: usize) -> Result<Option<Fetched>, String> {
        if !self.would_reattach(m, dest) {
            return Ok(None);
        }
        let h = self.servers[dest].conn.as_ref().expect("checked");
        let rec = h
            .stream
            .record(m.cid, h.epoch, m.down_recv, m.down_recv, checksum(&[]))
            .map_err(|Refusal { code, reason }| {
                format!("own copy refused the record ({code:?}): {reason}")
            })?;
        self.trace(format!(
            "{} re-attaches its own copy at epoch {} for MIGRATE epoch {}",
            SERVERS[dest], h.epoch, m.epoch
        ));
        self.servers[dest].conn = None;
        self.own_reattaches += 1;
        Ok(Some(Fetched {
            rec,
            claimed: false,
            keeper: None,
            claim_at: Vec::new(),
            own: true,
        }))
    }

    /// Whether `dest` would serve `m` with its own copy ([`World::own_copy`]).
    fn would_reattach(&self, m: &Migrate, dest: usize) -> bool {
        self.servers[dest].conn.as_ref().is_some_and(|h| {
            takeover::reattaches_own(m, self.eager, h.epoch, h.taken.is_none(), h.resumed_for)
        })
    }

    /// Server `o`, asked for `epoch`, serves the connection itself at `serving` as the holder
    /// of its own custody of that epoch, unheard (`custody::rehands_own`).
    fn own_newer(&self, o: usize, epoch: u64, serving: u64) -> bool {
        let Some((c, _)) = self.servers[o].custody.as_ref() else {
            return false;
        };
        let gate = self.servers[o].gates.get(&serving).copied().flatten();
        let detached = self.servers[o].conn.as_ref().is_some_and(|h| !h.attached);
        custody::rehands_own(c, SERVERS[o], epoch, serving, gate, detached)
    }

    /// A destination gets the state for MIGRATE `m` from its origin (the FETCH goes there):
    /// the live connection, which the origin freezes after fencing its epoch at its backup (a
    /// plain claim; in eager mode it keeps the state until the destination confirms); or the
    /// state the origin keeps in custody for that epoch, re-handed once the holder was asked to
    /// yield and its successor epoch fenced (`Custody::supersede`). An origin that is up but
    /// has neither refuses. With the origin down or hung, in eager mode, the destination claims
    /// the replica at the origin's backup (`claim_at`: the backup's custody, superseding a
    /// holder that did not confirm).
    pub(super) fn fetch(&mut self, m: &Migrate, dest: usize) -> Result<Got, String> {
        let o = server_index(&m.origin);
        let refused = |code, why: &str| Ok(Err(Refusal::new(code, why)));
        if self.reachable(o) {
            let conn = self.servers[o].conn.as_ref();
            match conn.map(|h| (h.epoch, h.taken.is_some())) {
                Some((e, false)) if e == m.epoch => {
                    // The origin checks the agent's position (a refusal is a bug: the agent's
                    // checksum contradicts what the origin sent) — unless the origin was taken
                    // over meanwhile (hung) and its fence below says so.
                    let rec = conn.expect("held").stream.record(
                        m.cid,
                        m.epoch,
                        m.down_recv,
                        m.sum_from,
                        m.down_sum,
                    );
                    let mut fences = custody::OwnFences::new(m.epoch);
                    if self.eager {
                        for b in self.backups(o) {
                            let f = self.fence_at(b, m.epoch, o, &m.holding);
                            if let OwnFence::Stop(_) = fences.on(&f.fence, Some(f.label)) {
                                // Taken over from a replica meanwhile: the origin lets go.
                                self.servers[o].conn = None;
                                return refused(
                                    RefuseCode::StaleEpoch,
                                    "taken over from the replica",
                                );
                            }
                        }
                    }
                    let label = fences.label();
                    let mut rec = rec.map_err(|Refusal { code, reason }| {
                        format!("origin refused the record ({code:?}): {reason}")
                    })?;
                    self.servers[o].conn = None;
                    rec.epoch = label;
                    return Ok(Ok(Fetched {
                        rec,
                        claimed: false,
                        keeper: self.eager.then_some((o, label)),
                        claim_at: Vec::new(),
                        own: false,
                    }));
                }
                Some((e, true)) if e == m.epoch => {
                    // A fenced origin kept its stream as the taker's keeper (decision 48): the
                    // stream becomes a kept record for the agent's position.
                    let held = self.servers[o].conn.take().expect("checked");
                    let rec = held
                        .stream
                        .record(m.cid, m.epoch, m.down_recv, m.sum_from, m.down_sum)
                        .map_err(|Refusal { code, reason }| {
                            format!("fenced origin refused the record ({code:?}): {reason}")
                        })?;
                    self.servers[o].custody = Some((held.taken.expect("taken"), rec));
                }
                Some((e, false)) if self.eager && self.own_newer(o, m.epoch, e) => {
                    // A keeper that re-handed the kept state to itself (a late re-attach)
                    // and resumed to nobody: it fences its own epoch first, then lets its copy
                    // go, and the custody path below hands the state out (decision 64) — no
                    // need to, when the agent's word rules that epoch out (decision 66).
                    let own = self.servers[o].served.get(&e).copied().unwrap_or(0);
                    if custody::prefence_own(true, m.holding.rules_out(own, e)) {
                        let f = self.fence_holder(o, e, o, &m.holding);
                        if !custody::prefenced(&f.fences) {
                            return refused(RefuseCode::StaleEpoch, "origin keeps its own epoch");
                        }
                    }
                    if self.ask_yield(o, e, &m.holding) == Some(YieldAnswer::Refused) {
                        return refused(RefuseCode::StaleEpoch, "origin's own epoch is heard");
                    }
                    self.own_rehands += 1;
                }
                Some(_) => return refused(RefuseCode::StaleEpoch, "origin at another epoch"),
                None => {}
            }
            let kept = self.servers[o]
                .custody
                .as_ref()
                .is_some_and(|(c, _)| c.epoch == m.epoch);
            if !kept {
                return refused(RefuseCode::UnknownConnection, "origin does not know it");
            }
            let (mut custody, kept) = self.servers[o].custody.clone().expect("kept");
            let next = custody
                .successor(m.epoch)
                .map_err(|e| format!("custody: {e}"))?;
            let holder = server_index(&custody.holder);
            let y = self.ask_yield(holder, next, &m.holding);
            let then = custody::before_supersede(y, &m.holding, next);
            if then == AfterYield::Keeps {
                return refused(RefuseCode::StaleEpoch, "holder refused to yield");
            }
            let f = self.fence_holder(holder, next, o, &m.holding);
            let unanswered = self.noted(then, y) == AfterYield::Unanswered;
            let (handout, label) =
                match custody.supersede(SERVERS[dest], &f.fences, f.floor, unanswered) {
                    Ok(x) => x,
                    Err(Refusal { code, .. }) => {
                        self.unfenced |= matches!(y, Some(YieldAnswer::LetGo(_)))
                            && !unanswered
                            && f.unreached();
                        return refused(code, "custody: cannot supersede");
                    }
                };
            let mut rec = match handout {
                Handout::Kept => kept.clone(),
                Handout::Successor(i) => f.recs[i].clone().expect("fenced record"),
            };
            rec.epoch = label;
            self.servers[o].custody = Some((custody, kept));
            self.fallbacks += 1;
            return Ok(Ok(Fetched {
                rec,
                claimed: false,
                keeper: None,
                claim_at: Vec::new(),
                own: false,
            }));
        }
        if !self.eager {
            return refused(RefuseCode::OriginUnreachable, "origin unreachable");
        }
        // Claimed at every backup of the origin; the newest record granted wins (the
        // runtime's `claim_and_build`, `takeover::pick::Pick`).
        let mut pick = Pick::new(m.cid, m.epoch);
        let (mut at, mut any) = (Vec::new(), false);
        for b in self.backups(o) {
            match self.claim_at(b, m.epoch, dest, &m.holding) {
                Ok(Some(raw)) => {
                    at.push(b);
                    any = true;
                    if let Err(e) = pick.granted(SERVERS[b], raw, 0) {
                        return Err(format!("replica at {}: {}", SERVERS[b], e.reason));
                    }
                }
                Ok(None) => {
                    at.push(b);
                    pick.granted_nothing();
                }
                Err(RefuseCode::OriginUnreachable) => pick.unreachable(SERVERS[b].into()),
                Err(code) => {
                    self.release(&at, m.epoch, dest);
                    return refused(code, "replica claim refused");
                }
            }
        }
        let picked = pick.finish(SERVERS[o]).map(|(r, _)| r);
        let raw = match picked {
            Ok(raw) if any => raw,
            // No backup answered, or none holds a record (the simulation does not restart a
            // connection from its beginning).
            _ => {
                self.release(&at, m.epoch, dest);
                return refused(RefuseCode::OriginUnreachable, "no origin, no replica");
            }
        };
        let rec = match replica_for_client(raw, m.down_recv, &m.ranges(), m.up_base) {
            Ok(r) => r,
            Err(Refusal { code, reason }) if self.two_fault.is_none() => {
                return Err(format!(
                    "replica refused for the client ({code:?}): {reason}"
                ));
            }
            Err(Refusal { code, .. }) => {
                self.release(&at, m.epoch, dest);
                return refused(code, "replica refused for the client");
            }
        };
        Ok(Ok(Fetched {
            rec,
            claimed: true,
            keeper: None,
            claim_at: at,
            own: false,
        }))
    }
}
