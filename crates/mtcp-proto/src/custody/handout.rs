//! An eager origin handing a connection out (`mtcp/src/eager/handover.rs`): what its fences of
//! its own backups decide, and where a second hand-out of the same epoch comes from.

use super::Fence;
use crate::wire::RefuseCode;

/// An origin fencing its own epoch at each of its backups, in turn, before it hands the live
/// connection over (decision 48): a backup that refuses means the connection was taken over
/// from a replica meanwhile, and nothing is handed out; a backup not reached is passed by (dead
/// or cut off, it serves no one). A fence that had to pass a failed candidate's claim over
/// reached a higher epoch label: the state is handed out at the highest one seen, so the
/// destination resumes past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnFences {
    epoch: u64,
    label: u64,
}

/// What one backup's fence means to the hand-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnFence {
    /// Fenced (with or without a record): on to the next backup.
    Fenced,
    /// Not reached: on to the next backup, with a warning.
    Unreached,
    /// Refused with this code: the hand-out stops, refused.
    Stop(RefuseCode),
}

impl OwnFences {
    /// Fencing `epoch`, the one the FETCH names.
    pub fn new(epoch: u64) -> Self {
        OwnFences {
            epoch,
            label: epoch,
        }
    }

    /// One backup's fence, as [`super::read_fence`] read it (`seen`: the label of the record
    /// it handed back).
    pub fn on(&mut self, fence: &Fence, seen: Option<u64>) -> OwnFence {
        self.label = self.label.max(seen.unwrap_or(self.label));
        match fence {
            Fence::Nothing | Fence::Record(..) => OwnFence::Fenced,
            Fence::Unreachable => OwnFence::Unreached,
            Fence::Refused(code) => OwnFence::Stop(*code),
        }
    }

    /// The epoch label to hand the state out at: the FETCH's epoch, or higher when a fence
    /// passed a failed candidate over.
    pub fn label(&self) -> u64 {
        self.label
    }

    /// Whether the label was raised past the FETCH's epoch.
    pub fn raised(&self) -> bool {
        self.label > self.epoch
    }
}

/// Where a keeper asked again for `epoch` (a FETCH for a connection it no longer serves) takes
/// the state from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RehandFrom {
    /// Its custody.
    Custody,
    /// The stream it kept, let go, for the destination that took the connection over from a
    /// backup's replica at that epoch (decision 48): it becomes the custody first.
    Taken,
    /// Nothing to hand out here.
    Nothing,
}

/// Where a re-hand of `epoch` comes from, given the epoch of the custody kept (if any) and of
/// the taker a kept stream waits for (if any): a custody of that epoch, else a stream kept for
/// that epoch's taker, else a custody of another epoch (which then refuses, as stale). The
/// stream comes before an older custody: that one is an older move's, still unconfirmed because
/// the keeper took the connection back itself and went on from there (a lab run lost the
/// connection to that custody's `StaleEpoch`).
pub fn rehand_from(custody: Option<u64>, taken: Option<u64>, epoch: u64) -> RehandFrom {
    match (custody, taken) {
        (Some(c), _) if c == epoch => RehandFrom::Custody,
        (_, Some(t)) if t == epoch => RehandFrom::Taken,
        (Some(_), _) => RehandFrom::Custody,
        (None, _) => RehandFrom::Nothing,
    }
}

/// Where an origin's FETCH goes after it tried to freeze the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFreeze {
    /// Frozen here: hand it over (eager: after fencing its epoch, [`OwnFences`]).
    HandOver,
    /// Hand it out again from custody ([`rehand_from`]).
    Rehand,
    /// Refuse with the freeze's own refusal.
    Refuse,
}

