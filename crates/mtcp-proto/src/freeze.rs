//! An origin's decision, without I/O, whether a connection may freeze for a move now (decision
//! 55). Two kinds of section hold a freeze back:
//! * a `lock_state` section is never split: the freeze waits for it to end, and past
//!   `lock_timeout` the move is refused `Busy`;
//! * a *soft* section (the application is inside a unit it expects to finish soon — for the
//!   PostgreSQL front-end, an open transaction) is waited for only `soft_wait`: a move prefers a
//!   boundary when one is near, and splits the section when it is not (the application then
//!   restarts from its last restart point, as for any move). Only while the client's input
//!   still reaches the application: on the kernel fast path the origin serves the client's
//!   socket until it freezes, but a relaying agent stops forwarding input once it moves a
//!   connection, so a soft section there could not end and is not waited for.
//!
//! The runtime calls [`may_freeze`] whenever a section ends or a wait runs out. Before each
//! decision (and after every await of a step that acts on a connection at an epoch) it checks
//! with [`still_serves`] that the connection is still the one asked about.

use crate::phase::Phase;
use crate::refusal::Refusal;
use crate::wire::RefuseCode;
use crate::Cid;
use std::time::Duration;

/// Why a FETCH for `cid` at `epoch` finds no such connection here, given the epoch it ended in
/// order at lately (`closed_epoch`, `None`: it did not): if it ended at that very epoch the
/// client has every byte, and the move is answered `Closed` (the agent leaves it be); anything
/// else is `UnknownConnection` — a connection that ended at another epoch is as unknown as one
/// never seen.
pub fn absent(closed_epoch: Option<u64>, epoch: u64, cid: Cid, server: &str) -> Refusal {
    if closed_epoch == Some(epoch) {
        Refusal::new(
            RefuseCode::Closed,
            format!("connection {cid} ended in order; the client has every byte"),
        )
    } else {
        Refusal::unknown_connection(format!("server {server} has no connection {cid}"))
    }
}

/// `TCP_SYN_RECV` in `tcpi_state`: the only state other than established that is not closing.
pub const TCP_SYN_RECV: u8 = 3;

/// The code a fast-path freeze that failed is refused with. `not_established`: the kernel's
/// TCP state of a socket that could not freeze because it is not established (`None`: it failed
/// otherwise). A closing socket (the client closed its side) ends here, as it would have
/// wherever it was: `Closed`, not a failure to move elsewhere (the agent leaves it be). A
/// connection still being set up, or any other failure, is `Busy`: the move may be retried.
pub fn failure_code(not_established: Option<u8>) -> RefuseCode {
    match not_established {
        Some(s) if s != TCP_SYN_RECV => RefuseCode::Closed,
        _ => RefuseCode::Busy,
    }
}

/// Whether connection `cid`, now at epoch `cur_epoch` in phase `phase`, is still the one a
/// request (or a step begun before an await) for `epoch` is about, and still serves here.
/// * Another epoch: the connection moved on — refused `StaleEpoch`, and whoever holds an old
///   token learns nothing of where the connection is now (issue 14).
/// * Not serving (moved, aborted or closed): refused `UnknownConnection`.
pub fn still_serves(cur_epoch: u64, phase: &Phase, epoch: u64, cid: Cid) -> Result<(), Refusal> {
    if cur_epoch != epoch {
        return Err(Refusal::stale_epoch(format!(
            "connection {cid} has moved on since epoch {epoch}: the token is stale"
        )));
    }
    if !phase.serves() {
        return Err(Refusal::unknown_connection(format!(
            "connection {cid} is no longer served here"
        )));
    }
    Ok(())
}

/// What the origin does with a freeze request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// Freeze at once.
    Now,
    /// Wait for a section to end, at most this much longer, then ask again.
    Wait(Duration),
    /// A `lock_state` section outlasted `lock_timeout`: refuse the move (`Busy`).
    Busy,
}

/// How long a freeze waits for sections to end (the runtime's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waits {
    /// For a `lock_state` section.
    pub lock: Duration,
    /// For a soft section.
    pub soft: Duration,
}

