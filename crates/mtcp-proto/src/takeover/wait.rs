//! Where a destination gets a connection's state from, in what order, and how long it waits for
//! each (decisions 34 and 53). The driver is `mtcp/src/takeover.rs`, `fetch_or_replica`: it
//! sends the FETCH, asks [`StateWait::wait`] what to wait for, and reports what it saw with
//! [`StateWait::on`].
//!
//! Lazy mode: the origin's answer, for as long as the FETCH's own bound. Eager mode: the origin
//! first, for [`timing::origin_wait`](crate::timing::origin_wait); if it said WORKING by then it
//! is alive and is waited for to the end. If it is silent or unreachable, a backup's replica.
//! If that fails too while the FETCH is still out, the origin once more, for
//! [`timing::origin_grace`](crate::timing::origin_grace): the origin may have frozen the connection and sent it with a
//! segment lost on the way, and then the connection exists only in that answer.

use crate::timing::origin_grace;
use crate::trigger::Rtt;
use crate::wire::RefuseCode;
use std::time::Duration;

/// What the driver waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The origin's answer to the FETCH: for at most this long, or `None` for as long as the
    /// FETCH's own bound.
    Origin(Option<Duration>),
    /// A takeover from a backup's replica.
    Replica,
    /// Nothing more: the takeover ends with this.
    Done(Outcome),
}

/// What a takeover ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The origin's answer, state or refusal.
    Origin,
    /// The replica's state.
    Replica,
    /// The replica's refusal: the origin gave no answer in time.
    ReplicaRefused,
    /// The replica's refusal, and then the origin's: both reasons, the replica's code.
    BothRefused,
}

/// Whether an origin's refusal of a FETCH (`code`) means it lost the connection, so that in
/// eager mode a backup's replica is tried as for an origin that cannot be reached: the origin
/// was not reached (`OriginUnreachable`), or it answered that it has no such connection at all
/// (`UnknownConnection`) — a server killed and restarted in the meantime answers so, its state
/// gone, while its backups still hold the epoch (found by `lab_pg`: a kill, a restart 0.5 s
/// later, and a MIGRATE slowed by loss behind it). Taking the replica stays safe when the
/// origin did hand the epoch on, or the connection ended: the backups then refuse the claim
/// (fenced, or holding a newer epoch).
pub fn origin_lost(code: RefuseCode) -> bool {
    matches!(
        code,
        RefuseCode::OriginUnreachable | RefuseCode::UnknownConnection
    )
}

/// What the driver saw while waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The origin answered: with the state (`ok`), or a refusal — `unreachable` when it could
    /// not be reached at all, so no answer will ever come.
    Origin { ok: bool, unreachable: bool },
    /// The bound of [`Wait::Origin`] passed with no answer.
    Timeout,
    /// The replica gave the state (`None`), or was refused with this code.
    Replica(Option<RefuseCode>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Eager: the first, bounded wait for the origin.
    First,
    /// The origin, to the FETCH's own bound (lazy mode, or an origin that said WORKING).
    Origin,
    /// A replica; `pending`: the FETCH is still out and may yet be answered.
    Replica {
        pending: bool,
    },
    /// The replica failed: the origin once more, for this long.
    Grace(Duration),
    Done(Outcome),
}

/// One destination's wait for one connection's state.
#[derive(Debug, Clone)]
pub struct StateWait {
    step: Step,
    first: Duration,
    to_origin: Rtt,
    fetch_bound: Duration,
}

impl StateWait {
    /// A wait that has just sent its FETCH. `first`: the eager first bound
    /// ([`origin_wait`](crate::timing::origin_wait)); `to_origin`: the measured path to the
    /// origin; `fetch_bound`: the FETCH's own bound.
    pub fn new(eager: bool, first: Duration, to_origin: Rtt, fetch_bound: Duration) -> Self {
        StateWait {
            step: if eager { Step::First } else { Step::Origin },
            first,
            to_origin,
            fetch_bound,
        }
    }

    /// What to wait for now.
    pub fn wait(&self) -> Wait {
        match self.step {
            Step::First => Wait::Origin(Some(self.first)),
            Step::Origin => Wait::Origin(None),
            Step::Replica { .. } => Wait::Replica,
            Step::Grace(d) => Wait::Origin(Some(d)),
            Step::Done(o) => Wait::Done(o),
        }
    }

