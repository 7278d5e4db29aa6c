//! Eager mode, origin side: the state of connections this server handed over alive, kept until
//! the destination confirms that its own backups hold the new epoch (decision 43). Until then a
//! destination that dies, hangs or is given up on can be superseded: the next destination
//! asking for the same epoch gets the state again once the holder's successor epoch is fenced
//! (`mtcp_proto::custody`, [`crate::eager::handover::fence`]). Bounded in bytes and in time.

use mtcp_proto::custody::{Custody, Fence, Handout};
use mtcp_proto::stream::Refusal;
use mtcp_proto::{Cid, StateRecord};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What fencing a holder's successor epoch found ([`crate::eager::handover::fence`]): each backup's
/// answer with the record it had, the highest epoch label an answer carried, and whether the
/// holder said it gave the epoch up before answering RESUMED for it (`Custody::supersede`'s
/// `unanswered`).
#[derive(Debug, Default)]
pub(crate) struct Fenced {
    pub fences: Vec<Fence>,
    pub records: Vec<Option<Vec<u8>>>,
    pub floor: u64,
    pub unanswered: bool,
}

impl Fenced {
    #[cfg(test)]
    pub fn of(fences: &[Fence], records: &[Option<Vec<u8>>], floor: u64) -> Self {
        Self {
            fences: fences.to_vec(),
            records: records.to_vec(),
            floor,
            unanswered: false,
        }
    }
}

struct Kept {
    custody: Custody,
    rec: StateRecord,
    bytes: usize,
    at: Instant,
}

pub(crate) struct CustodyStore {
    map: Mutex<(HashMap<Cid, Kept>, usize)>,
    max_bytes: usize,
    ttl: Duration,
    /// One hand-out at a time per connection ([`CustodyStore::turn`]).
    turns: Mutex<HashMap<Cid, Arc<tokio::sync::Mutex<()>>>>,
}

/// The right to hand one connection's state out (from the origin, or again from custody)
/// until dropped. Two hand-outs of the same connection at once — a destination's FETCH and
/// the agent's re-attach at the keeper itself, each after the agent gave up on the other —
/// both read the custody before either changed it: both fenced the same epoch, the first gave
/// the state to a destination that had meanwhile given up, and the second found its own claim
/// and refused, so nobody took the connection (stop 16, `lab_eager_moves`). Taken in turn,
/// the second sees the first's hand-out and supersedes it one epoch up.
pub(crate) struct Turn<'a> {
    store: &'a CustodyStore,
    cid: Cid,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.guard = None;
        let mut t = self.store.turns.lock().unwrap_or_else(|p| p.into_inner());
        if t.get(&self.cid).is_some_and(|m| Arc::strong_count(m) == 1) {
            t.remove(&self.cid);
        }
    }
}

