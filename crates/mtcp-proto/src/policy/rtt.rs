//! The RTT trigger, [`RttPolicy`] (agent): an alternate server's smoothed RTT has been better
//! than the current one's by a margin for long enough.

use crate::trigger::Rtt;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Settings of [`RttPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttConfig {
    /// An alternate must be better than the current server by more than this…
    pub margin: Duration,
    /// …continuously for this long.
    pub hold: Duration,
    /// A server whose newest sample is older than this is not compared (it stopped answering
    /// probes; the liveness triggers deal with the current one).
    pub max_age: Duration,
}

impl RttConfig {
    /// `margin` and `hold`, with samples considered fresh for 3 probe intervals.
    pub fn new(margin: Duration, hold: Duration, probe_every: Duration) -> Self {
        Self {
            margin,
            hold,
            max_age: probe_every.saturating_mul(3),
        }
    }
}

/// The RTT policy's decision: move to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RttMove {
    pub target: String,
    /// Smoothed RTTs when it fired.
    pub current_rtt: Duration,
    pub target_rtt: Duration,
}

impl RttMove {
    pub fn better_by(&self) -> Duration {
        self.current_rtt.saturating_sub(self.target_rtt)
    }
}

#[derive(Debug, Clone)]
struct Path {
    rtt: Rtt,
    last: Instant,
}

/// The RTT trigger: fed with RTT samples for every server (the current one and each alternate,
/// by id, measured the same way), it fires with a target when an alternate's smoothed RTT has
/// been lower than the current server's by more than `margin`, at every evaluation, for at
/// least `hold`. The margin is the hysteresis: after a move, going back needs the old server to
/// be better by the margin in turn, so two similar servers never flap. Firing, and a change of
/// the current server, clear the evidence: the next decision needs a fresh `hold`.
#[derive(Debug, Clone)]
pub struct RttPolicy {
    cfg: RttConfig,
    current: Option<String>,
    paths: BTreeMap<String, Path>,
    /// Alternates better than the current server at every evaluation since this time.
    better_since: BTreeMap<String, Instant>,
}

impl RttPolicy {
    pub fn new(cfg: RttConfig) -> Self {
        Self {
            cfg,
            current: None,
            paths: BTreeMap::new(),
            better_since: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> RttConfig {
        self.cfg
    }

    /// The connection is (now) served by `id`. A change clears the evidence.
    pub fn set_current(&mut self, id: &str) {
        if self.current.as_deref() != Some(id) {
            self.current = Some(id.to_string());
            self.better_since.clear();
        }
    }

    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// An RTT sample for server `id` taken at `now`.
    pub fn sample(&mut self, now: Instant, id: &str, rtt: Duration) {
        match self.paths.get_mut(id) {
            Some(p) => {
                p.rtt.sample(rtt);
                p.last = p.last.max(now);
            }
            None => {
                let mut r = Rtt::default();
                r.sample(rtt);
                self.paths
                    .insert(id.to_string(), Path { rtt: r, last: now });
            }
        }
    }

    /// Forgets servers not in `keep` (the cluster's server list changed).
    pub fn retain(&mut self, keep: &[&str]) {
        self.paths.retain(|id, _| keep.contains(&id.as_str()));
        self.better_since
            .retain(|id, _| keep.contains(&id.as_str()));
    }

    /// Smoothed RTT of every server with a sample.
    pub fn srtts(&self) -> impl Iterator<Item = (&str, Duration)> {
        self.paths
            .iter()
            .filter_map(|(id, p)| p.rtt.srtt().map(|s| (id.as_str(), s)))
    }

    fn fresh(&self, now: Instant, id: &str) -> Option<Duration> {
        let p = self.paths.get(id)?;
        if now.saturating_duration_since(p.last) > self.cfg.max_age {
            return None;
        }
        p.rtt.srtt()
    }

    /// Evaluates at `now`; `Some` when the policy fires. Call it regularly (each evaluation
    /// where an alternate is not better interrupts its evidence).
    pub fn poll(&mut self, now: Instant) -> Option<RttMove> {
        let Some(cur_id) = self.current.clone() else {
            self.better_since.clear();
            return None;
        };
        let Some(cur) = self.fresh(now, &cur_id) else {
            self.better_since.clear();
            return None;
        };
        let mut best: Option<(Duration, String)> = None;
        let ids: Vec<String> = self.paths.keys().cloned().collect();
        for id in ids {
            if id == cur_id {
                continue;
            }
            match self.fresh(now, &id) {
                Some(r) if r.saturating_add(self.cfg.margin) < cur => {
                    let since = *self.better_since.entry(id.clone()).or_insert(now);
                    if now.saturating_duration_since(since) >= self.cfg.hold
                        && best.as_ref().is_none_or(|(b, _)| r < *b)
                    {
                        best = Some((r, id));
                    }
                }
                _ => {
                    self.better_since.remove(&id);
                }
            }
        }
        let (target_rtt, target) = best?;
        self.better_since.clear();
        Some(RttMove {
            target,
            current_rtt: cur,
            target_rtt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::MS;
    use proptest::prelude::*;

    fn rtt_policy(margin_ms: u64, hold_ms: u64) -> RttPolicy {
        RttPolicy::new(RttConfig {
            margin: MS * margin_ms as u32,
            hold: MS * hold_ms as u32,
            max_age: Duration::from_secs(3),
        })
    }

    #[test]
    fn rtt_fires_for_a_better_alternate_after_hold() {
        let t0 = Instant::now();
        let mut p = rtt_policy(5, 2000);
        p.set_current("s1");
        let mut fired = None;
        for i in 0..10u32 {
            let now = t0 + MS * (i * 500);
            p.sample(now, "s1", MS * 40);
            p.sample(now, "s2", MS * 10);
            p.sample(now, "s3", MS * 20);
            if let Some(m) = p.poll(now) {
                fired = Some((i, m));
                break;
            }
        }
        let (i, m) = fired.expect("fires");
        // Better from the first evaluation (t = 0), fires at t = 2 s.
        assert_eq!(i, 4);
        assert_eq!(m.target, "s2");
        assert_eq!(m.better_by(), MS * 30);
    }

    #[test]
    fn rtt_needs_continuous_evidence_and_a_fresh_hold_after_a_move() {
        let t0 = Instant::now();
        let mut p = rtt_policy(5, 1000);
        p.set_current("s1");
        // Better, then not (one evaluation), then better again: the hold restarts.
        let seq = [(40, 10), (40, 10), (40, 39), (40, 10), (40, 10), (40, 10)];
        let mut fired = vec![];
        for (i, (a, b)) in seq.iter().enumerate() {
            let now = t0 + MS * (i as u32 * 400);
            // Fresh estimators each step so the smoothed value is the sample.
            p.paths.clear();
            p.sample(now, "s1", MS * *a);
            p.sample(now, "s2", MS * *b);
            if p.poll(now).is_some() {
                fired.push(i);
            }
        }
        // Evidence restarts at step 3 (t = 1.2 s) and is 1 s old at step 6 (not reached) …
        assert!(fired.is_empty(), "{fired:?}");
        let now = t0 + MS * 2400;
        p.paths.clear();
        p.sample(now, "s1", MS * 40);
        p.sample(now, "s2", MS * 10);
        assert_eq!(p.poll(now).map(|m| m.target), Some("s2".into()));
        // After a move the evidence starts afresh.
        p.set_current("s2");
        assert_eq!(p.poll(now), None);
    }

    #[test]
    fn rtt_ignores_stale_servers_and_an_unknown_current() {
        let t0 = Instant::now();
        let mut p = rtt_policy(1, 0);
        p.sample(t0, "s2", MS);
        // No current server, or no sample of it: nothing to compare.
        assert_eq!(p.poll(t0), None);
        p.set_current("s1");
        assert_eq!(p.poll(t0), None);
        p.sample(t0, "s1", MS * 50);
        assert_eq!(p.poll(t0).map(|m| m.target), Some("s2".into()));
        // s2 stopped answering probes: its old sample is not used.
        let later = t0 + Duration::from_secs(4);
        p.sample(later, "s1", MS * 50);
        assert_eq!(p.poll(later), None);
        p.retain(&["s1"]);
        assert_eq!(p.srtts().count(), 1);
    }

    #[test]
    fn rtt_does_not_flap_between_similar_servers() {
        // Two servers at ~10 ms with ±1.5 ms of noise, margin 2 ms: no move ever, and a
        // simulated agent that follows every decision stays put.
        let t0 = Instant::now();
        let mut p = rtt_policy(2, 500);
        p.set_current("a");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut moves = 0;
        for i in 0..2000u32 {
            let now = t0 + MS * (i * 100);
            for id in ["a", "b"] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let us = 8_500 + (x % 3_000);
                p.sample(now, id, Duration::from_micros(us));
            }
            if let Some(m) = p.poll(now) {
                moves += 1;
                p.set_current(&m.target);
            }
        }
        assert_eq!(moves, 0);
    }

    #[test]
    fn rtt_moves_once_and_does_not_come_back() {
        // a: 30 ms, b: 10 ms. One move to b; a is never better than b by the margin.
        let t0 = Instant::now();
        let mut p = rtt_policy(5, 1000);
        p.set_current("a");
        let mut moves = vec![];
        for i in 0..200u32 {
            let now = t0 + MS * (i * 100);
            p.sample(now, "a", MS * 30);
            p.sample(now, "b", MS * 10);
            if let Some(m) = p.poll(now) {
                moves.push((i, m.target.clone()));
                p.set_current(&m.target);
            }
        }
        assert_eq!(moves, vec![(10, "b".to_string())]);
    }

    #[test]
    fn rtt_picks_the_fastest_alternate_that_was_held_long_enough() {
        let t0 = Instant::now();
        let mut p = rtt_policy(5, 1000);
        p.set_current("s1");
        for ms in [0, 500] {
            let now = t0 + MS * ms;
            p.sample(now, "s1", MS * 40);
            p.sample(now, "s2", MS * 20);
            p.sample(now, "s3", MS * 10);
            assert_eq!(p.poll(now), None);
        }
        // s4 is the fastest but better only since 1 s: not held yet.
        let now = t0 + MS * 1000;
        p.sample(now, "s4", MS);
        assert_eq!(
            p.poll(now),
            Some(RttMove {
                target: "s3".into(),
                current_rtt: MS * 40,
                target_rtt: MS * 10
            })
        );
    }

    #[test]
    fn rtt_better_by_exactly_the_margin_is_not_better() {
        let t0 = Instant::now();
        let mut p = rtt_policy(5, 0);
        p.set_current("s1");
        p.sample(t0, "s1", MS * 40);
        p.sample(t0, "s2", MS * 35);
        assert_eq!(p.poll(t0), None);
        p.paths.clear();
        p.sample(t0, "s1", MS * 40);
        p.sample(t0, "s2", MS * 34);
        assert_eq!(p.poll(t0).map(|m| m.better_by()), Some(MS * 6));
    }

    #[test]
    fn rtt_a_current_server_gone_quiet_clears_the_evidence() {
        let t0 = Instant::now();
        let mut p = rtt_policy(5, 1000);
        p.set_current("s1");
        p.sample(t0, "s1", MS * 40);
        p.sample(t0, "s2", MS * 10);
        assert_eq!(p.poll(t0), None);
        // The current server's sample is stale at 3.5 s: no comparison, evidence dropped.
        let t1 = t0 + MS * 3500;
        p.sample(t1, "s2", MS * 10);
        assert_eq!(p.poll(t1), None);
        p.sample(t1, "s1", MS * 40);
        assert_eq!(p.poll(t1), None, "the hold restarts at 3.5 s");
        assert!(p.poll(t1 + MS * 1000).is_some());
    }

    #[test]
    fn rtt_setting_the_same_current_server_keeps_the_evidence() {
        let t0 = Instant::now();
        let mut p = rtt_policy(5, 1000);
        p.set_current("s1");
        p.sample(t0, "s1", MS * 40);
        p.sample(t0, "s2", MS * 10);
        assert_eq!(p.poll(t0), None);
        p.set_current("s1");
        assert_eq!(p.current(), Some("s1"));
        let t1 = t0 + MS * 1000;
        p.sample(t1, "s1", MS * 40);
        p.sample(t1, "s2", MS * 10);
        assert_eq!(p.poll(t1).map(|m| m.target), Some("s2".into()));
    }

    #[test]
    fn rtt_config_keeps_samples_fresh_for_three_probe_intervals() {
        let c = RttConfig::new(MS * 5, MS * 2000, MS * 1000);
        assert_eq!(
            (c.margin, c.hold, c.max_age),
            (MS * 5, MS * 2000, MS * 3000)
        );
        let t0 = Instant::now();
        let mut p = RttPolicy::new(RttConfig::new(MS, Duration::ZERO, MS * 1000));
        assert_eq!(p.config(), RttConfig::new(MS, Duration::ZERO, MS * 1000));
        p.set_current("s1");
        p.sample(t0, "s2", MS);
        p.sample(t0 + MS * 3000, "s1", MS * 50);
        assert!(p.poll(t0 + MS * 3000).is_some(), "exactly 3 intervals old");
        p.sample(t0 + MS * 3001, "s1", MS * 50);
        assert_eq!(p.poll(t0 + MS * 3001), None);
    }

    proptest! {
        /// Whatever the samples, two decisions are at least `hold` apart, even when the agent
        /// follows each one.
        #[test]
        fn rtt_never_fires_twice_within_hold(
            hold_ms in 1u64..3000,
            margin_ms in 0u64..20,
            steps in proptest::collection::vec((0usize..3, 1u64..100, 1u64..400, any::<bool>()), 1..400),
        ) {
            let ids = ["s1", "s2", "s3"];
            let t0 = Instant::now();
            let mut p = rtt_policy(margin_ms, hold_ms);
            p.set_current("s1");
            let mut t = 0u64;
            let mut last: Option<u64> = None;
            for (who, rtt_ms, dt_ms, follow) in steps {
                t += dt_ms;
                let now = t0 + MS * t as u32;
                p.sample(now, ids[who], MS * rtt_ms as u32);
                if let Some(m) = p.poll(now) {
                    prop_assert!(m.target != p.current().unwrap());
                    prop_assert!(m.target_rtt + MS * (margin_ms as u32) < m.current_rtt);
                    if let Some(l) = last {
                        prop_assert!(t - l >= hold_ms, "fired at {l} and {t}");
                    }
                    last = Some(t);
                    if follow {
                        p.set_current(&m.target);
                    }
                }
            }
        }

        /// Servers whose samples all lie within the margin of each other never cause a move.
        #[test]
        fn rtt_within_the_margin_never_fires(
            base_us in 100u64..100_000,
            margin_us in 1u64..10_000,
            steps in proptest::collection::vec((0usize..3, 0.0f64..1.0, 1u64..300), 1..400),
        ) {
            let ids = ["s1", "s2", "s3"];
            let t0 = Instant::now();
            let mut p = RttPolicy::new(RttConfig {
                margin: Duration::from_micros(margin_us),
                hold: Duration::ZERO,
                max_age: Duration::from_secs(3600),
            });
            p.set_current("s1");
            let mut t = 0u64;
            for (who, f, dt_ms) in steps {
                t += dt_ms;
                let now = t0 + MS * t as u32;
                let us = base_us + (f * margin_us as f64) as u64;
                p.sample(now, ids[who], Duration::from_micros(us));
                prop_assert_eq!(p.poll(now), None);
            }
        }
    }
}
