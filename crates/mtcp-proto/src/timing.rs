//! Bounds on waiting for another party during a move, derived from measured round-trip times
//! (decision 32). Pure functions of an [`Rtt`] estimate and configuration; the runtime and the
//! agent arm their timers with them.
//!
//! The idea throughout: a party that answers at once (an origin's WORKING, a backup's answer to
//! a claim or a push, a destination's WORKING to the agent) is given one round trip plus two
//! retransmission timeouts — one lost segment each way on a healthy but lossy path is waited
//! out, a silent party is given up on after a fraction of a second instead of a fixed 30 s.

use crate::trigger::{Rtt, MIN_RTO};
use crate::wire::RefuseCode;
use std::time::Duration;

/// The answer bound before any round trip to that party was measured: a lost SYN is
/// retransmitted after 1 s on Linux, so anything shorter would give up on a healthy path.
pub const UNMEASURED: Duration = Duration::from_millis(1200);

/// How long a destination keeps trying to store a taken-over connection's restart point on
/// its backups before it answers RESUMED anyway (at least; see [`protect_bound`]). Past it a
/// backup counts as failed (it did not answer for seconds), and the connection runs without a
/// replica until the regular pushes reach one.
pub const PROTECT_MIN: Duration = Duration::from_secs(3);

/// A frame once begun is given this long, plus [`FRAME_MIN_RATE`] for what has arrived.
pub const FRAME_GRACE: Duration = Duration::from_secs(10);
/// The slowest pace (bytes per second) at which a begun frame keeps its reader waiting.
pub const FRAME_MIN_RATE: u64 = 32 << 10;

/// How long after its first bytes a frame may still be incomplete with `received` bytes of it
/// in: [`FRAME_GRACE`] plus the time those bytes take at [`FRAME_MIN_RATE`]. A sender that
/// keeps up that pace (any real link, even a lossy one) is waited for as long as it sends; one
/// that parks a partial frame, or trickles it, is cut off — it cannot hold a reader's buffer
/// indefinitely.
pub fn frame_deadline(received: usize) -> Duration {
    FRAME_GRACE + Duration::from_secs_f64(received as f64 / FRAME_MIN_RATE as f64)
}

/// How often a draining server repeats its HINT to a connection still here (a hint can be lost
/// with a session that breaks; see [`crate::drain`]). Repeating every connection's hint on each
/// status poll (every 20 ms from `mtcp drain`) made a drain quadratic in the number of
/// connections.
pub const REHINT_EVERY: Duration = Duration::from_secs(1);

/// Whether a connection last hinted at `last` (never: `None`) is due for its hint again at
/// `now`.
pub fn rehint_due(last: Option<std::time::Instant>, now: std::time::Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= REHINT_EVERY)
}

/// The floor of the kernel's retransmission timeout on the connections between M-TCP's own
/// parties — agent to server, server to server — where Linux allows one per socket
/// (`TCP_RTO_MIN_US`, Linux 6.15 and later; decision 72). Linux's default floor is 200 ms, and a
/// request that is the only segment in flight is not tail-loss-probed sooner either, so one
/// lost MIGRATE, FETCH or RESUMED cost a move 200 ms on any path. The kernel's timeout stays
/// its estimate (the round trip plus four deviations) above this floor: a floor of 40 ms, as
/// long as the longest delayed ACK, retransmits spuriously only after a 40 ms stall of the
/// receiver. Client connections keep the system's default: they are the client's network.
pub const RTO_FLOOR: Duration = Duration::from_millis(40);

/// The shortest wait before a TCP connect is doubled ([`hedge_after`]).
pub const HEDGE_MIN: Duration = Duration::from_millis(50);

/// How long a TCP connect waits for its handshake before a second one is started beside it
/// (decision 71). A handshake answered at all is answered within a round trip, but Linux
/// retransmits a lost SYN, and a server its lost SYN-ACK, only after a full second: on a path
/// losing a few percent, that second went into every bound of a move and made them miss. Three
/// round trips of the path to that party, at least [`HEDGE_MIN`] (a busy host's accept) and at
/// most [`MIN_RTO`]; [`MIN_RTO`] before a round trip was measured.
pub fn hedge_after(rtt: &Rtt) -> Duration {
    rtt.srtt()
        .map_or(MIN_RTO, |s| (s * 3).clamp(HEDGE_MIN, MIN_RTO))
}

/// How long to wait for an answer the other party sends at once: one round trip plus two
/// retransmission timeouts (each at least [`MIN_RTO`]).
pub fn answer_bound(rtt: &Rtt) -> Duration {
    measured_answer(rtt).unwrap_or(UNMEASURED)
}

/// One round trip plus two retransmission timeouts, once `rtt` has a sample.
fn measured_answer(rtt: &Rtt) -> Option<Duration> {
    Some(rtt.srtt()? + rtt.rto()? * 2)
}

