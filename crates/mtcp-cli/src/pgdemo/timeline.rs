//! The demo's timeline: what it did and the agent's moves, grouped by event.

use mtcp_agent::{ConnStatus, MigrationEvent, MoveCause};
use std::collections::BTreeMap;

/// Something the demo did, or a move the agent made, at `t` seconds since pgbench started.
pub(super) struct Event {
    pub(super) t: f64,
    pub(super) text: String,
}

/// A move the agent made (one session).
struct Move {
    t: f64,
    what: String,
    ok: bool,
    /// From the trigger to RESUMED.
    ms: f64,
}

impl Move {
    /// Ends the last group.
    const END: Move = Move {
        t: f64::INFINITY,
        what: String::new(),
        ok: false,
        ms: 0.0,
    };
}

/// Which of the demo's events a move's trigger belongs to, by its cause. The demo's own agent
/// names every move's cause; a timeline without one (an older agent's JSON) is counted apart.
fn kind(e: &MigrationEvent) -> &'static str {
    match e.cause {
        Some(MoveCause::Drain) => "drain",
        Some(MoveCause::Manual) => "manual",
        Some(MoveCause::Overload | MoveCause::Balance) => "other hint",
        // The session or its watch connection broke, or the server went silent: the kill.
        Some(MoveCause::SessionBroke | MoveCause::Silence) => "crash",
        Some(_) => "policy",
        None => "unnamed cause",
    }
}

/// What the agent's timelines show of the demo's moves.
pub(super) struct MoveSummary {
    pub(super) by_reason: BTreeMap<&'static str, u32>,
    pub(super) failed_moves: u32,
    pub(super) from_replica: u32,
    pub(super) aborted: Vec<String>,
}

/// The agent's view: every move of every session, by reason; moves of several sessions for one
/// event are added to `events` as one line (`mono0`: when pgbench started, on the agent's clock).
pub(super) fn agent_moves(
    conns: &[ConnStatus],
    mono0: u64,
    events: &mut Vec<Event>,
) -> MoveSummary {
    let mut by_reason: BTreeMap<&str, u32> = BTreeMap::new();
    let mut failed_moves = 0;
    let mut from_replica = 0;
    let mut aborted = Vec::new();
    let mut moves: Vec<Move> = Vec::new();
    for c in conns {
        if c.aborted().is_some() {
            aborted.push(format!("{}: {}", c.cid, c.state));
        }
        for e in &c.timeline {
            if e.ok {
                *by_reason.entry(kind(e)).or_default() += 1;
                from_replica += u32::from(e.from_replica);
            } else {
                failed_moves += 1;
            }
            moves.push(Move {
                t: e.trigger_mono_us
                    .map(|u| (u as f64 - mono0 as f64) / 1e6)
                    .unwrap_or(f64::NAN),
                what: if e.ok {
                    format!(
                        "{} -> {} ({}){}",
                        e.from,
                        e.to.as_deref().unwrap_or("?"),
                        e.reason,
                        if e.from_replica {
                            ", state from a replica"
                        } else {
                            ""
                        }
                    )
                } else {
                    format!(
                        "{} -> FAILED ({}): {}",
                        e.from,
                        e.reason,
                        e.refusals.join("; ")
                    )
                },
                ok: e.ok,
                ms: e.resumed_us.unwrap_or(0) as f64 / 1e3,
            });
        }
    }
    moves.sort_by(|x, y| x.t.total_cmp(&y.t));
    let mut group: Vec<&Move> = Vec::new();
    for m in moves.iter().chain(std::iter::once(&Move::END)) {
        if let Some(g) = group.first() {
            if m.what != g.what || m.t - g.t > 1.0 {
                let lo = group.iter().map(|m| m.ms).fold(f64::INFINITY, f64::min);
                let hi = group.iter().map(|m| m.ms).fold(0.0, f64::max);
                events.push(Event {
                    t: g.t,
                    text: format!(
                        "   {} session{} {}{}",
                        group.len(),
                        if group.len() == 1 { "" } else { "s" },
                        g.what,
                        match (g.ok, group.len()) {
                            (false, _) => String::new(),
                            (true, 1) => format!(", resumed after {lo:.1} ms"),
                            (true, _) => format!(", resumed after {lo:.1}..{hi:.1} ms"),
                        }
                    ),
                });
                group.clear();
            }
        }
        group.push(m);
    }
    MoveSummary {
        by_reason,
        failed_moves,
        from_replica,
        aborted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: &str, cause: Option<MoveCause>) -> MigrationEvent {
        MigrationEvent {
            at_ms: 0,
            from: "s1".into(),
            to: Some("s2".into()),
            reason: reason.into(),
            ok: true,
            resumed_us: None,
            first_byte_us: None,
            state_bytes: None,
            refusals: Vec::new(),
            trigger_mono_us: None,
            from_replica: false,
            cause,
        }
    }

    #[test]
    fn a_move_is_counted_by_its_cause_not_its_words() {
        // Words that would mislead: a silent server whose text mentions a drain.
        let e = event("server silent after drain", Some(MoveCause::Silence));
        assert_eq!(kind(&e), "crash");
        assert_eq!(kind(&event("x", Some(MoveCause::Drain))), "drain");
        assert_eq!(kind(&event("x", Some(MoveCause::Manual))), "manual");
        assert_eq!(kind(&event("x", Some(MoveCause::Overload))), "other hint");
        assert_eq!(kind(&event("x", Some(MoveCause::SessionBroke))), "crash");
        assert_eq!(kind(&event("x", Some(MoveCause::Floor))), "policy");
        // An agent that names no cause: counted apart, never guessed from its words.
        assert_eq!(
            kind(&event("hint (drain): s1 drains", None)),
            "unnamed cause"
        );
    }
}
