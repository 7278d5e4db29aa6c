use super::*;
use crate::custody::GaveUp;

fn claim(cur: &mut Option<Slot>, epoch: u64, by: &str, sup: bool) -> Result<Granted, ClaimError> {
    let g = Slot::claim(cur.as_mut(), epoch, by, sup)?;
    if g == Granted::Tombstone {
        *cur = Some(Slot::tombstone(epoch, by, sup));
    }
    Ok(g)
}

#[test]
fn exactly_one_claim_per_epoch_and_no_update_below_it() {
    let mut e = Some(Slot::stored("s1", 3, 100, 50));
    assert_eq!(
        Slot::check_store(e.as_ref(), 3, 50, 25),
        Ok(Store::KeepNewer)
    );
    assert_eq!(
        claim(&mut e, 3, "s2", false),
        Ok(Granted::Entry { epoch: 3, label: 3 })
    );
    assert_eq!(
        claim(&mut e, 3, "s3", false),
        Err(ClaimError::Taken { epoch: 3 })
    );
    // The old origin wakes up and replicates again: refused.
    assert_eq!(
        Slot::check_store(e.as_ref(), 3, 200, 100),
        Err(MovedOn {
            at: 3,
            claimed: true,
            epoch: 3
        })
    );
    assert_eq!(Slot::check_store(e.as_ref(), 4, 0, 0), Ok(Store::Replace));
    let mut e = Some(Slot::stored("s2", 4, 300, 10));
    assert_eq!(
        claim(&mut e, 3, "s3", true),
        Err(ClaimError::Past { at: 4, epoch: 3 })
    );
    // No entry, or an older one: a claimed tombstone, which fences like a record.
    assert_eq!(claim(&mut e, 5, "s3", true), Ok(Granted::Tombstone));
    assert!(matches!(
        claim(&mut e, 5, "s1", true),
        Err(ClaimError::Held(_))
    ));
    assert!(Slot::check_store(e.as_ref(), 5, 1, 1).is_err());
}

#[test]
fn a_release_frees_the_claim_for_the_next_claimer_and_only_the_claimer_releases() {
    let mut e = Some(Slot::stored("s3", 5, 100, 50));
    claim(&mut e, 5, "s1", false).unwrap();
    let s = e.as_mut().unwrap();
    assert!(!s.release(5, "s2"));
    assert!(!s.release(4, "s1"));
    assert!(s.release(5, "s1"));
    assert!(!s.release(5, "s1"), "a release is not repeated");
    assert_eq!(
        claim(&mut e, 5, "s2", false),
        Ok(Granted::Entry { epoch: 5, label: 5 })
    );
}

#[test]
fn a_held_entry_is_superseded_once_and_passed_over_only_as_seen() {
    let mut e = Some(Slot::stored("s3", 5, 100, 50));
    claim(&mut e, 5, "s1", true).unwrap();
    let Err(ClaimError::Held(seen)) = claim(&mut e, 5, "s2", true) else {
        panic!("expected the custody")
    };
    assert_eq!(seen, Custody::new(5, "s1"));
    let s = e.as_mut().unwrap();
    // Not fenced anywhere: nothing changes hands.
    assert_eq!(
        s.supersede(&seen, "s2", &[Fence::Unreachable], 0, false)
            .unwrap_err()
            .code(),
        RefuseCode::OriginUnreachable
    );
    assert_eq!(
        s.supersede(&seen, "s2", &[Fence::Nothing], 0, false),
        Ok((Handout::Kept, 6))
    );
    // A second superseder with the same stale view is refused.
    assert_eq!(
        s.supersede(&seen, "s3", &[Fence::Nothing], 0, false),
        Err(HandError::ChangedHands)
    );
    assert_eq!(
        s.pass(&seen, "s3", &GaveUp::Unanswered),
        Err(HandError::ChangedHands)
    );
    // A fence passes the current holder over one epoch up, as a plain claim.
    let now = s.custody();
    let unfenced = GaveUp::Answered(vec![Fence::Unreachable]);
    assert_eq!(
        s.pass(&now, "s1", &unfenced).unwrap_err().code(),
        RefuseCode::OriginUnreachable
    );
    assert_eq!(s.pass(&now, "s1", &GaveUp::Unanswered), Ok(7));
    assert_eq!(
        (s.claimer.as_deref(), s.label, s.custody),
        (Some("s1"), 7, false)
    );
    assert_eq!(
        s.pass(&s.custody(), "s2", &GaveUp::Unanswered),
        Err(HandError::ChangedHands)
    );
    assert_eq!(
        claim(&mut e, 5, "s2", true),
        Err(ClaimError::Taken { epoch: 5 })
    );
}

#[test]
fn a_confirmation_strips_the_record_but_keeps_the_claim() {
    let mut e = Slot::stored("s1", 2, 100, 50);
    assert_eq!(e.drop_upto(1, "s1"), Dropped::Keep);
    assert_eq!(e.drop_upto(2, "s1"), Dropped::Remove);
    let mut e = Some(Slot::stored("s1", 2, 100, 50));
    claim(&mut e, 2, "s2", true).unwrap();
    let s = e.as_mut().unwrap();
    assert_eq!(s.taken(2, "s1"), Some(Custody::new(2, "s2")));
    assert_eq!(s.taken(2, "s2"), None);
    assert_eq!(s.drop_upto(2, "s3"), Dropped::Keep);
    assert_eq!(s.drop_upto(2, "s2"), Dropped::Strip);
    assert_eq!(s.taken(2, "s1"), None, "no longer a custody");
    assert_eq!(
        claim(&mut e, 2, "s3", true),
        Err(ClaimError::Taken { epoch: 2 })
    );
}

