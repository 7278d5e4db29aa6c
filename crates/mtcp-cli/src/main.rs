//! `mtcp`: run servers and agents of a Migratory TCP cluster, move connections, and show it
//! working (`demo`, `bench`).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use mtcp::{Cluster, Limits, Server};
use mtcp_agent::admin::{Request, Response};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "mtcp",
    version,
    about = "Migratory TCP: live TCP connections that move between servers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one server of a cluster with an application.
    Server(ServerArgs),
    /// Run the client-side agent (forward mode: listen locally, relay to the service).
    Agent(AgentArgs),
    /// Move a connection (or all) of an agent to another server.
    Migrate(MigrateArgs),
    /// Move every connection off a server (before maintenance); returns when none is left.
    Drain(DrainArgs),
    /// Show an agent's connections.
    Status(StatusArgs),
    /// Make a cluster CA and a TLS certificate for each server of a cluster file.
    Cert(mtcp_cli::cert::CertArgs),
    /// Live demo on loopback: three servers, an agent, a download that moves twice.
    Demo(mtcp_cli::demo::DemoArgs),
    /// Benchmarks: throughput vs direct TCP, migration latency.
    Bench(mtcp_bench::bench::BenchArgs),
    /// Seeded randomized fault test: runs of checked requests while servers are drained,
    /// migrated away from, killed and stopped.
    Chaos(mtcp_bench::chaos::ChaosArgs),
    /// Network lab (root): namespaces for a client, a router and servers, with delayed, lossy,
    /// rate-limited or blackholed links.
    Lab(mtcp_cli::lab::LabArgs),
}

#[derive(Args)]
struct ServerArgs {
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
    /// The application and its options: a subcommand from `mtcp_cli::apps::registry()`.
    #[arg(skip)]
    app: Option<(String, clap::ArgMatches)>,
}

#[derive(Args)]
struct AgentArgs {
    /// Servers of the service (data addresses), tried in order for new connections.
    #[arg(long, value_delimiter = ',', required = true)]
    connect: Vec<String>,
    /// Where client programs connect.
    #[arg(long)]
    listen: String,
    /// Admin endpoint for `mtcp status` / `mtcp migrate`: a Unix socket path (anything with a
    /// `/`, e.g. `./agent.sock`; mode 0600, only this user and root may use it), or a TCP
    /// address, which needs --admin-token-file (or --admin-token).
    #[arg(long)]
    admin: Option<String>,
    /// The cluster CA's certificate (`mtcp cert` writes it as `ca.crt`): sessions use TLS 1.3
    /// and each server must show a certificate from this CA naming the address dialled. For
    /// clusters whose file has `[tls]`.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    #[command(flatten)]
    token: TokenArgs,
    /// Moves a second the admin endpoint accepts (bursts of twice as many); beyond it a
    /// request is refused with "rate limited".
    #[arg(long, default_value_t = mtcp_agent::admin::DEFAULT_MOVES_PER_SEC)]
    admin_moves_per_sec: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). Anyone who reaches
    /// ADDR can read them: bind it to loopback or a management network.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Most upstream bytes retained per connection (MiB) before the agent stops reading.
    #[arg(long, default_value_t = 64)]
    max_retained_mib: u64,
    /// Intercept connections to the --service addresses with an nftables table of the agent's
    /// own in this network namespace (root); removed on exit, replaced if left by a crash.
    #[arg(long, requires = "service")]
    transparent: bool,
    /// Kernel fast path: hand each client connection itself to its server with TCP_REPAIR
    /// instead of relaying its bytes (root; servers on this host; lazy clusters).
    #[arg(long, conflicts_with = "transparent")]
    fast_path: bool,
    /// Transparent mode: the service addresses client programs connect to (IPv4).
    #[arg(long, value_delimiter = ',')]
    service: Vec<std::net::SocketAddrV4>,
    /// Throughput-floor policy: move a connection whose session delivers under this many
    /// Mbit/s for --floor-window-ms while its server has data waiting (time spent waiting on
    /// the client program does not count).
    #[arg(long)]
    floor_mbit: Option<f64>,
    /// Throughput-floor window, ms [default: 2000].
    #[arg(long, requires = "floor_mbit")]
    floor_window_ms: Option<u64>,
    /// RTT policy: move to a server whose RTT is lower than the current one's by more than
    /// this many ms for --rtt-hold-ms (the agent probes every server).
    #[arg(long)]
    rtt_margin_ms: Option<f64>,
    /// RTT policy: how long the other server must stay better, ms [default: 3000].
    #[arg(long, requires = "rtt_margin_ms")]
    rtt_hold_ms: Option<u64>,
    /// RTT policy: probe each server this often, ms (at least 1000) [default: 1000].
    #[arg(long, requires = "rtt_margin_ms")]
    probe_every_ms: Option<u64>,
}

