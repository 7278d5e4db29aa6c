//! Eager mode, backup side: the claim rules of one connection's entry in a backup's replica
//! store (decisions 32, 43, 48). The runtime (`mtcp::replica::ReplicaStore`) keeps the entries
//! in a map with their records, memory charges and timestamps; what may happen to an entry is
//! decided here, so the simulation drives the same rules.
//!
//! An entry is the record at an epoch or a *tombstone* (no record) left by a claim. It is
//! claimed at most once per epoch: the first destination to claim it (or the origin handing the
//! connection over alive) wins; every later claim, and every update from an older or claimed
//! epoch, is refused. A destination's claim is the backup's *custody* of the record: a later
//! claim at the same epoch is [`ClaimError::Held`] — granted only once the holder's successor
//! epoch is fenced ([`Slot::supersede`]), or passed over to a fence whose holder gave its
//! successor up ([`Slot::pass`]).

use crate::custody::{Custody, Fence, GaveUp, Handout, PassError};
use crate::stream::Refusal;
use crate::wire::RefuseCode;

/// One connection's entry, without its record: the caller keeps the record (or none, for a
/// tombstone) beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub epoch: u64,
    /// The stored restart point's offsets (0 for a tombstone).
    pub in_off: u64,
    pub out_off: u64,
    /// Who claimed it, if it is claimed (only that server may release the claim).
    pub claimer: Option<String>,
    /// The server whose replica this is ("" for a tombstone). Its own claim (an origin handing
    /// the connection over alive) is a plain fence: the origin keeps the custody then.
    pub origin: String,
    /// The epoch the record is handed out as: `epoch`, or higher once a holder was superseded
    /// (the claimer resumes at `label + 1`).
    pub label: u64,
    /// The claim is a destination's takeover (not the origin's hand-over fence, nor a keeper's
    /// fence): this backup keeps the custody, and the claim can be superseded.
    pub custody: bool,
    /// A plain claim of a later epoch than the entry's, and who made it: a fence of a holder's
    /// successor epoch at a backup that is also a backup of the entry's epoch (two backups or
    /// more per server). The later epoch is claimed as a tombstone would claim it — no update
    /// up to it is stored, a second claim of it is refused — while the entry stays claimable
    /// at its own epoch: replacing it would refuse every later takeover of that epoch here.
    pub fenced: Option<(u64, String)>,
    /// The custody claim of an earlier epoch that this entry's origin held here when it stored
    /// this entry — its own new epoch, after a takeover from the replicas — at a backup that
    /// is also a backup of the epoch it took over (two backups or more per server). Claims of
    /// that epoch still meet the claim ([`ClaimError::Held`]) instead of finding it past.
    pub took: Option<Custody>,
}

/// What storing an update does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// The update replaces the entry ([`Slot::stored`]).
    Replace,
    /// A late, older update at the same epoch: the newer entry stays.
    KeepNewer,
}

/// Why an update is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("moved on (epoch {at}{}); update for epoch {epoch} refused", if *.claimed { ", claimed" } else { "" })]
pub struct MovedOn {
    /// The entry's epoch.
    pub at: u64,
    pub claimed: bool,
    /// The update's epoch.
    pub epoch: u64,
}

/// What a granted claim hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granted {
    /// The entry's record (or its tombstone) at `epoch`, labelled `label`.
    Entry { epoch: u64, label: u64 },
    /// No entry at that epoch: the caller leaves [`Slot::tombstone`] (no record) in its place.
    Tombstone,
    /// A plain claim of a later epoch than the entry's: noted in the entry ([`Slot::fenced`]),
    /// which stays as it is; or a takeover's claim of an earlier epoch than one its claimer
    /// already fenced here. Nothing to hand out at that epoch.
    Fenced,
}

