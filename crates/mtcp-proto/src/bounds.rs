//! What a server keeps for clients that are gone: the rules that bound the state of detached
//! connections (a session that ended without CLOSE), as pure functions of their ages.
//!
//! A detached connection's state is kept so that its agent can move it (the agent leaves the
//! origin's session before the destination fetches the state) or come back after a broken
//! session. One that never carried a byte costs its server the same as one that did, but losing
//! it loses nothing the client sent or saw, and a flood of HELLO-and-disconnect sessions costs
//! its sender nothing: such states are kept briefly and only so many of them.

use std::time::Duration;

/// How long the state of a detached connection that never carried data is kept: long enough
/// for a move to fetch it (a FETCH's own bound is seconds).
pub const EMPTY_DETACHED: Duration = Duration::from_secs(10);
/// At most this many detached connections that never carried data are kept; beyond it the
/// oldest go first.
pub const MAX_EMPTY_DETACHED: usize = 1024;

/// One detached connection, as the sweep sees it.
#[derive(Debug, Clone, Copy)]
pub struct Detached {
    /// Since its session ended.
    pub age: Duration,
    /// Whether any byte went either way on it.
    pub carried_data: bool,
}

/// The indices of `list` whose state to drop: every connection detached for longer than
/// `dead_session`, every empty one detached for longer than [`EMPTY_DETACHED`], and the oldest
/// empty ones beyond [`MAX_EMPTY_DETACHED`].
pub fn detached_to_drop(list: &[Detached], dead_session: Duration) -> Vec<usize> {
    let empty_bound = EMPTY_DETACHED.min(dead_session);
    let mut drop = Vec::new();
    let mut empty = Vec::new();
    for (i, d) in list.iter().enumerate() {
        if d.age > dead_session || (!d.carried_data && d.age > empty_bound) {
            drop.push(i);
        } else if !d.carried_data {
            empty.push(i);
        }
    }
    if empty.len() > MAX_EMPTY_DETACHED {
        // Oldest first.
        empty.sort_by_key(|&i| std::cmp::Reverse(list[i].age));
        drop.extend_from_slice(&empty[..empty.len() - MAX_EMPTY_DETACHED]);
    }
    drop.sort_unstable();
    drop
}

/// Whether a new session may open with `total` sessions open and `from_source` of them from
/// its source address, under the caps `max_total` and `max_per_source`; `Err` names the cap.
pub fn admit(
    total: usize,
    from_source: usize,
    max_total: usize,
    max_per_source: usize,
) -> Result<(), String> {
    if total >= max_total {
        return Err(format!(
            "the server holds its maximum of {max_total} sessions"
        ));
    }
    if from_source >= max_per_source {
        return Err(format!(
            "{max_per_source} sessions from one address is the maximum"
        ));
    }
    Ok(())
}

/// Takeovers a destination runs at once by default: each may hold a state record of up to
/// `max_record` bytes (the frame, then about 2.6 times as much while it is decoded).
pub const MAX_TAKEOVERS: usize = 32;

/// Whether a destination already running `active` takeovers (MIGRATEs whose state it is
/// fetching or installing) may start another under the cap `max`; `Err` is the refusal
/// (`Busy`: the agent tries another server, the connection stays where it is).
pub fn admit_takeover(active: usize, max: usize) -> Result<(), String> {
    if active >= max {
        return Err(format!(
            "this server is already taking over its maximum of {max} connections at once"
        ));
    }
    Ok(())
}

/// Default cap on hand-overs an origin runs at once (FETCHes it is serving: freezing a
/// connection and building its record, up to `max_record` each).
pub const MAX_HANDOVERS: usize = 32;

/// Whether an origin already handing over `active` connections may start another under the
/// cap `max`; `Err` is the refusal (`Busy`: the destination refuses the MIGRATE and the agent's
/// connection stays where it is). Only a holder of the cluster key can ask; the cap bounds what
/// even a peer can make an origin hold at once.
pub fn admit_handover(active: usize, max: usize) -> Result<(), String> {
    if active >= max {
        return Err(format!(
            "this server is already handing over its maximum of {max} connections at once"
        ));
    }
    Ok(())
}

/// Whether a state record of `len` bytes is within `max_record`: checked by the origin before
/// it freezes a connection, and by the destination on the record it received before decoding
/// it (the frame holding it was bounded before it was read).
pub fn record_fits(len: usize, max_record: usize) -> Result<(), String> {
    if len > max_record {
        return Err(format!(
            "a state record of {len} bytes is over the {max_record}-byte limit"
        ));
    }
    Ok(())
}

