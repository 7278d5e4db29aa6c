//! Eager mode: who keeps a moved connection's restart point until the destination's own
//! backups hold its new epoch, and how the next candidate supersedes a destination that died,
//! hung or was given up on before that (issue 15, decision 43).
//!
//! The *keeper* is the origin that handed the connection over alive, or the backup whose replica
//! a destination claimed. It remembers who took the state (the *holder*) and under which epoch
//! label: the holder resumes at `label + 1`. Another destination asking for the same epoch is
//! given the state only after that successor epoch is *fenced*: claimed at every reachable
//! backup of the holder, so the holder can never store (and so never confirm or serve) it. If
//! the holder had stored it, the fence hands back the holder's newer restart point instead. The
//! state is then handed out under the successor epoch's label, and the new holder resumes one
//! past it: exactly one owner per epoch, and a failed or silent holder never blocks the next.
//! The agent's side is [`Lineage`]: the epochs it can still fall back to.

use crate::stream::Refusal;
use crate::wire::RefuseCode;

mod answer;
mod handout;
mod lineage;
mod own;
mod word;
mod yielding;
pub use answer::read_fence;
pub use handout::{
    after_freeze, prefence_own, rehand_from, AfterFreeze, OwnFence, OwnFences, RehandFrom,
};
pub use lineage::{Lineage, Step, MAX_LINEAGE};
pub use own::{prefenced, rehands_own};
pub use yielding::{before_pass, before_supersede, AfterYield, NotAnAnswer, YieldAnswer};

/// What a keeper knows of the state it handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Custody {
    /// The epoch the agent's token names: requests for any other epoch are not for this state.
    pub epoch: u64,
    /// Who took the state last (server id).
    pub holder: String,
    /// The epoch the state was handed out as: the holder resumes at `label + 1`.
    pub label: u64,
}

/// The answer of one of the holder's backups to the fence (a claim at the successor epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fence {
    /// Claimed; the holder had stored nothing at that epoch.
    Nothing,
    /// Claimed; the holder had stored this restart point (`(out_off, in_off)`) at that epoch.
    Record(u64, u64),
    /// Refused: someone else claimed that epoch, or the connection is past it there.
    Refused(RefuseCode),
    /// Not reached.
    Unreachable,
}

/// What the keeper hands over once the fence stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handout {
    /// Its own restart point.
    Kept,
    /// The holder's newer restart point, the fence's answer at this index.
    Successor(usize),
}

impl Custody {
    /// The state of `epoch` was just handed to `holder` as it is.
    pub fn new(epoch: u64, holder: &str) -> Self {
        Self {
            epoch,
            holder: holder.to_string(),
            label: epoch,
        }
    }

    /// Whether `by`'s word that its backups hold the epoch after `epoch` (DROPREPLICA) ends
    /// this custody: `by` is still the holder, and the custody is of that epoch or an older one
    /// (a confirmation of a later move by the same holder covers it too). A confirmation from
    /// a holder superseded since is not for the state kept now.
    pub fn confirmed_by(&self, epoch: u64, by: &str) -> bool {
        self.epoch <= epoch && self.holder == by
    }

    /// The epoch to fence at the holder's backups before `epoch`'s state may go to anyone
    /// else, or why the request is not for this state.
    pub fn successor(&self, epoch: u64) -> Result<u64, Refusal> {
        if epoch != self.epoch {
            return Err(Refusal::stale_epoch(format!(
                "the connection was handed over at epoch {}, not {epoch}",
                self.epoch
            )));
        }
        Ok(self.label + 1)
    }

