//! `mtcp`: run servers and agents of a Migratory TCP cluster, move connections, and show it
//! working (`demo`, `bench`).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use mtcp::Cluster;
use mtcp_agent::admin::{Request, Response};
use mtcp_cli::process::{huge_heap, raise_open_files_limit, tune_allocator, Interrupted};
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
    Server(mtcp_cli::server::ServerArgs),
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
    /// Kernel fast path: hand each client connection itself to its server instead of relaying
    /// its bytes (servers on this host; lazy clusters). The socket is passed to the server
    /// (SCM_RIGHTS; one uid, or root); a server that does not take it so needs TCP_REPAIR (root).
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

fn main() {
    tune_allocator();
    let cli = parse_cli();
    if matches!(cli.cmd, Cmd::Server(_)) {
        huge_heap();
    }
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

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Server(a) => mtcp_cli::server::run(a).await,
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
        tracing::warn!("--fast-path without root: connections go to servers on this host as sockets (decision 56); one whose server does not take them that way (another host, --no-local-handoff) needs TCP_REPAIR and a fence (CAP_NET_ADMIN) and is reset");
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
