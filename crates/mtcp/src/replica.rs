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
            ClaimError::Refused(r) => r.code,
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
            .map_err(|e| Refusal::new(RefuseCode::Malformed, format!("replica: {e}")))?;
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        let cur = map.get(&rec.cid).map(|e| &e.slot);
        match Slot::check_store(cur, rec.epoch, rec.snap_out, rec.snap_in) {
            Err(m) => {
                return Err(Refusal::stale_epoch(format!("connection {} {m}", rec.cid)));
            }
            Ok(Store::KeepNewer) => {
                // A late, older update: keep the newer one.
                let e = &map[&rec.cid].slot;
                return Ok((rec.cid, e.epoch, e.out_off));
            }
            Ok(Store::Replace) => {}
        }
        let cur_slot = map.get(&rec.cid).map(|e| e.slot.clone());
        let entry = Entry {
            slot: Slot::stored_over(
                cur_slot.as_ref(),
                from,
                rec.epoch,
                rec.snap_out,
                rec.snap_in,
            ),
            rec: bytes,
            from: from.to_string(),
            updated: Instant::now(),
        };
        let old = map.get(&rec.cid).map_or(0, Self::charge);
        let new_used = *used - old + Self::charge(&entry);
        if new_used > self.max_bytes {
            return Err(Refusal::busy(format!(
                "replica memory full ({} of {} bytes used)",
                *used, self.max_bytes
            )));
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
            Err(e @ rules::ClaimError::Past { .. }) => Err(ClaimError::Refused(Refusal::new(
                e.code(),
                format!("connection {cid} {e}"),
            ))),
            Err(e @ rules::ClaimError::Taken { .. }) => Err(ClaimError::Refused(Refusal::new(
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
            Ok(Granted::Fenced) => {
                // A later epoch fenced over an entry that stays claimable at its own epoch
                // (`Slot::fenced`): nothing to hand out at that epoch.
                if let Some(e) = map.get_mut(&cid) {
                    e.updated = Instant::now();
                }
                Ok(Claimed::Nothing)
            }
        }
    }

    /// The refusal of a supersede or pass the entry's rules did not allow.
    fn hand_refusal(cid: Cid, seen: &Custody, e: &Entry, err: rules::HandError) -> Refusal {
        match err {
            rules::HandError::ChangedHands => Refusal::stale_epoch(format!(
                "connection {cid} at epoch {} changed hands meanwhile ({})",
                seen.epoch, e.from
            )),
            rules::HandError::Refused(r) => r,
            rules::HandError::Pass(p) => Refusal::new(p.code(), format!("connection {cid}: {p}")),
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
            return Err(Refusal::stale_epoch(format!(
                "connection {cid}: its replica went away meanwhile"
            )));
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
            return Err(Refusal::stale_epoch(format!(
                "connection {cid}: its replica went away meanwhile"
            )));
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
mod tests;
