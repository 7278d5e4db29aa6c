//! What servers and agents count for their Prometheus endpoint (`--metrics ADDR`, off by
//! default; served by `mtcp_cli::metrics`). Events (moves, refusals, hints, takeovers and how
//! long they took) go through the `metrics` facade as they happen, which does nothing unless the
//! process installed a recorder. Levels (connections by state, bytes kept for restarts,
//! replicas) are read when scraped, and the byte totals are two process-wide atomics: the data
//! path pays one relaxed add per read or write, nothing more. Every name is listed in
//! `docs/operations.md`.

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use mtcp_proto::wire::{HintReason, RefuseCode};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Connections by state (gauge, label `state`).
pub const CONNECTIONS: &str = "mtcp_connections";
/// Sockets open on a server's data port by what they carry (gauge, label `state`).
pub const SESSIONS: &str = "mtcp_sessions";
/// The agent's moves (counter, labels `reason`, `outcome`).
pub const MOVES: &str = "mtcp_moves_total";
/// The agent's successful moves, trigger to RESUMED (histogram, seconds).
pub const MOVE_SECONDS: &str = "mtcp_move_seconds";
/// A server's takeovers of connections moved to it (counter, label `outcome`).
pub const TAKEOVERS: &str = "mtcp_takeovers_total";
/// A server's successful takeovers, MIGRATE received to RESUMED sent (histogram, seconds).
pub const TAKEOVER_SECONDS: &str = "mtcp_takeover_seconds";
/// Connections a server handed over to another (counter).
pub const HANDOVERS: &str = "mtcp_handovers_total";
/// HINTs a server sent (counter, label `reason`).
pub const HINTS: &str = "mtcp_hints_total";
/// Stream bytes relayed (counter, label `direction`: `up` client→server, `down` server→client).
pub const BYTES: &str = "mtcp_bytes_total";
/// Refusals, by `RefuseCode` (counter, label `code`): sent by a server, received by an agent.
pub const REFUSALS: &str = "mtcp_refusals_total";
/// Replicas of other servers' connections held (gauge).
pub const REPLICAS_HELD: &str = "mtcp_replicas_held";
/// Bytes those replicas are charged (gauge).
pub const REPLICA_BYTES: &str = "mtcp_replica_bytes";
/// Bytes kept only so that a connection can be restarted or replayed elsewhere (gauge).
pub const RETENTION_BYTES: &str = "mtcp_retention_bytes";

/// Heartbeats a server wrote (counter, label `on`: `session`, `watch`).
pub const HEARTBEATS: &str = "mtcp_heartbeats_total";
/// TCP handshakes started beside one not answered in time (counter; decision 71).
pub const CONNECT_HEDGES: &str = "mtcp_connect_hedges_total";
/// The agent's moves tried again whole after a round whose failures may pass (counter, one per
/// round after the first; decision 71).
pub const MOVE_ROUNDS: &str = "mtcp_move_rounds_total";

/// Buckets of both duration histograms, seconds: a move on loopback takes about a millisecond,
/// a takeover from a replica a few, one that waits out a `lock_state` section up to seconds.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static BYTES_UP: AtomicU64 = AtomicU64::new(0);
static BYTES_DOWN: AtomicU64 = AtomicU64::new(0);
static BEATS_SESSION: AtomicU64 = AtomicU64::new(0);
static BEATS_WATCH: AtomicU64 = AtomicU64::new(0);

/// A heartbeat went out on a session (`watch == false`) or a watch connection.
#[inline]
pub fn heartbeat_sent(watch: bool) {
    let c = if watch { &BEATS_WATCH } else { &BEATS_SESSION };
    c.fetch_add(1, Ordering::Relaxed);
}

/// `n` stream bytes went client→server through this process.
#[inline]
pub fn add_up(n: usize) {
    BYTES_UP.fetch_add(n as u64, Ordering::Relaxed);
}

/// `n` stream bytes went server→client through this process.
#[inline]
pub fn add_down(n: usize) {
    BYTES_DOWN.fetch_add(n as u64, Ordering::Relaxed);
}

/// Publishes the byte totals (called when scraped).
pub fn sample_bytes() {
    counter!(BYTES, "direction" => "up").absolute(BYTES_UP.load(Ordering::Relaxed));
    counter!(BYTES, "direction" => "down").absolute(BYTES_DOWN.load(Ordering::Relaxed));
    counter!(HEARTBEATS, "on" => "session").absolute(BEATS_SESSION.load(Ordering::Relaxed));
    counter!(HEARTBEATS, "on" => "watch").absolute(BEATS_WATCH.load(Ordering::Relaxed));
    counter!(CONNECT_HEDGES).absolute(crate::hedged::hedges());
}

/// A refusal with `code` was sent (server) or received (agent).
pub fn refused(code: RefuseCode) {
    counter!(REFUSALS, "code" => code.name()).increment(1);
}