#[derive(Args)]
struct MigrateArgs {
    /// The agent's admin address (a Unix socket path or a TCP address).
    #[arg(long)]
    agent: String,
    #[command(flatten)]
    token: TokenArgs,
    /// Every connection.
    #[arg(long, conflicts_with = "conn", required_unless_present = "conn")]
    all: bool,
    /// One connection, by cid (see `mtcp status`).
    #[arg(long)]
    conn: Option<String>,
    /// Target server id (default: the agent's choice).
    #[arg(long)]
    to: Option<String>,
}

#[derive(Args)]
struct DrainArgs {
    #[arg(long)]
    cluster: PathBuf,
    #[arg(long)]
    id: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Args)]
struct StatusArgs {
    /// The agent's admin address (a Unix socket path or a TCP address).
    #[arg(long)]
    agent: String,
    #[command(flatten)]
    token: TokenArgs,
    #[arg(long)]
    json: bool,
}

/// The agent's admin token, for a TCP admin endpoint.
#[derive(Args)]
struct TokenArgs {
    /// File whose first line is the agent's admin token (mode 0600; at least 16 characters).
    #[arg(long, conflicts_with = "admin_token")]
    admin_token_file: Option<std::path::PathBuf>,
    /// The admin token itself (visible to other users in the process list: prefer
    /// --admin-token-file).
    #[arg(long)]
    admin_token: Option<String>,
}

impl TokenArgs {
    fn token(&self) -> Result<Option<String>> {
        if let Some(p) = &self.admin_token_file {
            return Ok(Some(
                mtcp_agent::admin::read_token_file(p).map_err(|e| anyhow!(e))?,
            ));
        }
        if let Some(t) = &self.admin_token {
            mtcp_agent::admin::check_token(t).map_err(|e| anyhow!("--admin-token: {e}"))?;
            return Ok(Some(t.clone()));
        }
        Ok(None)
    }
}

