//! Server overload, [`OverloadPolicy`] (server): over a connection count, which connections to
//! hint away now.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
    use crate::policy::tests::MS;
    use proptest::prelude::*;

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

    #[test]
    fn overload_breaks_arrival_ties_by_the_higher_key_and_hints_a_key_once() {
        let t0 = Instant::now();
        let mut p = OverloadPolicy::new(OverloadConfig {
            burst: 5,
            ..OverloadConfig::new(0)
        });
        let same = |key| LiveConn { key, arrived: t0 };
        assert_eq!(p.poll(t0, &[same(1), same(3), same(2)]), vec![3, 2, 1]);
        let mut p = OverloadPolicy::new(OverloadConfig {
            burst: 5,
            ..OverloadConfig::new(0)
        });
        assert_eq!(p.poll(t0, &[same(7), same(7)]), vec![7]);
    }

    #[test]
    fn overload_with_no_burst_never_hints() {
        let t0 = Instant::now();
        let cfg = OverloadConfig {
            burst: 0,
            ..OverloadConfig::new(0)
        };
        let mut p = OverloadPolicy::new(cfg);
        assert_eq!(p.config(), cfg);
        for ms in [0, 1000, 60_000] {
            assert_eq!(p.poll(t0 + MS * ms, &conns(t0, 10)), Vec::<u32>::new());
        }
    }

    #[test]
    fn overload_time_going_back_gives_no_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut p = OverloadPolicy::new(OverloadConfig::new(0));
        let live = conns(t0, 10);
        assert_eq!(p.poll(t0, &live).len(), 2);
        assert_eq!(p.poll(t0 - MS * 5000, &live), Vec::<u32>::new());
        // Still one token per 100 ms, counted from the latest time seen.
        assert_eq!(p.poll(t0 + MS * 100, &live).len(), 1);
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