    /// The fence at the holder's backups answered `fences`: decides what `by` gets, and
    /// records it as the new holder. Returns what to hand out and the epoch label to hand it
    /// out as (`by` resumes one past it).
    /// * A backup refused: the successor epoch was claimed elsewhere or the connection went on
    ///   past it — the state is no longer this keeper's to give.
    /// * None reached: the holder cannot be fenced — it may be alive and serving.
    /// * Otherwise the newest restart point the holder stored, or the kept one. One fenced
    ///   backup suffices: a holder must store its epoch on *every* backup before it may serve.
    ///
    /// `floor`: the highest epoch label a fence reached on its way (a backup that found the
    /// successor epoch claimed by a failed candidate had that candidate give its own successor
    /// up, see [`Custody::pass`]); the state is handed out at least that high, so the new holder
    /// resumes past every epoch anyone else was given.
    ///
    /// `unanswered`: the holder itself gave the successor epoch up before it answered RESUMED
    /// for it (YIELD granted, [`Verdict::Go`]): it never serves that epoch and no agent holds a
    /// token for it, so nobody can ever take the connection over at that epoch — the fence is
    /// then not needed, and "none reached" does not refuse. Without it, a holder whose only
    /// backup is down (typically: the hung origin itself) made every other candidate fail
    /// while it had given its own epoch up: nobody owned the connection (decision 48).
    pub fn supersede(
        &mut self,
        by: &str,
        fences: &[Fence],
        floor: u64,
        unanswered: bool,
    ) -> Result<(Handout, u64), Refusal> {
        let next = self.label + 1;
        if let Some(code) = fences.iter().find_map(|f| match f {
            Fence::Refused(c) => Some(*c),
            _ => None,
        }) {
            return Err(Refusal::stale_epoch(format!(
                "epoch {next}, taken by {}, is claimed elsewhere or passed ({code:?}): the connection moved on",
                self.holder
            )));
        }
        if !unanswered && fences.iter().all(|f| *f == Fence::Unreachable) {
            return Err(Refusal::origin_unreachable(format!(
                "cannot fence epoch {next} of {}: none of its backups answered",
                self.holder
            )));
        }
        let newest = fences
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match f {
                Fence::Record(o, n) => Some(((*o, *n), i)),
                _ => None,
            })
            .max();
        let label = next.max(floor);
        self.holder = by.to_string();
        self.label = label;
        Ok((
            newest.map_or(Handout::Kept, |(_, i)| Handout::Successor(i)),
            label,
        ))
    }

    /// A fence at this epoch found it claimed by `self.holder`, a candidate whose takeover
    /// failed (its RELEASECLAIM lost) or that the agent never heard from; asked, the holder gave
    /// its successor epoch up (YIELD: it never answers the agent for it, or lets go of what it
    /// built). The claim passes to the fencer `by` one epoch up. Returns the label the fencer
    /// gets the entry as: its own handout must be at least that high. (A holder that does not
    /// answer is not passed over: the fence refuses, as it would for a live owner.)
    ///
    /// A holder that gave its epoch up *before* any RESUMED for it went out
    /// ([`GaveUp::Unanswered`]) needs nothing more: no agent holds a token for that epoch. One
    /// that gave it up *after* its RESUMED went out ([`GaveUp::Answered`]) may have been read by
    /// the agent, which then holds that epoch's token and, the holder having let go, takes the
    /// connection from the holder's backups at that epoch — resuming one past it, at the very
    /// epoch the fencer's next holder resumes at, from another state (the simulation found it:
    /// issue 15's open question, `MTCP_SIM_SEED=2589265266`). So that epoch must first be fenced
    /// at the holder's backups, as [`Custody::supersede`] requires for a holder it supersedes:
    /// the answers are given with it, and the pass is refused unless one landed and none was
    /// refused.
    pub fn pass(&mut self, by: &str, gave_up: &GaveUp) -> Result<u64, PassError> {
        let epoch = self.label + 1;
        if let GaveUp::Answered(fences) = gave_up {
            if let Some(code) = fences.iter().find_map(|f| match f {
                Fence::Refused(c) => Some(*c),
                _ => None,
            }) {
                return Err(PassError::Moved { epoch, code });
            }
            if fences.iter().all(|f| *f == Fence::Unreachable) {
                return Err(PassError::Unfenced { epoch });
            }
        }
        self.holder = by.to_string();
        self.label += 1;
        Ok(self.label)
    }
}

/// How a claimer a fence found gave its successor epoch up (its answer to YIELD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// Before any RESUMED for it went out ([`Verdict::Go`]).
    Unanswered,
    /// After its RESUMED went out ([`Verdict::LetGo`]), with the answers of the claimer's
    /// backups to a fence of that epoch.
    Answered(Vec<Fence>),
}

/// Why a fence does not pass a claimer over ([`Custody::pass`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    /// The claimer answered RESUMED for `epoch` and none of its backups could be fenced.
    #[error(
        "the claimer answered RESUMED for epoch {epoch} and none of its backups could be fenced"
    )]
    Unfenced { epoch: u64 },
    /// A backup of the claimer refused the fence of `epoch`: the agent took it from there.
    #[error(
        "epoch {epoch} of the claimer is claimed elsewhere ({code:?}): the connection moved on"
    )]
    Moved { epoch: u64, code: RefuseCode },
}

impl PassError {
    pub fn code(&self) -> RefuseCode {
        match self {
            PassError::Unfenced { .. } => RefuseCode::OriginUnreachable,
            PassError::Moved { .. } => RefuseCode::StaleEpoch,
        }
    }
}