impl CustodyStore {
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self {
            map: Mutex::new((HashMap::new(), 0)),
            max_bytes,
            ttl,
            turns: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for this server's turn to hand `cid`'s state out ([`Turn`]).
    pub async fn turn(&self, cid: Cid) -> Turn<'_> {
        let m = self
            .turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cid)
            .or_default()
            .clone();
        Turn {
            store: self,
            cid,
            guard: Some(m.lock_owned().await),
        }
    }

    /// Keeps `rec`, just handed over as `custody` says. Over the memory bound it is not kept
    /// (logged): that move is then protected only once its destination's backups hold it.
    pub fn keep(&self, cid: Cid, custody: Custody, rec: &StateRecord) {
        let bytes =
            rec.snapshot.as_ref().map_or(0, |s| s.len()) + rec.input.len() + rec.tail.len() + 256;
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        let old = map.get(&cid).map_or(0, |k| k.bytes);
        if *used - old + bytes > self.max_bytes {
            tracing::warn!(%cid, "custody memory full ({used} of {} bytes): the handed-over state is not kept", self.max_bytes);
            return;
        }
        *used = *used - old + bytes;
        tracing::debug!(%cid, holder = %custody.holder, epoch = custody.epoch, bytes, "handed-over state kept until its holder confirms");
        map.insert(
            cid,
            Kept {
                custody,
                rec: rec.clone(),
                bytes,
                at: Instant::now(),
            },
        );
    }

    /// Replaces the custody `seen` (if still as seen) by `new`, with its record `rec`; or, with
    /// `new` `None`, forgets it. A hand-over keeps its custody before it fences its backups, and
    /// settles it here once they answered.
    pub fn settle(&self, cid: Cid, seen: &Custody, new: Option<(Custody, &StateRecord)>) {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        if map.get(&cid).is_none_or(|k| k.custody != *seen) {
            return;
        }
        match new {
            Some((c, rec)) => {
                let k = map.get_mut(&cid).expect("present");
                k.custody = c;
                k.rec = rec.clone();
            }
            None => {
                let k = map.remove(&cid).expect("present");
                *used -= k.bytes;
            }
        }
    }

    pub fn get(&self, cid: Cid) -> Option<Custody> {
        let g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(&cid).map(|k| k.custody.clone())
    }

    /// The holder `seen` was fenced (`f`): hands the state to `by` under the successor epoch's
    /// label, if the custody is still as `seen`.
    pub fn supersede(
        &self,
        cid: Cid,
        seen: &Custody,
        by: &str,
        f: &Fenced,
    ) -> Result<StateRecord, Refusal> {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(k) = g.0.get_mut(&cid) else {
            return Err(Refusal::unknown_connection(format!(
                "connection {cid}: its handed-over state was confirmed or expired meanwhile"
            )));
        };
        if k.custody != *seen {
            return Err(Refusal::stale_epoch(format!(
                "connection {cid} changed hands meanwhile"
            )));
        }
        let (what, label) = k.custody.supersede(by, &f.fences, f.floor, f.unanswered)?;
        if let Handout::Successor(i) = what {
            // The holder's newer restart point replaces the kept one.
            match f
                .records
                .get(i)
                .and_then(|r| r.as_deref())
                .map(StateRecord::decode)
            {
                Some(Ok(r)) => k.rec = r,
                _ => {
                    return Err(Refusal::internal(format!(
                        "connection {cid}: the fenced backup's record is unreadable"
                    )))
                }
            }
        }
        k.at = Instant::now();
        let mut rec = k.rec.clone();
        rec.epoch = label;
        Ok(rec)
    }

    /// `by` says its backups hold the epoch after `epoch`: forget the state if `by` still
    /// holds it.
    pub fn confirmed(&self, cid: Cid, epoch: u64, by: &str) {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        if map
            .get(&cid)
            .is_some_and(|k| k.custody.confirmed_by(epoch, by))
        {
            let k = map.remove(&cid).expect("present");
            *used -= k.bytes;
        }
    }

    /// Forgets what was kept longer than the TTL; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (map, used) = &mut *g;
        let before = map.len();
        let ttl = self.ttl;
        map.retain(|cid, k| {
            let keep = now.duration_since(k.at) <= ttl;
            if !keep {
                tracing::warn!(%cid, holder = %k.custody.holder, "handed-over state never confirmed within {ttl:?}; forgotten");
                *used -= k.bytes;
            }
            keep
        });
        before - map.len()
    }

    /// (entries, bytes).
    #[cfg(test)]
    pub fn usage(&self) -> (usize, usize) {
        let g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        (g.0.len(), g.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(epoch: u64, out: u64) -> StateRecord {
        StateRecord {
            cid: Cid([3; 16]),
            epoch,
            snapshot: Some(Bytes::from_static(b"snap")),
            snap_in: out / 2,
            snap_out: out,
            input: Bytes::from_static(b"in"),
            up_fin: None,
            tail: Bytes::new(),
            checks: vec![],
        }
    }

    #[tokio::test]
    async fn hand_outs_of_one_connection_take_turns_and_leave_nothing_behind() {
        let s = Arc::new(CustodyStore::new(1 << 20, Duration::from_secs(60)));
        let (a, b) = (Cid([1; 16]), Cid([2; 16]));
        let first = s.turn(a).await;
        // Another connection is not held up.
        drop(s.turn(b).await);
        // The same one waits for the first turn to end.
        let s2 = s.clone();
        let second = tokio::spawn(async move {
            let _t = s2.turn(a).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "a second hand-out ran beside the first"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second hand-out got its turn")
            .unwrap();
        assert!(
            s.turns.lock().unwrap().is_empty(),
            "turns are forgotten once unused"
        );
    }

    #[test]
    fn the_state_goes_again_one_epoch_up_until_the_holder_confirms() {
        let s = CustodyStore::new(1 << 20, Duration::from_secs(60));
        let cid = Cid([3; 16]);
        s.keep(cid, Custody::new(4, "s2"), &rec(4, 100));
        let seen = s.get(cid).unwrap();
        // s2 died before its backups held epoch 5; fenced with nothing there: s3 gets it as 5.
        let r = s
            .supersede(cid, &seen, "s3", &Fenced::of(&[Fence::Nothing], &[None], 0))
            .unwrap();
        assert_eq!((r.epoch, r.snap_out), (5, 100));
        // A second supersede with the stale view is refused.
        assert!(s
            .supersede(cid, &seen, "s1", &Fenced::of(&[Fence::Nothing], &[None], 0))
            .is_err());
        // s2's late confirmation changes nothing: s3 holds it now.
        s.confirmed(cid, 4, "s2");
        assert_eq!(s.usage().0, 1);
        // s3 had stored a newer point at 6 before dying: s1 gets that one, as 6.
        let seen = s.get(cid).unwrap();
        let newer = rec(6, 300).encode();
        let r = s
            .supersede(
                cid,
                &seen,
                "s1",
                &Fenced::of(&[Fence::Record(300, 150)], &[Some(newer)], 0),
            )
            .unwrap();
        assert_eq!((r.epoch, r.snap_out), (6, 300));
        s.confirmed(cid, 4, "s1");
        assert_eq!(s.usage(), (0, 0));
        // Bounded: a record over the budget is not kept.
        let small = CustodyStore::new(10, Duration::from_secs(60));
        small.keep(cid, Custody::new(1, "s2"), &rec(1, 10));
        assert!(small.get(cid).is_none());
        // Expired after the TTL.
        let s = CustodyStore::new(1 << 20, Duration::ZERO);
        s.keep(cid, Custody::new(1, "s2"), &rec(1, 10));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(s.expire(Instant::now()), 1);
        assert_eq!(s.usage(), (0, 0));
    }
}
