//! A server's side of an RTT probe connection: an agent opens one to the data port with a PROBE
//! and sends one now and then; the server answers each with a PROBEREPLY echoing its time. The
//! server's I/O driver (`crates/mtcp/src/probe.rs`, `probe`) reads, writes and keeps the time;
//! what it does with each event is decided here.
//!
//! A probe connection costs its server a task, so they are bounded: at most
//! [`MAX_PROBE_CONNS`] at once per process (more are refused `Busy`), and one is closed when
//! its agent probes faster than once per [`PROBE_MIN_GAP`], stays silent for [`PROBE_IDLE`], or
//! sends anything but PROBE.

use crate::refusal::Refusal;
use crate::wire::Msg;
use std::time::Duration;

/// A probe connection with no probe for this long is closed.
pub const PROBE_IDLE: Duration = Duration::from_secs(10);
/// Probes closer together than this close the connection.
pub const PROBE_MIN_GAP: Duration = Duration::from_millis(250);
/// Probe connections served at once per process.
pub const MAX_PROBE_CONNS: usize = 4096;

/// Why a probe connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Close {
    /// A probe came within [`PROBE_MIN_GAP`] of the one before.
    #[error("probes come faster than one per {PROBE_MIN_GAP:?}")]
    TooFast,
    /// Nothing came for [`PROBE_IDLE`], or the agent ended the connection.
    #[error("no probe within {PROBE_IDLE:?}")]
    Idle,
    /// A message that has no place on a probe connection.
    #[error("not a probe")]
    NotAProbe,
}

/// What the server does next on a probe connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Answer `PROBEREPLY{t}`, then wait up to [`PROBE_IDLE`] for the next probe.
    Reply {
        /// The agent's time, echoed.
        t: u64,
    },
    /// Close the connection without a word.
    Close(Close),
    /// Refuse the connection (`Busy`) and close it.
    Busy(Refusal),
}

/// A probe connection opened by `PROBE{t}` while `open` others were served: answered, or
/// refused `Busy` at the cap.
pub fn open(open: usize, t: u64) -> Step {
    if open >= MAX_PROBE_CONNS {
        Step::Busy(Refusal::busy("too many probe connections"))
    } else {
        Step::Reply { t }
    }
}

/// The next message on a probe connection, `since` after the last probe was received (`None`:
/// nothing within [`PROBE_IDLE`], or the connection ended or broke).
pub fn next(since: Duration, msg: Option<&Msg>) -> Step {
    match msg {
        None => Step::Close(Close::Idle),
        Some(Msg::Probe { t }) if since >= PROBE_MIN_GAP => Step::Reply { t: *t },
        Some(Msg::Probe { .. }) => Step::Close(Close::TooFast),
        Some(_) => Step::Close(Close::NotAProbe),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RefuseCode;

    #[test]
    fn a_probe_connection_is_answered_below_the_cap_and_refused_busy_at_it() {
        assert_eq!(open(0, 7), Step::Reply { t: 7 });
        assert_eq!(open(MAX_PROBE_CONNS - 1, 7), Step::Reply { t: 7 });
        for n in [MAX_PROBE_CONNS, MAX_PROBE_CONNS + 1] {
            let Step::Busy(r) = open(n, 7) else {
                panic!("not refused at {n}")
            };
            assert_eq!(r.code, RefuseCode::Busy);
            assert_eq!(r.reason, "too many probe connections");
        }
    }

    #[test]
    fn a_probe_at_least_the_gap_after_the_last_is_answered_with_its_own_time() {
        let p = Msg::Probe { t: 42 };
        assert_eq!(next(PROBE_MIN_GAP, Some(&p)), Step::Reply { t: 42 });
        assert_eq!(next(PROBE_IDLE, Some(&p)), Step::Reply { t: 42 });
    }

    #[test]
    fn a_probe_within_the_gap_closes_the_connection() {
        let p = Msg::Probe { t: 42 };
        let early = PROBE_MIN_GAP - Duration::from_millis(1);
        assert_eq!(next(early, Some(&p)), Step::Close(Close::TooFast));
        assert_eq!(next(Duration::ZERO, Some(&p)), Step::Close(Close::TooFast));
    }

    #[test]
    fn silence_or_any_other_message_closes_the_connection_whatever_the_gap() {
        for since in [Duration::ZERO, PROBE_MIN_GAP, PROBE_IDLE] {
            assert_eq!(next(since, None), Step::Close(Close::Idle));
            for m in [Msg::ProbeReply { t: 1 }, Msg::Ping { t: 1 }, Msg::Close] {
                assert_eq!(next(since, Some(&m)), Step::Close(Close::NotAProbe));
            }
        }
    }
}