/// Why a claim was not granted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The connection is past that epoch here.
    #[error("is at epoch {at} here, not {epoch}")]
    Past { at: u64, epoch: u64 },
    /// A plain claim (a hand-over fence or a keeper's fence) holds that epoch.
    #[error("at epoch {epoch} was already taken over")]
    Taken { epoch: u64 },
    /// Another destination holds it: granted once its successor epoch is fenced
    /// ([`Slot::supersede`]) or it gives that epoch up ([`Slot::pass`]).
    #[error("at epoch {} is held by {}", .0.epoch, .0.holder)]
    Held(Custody),
}

impl ClaimError {
    /// The refusal code a claim answers with.
    pub fn code(&self) -> RefuseCode {
        RefuseCode::StaleEpoch
    }
}

/// Why a supersede or a pass did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandError {
    /// The entry is no longer held as the caller saw it (someone else superseded it meanwhile).
    #[error("changed hands meanwhile")]
    ChangedHands,
    /// The fence does not allow it (`Custody::supersede`).
    #[error("{}", .0.reason)]
    Refused(Refusal),
    /// The claimer answered RESUMED and its epoch is not fenced (`Custody::pass`).
    #[error(transparent)]
    Pass(#[from] PassError),
}

impl HandError {
    pub fn code(&self) -> RefuseCode {
        match self {
            HandError::ChangedHands => RefuseCode::StaleEpoch,
            HandError::Refused(r) => r.code,
            HandError::Pass(e) => e.code(),
        }
    }
}

/// What a confirmation ([`Slot::drop_upto`]) does to the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Nothing (newer here, or claimed by someone else).
    Keep,
    /// Unclaimed (an orderly close): the entry goes.
    Remove,
    /// Claimed by the confirmer: the record goes, the claim stays as a plain tombstone.
    Strip,
}

impl Slot {
    /// An entry freshly stored by `from` at `epoch` with its restart point's offsets.
    pub fn stored(from: &str, epoch: u64, out_off: u64, in_off: u64) -> Slot {
        Slot {
            epoch,
            in_off,
            out_off,
            claimer: None,
            origin: from.to_string(),
            label: epoch,
            custody: false,
            fenced: None,
            took: None,
        }
    }

    /// The entry an update from `from` at `epoch` leaves after [`Store::Replace`] over `cur`:
    /// [`Slot::stored`], keeping the custody claim `from` held here of the epoch before its
    /// own (its takeover's new epoch stored at a backup of the old one: decision 63), or
    /// carried over on a refresh of the same epoch.
    pub fn stored_over(
        cur: Option<&Slot>,
        from: &str,
        epoch: u64,
        out_off: u64,
        in_off: u64,
    ) -> Slot {
        let took = cur.and_then(|c| {
            if c.epoch == epoch {
                c.took.clone()
            } else if c.custody && c.claimer.as_deref() == Some(from) && c.label + 1 == epoch {
                Some(c.custody())
            } else {
                None
            }
        });
        Slot {
            took,
            ..Slot::stored(from, epoch, out_off, in_off)
        }
    }

    /// The claimed tombstone a claim leaves where there was no entry at its epoch.
    pub fn tombstone(epoch: u64, by: &str, supersede: bool) -> Slot {
        Slot {
            epoch,
            in_off: 0,
            out_off: 0,
            claimer: Some(by.to_string()),
            origin: String::new(),
            label: epoch,
            custody: supersede,
            fenced: None,
            took: None,
        }
    }

    pub fn claimed(&self) -> bool {
        self.claimer.is_some()
    }

