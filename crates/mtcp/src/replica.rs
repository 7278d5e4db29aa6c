//! Eager mode, backup side: the newest state record of each connection other servers replicate
//! here, with the claims that fence a connection once it has moved.
//!
//! One entry per connection: the record at its epoch, or a *tombstone* (no record) left by a
//! claim. An entry is claimed at most once per epoch — the first destination to claim it (or
//! the origin handing the connection over alive) wins, every later claim and every update from
//! an older or claimed epoch is refused. A claimed entry keeps its record: a destination whose
//! takeover fails before it served anything *releases* its claim (RELEASECLAIM), and the entry
//! is claimable again with the same record (decision 32). A destination's claim is also the
//! backup's *custody* of the record (`mtcp_proto::custody`, decision 43): a later claim at the
//! same epoch is refused only until the holder's successor epoch is fenced at the holder's
//! backups ([`ReplicaStore::supersede`]); then the record goes to the new claimer one epoch
//! up. Memory is bounded (`max_bytes`) and entries not refreshed for `ttl` are forgotten.
//! The claim rules themselves are `mtcp_proto::replica::Slot` (sans-IO, driven by the
//! simulation too); this holds the entries, their records, charges and times under one lock.

use crate::custody::Fenced;
use mtcp_proto::custody::{Custody, GaveUp, Handout};
use mtcp_proto::replica::{self as rules, Dropped, Granted, Slot, Store};
use mtcp_proto::stream::{Refusal, ServerStream, Snap};
use mtcp_proto::wire::RefuseCode;
use mtcp_proto::{Cid, StateRecord};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes an entry is charged beyond its record (map slot, keys).
const ENTRY_OVERHEAD: usize = 128;

struct Entry {
    /// The claim rules' part (`mtcp_proto::replica`).
    slot: Slot,
    /// The encoded record; empty for a tombstone.
    rec: Vec<u8>,
    from: String,
    updated: Instant,
}

/// What a successful claim hands over.
#[derive(Debug)]
pub enum Claimed {
    /// The newest replica at the claimed epoch (encoded record; its epoch is the label the
    /// claimer resumes one past, higher than the claimed one after a supersede).
    Record(Vec<u8>),
    /// No replica at that epoch; the claim is recorded all the same.
    Nothing,
}

/// Why a claim was not granted.
#[derive(Debug)]
pub enum ClaimError {
    Refused(Refusal),
    /// Another destination holds it: granted once its successor epoch is fenced
    /// ([`ReplicaStore::supersede`]).
    Held(Custody),
}

impl ClaimError {
    /// The refusal code a plain claim answers with.
    #[cfg(test)]
    pub fn code(&self) -> RefuseCode {
        match self {
            ClaimError::Refused((c, _)) => *c,
            ClaimError::Held(_) => RefuseCode::StaleEpoch,
        }
    }
}

impl From<Refusal> for ClaimError {
    fn from(r: Refusal) -> Self {
        ClaimError::Refused(r)
    }
}

/// A connection taken over from this store's replica, and the taker's custody.
pub type Taken = (Cid, Custody);

/// `bytes` (an encoded record, or empty for "nothing": the implicit start of a new connection)
/// of the entry at `epoch`, handed out as epoch `label`.
fn labelled(cid: Cid, bytes: &[u8], epoch: u64, label: u64) -> Claimed {
    if bytes.is_empty() {
        if label == epoch {
            return Claimed::Nothing;
        }
        let start = Snap {
            state: None,
            in_off: 0,
            out_off: 0,
        };
        return Claimed::Record(ServerStream::replica_record(cid, label, &start).encode());
    }
    match StateRecord::decode(bytes) {
        Ok(mut r) if r.epoch != label => {
            r.epoch = label;
            Claimed::Record(r.encode())
        }
        _ => Claimed::Record(bytes.to_vec()),
    }
}

pub(crate) struct ReplicaStore {
    map: Mutex<(HashMap<Cid, Entry>, usize)>,
    max_bytes: usize,
    ttl: Duration,
}

