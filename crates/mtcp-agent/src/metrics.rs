//! The agent's part of the metrics endpoint (names and the byte totals: `mtcp::metrics`): its
//! moves by cause and outcome and how long they took, the refusals candidates answered, and,
//! when scraped, its connections by state and the upstream bytes it keeps for replays.

use crate::AgentInner;
use crate::MoveCause;
use ::metrics::{counter, gauge, histogram};
use mtcp::metrics::{CONNECTIONS, MOVES, MOVE_SECONDS, RETENTION_BYTES};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Instant;

/// How a move ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A server resumed the connection.
    Ok,
    /// No candidate took it: the client program's connection is reset (on the fast path,
    /// one whose session still works stays where it was).
    Failed,
    /// The connection had already ended in order; nothing to move.
    Closed,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Failed, Outcome::Closed];

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Closed => "closed",
        }
    }

    /// A move's result: resumed (`Some`), nothing to move (`None`), or why it failed.
    fn of<T>(r: &Result<Option<T>, String>) -> Self {
        match r {
            Ok(Some(_)) => Outcome::Ok,
            Ok(None) => Outcome::Closed,
            Err(_) => Outcome::Failed,
        }
    }
}

/// Runs the move `fut`, triggered by `cause` at `t0`, and counts how it ended (and, when it
/// succeeded, how long it took).
pub(crate) async fn counted<T>(
    cause: MoveCause,
    t0: Instant,
    fut: impl Future<Output = Result<Option<T>, String>>,
) -> Result<Option<T>, String> {
    let r = fut.await;
    let outcome = Outcome::of(&r);
    counter!(MOVES, "reason" => cause.label(), "outcome" => outcome.label()).increment(1);
    if outcome == Outcome::Ok {
        histogram!(MOVE_SECONDS).record(t0.elapsed().as_secs_f64());
    }
    r
}

/// Publishes an agent's levels; does nothing once the agent is gone.
#[derive(Clone)]
pub struct AgentSampler(pub(crate) Weak<AgentInner>);

impl AgentSampler {
    /// Shows every move label set (at zero before its first move), then sets the gauges.
    pub fn describe(&self) {
        for cause in MoveCause::ALL {
            for outcome in Outcome::ALL {
                counter!(MOVES, "reason" => cause.label(), "outcome" => outcome.label())
                    .increment(0);
            }
        }
        self.sample();
    }

    /// Sets the gauges (and the byte totals) to what the agent holds now.
    pub fn sample(&self) {
        mtcp::metrics::sample_bytes();
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let (n, kept) = {
            let conns = inner.conns.lock().unwrap_or_else(|p| p.into_inner());
            let kept: u64 = conns
                .values()
                .map(|e| e.status.lock().unwrap_or_else(|p| p.into_inner()).retained)
                .sum();
            (conns.len(), kept)
        };
        let moving = inner.moving.load(Ordering::Relaxed).min(n);
        gauge!(CONNECTIONS, "state" => "live").set((n - moving) as f64);
        gauge!(CONNECTIONS, "state" => "moving").set(moving as f64);
        gauge!(RETENTION_BYTES).set(kept as f64);
    }
}

/// Counts a connection as moving until dropped.
pub(crate) struct Moving<'a>(&'a AgentInner);

impl<'a> Moving<'a> {
    pub(crate) fn new(inner: &'a AgentInner) -> Self {
        inner.moving.fetch_add(1, Ordering::Relaxed);
        Moving(inner)
    }
}

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        self.0.moving.fetch_sub(1, Ordering::Relaxed);
    }
}