    /// What the driver saw. `working`: whether the origin has said WORKING by now.
    pub fn on(&mut self, ev: Event, working: bool) {
        self.step = match (self.step, ev) {
            (
                Step::First,
                Event::Origin {
                    ok: false,
                    unreachable: true,
                },
            ) => Step::Replica { pending: false },
            (Step::First | Step::Origin, Event::Origin { .. }) => Step::Done(Outcome::Origin),
            (Step::First, Event::Timeout) if working => Step::Origin,
            (Step::First, Event::Timeout) => Step::Replica { pending: true },
            (Step::Replica { .. }, Event::Replica(None)) => Step::Done(Outcome::Replica),
            (Step::Replica { pending: true }, Event::Replica(Some(code))) => Step::Grace(
                origin_grace(working, code, &self.to_origin, self.fetch_bound),
            ),
            (Step::Replica { pending: false }, Event::Replica(Some(_))) => {
                Step::Done(Outcome::ReplicaRefused)
            }
            (Step::Grace(_), Event::Origin { ok: true, .. }) => Step::Done(Outcome::Origin),
            (Step::Grace(_), Event::Origin { ok: false, .. }) => Step::Done(Outcome::BothRefused),
            (Step::Grace(_), Event::Timeout) => Step::Done(Outcome::ReplicaRefused),
            // Nothing else is waited for in these steps: a stray event changes nothing.
            (step, _) => step,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(40);
    const BOUND: Duration = Duration::from_secs(5);

    fn eager() -> StateWait {
        StateWait::new(true, FIRST, Rtt::default(), BOUND)
    }

    const ANSWER: Event = Event::Origin {
        ok: true,
        unreachable: false,
    };
    const REFUSED: Event = Event::Origin {
        ok: false,
        unreachable: false,
    };
    const UNREACHABLE: Event = Event::Origin {
        ok: false,
        unreachable: true,
    };

    /// Runs `events` (with WORKING seen or not) and returns every wait asked for, the first
    /// included.
    fn run(mut w: StateWait, events: &[(Event, bool)]) -> Vec<Wait> {
        let mut waits = vec![w.wait()];
        for &(ev, working) in events {
            w.on(ev, working);
            waits.push(w.wait());
        }
        waits
    }

    #[test]
    fn a_lazy_destination_waits_for_the_origin_alone_to_the_fetch_s_bound() {
        let lazy = StateWait::new(false, FIRST, Rtt::default(), BOUND);
        for ev in [ANSWER, REFUSED, UNREACHABLE] {
            let waits = run(lazy.clone(), &[(ev, false)]);
            assert_eq!(waits, [Wait::Origin(None), Wait::Done(Outcome::Origin)]);
        }
    }

    #[test]
    fn an_eager_destination_takes_the_origin_s_answer_or_refusal_in_time() {
        for ev in [ANSWER, REFUSED] {
            let waits = run(eager(), &[(ev, false)]);
            assert_eq!(
                waits,
                [Wait::Origin(Some(FIRST)), Wait::Done(Outcome::Origin)]
            );
        }
    }

    #[test]
    fn an_origin_that_said_working_is_waited_for_to_the_end() {
        let waits = run(eager(), &[(Event::Timeout, true), (REFUSED, true)]);
        assert_eq!(
            waits,
            [
                Wait::Origin(Some(FIRST)),
                Wait::Origin(None),
                Wait::Done(Outcome::Origin)
            ]
        );
    }

    #[test]
    fn an_origin_that_lost_the_connection_sends_the_destination_to_the_replica() {
        assert!(origin_lost(RefuseCode::OriginUnreachable));
        assert!(origin_lost(RefuseCode::UnknownConnection));
        for c in [
            RefuseCode::StaleEpoch,
            RefuseCode::Busy,
            RefuseCode::Closed,
            RefuseCode::Divergence,
        ] {
            assert!(!origin_lost(c), "{c:?}");
        }
    }

    #[test]
    fn an_unreachable_origin_is_not_waited_for_again_after_the_replica() {
        let got = run(
            eager(),
            &[(UNREACHABLE, false), (Event::Replica(None), false)],
        );
        assert_eq!(got[1..], [Wait::Replica, Wait::Done(Outcome::Replica)]);
        let code = RefuseCode::StaleEpoch;
        let failed = run(
            eager(),
            &[(UNREACHABLE, false), (Event::Replica(Some(code)), true)],
        );
        assert_eq!(failed[2], Wait::Done(Outcome::ReplicaRefused));
    }

    #[test]
    fn a_silent_origin_gets_one_answer_bound_more_after_the_replica_fails() {
        let code = RefuseCode::UnknownConnection;
        let waits = run(
            eager(),
            &[(Event::Timeout, false), (Event::Replica(Some(code)), false)],
        );
        assert_eq!(waits[1], Wait::Replica);
        let grace = origin_grace(false, code, &Rtt::default(), BOUND);
        assert!(grace < BOUND, "{grace:?}");
        assert_eq!(waits[2], Wait::Origin(Some(grace)));
        // Its late answer, its refusal, or nothing: the origin's state, both reasons, the
        // replica's refusal.
        let after = |ev| {
            let mut w = eager();
            w.on(Event::Timeout, false);
            w.on(Event::Replica(Some(code)), false);
            w.on(ev, false);
            w.wait()
        };
        assert_eq!(after(ANSWER), Wait::Done(Outcome::Origin));
        assert_eq!(after(REFUSED), Wait::Done(Outcome::BothRefused));
        assert_eq!(after(Event::Timeout), Wait::Done(Outcome::ReplicaRefused));
    }

    #[test]
    fn an_origin_busy_handing_over_gets_the_fetch_s_whole_bound_after_the_replica_fails() {
        // WORKING seen while the replica was tried, or a backup that says the epoch is
        // claimed (the origin fences its backups while it hands over): the origin is alive.
        for (code, working) in [
            (RefuseCode::UnknownConnection, true),
            (RefuseCode::StaleEpoch, false),
        ] {
            let waits = run(
                eager(),
                &[
                    (Event::Timeout, false),
                    (Event::Replica(Some(code)), working),
                ],
            );
            assert_eq!(waits[2], Wait::Origin(Some(BOUND)));
        }
    }

    #[test]
    fn a_replica_s_state_ends_the_wait_and_stray_events_change_nothing() {
        let mut w = eager();
        w.on(Event::Timeout, false);
        // The origin is not read while the replica is asked.
        w.on(ANSWER, false);
        w.on(Event::Timeout, false);
        assert_eq!(w.wait(), Wait::Replica);
        w.on(Event::Replica(None), false);
        assert_eq!(w.wait(), Wait::Done(Outcome::Replica));
        // Once done, done: the origin's future is never polled again.
        for ev in [ANSWER, REFUSED, Event::Timeout, Event::Replica(None)] {
            w.on(ev, true);
            assert_eq!(w.wait(), Wait::Done(Outcome::Replica));
        }
    }

    #[test]
    fn after_any_origin_answer_the_origin_is_never_waited_for_again() {
        // The driver's FETCH future completes with that answer; polling it again would be a
        // bug. Every sequence of events that includes an origin answer, from any step, must
        // never ask for the origin afterwards.
        let evs = [
            ANSWER,
            REFUSED,
            UNREACHABLE,
            Event::Timeout,
            Event::Replica(None),
            Event::Replica(Some(RefuseCode::UnknownConnection)),
        ];
        for eager_mode in [false, true] {
            for a in evs {
                for b in evs {
                    for c in evs {
                        for working in [false, true] {
                            let mut w = StateWait::new(eager_mode, FIRST, Rtt::default(), BOUND);
                            let mut answered = false;
                            for ev in [a, b, c] {
                                let asked_origin = matches!(w.wait(), Wait::Origin(_));
                                if !asked_origin {
                                    // The driver only reports what it waited for.
                                    if matches!(ev, Event::Origin { .. } | Event::Timeout) {
                                        continue;
                                    }
                                } else if matches!(ev, Event::Replica(_)) {
                                    continue;
                                }
                                w.on(ev, working);
                                answered |= matches!(ev, Event::Origin { .. });
                                if answered {
                                    assert!(
                                        !matches!(w.wait(), Wait::Origin(_)),
                                        "{eager_mode} {a:?} {b:?} {c:?}: {:?}",
                                        w.wait()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