#[derive(Clone, Debug)]
enum Op {
    Claim(u8, u64, bool),
    Release(u8, u64),
    Confirm(u8, u64),
    Store(u64),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (0u8..3, 0u64..3, any::<bool>()).prop_map(|(b, e, s)| Op::Claim(b, e, s)),
        (0u8..3, 0u64..3).prop_map(|(b, e)| Op::Release(b, e)),
        (0u8..3, 0u64..3).prop_map(|(b, e)| Op::Confirm(b, e)),
        (0u64..3).prop_map(Op::Store),
    ]
}

proptest::proptest! {
    /// Whatever the order of claims, releases, confirmations and updates: while an entry
    /// stands, two claims of one epoch are both granted only with a release by the first in
    /// between, and no update at or below a claimed epoch is accepted.
    #[test]
    fn at_most_one_standing_claim_per_epoch(ops in proptest::collection::vec(op(), 0..24)) {
        let names = ["s1", "s2", "s3"];
        let mut e: Option<Slot> = None;
        // Per epoch: who holds a granted, unreleased claim.
        let mut holder: [Option<&str>; 3] = [None; 3];
        for o in ops {
            match o {
                Op::Claim(b, ep, sup) => {
                    if let Ok(g) = claim(&mut e, ep, names[b as usize], sup) {
                        if sup && g == Granted::Fenced {
                            // Its claimer already fenced a later epoch here: nothing granted.
                            continue;
                        }
                        // The same fencer's plain claim again is no second claim.
                        let again = !sup && holder[ep as usize] == Some(names[b as usize]);
                        proptest::prop_assert!(holder[ep as usize].is_none() || again, "{ep} claimed twice");
                        // A claim of a newer epoch replaces the entry, and the older ones are
                        // past — unless it is a plain fence noted beside the entry, which
                        // stays claimable at its own epoch.
                        if g != Granted::Fenced {
                            holder = [None; 3];
                        }
                        holder[ep as usize] = Some(names[b as usize]);
                    }
                }
                Op::Release(b, ep) => {
                    if let Some(s) = e.as_mut() {
                        if s.release(ep, names[b as usize]) {
                            proptest::prop_assert_eq!(holder[ep as usize], Some(names[b as usize]));
                            holder[ep as usize] = None;
                        }
                    }
                }
                Op::Confirm(b, ep) => {
                    if let Some(s) = e.as_mut() {
                        if s.drop_upto(ep, names[b as usize]) == Dropped::Remove {
                            // An unclaimed entry closed in order: nothing stands any more.
                            e = None;
                            holder = [None; 3];
                        }
                    }
                }
                Op::Store(ep) => {
                    if Slot::check_store(e.as_ref(), ep, 1, 1) == Ok(Store::Replace) {
                        proptest::prop_assert!(
                            holder[ep as usize..].iter().all(|h| h.is_none())
                                || e.as_ref().is_none_or(|s| s.epoch < ep),
                            "an update at {ep} stored over a standing claim"
                        );
                        // A newer epoch replaces the entry: older claims are gone with it.
                        for h in holder.iter_mut().take(ep as usize + 1) { *h = None; }
                        e = Some(Slot::stored("s0", ep, 1, 1));
                    }
                }
            }
        }
    }
}

mod edges;

/// A fence that finds an epoch held asks the holder to give up `Custody::successor`'s epoch, and
/// the claim then passes to the fencer at exactly that epoch (`Custody::pass`): the epoch the
/// fencer has the holder yield is the one it is given.
#[test]
fn a_held_claim_names_the_claimed_epoch_and_passes_at_its_successor() {
    let mut e = Some(Slot::stored("s1", 5, 100, 50));
    assert!(claim(&mut e, 5, "s2", true).is_ok());
    let Err(ClaimError::Held(seen)) = claim(&mut e, 5, "s3", false) else {
        panic!("held");
    };
    assert_eq!(seen.epoch, 5);
    let next = seen.successor(5).unwrap();
    assert_eq!(next, seen.label + 1);
    let mut passed = seen.clone();
    assert_eq!(passed.pass("s3", &GaveUp::Unanswered), Ok(next));
    // Asked for another epoch, the held entry is not this fence's.
    assert!(seen.successor(4).is_err());
    assert!(seen.successor(6).is_err());
    // Superseded, the entry is held one label up, still under the claimed epoch.
    let s = e.as_mut().unwrap();
    s.supersede(&seen, "s4", &[Fence::Nothing], 0, false)
        .unwrap();
    let Err(ClaimError::Held(raised)) = claim(&mut e, 5, "s3", false) else {
        panic!("held");
    };
    assert_eq!((raised.epoch, raised.label), (5, 6));
    assert_eq!(raised.successor(5), Ok(7));
    assert_eq!(raised.clone().pass("s3", &GaveUp::Unanswered), Ok(7));
}