    /// Whether an update at `epoch` with restart point `(out_off, in_off)` may be stored over
    /// `cur`.
    pub fn check_store(
        cur: Option<&Slot>,
        epoch: u64,
        out_off: u64,
        in_off: u64,
    ) -> Result<Store, MovedOn> {
        let Some(e) = cur else {
            return Ok(Store::Replace);
        };
        if let Some((at, _)) = e.fenced.as_ref().filter(|(at, _)| epoch <= *at) {
            return Err(MovedOn {
                at: *at,
                claimed: true,
                epoch,
            });
        }
        if e.epoch > epoch || (e.epoch == epoch && e.claimed()) {
            return Err(MovedOn {
                at: e.epoch,
                claimed: e.claimed(),
                epoch,
            });
        }
        if e.epoch == epoch && (e.out_off, e.in_off) > (out_off, in_off) {
            return Ok(Store::KeepNewer);
        }
        Ok(Store::Replace)
    }

    /// The custody an update from `from` at `epoch` was refused for: a destination took the
    /// connection over from this replica at that epoch (the updater becomes its keeper).
    pub fn taken(&self, epoch: u64, from: &str) -> Option<Custody> {
        if let Some(t) = self
            .took
            .as_ref()
            .filter(|t| t.epoch == epoch && t.holder != from)
        {
            return Some(t.clone());
        }
        let holder = self.claimer.clone()?;
        (self.epoch == epoch && self.custody && holder != from).then_some(Custody {
            epoch,
            holder,
            label: self.label,
        })
    }

    /// `by` claims the connection at `epoch` (`supersede`: as a destination's takeover, whose
    /// claim is a custody; else a plain fence). Exactly one claim per epoch is granted; an
    /// entry another destination holds is [`ClaimError::Held`].
    pub fn claim(
        cur: Option<&mut Slot>,
        epoch: u64,
        by: &str,
        supersede: bool,
    ) -> Result<Granted, ClaimError> {
        let Some(e) = cur else {
            return Ok(Granted::Tombstone);
        };
        if e.epoch > epoch {
            if let Some(t) = e.took.as_ref().filter(|t| t.epoch == epoch) {
                // The claim of that epoch its holder made here, before it stored its own.
                return Err(ClaimError::Held(t.clone()));
            }
            if supersede && !e.custody && e.claimer.as_deref() == Some(by) {
                // A takeover of `epoch` by the one whose fence already holds the later epoch
                // here (it superseded a holder whose newer record this backup kept, at
                // another backup of the origin): nothing more to hand out, nobody else's.
                return Ok(Granted::Fenced);
            }
            return Err(ClaimError::Past { at: e.epoch, epoch });
        }
        if e.epoch < epoch {
            // Past the entry: judged as the tombstone of its fence would judge it.
            match e.fenced.as_ref() {
                Some((at, _)) if *at > epoch => return Err(ClaimError::Past { at: *at, epoch }),
                // The same fencer again (one takeover superseding at each backup of the
                // origin fences the holder's successor once per backup): already done.
                Some((at, who)) if *at == epoch && who == by && !supersede => {
                    return Ok(Granted::Fenced)
                }
                Some((at, _)) if *at == epoch => return Err(ClaimError::Taken { epoch }),
                _ if !supersede => {
                    e.fenced = Some((epoch, by.to_string()));
                    return Ok(Granted::Fenced);
                }
                _ => return Ok(Granted::Tombstone),
            }
        }
        match &e.claimer {
            // The same fencer's plain claim again: fenced already (a fence never makes an
            // owner; supersedes and passes decide that, each checking the claim they saw).
            Some(c) if c == by && !e.custody && !supersede => Ok(Granted::Entry {
                epoch: e.epoch,
                label: e.label,
            }),
            Some(holder) if e.custody => Err(ClaimError::Held(Custody {
                epoch,
                holder: holder.clone(),
                label: e.label,
            })),
            Some(_) => Err(ClaimError::Taken { epoch }),
            None => {
                e.claimer = Some(by.to_string());
                e.custody = supersede && by != e.origin;
                // The record stays so a released claim can hand it out again.
                Ok(Granted::Entry {
                    epoch: e.epoch,
                    label: e.label,
                })
            }
        }
    }