/// Big, short-lived buffers (output chunks, frames) would otherwise go back to the kernel and be
/// faulted in again on every use: keep them in the heap.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc's allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() {
    tune_allocator();
    let cli = parse_cli();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if matches!(cli.cmd, Cmd::Agent(_) | Cmd::Server(_)) {
        raise_open_files_limit();
    }
    // The agent only moves bytes between sockets: one thread does it with fewer wake-ups
    // across cores, leaving the other core to the client program and the server.
    let rt = match cli.cmd {
        Cmd::Agent(_) | Cmd::Server(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
    .expect("tokio runtime");
    let r = rt.block_on(run_interruptible(cli));
    // Tasks still running (a benchmark's helpers) are dropped with the runtime, so that what
    // they started is cleaned up too.
    rt.shutdown_timeout(Duration::from_secs(10));
    match r {
        Ok(()) => {}
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("mtcp: {e}");
            std::process::exit(130);
        }
        Err(e) => {
            eprintln!("mtcp: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// A demo, benchmark or chaos run ended by SIGINT or SIGTERM.
#[derive(Debug)]
struct Interrupted(&'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted by {}; the processes, clusters and files it started were cleaned up",
            self.0
        )
    }
}

impl std::error::Error for Interrupted {}

/// [`run`]; a command that starts clusters of its own (demo, bench, chaos) is dropped on SIGINT
/// or SIGTERM instead of dying with them running: dropping it stops every process, PostgreSQL
/// cluster and nftables table it started. Servers and agents handle the signals themselves.
async fn run_interruptible(cli: Cli) -> Result<()> {
    if !matches!(cli.cmd, Cmd::Demo(_) | Cmd::Bench(_) | Cmd::Chaos(_)) {
        return run(cli).await;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = run(cli) => r,
        _ = tokio::signal::ctrl_c() => Err(Interrupted("SIGINT").into()),
        _ = term.recv() => Err(Interrupted("SIGTERM").into()),
    }
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

/// Servers and agents hold a descriptor or more per connection: the soft limit on open files is
/// raised to the hard one at start (as far as the process may), and the result logged.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(
            "cannot read the open files limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        tracing::info!(limit = lim.rlim_cur, "open files limit");
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        tracing::warn!(
            limit = old,
            "cannot raise the open files limit to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    } else {
        tracing::info!(from = old, to = lim.rlim_cur, "open files limit raised");
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Server(a) => server(a).await,
        Cmd::Agent(a) => agent(a).await,
        Cmd::Migrate(a) => migrate(a).await,
        Cmd::Drain(a) => drain(a).await,
        Cmd::Status(a) => status(a).await,
        Cmd::Cert(a) => mtcp_cli::cert::run(&a),
        Cmd::Demo(a) => mtcp_cli::demo::run(a).await,
        Cmd::Bench(a) => mtcp_bench::bench::run(a).await,
        Cmd::Chaos(a) => mtcp_bench::chaos::run(a).await,
        Cmd::Lab(a) => mtcp_cli::lab::run(a).await,
    }
}

/// The command line, with `mtcp server`'s application subcommands taken from the registry.
fn parse_cli() -> Cli {
    let cmd = Cli::command().mut_subcommand("server", |s| {
        mtcp_cli::apps::registry()
            .iter()
            .fold(s.subcommand_required(true), |s, e| {
                s.subcommand((e.command)())
            })
    });
    let matches = cmd.get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Cmd::Server(a), Some(("server", m))) = (&mut cli.cmd, matches.subcommand()) {
        a.app = m.subcommand().map(|(n, m)| (n.to_string(), m.clone()));
    }
    cli
}

async fn server(a: ServerArgs) -> Result<()> {
    let cluster = Cluster::load(&a.cluster)?;
    let Some((name, matches)) = a.app.clone() else {
        bail!("mtcp server needs an application subcommand");
    };
    let ctx = mtcp_cli::apps::ServerContext {
        id: a.id.clone(),
        nondeterministic: a.nondeterministic,
    };
    // Before anything is counted.
    let exporter = a
        .metrics
        .as_ref()
        .map(|_| mtcp_cli::metrics::Exporter::install())
        .transpose()?;
    let app = mtcp_cli::apps::build(&name, matches, ctx).await?;
    let limits = Limits {
        dead_session: Duration::from_secs(a.dead_session_secs),
        lock_timeout: Duration::from_secs(a.lock_timeout_secs),
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

async fn agent(a: AgentArgs) -> Result<()> {
    let policy = agent_policy(&a)?;
    // Before anything is counted.
    let exporter = a
        .metrics
        .as_ref()
        .map(|_| mtcp_cli::metrics::Exporter::install())
        .transpose()?;
    let cfg = mtcp_agent::AgentConfig {
        connect: a.connect,
        max_retained: a.max_retained_mib << 20,
        transparent: a.transparent,
        policy,
        fast_path: a.fast_path,
        tls: a
            .tls_ca
            .as_deref()
            .map(mtcp::tls::ClientTls::from_ca_file)
            .transpose()?,
        ..Default::default()
    };
    // SAFETY: geteuid has no preconditions.
    if a.fast_path && unsafe { libc::geteuid() } != 0 {
        bail!("--fast-path needs root (TCP_REPAIR needs CAP_NET_ADMIN, and the flow is fenced with nftables)");
    }
    let l = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    // Dropped on every way out of this function: the table goes with the agent.
    let _interception = if a.transparent {
        let local = l.local_addr()?;
        if !(local.ip().is_loopback() || local.ip().is_unspecified()) {
            bail!("--transparent: --listen must be a loopback or wildcard address (nftables redirects to the local host), not {local}");
        }
        Some(mtcp_agent::transparent::Interception::install(
            local.port(),
            &a.service,
        )?)
    } else {
        None
    };
    let agent = mtcp_agent::Agent::new(cfg);
    if let (Some(e), Some(addr)) = (exporter, &a.metrics) {
        let sampler = agent.metrics();
        sampler.describe();
        e.serve(addr, move || sampler.sample()).await?;
    }
    if let Some(ad) = &a.admin {
        if a.admin_moves_per_sec == 0 {
            bail!("--admin-moves-per-sec must be at least 1");
        }
        let acfg = mtcp_agent::admin::AdminConfig {
            token: a.token.token()?,
            moves_per_sec: a.admin_moves_per_sec,
        };
        let ep = mtcp_agent::admin::Endpoint::bind(ad, &acfg)
            .await
            .map_err(|e| anyhow!(e))?;
        tokio::spawn(mtcp_agent::admin::serve(agent.clone(), ep, acfg));
    } else if a.token.token()?.is_some() {
        bail!("--admin-token(-file) without --admin");
    }
    let _trimmer = mtcp::memory::spawn_trimmer();
    tracing::info!(listen = %a.listen, admin = ?a.admin, "agent ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = agent.serve(l) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // The fast path's fence table goes with the agent.
    agent.close();
    Ok(())
}

/// The agent's trigger policies from its flags.
fn agent_policy(a: &AgentArgs) -> Result<mtcp_agent::PolicyConfig> {
    use mtcp_agent::policy::MIN_PROBE_EVERY;
    let mut p = mtcp_agent::PolicyConfig::default();
    if let Some(m) = a.floor_mbit {
        if !(m.is_finite() && m > 0.0) {
            bail!("--floor-mbit must be positive, not {m}");
        }
        let window = a.floor_window_ms.unwrap_or(2000);
        if window < 100 {
            bail!("--floor-window-ms must be at least 100, not {window}");
        }
        p.floor = Some(mtcp_proto::policy::FloorConfig {
            floor_bytes_per_s: (m * 125_000.0) as u64,
            window: Duration::from_millis(window),
        });
    }
    if let Some(m) = a.rtt_margin_ms {
        if !(m.is_finite() && m >= 0.0) {
            bail!("--rtt-margin-ms must not be negative, not {m}");
        }
        let every = Duration::from_millis(a.probe_every_ms.unwrap_or(1000));
        if every < MIN_PROBE_EVERY {
            bail!(
                "--probe-every-ms must be at least {}",
                MIN_PROBE_EVERY.as_millis()
            );
        }
        p.rtt = Some(mtcp_agent::RttPolicyConfig::new(
            Duration::from_secs_f64(m / 1000.0),
            Duration::from_millis(a.rtt_hold_ms.unwrap_or(3000)),
            every,
        ));
    }
    if !p.is_off() {
        tracing::info!(floor = ?p.floor, rtt = ?p.rtt, "trigger policies");
    }
    Ok(p)
}

async fn migrate(a: MigrateArgs) -> Result<()> {
    let req = Request::Migrate {
        conn: if a.all { None } else { a.conn.clone() },
        to: a.to,
    };
    let token = a.token.token()?;
    match mtcp_agent::admin::request_with(&a.agent, token.as_deref(), &req)
        .await
        .map_err(|e| anyhow!(e))?
    {
        Response::Migrated { results } => {
            if results.is_empty() {
                bail!("no matching connection at agent {}", a.agent);
            }
            let mut failed = 0;
            for r in &results {
                if r.ok {
                    println!("{} -> {}", r.cid, r.detail);
                } else {
                    failed += 1;
                    println!("{} FAILED: {}", r.cid, r.detail);
                }
            }
            if failed > 0 {
                bail!("{failed} of {} migrations failed", results.len());
            }
            Ok(())
        }
        Response::Error { message } => bail!("agent: {message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

async fn drain(a: DrainArgs) -> Result<()> {
    let cluster = Cluster::load(&a.cluster)?;
    let me = cluster
        .require(&a.id, &a.cluster.display().to_string())?
        .clone();
    let t0 = Instant::now();
    eprintln!("draining {} ...", a.id);
    let tls = cluster
        .tls
        .as_ref()
        .map(|t| mtcp::tls::ClientTls::from_ca_file(&t.ca))
        .transpose()?;
    let r = mtcp_harness::local::drain_server_report(
        &me.admin,
        &cluster.key,
        tls.as_ref(),
        &a.id,
        Duration::from_secs(a.timeout),
    )
    .await?;
    println!(
        "{} drained in {:?}: {} connection(s) moved, {} ended there meanwhile, {} whose agent is gone kept until the dead-session bound",
        a.id,
        t0.elapsed(),
        r.moved,
        r.ended,
        r.kept_for_dead_agent
    );
    if r.still_moving > 0 {
        println!(
            "{} connection(s) the agent is moving elsewhere still have their state here (eager mode: a destination may have taken them from a backup's replica; this copy goes after the dead-session bound)",
            r.still_moving
        );
    }
    Ok(())
}

async fn status(a: StatusArgs) -> Result<()> {
    let token = a.token.token()?;
    match mtcp_agent::admin::request_with(&a.agent, token.as_deref(), &Request::Status)
        .await
        .map_err(|e| anyhow!(e))?
    {
        Response::Status { connections } => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&connections)?);
            } else {
                println!(
                    "{:<34} {:<8} {:>5} {:>10} {:>14} {:>14}  state",
                    "cid", "server", "epoch", "migrations", "bytes up", "bytes down"
                );
                for c in connections {
                    println!(
                        "{:<34} {:<8} {:>5} {:>10} {:>14} {:>14}  {}",
                        c.cid,
                        c.server,
                        c.epoch,
                        c.migrations,
                        c.bytes_up,
                        c.bytes_down,
                        if c.fast_path {
                            format!("{} (fast path: bytes at the last snapshot)", c.state)
                        } else {
                            c.state.clone()
                        }
                    );
                }
            }
            Ok(())
        }
        Response::Error { message } => bail!("agent: {message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}
