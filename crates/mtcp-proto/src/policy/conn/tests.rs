//! One connection's policies fed together: which fires, what each tick feeds, what a new session
//! forgets.

use super::*;
use crate::policy::tests::MS;
use std::cell::Cell;

const FLOOR: FloorConfig = FloorConfig {
    floor_bytes_per_s: 1_000_000,
    window: Duration::from_secs(1),
};

fn rtt_cfg() -> RttConfig {
    RttConfig::new(5 * MS, Duration::from_secs(1), Duration::from_secs(1))
}

fn known() -> Vec<ServerInfo> {
    ["s1", "s2"]
        .iter()
        .map(|id| ServerInfo {
            id: id.to_string(),
            data: format!("addr-{id}"),
        })
        .collect()
}

/// A prober's newest sample of a server, by data address.
type Latest = fn(&str) -> Option<(u64, Duration)>;

/// No probing agent.
const NO_PROBES: Option<Latest> = None;

/// A prober whose newest samples are numbered `seq`: s1 at 40 ms, s2 at `s2_ms`.
fn prober(
    seq: u64,
    s2_ms: u32,
    asked: &Cell<u32>,
) -> impl FnMut(&str) -> Option<(u64, Duration)> + '_ {
    move |addr| {
        asked.set(asked.get() + 1);
        match addr {
            "addr-s1" => Some((seq, 40 * MS)),
            "addr-s2" => Some((seq, s2_ms * MS)),
            _ => None,
        }
    }
}

#[test]
fn only_configured_policies_run_and_only_the_rtt_policy_wants_probes() {
    let none = ConnPolicy::new(None, None);
    assert!(!none.active() && !none.probes());
    let floor = ConnPolicy::new(Some(FLOOR), None);
    assert!(floor.active() && !floor.probes());
    let rtt = ConnPolicy::new(None, Some(rtt_cfg()));
    assert!(rtt.active() && rtt.probes());
}

#[test]
fn the_floor_is_evaluated_first_and_one_tick_fires_at_most_one_policy() {
    let t0 = Instant::now();
    let mut p = ConnPolicy::new(Some(FLOOR), Some(rtt_cfg()));
    p.new_session("s1", &known());
    // The server has a gibibyte waiting and delivers nothing; s2 is 30 ms closer.
    p.on_backlog(0, 1 << 30);
    let asked = Cell::new(0);
    for k in 0..10 {
        let tick = p.tick(
            t0 + k * 100 * MS,
            0,
            0,
            false,
            &known(),
            Some(prober(1, 10, &asked)),
        );
        assert_eq!(tick.fired, None, "tick {k}");
    }
    // One second of evidence for both: the floor, evaluated first, wins, and the prober is not
    // even asked.
    asked.set(0);
    let tick = p.tick(
        t0 + 1000 * MS,
        0,
        0,
        false,
        &known(),
        Some(prober(1, 10, &asked)),
    );
    let fired = tick.fired.expect("the floor fires");
    assert_eq!(fired.reason.cause, MoveCause::Floor);
    assert_eq!(
        fired.reason.text,
        "policy: throughput floor (0.00 Mbit/s under 8.00 Mbit/s for 1.0 s with data waiting)"
    );
    assert_eq!(fired.to, None);
    assert_eq!(asked.get(), 0);
    // The RTT policy kept its evidence: it fires on the next tick, toward the better server.
    let tick = p.tick(
        t0 + 1100 * MS,
        0,
        0,
        false,
        &known(),
        Some(prober(1, 10, &asked)),
    );
    let fired = tick.fired.expect("the rtt policy fires");
    assert_eq!(fired.reason.cause, MoveCause::Rtt);
    assert_eq!(fired.reason.text, "policy: rtt (s2 better by 30.0 ms)");
    assert_eq!(fired.to.as_deref(), Some("s2"));
}