impl ReplicaStore {
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self {
            map: Mutex::new((HashMap::new(), 0)),
            max_bytes,
            ttl,
        }
    }

    fn charge(e: &Entry) -> usize {
        e.rec.len() + ENTRY_OVERHEAD
    }

    /// As [`ReplicaStore::store`], but an update refused because a destination took the
    /// connection over from this replica at that epoch says who, and past which label it
    /// resumes: the updating server becomes that destination's keeper (decision 48).
    pub fn store_or_taken(
        &self,
        from: &str,
        bytes: Vec<u8>,
    ) -> Result<(Cid, u64, u64), (Refusal, Option<Taken>)> {
        let key = StateRecord::decode(&bytes).ok().map(|r| (r.cid, r.epoch));
        self.store(from, bytes).map_err(|r| {
            let taken = key.and_then(|(cid, epoch)| {
                let g = self.map.lock().unwrap_or_else(|p| p.into_inner());
                let c = g.0.get(&cid)?.slot.taken(epoch, from)?;
                Some((cid, c))
            });
            (r, taken)
        })
    }

    /// Stores `bytes` (an encoded record) from server `from`. Returns the record's cid, epoch and
    /// snapshot `out_off` as stored.
    pub fn store(&self, from: &str, bytes: Vec<u8>) -> Result<(Cid, u64, u64), Refusal> {
        let rec = StateRecord::decode(&bytes)
            .map_err(|e| (RefuseCode::Malformed, format!("replica: {e}")))?;
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        let cur = map.get(&rec.cid).map(|e| &e.slot);
        match Slot::check_store(cur, rec.epoch, rec.snap_out, rec.snap_in) {
            Err(m) => {
                return Err((
                    RefuseCode::StaleEpoch,
                    format!("connection {} {m}", rec.cid),
                ));
            }
            Ok(Store::KeepNewer) => {
                // A late, older update: keep the newer one.
                let e = &map[&rec.cid].slot;
                return Ok((rec.cid, e.epoch, e.out_off));
            }
            Ok(Store::Replace) => {}
        }
        let entry = Entry {
            slot: Slot::stored(from, rec.epoch, rec.snap_out, rec.snap_in),
            rec: bytes,
            from: from.to_string(),
            updated: Instant::now(),
        };
        let old = map.get(&rec.cid).map_or(0, Self::charge);
        let new_used = *used - old + Self::charge(&entry);
        if new_used > self.max_bytes {
            return Err((
                RefuseCode::Busy,
                format!(
                    "replica memory full ({} of {} bytes used)",
                    *used, self.max_bytes
                ),
            ));
        }
        *used = new_used;
        let out = (rec.cid, rec.epoch, rec.snap_out);
        map.insert(rec.cid, entry);
        Ok(out)
    }

    /// Claims connection `cid` at `epoch` for `by`: exactly one claim per epoch succeeds
    /// (`mtcp_proto::replica::Slot::claim`). An entry another destination claimed is
    /// [`ClaimError::Held`] (see [`ReplicaStore::supersede`] and [`ReplicaStore::pass`]);
    /// `supersede` says the claim is a destination's takeover (its claim is a custody), not a
    /// fence.
    pub fn claim(
        &self,
        cid: Cid,
        epoch: u64,
        by: &str,
        supersede: bool,
    ) -> Result<Claimed, ClaimError> {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        let cur = map.get_mut(&cid);
        let from = cur.as_ref().map(|e| e.from.clone()).unwrap_or_default();
        match Slot::claim(cur.map(|e| &mut e.slot), epoch, by, supersede) {
            Err(rules::ClaimError::Held(c)) => Err(ClaimError::Held(c)),
            Err(e @ rules::ClaimError::Past { .. }) => Err(ClaimError::Refused((
                e.code(),
                format!("connection {cid} {e}"),
            ))),
            Err(e @ rules::ClaimError::Taken { .. }) => Err(ClaimError::Refused((
                e.code(),
                format!("connection {cid} {e} ({from})"),
            ))),
            Ok(Granted::Entry { epoch, label }) => {
                let e = map.get_mut(&cid).expect("claimed");
                e.updated = Instant::now();
                e.from = format!("claimed by {by}");
                // The record stays (charged) so a released claim can hand it out again.
                Ok(labelled(cid, &e.rec, epoch, label))
            }
            Ok(Granted::Tombstone) => {
                // No entry, or one from an older epoch: leave a claimed tombstone.
                let old = map.get(&cid).map_or(0, Self::charge);
                let t = Entry {
                    slot: Slot::tombstone(epoch, by, supersede),
                    rec: Vec::new(),
                    from: format!("claimed by {by}"),
                    updated: Instant::now(),
                };
                *used = *used - old + Self::charge(&t);
                map.insert(cid, t);
                Ok(Claimed::Nothing)
            }
        }
    }

    /// The refusal of a supersede or pass the entry's rules did not allow.
    fn hand_refusal(cid: Cid, seen: &Custody, e: &Entry, err: rules::HandError) -> Refusal {
        match err {
            rules::HandError::ChangedHands => (
                RefuseCode::StaleEpoch,
                format!(
                    "connection {cid} at epoch {} changed hands meanwhile ({})",
                    seen.epoch, e.from
                ),
            ),
            rules::HandError::Refused(r) => r,
            rules::HandError::Pass(p) => (p.code(), format!("connection {cid}: {p}")),
        }
    }

    /// After [`ClaimError::Held`]: the holder's successor epoch was fenced at its backups
    /// (`f`: their answers, with the records they had, same order). Hands the entry to `by`
    /// one epoch up — its own record or the holder's newer one — if the entry is still held as
    /// `seen` (else the claim is tried anew by the caller's next attempt: refused).
    pub fn supersede(
        &self,
        cid: Cid,
        seen: &Custody,
        by: &str,
        f: &Fenced,
    ) -> Result<Claimed, Refusal> {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = g.0.get_mut(&cid) else {
            return Err((
                RefuseCode::StaleEpoch,
                format!("connection {cid}: its replica went away meanwhile"),
            ));
        };
        let (what, label) = match e.slot.supersede(seen, by, &f.fences, f.floor, f.unanswered) {
            Ok(x) => x,
            Err(err) => return Err(Self::hand_refusal(cid, seen, e, err)),
        };
        e.updated = Instant::now();
        e.from = format!("claimed by {by}, superseding {}", seen.holder);
        let epoch = e.slot.epoch;
        Ok(match what {
            Handout::Kept => labelled(cid, &e.rec, epoch, label),
            Handout::Successor(i) => labelled(
                cid,
                f.records
                    .get(i)
                    .and_then(|r| r.as_deref())
                    .unwrap_or(&e.rec),
                epoch,
                label,
            ),
        })
    }

    /// After [`ClaimError::Held`] met a fence by `by`: the holder gave its successor epoch up
    /// (YIELD). The entry passes to `by` as a plain claim one epoch up (`Custody::pass`,
    /// decision 48); the answer is labelled with that epoch so the fencer hands its own state out
    /// at least that high. Refused if the entry is no longer held as `seen`.
    pub fn pass(
        &self,
        cid: Cid,
        seen: &Custody,
        by: &str,
        gave_up: &GaveUp,
    ) -> Result<Claimed, Refusal> {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = g.0.get_mut(&cid) else {
            return Err((
                RefuseCode::StaleEpoch,
                format!("connection {cid}: its replica went away meanwhile"),
            ));
        };
        let label = match e.slot.pass(seen, by, gave_up) {
            Ok(l) => l,
            Err(err) => return Err(Self::hand_refusal(cid, seen, e, err)),
        };
        e.updated = Instant::now();
        e.from = format!("fenced by {by}, passed over by {}", seen.holder);
        Ok(labelled(cid, &e.rec, e.slot.epoch, label))
    }

    /// `by` withdraws its claim on `cid` at `epoch` (its takeover failed before it served
    /// anything): the entry becomes claimable again, with the record it held. Ignored (returns
    /// false) unless the entry is still at that epoch and claimed by `by`.
    pub fn release(&self, cid: Cid, epoch: u64, by: &str) -> bool {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = g.0.get_mut(&cid) else {
            return false;
        };
        if !e.slot.release(epoch, by) {
            return false;
        }
        e.from = format!("released by {by}");
        e.updated = Instant::now();
        true
    }

    /// The connection closed (or moved) at `epoch`: forget what is held for it up to there.
    /// Sent by `by`. An unclaimed entry (the origin closing in order) is removed. A claimed one
    /// is touched only when `by` holds it — a destination confirming that its own backups now
    /// hold its new epoch and the agent has it (decision 43) — and then only its record goes:
    /// the claim stays, as a plain tombstone, so the epoch is still claimed. Removing it would
    /// make the next claim of that epoch (a second destination racing the first, a late one)
    /// find no entry and be granted, and two destinations would serve the same epoch; and an
    /// origin that comes back from a hang could store its old epoch again (decision 48). The
    /// tombstone goes when a newer epoch is stored here, or after the TTL
    /// (`mtcp_proto::replica::Slot::drop_upto`).
    pub fn drop_upto(&self, cid: Cid, epoch: u64, by: &str) {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        let Some(e) = map.get_mut(&cid) else { return };
        match e.slot.drop_upto(epoch, by) {
            Dropped::Keep => {}
            Dropped::Remove => {
                let e = map.remove(&cid).expect("present");
                *used -= Self::charge(&e);
            }
            Dropped::Strip => {
                *used -= e.rec.len();
                e.rec = Vec::new();
                e.updated = Instant::now();
                e.from = format!("claimed by {by}, confirmed");
            }
        }
    }

    /// Forgets entries not refreshed within the TTL; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        let before = map.len();
        let ttl = self.ttl;
        map.retain(|_, e| {
            let keep = now.duration_since(e.updated) <= ttl;
            if !keep {
                *used -= Self::charge(e);
            }
            keep
        });
        before - map.len()
    }

    /// (entries, bytes charged).
    pub fn usage(&self) -> (usize, usize) {
        let g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        (g.0.len(), g.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mtcp_proto::custody::Fence;

    fn rec(cid: u8, epoch: u64, out: u64) -> Vec<u8> {
        StateRecord {
            cid: Cid([cid; 16]),
            epoch,
            snapshot: Some(Bytes::from_static(b"snap")),
            snap_in: out / 2,
            snap_out: out,
            input: Bytes::new(),
            up_fin: None,
            tail: Bytes::new(),
            checks: vec![],
        }
        .encode()
    }

    #[test]
    fn exactly_one_claim_wins_and_fences_older_updates() {
        let s = ReplicaStore::new(1 << 20, Duration::from_secs(60));
        s.store("s1", rec(1, 3, 100)).unwrap();
        // An older update arriving late does not replace the newer record.
        assert_eq!(s.store("s1", rec(1, 3, 50)).unwrap().2, 100);
        let Claimed::Record(r) = s.claim(Cid([1; 16]), 3, "s2", false).unwrap() else {
            panic!("expected the record")
        };
        assert_eq!(StateRecord::decode(&r).unwrap().snap_out, 100);
        assert_eq!(
            s.claim(Cid([1; 16]), 3, "s3", false).unwrap_err().code(),
            RefuseCode::StaleEpoch
        );
        // The old origin wakes up and replicates again: refused.
        assert_eq!(
            s.store("s1", rec(1, 3, 200)).unwrap_err().0,
            RefuseCode::StaleEpoch
        );
        // The new owner's epoch replaces the fence.
        s.store("s2", rec(1, 4, 300)).unwrap();
        assert_eq!(
            s.claim(Cid([1; 16]), 3, "s3", false).unwrap_err().code(),
            RefuseCode::StaleEpoch
        );
        // A release by anyone but the claimer, or for another epoch, changes nothing.
        assert!(!s.release(Cid([1; 16]), 3, "s2"));
        assert!(!s.release(Cid([1; 16]), 4, "s3"));
        assert!(s.claim(Cid([1; 16]), 4, "s1", false).is_ok());
        assert!(!s.release(Cid([1; 16]), 4, "s3"));
        // A claim with nothing stored leaves a tombstone that still fences.
        assert!(matches!(
            s.claim(Cid([2; 16]), 0, "s2", false).unwrap(),
            Claimed::Nothing
        ));
        assert!(s.claim(Cid([2; 16]), 0, "s3", false).is_err());
        assert!(s.store("s1", rec(2, 0, 10)).is_err());
    }

    #[test]
    fn a_released_claim_hands_the_same_record_to_the_next_claimer_only() {
        let s = ReplicaStore::new(1 << 20, Duration::from_secs(60));
        let cid = Cid([7; 16]);
        s.store("s3", rec(7, 5, 100)).unwrap();
        let Claimed::Record(first) = s.claim(cid, 5, "s1", false).unwrap() else {
            panic!("expected the record")
        };
        // While s1 holds the claim: nobody else gets it, the origin cannot update it.
        assert_eq!(
            s.claim(cid, 5, "s2", false).unwrap_err().code(),
            RefuseCode::StaleEpoch
        );
        assert!(s.store("s3", rec(7, 5, 200)).is_err());
        // s2 cannot release s1's claim.
        assert!(!s.release(cid, 5, "s2"));
        // s1's takeover failed: it withdraws, and s2 gets the very same record.
        assert!(s.release(cid, 5, "s1"));
        assert!(!s.release(cid, 5, "s1"), "a release is not repeated");
        let Claimed::Record(second) = s.claim(cid, 5, "s2", false).unwrap() else {
            panic!("expected the record")
        };
        assert_eq!(first, second);
        // A late release by s1 (after s2's claim) is ignored: exactly one owner per epoch.
        assert!(!s.release(cid, 5, "s1"));
        assert_eq!(
            s.claim(cid, 5, "s1", false).unwrap_err().code(),
            RefuseCode::StaleEpoch
        );
        // A released tombstone (no record) is claimable again too.
        let t = Cid([8; 16]);
        assert!(matches!(
            s.claim(t, 2, "s1", false).unwrap(),
            Claimed::Nothing
        ));
        assert!(s.release(t, 2, "s1"));
        assert!(matches!(
            s.claim(t, 2, "s2", false).unwrap(),
            Claimed::Nothing
        ));
        assert!(s.claim(t, 2, "s3", false).is_err());
    }

    #[test]
    fn a_held_claim_is_superseded_only_after_the_holders_next_epoch_is_fenced() {
        let s = ReplicaStore::new(1 << 20, Duration::from_secs(60));
        let cid = Cid([9; 16]);
        s.store("s3", rec(9, 5, 100)).unwrap();
        // s1 takes the replica (s3 is dead) and will resume at 6.
        assert!(matches!(
            s.claim(cid, 5, "s1", true).unwrap(),
            Claimed::Record(_)
        ));
        // s1 goes silent; the agent asks s2: held by s1, whose epoch 6 must be fenced first.
        let Err(ClaimError::Held(c)) = s.claim(cid, 5, "s2", true) else {
            panic!("expected the custody")
        };
        assert_eq!(c, Custody::new(5, "s1"));
        assert_eq!(c.successor(5).unwrap(), 6);
        // A fence (or any plain claim) never supersedes.
        assert_eq!(
            s.claim(cid, 5, "s2", false).unwrap_err().code(),
            RefuseCode::StaleEpoch
        );
        // The fence could reach none of s1's backups: nothing changes hands.
        assert!(s
            .supersede(
                cid,
                &c,
                "s2",
                &Fenced::of(&[Fence::Unreachable], &[None], 0)
            )
            .is_err());
        // Fenced with nothing stored there: s2 gets the same record labelled 6 (resumes at 7).
        let Claimed::Record(r) = s
            .supersede(cid, &c, "s2", &Fenced::of(&[Fence::Nothing], &[None], 0))
            .unwrap()
        else {
            panic!("expected the record")
        };
        let r = StateRecord::decode(&r).unwrap();
        assert_eq!((r.epoch, r.snap_out), (6, 100));
        // The same custody cannot be superseded twice (s3 raced s2 with a stale view).
        assert!(s
            .supersede(cid, &c, "s3", &Fenced::of(&[Fence::Nothing], &[None], 0))
            .is_err());
        // s2 dies too: s3 fences s2's epoch 7, whose backup had s2's newer point.
        let Err(ClaimError::Held(c2)) = s.claim(cid, 5, "s3", true) else {
            panic!("expected the custody")
        };
        assert_eq!(c2.successor(5).unwrap(), 7);
        let newer = rec(9, 7, 300);
        let Claimed::Record(r) = s
            .supersede(
                cid,
                &c2,
                "s3",
                &Fenced::of(&[Fence::Record(300, 150)], &[Some(newer)], 0),
            )
            .unwrap()
        else {
            panic!("expected the record")
        };
        let r = StateRecord::decode(&r).unwrap();
        assert_eq!((r.epoch, r.snap_out), (7, 300));
        // s1's late confirmation cannot drop what s3 now holds; s3's drops the record but
        // keeps the claim (a tombstone: epoch 5 stays taken).
        s.drop_upto(cid, 5, "s1");
        assert_eq!(s.usage().0, 1);
        assert!(s.usage().1 > ENTRY_OVERHEAD);
        s.drop_upto(cid, 5, "s3");
        assert_eq!(s.usage(), (1, ENTRY_OVERHEAD));
        assert!(matches!(
            s.claim(cid, 5, "s2", true),
            Err(ClaimError::Refused(_))
        ));
        // The origin's own claim (a hand-over fence) is not a custody: plainly refused.
        s.store("s3", rec(9, 8, 400)).unwrap();
        assert!(s.claim(cid, 8, "s3", true).is_ok());
        assert!(matches!(
            s.claim(cid, 8, "s2", true),
            Err(ClaimError::Refused(_))
        ));
    }

    /// What `crash::racing_takeovers_have_exactly_one_winner` caught: with the origin s1 hung,
    /// s2 claimed a connection that had no replica yet at its own store (s1's backup), resumed
    /// at epoch 1 and confirmed at once (its backup s3 stored epoch 1, the agent spoke); the
    /// confirmation removed the entry, and s3's claim of epoch 0, arriving a moment later, found
    /// none and was granted too: s2 and s3 both resumed at epoch 1. A confirmation keeps the
    /// claim.
    #[test]
    fn a_confirmed_claim_still_fences_its_epoch() {
        let s = ReplicaStore::new(1 << 20, Duration::from_secs(60));
        // No replica yet: s2's claim leaves a claimed tombstone.
        let cid = Cid([3; 16]);
        assert!(matches!(
            s.claim(cid, 0, "s2", true).unwrap(),
            Claimed::Nothing
        ));
        // Someone else's confirmation changes nothing; s2's keeps the claim.
        s.drop_upto(cid, 0, "s3");
        s.drop_upto(cid, 0, "s2");
        assert_eq!(s.usage(), (1, ENTRY_OVERHEAD));
        // The racing destination's claim (as a takeover or as a fence) is refused, not granted.
        for supersede in [true, false] {
            assert_eq!(
                s.claim(cid, 0, "s3", supersede).unwrap_err().code(),
                RefuseCode::StaleEpoch
            );
        }
        // The hung origin, continued, cannot store its old epoch again.
        assert!(s.store("s1", rec(3, 0, 10)).is_err());
        // With a replica: the record goes on confirmation, the claim stays.
        let cid = Cid([10; 16]);
        s.store("s1", rec(10, 2, 100)).unwrap();
        assert!(matches!(
            s.claim(cid, 2, "s2", true).unwrap(),
            Claimed::Record(_)
        ));
        s.drop_upto(cid, 2, "s2");
        assert_eq!(s.usage(), (2, 2 * ENTRY_OVERHEAD));
        assert!(s.claim(cid, 2, "s3", true).is_err());
        assert!(!s.release(cid, 2, "s3"));
        // The next epoch, stored by whoever serves it next, replaces the tombstone.
        s.store("s2", rec(10, 3, 200)).unwrap();
        assert!(matches!(
            s.claim(cid, 3, "s3", true).unwrap(),
            Claimed::Record(_)
        ));
        // An unclaimed entry (an orderly close at its origin) is removed.
        let cid = Cid([11; 16]);
        s.store("s1", rec(11, 0, 10)).unwrap();
        s.drop_upto(cid, 0, "s1");
        assert_eq!(s.usage().0, 2);
    }

    #[test]
    fn a_fence_passes_a_failed_claimers_tombstone_over_one_epoch_up() {
        let s = ReplicaStore::new(1 << 20, Duration::from_secs(60));
        let cid = Cid([4; 16]);
        // s2 resumed at 6 unconfirmed and died; s3 claimed epoch 6 here (nothing stored: a
        // restart from offset 0), failed, and its release was lost.
        assert!(matches!(
            s.claim(cid, 6, "s3", true).unwrap(),
            Claimed::Nothing
        ));
        // The keeper s1 fences epoch 6: held by s3 (which would resume at 7).
        let Err(ClaimError::Held(seen)) = s.claim(cid, 6, "s1", false) else {
            panic!("expected the custody")
        };
        assert_eq!(seen, Custody::new(6, "s3"));
        // Had s3 answered RESUMED for 7 (the agent may hold that token), its epoch 7 would have
        // to be fenced at its own backups first: unfenced, nothing passes.
        let unfenced = GaveUp::Answered(vec![Fence::Unreachable]);
        assert_eq!(
            s.pass(cid, &seen, "s1", &unfenced).unwrap_err().0,
            RefuseCode::OriginUnreachable
        );
        // s3 gave 7 up: the claim passes to s1 as a plain claim labelled 7, and the answer
        // says so (a start record at 7: nothing was stored).
        let Claimed::Record(r) = s.pass(cid, &seen, "s1", &GaveUp::Unanswered).unwrap() else {
            panic!("expected a labelled answer")
        };
        let r = StateRecord::decode(&r).unwrap();
        assert_eq!((r.epoch, r.snap_out, r.snapshot.is_none()), (7, 0, true));
        // Passed once only; the entry is now a plain claim nobody supersedes.
        assert!(s.pass(cid, &seen, "s2", &GaveUp::Unanswered).is_err());
        assert!(matches!(
            s.claim(cid, 6, "s2", true),
            Err(ClaimError::Refused(_))
        ));
        assert!(
            !s.release(cid, 6, "s3"),
            "s3's late release changes nothing"
        );
        // The next holder resumes at 8 and replaces the entry.
        s.store("s4", rec(4, 8, 500)).unwrap();
        assert_eq!(s.usage().0, 1);
    }

    #[test]
    fn an_update_refused_because_a_destination_took_the_replica_names_it() {
        let s = ReplicaStore::new(1 << 20, Duration::from_secs(60));
        let cid = Cid([5; 16]);
        s.store("s2", rec(5, 2, 100)).unwrap();
        // s3 (this backup) takes the connection over from its replica: a custody claim.
        assert!(s.claim(cid, 2, "s3", true).is_ok());
        // The origin s2, slow but alive, pushes again: refused, naming the taker and its label.
        let (r, taken) = s.store_or_taken("s2", rec(5, 2, 200)).unwrap_err();
        assert_eq!(r.0, RefuseCode::StaleEpoch);
        assert_eq!(taken, Some((cid, Custody::new(2, "s3"))));
        // A plain claim (a keeper's fence) names nobody: the origin just lets go.
        let t = Cid([6; 16]);
        s.store("s2", rec(6, 4, 100)).unwrap();
        assert!(s.claim(t, 4, "s1", false).is_ok());
        assert_eq!(s.store_or_taken("s2", rec(6, 4, 200)).unwrap_err().1, None);
        // An older epoch is refused without a taker either.
        assert_eq!(s.store_or_taken("s2", rec(5, 1, 300)).unwrap_err().1, None);
    }

    #[test]
    fn memory_is_bounded_and_entries_expire() {
        let one = rec(1, 0, 1).len() + ENTRY_OVERHEAD;
        let s = ReplicaStore::new(2 * one, Duration::from_millis(0));
        s.store("s1", rec(1, 0, 1)).unwrap();
        s.store("s1", rec(2, 0, 1)).unwrap();
        assert_eq!(s.store("s1", rec(3, 0, 1)).unwrap_err().0, RefuseCode::Busy);
        // Replacing an entry does not need more room.
        s.store("s1", rec(2, 0, 2)).unwrap();
        s.drop_upto(Cid([1; 16]), 0, "s1");
        assert_eq!(s.usage(), (1, one));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(s.expire(Instant::now()), 1);
        assert_eq!(s.usage(), (0, 0));
        assert!(s.store("s1", b"garbage".to_vec()).is_err());
    }
}