/// A holder's epoch, from its takeover until the agent speaks on the new session. A keeper may
/// have the holder give the epoch up (YIELD) until the agent has *used* it: not merely until
/// RESUMED was written — the agent may have given up on this candidate before that RESUMED
/// arrived and never read it (decision 48) — but until a frame from the agent arrives on the
/// session RESUMED went out on. Whichever of YIELD and that frame comes first settles it for
/// good: a holder never serves an epoch it gave up, and never gives up one the agent used.
/// COMMITTED goes to the agent only once it was heard ([`Gate::may_commit`]), so an agent that
/// trimmed upstream or forgot its fallbacks on COMMITTED never meets a holder that yielded.
/// A yield granted before RESUMED went out ([`Gate::Yielded`]) is told apart from one granted
/// after ([`Gate::Abandoned`]): only in the first case is it certain that no agent holds a token
/// for the epoch ([`Custody::supersede`]'s `unanswered`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// RESUMED went out; nothing from the agent on that session yet.
    Answered,
    /// The agent spoke on the session: the epoch is the agent's.
    Heard,
    /// Given up at a keeper's request before any RESUMED for it went out.
    Yielded,
    /// Given up at a keeper's request after RESUMED went out (to nobody listening).
    Abandoned,
}

/// What reaches a [`Gate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateEvent {
    /// The takeover is done: RESUMED is about to be written.
    Answer,
    /// A frame from the agent arrived on the session RESUMED went out on.
    Hear,
    /// A keeper asks the holder to give the epoch up (to hand the state to another candidate).
    Yield,
}

/// What the caller of [`Gate::settle`] must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on: write RESUMED, process the frame, or (for a yield) the epoch is given up, no
    /// RESUMED for it ever went out, and there is no connection to let go.
    Go,
    /// Don't: no RESUMED (given up), drop the frame and the session (given up), or refuse the
    /// yield (the agent uses the epoch).
    Refuse,
    /// Yielded after RESUMED went out: the connection built for it must be let go (it never
    /// serves again; the agent never used it, but may hold the epoch's token).
    LetGo,
}

impl Gate {
    /// `event` reaches the gate (`None`: nothing yet); updates it and says what to do.
    pub fn settle(slot: &mut Option<Gate>, event: GateEvent) -> Verdict {
        use GateEvent::*;
        match (*slot, event) {
            (None, Answer) => {
                *slot = Some(Gate::Answered);
                Verdict::Go
            }
            (None, Yield) => {
                *slot = Some(Gate::Yielded);
                Verdict::Go
            }
            (Some(Gate::Answered), Yield) => {
                *slot = Some(Gate::Abandoned);
                Verdict::LetGo
            }
            (None | Some(Gate::Answered), Hear) => {
                *slot = Some(Gate::Heard);
                Verdict::Go
            }
            (Some(Gate::Heard), Yield) => Verdict::Refuse,
            (Some(Gate::Yielded | Gate::Abandoned), Answer | Hear) => Verdict::Refuse,
            (Some(Gate::Yielded), Yield) => Verdict::Go,
            // Repeated after RESUMED went out: still "answered" (the connection is gone already).
            (Some(Gate::Abandoned), Yield) => Verdict::LetGo,
            // Repeated: nothing changes.
            (Some(Gate::Answered | Gate::Heard), Answer) | (Some(Gate::Heard), Hear) => Verdict::Go,
        }
    }