/// How long the agent waits in silence on a MIGRATE's connection to a candidate. The
/// destination sends WORKING every `heartbeat` until it answers, so silence
/// longer than one beat plus an answer bound means the candidate is dead, hung or cut off.
/// `rtt` is the agent's estimate of its path to the servers (the session's PING/PONG).
pub fn candidate_silence(rtt: &Rtt, heartbeat: Duration) -> Duration {
    // The path's own round trip, not the current session's queue (`Rtt::unqueued`); without a
    // sample, the session's first bound: two minimum RTOs.
    heartbeat + measured_answer(&rtt.unqueued()).unwrap_or(MIN_RTO * 2)
}

/// The round trip a silence bound toward a candidate follows ([`candidate_silence`]): the
/// candidate's own path, timed by the agent's TCP handshakes to it (`handshakes`), once there
/// is one; else the current session's (`session`, its PING/PONG). A session whose reader is
/// slow keeps seconds of data ahead of every PONG, so even its smallest recent sample can be
/// seconds, while a handshake is answered by the candidate's kernel at once.
pub fn toward_candidate(handshakes: Option<Rtt>, session: &Rtt) -> Rtt {
    match handshakes {
        Some(h) if h.srtt().is_some() => h,
        _ => *session,
    }
}

/// How long a destination waits for the origin's first answer (WORKING) before it counts as
/// unreachable and a replica is used: the configured `origin_wait`, but never less than the
/// measured round trip to the origin plus a margin — on a long path a healthy origin would
/// otherwise always look dead.
pub fn origin_wait(configured: Duration, to_origin: &Rtt) -> Duration {
    match to_origin.srtt() {
        Some(s) => configured.max(s * 2 + Duration::from_millis(10)),
        None => configured,
    }
}

/// A destination whose origin missed its first-answer bound ([`origin_wait`]) and whose
/// takeover from a replica then failed with `replica`: how much longer it keeps waiting for the
/// origin's answer to the FETCH it sent and never gave up on. The origin may have frozen the
/// connection, fenced its backups and sent the state with a segment lost on the way: the
/// connection then exists only in that answer (the origin forgot it, its backups refuse the
/// epoch), so dropping the channel would lose it.
/// * The origin answered (WORKING) meanwhile, or a backup refused the epoch as already claimed
///   (`StaleEpoch`: the origin fences its backups while it hands the connection over): the
///   origin is alive and busy with a hand-over — wait up to `total`, the bound of a FETCH.
/// * Otherwise one answer bound towards the origin: a slow but alive origin still gets through,
///   a dead one costs a fraction of a second.
pub fn origin_grace(
    answered: bool,
    replica: RefuseCode,
    to_origin: &Rtt,
    total: Duration,
) -> Duration {
    if answered || replica == RefuseCode::StaleEpoch {
        total
    } else {
        answer_bound(to_origin).min(total)
    }
}

