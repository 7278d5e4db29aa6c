//! A draining server hints its connections away a window at a time (decision 61).
//!
//! Hinting every connection at once made the origin write thousands of HINTs in one burst: on a
//! 2-core machine 9 000 of them kept its single-threaded runtime busy for ~100 ms, the
//! destinations' first FETCHes found no answer within `origin_wait`, and in eager mode they took
//! those connections over from replicas while the origin still held them. The agent moves only so
//! many connections at once anyway (`MAX_CONCURRENT_MOVES`), so the rest of the burst only
//! waited, and a draining server's repeat of every hint each second doubled the work.
//!
//! [`Drain`] keeps at most [`DRAIN_WINDOW`] connections hinted and not yet gone, tops the window
//! up every [`DRAIN_EVERY`], repeats a hint still unanswered after
//! [`REHINT_EVERY`](crate::timing::REHINT_EVERY) (a hint can be lost with a session that breaks),
//! and stops counting a connection that stayed past [`STUCK_AFTER`] against the window, so
//! connections that cannot move (no other server for their agent) never hold up the rest.

use crate::phase::Phase;
use crate::timing::rehint_due;
use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Connections hinted and still here at once.
pub const DRAIN_WINDOW: usize = 256;

/// How often a draining server tops its window up.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// A hinted connection still here after this long stops counting against the window; its hint
/// is still repeated every `REHINT_EVERY`.
pub const STUCK_AFTER: Duration = Duration::from_secs(3);

/// Where a connection stands, as the draining server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Here {
    /// Served here with its agent attached: a hint reaches the agent.
    Hintable,
    /// Served here, its agent detached: a hint would reach nobody (it is hinted once the agent
    /// is back, at the next [`Drain::refill`]).
    Detached,
    /// Moved away, ended, or moving (the agent said it is leaving).
    Gone,
}

/// Where a connection stands for a drain: gone when a destination took it over (`taken`),
/// when it no longer is [`Phase::hintable`], or when its agent said it is `leaving`; detached
/// when its agent's session ended (`detached`) on a relayed connection; hintable otherwise. A
/// detached fast-path (`direct`) connection is still served without its agent, which hears the
/// hint through its watch of this server: it stays hintable.
pub fn here(phase: &Phase, taken: bool, leaving: bool, detached: bool, direct: bool) -> Here {
    if taken || !phase.hintable() || leaving {
        Here::Gone
    } else if detached && !direct {
        Here::Detached
    } else {
        Here::Hintable
    }
}

/// One hinted connection.
#[derive(Debug)]
struct Hinted<K> {
    key: K,
    first: Instant,
    last: Instant,
}

/// The pacing of one drain, over connections named by `K`.
#[derive(Debug)]
pub struct Drain<K> {
    window: usize,
    /// Not hinted yet, in the order they will be.
    queue: VecDeque<K>,
    /// Hinted, counted against the window.
    flight: Vec<Hinted<K>>,
    /// Hinted more than `STUCK_AFTER` ago and still here: not counted.
    stuck: Vec<Hinted<K>>,
    /// Everything in `queue`, `flight` and `stuck`.
    known: HashSet<K>,
    refilled: Option<Instant>,
}

impl<K: Clone + Eq + Hash> Drain<K> {
    pub fn new(window: usize) -> Self {
        Drain {
            window: window.max(1),
            queue: VecDeque::new(),
            flight: Vec::new(),
            stuck: Vec::new(),
            known: HashSet::new(),
            refilled: None,
        }
    }

    /// Whether the server's connections should be listed again with [`refill`](Self::refill)
    /// (at the start, then every `REHINT_EVERY`: a detached connection whose agent came back).
    pub fn refill_due(&self, now: Instant) -> bool {
        rehint_due(self.refilled, now)
    }

    /// The server's connections now: those neither hinted nor queued join the queue.
    pub fn refill(&mut self, now: Instant, all: impl IntoIterator<Item = K>) {
        self.refilled = Some(now);
        for k in all {
            if self.known.insert(k.clone()) {
                self.queue.push_back(k);
            }
        }
    }

    /// One pass at `now`: the connections to hint (again). `here` tells where each stands;
    /// gone ones are forgotten, detached ones wait for the next refill.
    pub fn poll(&mut self, now: Instant, mut here: impl FnMut(&K) -> Here) -> Vec<K> {
        let mut hint = Vec::new();
        let known = &mut self.known;
        let mut keep = |h: &mut Hinted<K>, hint: &mut Vec<K>| match here(&h.key) {
            Here::Gone | Here::Detached => {
                known.remove(&h.key);
                false
            }
            Here::Hintable => {
                if rehint_due(Some(h.last), now) {
                    h.last = now;
                    hint.push(h.key.clone());
                }
                true
            }
        };
        self.stuck.retain_mut(|h| keep(h, &mut hint));
        self.flight.retain_mut(|h| keep(h, &mut hint));
        let stuck = |h: &mut Hinted<K>| now.saturating_duration_since(h.first) >= STUCK_AFTER;
        self.stuck.extend(self.flight.extract_if(.., stuck));
        while self.flight.len() < self.window {
            let Some(key) = self.queue.pop_front() else {
                break;
            };
            if here(&key) == Here::Hintable {
                hint.push(key.clone());
                self.flight.push(Hinted {
                    key,
                    first: now,
                    last: now,
                });
            } else {
                self.known.remove(&key);
            }
        }
        hint
    }

