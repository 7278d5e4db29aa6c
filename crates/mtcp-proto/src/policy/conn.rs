//! One connection's trigger policies together (agent): the throughput floor and the RTT policy
//! fed from one tick, and the evidence reset when a new session starts. The driver gathers the
//! inputs (bytes delivered and arrived, whether it waits on the client program, the prober's
//! newest samples) and carries out the move; which policy fires, and with what sentence, is
//! decided here.

use super::{Backlog, FloorConfig, FloorPolicy, FloorSample, RttConfig, RttPolicy};
use crate::agent::{MoveCause, MoveReason};
use crate::wire::ServerInfo;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// A policy asks to move the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMove {
    /// The cause (floor or RTT) and the sentence the log and the timeline show.
    pub reason: MoveReason,
    /// Where to (the RTT policy names the better server; the floor names none).
    pub to: Option<String>,
}

/// What one tick of [`ConnPolicy::tick`] found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyTick {
    /// The move one policy asks for, if any (at most one per tick).
    pub fired: Option<PolicyMove>,
    /// The floor's sample this tick and its evidence before it, when the floor runs (for the
    /// trace log).
    pub floor: Option<(FloorSample, Duration)>,
    /// The smoothed RTTs by server id, in milliseconds, when new samples changed them since
    /// they were last returned (for the status shown to operators).
    pub srtts: Option<BTreeMap<String, f64>>,
}

/// One connection's policies.
#[derive(Debug, Clone)]
pub struct ConnPolicy {
    floor: Option<FloorPolicy>,
    rtt: Option<RttPolicy>,
    backlog: Backlog,
    /// The agent was blocked on the client program since the last tick.
    blocked: bool,
    /// Probe samples already fed, by server id: the newest sample's number.
    seen: HashMap<String, u64>,
    /// Smoothed RTTs last returned.
    shown: BTreeMap<String, f64>,
}

impl ConnPolicy {
    /// The policies configured (none runs when both are `None`).
    pub fn new(floor: Option<FloorConfig>, rtt: Option<RttConfig>) -> Self {
        ConnPolicy {
            floor: floor.map(FloorPolicy::new),
            rtt: rtt.map(RttPolicy::new),
            backlog: Backlog::default(),
            blocked: false,
            seen: HashMap::new(),
            shown: BTreeMap::new(),
        }
    }

    /// Whether any policy runs (the driver ticks only then).
    pub fn active(&self) -> bool {
        self.floor.is_some() || self.rtt.is_some()
    }

    /// Whether the RTT policy runs: the driver has every known server probed then.
    pub fn probes(&self) -> bool {
        self.rtt.is_some()
    }

    /// A new session with `current` (opened or moved), which knows the servers `known`: the
    /// evidence starts afresh (backlog, the client-limited latch, the floor's counted time),
    /// and the RTT policy compares against `current` and forgets servers no longer known.
    pub fn new_session(&mut self, current: &str, known: &[ServerInfo]) {
        self.backlog = Backlog::default();
        self.blocked = false;
        if let Some(f) = &mut self.floor {
            f.reset();
        }
        if let Some(r) = &mut self.rtt {
            r.set_current(current);
            let ids: Vec<&str> = known.iter().map(|s| s.id.as_str()).collect();
            r.retain(&ids);
        }
    }

    /// BACKLOG{queued} read when `arrived` downstream bytes had arrived.
    pub fn on_backlog(&mut self, arrived: u64, queued: u64) {
        self.backlog.on_report(arrived, queued);
    }

    /// The agent is blocked on the client program right now: the next tick's interval is
    /// client-limited whatever the agent's state then.
    pub fn client_blocked(&mut self) {
        self.blocked = true;
    }

    /// Evaluates the policies at `now`: `delivered` bytes went to the client program,
    /// `arrived` came from the session, `blocked` whether the agent waits on the client program
    /// now. `latest`, when the agent probes, gives the prober's newest sample of a server by
    /// data address (a number and the RTT); it is asked only when the floor did not fire, and a
    /// sample already fed is not fed again. The floor is evaluated first and wins: at most one
    /// policy fires per tick.
    pub fn tick<F>(
        &mut self,
        now: Instant,
        delivered: u64,
        arrived: u64,
        blocked: bool,
        known: &[ServerInfo],
        latest: Option<F>,
    ) -> PolicyTick
    where
        F: FnMut(&str) -> Option<(u64, Duration)>,
    {
        let mut out = PolicyTick::default();
        let client_limited = std::mem::replace(&mut self.blocked, blocked) || blocked;
        if let Some(f) = &mut self.floor {
            let s = FloorSample {
                delivered,
                backlog: self.backlog.waiting(arrived),
                client_limited,
            };
            out.floor = Some((s, f.evidence()));
            if let Some(fire) = f.sample(now, s) {
                let cfg = f.config();
                out.fired = Some(PolicyMove {
                    reason: MoveReason::new(MoveCause::Floor, format!(
                        "policy: throughput floor ({:.2} Mbit/s under {:.2} Mbit/s for {:.1} s with data waiting)",
                        fire.rate_bytes_per_s as f64 * 8e-6,
                        cfg.floor_bytes_per_s as f64 * 8e-6,
                        fire.over.as_secs_f64()
                    )),
                    to: None,
                });
                return out;
            }
        }
        if let (Some(r), Some(mut latest)) = (&mut self.rtt, latest) {
            let mut fed = false;
            for s in known {
                if let Some((seq, rtt)) = latest(&s.data) {
                    if self.seen.get(&s.id) != Some(&seq) {
                        self.seen.insert(s.id.clone(), seq);
                        r.sample(now, &s.id, rtt);
                        fed = true;
                    }
                }
            }
            if fed {
                let srtts: BTreeMap<String, f64> = r
                    .srtts()
                    .map(|(id, d)| (id.to_string(), d.as_secs_f64() * 1e3))
                    .collect();
                if srtts != self.shown {
                    out.srtts = Some(srtts.clone());
                    self.shown = srtts;
                }
            }
            if let Some(m) = r.poll(now) {
                out.fired = Some(PolicyMove {
                    reason: MoveReason::new(
                        MoveCause::Rtt,
                        format!(
                            "policy: rtt ({} better by {:.1} ms)",
                            m.target,
                            m.better_by().as_secs_f64() * 1e3
                        ),
                    ),
                    to: Some(m.target),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