/// The help text of every metric, and the label sets a scrape shows even before their first
/// event (zero counts are answers too: "no refusal yet" differs from "not counted").
pub fn describe() {
    describe_gauge!(
        CONNECTIONS,
        "Connections by state (server: live, closing, detached, ending, handing_over; agent: live, moving)"
    );
    describe_gauge!(
        SESSIONS,
        "Sockets open on the server's data port by what they carry (setup, connection, watch, probe)"
    );
    describe_counter!(
        MOVES,
        "Moves the agent made, by reason (what triggered them) and outcome (ok, failed, closed)"
    );
    describe_histogram!(
        MOVE_SECONDS,
        Unit::Seconds,
        "Agent: from a move's trigger to RESUMED from the new server (successful moves)"
    );
    describe_counter!(
        TAKEOVERS,
        "Connections moved to this server, by outcome (from_origin, from_replica, refused)"
    );
    describe_histogram!(
        TAKEOVER_SECONDS,
        Unit::Seconds,
        "Server: from MIGRATE received to RESUMED sent (successful takeovers)"
    );
    describe_counter!(
        HANDOVERS,
        "Connections this server handed over to another server"
    );
    describe_counter!(HINTS, "HINTs this server sent, by reason (drain, overload)");
    describe_counter!(
        HEARTBEATS,
        "Heartbeats this server wrote, on sessions (only where an agent waits) and watch connections"
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Stream bytes relayed, by direction (up: client to server, down: server to client)"
    );
    describe_counter!(
        REFUSALS,
        "Refusals by code: sent to agents (server), received from servers (agent)"
    );
    describe_gauge!(
        REPLICAS_HELD,
        "Eager mode: replicas of other servers' connections held here"
    );
    describe_gauge!(
        REPLICA_BYTES,
        Unit::Bytes,
        "Eager mode: bytes the replicas held here are charged"
    );
    describe_gauge!(
        RETENTION_BYTES,
        Unit::Bytes,
        "Bytes kept only to restart or replay connections (server: input and output logs and snapshots; agent: upstream not yet covered)"
    );
    describe_counter!(
        CONNECT_HEDGES,
        "TCP handshakes started beside one not answered within a few round trips (a lost SYN or SYN-ACK)"
    );
    describe_counter!(
        MOVE_ROUNDS,
        "Agent: moves tried again whole after every candidate failed for a reason that may pass"
    );
    counter!(MOVE_ROUNDS).increment(0);
    for c in RefuseCode::ALL {
        counter!(REFUSALS, "code" => c.name()).increment(0);
    }
    sample_bytes();
}

/// What a data-port socket carries, for [`SESSIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionKind {
    /// Before its first message.
    Setup,
    /// A connection's session (HELLO or MIGRATE).
    Connection,
    Watch,
    Probe,
}

const SESSION_KINDS: [(SessionKind, &str); 4] = [
    (SessionKind::Setup, "setup"),
    (SessionKind::Connection, "connection"),
    (SessionKind::Watch, "watch"),
    (SessionKind::Probe, "probe"),
];

static OPEN_SESSIONS: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

/// One open data-port socket, counted under its kind until dropped.
pub(crate) struct SessionGauge(SessionKind);

impl SessionGauge {
    pub(crate) fn new() -> Self {
        OPEN_SESSIONS[SessionKind::Setup as usize].fetch_add(1, Ordering::Relaxed);
        SessionGauge(SessionKind::Setup)
    }

    /// The socket turned out to carry `kind`.
    pub(crate) fn set(&mut self, kind: SessionKind) {
        OPEN_SESSIONS[self.0 as usize].fetch_sub(1, Ordering::Relaxed);
        OPEN_SESSIONS[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.0 = kind;
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        OPEN_SESSIONS[self.0 as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HINT `reason` was sent to one connection.
pub(crate) fn hinted(reason: HintReason) {
    counter!(HINTS, "reason" => reason.name()).increment(1);
}

/// A takeover ended: `Some(from_replica)` with its duration when it succeeded, `None` when it
/// was refused.
pub(crate) fn took_over(outcome: Option<(bool, std::time::Duration)>) {
    let label = match outcome {
        Some((false, _)) => "from_origin",
        Some((true, _)) => "from_replica",
        None => "refused",
    };
    counter!(TAKEOVERS, "outcome" => label).increment(1);
    if let Some((_, took)) = outcome {
        ::metrics::histogram!(TAKEOVER_SECONDS).record(took.as_secs_f64());
    }
}

/// Sets the gauge of open data-port sockets by what they carry.
pub(crate) fn sample_sessions() {
    for (kind, name) in SESSION_KINDS {
        let n = OPEN_SESSIONS[kind as usize].load(Ordering::Relaxed);
        gauge!(SESSIONS, "state" => name).set(n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_counted_under_one_kind_at_a_time() {
        let count = |k: SessionKind| OPEN_SESSIONS[k as usize].load(Ordering::Relaxed);
        // Other tests in this process open no data-port sockets of their own.
        let (setup, watch) = (count(SessionKind::Setup), count(SessionKind::Watch));
        let mut g = SessionGauge::new();
        assert_eq!(count(SessionKind::Setup), setup + 1);
        g.set(SessionKind::Watch);
        assert_eq!(count(SessionKind::Setup), setup);
        assert_eq!(count(SessionKind::Watch), watch + 1);
        drop(g);
        assert_eq!(count(SessionKind::Watch), watch);
    }
}