/// Where a FETCH goes, given the freeze's refusal code (`None`: frozen). In eager mode a
/// connection this server no longer serves (`UnknownConnection`) may be in its custody; and one
/// at another epoch (`StaleEpoch`) is handed out again when this keeper holds its own re-hand,
/// detached and unheard (`holds_own`: [`super::rehands_own`], decision 64). Lazy servers keep no
/// custody.
pub fn after_freeze(refused: Option<RefuseCode>, eager: bool, holds_own: bool) -> AfterFreeze {
    match refused {
        None => AfterFreeze::HandOver,
        Some(RefuseCode::UnknownConnection) if eager => AfterFreeze::Rehand,
        Some(RefuseCode::StaleEpoch) if eager && holds_own => AfterFreeze::Rehand,
        Some(_) => AfterFreeze::Refuse,
    }
}

/// Whether a keeper re-handing a connection it holds itself at `own_epoch` (`holds_own`) fences
/// that epoch at its backups first (decision 64): unless the agent's word rules it out
/// (`ruled_out`: [`crate::wire::Holding::rules_out`] for the MIGRATE that epoch was served
/// for, decision 66) — no agent will use it.
pub fn prefence_own(holds_own: bool, ruled_out: bool) -> bool {
    holds_own && !ruled_out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_that_grant_or_miss_go_on_and_a_refusal_stops_the_hand_out() {
        let mut f = OwnFences::new(3);
        assert_eq!(f.on(&Fence::Nothing, None), OwnFence::Fenced);
        assert_eq!(f.on(&Fence::Record(10, 2), Some(3)), OwnFence::Fenced);
        assert_eq!(f.on(&Fence::Unreachable, None), OwnFence::Unreached);
        assert_eq!((f.label(), f.raised()), (3, false));
        assert_eq!(
            f.on(&Fence::Refused(RefuseCode::StaleEpoch), None),
            OwnFence::Stop(RefuseCode::StaleEpoch)
        );
    }

    #[test]
    fn the_state_goes_out_at_the_highest_label_a_fence_reached() {
        let mut f = OwnFences::new(3);
        f.on(&Fence::Nothing, Some(5));
        f.on(&Fence::Record(1, 1), Some(4));
        // A lower label (a record relabelled below) never lowers it.
        f.on(&Fence::Nothing, Some(2));
        assert_eq!((f.label(), f.raised()), (5, true));
    }

    #[test]
    fn a_re_hand_takes_the_custody_of_its_epoch_then_the_taken_stream_then_any_custody() {
        use RehandFrom::*;
        assert_eq!(rehand_from(Some(4), Some(4), 4), Custody);
        assert_eq!(rehand_from(Some(2), Some(4), 4), Taken);
        assert_eq!(rehand_from(None, Some(4), 4), Taken);
        assert_eq!(rehand_from(Some(2), Some(3), 4), Custody);
        assert_eq!(rehand_from(Some(2), None, 4), Custody);
        assert_eq!(rehand_from(None, Some(3), 4), Nothing);
        assert_eq!(rehand_from(None, None, 4), Nothing);
    }

    #[test]
    fn a_fetch_is_handed_over_re_handed_from_custody_or_refused() {
        use AfterFreeze::*;
        assert_eq!(after_freeze(None, false, false), HandOver);
        assert_eq!(after_freeze(None, true, true), HandOver);
        let unknown = Some(RefuseCode::UnknownConnection);
        assert_eq!(after_freeze(unknown, true, false), Rehand);
        assert_eq!(
            after_freeze(unknown, false, false),
            Refuse,
            "lazy: no custody"
        );
        let stale = Some(RefuseCode::StaleEpoch);
        assert_eq!(after_freeze(stale, true, true), Rehand);
        assert_eq!(after_freeze(stale, true, false), Refuse);
        assert_eq!(after_freeze(stale, false, true), Refuse);
        for code in [RefuseCode::Busy, RefuseCode::Divergence, RefuseCode::Closed] {
            assert_eq!(after_freeze(Some(code), true, true), Refuse, "{code:?}");
        }
    }

    #[test]
    fn a_keeper_fences_its_own_copy_first_unless_the_word_rules_it_out() {
        assert!(prefence_own(true, false));
        assert!(!prefence_own(true, true));
        assert!(!prefence_own(false, false));
    }
}
