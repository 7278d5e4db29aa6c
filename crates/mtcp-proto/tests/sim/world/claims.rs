//! Eager mode: the backups' replica stores under `mtcp_proto::replica`'s claim rules, fences,
//! YIELD and the holders' gates (`mtcp_proto::custody::Gate`) — the runtime's `eager::fence`,
//! `fence_here`, `claim_here` and `ask_to_yield`, played in one step.

use super::*;
use mtcp_proto::custody::{
    self, AfterYield, Custody, Fence, Gate, GateEvent, GaveUp, Handout, Verdict, YieldAnswer,
};
use mtcp_proto::replica::{ClaimError, Dropped, Granted, Slot, Store};
use mtcp_proto::wire::{Holding, RefuseCode};
use rand::Rng;

/// A holder's answer to YIELD (the runtime's, `custody::YieldAnswer`), or `None`: not reached
/// (down or hung).
pub(super) type Yield = Option<YieldAnswer>;

/// What a push to every backup of a server did.
pub(super) struct Pushed {
    /// Every backup stored it.
    pub stored: bool,
    /// The backups that answered and refused it (fenced, or taken over there).
    pub refused_at: Vec<usize>,
}

/// What the fences at every backup of a holder found (the runtime's `custody::Fenced`).
pub(super) struct Fences {
    pub fences: Vec<Fence>,
    /// Each backup's record (labelled), in the same order.
    pub recs: Vec<Option<StateRecord>>,
    /// The highest epoch label a fence reached.
    pub floor: u64,
}

impl Fences {
    /// No backup of the holder could be reached: its epoch is not fenced anywhere.
    pub fn unreached(&self) -> bool {
        self.fences.iter().all(|f| *f == Fence::Unreachable)
    }
}

/// What one backup's fence found, with the record it hands back (labelled).
pub(super) struct Fenced {
    pub fence: Fence,
    pub rec: Option<StateRecord>,
    pub label: u64,
}

impl World {
    /// Neither down nor hung: answers peers.
    pub(super) fn reachable(&self, s: usize) -> bool {
        self.servers[s].down_until.is_none() && self.servers[s].hung_until.is_none()
    }

    /// What the fencer does after the holder's answer `y` (`custody::before_pass` or
    /// `before_supersede`), counting the epochs the agent's word ruled out (decision 66).
    pub(super) fn noted(&mut self, then: AfterYield, y: Yield) -> AfterYield {
        if then == AfterYield::Unanswered && matches!(y, Some(YieldAnswer::LetGo(_))) {
            self.disowned += 1;
        }
        then
    }

    /// `s`'s gate for `epoch` meets `e`.
    pub(super) fn settle(&mut self, s: usize, epoch: u64, e: GateEvent) -> Verdict {
        let v = Gate::settle(self.servers[s].gates.entry(epoch).or_default(), e);
        if e == GateEvent::Hear && v == Verdict::Go && self.servers[s].heard.insert(epoch) {
            // The first frame of the agent at this epoch here: the epoch is s's, for good.
            if let Some(&other) = self.owners.get(&epoch).filter(|&&o| o != s) {
                self.two_owners = Some(format!(
                    "two owners of epoch {epoch}: {} and {}",
                    SERVERS[other], SERVERS[s]
                ));
            }
            self.owners.insert(epoch, s);
        }
        v
    }

    /// A keeper asks `holder` to give `epoch` up (YIELD).
    pub(super) fn ask_yield(&mut self, holder: usize, epoch: u64, word: &Holding) -> Yield {
        if !self.reachable(holder) {
            return None;
        }
        let served = self.servers[holder]
            .served
            .get(&epoch)
            .copied()
            .unwrap_or(0);
        if word.stale_for(served) {
            // Asked for a MIGRATE older than the one it resumed for (decision 66).
            self.stale_yields += 1;
            return Some(YieldAnswer::Refused);
        }
        let answer = YieldAnswer::of(Some((self.settle(holder, epoch, GateEvent::Yield), served)));
        match answer {
            YieldAnswer::Unanswered | YieldAnswer::Refused => {}
            YieldAnswer::LetGo(_) => {
                let serving = self.servers[holder].conn.as_ref().map(|h| h.epoch);
                if serving.is_some_and(|e| answer.lets_go(e, epoch)) {
                    self.servers[holder].conn = None;
                    self.trace(format!("{} lets epoch {epoch} go", SERVERS[holder]));
                    if self.serving == holder {
                        // The agent's frames on that session are dropped and it ends.
                        self.cut = true;
                        self.late_handout |= self.racing;
                    }
                }
                self.let_gos += 1;
            }
        }
        Some(answer)
    }

