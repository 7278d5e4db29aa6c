//! A backup's claim rules at their edges: the origin's own claim, updates around an entry's
//! epoch, refused supersedes, a released custody and the codes every refusal answers with.

use super::*;

#[test]
fn the_origins_own_claim_is_a_plain_fence_not_a_custody() {
    // The origin hands the connection over alive: it keeps the custody itself.
    let mut e = Some(Slot::stored("s1", 3, 10, 5));
    assert_eq!(
        claim(&mut e, 3, "s1", true),
        Ok(Granted::Entry { epoch: 3, label: 3 })
    );
    let s = e.as_ref().unwrap();
    assert!(s.claimed() && !s.custody);
    assert_eq!(s.taken(3, "s2"), None, "nobody to name as holder");
    assert_eq!(
        claim(&mut e, 3, "s2", true),
        Err(ClaimError::Taken { epoch: 3 })
    );
}

#[test]
fn a_plain_tombstone_fences_its_epoch_without_a_custody() {
    let mut e: Option<Slot> = None;
    assert_eq!(claim(&mut e, 4, "s1", false), Ok(Granted::Tombstone));
    assert_eq!(e, Some(Slot::tombstone(4, "s1", false)));
    assert_eq!(
        claim(&mut e, 4, "s2", true),
        Err(ClaimError::Taken { epoch: 4 })
    );
    assert_eq!(
        Slot::check_store(e.as_ref(), 4, 0, 0),
        Err(MovedOn {
            at: 4,
            claimed: true,
            epoch: 4
        })
    );
    // An update of a later epoch replaces it.
    assert_eq!(Slot::check_store(e.as_ref(), 5, 0, 0), Ok(Store::Replace));
}

#[test]
fn updates_replace_older_or_equal_points_and_are_refused_below_the_entry() {
    assert_eq!(Slot::check_store(None, 0, 0, 0), Ok(Store::Replace));
    let e = Slot::stored("s1", 3, 100, 50);
    // Same epoch: a newer or equal restart point replaces; compared by output, then input.
    assert_eq!(Slot::check_store(Some(&e), 3, 100, 50), Ok(Store::Replace));
    assert_eq!(Slot::check_store(Some(&e), 3, 101, 0), Ok(Store::Replace));
    assert_eq!(
        Slot::check_store(Some(&e), 3, 100, 49),
        Ok(Store::KeepNewer)
    );
    let moved = Slot::check_store(Some(&e), 2, 500, 500).unwrap_err();
    assert_eq!(
        moved,
        MovedOn {
            at: 3,
            claimed: false,
            epoch: 2
        }
    );
    assert_eq!(
        moved.to_string(),
        "moved on (epoch 3); update for epoch 2 refused"
    );
    let claimed = MovedOn {
        claimed: true,
        ..moved
    };
    assert_eq!(
        claimed.to_string(),
        "moved on (epoch 3, claimed); update for epoch 2 refused"
    );
}

#[test]
fn taken_names_the_custody_only_at_its_epoch() {
    let mut e = Some(Slot::stored("s1", 5, 10, 5));
    claim(&mut e, 5, "s2", true).unwrap();
    let s = e.as_ref().unwrap();
    assert_eq!(s.taken(5, "s1"), Some(Custody::new(5, "s2")));
    assert_eq!(s.taken(4, "s1"), None);
    assert_eq!(s.taken(6, "s1"), None);
    assert_eq!(Slot::stored("s1", 5, 0, 0).taken(5, "s3"), None);
}

#[test]
fn a_supersede_the_fence_refuses_changes_nothing() {
    let mut e = Some(Slot::stored("s3", 5, 100, 50));
    claim(&mut e, 5, "s1", true).unwrap();
    let Err(ClaimError::Held(seen)) = claim(&mut e, 5, "s2", true) else {
        panic!("held by s1")
    };
    let s = e.as_mut().unwrap();
    let before = s.clone();
    let err = s
        .supersede(
            &seen,
            "s2",
            &[Fence::Refused(RefuseCode::StaleEpoch)],
            0,
            true,
        )
        .unwrap_err();
    assert!(matches!(&err, HandError::Refused(r) if r.code == RefuseCode::StaleEpoch));
    assert_eq!(err.code(), RefuseCode::StaleEpoch);
    assert_eq!(*s, before);
    // Granted above a floor: the new holder's claim is a custody, labelled there.
    assert_eq!(
        s.supersede(&seen, "s2", &[Fence::Record(120, 60)], 9, false),
        Ok((Handout::Successor(0), 9))
    );
    assert_eq!(
        (s.claimer.as_deref(), s.label, s.custody),
        (Some("s2"), 9, true)
    );
    assert_eq!(
        claim(&mut e, 5, "s4", true),
        Err(ClaimError::Held(Custody {
            epoch: 5,
            holder: "s2".into(),
            label: 9
        }))
    );
}

