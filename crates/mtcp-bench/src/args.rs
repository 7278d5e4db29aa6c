//! `mtcp bench`'s arguments: which benchmark and its knobs.

use clap::{Args, ValueEnum};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    pub which: Which,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Test file size in MiB (throughput).
    #[arg(long, default_value_t = 512)]
    pub size_mib: u64,
    /// Rounds: downloads per path (throughput, eager-cost, lab-throughput), drains (drain),
    /// pgbench runs per configuration (pg). Default 5; pg: 3.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Migrations to measure (migration).
    #[arg(long, default_value_t = 100)]
    pub migrations: u32,
    /// Pause between migrations in ms (migration).
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// The HTTP server's body bytes between snapshots (default: the server's own default).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Time the built-in client (XXH3 over every byte) instead of curl.
    #[arg(long)]
    pub builtin_client: bool,
    /// Kernel fast path (root). Throughput: also time a second agent with `--fast-path`.
    /// Migration, drain and scale: the agent uses the fast path instead of relaying.
    #[arg(long)]
    pub fast_path: bool,
    /// Migration: also trace every move in the agent, the destination and the origin and print
    /// where its time goes, with the loopback floor measured in the same run (relay moves).
    #[arg(long)]
    pub breakdown: bool,
    /// TLS (decision 45). Throughput: also time an agent of a second cluster with `[tls]`,
    /// in the same rotation as the plain agent. Migration: measure a plain cluster, then one
    /// with TLS, and print both and the ratio.
    #[arg(long)]
    pub tls: bool,
    /// The reading client's rate in MiB/s (drain).
    #[arg(long, default_value_t = 4)]
    pub rate_mib: u64,
    /// Server kills (recovery) or stops (hung) to measure.
    #[arg(long, default_value_t = 20)]
    pub faults: u32,
    /// How long idle connections are left alone (soak), seconds.
    #[arg(long, default_value_t = 60)]
    pub soak_secs: u64,
    /// Idle keep-alive connections (soak).
    #[arg(long, default_value_t = 8)]
    pub soak_conns: u32,
    /// State-transfer mode of the cluster (throughput, migration, lab benchmarks).
    #[arg(long, default_value = "lazy", value_parser = ["lazy", "eager"])]
    pub mode: String,
    /// Round-trip times the client's link adds, ms (lab-rtt).
    #[arg(long, value_delimiter = ',', default_value = "0,10,40")]
    pub rtts: Vec<u32>,
    /// Packets every server's link drops each way, percent (lab-rtt): moves on a lossy path.
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// Rate of every server's link, Mbit/s (lab-throughput, degrade).
    #[arg(long, default_value_t = 1000.0)]
    pub link_mbit: f64,
    /// What the serving server's link degrades to, Mbit/s (degrade).
    #[arg(long, default_value_t = 5.0)]
    pub degrade_mbit: f64,
    /// Where the degrade plot goes (SVG).
    #[arg(long, default_value = "degrade.svg")]
    pub out: std::path::PathBuf,
    /// Connections to open (scale).
    #[arg(long, default_value_t = 1000)]
    pub conns: u32,
    /// The `mtcp` binary the cluster's processes run (scale, pg, lab-rtt; default: this one), e.g. an
    /// older build to compare against.
    #[arg(long)]
    pub exe: Option<std::path::PathBuf>,
    /// Keep the front-ends' and agents' logs after a clean run too (pg; they are always kept
    /// after a run that was not clean).
    #[arg(long)]
    pub keep_logs: bool,
    #[command(flatten)]
    pub pg: PgArgs,
}

impl BenchArgs {
    /// `--rounds`, or the benchmark's default (pg: 3, the others: 5).
    pub fn rounds(&self) -> u32 {
        self.rounds.unwrap_or(match self.which {
            Which::Pg => 3,
            _ => 5,
        })
    }
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Which {
    /// Direct TCP vs through the agent (lazy mode), same run; also a bare relay, and socat and
    /// HAProxy (TCP mode, splice) when installed.
    Throughput,
    /// Live migrations of one transfer: trigger to first resumed byte.
    Migration,
    /// Eager mode: `kill -9` of the serving server to the first resumed byte at the agent.
    Recovery,
    /// Eager mode: `SIGSTOP` of the serving server to the first resumed byte (detection time).
    Hung,
    /// Eager mode: idle keep-alive connections left alone; counts false migrations.
    Soak,
    /// Throughput through the agent: lazy vs eager with snapshots every 64 KiB and 1 MiB.
    EagerCost,
    /// Lab (root): migration latency against the client's RTT (--rtts).
    LabRtt,
    /// Lab (root): transparent agent vs direct TCP over a rate-limited link (--link-mbit).
    LabThroughput,
    /// Lab (root): a server's link degrades; the floor policy moves the connection (SVG plot).
    Degrade,
    /// `mtcp drain` of the serving server while a slow client reads: request to no connection
    /// left (--rounds drains, reader at --rate-mib).
    Drain,
    /// Many idle keep-alive connections through one agent (--conns, 64 openers): connection
    /// rate, memory per connection of every process, a drain of them all, one more GET each.
    Scale,
    /// pgbench TPC-B direct, through PgBouncer and through the agent and the PostgreSQL
    /// front-end (two-phase commit off, on, on with moves every 200 ms); move latency.
    Pg,
}

/// `mtcp bench pg`'s own options (the shared `--rounds` and `--json` are in [`BenchArgs`]).
#[derive(Args, Debug, Clone)]
pub struct PgArgs {
    /// Length of each pgbench run, seconds (pg).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// pgbench clients, `-c` (pg); threads `-j` are min(2, clients).
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    /// pgbench scale factor, `-s` (pg).
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Moves of one session measured, idle and inside a transaction each (pg).
    #[arg(long, default_value_t = 50)]
    pub moves: u32,
    /// Interval of `migrate --all` during the moving configuration, ms (pg).
    #[arg(long, default_value_t = 200)]
    pub move_every_ms: u64,
    /// Configurations to time, comma-separated (pg): direct, pgbouncer, agent-2pc-off,
    /// agent-2pc-on, agent-2pc-on-moves, fastpath-2pc-off, fastpath-2pc-off-moves. `direct`
    /// (the baseline) is always
    /// timed; the move latencies are measured only with agent-2pc-on. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    /// pgbench's query protocol, `-M` (pg).
    #[arg(long, default_value = "simple", value_parser = ["simple", "extended", "prepared"])]
    pub protocol: String,
}
