//! `mtcp bench pg`: pgbench TPC-B against one throwaway PostgreSQL — direct, through PgBouncer
//! (session mode) and through the agent and the PostgreSQL front-end (`pgfront`, two-phase
//! commit off, on, and on with every connection moved every 200 ms) — in rounds whose order
//! rotates, with each configuration's tps as a ratio to direct's in the same run; then the
//! latency of moving one session, idle and inside a transaction.
//!
//! Besides tps it reports what explains them: CPU time per transaction of every process on
//! each path (from `/proc`), the share of the machine's CPU that other programs took during the
//! runs (a run where it is large is not a measurement of this code), each statement's latency
//! (pgbench `-r`), the agent's timings of the moves made under load, and the destination
//! front-end's per-restart timings from its debug log.

use crate::bench::{median, pct, BenchArgs};
use crate::local::{strip_ansi, LocalCluster};
use crate::pglocal::{split, PgLocal, PgLocalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use mtcp_agent::admin::{self, Request, Response};
use mtcp_pgtmp::{PgBouncer, PgCluster, PgOptions};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// agent-2pc-on, agent-2pc-on-moves, fastpath-2pc-off. `direct` (the baseline) is always
    /// timed; the move latencies are measured only with agent-2pc-on. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
}

/// The database pgbench's tables are in.
const DB: &str = "bench";
/// The account row the in-transaction move updates.
const AID: i32 = 4242;
/// Pause between two measured moves.
const MOVE_PAUSE: Duration = Duration::from_millis(50);
/// Bound on one query or admin request.
const STEP_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Direct,
    Bouncer,
    Off,
    On,
    OnMoves,
    /// Two-phase commit off, the agent with `--fast-path` (root): the client's connection is
    /// served by the front-end itself, no relay in between.
    FastOff,
}

impl Config {
    const ALL: [Config; 6] = [
        Config::Direct,
        Config::Bouncer,
        Config::Off,
        Config::On,
        Config::OnMoves,
        Config::FastOff,
    ];

    /// The configurations `names` selects (all when empty), direct always first.
    fn selected(names: &[String]) -> Result<Vec<Config>> {
        for n in names {
            if !Config::ALL.iter().any(|c| c.name() == n) {
                let known: Vec<&str> = Config::ALL.iter().map(|c| c.name()).collect();
                bail!("unknown configuration {n:?} (known: {})", known.join(", "));
            }
        }
        Ok(Config::ALL
            .into_iter()
            .filter(|c| {
                *c == Config::Direct || names.is_empty() || names.iter().any(|n| n == c.name())
            })
            .collect())
    }

    fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::Bouncer => "pgbouncer",
            Config::Off => "agent-2pc-off",
            Config::On => "agent-2pc-on",
            Config::OnMoves => "agent-2pc-on-moves",
            Config::FastOff => "fastpath-2pc-off",
        }
    }
}

#[derive(Serialize, Debug)]
pub struct PgReport {
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

/// One pgbench run's summary.
#[derive(Debug, Default)]
struct Run {
    tps: f64,
    transactions: u64,
    failed: u64,
    aborted: u64,
    /// The error lines pgbench printed, if any.
    errors: Vec<String>,
    /// Average latency of each statement of the script (`-r`), ms, in script order.
    statements: Vec<(String, f64)>,
    /// CPU seconds used during the run: pgbench, PostgreSQL, PgBouncer, agent, front-ends.
    cpu: [f64; 5],
    /// CPU seconds the whole machine used during the run, and the CPU seconds it had.
    machine: (f64, f64),
}

pub async fn run(a: &BenchArgs, dir: &Path) -> Result<()> {
    let r = bench(a, dir).await;
    if let Err(e) = r {
        // The run directory goes when the bench returns; keep the front-ends' and agents' logs.
        let keep = std::env::temp_dir().join(format!("mtcp-bench-pg-logs-{}", std::process::id()));
        for name in ["2pc-off", "2pc-on", "fastpath"] {
            let to = keep.join(name);
            for f in std::fs::read_dir(dir.join(name))
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.path().extension().is_some_and(|x| x == "log")
                    && std::fs::create_dir_all(&to).is_ok()
                {
                    let _ = std::fs::copy(f.path(), to.join(f.file_name()));
                }
            }
        }
        if keep.exists() {
            return Err(e.context(format!(
                "the front-ends' and agents' logs are in {}",
                keep.display()
            )));
        }
        return Err(e);
    }
    Ok(())
}

