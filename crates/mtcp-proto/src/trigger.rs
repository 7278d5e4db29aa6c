//! The agent's liveness trigger: an RTT estimate (RFC 6298 style) from ping/pong, and a silence
//! bound derived from it and the server's heartbeat interval. Time comes in as an argument.

use std::time::{Duration, Instant};

/// Samples the path's minimum is taken over ([`Rtt::unqueued`]).
const MIN_WINDOW: usize = 8;

/// Smoothed RTT estimator, and the minimum of the last `MIN_WINDOW` samples.
#[derive(Debug, Clone, Copy)]
pub struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
    recent: [Option<Duration>; MIN_WINDOW],
    next: usize,
}

impl Default for Rtt {
    fn default() -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            recent: [None; MIN_WINDOW],
            next: 0,
        }
    }
}

impl Rtt {
    pub fn sample(&mut self, r: Duration) {
        self.recent[self.next] = Some(r);
        self.next = (self.next + 1) % MIN_WINDOW;
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

    /// The path without the queues in front of it: an estimate started from the smallest of
    /// the recent samples. A session's PONG waits behind the data queued on it (a slow reader
    /// leaves seconds of it), which says nothing of how fast another server on the same path
    /// answers; queueing only ever adds, so the minimum is the path's own round trip.
    pub fn unqueued(&self) -> Rtt {
        let mut r = Rtt::default();
        if let Some(min) = self.recent.iter().flatten().min() {
            r.sample(*min);
        }
        r
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

/// How long after the last downstream data the agent still expects the server to speak, beyond
/// the silence bound itself: a server that hangs in the middle of a stream (no request
/// outstanding) is caught within this window. See [`Liveness`].
pub const EXPECT_AFTER_DATA: Duration = Duration::from_secs(1);

/// How many heartbeat intervals apart a server beats where the agent only may still expect
/// more data ([`beat_every`]): the agent's silence bound is three intervals plus two
/// retransmission timeouts ([`silence_bound`]), so beats this far apart still leave one whole
/// interval and a lost segment's retransmission of margin.
pub const LINGER_APART: u32 = 2;

/// How long a server keeps beating after the agent last got data from it ([`beat_every`]),
/// with heartbeat interval `hb`: [`EXPECT_AFTER_DATA`] and two lingering beats more. The
/// agent expects frames until one arrives [`EXPECT_AFTER_DATA`] after the last data it read,
/// and the server's clock runs from the agent's acknowledgement, which left after that read:
/// a beat sent past the window arrives past it, and the beats up to `linger` send one.
pub fn linger(hb: Duration) -> Duration {
    EXPECT_AFTER_DATA + hb * LINGER_APART * 2
}

/// How often a server beats on a relayed session that has been quiet, or `None` for not at
/// all (issue 13: an idle session costs no frames). It beats only where someone may be waiting
/// for it:
/// - every `hb` where input arrived that no output has followed yet (`input_unanswered`: the
///   client sent something, the agent expects an answer);
/// - every [`LINGER_APART`] intervals where data it wrote is not acknowledged yet
///   (`data_unacked`: the agent may still be reading it — a slow client leaves it in the
///   socket buffers for seconds, and the agent expects more for a while after each piece it
///   reads), or data was written or acknowledged less than [`linger`] ago (`since_data`: the
///   agent got data recently; an acknowledgement comes after the agent read what it covers).
///
/// A fast-path session never beats (decision 69): its client's connection lives in the
/// server process, so only the server can move it and nothing the agent could do about a
/// silent server would save it; a crashed server's session ends at once (EOF or reset), which
/// is all its agent needs to know.
pub fn beat_every(
    input_unanswered: bool,
    data_unacked: bool,
    since_data: Duration,
    fast_path: bool,
    hb: Duration,
) -> Option<Duration> {
    if fast_path {
        None
    } else if input_unanswered {
        Some(hb)
    } else if data_unacked || since_data < linger(hb) {
        Some(hb * LINGER_APART)
    } else {
        None
    }
}

/// How long the server waits for the next frame of a session's agent before it counts the
/// agent as gone (`None`: never). A relaying agent pings at least [`PINGS_PER_IDLE`] times per
/// `session_idle` ([`ping_every`]: the server tells it the bound), so a relayed session
/// silent for `session_idle` has no agent behind it; a fast-path agent's session is a quiet
/// control channel (the client's bytes never cross it), silent for as long as nothing moves.
pub fn agent_silence(fast_path: bool, session_idle: Duration) -> Option<Duration> {
    (!fast_path).then_some(session_idle)
}

/// How often a relaying agent pings a session that moves data: each PONG is a round-trip
/// sample ([`Rtt`]), and the tick acknowledges what arrived since the last.
pub const PING_EVERY: Duration = Duration::from_secs(1);

/// Pings a server may miss before it counts a relayed session's agent as gone.
pub const PINGS_PER_IDLE: u32 = 3;

/// How often a relaying agent pings a session that moved nothing since its last ping, when
/// its server counts the agent as gone after `idle_ms` of silence (0: never, as the server's
/// WELCOME or RESUMED says): [`PINGS_PER_IDLE`] pings per bound, never more often than
/// [`PING_EVERY`]. Nine thousand idle connections pinged every second cost their agent and
/// server almost half a core between them (issue 13); at the default 30 s bound, every 10 s.
/// A server whose bound is unknown (0) gets [`PING_EVERY`].
pub fn ping_every(idle_ms: u32) -> Duration {
    match idle_ms {
        0 => PING_EVERY,
        ms => (Duration::from_millis(ms as u64) / PINGS_PER_IDLE).max(PING_EVERY),
    }
}

/// Least time between two BACKLOG reports of a session.
pub const BACKLOG_EVERY: Duration = Duration::from_millis(200);

/// Whether the server puts BACKLOG{queued} before a batch of `data` bytes it writes now, having
/// last reported `since_last` ago (`None`: never): only when more output waits behind the batch
/// (the application is ahead of the socket; the agent anchors the report at this point of the
/// stream), and at most every [`BACKLOG_EVERY`]. A batch without data anchors nothing.
pub fn backlog_due(since_last: Option<Duration>, queued: u64, data: u64) -> bool {
    data > 0 && queued > data && since_last.is_none_or(|d| d >= BACKLOG_EVERY)
}

/// Heartbeat intervals a session may miss before its server counts as silent.
pub const MISSED_BEATS: u32 = 3;

/// How long a session with a server that beats every `heartbeat` may stay silent while the
/// agent expects to hear from it: [`MISSED_BEATS`] beats plus two retransmission timeouts of
/// the measured path (a lost segment stalls a TCP stream that long). The one bound of both the
/// relay ([`Liveness`]) and the fast path, whose sessions always beat ([`beat_every`]).
pub fn silence_bound(heartbeat: Duration, rtt: &Rtt) -> Duration {
    let rto = rtt.rto().unwrap_or(MIN_RTO);
    heartbeat * MISSED_BEATS + rto * 2
}

/// Fires when the server has been silent for too long while the agent expects to hear from it.
///
/// Servers beat only where someone waits ([`beat_every`]), so the agent applies
/// its silence bound only then: from the first upstream bytes it sends after the last downstream
/// data (a request is outstanding) until data comes back, and for [`EXPECT_AFTER_DATA`] past the
/// bound after downstream data (a stream may go on). An idle connection is never taken for a
/// silent server; a crashed server's sessions end at once (EOF or reset), and a hung one is
/// caught when its client next sends. Control frames (heartbeats, pongs) count as signs of life
/// but arm nothing.
#[derive(Debug, Clone)]
pub struct Liveness {
    heartbeat: Duration,
    last_rx: Instant,
    /// When downstream data last arrived.
    last_data: Instant,
    /// Upstream data (or its end) was sent after the last downstream data: an answer is due.
    waiting: bool,
    pub rtt: Rtt,
}

impl Liveness {
    /// A session that just started expects nothing until data moves either way; nor does the
    /// server's side beat before then (a new or moved connection's session counts as having
    /// had no data for [`linger`]).
    pub fn new(now: Instant, heartbeat: Duration) -> Self {
        Self {
            heartbeat,
            last_rx: now,
            last_data: now.checked_sub(EXPECT_AFTER_DATA).unwrap_or(now),
            waiting: false,
            rtt: Rtt::default(),
        }
    }

    pub fn set_heartbeat(&mut self, hb: Duration) {
        self.heartbeat = hb;
    }

    /// Anything arrived from the server (or the agent was busy elsewhere, e.g. delivering to
    /// a slow client program: not the server's silence).
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// Downstream data arrived: whatever was asked has an answer.
    pub fn on_data_received(&mut self, now: Instant) {
        self.last_rx = now;
        self.last_data = now;
        self.waiting = false;
    }

    /// Upstream data (or its end) went to the server: an answer is due. If the agent expected
    /// nothing until now, the silence clock starts here, not at some old frame.
    pub fn on_data_sent(&mut self, now: Instant) {
        if !self.waiting {
            if self.deadline().is_none() {
                self.last_rx = now;
            }
            self.waiting = true;
        }
    }

    /// How long silence may last before the trigger fires ([`silence_bound`]).
    pub fn bound(&self) -> Duration {
        silence_bound(self.heartbeat, &self.rtt)
    }

    /// When the trigger fires if nothing arrives, or `None` while the agent expects nothing
    /// (by the time the bound ran out, the window after the last data would have closed).
    pub fn deadline(&self) -> Option<Instant> {
        (self.waiting || self.last_rx < self.last_data + EXPECT_AFTER_DATA)
            .then(|| self.last_rx + self.bound())
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_relayed_sessions_agent_can_fall_silent() {
        let idle = Duration::from_secs(30);
        assert_eq!(agent_silence(false, idle), Some(idle));
        assert_eq!(agent_silence(true, idle), None);
    }

    #[test]
    fn an_idle_session_is_pinged_three_times_per_bound_but_at_most_every_second() {
        let s = Duration::from_secs;
        assert_eq!(ping_every(30_000), s(10));
        assert_eq!(ping_every(2_000), PING_EVERY, "a short bound: every second");
        assert_eq!(ping_every(3_000), PING_EVERY);
        assert_eq!(ping_every(0), PING_EVERY, "unknown bound: every second");
        // The agent's pings always fit the bound that often.
        for ms in [3_000u32, 4_500, 30_000, 600_000] {
            assert!(ping_every(ms) * PINGS_PER_IDLE <= Duration::from_millis(ms as u64));
        }
    }

    #[test]
    fn backlog_is_reported_when_output_waits_behind_a_batch_at_most_every_200ms() {
        let ms = Duration::from_millis;
        // Never reported: at once, if more than the batch is queued.
        assert!(backlog_due(None, 2_000, 1_000));
        assert!(!backlog_due(None, 1_000, 1_000));
        assert!(!backlog_due(None, 999, 1_000));
        // Reported lately: not again before BACKLOG_EVERY.
        assert!(!backlog_due(Some(ms(199)), 2_000, 1_000));
        assert!(backlog_due(Some(ms(200)), 2_000, 1_000));
        assert!(backlog_due(Some(ms(5_000)), 2_000, 1_000));
        // A batch without data anchors nothing.
        assert!(!backlog_due(None, 2_000, 0));
    }

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
    fn one_silence_bound_follows_the_heartbeat_and_the_path() {
        let unmeasured = Rtt::default();
        let hb = Duration::from_millis(100);
        assert_eq!(silence_bound(hb, &unmeasured), Duration::from_millis(700));
        let mut far = Rtt::default();
        far.sample(Duration::from_millis(300));
        assert_eq!(
            silence_bound(hb, &far),
            Duration::from_millis(300 + 2 * (300 + 600))
        );
        let live = Liveness::new(Instant::now(), hb);
        assert_eq!(live.bound(), silence_bound(hb, &unmeasured));
    }

    #[test]
    fn liveness_fires_only_after_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Duration::from_millis(100));
        // 3 heartbeats + 2 minimum RTOs: one lost segment (retransmitted after 200 ms) is
        // never taken for a dead server.
        assert_eq!(l.bound(), Duration::from_millis(700));
        l.on_data_sent(t0);
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

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_server_beats_only_where_someone_waits_and_never_on_the_fast_path() {
        let hb = Duration::from_millis(100);
        let quiet = linger(hb);
        assert_eq!(quiet, Duration::from_millis(1_400));
        assert_eq!(
            beat_every(false, false, quiet, false, hb),
            None,
            "idle: no beat"
        );
        for (unanswered, unacked, since) in [(false, false, quiet), (true, true, MS)] {
            assert_eq!(
                beat_every(unanswered, unacked, since, true, hb),
                None,
                "fast path"
            );
        }
        assert_eq!(
            beat_every(true, false, quiet, false, hb),
            Some(hb),
            "input unanswered"
        );
        let apart = Some(hb * LINGER_APART);
        assert_eq!(
            beat_every(false, true, quiet, false, hb),
            apart,
            "data not acknowledged"
        );
        assert_eq!(
            beat_every(false, false, quiet - MS, false, hb),
            apart,
            "data just now"
        );
        assert_eq!(
            beat_every(false, false, Duration::from_secs(3600), false, hb),
            None
        );
        // Lingering beats fit the agent's bound with a whole interval and two RTOs to spare.
        let bound = silence_bound(hb, &Rtt::default());
        assert_eq!(bound - hb * LINGER_APART, hb + MIN_RTO * 2);
    }

    #[test]
    fn the_rto_is_never_below_linux_minimum_and_follows_the_variance() {
        let mut r = Rtt::default();
        assert_eq!((r.srtt(), r.rto()), (None, None));
        r.sample(10 * MS);
        assert_eq!(
            r.rto(),
            Some(MIN_RTO),
            "10 ms + 4 x 5 ms is under the minimum"
        );
        let mut r = Rtt::default();
        r.sample(100 * MS);
        assert_eq!(r.rto(), Some(300 * MS), "first sample: rttvar = srtt / 2");
        r.sample(200 * MS);
        // rttvar = (3 x 50 + 100) / 4 = 62.5 ms, srtt = (7 x 100 + 200) / 8 = 112.5 ms.
        assert_eq!(r.srtt(), Some(Duration::from_micros(112_500)));
        assert_eq!(r.rto(), Some(Duration::from_micros(112_500 + 250_000)));
    }

    #[test]
    fn the_unqueued_path_is_the_smallest_of_the_last_eight_samples() {
        assert_eq!(Rtt::default().unqueued().srtt(), None);
        let mut r = Rtt::default();
        for ms in [100, 30, 80] {
            r.sample(ms * MS);
        }
        let u = r.unqueued();
        assert_eq!(u.srtt(), Some(30 * MS));
        assert_eq!(u.rto(), Some(MIN_RTO));
        // Eight later samples push the 30 ms one out of the window.
        for _ in 0..8 {
            r.sample(500 * MS);
        }
        assert_eq!(r.unqueued().srtt(), Some(500 * MS));
        assert_eq!(r.unqueued().rto(), Some(1500 * MS), "500 + 4 x 250");
    }

    #[test]
    fn a_new_heartbeat_interval_moves_the_silence_bound() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 100 * MS);
        l.on_data_sent(t0);
        assert_eq!(l.deadline(), Some(t0 + 700 * MS));
        l.set_heartbeat(200 * MS);
        assert_eq!(l.bound(), 1000 * MS, "3 x 200 ms + 2 x 200 ms");
        assert_eq!(l.deadline(), Some(t0 + 1000 * MS));
        assert!(!l.expired(t0 + 999 * MS));
    }

    #[test]
    fn a_request_while_data_is_still_expected_keeps_the_running_clock() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 100 * MS);
        l.on_data_received(t0);
        // Within the window after data the clock already runs from t0: a request does not
        // restart it (a server that hung mid-stream is not given a fresh bound).
        l.on_data_sent(at(t0, 500));
        assert_eq!(l.deadline(), Some(t0 + 700 * MS));
        // The answer's data stops the wait; the window after it runs from there.
        l.on_data_received(at(t0, 600));
        assert_eq!(l.deadline(), Some(at(t0, 1_300)));
    }

    #[test]
    fn a_new_session_expects_nothing_until_data_moves() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 100 * MS);
        // Control frames are signs of life but arm nothing.
        l.on_receive(at(t0, 50));
        assert_eq!(l.deadline(), None);
        assert!(!l.expired(at(t0, 100_000)));
    }

    #[test]
    fn an_idle_connection_expects_nothing_and_a_request_starts_the_clock() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, Duration::from_millis(100));
        // A new session expects nothing until data moves.
        assert_eq!(l.deadline(), None);
        l.on_data_received(t0);
        assert!(l.expired(at(t0, 700)), "silence right after data counts");
        // Heartbeats keep it alive; past the window after the last data nothing is expected.
        for ms in (100..=900).step_by(100) {
            l.on_receive(at(t0, ms));
            assert!(!l.expired(at(t0, ms + 1)));
        }
        l.on_receive(at(t0, 1_000));
        assert_eq!(l.deadline(), None, "idle: nothing expected");
        assert!(!l.expired(at(t0, 60_000)));
        // A request after an hour of quiet: the bound runs from it, not from the last beat.
        let t1 = at(t0, 3_600_000);
        l.on_data_sent(t1);
        assert_eq!(l.deadline(), Some(t1 + l.bound()));
        // More requests do not move the clock; only something from the server does.
        l.on_data_sent(t1 + Duration::from_millis(300));
        assert!(l.expired(t1 + Duration::from_millis(700)));
        l.on_receive(t1 + Duration::from_millis(500));
        assert!(!l.expired(t1 + Duration::from_millis(1_100)));
        assert!(l.expired(t1 + Duration::from_millis(1_200)));
        // The answer: the server beats on for `linger`, the agent expects it a little less.
        let t2 = t1 + Duration::from_millis(1_150);
        l.on_data_received(t2);
        assert!(!l.expired(t2 + Duration::from_millis(699)));
        assert!(
            l.expired(t2 + Duration::from_millis(700)),
            "a server hung mid-stream"
        );
    }

    #[test]
    fn a_server_that_beats_by_rule_is_never_taken_for_silent() {
        // Simulated: requests at random times, answers after random delays, one-way delay d.
        // Downstream is one FIFO stream: an answer may wait in socket buffers behind a slow
        // client for up to `slow` ms more (heartbeats queue behind it too). The agent
        // acknowledges data it read after a random delay (its ACK_EVERY or its idle tick).
        // The server beats by `beat_every` (every 100 or 200 ms of quiet). The agent must never
        // fire.
        use proptest::prelude::*;
        let hb = Duration::from_millis(100);
        proptest!(ProptestConfig::with_cases(512), |(
            events in proptest::collection::vec((0u64..5_000, 0u64..3_000, 0u64..1_000), 1..8),
            d in 0u64..60,
            slow in prop_oneof![Just(0u64), 0u64..5_000],
        )| {
            let t0 = Instant::now();
            let mut l = Liveness::new(t0, hb);
            // Server's view: when it last wrote data or had data acknowledged, how much data
            // it wrote and how much is acknowledged, whether input is unanswered.
            let mut last_data = 0u64;
            let (mut written, mut acked) = (0u64, 0u64);
            let mut unanswered = false;
            let mut last_beat_or_write = 0u64;
            // (time sent by the agent, answer delay, ack delay).
            let mut sends: Vec<(u64, u64, u64)> = Vec::new();
            let mut t = 0u64;
            for (gap, delay, ack) in &events {
                t += gap;
                sends.push((t, *delay, *ack));
            }
            let end = t + 3_000 + 2 * slow + 6_000;
            let mut in_flight_up: Vec<(u64, u64, u64)> = Vec::new(); // (arrival, delay, ack)
            // Downstream, in stream order: (arrival at the agent, Some(data no, ack delay)).
            let mut down: std::collections::VecDeque<(u64, Option<(u64, u64)>)> = Default::default();
            let mut acks: Vec<(u64, u64)> = Vec::new(); // (arrival at the server, up to data no)
            let mut answers: Vec<(u64, u64)> = Vec::new(); // (server write time, ack delay)
            let mut last_arrival = 0u64;
            for now in 0..end {
                let ti = at(t0, now);
                for &(s, delay, ack) in &sends {
                    if s == now {
                        l.on_data_sent(ti);
                        in_flight_up.push((now + d, delay, ack));
                    }
                }
                // Server receives input and acknowledgements.
                let mut k = 0;
                while k < in_flight_up.len() {
                    if in_flight_up[k].0 == now {
                        let (_, delay, ack) = in_flight_up.swap_remove(k);
                        unanswered = true;
                        answers.push((now + delay, ack));
                    } else {
                        k += 1;
                    }
                }
                for &(a, upto) in &acks {
                    if a == now && upto > acked {
                        acked = upto;
                        last_data = now;
                    }
                }
                acks.retain(|&(a, _)| a != now);
                // Server answers, or beats.
                if let Some(i) = answers.iter().position(|&(a, _)| a == now) {
                    let (_, ack) = answers.swap_remove(i);
                    last_data = now;
                    last_beat_or_write = now;
                    written += 1;
                    // As the server sees it: output followed every input so far.
                    unanswered = false;
                    last_arrival = last_arrival.max(now + d + slow);
                    down.push_back((last_arrival, Some((written, ack))));
                } else if beat_every(unanswered, acked < written, Duration::from_millis(now - last_data), false, hb)
                    .is_some_and(|every| now >= last_beat_or_write + every.as_millis() as u64)
                {
                    last_beat_or_write = now;
                    last_arrival = last_arrival.max(now + d);
                    down.push_back((last_arrival, None));
                }
                // Agent receives, in order.
                while down.front().is_some_and(|&(a, _)| a == now) {
                    match down.pop_front().map(|(_, x)| x) {
                        Some(Some((n, ack))) => {
                            l.on_data_received(ti);
                            acks.push((now + ack + d, n));
                        }
                        _ => l.on_receive(ti),
                    }
                }
                // While answers wait in the buffers behind the slow client the agent is blocked
                // writing to it, and does not count silence (the relay's timer is off then).
                let blocked = slow > 0 && down.iter().any(|(_, x)| x.is_some());
                prop_assert!(blocked || !l.expired(ti), "fired at {now} ms");
            }
        });
    }
}
