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

use crate::args::BenchArgs;
use crate::stats::{median, pct};
use anyhow::{bail, Context, Result};
use mtcp_agent::admin::{self, Request, Response};
use mtcp_harness::local::{strip_ansi, LocalCluster};
use mtcp_harness::pglocal::{split, PgLocal, PgLocalOptions};
use mtcp_pgtmp::{PgBouncer, PgCluster, PgOptions};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// The same with every connection moved every `--move-every-ms`.
    FastMoves,
}

impl Config {
    const ALL: [Config; 7] = [
        Config::Direct,
        Config::Bouncer,
        Config::Off,
        Config::On,
        Config::OnMoves,
        Config::FastOff,
        Config::FastMoves,
    ];

    /// A configuration whose connections are moved while pgbench runs.
    fn moving(self) -> bool {
        matches!(self, Config::OnMoves | Config::FastMoves)
    }

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
            Config::FastMoves => "fastpath-2pc-off-moves",
        }
    }
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
    if r.is_err() || a.keep_logs {
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
            let kept = format!("the front-ends' and agents' logs are in {}", keep.display());
            return match r {
                Err(e) => Err(e.context(kept)),
                Ok(()) => {
                    eprintln!("{kept}");
                    Ok(())
                }
            };
        }
    }
    r
}

async fn bench(a: &BenchArgs, dir: &Path) -> Result<()> {
    let p = &a.pg;
    if p.clients == 0 || p.seconds == 0 {
        bail!("--clients and --seconds must be at least 1");
    }
    let rounds = a.rounds().max(1);
    let threads = p.clients.min(2);
    let exe = match &a.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("locating the mtcp binary")?,
    };
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
    let fast = match (wants(&all, &[Config::FastOff, Config::FastMoves]), root) {
        (true, true) => Some(start_front(
            "fastpath",
            false,
            &["--fast-path", unlimited[0], unlimited[1]],
        )?),
        (true, false) => {
            eprintln!(
                "!!! NOT MEASURED: {} and {} need root (TCP_REPAIR and nftables); run as root to time them !!!",
                Config::FastOff.name(),
                Config::FastMoves.name()
            );
            all.retain(|c| !matches!(c, Config::FastOff | Config::FastMoves));
            None
        }
        (false, _) => None,
    };
    let cluster = |c: Config| -> Option<&LocalCluster> {
        match c {
            Config::Off => off.as_ref(),
            Config::On | Config::OnMoves => on.as_ref(),
            Config::FastOff | Config::FastMoves => fast.as_ref(),
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
    for c in all.iter().filter(|c| !c.moving()) {
        progress(format!("warm-up: {} ({warm} s)", c.name()));
        let (h, port) = addr(*c);
        pgbench(&h, port, (p.clients, threads), &p.protocol, warm).await?;
    }

    let n = all.len();
    let mut runs: Vec<Vec<Run>> = (0..n).map(|_| Vec::new()).collect();
    // Per moving configuration (by its place in `all`).
    let mut tallies: Vec<MoveTally> = (0..n).map(|_| MoveTally::default()).collect();
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
            let mut r = if let (true, Some(on)) = (c.moving(), cluster(c)) {
                let t = &mut tallies[all.iter().position(|x| *x == c).expect("listed")];
                let MoveTally {
                    stats: moves,
                    request_us: move_request_us,
                    resumed_us,
                    first_byte_us,
                } = t;
                let stop = Arc::new(AtomicBool::new(false));
                let mover = tokio::spawn(mover(
                    on.agent_admin.clone(),
                    Duration::from_millis(p.move_every_ms.max(1)),
                    Duration::from_secs(p.seconds + 120),
                    stop.clone(),
                ));
                let r = match pgbench(&h, port, (p.clients, threads), &p.protocol, p.seconds).await
                {
                    Err(e) => Err(e.context(db_view(&pg)).context(agent_view(on).await)),
                    r => r,
                };
                stop.store(true, Ordering::Relaxed);
                let (st, us) = mover.await.context("the mover task")?;
                moves.requests += st.requests;
                moves.moved += st.moved;
                moves.failed += st.failed;
                moves.ended += st.ended;
                moves.empty += st.empty;
                moves.errors += st.errors;
                for f in st.failures {
                    if moves.failures.len() < 5 {
                        moves.failures.push(f);
                    }
                }
                move_request_us.extend(us);
                for c in on.status_async().await? {
                    if c.aborted().is_some() && moves.aborted_at_agent.len() < 10 {
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
                let r = pgbench(&h, port, (p.clients, threads), &p.protocol, p.seconds).await;
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
    let moves: Vec<MoveStats> = tallies.into_iter().map(MoveTally::finish).collect();

    let direct: Vec<f64> = runs[0].iter().map(|r| r.tps).collect();
    let direct_median = median(&direct);
    let configs: Vec<ConfigReport> = all
        .iter()
        .zip(&runs)
        .zip(&moves)
        .map(|((c, rs), m)| {
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
                moves: c.moving().then(|| m.clone()),
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
            let probe = Probe {
                postmaster: pg.pid(),
                bouncer: None,
                cluster: Some(on),
            };
            let before = probe.sample();
            quiet_rounds(on, p.moves).await?;
            let quiet = CpuPerMove::between(before, probe.sample(), p.moves, Default::default());
            let before = probe.sample();
            let mut idle = idle_moves(on, p.moves).await?;
            idle.cpu_us_per_move = CpuPerMove::between(before, probe.sample(), p.moves, quiet);
            progress(format!(
                "{} moves of a session inside a transaction",
                p.moves
            ));
            let before = probe.sample();
            let (mut in_txn, balance_ok) = txn_moves(on, p.moves).await?;
            in_txn.cpu_us_per_move = CpuPerMove::between(before, probe.sample(), p.moves, quiet);
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
    let moves_clean = all.iter().zip(&moves).all(|(c, m)| {
        !c.moving()
            || (m.failed == 0 && m.errors == 0 && m.moved > 0 && m.aborted_at_agent.is_empty())
    });
    let rep = PgReport {
        protocol: p.protocol.clone(),
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
        for (c, m) in all.iter().zip(&moves).filter(|(c, _)| c.moving()) {
            eprintln!(
                "\n!!! MOVES DURING THE RUNS ({}): {} moved, {} failed, {} errors: {:?} !!!",
                c.name(),
                m.moved,
                m.failed,
                m.errors,
                m.failures
            );
        }
    }
    if !balance_ok {
        eprintln!("\n!!! THE IN-TRANSACTION MOVES' ACCOUNT BALANCE IS WRONG (a transaction was lost or applied twice) !!!");
    }
    if !rep.clean {
        bail!("the PostgreSQL benchmark was not clean");
    }
    Ok(())
}

mod cpu;
mod moves;
mod report;
mod runner;
mod table;
mod views;
use cpu::*;
use moves::*;
pub use report::*;
use runner::*;
use table::*;
use views::*;

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
