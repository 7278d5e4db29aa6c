//! `mtcp server`: its options, and running one server of a cluster with an application (the
//! limits its flags set, the metrics endpoint, the memory trimmer).

use anyhow::{bail, Result};
use clap::Args;
use mtcp::{Cluster, Limits, Server};
use std::path::PathBuf;
use std::time::Duration;

/// `mtcp server`'s options.
#[derive(Args)]
pub struct ServerArgs {
    /// Cluster file (TOML).
    #[arg(long)]
    cluster: PathBuf,
    /// This server's id in the cluster file.
    #[arg(long)]
    id: String,
    /// Seconds a connection's state is kept after its agent went away without closing it.
    #[arg(long, default_value_t = 120)]
    dead_session_secs: u64,
    /// Output a relayed connection may have sent its agent without an acknowledgement, MiB;
    /// the application's writes wait beyond it (bounds what one client can make a server keep).
    /// Keep it above the queued output (4 MiB) plus the kernels' largest socket buffers
    /// (`tcp_wmem`, `tcp_rmem`): an agent whose client reads slowly is stopped by TCP's flow
    /// control first, and never mistaken for one that does not acknowledge.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_unacked_mib: u64,
    /// Seconds the application may wait on --max-unacked-mib with the agent attached but
    /// acknowledging nothing before the connection is aborted.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    ack_timeout_secs: u64,
    /// Seconds a relayed session may stay silent (its agent pings every second) before the
    /// server closes it.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..))]
    session_idle_secs: u64,
    /// Most sessions open on the data port at once; the newest over it is refused (default:
    /// the open-files limit less 1024, at most 32768).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: Option<u64>,
    /// Most migrations this server takes over at once (fetching a connection's state); a
    /// MIGRATE over it waits for one to end (up to the fetch bound), then is refused Busy and
    /// the agent tries another server.
    #[arg(long, default_value_t = mtcp_proto::bounds::MAX_TAKEOVERS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_takeovers: u64,
    /// Test hook: how long a MIGRATE over --max-takeovers waits for a slot, ms [default: the
    /// fetch bound, 3 s + --lock-timeout-secs].
    #[arg(long, hide = true)]
    takeover_wait_ms: Option<u64>,
    /// Most connections this server hands over at once as an origin (FETCHes it serves:
    /// freezing a connection and building its state record); one over it waits up to 2 s for
    /// one to end, then is refused Busy and the connection stays here.
    #[arg(long, default_value_t = mtcp_proto::bounds::MAX_HANDOVERS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_handovers: u64,
    /// Test hook: how long a FETCH over --max-handovers waits for a slot, ms [default: 2000].
    #[arg(long, hide = true)]
    handover_wait_ms: Option<u64>,
    /// Test hook: an origin holds each hand-over's slot this many ms before freezing the
    /// connection.
    #[arg(long, hide = true)]
    hold_handover_ms: Option<u64>,
    /// Most sessions open at once from one source address (default: --max-sessions).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions_per_source: Option<u64>,
    /// Fast path: no local hand-over of sockets (`SCM_RIGHTS`) to or from this server;
    /// connections then move with `TCP_REPAIR`, as across hosts.
    #[arg(long)]
    no_local_handoff: bool,
    /// Seconds a migration waits for a `lock_state` section to end before it is refused.
    #[arg(long, default_value_t = 10)]
    lock_timeout_secs: u64,
    /// Eager mode: memory for replicas of other servers' connections, MiB (pushes beyond it are
    /// refused, and those connections wait for room).
    #[arg(long, default_value_t = 256)]
    max_replica_mib: usize,
    /// Eager mode: a replica its origin has not refreshed for this long is forgotten (origins
    /// refresh theirs every third of it).
    #[arg(long, default_value_t = 600)]
    replica_ttl_secs: u64,
    /// Overload: with more live connections than this, the newest are hinted away (a few per
    /// second; the agents move them).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). Anyone who reaches
    /// ADDR can read them: bind it to loopback or a management network.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Test hook: cap each session socket's send rate at this many Mbit/s (SO_MAX_PACING_RATE;
    /// emulates a slow link on loopback).
    #[arg(long, hide = true)]
    throttle_mbit: Option<f64>,
    /// Test hook: answer RTT probes this many ms late (emulates a distant server).
    #[arg(long, hide = true)]
    probe_delay_ms: Option<u64>,
    /// Test hook: every peer-channel message waits this many ms before it is written (half a
    /// round trip between servers, emulated on loopback).
    #[arg(long, hide = true)]
    peer_delay_ms: Option<u64>,
    /// Test hook: this percentage of peer-channel messages waits another 200 ms (a lost
    /// segment's retransmission).
    #[arg(long, hide = true)]
    peer_loss_pct: Option<f64>,
    /// Test hook: a destination waits this many ms, silent, between a finished takeover and its
    /// RESUMED.
    #[arg(long, hide = true)]
    hold_resumed_ms: Option<u64>,
    /// Test hook: that hold ends as soon as the agent closes the MIGRATE's connection.
    #[arg(long, hide = true)]
    hold_resumed_until_left: bool,
    /// Test hook: that hold applies to this server's first takeover only.
    #[arg(long, hide = true)]
    hold_resumed_once: bool,
    /// Test hook: this server's pushes to its backups fail (its backups are cut off from it).
    #[arg(long, hide = true)]
    drop_pushes: bool,
    /// Test hook: a destination waits this many ms (answering WORKING) before a takeover.
    #[arg(long, hide = true)]
    delay_takeover_ms: Option<u64>,
    /// Test hook: this server's RELEASECLAIMs are dropped, as if lost.
    #[arg(long, hide = true)]
    drop_releases: bool,
    /// Test hook: the application scrambles its output with a key of this server's own (a
    /// deliberately non-deterministic application, for divergence tests).
    #[arg(long, hide = true)]
    nondeterministic: bool,
    /// The application and its options: a subcommand from `crate::apps::registry()`.
    #[arg(skip)]
    pub app: Option<(String, clap::ArgMatches)>,
}

