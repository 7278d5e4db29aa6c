//! The keeper's and the agent's custody rules at their edges: requests for other epochs, the
//! precedence of a fence's answers, the gate when the agent speaks first, and the lineage's
//! bound.

use super::*;

#[test]
fn a_request_for_any_epoch_but_the_one_handed_over_is_stale() {
    let mut c = Custody::new(5, "s2");
    c.supersede("s3", &[Fence::Nothing], 0, false).unwrap();
    for epoch in [4, 6, 7] {
        let e = c.successor(epoch).unwrap_err();
        assert_eq!(e.code, RefuseCode::StaleEpoch, "epoch {epoch}");
        assert_eq!(
            e.reason,
            format!("the connection was handed over at epoch 5, not {epoch}")
        );
    }
    assert_eq!(c.successor(5), Ok(7));
}

#[test]
fn a_refusing_backup_refuses_a_supersede_even_when_no_fence_is_needed() {
    let mut c = Custody::new(2, "s2");
    let e = c
        .supersede(
            "s3",
            &[Fence::Record(9, 9), Fence::Refused(RefuseCode::Busy)],
            10,
            true,
        )
        .unwrap_err();
    assert_eq!(e.code, RefuseCode::StaleEpoch);
    assert!(e.reason.contains("epoch 3, taken by s2"), "{e}");
    assert!(e.reason.contains("(Busy)"), "{e}");
    assert_eq!(c, Custody::new(2, "s2"));
}

#[test]
fn the_newest_restart_point_is_compared_by_output_then_input() {
    let mut c = Custody::new(0, "s2");
    let f = [
        Fence::Record(80, 9),
        Fence::Record(80, 12),
        Fence::Record(79, 100),
    ];
    assert_eq!(
        c.supersede("s3", &f, 0, false),
        Ok((Handout::Successor(1), 1))
    );
    // The same point on two backups: either is the holder's; the later one is named.
    let mut c = Custody::new(0, "s2");
    let f = [Fence::Record(5, 5), Fence::Record(5, 5)];
    assert_eq!(
        c.supersede("s3", &f, 0, false),
        Ok((Handout::Successor(1), 1))
    );
}

#[test]
fn a_superseded_holders_successor_is_handed_out_above_the_floor() {
    let mut c = Custody::new(3, "s2");
    assert_eq!(
        c.supersede("s3", &[Fence::Nothing], 9, false),
        Ok((Handout::Kept, 9))
    );
    // The next fence is of the new holder's successor: one past the raised label.
    assert_eq!(c.successor(3), Ok(10));
    assert_eq!(
        c.supersede("s4", &[Fence::Nothing], 0, false),
        Ok((Handout::Kept, 10))
    );
}

#[test]
fn a_claimer_that_answered_and_whose_fence_reached_nobody_is_not_passed_over() {
    let mut claim = Custody::new(3, "s3");
    // No backup answered at all (an empty list included): the agent may hold its token.
    for fences in [vec![], vec![Fence::Unreachable, Fence::Unreachable]] {
        let e = claim.pass("s1", &GaveUp::Answered(fences)).unwrap_err();
        assert_eq!(e, PassError::Unfenced { epoch: 4 });
        assert_eq!(e.code(), RefuseCode::OriginUnreachable);
        assert_eq!(
            e.to_string(),
            "the claimer answered RESUMED for epoch 4 and none of its backups could be fenced"
        );
    }
    // A refusal wins over unreachable backups.
    let e = claim
        .pass(
            "s1",
            &GaveUp::Answered(vec![
                Fence::Unreachable,
                Fence::Refused(RefuseCode::StaleEpoch),
            ]),
        )
        .unwrap_err();
    assert_eq!(
        e,
        PassError::Moved {
            epoch: 4,
            code: RefuseCode::StaleEpoch
        }
    );
    assert_eq!(claim, Custody::new(3, "s3"));
}

#[test]
fn repeated_passes_climb_one_epoch_each() {
    let mut claim = Custody::new(3, "s3");
    assert_eq!(claim.pass("s1", &GaveUp::Unanswered), Ok(4));
    assert_eq!(
        claim.pass("s2", &GaveUp::Answered(vec![Fence::Nothing])),
        Ok(5)
    );
    assert_eq!(
        (claim.holder.as_str(), claim.label, claim.epoch),
        ("s2", 5, 3)
    );
}

#[test]
fn the_agent_speaking_before_the_answer_settles_the_epoch_for_it() {
    use GateEvent::*;
    let mut g = None;
    assert!(!Gate::may_commit(g));
    assert_eq!(Gate::settle(&mut g, Hear), Verdict::Go);
    assert_eq!(g, Some(Gate::Heard));
    assert!(Gate::may_commit(g));
    assert_eq!(Gate::settle(&mut g, Answer), Verdict::Go);
    assert_eq!(Gate::settle(&mut g, Yield), Verdict::Refuse);
    assert_eq!(g, Some(Gate::Heard), "a refused yield changes nothing");
}

#[test]
fn a_yielded_or_abandoned_gate_never_commits() {
    use GateEvent::*;
    for first in [None, Some(Answer)] {
        let mut g = None;
        if let Some(e) = first {
            Gate::settle(&mut g, e);
        }
        Gate::settle(&mut g, Yield);
        let want = match first {
            None => Gate::Yielded,
            Some(_) => Gate::Abandoned,
        };
        assert_eq!(g, Some(want));
        for e in [Hear, Answer, Hear] {
            assert_eq!(Gate::settle(&mut g, e), Verdict::Refuse);
            assert!(!Gate::may_commit(g));
        }
        assert_eq!(g, Some(want));
    }
}

#[test]
fn the_lineage_forgets_the_oldest_unconfirmed_moves_first() {
    let mut l = Lineage::default();
    for e in 0..(MAX_LINEAGE as u64 + 3) {
        l.moved(step("s", e));
    }
    let newest = MAX_LINEAGE as u64 + 2;
    assert_eq!(l.fallback(newest + 1), Some(&step("s", newest)));
    let oldest = 3;
    assert_eq!(l.fallback(oldest + 1), Some(&step("s", oldest)));
    assert_eq!(l.fallback(oldest), None, "epochs 0 to 2 were forgotten");
}

#[test]
fn a_second_move_from_the_same_epoch_replaces_the_first() {
    let mut l = Lineage::default();
    l.moved(step("s1", 3));
    l.moved(step("s2", 3));
    assert_eq!(l.fallback(4), Some(&step("s2", 3)));
    assert_eq!(l.fallback(3), None);
    assert!(!l.is_empty());
}

#[test]
fn a_custody_ends_only_with_its_holder_s_confirmation_of_its_epoch_or_a_later_one() {
    let c = Custody {
        epoch: 4,
        holder: "s2".into(),
        label: 4,
    };
    assert!(c.confirmed_by(4, "s2"));
    assert!(c.confirmed_by(6, "s2"), "a later move by the same holder");
    assert!(!c.confirmed_by(3, "s2"), "an older epoch's confirmation");
    assert!(!c.confirmed_by(4, "s3"), "a holder superseded since");
}