/// How long a destination may keep trying to store a taken-over connection's restart point on
/// its backups before answering RESUMED: [`PROTECT_MIN`], or five answer bounds on a slower
/// measured path.
pub fn protect_bound(to_backup: &Rtt) -> Duration {
    match to_backup.srtt() {
        Some(_) => PROTECT_MIN.max(answer_bound(to_backup) * 5),
        None => PROTECT_MIN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_is_doubled_after_three_round_trips_within_bounds() {
        let mut r = Rtt::default();
        assert_eq!(hedge_after(&r), MIN_RTO);
        r.sample(Duration::from_micros(40));
        assert_eq!(hedge_after(&r), HEDGE_MIN);
        let mut r = Rtt::default();
        r.sample(Duration::from_millis(20));
        assert_eq!(hedge_after(&r), Duration::from_millis(60));
        let mut r = Rtt::default();
        r.sample(Duration::from_millis(300));
        assert_eq!(hedge_after(&r), MIN_RTO);
    }

    #[test]
    fn a_connection_is_hinted_again_once_a_second_at_most() {
        let t0 = std::time::Instant::now();
        assert!(rehint_due(None, t0));
        assert!(!rehint_due(Some(t0), t0));
        assert!(!rehint_due(Some(t0), t0 + Duration::from_millis(999)));
        assert!(rehint_due(Some(t0), t0 + REHINT_EVERY));
        // A clock that seems to go back does not make it due.
        assert!(!rehint_due(Some(t0 + Duration::from_secs(5)), t0));
    }

    fn rtt(ms: u64) -> Rtt {
        let mut r = Rtt::default();
        for _ in 0..20 {
            r.sample(Duration::from_millis(ms));
        }
        r
    }

    #[test]
    fn answers_are_waited_for_one_rtt_and_two_retransmissions() {
        // 40 ms between servers (two 20 ms links): 40 + 2 × 200.
        let b = answer_bound(&rtt(40));
        assert!(
            b >= Duration::from_millis(440) && b < Duration::from_millis(460),
            "{b:?}"
        );
        // A long path: the RTO itself grows.
        assert!(answer_bound(&rtt(300)) >= Duration::from_millis(900));
        // Nothing measured: a lost SYN (1 s) must not count as a dead peer.
        assert_eq!(answer_bound(&Rtt::default()), UNMEASURED);
        assert!(UNMEASURED > Duration::from_secs(1));
    }

    #[test]
    fn a_silent_candidate_costs_well_under_a_second_at_20_ms() {
        let hb = Duration::from_millis(100);
        let b = candidate_silence(&rtt(20), hb);
        assert!(
            b >= Duration::from_millis(500) && b < Duration::from_millis(560),
            "{b:?}"
        );
        assert_eq!(
            candidate_silence(&Rtt::default(), hb),
            Duration::from_millis(500)
        );
        // Grows with the path and with the heartbeat.
        assert!(candidate_silence(&rtt(200), hb) > b);
        assert!(candidate_silence(&rtt(20), Duration::from_secs(1)) > Duration::from_secs(1));
    }

    #[test]
    fn a_queue_on_the_current_session_does_not_slow_the_give_up_on_a_candidate() {
        // PONGs behind a slow reader's queued data: seconds, then the path's own 20 ms once.
        let hb = Duration::from_millis(100);
        let mut r = Rtt::default();
        for ms in [20, 2500, 3000, 2800, 3100, 2900] {
            r.sample(Duration::from_millis(ms));
        }
        assert!(
            r.srtt().unwrap() > Duration::from_secs(1),
            "the session's own estimate grows"
        );
        let b = candidate_silence(&r, hb);
        assert!(b < Duration::from_millis(560), "{b:?}");
        // Once the 20 ms sample leaves the window, the bound follows the smallest recent one.
        for _ in 0..8 {
            r.sample(Duration::from_millis(2500));
        }
        assert!(candidate_silence(&r, hb) > Duration::from_secs(5));
    }

    #[test]
    fn a_candidate_s_handshakes_outweigh_a_backlogged_session() {
        let hb = Duration::from_millis(100);
        let mut session = Rtt::default();
        for _ in 0..8 {
            session.sample(Duration::from_millis(2500));
        }
        let mut handshakes = Rtt::default();
        handshakes.sample(Duration::from_micros(80));
        let b = candidate_silence(&toward_candidate(Some(handshakes), &session), hb);
        // Loopback: one beat and two minimum RTOs.
        assert!(
            b >= Duration::from_millis(500) && b < Duration::from_millis(501),
            "{b:?}"
        );
        // No handshake timed yet (or an empty estimate): the session's.
        let s = candidate_silence(&toward_candidate(None, &session), hb);
        assert!(s > Duration::from_secs(5), "{s:?}");
        assert_eq!(
            candidate_silence(&toward_candidate(Some(Rtt::default()), &session), hb),
            s
        );
    }

    #[test]
    fn origin_wait_never_falls_below_the_path() {
        let cfg = Duration::from_millis(100);
        assert_eq!(origin_wait(cfg, &Rtt::default()), cfg);
        assert_eq!(origin_wait(cfg, &rtt(20)), cfg);
        assert_eq!(origin_wait(cfg, &rtt(80)), Duration::from_millis(170));
    }

    #[test]
    fn a_destination_keeps_waiting_for_an_origin_that_is_handing_the_connection_over() {
        let total = Duration::from_secs(13);
        // The origin fenced its backups (the epoch is claimed): its state is on the way.
        assert_eq!(
            origin_grace(false, RefuseCode::StaleEpoch, &rtt(40), total),
            total
        );
        // It answered WORKING late: alive, working on it.
        assert_eq!(
            origin_grace(true, RefuseCode::Divergence, &rtt(40), total),
            total
        );
        // No sign of life: one answer bound (40 + 2 × 200 ms), not the FETCH's bound.
        let g = origin_grace(false, RefuseCode::Divergence, &rtt(40), total);
        assert!(
            g >= Duration::from_millis(440) && g < Duration::from_millis(460),
            "{g:?}"
        );
        assert_eq!(
            origin_grace(false, RefuseCode::OriginUnreachable, &rtt(40), total),
            g
        );
        // Never past the FETCH's own bound.
        assert_eq!(
            origin_grace(
                false,
                RefuseCode::OriginUnreachable,
                &Rtt::default(),
                Duration::from_millis(300)
            ),
            Duration::from_millis(300)
        );
    }

    #[test]
    fn protection_is_tried_for_seconds_and_longer_on_slow_paths() {
        assert_eq!(protect_bound(&rtt(40)), PROTECT_MIN);
        assert_eq!(protect_bound(&Rtt::default()), PROTECT_MIN);
        assert!(protect_bound(&rtt(500)) > Duration::from_secs(7));
    }

    #[test]
    fn a_begun_frame_gets_grace_plus_its_bytes_at_the_minimum_pace() {
        assert_eq!(frame_deadline(0), FRAME_GRACE);
        // 1 MiB at 32 KiB/s is 32 s more.
        assert_eq!(
            frame_deadline(1 << 20),
            FRAME_GRACE + Duration::from_secs(32)
        );
        // A trickle of a byte a second never catches up with its deadline.
        let trickled = |secs: u64| frame_deadline(secs as usize);
        assert!(trickled(60) < Duration::from_secs(60));
    }
}
