//! The throughput floor, [`FloorPolicy`] (agent): the session's downstream rate stayed under a
//! floor for a window while the server had data waiting for the agent.

#[cfg(doc)] // for the link in `FloorSample`
use super::Backlog;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Settings of [`FloorPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorConfig {
    /// Fires when the delivered rate stays under this many bytes per second…
    pub floor_bytes_per_s: u64,
    /// …over this much counted time.
    pub window: Duration,
}

/// One observation of a session, fed to [`FloorPolicy::sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorSample {
    /// Downstream bytes delivered to the client program so far (monotonic).
    pub delivered: u64,
    /// Bytes the server has waiting for the agent now (see [`Backlog::waiting`]); 0 when it has
    /// nothing waiting (an idle or app-limited connection).
    pub backlog: u64,
    /// Whether the agent was blocked on the client program (it had bytes the client program had
    /// not taken, and stopped reading from the session) at any time since the previous sample.
    pub client_limited: bool,
}

/// Why [`FloorPolicy`] fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorFire {
    /// Delivered rate over the window, bytes per second.
    pub rate_bytes_per_s: u64,
    /// The counted time the rate was measured over (at least the window).
    pub over: Duration,
}

/// Most counted intervals kept; older ones are merged (their sums are kept exactly).
const MAX_SPANS: usize = 256;

/// A counted interval: `dt` of time in which `bytes` were delivered, ending at `end`.
#[derive(Debug, Clone, Copy)]
struct Span {
    dt: Duration,
    bytes: u64,
    end: Instant,
}

/// The throughput-floor trigger.
///
/// Time between two samples *counts* only when the server had data waiting at both samples
/// (backlog > 0) and the agent was not blocked on the client program in between. A sample with
/// no backlog throws the evidence away (the server had nothing to send: a low rate is not its
/// fault). Client-limited intervals are skipped — neither their time nor their bytes count —
/// but do not reset the evidence (the agent's own slowness says nothing about the server).
/// The policy fires when the counted time reaches `window` and the bytes delivered in the
/// newest `window` of counted time are under `floor × time`; the evidence then starts afresh.
/// Evidence older than 4 windows of wall time is dropped, so a long client-limited stretch does
/// not join old evidence to new.
#[derive(Debug, Clone)]
pub struct FloorPolicy {
    cfg: FloorConfig,
    /// The previous sample: time, delivered bytes, and whether it had a backlog.
    last: Option<(Instant, u64, bool)>,
    spans: VecDeque<Span>,
    time: Duration,
    bytes: u64,
}

impl FloorPolicy {
    pub fn new(cfg: FloorConfig) -> Self {
        Self {
            cfg,
            last: None,
            spans: VecDeque::new(),
            time: Duration::ZERO,
            bytes: 0,
        }
    }

    pub fn config(&self) -> FloorConfig {
        self.cfg
    }

    /// Forgets all evidence (e.g. the connection moved: a new server needs a fresh window).
    pub fn reset(&mut self) {
        self.last = None;
        self.clear();
    }

    fn clear(&mut self) {
        self.spans.clear();
        self.time = Duration::ZERO;
        self.bytes = 0;
    }

    /// Counted time collected so far (at most about one window).
    pub fn evidence(&self) -> Duration {
        self.time
    }