    /// The custody as it stands.
    fn custody(&self) -> Custody {
        Custody {
            epoch: self.epoch,
            holder: self.claimer.clone().unwrap_or_default(),
            label: self.label,
        }
    }

    /// After [`ClaimError::Held`]: the holder's successor epoch was fenced at its backups
    /// (`fences`, `floor`, `unanswered`: as `Custody::supersede` takes them). Hands the entry to
    /// `by` one epoch up if it is still held as `seen`; returns what to hand out (the entry's
    /// record or the holder's newer one) and the label.
    pub fn supersede(
        &mut self,
        seen: &Custody,
        by: &str,
        fences: &[Fence],
        floor: u64,
        unanswered: bool,
    ) -> Result<(Handout, u64), HandError> {
        if let Some(t) = self.took.as_mut().filter(|t| *t == seen) {
            let r = t
                .supersede(by, fences, floor, unanswered)
                .map_err(HandError::Refused)?;
            return Ok(r);
        }
        let mut c = self.custody();
        if c != *seen {
            return Err(HandError::ChangedHands);
        }
        let (what, label) = c
            .supersede(by, fences, floor, unanswered)
            .map_err(HandError::Refused)?;
        self.claimer = Some(c.holder);
        self.label = label;
        Ok((what, label))
    }

    /// After [`ClaimError::Held`] met a fence by `by`: the holder gave its successor epoch up
    /// (YIELD, as `gave_up` says). The entry passes to `by` as a plain claim one epoch up
    /// (`Custody::pass`, decision 48); returns that label. Refused if the entry is no longer
    /// held as `seen`, or the holder had answered RESUMED and its epoch is not fenced.
    pub fn pass(&mut self, seen: &Custody, by: &str, gave_up: &GaveUp) -> Result<u64, HandError> {
        if let Some(t) = self.took.as_mut().filter(|t| *t == seen) {
            // Passed as a plain claim: the epoch is `by`'s; later claims of it find it past.
            let label = t.pass(by, gave_up)?;
            self.took = None;
            return Ok(label);
        }
        let mut c = self.custody();
        if c != *seen || !self.custody {
            return Err(HandError::ChangedHands);
        }
        let label = c.pass(by, gave_up)?;
        self.claimer = Some(c.holder);
        self.label = label;
        self.custody = false;
        Ok(label)
    }

    /// `by` withdraws its claim at `epoch` (its takeover failed before it served anything):
    /// claimable again, with the record it held. False (nothing changes) unless the entry is
    /// still at that epoch and claimed by `by`.
    pub fn release(&mut self, epoch: u64, by: &str) -> bool {
        if self.epoch == epoch && self.claimer.as_deref() == Some(by) {
            self.claimer = None;
            true
        } else {
            false
        }
    }

    /// The connection closed or moved at `epoch`, said by `by`. An unclaimed entry (the origin
    /// closing in order) is removed. A claimed one is touched only when `by` holds it — a
    /// destination confirming that its backups hold its new epoch and the agent has it — and
    /// then only its record goes: the claim stays as a plain tombstone, so the epoch stays
    /// claimed (a racing or late claim of it must not find it free: decision 48).
    pub fn drop_upto(&mut self, epoch: u64, by: &str) -> Dropped {
        if self
            .took
            .as_ref()
            .is_some_and(|t| t.epoch == epoch && t.holder == by)
        {
            // Its holder confirmed: the newer entry here already says the epoch is past.
            self.took = None;
        }
        if self.epoch > epoch || self.fenced.as_ref().is_some_and(|(at, _)| *at > epoch) {
            // Newer here, or a fence of a later epoch that must outlive it.
            return Dropped::Keep;
        }
        match self.claimer.as_deref() {
            None => Dropped::Remove,
            Some(c) if c == by => {
                self.in_off = 0;
                self.out_off = 0;
                self.custody = false;
                Dropped::Strip
            }
            Some(_) => Dropped::Keep,
        }
    }
}

#[cfg(test)]
mod tests;