/// Whether a freeze asked for `waited` ago may happen now, with a `lock_state` section held or
/// not (`locked`), `soft` soft sections open, and the client's input still flowing to the
/// application (`input_flows`: the fast path) or not (a relayed connection being moved).
pub fn may_freeze(
    locked: bool,
    soft: u32,
    input_flows: bool,
    waited: Duration,
    w: Waits,
) -> Freeze {
    if locked {
        return match w.lock.checked_sub(waited) {
            Some(left) if !left.is_zero() => Freeze::Wait(left),
            _ => Freeze::Busy,
        };
    }
    match w.soft.checked_sub(waited) {
        Some(left) if soft > 0 && input_flows && !left.is_zero() => Freeze::Wait(left),
        _ => Freeze::Now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: Cid = Cid([7; 16]);

    #[test]
    fn an_absent_connection_that_ended_in_order_at_the_asked_epoch_is_closed() {
        let r = absent(Some(4), 4, CID, "s1");
        assert_eq!(r.code, RefuseCode::Closed);
        assert_eq!(
            r.reason,
            format!("connection {CID} ended in order; the client has every byte")
        );
    }

    #[test]
    fn an_absent_connection_is_otherwise_unknown() {
        for closed in [None, Some(3), Some(5)] {
            let r = absent(closed, 4, CID, "s1");
            assert_eq!(r.code, RefuseCode::UnknownConnection, "{closed:?}");
            assert_eq!(r.reason, format!("server s1 has no connection {CID}"));
        }
    }

    #[test]
    fn a_freeze_that_meets_a_closing_socket_is_closed_and_anything_else_busy() {
        // Closing states (FIN_WAIT1 .. CLOSING): the client is going; no retry elsewhere.
        for s in [4, 5, 6, 7, 8, 9, 10, 11] {
            assert_eq!(failure_code(Some(s)), RefuseCode::Closed, "state {s}");
        }
        // A connection still being set up may move once it is established.
        assert_eq!(failure_code(Some(TCP_SYN_RECV)), RefuseCode::Busy);
        // Any other failure (no permission, a syscall that failed): busy.
        assert_eq!(failure_code(None), RefuseCode::Busy);
    }

    #[test]
    fn a_serving_connection_at_the_asked_epoch_is_still_the_one() {
        for p in [Phase::Live, Phase::AppClosed] {
            assert_eq!(still_serves(3, &p, 3, CID), Ok(()));
        }
    }

    #[test]
    fn another_epoch_is_stale_whatever_the_phase() {
        for p in [
            Phase::Live,
            Phase::AppClosed,
            Phase::Migrated,
            Phase::Closed,
        ] {
            for (cur, asked) in [(4, 3), (3, 4), (0, 1)] {
                let r = still_serves(cur, &p, asked, CID).unwrap_err();
                assert_eq!(r.code, RefuseCode::StaleEpoch, "{p:?} {cur} {asked}");
                // It names the asked epoch only, never the current one.
                assert_eq!(
                    r.reason,
                    format!(
                        "connection {CID} has moved on since epoch {asked}: the token is stale"
                    )
                );
            }
        }
    }

    #[test]
    fn a_connection_that_no_longer_serves_is_unknown() {
        for p in [Phase::Migrated, Phase::Aborted("x".into()), Phase::Closed] {
            let r = still_serves(5, &p, 5, CID).unwrap_err();
            assert_eq!(r.code, RefuseCode::UnknownConnection, "{p:?}");
            assert_eq!(
                r.reason,
                format!("connection {CID} is no longer served here")
            );
        }
    }

    const W: Waits = Waits {
        lock: Duration::from_secs(10),
        soft: Duration::from_millis(20),
    };
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_held_freezes_at_once() {
        assert_eq!(may_freeze(false, 0, true, Duration::ZERO, W), Freeze::Now);
        assert_eq!(may_freeze(false, 0, true, 30 * MS, W), Freeze::Now);
    }

    #[test]
    fn a_soft_section_is_waited_for_a_while_then_split() {
        assert_eq!(
            may_freeze(false, 1, true, Duration::ZERO, W),
            Freeze::Wait(20 * MS)
        );
        assert_eq!(may_freeze(false, 2, true, 15 * MS, W), Freeze::Wait(5 * MS));
        assert_eq!(may_freeze(false, 1, true, 20 * MS, W), Freeze::Now);
        assert_eq!(may_freeze(false, 1, true, 25 * MS, W), Freeze::Now);
    }

    #[test]
    fn a_lock_is_waited_for_up_to_its_bound_then_the_move_is_refused() {
        assert_eq!(
            may_freeze(true, 0, true, Duration::ZERO, W),
            Freeze::Wait(10_000 * MS)
        );
        // A soft section does not shorten a lock's wait, nor end it.
        assert_eq!(
            may_freeze(true, 1, true, 30 * MS, W),
            Freeze::Wait(9_970 * MS)
        );
        assert_eq!(may_freeze(true, 0, true, 10_000 * MS, W), Freeze::Busy);
        assert_eq!(may_freeze(true, 1, true, 11_000 * MS, W), Freeze::Busy);
    }

    #[test]
    fn a_soft_section_is_not_waited_for_when_input_cannot_reach_it() {
        assert_eq!(may_freeze(false, 1, false, Duration::ZERO, W), Freeze::Now);
        // A lock still is.
        assert_eq!(
            may_freeze(true, 1, false, Duration::ZERO, W),
            Freeze::Wait(10_000 * MS)
        );
    }

    #[test]
    fn no_soft_wait_configured_never_waits_on_soft_sections() {
        let w = Waits {
            soft: Duration::ZERO,
            ..W
        };
        assert_eq!(may_freeze(false, 3, true, Duration::ZERO, w), Freeze::Now);
    }

    #[test]
    fn no_lock_wait_configured_refuses_a_locked_freeze_at_once() {
        let w = Waits {
            lock: Duration::ZERO,
            ..W
        };
        assert_eq!(may_freeze(true, 0, true, Duration::ZERO, w), Freeze::Busy);
        assert_eq!(may_freeze(false, 0, true, Duration::ZERO, w), Freeze::Now);
    }

    #[test]
    fn a_lock_is_waited_for_to_the_last_nanosecond() {
        let almost = W.lock - Duration::from_nanos(1);
        assert_eq!(
            may_freeze(true, 0, false, almost, W),
            Freeze::Wait(Duration::from_nanos(1))
        );
    }
}
