//! Trigger policies: *when* to move a connection, decided from measurements the caller feeds in,
//! with the time passed as an argument (no clock is read here). The mechanism (how a connection
//! moves) lives elsewhere; these only say "move now" (and, for RTT, where to).
//!
//! * [`FloorPolicy`] (agent): the session's downstream rate stayed under a floor for a window
//!   while the server had data waiting for the agent.
//! * [`RttPolicy`] (agent): an alternate server's smoothed RTT has been better than the current
//!   one's by a margin for long enough.
//! * [`OverloadPolicy`] (server): over a connection count, which connections to hint away now.
//! * [`ConnPolicy`] (agent): one connection's floor and RTT policies fed by one tick (the floor
//!   first; at most one fires), with the evidence reset by a new session.
//! * [`probe_answer`] (agent): whether a PROBE's answer is its own echo, and the RTT it gives.

mod conn;
mod floor;
mod overload;
mod rtt;

pub use conn::{ConnPolicy, PolicyMove, PolicyTick};
pub use floor::{FloorConfig, FloorFire, FloorPolicy, FloorSample};
pub use overload::{LiveConn, OverloadConfig, OverloadPolicy};
pub use rtt::{RttConfig, RttMove, RttPolicy};

use std::time::{Duration, Instant};

/// A server's answer to the agent's `PROBE{t: sent_t}`, written at `sent_at` and read at
/// `now`: the round trip, or `None` when the answer is not that probe's echo (another message,
/// or the reply to an older probe) and the probe connection can no longer be trusted.
pub fn probe_answer(
    sent_t: u64,
    sent_at: Instant,
    now: Instant,
    answer: &crate::wire::Msg,
) -> Option<Duration> {
    match answer {
        crate::wire::Msg::ProbeReply { t } if *t == sent_t => {
            Some(now.saturating_duration_since(sent_at))
        }
        _ => None,
    }
}

/// The server's backlog as the agent knows it. The server reports `BACKLOG{queued}` in the
/// session stream: at that point of the stream, `queued` more downstream bytes were waiting to
/// be sent. Until the agent has received them, the server (or the path) holds data for it —
/// however late the report arrived. So the estimate never goes stale, and an app-limited
/// connection (nothing queued behind what is being sent) reads as 0 as soon as its bytes are in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Downstream offset up to which the server had data when it last reported.
    until: u64,
}

impl Backlog {
    /// A report of `queued` bytes read when the agent had received `arrived` downstream bytes
    /// (the report's place in the stream).
    pub fn on_report(&mut self, arrived: u64, queued: u64) {
        self.until = arrived.saturating_add(queued);
    }

    /// Bytes known to be waiting for an agent that has received `arrived` bytes.
    pub fn waiting(&self, arrived: u64) -> u64 {
        self.until.saturating_sub(arrived)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Msg;

    pub(super) const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backlog_is_anchored_in_the_stream() {
        let mut b = Backlog::default();
        assert_eq!(b.waiting(0), 0);
        b.on_report(1000, 500);
        assert_eq!(b.waiting(1000), 500);
        assert_eq!(b.waiting(1400), 100);
        assert_eq!(b.waiting(1500), 0);
        assert_eq!(b.waiting(9000), 0);
        b.on_report(9000, 0);
        assert_eq!(b.waiting(9000), 0);
    }

    #[test]
    fn a_probe_reply_counts_only_as_the_echo_of_the_probe_just_sent() {
        let t0 = Instant::now();
        let now = t0 + 7 * MS;
        let echo = Msg::ProbeReply { t: 42 };
        assert_eq!(probe_answer(42, t0, now, &echo), Some(7 * MS));
        // The reply to an older probe, late on the same connection: not this round trip.
        assert_eq!(probe_answer(43, t0, now, &echo), None);
        // Anything else on a probe connection is no answer at all.
        assert_eq!(probe_answer(42, t0, now, &Msg::Heartbeat), None);
        assert_eq!(probe_answer(42, t0, now, &Msg::Pong { t: 42 }), None);
        // A clock read before the write (never, but never negative either).
        assert_eq!(probe_answer(42, now, t0, &echo), Some(Duration::ZERO));
    }
}
