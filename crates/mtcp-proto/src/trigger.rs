//! The agent's liveness trigger: an RTT estimate (RFC 6298 style) from ping/pong, and a silence
//! bound derived from it and the server's heartbeat interval. Time comes in as an argument.

use std::time::{Duration, Instant};

/// Smoothed RTT estimator.
#[derive(Debug, Clone, Copy)]
pub struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl Default for Rtt {
    fn default() -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
        }
    }
}

impl Rtt {
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let d = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + d) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// A retransmission-timeout-like bound: srtt + 4·rttvar, at least TCP's minimum
    /// retransmission timeout on Linux ([`MIN_RTO`]): a lost segment on a healthy path stalls
    /// a TCP stream that long, which must not look like a dead server.
    pub fn rto(&self) -> Option<Duration> {
        self.srtt.map(|s| (s + self.rttvar * 4).max(MIN_RTO))
    }
}

/// Linux's minimum TCP retransmission timeout.
pub const MIN_RTO: Duration = Duration::from_millis(200);

/// Fires when the server has been silent for too long. Servers send heartbeats every
/// `heartbeat` while idle, so silence beyond a few heartbeats plus the RTT-derived bound means
/// the server or the path is gone.
#[derive(Debug, Clone)]
pub struct Liveness {
    heartbeat: Duration,
    /// Number of heartbeat intervals that may pass in silence.
    misses: u32,
    min_bound: Duration,
    last_rx: Instant,
    pub rtt: Rtt,
}

impl Liveness {
    pub fn new(now: Instant, heartbeat: Duration) -> Self {
        Self {
            heartbeat,
            misses: 3,
            min_bound: Duration::from_millis(200),
            last_rx: now,
            rtt: Rtt::default(),
        }
    }

    pub fn set_heartbeat(&mut self, hb: Duration) {
        self.heartbeat = hb;
    }

    /// Anything arrived from the server.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// How long silence may last before the trigger fires.
    pub fn bound(&self) -> Duration {
        let rto = self.rtt.rto().unwrap_or(MIN_RTO);
        (self.heartbeat * self.misses + rto * 2).max(self.min_bound)
    }

    pub fn deadline(&self) -> Instant {
        self.last_rx + self.bound()
    }

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_converges_and_bounds_grow_with_it() {
        let mut r = Rtt::default();
        for _ in 0..50 {
            r.sample(Duration::from_millis(40));
        }
        let s = r.srtt().unwrap();
        assert!(
            s > Duration::from_millis(39) && s <= Duration::from_millis(40),
            "{s:?}"
        );
        assert!(r.rto().unwrap() >= s);
    }

    #[test]
    fn liveness_fires_only_after_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Duration::from_millis(100));
        // 3 heartbeats + 2 minimum RTOs: one lost segment (retransmitted after 200 ms) is
        // never taken for a dead server.
        assert_eq!(l.bound(), Duration::from_millis(700));
        assert!(!l.expired(t0 + Duration::from_millis(699)));
        assert!(l.expired(t0 + Duration::from_millis(700)));
        l.on_receive(t0 + Duration::from_millis(250));
        assert!(!l.expired(t0 + Duration::from_millis(900)));
        for _ in 0..10 {
            l.rtt.sample(Duration::from_millis(400));
        }
        // A long path's RTO replaces the minimum.
        assert!(l.bound() > Duration::from_millis(900));
    }
}