    /// `from` pushes `rec` to every backup of it, each tried (the runtime's `eager::push`).
    pub(super) fn push(&mut self, from: usize, rec: &StateRecord) -> Pushed {
        let mut out = Pushed {
            stored: true,
            refused_at: Vec::new(),
        };
        for b in self.backups(from) {
            if self.store_at(b, from, rec.clone()).is_err() {
                out.stored = false;
                if self.reachable(b) {
                    out.refused_at.push(b);
                }
            }
        }
        out
    }

    /// `from` stores `rec` at backup `b` (REPLICATE).
    fn store_at(&mut self, b: usize, from: usize, rec: StateRecord) -> Result<(), ()> {
        if !self.reachable(b) {
            return Err(());
        }
        let e = &mut self.servers[b].entry;
        match Slot::check_store(
            e.as_ref().map(|(s, _)| s),
            rec.epoch,
            rec.snap_out,
            rec.snap_in,
        ) {
            Err(_) => Err(()),
            Ok(Store::KeepNewer) => Ok(()),
            Ok(Store::Replace) => {
                if self.taken_at.contains(&(b, rec.epoch)) {
                    // A holder whose epoch a destination took over from this replica (a woken
                    // origin) must never store it again: it could confirm and serve it.
                    self.two_owners = Some(format!(
                        "{} stored epoch {} at {} after a destination took it over there",
                        SERVERS[from], rec.epoch, SERVERS[b]
                    ));
                }
                self.taken_at.retain(|&(x, e)| x != b || e > rec.epoch);
                let cur = e.as_ref().map(|(s, _)| s);
                let slot =
                    Slot::stored_over(cur, SERVERS[from], rec.epoch, rec.snap_out, rec.snap_in);
                *e = Some((slot, Some(rec)));
                Ok(())
            }
        }
    }

    /// The entry's record (or its tombstone: `None`) at backup `b`, labelled `label`.
    fn labelled(&self, b: usize, label: u64) -> Option<StateRecord> {
        let (_, rec) = self.servers[b].entry.as_ref()?;
        rec.clone().map(|mut r| {
            r.epoch = label;
            r
        })
    }

