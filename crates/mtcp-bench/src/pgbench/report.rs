//! The report of `mtcp bench pg`: per configuration tps, latencies and CPU per transaction, and
//! the timings of moves.

use super::*;

#[derive(Serialize, Debug)]
pub struct PgReport {
    /// pgbench's `-M`: simple, extended or prepared.
    pub protocol: String,
    pub scale: u32,
    pub clients: u32,
    pub threads: u32,
    pub seconds: u64,
    pub rounds: u32,
    /// The throwaway cluster runs with `fsync = off` (commits write WAL but never wait for
    /// the disk), so the front-end's costs are not hidden behind flushes.
    pub fsync: bool,
    pub configs: Vec<ConfigReport>,
    /// `SELECT 1` round trip over an open session, µs (median of 200).
    pub select1_direct_us_p50: u64,
    /// Through the agent-2pc-on cluster (absent when it was not among the configurations).
    #[serde(flatten)]
    pub latency: Option<Latency>,
    /// Every pgbench run had 0 failed transactions and 0 aborted clients, every move
    /// succeeded and every check held.
    pub clean: bool,
}

/// Round trips and moves of one session through the agent-2pc-on cluster, idle.
#[derive(Serialize, Debug)]
pub struct Latency {
    pub select1_agent_us_p50: u64,
    pub idle_moves: MoveLatency,
    pub in_transaction_moves: MoveLatency,
    /// Per-phase timings of the destination front-end while the measured sessions moved, from
    /// its debug log.
    pub front_end_phases: Phases,
    /// The in-transaction moves' account balance came out right.
    pub balance_ok: bool,
}

#[derive(Serialize, Debug, Clone)]
pub struct ConfigReport {
    pub name: &'static str,
    /// Each round's tps (without initial connection time), in round order.
    pub tps: Vec<f64>,
    pub median_tps: f64,
    /// `median_tps` / direct's `median_tps` in this run.
    pub ratio: f64,
    /// Each round's tps / direct's tps of the same round, and their median.
    pub round_ratios: Vec<f64>,
    pub ratio_median_of_rounds: f64,
    pub transactions: u64,
    pub failed_transactions: u64,
    pub aborted_clients: u64,
    /// CPU time per transaction, by process, over the timed runs.
    pub cpu_us_per_txn: CpuPerTxn,
    /// Average latency of each statement of the script over the rounds (pgbench `-r`), ms.
    pub statement_ms: Vec<(String, f64)>,
    /// Share of the machine's CPU time during the timed runs that none of the processes above
    /// used (other programs on the host, this bench's own process, the idle cluster), %.
    pub other_cpu_pct: f64,
    /// Connections moved during the runs (the moving configuration only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moves: Option<MoveStats>,
}