    /// COMMITTED may go to the agent: the agent spoke on the session, so the epoch can no
    /// longer be given up.
    pub fn may_commit(slot: Option<Gate>) -> bool {
        slot == Some(Gate::Heard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custody::lineage::tests::step;

    mod edges;

    #[test]
    fn a_silent_holder_is_fenced_and_the_next_gets_the_state_one_epoch_up() {
        // s1 handed epoch 5 to s2 (which resumes at 6).
        let mut c = Custody::new(5, "s2");
        assert_eq!(c.successor(4).unwrap_err().code, RefuseCode::StaleEpoch);
        assert_eq!(c.successor(5).unwrap(), 6);
        // s2 stored nothing at 6 on its backup: s3 gets the kept point, labelled 6.
        assert_eq!(
            c.supersede("s3", &[Fence::Nothing], 0, false).unwrap(),
            (Handout::Kept, 6)
        );
        assert_eq!((c.holder.as_str(), c.label), ("s3", 6));
        // s3 dies too: the agent still asks for epoch 5; s3's successor 7 is fenced next.
        assert_eq!(c.successor(5).unwrap(), 7);
        assert_eq!(
            c.supersede(
                "s1",
                &[Fence::Unreachable, Fence::Record(100, 40)],
                0,
                false
            )
            .unwrap(),
            (Handout::Successor(1), 7)
        );
        assert_eq!((c.holder.as_str(), c.label), ("s1", 7));
    }

    #[test]
    fn the_newest_stored_point_wins_and_a_refusal_or_no_backup_refuses() {
        let mut c = Custody::new(2, "s2");
        let f = [
            Fence::Record(50, 10),
            Fence::Nothing,
            Fence::Record(80, 10),
            Fence::Unreachable,
        ];
        assert_eq!(
            c.supersede("s3", &f, 0, false).unwrap(),
            (Handout::Successor(2), 3)
        );
        // Someone else claimed the successor epoch (or the connection went past it): refused,
        // and the custody is unchanged.
        let mut c = Custody::new(2, "s2");
        let e = c
            .supersede(
                "s3",
                &[Fence::Nothing, Fence::Refused(RefuseCode::StaleEpoch)],
                0,
                true,
            )
            .unwrap_err();
        assert_eq!(e.code, RefuseCode::StaleEpoch);
        assert_eq!(c, Custody::new(2, "s2"));
        // No backup of the holder answered: it cannot be fenced, nothing is handed out.
        let e = c
            .supersede("s3", &[Fence::Unreachable, Fence::Unreachable], 0, false)
            .unwrap_err();
        assert_eq!(e.code, RefuseCode::OriginUnreachable);
        assert_eq!(c, Custody::new(2, "s2"));
        assert!(c.supersede("s3", &[], 0, false).is_err());
    }

    /// What `crash::racing_takeovers_have_exactly_one_winner` caught once the confirmed claim
    /// stayed: with the origin s1 hung, s3 claimed first at s1's backup s2; s2's own claim found
    /// s3 holding it and asked it to yield, which it did (its RESUMED had not gone out: it was
    /// still pushing to its only backup — s1, hung); the fence of s3's epoch 1 then reached no
    /// backup of s3 and refused, so nobody had the connection. A holder that gave the epoch up
    /// before answering needs no fence.
    #[test]
    fn a_holder_that_yielded_before_answering_needs_no_fence() {
        let mut c = Custody::new(0, "s3");
        assert_eq!(
            c.supersede("s2", &[Fence::Unreachable], 0, true).unwrap(),
            (Handout::Kept, 1)
        );
        assert_eq!((c.holder.as_str(), c.label), ("s2", 1));
        // With no backup reachable, only the holder's own word before answering will do: one
        // that yielded after its RESUMED went out (the agent may hold its token), or that was
        // not reached, is not superseded.
        let mut c = Custody::new(0, "s3");
        assert!(c.supersede("s2", &[Fence::Unreachable], 0, false).is_err());
        assert!(c.supersede("s2", &[], 0, false).is_err());
        assert!(c.supersede("s2", &[], 0, true).is_ok());
        // The gate tells the keeper which: Go before RESUMED went out, LetGo after, every time.
        use GateEvent::*;
        let mut g = None;
        assert_eq!(Gate::settle(&mut g, Yield), Verdict::Go);
        assert_eq!(Gate::settle(&mut g, Yield), Verdict::Go);
        let mut g = None;
        assert_eq!(Gate::settle(&mut g, Answer), Verdict::Go);
        assert_eq!(Gate::settle(&mut g, Yield), Verdict::LetGo);
        assert_eq!(Gate::settle(&mut g, Yield), Verdict::LetGo);
    }

    #[test]
    fn a_yield_wins_until_the_agent_speaks_on_the_new_session() {
        use GateEvent::*;
        // Yielded before the takeover finished: it never answers, never serves.
        let mut g = None;
        assert_eq!(Gate::settle(&mut g, Yield), Verdict::Go);
        assert_eq!(Gate::settle(&mut g, Answer), Verdict::Refuse);
        assert_eq!(Gate::settle(&mut g, Hear), Verdict::Refuse);
        assert!(!Gate::may_commit(g));
        // RESUMED went out, but the agent had given up on this candidate and never speaks: the
        // keeper's yield wins and the built connection is let go (decision 48).
        let mut g = None;
        assert_eq!(Gate::settle(&mut g, Answer), Verdict::Go);
        assert!(!Gate::may_commit(g), "no COMMITTED before the agent spoke");
        assert_eq!(Gate::settle(&mut g, Yield), Verdict::LetGo);
        assert_eq!(
            Gate::settle(&mut g, Hear),
            Verdict::Refuse,
            "a late frame is dropped"
        );
        assert_eq!(
            Gate::settle(&mut g, Yield),
            Verdict::LetGo,
            "still answered"
        );
        // The agent spoke first: the epoch is its, a keeper's yield is refused.
        let mut g = None;
        assert_eq!(Gate::settle(&mut g, Answer), Verdict::Go);
        assert_eq!(Gate::settle(&mut g, Hear), Verdict::Go);
        assert!(Gate::may_commit(g));
        assert_eq!(Gate::settle(&mut g, Yield), Verdict::Refuse);
        assert_eq!(Gate::settle(&mut g, Hear), Verdict::Go);
        assert_eq!(Gate::settle(&mut g, Answer), Verdict::Go);
    }

    fn event() -> impl proptest::strategy::Strategy<Value = GateEvent> {
        proptest::prop_oneof![
            proptest::strategy::Just(GateEvent::Answer),
            proptest::strategy::Just(GateEvent::Hear),
            proptest::strategy::Just(GateEvent::Yield),
        ]
    }

    proptest::proptest! {
        /// Exactly one owner per epoch, whatever the order: once a yield was granted, no frame
        /// of the agent is ever processed nor COMMITTED sent, and once a frame was processed no
        /// yield is granted; a connection is let go only if RESUMED went out, and a yield is
        /// granted as "never answered" (Go) only if no RESUMED went out.
        #[test]
        fn a_granted_yield_and_a_heard_agent_exclude_each_other(
            events in proptest::collection::vec(event(), 0..12)
        ) {
            let mut g = None;
            let (mut yielded, mut heard, mut answered) = (false, false, false);
            for e in events {
                let v = Gate::settle(&mut g, e);
                match (e, v) {
                    (GateEvent::Yield, Verdict::Go | Verdict::LetGo) => yielded = true,
                    (GateEvent::Hear, Verdict::Go) => heard = true,
                    (GateEvent::Answer, Verdict::Go) => answered = true,
                    _ => {}
                }
                if v == Verdict::LetGo {
                    proptest::prop_assert!(answered);
                }
                if (e, v) == (GateEvent::Yield, Verdict::Go) {
                    proptest::prop_assert!(!answered);
                }
                proptest::prop_assert!(!(yielded && heard));
                proptest::prop_assert!(!(yielded && Gate::may_commit(g)));
                proptest::prop_assert!(!(yielded && answered && g != Some(Gate::Abandoned)));
            }
        }
    }

    #[test]
    fn a_failed_candidates_claim_passes_one_epoch_up_and_raises_the_handout() {
        // s3 claimed the holder s2's successor epoch 6 at s2's backup (label 6: s3 would resume
        // at 7), failed, and its release was lost. The keeper's fence finds it; s3 gives 7 up.
        let mut claim = Custody::new(6, "s3");
        assert_eq!(claim.pass("s1", &GaveUp::Unanswered), Ok(7));
        assert_eq!((claim.holder.as_str(), claim.label), ("s1", 7));
        // The keeper (custody of epoch 5, handed to s2) hands its state out at 7: the next
        // holder resumes at 8, past anything s2 or s3 was given.
        let mut c = Custody::new(5, "s2");
        assert_eq!(
            c.supersede("s4", &[Fence::Nothing], 7, false).unwrap(),
            (Handout::Kept, 7)
        );
        // A floor below the successor changes nothing.
        let mut c = Custody::new(5, "s2");
        assert_eq!(c.supersede("s4", &[Fence::Nothing], 3, false).unwrap().1, 6);
    }

    /// Issue 15's open question, answered by the simulation: a candidate that answered RESUMED
    /// (the agent may hold its token) is passed over only once its epoch is fenced at its own
    /// backups; otherwise the agent could take that epoch from them and resume at the epoch the
    /// fencer's next holder resumes at.
    #[test]
    fn a_claimer_that_answered_is_passed_over_only_once_its_epoch_is_fenced() {
        let mut claim = Custody::new(3, "s3");
        let unfenced = GaveUp::Answered(vec![Fence::Unreachable]);
        assert_eq!(
            claim.pass("s1", &unfenced),
            Err(PassError::Unfenced { epoch: 4 })
        );
        let moved = GaveUp::Answered(vec![Fence::Nothing, Fence::Refused(RefuseCode::StaleEpoch)]);
        assert_eq!(
            claim.pass("s1", &moved).unwrap_err().code(),
            RefuseCode::StaleEpoch
        );
        assert_eq!(claim, Custody::new(3, "s3"), "nothing changed");
        let fenced = GaveUp::Answered(vec![Fence::Unreachable, Fence::Record(10, 5)]);
        assert_eq!(claim.pass("s1", &fenced), Ok(4));
        assert_eq!((claim.holder.as_str(), claim.label), ("s1", 4));
    }
}