    /// A fence of `epoch` by `by` at backup `b` (FENCEEPOCH; the runtime's `fence_here`): a
    /// plain claim; a candidate holding that epoch is asked to give its successor up, and if it
    /// does the claim passes to `by` one epoch up (`Slot::pass`).
    pub(super) fn fence_at(&mut self, b: usize, epoch: u64, by: usize, word: &Holding) -> Fenced {
        let refused = |c| Fenced {
            fence: Fence::Refused(c),
            rec: None,
            label: epoch,
        };
        if !self.reachable(b) {
            return Fenced {
                fence: Fence::Unreachable,
                rec: None,
                label: epoch,
            };
        }
        let cur = self.servers[b].entry.as_mut().map(|(s, _)| s);
        let label = match Slot::claim(cur, epoch, SERVERS[by], false) {
            Ok(Granted::Entry { label, .. }) => label,
            Ok(Granted::Tombstone) => {
                self.servers[b].entry = Some((Slot::tombstone(epoch, SERVERS[by], false), None));
                epoch
            }
            Ok(Granted::Fenced) => {
                return Fenced {
                    fence: Fence::Nothing,
                    rec: None,
                    label: epoch,
                }
            }
            Err(ClaimError::Held(seen)) => {
                let holder = server_index(&seen.holder);
                // Whether the agent read the holder's RESUMED (it is the agent's server now).
                let agents = self.serving == holder
                    && self.servers[holder]
                        .conn
                        .as_ref()
                        .is_some_and(|h| h.epoch == seen.label + 1);
                let y = self.ask_yield(holder, seen.label + 1, word);
                let then = custody::before_pass(y, word, seen.label + 1);
                let gave_up = match self.noted(then, y) {
                    AfterYield::Unanswered => GaveUp::Unanswered,
                    AfterYield::Fence => {
                        self.passes_answered += 1;
                        if agents {
                            // Issue 15's question: the agent holds this RESUMED's token and
                            // the holder's backups are not fenced.
                            self.passes_of_agents += 1;
                            self.trace(format!(
                                "pass over {} whose RESUMED (epoch {}) the agent read",
                                seen.holder,
                                seen.label + 1
                            ));
                            if self.rng.gen_bool(self.knobs.hang_after_pass) {
                                let len = self.rng.gen_range(50..300);
                                self.servers[holder].hung_until = Some(self.now + len);
                                self.hangs += 1;
                                self.trace(format!("{} hangs for {len} steps", seen.holder));
                            }
                        }
                        if self.unfenced_pass {
                            GaveUp::Unanswered
                        } else {
                            // The epoch it answered for is fenced at its backups first.
                            let fs = self.fence_holder(holder, seen.label + 1, by, word);
                            GaveUp::Answered(fs.fences)
                        }
                    }
                    AfterYield::Keeps => return refused(RefuseCode::StaleEpoch),
                };
                let Some((slot, _)) = self.servers[b].entry.as_mut() else {
                    return refused(RefuseCode::StaleEpoch);
                };
                let Ok(label) = slot.pass(&seen, SERVERS[by], &gave_up) else {
                    return refused(RefuseCode::StaleEpoch);
                };
                self.passes += 1;
                self.trace(format!(
                    "fence of epoch {epoch} by {} at {} passes {} over (label {label})",
                    SERVERS[by], SERVERS[b], seen.holder
                ));
                label
            }
            Err(e) => return refused(e.code()),
        };
        match self.labelled(b, label) {
            Some(r) => Fenced {
                fence: Fence::Record(r.snap_out, r.snap_in),
                rec: Some(r),
                label,
            },
            None => Fenced {
                fence: Fence::Nothing,
                rec: None,
                label,
            },
        }
    }

    /// The backups of server `s`: the next `replicas` servers in order (the runtime's
    /// `Cluster::backups`).
    pub(super) fn backups(&self, s: usize) -> Vec<usize> {
        (1..=self.knobs.replicas)
            .map(|i| (s + i) % SERVERS.len())
            .collect()
    }

    /// Fences `holder`'s successor epoch `next` at every backup of it, on behalf of `by` (the
    /// runtime's `eager::fence`).
    pub(super) fn fence_holder(
        &mut self,
        holder: usize,
        next: u64,
        by: usize,
        word: &Holding,
    ) -> Fences {
        let mut out = Fences {
            fences: Vec::new(),
            recs: Vec::new(),
            floor: next,
        };
        for b in self.backups(holder) {
            let f = self.fence_at(b, next, by, word);
            out.floor = out.floor.max(f.label);
            out.fences.push(f.fence);
            out.recs.push(f.rec);
        }
        out
    }

    /// Destination `dest` claims the connection at `epoch` from backup `b`'s replica (the
    /// runtime's `claim_here`): the record (labelled), `Ok(None)` for a claimed tombstone (no
    /// replica: nothing to restart from), or why not.
    pub(super) fn claim_at(
        &mut self,
        b: usize,
        epoch: u64,
        dest: usize,
        word: &Holding,
    ) -> Result<Option<StateRecord>, RefuseCode> {
        if !self.reachable(b) {
            return Err(RefuseCode::OriginUnreachable);
        }
        let got = self.claim_rules(b, epoch, dest, word);
        if got.is_ok() {
            self.taken_at.insert((b, epoch));
        }
        got
    }

