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

use crate::auth::Token;
use crate::stream::Refusal;
use crate::wire::RefuseCode;

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

    /// The epoch to fence at the holder's backups before `epoch`'s state may go to anyone
    /// else, or why the request is not for this state.
    pub fn successor(&self, epoch: u64) -> Result<u64, Refusal> {
        if epoch != self.epoch {
            return Err((
                RefuseCode::StaleEpoch,
                format!(
                    "the connection was handed over at epoch {}, not {epoch}",
                    self.epoch
                ),
            ));
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
    pub fn supersede(&mut self, by: &str, fences: &[Fence]) -> Result<(Handout, u64), Refusal> {
        let next = self.label + 1;
        if let Some(code) = fences.iter().find_map(|f| match f {
            Fence::Refused(c) => Some(*c),
            _ => None,
        }) {
            return Err((
                RefuseCode::StaleEpoch,
                format!(
                    "epoch {next}, taken by {}, is claimed elsewhere or passed ({code:?}): the connection moved on",
                    self.holder
                ),
            ));
        }
        if fences.iter().all(|f| *f == Fence::Unreachable) {
            return Err((
                RefuseCode::OriginUnreachable,
                format!(
                    "cannot fence epoch {next} of {}: none of its backups answered",
                    self.holder
                ),
            ));
        }
        let newest = fences
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match f {
                Fence::Record(o, n) => Some(((*o, *n), i)),
                _ => None,
            })
            .max();
        self.holder = by.to_string();
        self.label = next;
        Ok((
            newest.map_or(Handout::Kept, |(_, i)| Handout::Successor(i)),
            next,
        ))
    }
}

/// A holder's epoch, between its takeover and its RESUMED: either RESUMED goes out to the agent
/// or a keeper has the holder give the epoch up first (YIELD). Whichever comes first settles it
/// for good: a holder never answers the agent for an epoch it gave up, and never gives up one
/// the agent may already hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Answered,
    Yielded,
}

impl Gate {
    /// `event` reaches the gate (`None`: nothing yet); returns how it is settled. `event` won
    /// when the result equals it.
    pub fn settle(slot: &mut Option<Gate>, event: Gate) -> Gate {
        *slot.get_or_insert(event)
    }
}

/// One epoch the agent can move the connection from: its server, and the token for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub server: String,
    pub epoch: u64,
    pub token: Token,
}

/// At most this many unconfirmed moves are remembered (each is a few dozen bytes; a chain of
/// moves none of whose destinations could reach a backup is a failing cluster).
pub const MAX_LINEAGE: usize = 8;

/// The agent's side: the epochs it moved away from whose destinations have not yet confirmed
/// (COMMITTED) that their backups hold the new epoch. Until then the agent keeps upstream from
/// the last restart point a backup confirmed (it trims on COMMITTED only), and if no candidate
/// can take the connection at its current epoch it retries from these, newest first: their
/// keepers fence the dead destination's epoch and hand the state again.
#[derive(Clone, Debug, Default)]
pub struct Lineage {
    steps: Vec<Step>,
}

impl Lineage {
    /// A move from `from` was answered RESUMED: remember it until confirmed. A move made from
    /// a fallback forgets the unconfirmed epochs after that fallback (they were abandoned).
    pub fn moved(&mut self, from: Step) {
        self.steps.retain(|s| s.epoch < from.epoch);
        self.steps.push(from);
        if self.steps.len() > MAX_LINEAGE {
            self.steps.remove(0);
        }
    }

    /// COMMITTED from the current server: its epoch is on its backups; nothing to fall back to.
    pub fn confirmed(&mut self) {
        self.steps.clear();
    }