async fn bench(a: &BenchArgs, dir: &Path) -> Result<()> {
    let p = &a.pg;
    if p.clients == 0 || p.seconds == 0 {
        bail!("--clients and --seconds must be at least 1");
    }
    let rounds = a.rounds().max(1);
    let threads = p.clients.min(2);
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    // Declared in start order: dropped (stopped) in reverse, the front-ends before the
    // database, also on every early return.
    let pg_opts = PgOptions {
        // Three clusters of three front-ends, each keeping up to `clients` warm backends.
        max_connections: (12 * p.clients + 60).max(150),
        max_prepared_transactions: (2 * p.clients + 20).max(100),
        ..Default::default()
    };
    let fsync = pg_opts.fsync;
    progress(format!("starting PostgreSQL; pgbench -i -s {}", p.scale));
    let pg = tokio::task::block_in_place(|| -> Result<PgCluster> {
        let pg = PgCluster::start(&pg_opts).context("starting PostgreSQL")?;
        pg.create_db(DB)?;
        Ok(pg)
    })?;
    let init = Duration::from_secs(60 + 10 * p.scale as u64);
    let out = tokio::time::timeout(
        init,
        pgbench_cmd(pg.host(), pg.port())?
            .args(["-i", "-q", "-s", &p.scale.to_string(), DB])
            .output(),
    )
    .await
    .with_context(|| format!("pgbench -i -s {} did not finish within {init:?}", p.scale))?
    .context("running pgbench -i")?;
    if !out.status.success() {
        bail!(
            "pgbench -i -s {} failed ({}): {}",
            p.scale,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let bouncer = tokio::task::block_in_place(|| PgBouncer::start(&pg, p.clients + 2))?;
    let start_front = |name: &str, two_phase: bool, agent_args: &[&str]| -> Result<LocalCluster> {
        progress(format!("starting the front-ends for {name}, three servers"));
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        let opts = PgLocalOptions {
            two_phase,
            mode: "lazy".into(),
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        tokio::task::block_in_place(|| PgLocal::start_on(&exe, &d, &pg, &opts))
    };
    let mut all = Config::selected(&p.configs)?;
    let wants = |cs: &[Config], c: &[Config]| cs.iter().any(|x| c.contains(x));
    // The benchmark moves sessions on purpose (every --move-every-ms): no admin rate limit.
    let unlimited = ["--admin-moves-per-sec", "1000000"];
    let off = match wants(&all, &[Config::Off]) {
        true => Some(start_front("2pc-off", false, &[])?),
        false => None,
    };
    let on = match wants(&all, &[Config::On, Config::OnMoves]) {
        true => Some(start_front("2pc-on", true, &unlimited)?),
        false => None,
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fast = match (wants(&all, &[Config::FastOff]), root) {
        (true, true) => Some(start_front(
            "fastpath",
            false,
            &["--fast-path", unlimited[0], unlimited[1]],
        )?),
        (true, false) => {
            eprintln!(
                "!!! NOT MEASURED: {} needs root (TCP_REPAIR and nftables); run as root to time it !!!",
                Config::FastOff.name()
            );
            all.retain(|c| *c != Config::FastOff);
            None
        }
        (false, _) => None,
    };
    let cluster = |c: Config| -> Option<&LocalCluster> {
        match c {
            Config::Off => off.as_ref(),
            Config::On | Config::OnMoves => on.as_ref(),
            Config::FastOff => fast.as_ref(),
            Config::Direct | Config::Bouncer => None,
        }
    };
    let addr = |c: Config| -> (String, u16) {
        match (c, cluster(c)) {
            (Config::Direct, _) => (pg.host().to_string(), pg.port()),
            (Config::Bouncer, _) => (pg.host().to_string(), bouncer.port()),
            (_, Some(lc)) => split(&lc.agent_listen),
            (_, None) => unreachable!("every agent configuration in `all` has its cluster"),
        }
    };

    // Warm-up: every path once, short, so that no configuration's first timed run pays for
    // cold caches or first connections.
    let warm = p.seconds.clamp(1, 2);
    for c in all.iter().filter(|c| **c != Config::OnMoves) {
        progress(format!("warm-up: {} ({warm} s)", c.name()));
        let (h, port) = addr(*c);
        pgbench(&h, port, p.clients, threads, warm).await?;
    }

    let n = all.len();
    let mut runs: Vec<Vec<Run>> = (0..n).map(|_| Vec::new()).collect();
    let mut moves = MoveStats::default();
    let mut move_request_us = Vec::new();
    let (mut resumed_us, mut first_byte_us) = (Vec::new(), Vec::new());
    let mut seen_moves = std::collections::HashSet::new();
    for round in 0..rounds as usize {
        for k in 0..n {
            let c = all[(k + round) % n];
            progress(format!(
                "round {}/{rounds}: {} ({} s) ...",
                round + 1,
                c.name(),
                p.seconds
            ));
            let (h, port) = addr(c);
            let probe = Probe {
                postmaster: pg.pid(),
                bouncer: (c == Config::Bouncer).then(|| bouncer.pid()),
                cluster: cluster(c),
            };
            let before = probe.sample();
            let machine_before = machine_cpu();
            let mut r = if let (Config::OnMoves, Some(on)) = (c, on.as_ref()) {
                let stop = Arc::new(AtomicBool::new(false));
                let mover = tokio::spawn(mover(
                    on.agent_admin.clone(),
                    Duration::from_millis(p.move_every_ms.max(1)),
                    Duration::from_secs(p.seconds + 120),
                    stop.clone(),
                ));
                let r = match pgbench(&h, port, p.clients, threads, p.seconds).await {
                    Err(e) => Err(e.context(db_view(&pg)).context(agent_view(on).await)),
                    r => r,
                };
                stop.store(true, Ordering::Relaxed);
                let (st, us) = mover.await.context("the mover task")?;
                moves.requests += st.requests;
                moves.moved += st.moved;
                moves.failed += st.failed;
                moves.empty += st.empty;
                moves.errors += st.errors;
                for f in st.failures {
                    if moves.failures.len() < 5 {
                        moves.failures.push(f);
                    }
                }
                move_request_us.extend(us);
                for c in on.status_async().await? {
                    if c.state.starts_with("aborted") && moves.aborted_at_agent.len() < 10 {
                        moves
                            .aborted_at_agent
                            .push(format!("{}: {}", c.cid, c.state));
                    }
                    for e in c.timeline.iter().filter(|e| e.ok) {
                        if seen_moves.insert((c.cid.clone(), e.at_ms, e.from.clone())) {
                            resumed_us.extend(e.resumed_us);
                            first_byte_us.extend(e.first_byte_us);
                        }
                    }
                }
                progress(format!(
                    "  {} connections moved in {} requests, {} failed",
                    st.moved, st.requests, st.failed
                ));
                r?
            } else {
                let r = pgbench(&h, port, p.clients, threads, p.seconds).await;
                match (r, probe.cluster) {
                    (Err(e), Some(lc)) => {
                        return Err(e.context(db_view(&pg)).context(agent_view(lc).await))
                    }
                    (r, _) => r.map_err(|e| e.context(db_view(&pg)))?,
                }
            };
            for (k, (b, e)) in before.iter().zip(probe.sample()).enumerate() {
                r.cpu[k] = e - b;
            }
            if let (Some((b0, t0)), Some((b1, t1))) = (machine_before, machine_cpu()) {
                r.machine = (b1 - b0, t1 - t0);
            }
            let mut line = format!("  {:.1} tps", r.tps);
            if r.failed > 0 || r.aborted > 0 {
                line += &format!(
                    "  !!! {} FAILED TRANSACTIONS, {} ABORTED CLIENTS !!!",
                    r.failed, r.aborted
                );
                for e in r.errors.iter().take(5) {
                    line += &format!("\n    {e}");
                }
            }
            progress(line);
            runs[all.iter().position(|x| *x == c).expect("listed")].push(r);
        }
    }
    move_request_us.sort_unstable();
    moves.request_us_p50 = pct(&move_request_us, 0.5);
    moves.request_us_p99 = pct(&move_request_us, 0.99);
    resumed_us.sort_unstable();
    first_byte_us.sort_unstable();
    moves.seen_at_agent = resumed_us.len() as u64;
    moves.resumed_us_p50 = pct(&resumed_us, 0.5);
    moves.resumed_us_p99 = pct(&resumed_us, 0.99);
    moves.resumed_us_max = resumed_us.last().copied().unwrap_or(0);
    moves.first_byte_us_p50 = pct(&first_byte_us, 0.5);
    moves.first_byte_us_p99 = pct(&first_byte_us, 0.99);
    moves.first_byte_us_max = first_byte_us.last().copied().unwrap_or(0);

    let direct: Vec<f64> = runs[0].iter().map(|r| r.tps).collect();
    let direct_median = median(&direct);
    let configs: Vec<ConfigReport> = all
        .iter()
        .zip(&runs)
        .map(|(c, rs)| {
            let tps: Vec<f64> = rs.iter().map(|r| r.tps).collect();
            let round_ratios: Vec<f64> = tps.iter().zip(&direct).map(|(t, d)| t / d).collect();
            ConfigReport {
                name: c.name(),
                median_tps: median(&tps),
                ratio: median(&tps) / direct_median,
                ratio_median_of_rounds: median(&round_ratios),
                round_ratios,
                tps,
                transactions: rs.iter().map(|r| r.transactions).sum(),
                failed_transactions: rs.iter().map(|r| r.failed).sum(),
                aborted_clients: rs.iter().map(|r| r.aborted).sum(),
                cpu_us_per_txn: cpu_per_txn(*c, rs),
                statement_ms: rs
                    .first()
                    .map(|r0| {
                        (r0.statements.iter().enumerate())
                            .map(|(i, (name, _))| {
                                let v: Vec<f64> = rs
                                    .iter()
                                    .filter_map(|r| r.statements.get(i).map(|x| x.1))
                                    .collect();
                                (name.clone(), v.iter().sum::<f64>() / v.len().max(1) as f64)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                other_cpu_pct: {
                    let ours: f64 = rs.iter().flat_map(|r| r.cpu).sum();
                    let busy: f64 = rs.iter().map(|r| r.machine.0).sum();
                    let had: f64 = rs.iter().map(|r| r.machine.1).sum();
                    if had > 0.0 {
                        ((busy - ours) / had * 100.0).max(0.0)
                    } else {
                        0.0
                    }
                },
                moves: (*c == Config::OnMoves).then(|| moves.clone()),
            }
        })
        .collect();

    progress("SELECT 1 round trips: direct, through the agent".into());
    let select1_direct = select1_p50(pg.host(), pg.port()).await?;
    // Move latency, on the two-phase-on cluster, now idle.
    let latency = match &on {
        Some(on) => {
            let (h, port) = split(&on.agent_listen);
            let select1_agent = select1_p50(&h, port).await?;
            let logs = LogMark::new(on);
            progress(format!("{} moves of an idle session", p.moves));
            let idle = idle_moves(on, p.moves).await?;
            progress(format!(
                "{} moves of a session inside a transaction",
                p.moves
            ));
            let (in_txn, balance_ok) = txn_moves(on, p.moves).await?;
            Some(Latency {
                select1_agent_us_p50: select1_agent,
                idle_moves: idle,
                in_transaction_moves: in_txn,
                front_end_phases: logs.phases(),
                balance_ok,
            })
        }
        None => {
            eprintln!("!!! move latency NOT MEASURED: it needs agent-2pc-on among --configs !!!");
            None
        }
    };
    let balance_ok = latency.as_ref().is_none_or(|l| l.balance_ok);
    let pg_clean = configs
        .iter()
        .all(|c| c.failed_transactions == 0 && c.aborted_clients == 0);
    let moves_clean = !all.contains(&Config::OnMoves)
        || (moves.failed == 0
            && moves.errors == 0
            && moves.moved > 0
            && moves.aborted_at_agent.is_empty());
    let rep = PgReport {
        scale: p.scale,
        clients: p.clients,
        threads,
        seconds: p.seconds,
        rounds,
        fsync,
        configs,
        select1_direct_us_p50: select1_direct,
        latency,
        clean: pg_clean && moves_clean && balance_ok,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print_table(&rep);
    }
    if !pg_clean {
        eprintln!("\n!!! FAILED TRANSACTIONS OR ABORTED CLIENTS (see the table): this run is not clean !!!");
    }
    if !moves_clean {
        eprintln!(
            "\n!!! MOVES DURING THE RUNS: {} moved, {} failed, {} errors: {:?} !!!",
            moves.moved, moves.failed, moves.errors, moves.failures
        );
    }
    if !balance_ok {
        eprintln!("\n!!! THE IN-TRANSACTION MOVES' ACCOUNT BALANCE IS WRONG (a transaction was lost or applied twice) !!!");
    }
    if !rep.clean {
        bail!("the PostgreSQL benchmark was not clean");
    }
    Ok(())
}

/// What the database is doing (for an error message): prepared transactions, sessions of
/// the bench database and who waits for whom.
fn db_view(pg: &PgCluster) -> String {
    let sql = "SET statement_timeout = '10s'; SELECT 'prepared ' || gid || ' at ' || prepared FROM pg_prepared_xacts \
               UNION ALL SELECT 'backend ' || pid || ' ' || coalesce(state, '') || ' wait ' || \
               coalesce(wait_event_type || '/' || wait_event, '-') || ' blocked by ' || \
               pg_blocking_pids(pid)::text || ': ' || left(query, 80) \
               FROM pg_stat_activity WHERE datname = 'bench'";
    let out = tokio::task::block_in_place(|| pg.psql("postgres", sql));
    match out {
        Ok(s) => format!("the database:\n{s}"),
        Err(e) => format!("the database: {e:#}"),
    }
}

/// The agent's connections, one line each (for an error message).
async fn agent_view(lc: &LocalCluster) -> String {
    let st = match lc.status_async().await {
        Ok(st) => st,
        Err(e) => return format!("agent status: {e:#}"),
    };
    let mut out = String::from("the agent's connections:");
    for c in st.iter().filter(|c| c.state != "closed") {
        let last = c.timeline.last().map(|e| {
            format!(
                "last move {}->{} at {} ms ok {} {:?}",
                e.from,
                e.to.as_deref().unwrap_or("-"),
                e.at_ms,
                e.ok,
                e.refusals
            )
        });
        out += &format!(
            "\n  {} on {} {} up {} down {} moves {} {}",
            c.cid,
            c.server,
            c.state,
            c.bytes_up,
            c.bytes_down,
            c.migrations,
            last.unwrap_or_default()
        );
    }
    out
}

fn progress(line: String) {
    eprintln!("{line}");
}

/// `pgbench -h HOST -p PORT -U postgres` with a clean libpq environment, killed if dropped.
fn pgbench_cmd(host: &str, port: u16) -> Result<tokio::process::Command> {
    let mut c = tokio::process::Command::new(mtcp_pgtmp::bin("pgbench")?);
    for var in
        "PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGPASSWORD".split(' ')
    {
        c.env_remove(var);
    }
    c.env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "disable")
        .args(["-h", host, "-p", &port.to_string(), "-U", "postgres"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(c)
}

/// Runs pgbench (TPC-B, simple protocol) against `host:port`, database [`DB`], bounded in time.
async fn pgbench(host: &str, port: u16, clients: u32, threads: u32, secs: u64) -> Result<Run> {
    let mut c = pgbench_cmd(host, port)?;
    c.args(["-c", &clients.to_string(), "-j", &threads.to_string()])
        .args(["-T", &secs.to_string(), "-r", DB]);
    let what = format!("pgbench -c {clients} -j {threads} -T {secs} on {host}:{port}");
    let out = tokio::time::timeout(Duration::from_secs(secs + 120), c.output())
        .await
        .with_context(|| format!("{what} did not finish"))?
        .with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r = parse_pgbench(&stdout, &stderr);
    match r {
        Some(r) => Ok(r),
        None => bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            stdout.trim(),
            stderr.trim()
        ),
    }
}

/// A short name for a statement of pgbench's script: its first word, with the table for
/// UPDATE, SELECT and INSERT (`UPDATE pgbench_accounts` → `UPDATE accounts`).
fn statement_name(words: &[&str]) -> String {
    let verb = words[0].trim_end_matches(';').to_uppercase();
    let table = words
        .iter()
        .position(|w| matches!(w.to_uppercase().as_str(), "UPDATE" | "FROM" | "INTO"))
        .and_then(|i| words.get(i + 1))
        .map(|t| t.trim_start_matches("pgbench_").trim_end_matches(';'));
    match table {
        Some(t) => format!("{verb} {t}"),
        None => verb,
    }
}

/// The summary of a pgbench run (PostgreSQL 15's output); `None` without a tps line.
fn parse_pgbench(stdout: &str, stderr: &str) -> Option<Run> {
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let first_num = |s: &str| -> Option<f64> {
        s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find(|t| !t.is_empty())?
            .parse()
            .ok()
    };
    let tps = first_num(field("tps = ")?)?;
    let transactions = field("number of transactions actually processed:")
        .and_then(first_num)
        .unwrap_or(0.0) as u64;
    let failed = field("number of failed transactions:")
        .and_then(first_num)
        .unwrap_or(0.0) as u64;
    let errors: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains("error") || l.contains("aborted"))
        .map(str::to_string)
        .collect();
    // "pgbench: error: client 3 script 0 aborted in command 4 query 0: …"
    let aborted = stderr
        .lines()
        .filter(|l| l.contains("client ") && l.contains(" aborted"))
        .count() as u64;
    // "statement latencies in milliseconds and failures:", then "  0.081  0  BEGIN;" lines.
    let statements = stdout
        .lines()
        .skip_while(|l| !l.starts_with("statement latencies"))
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ms: f64 = f.next()?.parse().ok()?;
            let _failures = f.next()?;
            let sql: Vec<&str> = f.collect();
            (!sql.is_empty() && !sql[0].starts_with('\\')).then(|| (statement_name(&sql), ms))
        })
        .collect();
    Some(Run {
        tps,
        transactions,
        failed,
        aborted,
        errors,
        statements,
        cpu: [0.0; 5],
        machine: (0.0, 0.0),
    })
}

/// The processes whose CPU time a run is charged with.
struct Probe<'a> {
    postmaster: u32,
    bouncer: Option<u32>,
    cluster: Option<&'a LocalCluster>,
}

impl Probe<'_> {
    /// CPU seconds so far: pgbench (this process's waited-for children), PostgreSQL,
    /// PgBouncer, agent, front-ends.
    fn sample(&self) -> [f64; 5] {
        let servers = |lc: &LocalCluster| -> f64 {
            (lc.servers.iter())
                .filter_map(|s| lc.pid(&s.id))
                .map(|pid| proc_cpu(pid, false).unwrap_or(0.0))
                .sum()
        };
        [
            children_cpu(),
            postgres_cpu(self.postmaster),
            self.bouncer
                .and_then(|pid| proc_cpu(pid, false))
                .unwrap_or(0.0),
            (self.cluster)
                .and_then(|lc| proc_cpu(lc.pid("agent")?, false))
                .unwrap_or(0.0),
            self.cluster.map_or(0.0, servers),
        ]
    }
}

/// CPU seconds of process `pid` (with its waited-for children's when `children`), from
/// `/proc/PID/stat`.
fn proc_cpu(pid: u32, children: bool) -> Option<f64> {
    let (_, f) = proc_stat(pid)?;
    let field = |i: usize| f.get(i)?.parse::<f64>().ok();
    // After the command: f[0] is field 3 (state); utime, stime, cutime, cstime are 14..=17.
    let mut ticks = field(11)? + field(12)?;
    if children {
        ticks += field(13)? + field(14)?;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// The parent PID and the fields after the command name of `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u32, Vec<String>)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<String> = s[s.rfind(')')? + 1..]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    Some((f.get(1)?.parse().ok()?, f))
}

/// CPU seconds of a PostgreSQL server: the postmaster with the backends it reaped, and every
/// backend still running.
fn postgres_cpu(postmaster: u32) -> f64 {
    let mut total = proc_cpu(postmaster, true).unwrap_or(0.0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if proc_stat(pid).is_some_and(|(ppid, _)| ppid == postmaster) {
            total += proc_cpu(pid, true).unwrap_or(0.0);
        }
    }
    total
}

/// The machine's busy CPU seconds so far (every CPU: user, nice, system, irq, softirq, steal)
/// and all its CPU seconds (busy or idle), from `/proc/stat`.
fn machine_cpu() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    if f.len() < 8 {
        return None;
    }
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    let all = busy + f[3] + f[4];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (busy / hz as f64, all / hz as f64))
}

/// CPU seconds of every waited-for child of this process so far (pgbench).
fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A configuration's CPU µs per transaction over its runs.
fn cpu_per_txn(c: Config, runs: &[Run]) -> CpuPerTxn {
    let txns = runs.iter().map(|r| r.transactions).sum::<u64>().max(1) as f64;
    let per = |k: usize| runs.iter().map(|r| r.cpu[k]).sum::<f64>() * 1e6 / txns;
    let agent = !matches!(c, Config::Direct | Config::Bouncer);
    let out = CpuPerTxn {
        pgbench: per(0),
        postgres: per(1),
        pgbouncer: (c == Config::Bouncer).then(|| per(2)),
        agent: agent.then(|| per(3)),
        front_ends: agent.then(|| per(4)),
        total: 0.0,
    };
    CpuPerTxn {
        total: out.pgbench
            + out.postgres
            + out.pgbouncer.unwrap_or(0.0)
            + out.agent.unwrap_or(0.0)
            + out.front_ends.unwrap_or(0.0),
        ..out
    }
}

/// `migrate --all` every `every` until `stop` (or `limit`); returns the counts and each
/// request's duration, µs.
async fn mover(
    admin_addr: String,
    every: Duration,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> (MoveStats, Vec<u64>) {
    let mut st = MoveStats::default();
    let mut us = Vec::new();
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < limit {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let req = Request::Migrate {
            conn: None,
            to: None,
        };
        let t = Instant::now();
        let ans = tokio::time::timeout(STEP_LIMIT, admin::request(&admin_addr, &req)).await;
        st.requests += 1;
        match ans {
            Ok(Ok(Response::Migrated { results })) => {
                if results.is_empty() {
                    st.empty += 1;
                } else {
                    us.push(t.elapsed().as_micros() as u64);
                }
                for r in results {
                    if r.ok {
                        st.moved += 1;
                    } else {
                        st.failed += 1;
                        if st.failures.len() < 5 {
                            st.failures.push(format!("{}: {}", r.cid, r.detail));
                        }
                    }
                }
            }
            other => {
                st.errors += 1;
                if st.failures.len() < 5 {
                    st.failures.push(format!("{other:?}"));
                }
            }
        }
    }
    (st, us)
}

/// A tokio-postgres session to `host:port`, database [`DB`], its connection driven by a task.
async fn connect(host: &str, port: u16) -> Result<tokio_postgres::Client> {
    let cfg = format!("host={host} port={port} user=postgres dbname={DB} connect_timeout=10");
    let (client, conn) = tokio::time::timeout(
        STEP_LIMIT,
        tokio_postgres::connect(&cfg, tokio_postgres::NoTls),
    )
    .await
    .with_context(|| format!("connecting to {host}:{port} timed out"))?
    .with_context(|| format!("connecting to {host}:{port}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("bench session: {e}");
        }
    });
    Ok(client)
}

/// Runs one simple-protocol statement; returns the first column of its rows.
async fn q(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>> {
    let msgs = tokio::time::timeout(STEP_LIMIT, c.simple_query(sql))
        .await
        .with_context(|| format!("{sql:?} timed out"))?
        .with_context(|| format!("{sql:?}"))?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect())
}

async fn select1(c: &tokio_postgres::Client) -> Result<()> {
    let rows = q(c, "SELECT 1").await?;
    if rows != ["1"] {
        bail!("SELECT 1 returned {rows:?}");
    }
    Ok(())
}

/// Median `SELECT 1` round trip over one open session (200 after 20 unmeasured), µs.
async fn select1_p50(host: &str, port: u16) -> Result<u64> {
    let c = connect(host, port).await?;
    let mut us = Vec::new();
    for i in 0..220 {
        let t = Instant::now();
        select1(&c).await?;
        if i >= 20 {
            us.push(t.elapsed().as_micros() as u64);
        }
    }
    us.sort_unstable();
    Ok(pct(&us, 0.5))
}

/// Connects through the agent; returns the session and its connection id at the agent.
async fn agent_session(lc: &LocalCluster) -> Result<(tokio_postgres::Client, String)> {
    let before: Vec<String> = lc
        .status_async()
        .await?
        .into_iter()
        .map(|c| c.cid)
        .collect();
    let (h, port) = split(&lc.agent_listen);
    let c = connect(&h, port).await?;
    select1(&c).await?;
    let cid = lc
        .status_async()
        .await?
        .into_iter()
        .find(|s| s.state == "live" && !before.contains(&s.cid))
        .context("the bench session is not at the agent")?
        .cid;
    Ok((c, cid))
}

/// Moves connection `cid` through the agent's admin port; the request's duration, µs.
async fn move_one(lc: &LocalCluster, cid: &str) -> Result<u64> {
    let req = Request::Migrate {
        conn: Some(cid.to_string()),
        to: None,
    };
    let t = Instant::now();
    let ans = tokio::time::timeout(STEP_LIMIT, admin::request(&lc.agent_admin, &req))
        .await
        .context("the agent did not answer the migrate request")?;
    let us = t.elapsed().as_micros() as u64;
    match ans {
        Ok(Response::Migrated { results }) if results.len() == 1 && results[0].ok => Ok(us),
        other => bail!("moving {cid}: {other:?}"),
    }
}

/// Move latency samples → report, with the agent's trigger→RESUMED of the session's moves.
async fn latency(
    lc: &LocalCluster,
    cid: &str,
    mut mv: Vec<u64>,
    mut total: Vec<u64>,
) -> Result<MoveLatency> {
    let st = lc.status_async().await?;
    let mut resumed: Vec<u64> = st
        .iter()
        .filter(|c| c.cid == cid)
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .filter_map(|e| e.resumed_us)
        .collect();
    mv.sort_unstable();
    total.sort_unstable();
    resumed.sort_unstable();
    Ok(MoveLatency {
        moves: mv.len(),
        move_us_p50: pct(&mv, 0.5),
        move_us_p99: pct(&mv, 0.99),
        move_us_max: mv.last().copied().unwrap_or(0),
        move_query_us_p50: pct(&total, 0.5),
        move_query_us_p99: pct(&total, 0.99),
        move_query_us_max: total.last().copied().unwrap_or(0),
        resumed_us_p50: pct(&resumed, 0.5),
        resumed_us_p99: pct(&resumed, 0.99),
    })
}

/// An idle session: move, then `SELECT 1`, `moves` times.
async fn idle_moves(lc: &LocalCluster, moves: u32) -> Result<MoveLatency> {
    let (c, cid) = agent_session(lc).await?;
    let (mut mv, mut total) = (Vec::new(), Vec::new());
    for i in 0..moves {
        let t = Instant::now();
        mv.push(
            move_one(lc, &cid)
                .await
                .with_context(|| format!("move {i}"))?,
        );
        select1(&c)
            .await
            .with_context(|| format!("SELECT 1 after move {i}"))?;
        total.push(t.elapsed().as_micros() as u64);
        tokio::time::sleep(MOVE_PAUSE).await;
    }
    let r = latency(lc, &cid, mv, total).await;
    drop(c);
    r
}

/// A session inside a transaction: BEGIN; UPDATE a row; SELECT it; move; SELECT it again;
/// COMMIT — `moves` times. Returns the latency and whether the row's balance ends exactly
/// `moves` higher (no transaction lost or applied twice).
async fn txn_moves(lc: &LocalCluster, moves: u32) -> Result<(MoveLatency, bool)> {
    let (c, cid) = agent_session(lc).await?;
    let read = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {AID}");
    let balance = |rows: Vec<String>| -> Result<i64> {
        rows.first()
            .context("no such account row")?
            .parse()
            .context("abalance")
    };
    let start = balance(q(&c, &read).await?)?;
    let (mut mv, mut total) = (Vec::new(), Vec::new());
    for i in 0..moves {
        q(&c, "BEGIN").await?;
        q(
            &c,
            &format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {AID}"),
        )
        .await?;
        let before = balance(q(&c, &read).await?)?;
        let t = Instant::now();
        mv.push(
            move_one(lc, &cid)
                .await
                .with_context(|| format!("move {i}"))?,
        );
        let after = balance(
            q(&c, &read)
                .await
                .with_context(|| format!("SELECT after move {i}"))?,
        )?;
        total.push(t.elapsed().as_micros() as u64);
        if after != before {
            bail!("move {i}: the row read {before} before the move and {after} after");
        }
        q(&c, "COMMIT").await?;
        tokio::time::sleep(MOVE_PAUSE).await;
    }
    let end = balance(q(&c, &read).await?)?;
    let ok = end == start + moves as i64;
    if !ok {
        progress(format!(
            "!!! account {AID}: balance {start} before, {end} after {moves} committed increments"
        ));
    }
    let r = latency(lc, &cid, mv, total).await?;
    drop(c);
    Ok((r, ok))
}

/// Where the servers' logs of a cluster ended, to read what they say afterwards.
struct LogMark {
    files: Vec<(std::path::PathBuf, u64)>,
}

impl LogMark {
    fn new(lc: &LocalCluster) -> Self {
        let files = lc
            .servers
            .iter()
            .map(|s| {
                let p = lc.dir.join(format!("{}.log", s.id));
                let len = std::fs::metadata(&p).map_or(0, |m| m.len());
                (p, len)
            })
            .collect();
        LogMark { files }
    }

    /// The front-ends' per-restart timings logged since the mark (`backend connected
    /// connect=…`, `session restarting here … fenced=… register_and_fence=… restore=…`).
    fn phases(&self) -> Phases {
        let (mut connect, mut fence, mut restore) = (Vec::new(), Vec::new(), Vec::new());
        let mut ready = Vec::new();
        let (mut fenced, mut restarts) = (0, 0);
        for (path, from) in &self.files {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            let text =
                String::from_utf8_lossy(&bytes[(*from as usize).min(bytes.len())..]).into_owned();
            // When each connection last arrived here (seconds of the day).
            let mut arrived: std::collections::HashMap<String, f64> = Default::default();
            for line in text.lines().map(strip_ansi) {
                if line.contains("connection migrated here") {
                    if let (Some(cid), Some(t)) = (field(&line, "cid"), log_time(&line)) {
                        arrived.insert(cid.to_string(), t);
                    }
                } else if line.contains("backend connected") {
                    connect.extend(field(&line, "connect").and_then(parse_duration_us));
                } else if line.contains("session restarting here") {
                    restarts += 1;
                    fence.extend(field(&line, "register_and_fence").and_then(parse_duration_us));
                    restore.extend(field(&line, "restore").and_then(parse_duration_us));
                    fenced += field(&line, "fenced")
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    let cid = field(&line, "cid").unwrap_or_default();
                    if let (Some(t0), Some(t1)) = (arrived.remove(cid), log_time(&line)) {
                        ready.push(((t1 - t0).rem_euclid(86_400.0) * 1e6).round() as u64);
                    }
                }
            }
        }
        for v in [&mut connect, &mut fence, &mut restore, &mut ready] {
            v.sort_unstable();
        }
        Phases {
            restarts,
            connect_us_p50: pct(&connect, 0.5),
            connect_us_p99: pct(&connect, 0.99),
            register_and_fence_us_p50: pct(&fence, 0.5),
            register_and_fence_us_p99: pct(&fence, 0.99),
            restore_us_p50: pct(&restore, 0.5),
            restore_us_p99: pct(&restore, 0.99),
            fenced,
            resumed_to_ready_us_p50: pct(&ready, 0.5),
            resumed_to_ready_us_p99: pct(&ready, 0.99),
        }
    }
}

/// A log line's time of day in seconds (`2026-12-05T01:45:42.458934Z …`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let t = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The value of ` name=value` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let at = line.find(&key)? + key.len();
    line[at..].split_whitespace().next()
}

/// A `Duration`'s Debug form (`812.5µs`, `1.234ms`, `2.1s`, `900ns`) in µs.
fn parse_duration_us(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let x: f64 = num.parse().ok()?;
    let us = match unit {
        "ns" => x / 1e3,
        "µs" | "us" => x,
        "ms" => x * 1e3,
        "s" => x * 1e6,
        _ => return None,
    };
    Some(us.round() as u64)
}

fn print_table(r: &PgReport) {
    let ms = |us: u64| us as f64 / 1e3;
    println!(
        "PostgreSQL front-end: pgbench TPC-B (simple protocol), scale {}, -c {} -j {}, {} s runs, {} rounds (order rotated), fsync {}, loopback",
        r.scale,
        r.clients,
        r.threads,
        r.seconds,
        r.rounds,
        if r.fsync { "on" } else { "off" }
    );
    println!(
        "  {:<20} {:>10} {:>7} {:>8}  {:<28} {:>6} {:>7}",
        "configuration", "median tps", "ratio", "per-rnd", "each round (tps)", "failed", "aborted"
    );
    for c in &r.configs {
        let each: Vec<String> = c.tps.iter().map(|t| format!("{t:.0}")).collect();
        let loud = if c.failed_transactions > 0 || c.aborted_clients > 0 {
            "  !!! NOT CLEAN"
        } else {
            ""
        };
        println!(
            "  {:<20} {:>10.1} {:>7.3} {:>8.3}  {:<28} {:>6} {:>7}{loud}",
            c.name,
            c.median_tps,
            c.ratio,
            c.ratio_median_of_rounds,
            each.join(" "),
            c.failed_transactions,
            c.aborted_clients
        );
        if let Some(m) = &c.moves {
            println!(
                "    moves: {} connections moved by {} `migrate --all` requests ({} found none), {} failed, {} errors; request p50 {:.2} ms, p99 {:.2} ms",
                m.moved, m.requests, m.empty, m.failed, m.errors, ms(m.request_us_p50), ms(m.request_us_p99)
            );
            println!(
                "    each move in the agent ({} seen): trigger -> RESUMED p50 {:.2} ms p99 {:.2} ms max {:.2} ms; -> first byte from the new server p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
                m.seen_at_agent, ms(m.resumed_us_p50), ms(m.resumed_us_p99), ms(m.resumed_us_max),
                ms(m.first_byte_us_p50), ms(m.first_byte_us_p99), ms(m.first_byte_us_max)
            );
            for a in &m.aborted_at_agent {
                println!("    !!! given up by the agent: {a}");
            }
            for f in &m.failures {
                println!("    !!! move failure: {f}");
            }
        }
    }
    println!("  (ratio: median tps / direct's median tps; per-rnd: median of each round's ratio to direct's run of that round)");
    println!(
        "  CPU µs per transaction   pgbench  postgres  pgbouncer    agent  front-ends    total   (machine CPU others used)"
    );
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.0}"));
    for c in &r.configs {
        let u = &c.cpu_us_per_txn;
        println!(
            "    {:<20} {:>9.0} {:>9.0} {:>10} {:>8} {:>11} {:>8.0}   ({:.1} %)",
            c.name,
            u.pgbench,
            u.postgres,
            opt(u.pgbouncer),
            opt(u.agent),
            opt(u.front_ends),
            u.total,
            c.other_cpu_pct
        );
    }
    if let Some(first) = r.configs.first() {
        print!("  statement latency, ms (pgbench -r, mean of the rounds)");
        for c in &r.configs {
            print!(" {:>19}", c.name);
        }
        println!();
        for (i, (name, _)) in first.statement_ms.iter().enumerate() {
            print!("    {name:<51}");
            for c in &r.configs {
                match c.statement_ms.get(i) {
                    Some((_, ms)) => print!(" {ms:>19.3}"),
                    None => print!(" {:>19}", "-"),
                }
            }
            println!();
        }
    }
    let Some(l) = &r.latency else {
        println!(
            "SELECT 1 round trip (p50): direct to PostgreSQL {:.3} ms; move latency not measured (needs agent-2pc-on)",
            ms(r.select1_direct_us_p50)
        );
        println!("clean (0 failed, 0 aborted, every move ok): {}", r.clean);
        return;
    };
    println!(
        "SELECT 1 round trip (p50): direct to PostgreSQL {:.3} ms, through the agent and front-end {:.3} ms",
        ms(r.select1_direct_us_p50),
        ms(l.select1_agent_us_p50)
    );
    println!("move latency, agent-2pc-on cluster, one session moved by the agent's admin API (request -> answer after RESUMED):");
    for (name, m) in [
        ("idle session", &l.idle_moves),
        ("inside a transaction", &l.in_transaction_moves),
    ] {
        println!(
            "  {name:<21} move p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms | move + first query p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms | agent trigger->RESUMED p50 {:.3} ms ({} moves)",
            ms(m.move_us_p50), ms(m.move_us_p99), ms(m.move_us_max),
            ms(m.move_query_us_p50), ms(m.move_query_us_p99), ms(m.move_query_us_max),
            ms(m.resumed_us_p50), m.moves
        );
    }
    let f = &l.front_end_phases;
    println!(
        "  destination front-end per restart (server logs, {} restarts, {} found the origin's backend alive):",
        f.restarts, f.fenced
    );
    println!(
        "    RESUMED -> session ready p50 {:.3} ms p99 {:.3} ms: backend connect p50 {:.3} ms p99 {:.3} ms, register and fence p50 {:.3} ms p99 {:.3} ms, restore p50 {:.3} ms p99 {:.3} ms",
        ms(f.resumed_to_ready_us_p50), ms(f.resumed_to_ready_us_p99),
        ms(f.connect_us_p50), ms(f.connect_us_p99),
        ms(f.register_and_fence_us_p50), ms(f.register_and_fence_us_p99),
        ms(f.restore_us_p50), ms(f.restore_us_p99)
    );
    println!(
        "clean (0 failed, 0 aborted, every move ok, balances right): {}",
        r.clean
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_output_parses() {
        let out = "transaction type: <builtin: TPC-B (sort of)>\nscaling factor: 10\n\
                   number of transactions actually processed: 12345\n\
                   number of failed transactions: 2 (0.016%)\nlatency average = 6.4 ms\n\
                   initial connection time = 12.3 ms\ntps = 1234.567890 (without initial connection time)\n";
        let err = "pgbench: error: client 3 script 0 aborted in command 4 query 0: ERROR:  x\n";
        let out = format!(
            "{out}statement latencies in milliseconds and failures:\n         0.002           0  \\set aid random(1, 100000 * :scale)\n         0.081           0  BEGIN;\n         0.196           0  UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n         0.150           0  SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n         0.300           0  END;\n"
        );
        let r = parse_pgbench(&out, err).expect("parses");
        let names: Vec<&str> = r.statements.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            ["BEGIN", "UPDATE accounts", "SELECT accounts", "END"]
        );
        assert_eq!(r.statements[1].1, 0.196);
        assert_eq!(r.tps, 1234.56789);
        assert_eq!((r.transactions, r.failed, r.aborted), (12345, 2, 1));
        assert!(parse_pgbench("no summary", "").is_none());
    }

    #[test]
    fn log_fields_parse() {
        let l = strip_ansi("2026 DEBUG mtcp_pgfront::session: session restarting here \x1b[3mcid\x1b[0m\x1b[2m=\x1b[0mab \x1b[3mfenced\x1b[0m\x1b[2m=\x1b[0m1 register_and_fence=812.5µs restore=2.25ms");
        assert_eq!(field(&l, "fenced"), Some("1"));
        assert_eq!(
            field(&l, "register_and_fence").and_then(parse_duration_us),
            Some(813)
        );
        assert_eq!(field(&l, "fence"), None);
        assert_eq!(field(&l, "restore").and_then(parse_duration_us), Some(2250));
        assert_eq!(parse_duration_us("1.5s"), Some(1_500_000));
        assert_eq!(parse_duration_us("900ns"), Some(1));
        let t = log_time("2026-12-05T01:45:42.458934Z  INFO mtcp::server: x").expect("time");
        assert!((t - (3600.0 + 45.0 * 60.0 + 42.458934)).abs() < 1e-6);
    }
}