    fn claim_rules(
        &mut self,
        b: usize,
        epoch: u64,
        dest: usize,
        word: &Holding,
    ) -> Result<Option<StateRecord>, RefuseCode> {
        let cur = self.servers[b].entry.as_mut().map(|(s, _)| s);
        match Slot::claim(cur, epoch, SERVERS[dest], true) {
            Ok(Granted::Entry { label, .. }) => Ok(self.labelled(b, label)),
            Ok(Granted::Tombstone) => {
                self.servers[b].entry = Some((Slot::tombstone(epoch, SERVERS[dest], true), None));
                Ok(None)
            }
            Ok(Granted::Fenced) => Ok(None),
            Err(ClaimError::Held(seen)) => {
                let next = seen.successor(epoch).map_err(|e| e.code)?;
                let holder = server_index(&seen.holder);
                let y = self.ask_yield(holder, next, word);
                let then = custody::before_supersede(y, word, next);
                if then == AfterYield::Keeps {
                    return Err(RefuseCode::StaleEpoch);
                }
                // Fenced on behalf of the destination: its claims at the origin's other
                // backups fence the same epoch again, which must not refuse it.
                let f = self.fence_holder(holder, next, dest, word);
                let unanswered = self.noted(then, y) == AfterYield::Unanswered;
                let unfenced =
                    matches!(y, Some(YieldAnswer::LetGo(_))) && !unanswered && f.unreached();
                let Some((slot, _)) = self.servers[b].entry.as_mut() else {
                    // A fence of the holder's own backups reached this store and changed it.
                    return Err(RefuseCode::StaleEpoch);
                };
                let (what, label) = slot
                    .supersede(&seen, SERVERS[dest], &f.fences, f.floor, unanswered)
                    .map_err(|e| {
                        self.unfenced |= unfenced;
                        e.code()
                    })?;
                self.supersedes += 1;
                Ok(match what {
                    Handout::Kept => self.labelled(b, label),
                    Handout::Successor(i) => f.recs[i].clone().map(|mut r| {
                        r.epoch = label;
                        r
                    }),
                })
            }
            Err(e) => Err(e.code()),
        }
    }

    /// `dest`'s takeover from the replicas failed after it claimed at backups `at`: it
    /// releases each claim (RELEASECLAIM, the runtime's `Claims::release`), which is lost
    /// sometimes — then that claim stands until a fence passes it.
    pub(super) fn release(&mut self, at: &[usize], epoch: u64, dest: usize) {
        for &b in at {
            if !self.reachable(b) || self.rng.gen_bool(0.3) {
                continue;
            }
            if let Some((slot, _)) = self.servers[b].entry.as_mut() {
                if slot.release(epoch, SERVERS[dest]) {
                    self.taken_at.remove(&(b, epoch));
                }
            }
        }
    }

    /// `holder` confirmed epoch `epoch` (its backup holds it and the agent spoke): its keepers
    /// forget the custody, and its claims become plain tombstones.
    pub(super) fn confirmed(&mut self, holder: usize, epoch: u64) {
        for s in &mut self.servers {
            if s.custody
                .as_ref()
                .is_some_and(|(c, _)| c.holder == SERVERS[holder] && c.label + 1 == epoch)
            {
                s.custody = None;
            }
            if let Some((slot, rec)) = s.entry.as_mut() {
                if slot.claimer.as_deref() == Some(SERVERS[holder]) && slot.label + 1 == epoch {
                    match slot.drop_upto(slot.epoch, SERVERS[holder]) {
                        Dropped::Remove => s.entry = None,
                        Dropped::Strip => *rec = None,
                        Dropped::Keep => {}
                    }
                }
            }
        }
    }

    /// The custody a keeper records after handing `epoch` out as `label` to `holder`.
    pub(super) fn keep(
        &mut self,
        k: usize,
        epoch: u64,
        label: u64,
        holder: usize,
        rec: StateRecord,
    ) {
        let c = Custody {
            epoch,
            holder: SERVERS[holder].to_string(),
            label,
        };
        self.servers[k].custody = Some((c, rec));
    }
}