    /// Feeds one observation at `now` (samples must come in time order; a sample older than the
    /// previous one is ignored). Returns `Some` when the policy fires.
    pub fn sample(&mut self, now: Instant, s: FloorSample) -> Option<FloorFire> {
        let Some((t0, d0, had_backlog)) = self.last else {
            self.last = Some((now, s.delivered, s.backlog > 0));
            return None;
        };
        if now < t0 {
            return None;
        }
        let dt = now - t0;
        let db = s.delivered.saturating_sub(d0);
        let has_backlog = s.backlog > 0;
        self.last = Some((now, s.delivered.max(d0), has_backlog));
        if !has_backlog {
            self.clear();
            return None;
        }
        if !had_backlog || s.client_limited || dt.is_zero() {
            return None;
        }
        // Evidence from long ago (before a long client-limited stretch) does not count.
        let stale = self.cfg.window.saturating_mul(4);
        while self
            .spans
            .front()
            .is_some_and(|f| now.duration_since(f.end) > stale)
        {
            self.pop_front();
        }
        self.spans.push_back(Span {
            dt,
            bytes: db,
            end: now,
        });
        self.time += dt;
        self.bytes = self.bytes.saturating_add(db);
        // Keep just enough of the newest counted time to cover the window.
        while self
            .spans
            .front()
            .is_some_and(|f| self.time.saturating_sub(f.dt) >= self.cfg.window)
        {
            self.pop_front();
        }
        if self.spans.len() > MAX_SPANS {
            let a = self.spans.pop_front().expect("non-empty");
            let b = self.spans.front_mut().expect("more than one");
            b.dt += a.dt;
            b.bytes = b.bytes.saturating_add(a.bytes);
        }
        if self.time < self.cfg.window || self.time.is_zero() {
            return None;
        }
        // bytes / time < floor, without floating point.
        let lhs = self.bytes as u128 * 1_000_000_000;
        let rhs = self.cfg.floor_bytes_per_s as u128 * self.time.as_nanos();
        if lhs >= rhs {
            return None;
        }
        let fire = FloorFire {
            rate_bytes_per_s: (lhs / self.time.as_nanos().max(1)) as u64,
            over: self.time,
        };
        self.clear();
        Some(fire)
    }

    fn pop_front(&mut self) {
        if let Some(f) = self.spans.pop_front() {
            self.time = self.time.saturating_sub(f.dt);
            self.bytes = self.bytes.saturating_sub(f.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::MS;
    use proptest::prelude::*;

    fn floor(bps: u64, window_ms: u64) -> FloorPolicy {
        FloorPolicy::new(FloorConfig {
            floor_bytes_per_s: bps,
            window: MS * window_ms as u32,
        })
    }

    fn s(delivered: u64, backlog: u64, client_limited: bool) -> FloorSample {
        FloorSample {
            delivered,
            backlog,
            client_limited,
        }
    }

    /// Feeds `n` samples every `step_ms` delivering `per` bytes each; returns the sample index
    /// that fired first.
    fn run_floor(
        p: &mut FloorPolicy,
        t0: Instant,
        n: usize,
        step_ms: u64,
        per: u64,
        backlog: u64,
        cl: bool,
    ) -> Option<usize> {
        let mut d = 0;
        for i in 0..n {
            if p.sample(t0 + MS * (i as u64 * step_ms) as u32, s(d, backlog, cl))
                .is_some()
            {
                return Some(i);
            }
            d += per;
        }
        None
    }
    #[test]
    fn floor_fires_after_a_window_under_the_floor_with_backlog() {
        // 1 MB/s floor, 1 s window; 100 ms samples delivering 50 KB each = 500 KB/s.
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 1000);
        let i = run_floor(&mut p, t0, 100, 100, 50_000, 4 << 20, false).expect("fires");
        // Sample 0 only sets the start; 10 counted intervals make the window.
        assert_eq!(i, 10);
        // Fired once, then a fresh window is needed.
        let mut fires = vec![];
        let mut d = 0;
        let mut p = floor(1_000_000, 1000);
        for i in 0..=40u32 {
            if let Some(f) = p.sample(t0 + MS * (i * 100), s(d, 1, false)) {
                assert_eq!(f.rate_bytes_per_s, 500_000);
                assert!(f.over >= MS * 1000);
                fires.push(i);
            }
            d += 50_000;
        }
        assert_eq!(fires, vec![10, 20, 30, 40]);
    }

    #[test]
    fn floor_never_fires_without_backlog() {
        // Idle (nothing delivered) and app-limited (slow, nothing waiting) connections.
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 500);
        assert_eq!(run_floor(&mut p, t0, 200, 100, 0, 0, false), None);
        let mut p = floor(1_000_000, 500);
        assert_eq!(run_floor(&mut p, t0, 200, 100, 1000, 0, false), None);
        // A backlog that drops to zero now and then (an app writing in bursts) restarts the
        // evidence every time: one zero per window is enough to never fire.
        let mut p = floor(1_000_000, 500);
        let mut d = 0;
        for i in 0..200u32 {
            let backlog = if i % 4 == 0 { 0 } else { 65536 };
            assert!(p
                .sample(t0 + MS * (i * 100), s(d, backlog, false))
                .is_none());
            d += 100;
        }
    }

    #[test]
    fn floor_does_not_count_client_limited_time() {
        // Always blocked on the client program: never fires, whatever the rate.
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 500);
        assert_eq!(run_floor(&mut p, t0, 200, 100, 10, 4 << 20, true), None);
        // Blocked every other interval: only the other half counts, so the window (500 ms of
        // counted time) takes 1 s of wall time.
        let mut p = floor(1_000_000, 500);
        let mut d = 0;
        let mut fired = None;
        for i in 0..100u32 {
            if p.sample(t0 + MS * (i * 100), s(d, 1, i % 2 == 0)).is_some() {
                fired = Some(i);
                break;
            }
            d += 10;
        }
        assert_eq!(fired, Some(9));
        // Bytes delivered while client-limited do not count either: a fast burst delivered
        // while blocked on the client does not hide a server that is otherwise slow.
        let mut p = floor(1_000_000, 500);
        let mut d = 0;
        let mut fired = None;
        for i in 0..100u32 {
            let cl = i % 2 == 0;
            if p.sample(t0 + MS * (i * 100), s(d, 1, cl)).is_some() {
                fired = Some(i);
                break;
            }
            d += if cl { 0 } else { 10 };
            d += if (i + 1) % 2 == 0 { 10_000_000 } else { 0 };
        }
        assert_eq!(fired, Some(9));
    }

