//! Tests of the replica store: storing, claiming, custody and expiry.

use super::*;
use crate::custody::Fenced;
use bytes::Bytes;
use mtcp_proto::custody::Fence;
use mtcp_proto::custody::{Custody, GaveUp};
use mtcp_proto::wire::RefuseCode;
use mtcp_proto::{Cid, StateRecord};
use std::time::{Duration, Instant};

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
        s.store("s1", rec(1, 3, 200)).unwrap_err().code,
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
        s.pass(cid, &seen, "s1", &unfenced).unwrap_err().code,
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
    assert_eq!(r.code, RefuseCode::StaleEpoch);
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
    assert_eq!(
        s.store("s1", rec(3, 0, 1)).unwrap_err().code,
        RefuseCode::Busy
    );
    // Replacing an entry does not need more room.
    s.store("s1", rec(2, 0, 2)).unwrap();
    s.drop_upto(Cid([1; 16]), 0, "s1");
    assert_eq!(s.usage(), (1, one));
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(s.expire(Instant::now()), 1);
    assert_eq!(s.usage(), (0, 0));
    assert!(s.store("s1", b"garbage".to_vec()).is_err());
}