/// CPU µs (user + system) per transaction, by process (`None`: not on this path).
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct CpuPerTxn {
    pub pgbench: f64,
    /// The postmaster and every backend (also those that exited during the run).
    pub postgres: f64,
    pub pgbouncer: Option<f64>,
    pub agent: Option<f64>,
    /// The three `mtcp server … pgfront` processes together.
    pub front_ends: Option<f64>,
    pub total: f64,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct MoveStats {
    /// `migrate --all` requests sent.
    pub requests: u64,
    /// Connections moved.
    pub moved: u64,
    pub failed: u64,
    /// Connections that ended before they could move (pgbench closing them at the end of a
    /// run): not failed moves.
    pub ended: u64,
    /// Requests that found no connection to move (between pgbench's connections).
    pub empty: u64,
    /// Requests the agent did not answer properly.
    pub errors: u64,
    /// Request to answer of a `migrate --all` (all the connections) under load, µs.
    pub request_us_p50: u64,
    pub request_us_p99: u64,
    /// Each connection's move inside the agent: trigger to RESUMED, and to the first byte from
    /// the new server (the answer to the statement the client sent meanwhile), µs.
    pub seen_at_agent: u64,
    pub resumed_us_p50: u64,
    pub resumed_us_p99: u64,
    pub resumed_us_max: u64,
    pub first_byte_us_p50: u64,
    pub first_byte_us_p99: u64,
    pub first_byte_us_max: u64,
    /// Connections the agent gave up, with why (`aborted: …`).
    pub aborted_at_agent: Vec<String>,
    /// The first few failures.
    pub failures: Vec<String>,
}

/// What a moving configuration's rounds gathered, before the percentiles.
#[derive(Default)]
pub(super) struct MoveTally {
    pub(super) stats: MoveStats,
    pub(super) request_us: Vec<u64>,
    pub(super) resumed_us: Vec<u64>,
    pub(super) first_byte_us: Vec<u64>,
}

impl MoveTally {
    pub(super) fn finish(mut self) -> MoveStats {
        let mut m = self.stats;
        self.request_us.sort_unstable();
        self.resumed_us.sort_unstable();
        self.first_byte_us.sort_unstable();
        m.request_us_p50 = pct(&self.request_us, 0.5);
        m.request_us_p99 = pct(&self.request_us, 0.99);
        m.seen_at_agent = self.resumed_us.len() as u64;
        m.resumed_us_p50 = pct(&self.resumed_us, 0.5);
        m.resumed_us_p99 = pct(&self.resumed_us, 0.99);
        m.resumed_us_max = self.resumed_us.last().copied().unwrap_or(0);
        m.first_byte_us_p50 = pct(&self.first_byte_us, 0.5);
        m.first_byte_us_p99 = pct(&self.first_byte_us, 0.99);
        m.first_byte_us_max = self.first_byte_us.last().copied().unwrap_or(0);
        m
    }
}

#[derive(Serialize, Debug, Default)]
pub struct MoveLatency {
    pub moves: usize,
    /// The agent's admin request (`migrate` of the session) to its answer (after RESUMED), µs.
    pub move_us_p50: u64,
    pub move_us_p99: u64,
    pub move_us_max: u64,
    /// The same, plus the first query's round trip after it, µs.
    pub move_query_us_p50: u64,
    pub move_query_us_p99: u64,
    pub move_query_us_max: u64,
    /// Inside the agent: trigger to RESUMED, µs.
    pub resumed_us_p50: u64,
    pub resumed_us_p99: u64,
    /// CPU per move, with the query after it (and, inside a transaction, its statements): µs of
    /// PostgreSQL, the agent and the front-ends, over the whole loop.
    pub cpu_us_per_move: CpuPerMove,
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct CpuPerMove {
    pub postgres: f64,
    pub agent: f64,
    pub front_ends: f64,
}

impl CpuPerMove {
    /// From two [`Probe::sample`]s around `moves` moves, less `quiet`: the CPU the same number
    /// of rounds took without moves.
    pub(super) fn between(
        before: [f64; 5],
        after: [f64; 5],
        moves: u32,
        quiet: CpuPerMove,
    ) -> Self {
        let per = |i: usize| (after[i] - before[i]).max(0.0) * 1e6 / f64::from(moves.max(1));
        CpuPerMove {
            postgres: per(1) - quiet.postgres,
            agent: per(3) - quiet.agent,
            front_ends: per(4) - quiet.front_ends,
        }
    }
}

#[derive(Serialize, Debug, Default)]
pub struct Phases {
    /// Restarts seen in the logs.
    pub restarts: usize,
    /// The destination's backend connection (TCP, startup, authentication), µs.
    pub connect_us_p50: u64,
    pub connect_us_p99: u64,
    /// Registering the new backend in the fence registry and terminating the older epochs'
    /// backends (waiting until they are gone), µs.
    pub register_and_fence_us_p50: u64,
    pub register_and_fence_us_p99: u64,
    /// Restoring the session's settings and prepared statements, with the check for a
    /// transaction an origin left prepared, µs.
    pub restore_us_p50: u64,
    pub restore_us_p99: u64,
    /// Restarts that found an origin backend still alive to terminate.
    pub fenced: u64,
    /// From the runtime's "connection migrated here" (RESUMED sent) to the front-end's
    /// "session restarting here" (backend connected, fenced, restored), µs.
    pub resumed_to_ready_us_p50: u64,
    pub resumed_to_ready_us_p99: u64,
}