/// A budget of log lines for events anyone can cause (refused sessions, garbage on a port): at
/// most `per_window` per `window`; the rest are counted and the count is reported with the next
/// line admitted, so a flood costs a few lines a second instead of one line per connection.
#[derive(Debug, Clone)]
pub struct LogBudget {
    window: Duration,
    per_window: u32,
    start: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub const fn new(window: Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether to log an event at `now`: `Some(n)` to log it, `n` lines having been suppressed
    /// since the last one logged; `None` to count it only.
    pub fn admit(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window)
        {
            self.start = Some(now);
            self.used = 0;
        }
        if self.used < self.per_window {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// A token bucket: at most `burst` events at once and `per_sec` a second on average. Used for
/// the moves an agent's admin endpoint accepts (a local flood of `mtcp migrate` must not turn
/// into a flood of FETCHes at the servers).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: u32,
    burst: u32,
    tokens: f64,
    last: Option<std::time::Instant>,
}

impl TokenBucket {
    /// A full bucket (`per_sec` at least 1, `burst` at least 1).
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let burst = burst.max(1);
        Self {
            per_sec: per_sec.max(1),
            burst,
            tokens: f64::from(burst),
            last: None,
        }
    }

    /// The refill rate, events a second.
    pub fn per_sec(&self) -> u32 {
        self.per_sec
    }

    /// The bucket's size.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes `cost` tokens at `now` (a cost above the burst takes a full bucket, so that one
    /// request for every connection of a busy host still goes through, then waits); `Err`
    /// says how long until the bucket holds enough.
    pub fn take(&mut self, now: std::time::Instant, cost: u32) -> Result<(), Duration> {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * f64::from(self.per_sec)).min(f64::from(self.burst));
        }
        self.last = Some(now);
        let cost = f64::from(cost.clamp(1, self.burst));
        if self.tokens + 1e-9 >= cost {
            self.tokens -= cost;
            Ok(())
        } else {
            let wait = (cost - self.tokens) / f64::from(self.per_sec);
            Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
        }
    }
}

/// Descriptors an agent keeps apart from its connections' own: listeners, the admin endpoint,
/// RTT probes, spare sessions, logs.
pub const AGENT_FD_BASE: usize = 64;