#[test]
fn a_probe_sample_already_fed_is_not_fed_again() {
    let t0 = Instant::now();
    let mut p = ConnPolicy::new(None, Some(rtt_cfg()));
    p.new_session("s1", &known());
    let asked = Cell::new(0);
    let tick = p.tick(t0, 0, 0, false, &known(), Some(prober(1, 10, &asked)));
    let shown: Vec<(String, f64)> = tick.srtts.expect("new samples").into_iter().collect();
    assert_eq!(shown, [("s1".to_string(), 40.0), ("s2".to_string(), 10.0)]);
    // The same sample numbers again (here with another value): nothing is fed, nothing shown.
    let tick = p.tick(
        t0 + 100 * MS,
        0,
        0,
        false,
        &known(),
        Some(prober(1, 90, &asked)),
    );
    assert_eq!(tick.srtts, None);
    // A new sample is fed, and the smoothed RTT shown moves.
    let tick = p.tick(
        t0 + 200 * MS,
        0,
        0,
        false,
        &known(),
        Some(prober(2, 90, &asked)),
    );
    let srtts = tick.srtts.expect("a new sample");
    assert_eq!(srtts["s1"], 40.0, "s1's sample is the same value");
    assert!(srtts["s2"] > 10.0);
    // A new sample that leaves every smoothed RTT as it was shows nothing new.
    let mut same = ConnPolicy::new(None, Some(rtt_cfg()));
    same.new_session("s1", &known());
    same.tick(t0, 0, 0, false, &known(), Some(prober(1, 10, &asked)));
    let tick = same.tick(
        t0 + 100 * MS,
        0,
        0,
        false,
        &known(),
        Some(prober(2, 10, &asked)),
    );
    assert_eq!(tick.srtts, None);
}

#[test]
fn a_moment_blocked_on_the_client_makes_the_next_interval_client_limited() {
    let t0 = Instant::now();
    let mut p = ConnPolicy::new(Some(FLOOR), None);
    let limited = |t: PolicyTick| t.floor.expect("the floor runs").0.client_limited;
    p.client_blocked();
    assert!(limited(p.tick(t0, 0, 0, false, &[], NO_PROBES)), "latched");
    assert!(
        !limited(p.tick(t0 + 100 * MS, 0, 0, false, &[], NO_PROBES)),
        "then cleared"
    );
    assert!(
        limited(p.tick(t0 + 200 * MS, 0, 0, true, &[], NO_PROBES)),
        "blocked now"
    );
    assert!(
        limited(p.tick(t0 + 300 * MS, 0, 0, false, &[], NO_PROBES)),
        "blocked at the last tick"
    );
    assert!(!limited(p.tick(t0 + 400 * MS, 0, 0, false, &[], NO_PROBES)));
}

#[test]
fn a_new_session_starts_the_evidence_afresh() {
    let t0 = Instant::now();
    let mut p = ConnPolicy::new(Some(FLOOR), Some(rtt_cfg()));
    p.new_session("s1", &known());
    p.on_backlog(0, 1 << 30);
    let asked = Cell::new(0);
    for k in 0..10 {
        p.tick(
            t0 + k * 100 * MS,
            0,
            0,
            false,
            &known(),
            Some(prober(1, 10, &asked)),
        );
    }
    let tick = p.tick(
        t0 + 900 * MS,
        0,
        0,
        false,
        &known(),
        Some(prober(1, 10, &asked)),
    );
    assert_eq!(
        tick.floor.map(|f| f.1),
        Some(900 * MS),
        "evidence before the move"
    );
    // The connection moved to s2 (and s1 is no longer listed); the agent was blocked just before.
    p.client_blocked();
    let now_known = &known()[1..];
    p.new_session("s2", now_known);
    p.on_backlog(0, 1 << 30);
    let tick = p.tick(
        t0 + 1000 * MS,
        0,
        0,
        false,
        now_known,
        Some(prober(1, 10, &asked)),
    );
    let (sample, evidence) = tick.floor.expect("the floor runs");
    assert_eq!(evidence, Duration::ZERO);
    assert!(!sample.client_limited, "the latch is the old session's");
    assert_eq!(tick.fired, None);
    // A whole window more is needed; the RTT policy compares against s2 now and has nobody
    // better (s1 was forgotten, and its samples are not fed: it is no longer known).
    for k in 1..10 {
        let tick = p.tick(
            t0 + (1000 + k * 100) * MS,
            0,
            0,
            false,
            now_known,
            Some(prober(1, 10, &asked)),
        );
        assert_eq!(tick.fired, None, "tick {k}");
    }
    let tick = p.tick(
        t0 + 2000 * MS,
        0,
        0,
        false,
        now_known,
        Some(prober(1, 10, &asked)),
    );
    assert_eq!(tick.fired.map(|f| f.reason.cause), Some(MoveCause::Floor));
    // The backlog itself is the old session's: a new one knows of nothing waiting.
    p.new_session("s2", now_known);
    let tick = p.tick(t0 + 2100 * MS, 0, 0, false, now_known, NO_PROBES);
    assert_eq!(tick.floor.expect("the floor runs").0.backlog, 0);
}