#[test]
fn a_released_custody_is_claimable_again_at_its_raised_label() {
    let mut e = Some(Slot::stored("s3", 5, 100, 50));
    claim(&mut e, 5, "s1", true).unwrap();
    let s = e.as_mut().unwrap();
    let seen = s.taken(5, "s3").unwrap();
    s.supersede(&seen, "s2", &[Fence::Nothing], 0, false)
        .unwrap();
    assert!(s.release(5, "s2"));
    assert_eq!(
        claim(&mut e, 5, "s4", true),
        Ok(Granted::Entry { epoch: 5, label: 6 })
    );
    assert_eq!(
        e.as_ref().unwrap().taken(5, "s3"),
        Some(Custody {
            epoch: 5,
            holder: "s4".into(),
            label: 6
        })
    );
}

#[test]
fn only_a_custody_is_passed_over_and_its_answer_is_checked() {
    let mut e = Some(Slot::stored("s3", 5, 100, 50));
    claim(&mut e, 5, "s1", true).unwrap();
    let s = e.as_mut().unwrap();
    let seen = s.taken(5, "s3").unwrap();
    let moved = GaveUp::Answered(vec![Fence::Refused(RefuseCode::StaleEpoch)]);
    let err = s.pass(&seen, "s2", &moved).unwrap_err();
    assert_eq!(
        err,
        HandError::Pass(PassError::Moved {
            epoch: 6,
            code: RefuseCode::StaleEpoch
        })
    );
    assert_eq!(err.code(), RefuseCode::StaleEpoch);
    assert!(s.custody, "still s1's custody");
    // A plain claim at the same epoch is never passed over, even seen right.
    let mut plain = Slot::stored("s3", 5, 100, 50);
    Slot::claim(Some(&mut plain), 5, "s1", false).unwrap();
    let seen = Custody::new(5, "s1");
    assert_eq!(
        plain.pass(&seen, "s2", &GaveUp::Unanswered),
        Err(HandError::ChangedHands)
    );
}

#[test]
fn every_claim_refusal_answers_stale_epoch() {
    for e in [
        ClaimError::Past { at: 4, epoch: 3 },
        ClaimError::Taken { epoch: 3 },
        ClaimError::Held(Custody::new(3, "s1")),
    ] {
        assert_eq!(e.code(), RefuseCode::StaleEpoch, "{e}");
    }
    assert_eq!(
        ClaimError::Held(Custody::new(3, "s1")).to_string(),
        "at epoch 3 is held by s1"
    );
    assert_eq!(HandError::ChangedHands.code(), RefuseCode::StaleEpoch);
}

#[test]
fn a_confirmation_of_an_older_epoch_keeps_the_entry_and_a_strip_is_repeatable() {
    let mut e = Some(Slot::stored("s1", 4, 100, 50));
    claim(&mut e, 4, "s2", true).unwrap();
    let s = e.as_mut().unwrap();
    assert_eq!(s.drop_upto(3, "s2"), Dropped::Keep);
    assert_eq!(s.drop_upto(5, "s2"), Dropped::Strip);
    assert_eq!((s.in_off, s.out_off, s.custody), (0, 0, false));
    assert_eq!(s.claimer.as_deref(), Some("s2"));
    assert_eq!(s.drop_upto(4, "s2"), Dropped::Strip);
    // A claim of a later epoch replaces the stripped tombstone.
    assert_eq!(claim(&mut e, 5, "s3", true), Ok(Granted::Tombstone));
}

/// Decision 63: with two backups per server a backup of the origin's epoch is also a backup
/// of a later holder. A fence of that holder's successor epoch is noted beside the entry: the
/// entry stays claimable at its own epoch, and the later epoch is judged as a tombstone would.
#[test]
fn a_fence_of_a_later_epoch_keeps_the_entry_claimable_at_its_own() {
    let mut e = Some(Slot::stored("s1", 3, 100, 50));
    assert_eq!(claim(&mut e, 4, "s2", false), Ok(Granted::Fenced));
    let s = e.as_ref().unwrap();
    assert_eq!((s.epoch, s.claimed()), (3, false), "the entry is unchanged");
    assert_eq!(s.fenced, Some((4, "s2".to_string())));
    // Epoch 4 is fenced: no update up to it, a second claimer refused, an earlier one past.
    assert_eq!(
        Slot::check_store(e.as_ref(), 4, 0, 0),
        Err(MovedOn {
            at: 4,
            claimed: true,
            epoch: 4
        })
    );
    assert_eq!(
        Slot::check_store(e.as_ref(), 3, 200, 100),
        Err(MovedOn {
            at: 4,
            claimed: true,
            epoch: 3
        })
    );
    assert_eq!(
        claim(&mut e, 4, "s3", false),
        Err(ClaimError::Taken { epoch: 4 })
    );
    assert_eq!(
        claim(&mut e, 4, "s3", true),
        Err(ClaimError::Taken { epoch: 4 })
    );
    // The same fencer again (one takeover superseding at each backup): already fenced.
    assert_eq!(claim(&mut e, 4, "s2", false), Ok(Granted::Fenced));
    // The entry's own epoch is still claimed once, as before.
    assert_eq!(
        claim(&mut e, 3, "s3", true),
        Ok(Granted::Entry { epoch: 3, label: 3 })
    );
    assert_eq!(
        claim(&mut e, 3, "s1", true),
        Err(ClaimError::Held(Custody::new(3, "s3")))
    );
    // A confirmation of epoch 3 leaves the newer fence standing.
    assert_eq!(e.as_mut().unwrap().drop_upto(3, "s3"), Dropped::Keep);
    // A later epoch than the fence is claimed as before: the entry is replaced.
    assert_eq!(claim(&mut e, 5, "s1", true), Ok(Granted::Tombstone));
    assert_eq!(e, Some(Slot::tombstone(5, "s1", true)));
}

