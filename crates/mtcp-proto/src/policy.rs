//! Trigger policies: *when* to move a connection, decided from measurements the caller feeds in,
//! with the time passed as an argument (no clock is read here). The mechanism (how a connection
//! moves) lives elsewhere; these only say "move now" (and, for RTT, where to).
//!
//! * [`FloorPolicy`] (agent): the session's downstream rate stayed under a floor for a window
//!   while the server had data waiting for the agent.
//! * [`RttPolicy`] (agent): an alternate server's smoothed RTT has been better than the current
//!   one's by a margin for long enough.
//! * [`OverloadPolicy`] (server): over a connection count, which connections to hint away now.

mod floor;
mod overload;
mod rtt;

pub use floor::{FloorConfig, FloorFire, FloorPolicy, FloorSample};
pub use overload::{LiveConn, OverloadConfig, OverloadPolicy};
pub use rtt::{RttConfig, RttMove, RttPolicy};

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
    use std::time::Duration;

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
}
