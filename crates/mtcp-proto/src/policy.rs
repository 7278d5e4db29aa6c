//! Trigger policies: *when* to move a connection, decided from measurements the caller feeds in,
//! with the time passed as an argument (no clock is read here). The mechanism (how a connection
//! moves) lives elsewhere; these only say "move now" (and, for RTT, where to).
//!
//! * [`FloorPolicy`] (agent): the session's downstream rate stayed under a floor for a window
//!   while the server had data waiting for the agent.
//! * [`RttPolicy`] (agent): an alternate server's smoothed RTT has been better than the current
//!   one's by a margin for long enough.
//! * [`OverloadPolicy`] (server): over a connection count, which connections to hint away now.

use crate::trigger::Rtt;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------------
// Backlog: what the server said it has waiting, anchored in the stream
// ------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------
// Throughput floor
// ------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------
// RTT
// ------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------
// Server overload
// ------------------------------------------------------------------------------------------

/// Settings of [`OverloadPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadConfig {
    /// More live connections than this is overload.
    pub max_conns: usize,
    /// Hints sent per second at most (a burst of arrivals is shed gradually)…
    pub hints_per_s: u32,
    /// …with at most this many at once.
    pub burst: u32,
    /// A hinted connection still here after this long may be hinted again (its move failed or
    /// it came back); until then it counts as leaving.
    pub cooldown: Duration,
}

impl OverloadConfig {
    /// `max_conns` with the default pace: 10 hints per second, 2 at once, 2 s cooldown.
    pub fn new(max_conns: usize) -> Self {
        Self {
            max_conns,
            hints_per_s: 10,
            burst: 2,
            cooldown: Duration::from_secs(2),
        }
    }
}

/// A live connection as [`OverloadPolicy::poll`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveConn<K> {
    pub key: K,
    /// When it arrived here (opened, or migrated in).
    pub arrived: Instant,
}

/// The server-side overload trigger: given the live connections, which to hint away now.
///
/// Excess = live − `max_conns` − connections hinted less than `cooldown` ago that are still here
/// (they are leaving). The newest arrivals (opened or migrated in most recently; ties by key)
/// are chosen first — a connection that just moved here from an overloaded server is the
/// first to leave if this one is full too, and long-lived connections stay put. Hints are paced
/// by a token bucket (`hints_per_s`, `burst`).
#[derive(Debug, Clone)]
pub struct OverloadPolicy<K> {
    cfg: OverloadConfig,
    /// Hint tokens, in thousandths.
    tokens_milli: u64,
    last: Option<Instant>,
    hinted: BTreeMap<K, Instant>,
}