    /// Connections hinted and not yet gone (counted against the window, and stuck).
    pub fn hinted(&self) -> usize {
        self.flight.len() + self.stuck.len()
    }

    /// Connections not hinted yet.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timing::REHINT_EVERY;
    use std::collections::HashMap;

    fn world(n: u32) -> HashMap<u32, Here> {
        (0..n).map(|k| (k, Here::Hintable)).collect()
    }

    #[test]
    fn hints_a_window_at_a_time_and_tops_it_up_as_connections_go() {
        let t0 = Instant::now();
        let mut w = world(10);
        let mut d = Drain::new(4);
        assert!(d.refill_due(t0));
        d.refill(t0, 0..10);
        assert!(!d.refill_due(t0 + DRAIN_EVERY));
        assert_eq!(d.poll(t0, |k| w[k]), vec![0, 1, 2, 3]);
        // Nothing gone: nothing more, and no repeat before REHINT_EVERY.
        assert!(d.poll(t0 + DRAIN_EVERY, |k| w[k]).is_empty());
        w.insert(1, Here::Gone);
        w.insert(3, Here::Gone);
        assert_eq!(d.poll(t0 + 2 * DRAIN_EVERY, |k| w[k]), vec![4, 5]);
        assert_eq!((d.hinted(), d.queued()), (4, 4));
    }

    #[test]
    fn repeats_a_hint_unanswered_for_a_second_and_skips_detached_until_a_refill() {
        let t0 = Instant::now();
        let mut w = world(3);
        w.insert(1, Here::Detached);
        let mut d = Drain::new(8);
        d.refill(t0, 0..3);
        assert_eq!(d.poll(t0, |k| w[k]), vec![0, 2]);
        assert_eq!(d.poll(t0 + REHINT_EVERY, |k| w[k]), vec![0, 2]);
        // The agent of 1 came back: the next refill lists it again.
        w.insert(1, Here::Hintable);
        assert!(d.poll(t0 + REHINT_EVERY, |k| w[k]).is_empty());
        assert!(d.refill_due(t0 + REHINT_EVERY));
        d.refill(t0 + REHINT_EVERY, 0..3);
        assert_eq!(d.poll(t0 + REHINT_EVERY, |k| w[k]), vec![1]);
        assert_eq!(d.queued(), 0);
    }

    #[test]
    fn connections_that_cannot_move_do_not_hold_up_the_rest() {
        let t0 = Instant::now();
        let w = world(6);
        let mut d = Drain::new(2);
        d.refill(t0, 0..6);
        assert_eq!(d.poll(t0, |k| w[k]), vec![0, 1]);
        // 0 and 1 never leave: past STUCK_AFTER they stop counting, with their hint repeated.
        let t = t0 + STUCK_AFTER;
        assert_eq!(d.poll(t, |k| w[k]), vec![0, 1, 2, 3]);
        assert_eq!(d.hinted(), 4);
        let t = t + REHINT_EVERY;
        assert_eq!(d.poll(t, |k| w[k]), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_connection_taken_closing_or_leaving_is_gone_whatever_its_session() {
        for (detached, direct) in [(false, false), (true, false), (false, true), (true, true)] {
            assert_eq!(
                here(&Phase::Live, true, false, detached, direct),
                Here::Gone
            );
            assert_eq!(
                here(&Phase::Live, false, true, detached, direct),
                Here::Gone
            );
            for p in [
                Phase::AppClosed,
                Phase::Migrated,
                Phase::Closed,
                Phase::Aborted("x".into()),
            ] {
                assert_eq!(here(&p, false, false, detached, direct), Here::Gone);
            }
        }
    }

    #[test]
    fn a_live_relayed_connection_without_its_session_waits_and_a_fast_path_one_is_hinted() {
        assert_eq!(
            here(&Phase::Live, false, false, false, false),
            Here::Hintable
        );
        assert_eq!(
            here(&Phase::Live, false, false, true, false),
            Here::Detached
        );
        assert_eq!(here(&Phase::Live, false, false, true, true), Here::Hintable);
        assert_eq!(
            here(&Phase::Live, false, false, false, true),
            Here::Hintable
        );
    }

    #[test]
    fn a_refill_never_queues_a_connection_twice() {
        let t0 = Instant::now();
        let w = world(5);
        let mut d = Drain::new(2);
        d.refill(t0, 0..5);
        d.poll(t0, |k| w[k]);
        d.refill(t0 + REHINT_EVERY, 0..5);
        d.refill(t0 + REHINT_EVERY, 0..5);
        assert_eq!((d.hinted(), d.queued()), (2, 3));
    }
}