    #[test]
    fn floor_needs_backlog_at_both_ends_of_an_interval() {
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 300);
        // Backlog appears at sample 1: the interval 0→1 does not count.
        assert!(p.sample(t0, s(0, 0, false)).is_none());
        assert!(p.sample(t0 + MS * 100, s(0, 1, false)).is_none());
        assert!(p.sample(t0 + MS * 200, s(0, 1, false)).is_none());
        assert!(p.sample(t0 + MS * 300, s(0, 1, false)).is_none());
        assert_eq!(p.evidence(), MS * 200);
        assert!(p.sample(t0 + MS * 400, s(0, 1, false)).is_some());
    }

    #[test]
    fn floor_evidence_from_long_ago_is_dropped() {
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 1000);
        for i in 0..6u32 {
            assert!(p.sample(t0 + MS * (i * 100), s(0, 1, false)).is_none());
        }
        assert_eq!(p.evidence(), MS * 500);
        // 10 s blocked on the client program, then slow again: the old 500 ms are gone.
        assert!(p.sample(t0 + MS * 10_000, s(0, 1, true)).is_none());
        assert!(p.sample(t0 + MS * 10_100, s(0, 1, false)).is_none());
        assert_eq!(p.evidence(), MS * 100);
    }

    #[test]
    fn floor_reset_and_out_of_order_samples() {
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 300);
        for i in 0..3u32 {
            assert!(p.sample(t0 + MS * (i * 100), s(0, 1, false)).is_none());
        }
        p.reset();
        assert_eq!(p.evidence(), Duration::ZERO);
        assert!(p.sample(t0 + MS * 300, s(0, 1, false)).is_none());
        // A sample from the past is ignored.
        assert!(p.sample(t0, s(0, 1, false)).is_none());
        assert_eq!(p.evidence(), Duration::ZERO);
    }

    #[test]
    fn floor_keeps_bounded_memory_and_exact_sums() {
        // 1 ms samples, 10 s window: 10 000 intervals merge into at most MAX_SPANS.
        let t0 = Instant::now();
        let mut p = floor(1_000, 10_000);
        let mut fired = None;
        for i in 0..20_000u32 {
            if p.sample(t0 + MS * i, s(0, 1, false)).is_some() {
                fired = Some(i);
                break;
            }
            assert!(p.spans.len() <= MAX_SPANS + 1);
        }
        assert_eq!(fired, Some(10_000));
    }

    #[test]
    fn floor_at_exactly_the_floor_does_not_fire_and_one_byte_less_does() {
        // 1 MB/s over 1 s of 100 ms intervals: 100 000 bytes each is exactly the floor.
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 1000);
        assert_eq!(run_floor(&mut p, t0, 40, 100, 100_000, 1, false), None);
        let mut p = floor(1_000_000, 1000);
        let mut d = 0;
        let mut fire = None;
        for i in 0..=10u32 {
            fire = p.sample(t0 + MS * (i * 100), s(d, 1, false));
            d += if i == 0 { 99_999 } else { 100_000 };
        }
        assert_eq!(
            fire,
            Some(FloorFire {
                rate_bytes_per_s: 999_999,
                over: MS * 1000
            })
        );
        assert_eq!(p.evidence(), Duration::ZERO, "the evidence starts afresh");
    }

    #[test]
    fn floor_counts_nothing_for_a_sample_at_the_same_instant() {
        let t0 = Instant::now();
        let mut p = floor(1_000_000, 300);
        assert!(p.sample(t0, s(0, 1, false)).is_none());
        assert!(p.sample(t0 + MS * 100, s(0, 1, false)).is_none());
        assert!(p.sample(t0 + MS * 100, s(0, 1, false)).is_none());
        assert_eq!(p.evidence(), MS * 100);
        assert_eq!(p.config().floor_bytes_per_s, 1_000_000);
    }

    #[test]
    fn floor_takes_a_delivered_count_that_goes_back_as_no_progress() {
        // A counter that goes back (a new session's) neither underflows nor counts negative.
        let t0 = Instant::now();
        let mut p = floor(1_000, 200);
        assert!(p.sample(t0, s(5_000, 1, false)).is_none());
        assert!(p.sample(t0 + MS * 100, s(10, 1, false)).is_none());
        assert_eq!(
            p.sample(t0 + MS * 200, s(5_050, 1, false)),
            Some(FloorFire {
                rate_bytes_per_s: 250,
                over: MS * 200
            })
        );
    }

    proptest! {
        /// Delivering at or above the floor in every interval never fires, whatever the backlog,
        /// the client and the sampling do.
        #[test]
        fn steady_above_the_floor_never_fires(
            floor_bps in 1u64..100_000_000,
            window_ms in 1u64..5000,
            steps in proptest::collection::vec((1u64..2000, any::<bool>(), 0u64..3, 0u64..1000), 1..300),
        ) {
            let t0 = Instant::now();
            let mut p = floor(floor_bps, window_ms);
            let (mut t, mut d) = (0u64, 0u64);
            prop_assert!(p.sample(t0, s(0, 1, false)).is_none());
            for (dt_ms, cl, backlog, extra) in steps {
                t += dt_ms;
                // ceil(floor × dt) bytes, plus some.
                d += (floor_bps * dt_ms).div_ceil(1000) + extra;
                prop_assert!(p.sample(t0 + MS * t as u32, s(d, backlog, cl)).is_none());
            }
        }

        /// With no backlog ever reported, nothing fires.
        #[test]
        fn no_backlog_never_fires(steps in proptest::collection::vec((1u64..2000, any::<bool>(), 0u64..1_000_000), 1..200)) {
            let t0 = Instant::now();
            let mut p = floor(1_000_000_000, 10);
            let (mut t, mut d) = (0u64, 0u64);
            for (dt_ms, cl, add) in steps {
                t += dt_ms;
                d += add;
                prop_assert!(p.sample(t0 + MS * t as u32, s(d, 0, cl)).is_none());
            }
        }

        /// Two fires are at least a window of wall time apart.
        #[test]
        fn fires_are_a_window_apart(
            window_ms in 1u64..3000,
            steps in proptest::collection::vec((1u64..500, any::<bool>(), 0u64..2, 0u64..10_000), 1..300),
        ) {
            let t0 = Instant::now();
            let mut p = floor(1_000_000, window_ms);
            let (mut t, mut d) = (0u64, 0u64);
            let mut last: Option<u64> = None;
            for (dt_ms, cl, backlog, add) in steps {
                t += dt_ms;
                d += add;
                if p.sample(t0 + MS * t as u32, s(d, backlog, cl)).is_some() {
                    if let Some(l) = last {
                        prop_assert!(t - l >= window_ms);
                    }
                    last = Some(t);
                }
            }
        }
    }
}