    /// The newest epoch to fall back to, below `tried` (the epoch just tried everywhere).
    pub fn fallback(&self, tried: u64) -> Option<&Step> {
        self.steps.iter().rev().find(|s| s.epoch < tried)
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_holder_is_fenced_and_the_next_gets_the_state_one_epoch_up() {
        // s1 handed epoch 5 to s2 (which resumes at 6).
        let mut c = Custody::new(5, "s2");
        assert_eq!(c.successor(4).unwrap_err().0, RefuseCode::StaleEpoch);
        assert_eq!(c.successor(5).unwrap(), 6);
        // s2 stored nothing at 6 on its backup: s3 gets the kept point, labelled 6.
        assert_eq!(
            c.supersede("s3", &[Fence::Nothing]).unwrap(),
            (Handout::Kept, 6)
        );
        assert_eq!((c.holder.as_str(), c.label), ("s3", 6));
        // s3 dies too: the agent still asks for epoch 5; s3's successor 7 is fenced next.
        assert_eq!(c.successor(5).unwrap(), 7);
        assert_eq!(
            c.supersede("s1", &[Fence::Unreachable, Fence::Record(100, 40)])
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
        assert_eq!(c.supersede("s3", &f).unwrap(), (Handout::Successor(2), 3));
        // Someone else claimed the successor epoch (or the connection went past it): refused,
        // and the custody is unchanged.
        let mut c = Custody::new(2, "s2");
        let e = c
            .supersede(
                "s3",
                &[Fence::Nothing, Fence::Refused(RefuseCode::StaleEpoch)],
            )
            .unwrap_err();
        assert_eq!(e.0, RefuseCode::StaleEpoch);
        assert_eq!(c, Custody::new(2, "s2"));
        // No backup of the holder answered: it cannot be fenced, nothing is handed out.
        let e = c
            .supersede("s3", &[Fence::Unreachable, Fence::Unreachable])
            .unwrap_err();
        assert_eq!(e.0, RefuseCode::OriginUnreachable);
        assert_eq!(c, Custody::new(2, "s2"));
        assert!(c.supersede("s3", &[]).is_err());
    }

    #[test]
    fn the_first_of_resumed_and_yield_settles_the_gate() {
        let mut g = None;
        assert_eq!(Gate::settle(&mut g, Gate::Answered), Gate::Answered);
        // A keeper asking later is refused: the agent may hold this epoch.
        assert_eq!(Gate::settle(&mut g, Gate::Yielded), Gate::Answered);
        let mut g = None;
        assert_eq!(Gate::settle(&mut g, Gate::Yielded), Gate::Yielded);
        // The holder finishing its takeover later must not answer.
        assert_eq!(Gate::settle(&mut g, Gate::Answered), Gate::Yielded);
        assert_eq!(Gate::settle(&mut g, Gate::Yielded), Gate::Yielded);
    }

    fn step(server: &str, epoch: u64) -> Step {
        Step {
            server: server.into(),
            epoch,
            token: Token([epoch as u8; 32]),
        }
    }

    #[test]
    fn the_agent_falls_back_newest_first_until_a_move_is_confirmed() {
        let mut l = Lineage::default();
        assert!(l.fallback(3).is_none());
        // s1@3 → s2 (4, unconfirmed) → s3 (5, unconfirmed).
        l.moved(step("s1", 3));
        l.moved(step("s2", 4));
        // Epoch 5 refused everywhere: fall back to s2@4, then s1@3.
        assert_eq!(l.fallback(5), Some(&step("s2", 4)));
        assert_eq!(l.fallback(4), Some(&step("s1", 3)));
        assert_eq!(l.fallback(3), None);
        // The move from s1@3 succeeded (resumed at 6): s2@4 was abandoned.
        l.moved(step("s1", 3));
        assert_eq!(l.fallback(6), Some(&step("s1", 3)));
        assert_eq!(l.fallback(3), None);
        l.confirmed();
        assert!(l.is_empty() && l.fallback(100).is_none());
        for e in 0..20 {
            l.moved(step("s", e));
        }
        assert_eq!(l.steps.len(), MAX_LINEAGE);
    }
}