impl<K: Ord + Clone> OverloadPolicy<K> {
    pub fn new(cfg: OverloadConfig) -> Self {
        Self {
            cfg,
            tokens_milli: cfg.burst as u64 * 1000,
            last: None,
            hinted: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> OverloadConfig {
        self.cfg
    }

    /// The connections to hint away at `now`, given every live connection.
    pub fn poll(&mut self, now: Instant, live: &[LiveConn<K>]) -> Vec<K> {
        let cap = self.cfg.burst as u64 * 1000;
        if let Some(t) = self.last {
            let ms = now.saturating_duration_since(t).as_millis() as u64;
            self.tokens_milli = self
                .tokens_milli
                .saturating_add(ms.saturating_mul(self.cfg.hints_per_s as u64))
                .min(cap);
        }
        if self.last.is_none_or(|t| now > t) {
            self.last = Some(now);
        }
        let cooldown = self.cfg.cooldown;
        self.hinted.retain(|k, at| {
            now.saturating_duration_since(*at) < cooldown && live.iter().any(|c| c.key == *k)
        });
        let excess = live
            .len()
            .saturating_sub(self.cfg.max_conns)
            .saturating_sub(self.hinted.len());
        let n = excess.min((self.tokens_milli / 1000) as usize);
        if n == 0 {
            return Vec::new();
        }
        let mut cands: Vec<&LiveConn<K>> = live
            .iter()
            .filter(|c| !self.hinted.contains_key(&c.key))
            .collect();
        cands.sort_by(|a, b| b.arrived.cmp(&a.arrived).then_with(|| b.key.cmp(&a.key)));
        cands.dedup_by(|a, b| a.key == b.key);
        let out: Vec<K> = cands.into_iter().take(n).map(|c| c.key.clone()).collect();
        for k in &out {
            self.hinted.insert(k.clone(), now);
        }
        self.tokens_milli -= out.len() as u64 * 1000;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

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

    // ---- RTT

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

    // ---- overload

    fn conns(t0: Instant, n: u32) -> Vec<LiveConn<u32>> {
        (0..n)
            .map(|k| LiveConn {
                key: k,
                arrived: t0 + MS * k,
            })
            .collect()
    }

    #[test]
    fn overload_hints_the_newest_at_a_bounded_pace() {
        let t0 = Instant::now();
        let mut p = OverloadPolicy::new(OverloadConfig::new(2));
        let live = conns(t0, 10);
        // 8 too many; 2 at once (the burst), newest first.
        assert_eq!(p.poll(t0, &live), vec![9, 8]);
        // Nothing more in the same instant; one per 100 ms after.
        assert_eq!(p.poll(t0, &live), Vec::<u32>::new());
        assert_eq!(p.poll(t0 + MS * 100, &live), vec![7]);
        assert_eq!(p.poll(t0 + MS * 150, &live), Vec::<u32>::new());
        // A long pause gives back at most the burst.
        assert_eq!(p.poll(t0 + MS * 1150, &live), vec![6, 5]);
        // Hinted connections that left are no longer counted; those still here count as
        // leaving until the cooldown.
        let left: Vec<_> = live.iter().copied().filter(|c| c.key < 5).collect();
        assert_eq!(p.poll(t0 + MS * 1500, &left), vec![4, 3]);
        let left: Vec<_> = live.iter().copied().filter(|c| c.key < 3).collect();
        assert_eq!(p.poll(t0 + MS * 1600, &left), vec![2]);
        let left: Vec<_> = live.iter().copied().filter(|c| c.key < 2).collect();
        assert_eq!(p.poll(t0 + MS * 5000, &left), Vec::<u32>::new());
    }

    #[test]
    fn overload_rehints_after_the_cooldown_only() {
        let t0 = Instant::now();
        let mut p = OverloadPolicy::new(OverloadConfig::new(1));
        let live = conns(t0, 2);
        assert_eq!(p.poll(t0, &live), vec![1]);
        // Its move failed: it is still here.
        assert_eq!(p.poll(t0 + MS * 1000, &live), Vec::<u32>::new());
        assert_eq!(p.poll(t0 + MS * 2000, &live), vec![1]);
        // Under the limit: nothing.
        let mut p = OverloadPolicy::new(OverloadConfig::new(5));
        assert_eq!(p.poll(t0, &conns(t0, 5)), Vec::<u32>::new());
    }

    proptest! {
        /// Never more than burst + rate × time hints, never below the limit, never a
        /// connection twice within the cooldown, and the same inputs give the same answers.
        #[test]
        fn overload_is_paced_and_deterministic(
            max in 0usize..10,
            steps in proptest::collection::vec((1u64..400, 0u32..30), 1..100),
        ) {
            let t0 = Instant::now();
            let cfg = OverloadConfig::new(max);
            let mut p = OverloadPolicy::new(cfg);
            let mut q = OverloadPolicy::new(cfg);
            let mut t = 0u64;
            let mut total = 0u64;
            // Last hint of each key, while it stayed live since.
            let mut last_hint: BTreeMap<u32, u64> = BTreeMap::new();
            for (dt, n) in steps {
                t += dt;
                let now = t0 + MS * t as u32;
                let live = conns(t0, n);
                last_hint.retain(|k, _| *k < n);
                let h = p.poll(now, &live);
                prop_assert_eq!(&h, &q.poll(now, &live));
                if (n as usize) <= max {
                    prop_assert!(h.is_empty());
                }
                prop_assert!(h.len() <= (n as usize).saturating_sub(max));
                for k in &h {
                    if let Some(l) = last_hint.get(k) {
                        prop_assert!(t - l >= 2000, "{k} hinted at {l} and {t}");
                    }
                    last_hint.insert(*k, t);
                }
                total += h.len() as u64;
                prop_assert!(total <= cfg.burst as u64 + t * cfg.hints_per_s as u64 / 1000);
            }
        }
    }
}