#[test]
fn the_same_fencer_again_is_granted_another_is_not() {
    let mut e: Option<Slot> = None;
    assert_eq!(claim(&mut e, 4, "s2", false), Ok(Granted::Tombstone));
    assert_eq!(
        claim(&mut e, 4, "s2", false),
        Ok(Granted::Entry { epoch: 4, label: 4 })
    );
    assert_eq!(
        claim(&mut e, 4, "s3", false),
        Err(ClaimError::Taken { epoch: 4 })
    );
    // A takeover's claim is never the fencer's repeat.
    assert_eq!(
        claim(&mut e, 4, "s2", true),
        Err(ClaimError::Taken { epoch: 4 })
    );
    // Nor over a stored entry: the same fencer again is granted, another is refused.
    let mut e = Some(Slot::stored("s3", 3, 10, 5));
    claim(&mut e, 3, "s1", false).unwrap();
    assert_eq!(
        claim(&mut e, 3, "s1", false),
        Ok(Granted::Entry { epoch: 3, label: 3 })
    );
    assert_eq!(
        claim(&mut e, 3, "s2", false),
        Err(ClaimError::Taken { epoch: 3 })
    );
}

/// Decision 63: a destination that took epoch 3 over here (custody) stores its own epoch 4 at
/// this backup, which is one of its own backups too. The claim of epoch 3 stays: a later
/// candidate meets it (Held) and supersedes it, instead of finding epoch 3 past.
#[test]
fn a_holders_new_epoch_stored_over_its_claim_keeps_the_claim() {
    let mut e = Some(Slot::stored("s1", 3, 100, 50));
    claim(&mut e, 3, "s2", true).unwrap();
    assert_eq!(
        Slot::check_store(e.as_ref(), 4, 100, 50),
        Ok(Store::Replace)
    );
    e = Some(Slot::stored_over(e.as_ref(), "s2", 4, 100, 50));
    let held = Custody::new(3, "s2");
    assert_eq!(e.as_ref().unwrap().took, Some(held.clone()));
    // A refresh of epoch 4 keeps it; a woken origin's update of 3 names the holder (TAKEN).
    e = Some(Slot::stored_over(e.as_ref(), "s2", 4, 120, 60));
    assert_eq!(e.as_ref().unwrap().taken(3, "s1"), Some(held.clone()));
    assert_eq!(
        claim(&mut e, 3, "s3", true),
        Err(ClaimError::Held(held.clone()))
    );
    // s2 gave epoch 4 up and is fenced (here too: a plain claim of 4 by s3).
    assert_eq!(
        claim(&mut e, 4, "s3", false),
        Ok(Granted::Entry { epoch: 4, label: 4 })
    );
    let s = e.as_mut().unwrap();
    let (what, label) = s
        .supersede(&held, "s3", &[Fence::Record(120, 60)], 4, false)
        .unwrap();
    assert_eq!((what, label), (Handout::Successor(0), 4));
    let now = Custody {
        epoch: 3,
        holder: "s3".into(),
        label: 4,
    };
    assert_eq!(s.took, Some(now));
    // s3 confirms (DROPREPLICA at the epoch it took over): the claim goes, the entry stays.
    assert_eq!(s.drop_upto(3, "s3"), Dropped::Keep);
    assert_eq!(s.took, None);
    assert_eq!(
        claim(&mut e, 3, "s1", true),
        Err(ClaimError::Past { at: 4, epoch: 3 })
    );
    // Another server's new epoch over a claim is no such case.
    let mut e = Some(Slot::stored("s1", 3, 100, 50));
    claim(&mut e, 3, "s2", true).unwrap();
    assert_eq!(Slot::stored_over(e.as_ref(), "s3", 4, 0, 0).took, None);
}

#[test]
fn a_takeover_by_the_claimer_of_a_later_epoch_here_gets_nothing_others_are_past() {
    // s2's fence took the newer entry (epoch 4) here; its claim of epoch 3 is no refusal.
    let mut e = Some(Slot::stored("s3", 4, 10, 5));
    claim(&mut e, 4, "s2", false).unwrap();
    assert_eq!(claim(&mut e, 3, "s2", true), Ok(Granted::Fenced));
    assert_eq!(
        claim(&mut e, 3, "s1", true),
        Err(ClaimError::Past { at: 4, epoch: 3 })
    );
    assert_eq!(
        claim(&mut e, 3, "s2", false),
        Err(ClaimError::Past { at: 4, epoch: 3 })
    );
}