/// `--max-sessions`, or what the open-files limit leaves room for: each session holds one
/// descriptor, and 1024 are kept for peer channels, files and the application.
fn max_sessions(flag: Option<u64>) -> usize {
    if let Some(n) = flag {
        return n as usize;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        4096
    };
    (cur.saturating_sub(1024) as usize).clamp(64, 32_768)
}

/// Runs the server until it is stopped.
pub async fn run(a: ServerArgs) -> Result<()> {
    let cluster = Cluster::load(&a.cluster)?;
    let Some((name, matches)) = a.app.clone() else {
        bail!("mtcp server needs an application subcommand");
    };
    let ctx = crate::apps::ServerContext {
        id: a.id.clone(),
        nondeterministic: a.nondeterministic,
    };
    // Before anything is counted.
    let exporter = a
        .metrics
        .as_ref()
        .map(|_| crate::metrics::Exporter::install())
        .transpose()?;
    let app = crate::apps::build(&name, matches, ctx).await?;
    let limits = Limits {
        dead_session: Duration::from_secs(a.dead_session_secs),
        lock_timeout: Duration::from_secs(a.lock_timeout_secs),
        local_handoff: !a.no_local_handoff,
        max_unacked: a.max_unacked_mib << 20,
        ack_timeout: Duration::from_secs(a.ack_timeout_secs),
        session_idle: Duration::from_secs(a.session_idle_secs),
        max_sessions: max_sessions(a.max_sessions),
        max_sessions_per_source: a
            .max_sessions_per_source
            .map_or(max_sessions(a.max_sessions), |n| n as usize),
        max_handovers: a.max_handovers as usize,
        handover_wait: a
            .handover_wait_ms
            .map_or(Duration::from_secs(2), Duration::from_millis),
        max_takeovers: a.max_takeovers as usize,
        // By default a FETCH's own bound: a slot frees within it.
        takeover_wait: a.takeover_wait_ms.map_or(
            Limits::default().fetch_timeout + Duration::from_secs(a.lock_timeout_secs),
            Duration::from_millis,
        ),
        max_replica_bytes: a.max_replica_mib << 20,
        replica_ttl: Duration::from_secs(a.replica_ttl_secs.max(3)),
        max_connections: a.max_connections.map(|n| n as usize),
        pacing_rate: match a.throttle_mbit {
            Some(m) if m.is_finite() && m > 0.0 => Some((m * 125_000.0) as u64),
            Some(m) => bail!("--throttle-mbit must be positive, not {m}"),
            None => None,
        },
        probe_delay: Duration::from_millis(a.probe_delay_ms.unwrap_or(0)),
        peer_delay: Duration::from_millis(a.peer_delay_ms.unwrap_or(0)),
        hold_resumed: Duration::from_millis(a.hold_resumed_ms.unwrap_or(0)),
        hold_resumed_until_left: a.hold_resumed_until_left,
        hold_resumed_once: a.hold_resumed_once,
        hold_handover: Duration::from_millis(a.hold_handover_ms.unwrap_or(0)),
        drop_pushes: a.drop_pushes,
        delay_takeover: Duration::from_millis(a.delay_takeover_ms.unwrap_or(0)),
        drop_releases: a.drop_releases,
        peer_loss: match a.peer_loss_pct {
            Some(p) if (0.0..=100.0).contains(&p) => p / 100.0,
            Some(p) => bail!("--peer-loss-pct must be within 0–100, not {p}"),
            None => 0.0,
        },
        ..Limits::default()
    };
    let server = Server::bind(cluster, &a.id, limits).await?;
    if let (Some(e), Some(addr)) = (exporter, &a.metrics) {
        let sampler = server.metrics();
        e.serve(addr, move || sampler.sample()).await?;
    }
    let _trimmer = mtcp::memory::spawn_trimmer();
    mtcp::app::run(server, app).await;
    Ok(())
}