/// Whether an agent holding `live` connections of `per_conn` descriptors each may take one more
/// under an open-files limit of `limit`, `reserve` descriptors kept aside (for what is not a
/// connection, and for the second session a moving connection holds). A client over the budget
/// is refused at once, so that the descriptors existing connections need to move are there.
pub fn admits_connection(live: usize, per_conn: usize, reserve: usize, limit: usize) -> bool {
    live.checked_add(1)
        .and_then(|n| n.checked_mul(per_conn))
        .and_then(|n| n.checked_add(reserve))
        .is_some_and(|need| need <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_admitted_while_their_descriptors_fit() {
        // 20 000 descriptors, 128 kept aside: 9 936 relayed connections of two each.
        assert!(admits_connection(9_935, 2, 128, 20_000));
        assert!(!admits_connection(9_936, 2, 128, 20_000));
        // A fast-path connection holds only its session.
        assert!(admits_connection(19_871, 1, 128, 20_000));
        assert!(!admits_connection(19_872, 1, 128, 20_000));
        // A limit below the reserve admits nothing; huge counts do not overflow.
        assert!(!admits_connection(0, 2, 128, 100));
        assert!(!admits_connection(usize::MAX, 2, 0, usize::MAX));
    }

    fn d(secs: u64, carried_data: bool) -> Detached {
        Detached {
            age: Duration::from_secs(secs),
            carried_data,
        }
    }

    #[test]
    fn states_with_data_are_kept_for_the_dead_session_bound() {
        let dead = Duration::from_secs(120);
        let list = [d(5, true), d(119, true), d(121, true)];
        assert_eq!(detached_to_drop(&list, dead), vec![2]);
    }

    #[test]
    fn empty_states_go_after_seconds() {
        let dead = Duration::from_secs(120);
        let list = [d(5, false), d(11, false), d(11, true)];
        assert_eq!(detached_to_drop(&list, dead), vec![1]);
        // Never kept longer than the dead-session bound either.
        assert_eq!(
            detached_to_drop(&[d(3, false)], Duration::from_secs(2)),
            vec![0]
        );
    }

    #[test]
    fn only_so_many_empty_states_are_kept_and_the_oldest_go_first() {
        let dead = Duration::from_secs(120);
        // MAX + 3 empty ones with ages 0..MAX+3 ms (index i is i ms old), plus one with data.
        let mut list: Vec<Detached> = (0..MAX_EMPTY_DETACHED + 3)
            .map(|i| Detached {
                age: Duration::from_millis(i as u64),
                carried_data: false,
            })
            .collect();
        list.push(d(60, true));
        let gone = detached_to_drop(&list, dead);
        assert_eq!(
            gone,
            vec![
                MAX_EMPTY_DETACHED,
                MAX_EMPTY_DETACHED + 1,
                MAX_EMPTY_DETACHED + 2
            ]
        );
    }

    #[test]
    fn a_flood_of_log_lines_is_cut_to_the_budget_and_counted() {
        let t0 = std::time::Instant::now();
        let mut b = LogBudget::new(Duration::from_secs(1), 3);
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let got: Vec<Option<u64>> = (0..10).map(|i| b.admit(ms(i))).collect();
        assert_eq!(&got[..3], &[Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(|g| g.is_none()));
        // The next window reports the seven suppressed with its first line.
        assert_eq!(b.admit(ms(1000)), Some(7));
        assert_eq!(b.admit(ms(1001)), Some(0));
    }

    #[test]
    fn takeovers_are_capped_and_records_bounded() {
        assert!(admit_takeover(0, 1).is_ok());
        assert!(admit_takeover(MAX_TAKEOVERS - 1, MAX_TAKEOVERS).is_ok());
        let e = admit_takeover(MAX_TAKEOVERS, MAX_TAKEOVERS).unwrap_err();
        assert!(e.contains("maximum of 32"), "{e}");
        assert!(admit_takeover(5, 0).is_err());
        assert!(record_fits(64 << 20, 64 << 20).is_ok());
        let e = record_fits((64 << 20) + 1, 64 << 20).unwrap_err();
        assert!(e.contains("over the 67108864-byte limit"), "{e}");
    }

    #[test]
    fn an_origin_hands_over_at_most_its_cap_of_connections_at_once() {
        assert!(admit_handover(0, 1).is_ok());
        assert!(admit_handover(MAX_HANDOVERS - 1, MAX_HANDOVERS).is_ok());
        let e = admit_handover(MAX_HANDOVERS, MAX_HANDOVERS).unwrap_err();
        assert!(
            e.contains("already handing over its maximum of 32 connections"),
            "{e}"
        );
        assert!(admit_handover(MAX_HANDOVERS + 1, MAX_HANDOVERS).is_err());
        // A cap of zero hands nothing over.
        assert!(admit_handover(0, 0).is_err());
    }

    #[test]
    fn sessions_are_capped_in_all_and_per_source() {
        assert!(admit(0, 0, 10, 4).is_ok());
        assert!(admit(9, 3, 10, 4).is_ok());
        assert!(admit(10, 0, 10, 4).unwrap_err().contains("maximum of 10"));
        assert!(admit(5, 4, 10, 4).unwrap_err().contains("from one address"));
    }

    #[test]
    fn a_token_bucket_allows_its_burst_then_its_rate() {
        let t0 = std::time::Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut b = TokenBucket::new(100, 200);
        assert!((0..200).all(|_| b.take(t0, 1).is_ok()));
        let wait = b.take(t0, 1).unwrap_err();
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
        // 100 a second: 50 ms later, 5 more, not 6.
        assert!((0..5).all(|_| b.take(ms(50), 1).is_ok()));
        assert!(b.take(ms(50), 1).is_err());
        // Refused attempts cost nothing; a long pause refills to the burst, no further.
        assert!((0..1000).all(|_| b.take(ms(50), 1).is_err()));
        assert!((0..200).all(|_| b.take(ms(60_000), 1).is_ok()));
        assert!(b.take(ms(60_000), 1).is_err());
    }

    #[test]
    fn a_request_dearer_than_the_burst_takes_a_full_bucket() {
        let t0 = std::time::Instant::now();
        let mut b = TokenBucket::new(100, 200);
        assert!(b.take(t0, 5000).is_ok());
        let wait = b.take(t0, 5000).unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
        assert!(b.take(t0 + Duration::from_secs(2), 5000).is_ok());
    }
}
