//! `mtcp demo --pg`: real `pgbench` through three PostgreSQL front-ends (`pgfront`, eager mode)
//! of a throwaway PostgreSQL, while the busiest front-end is drained, every session is moved by
//! hand, and the busiest front-end is killed with SIGKILL — then the database is checked: every
//! transaction pgbench counted is there exactly once (a per-client, gap-free ledger), the TPC-B
//! balances agree, and no prepared transaction is left behind.
//!
//! The ledger: each pgbench client keeps a counter `seq` of its committed transactions (pgbench
//! variables live per client across transactions) and inserts `(client_id, seq + 1, delta)` in
//! each transaction. The counter advances only after the transaction's `END` succeeded — a
//! retried transaction (pgbench restarts the script from its first command, without restoring
//! variables) reuses the number — so for every client the rows must be exactly `1..=max`: a
//! transaction lost after its COMMIT was reported leaves a gap, one applied twice collides with
//! the primary key and makes pgbench abort that client.

use anyhow::{anyhow, bail, Context, Result};
use mtcp_harness::pglocal::{PgLocal, PgLocalOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod check;
mod timeline;

use check::{ledger_count, one, BenchStats, Report};
use timeline::{agent_moves, Event, MoveSummary};

/// How long pgbench runs (`-T`), seconds.
const SECONDS: u64 = 20;
/// pgbench clients (`-c`) and threads (`-j`).
const CLIENTS: u32 = 8;
const THREADS: u32 = 2;

const LEDGER_DDL: &str =
    "CREATE TABLE ledger (client int, seq int, delta int, PRIMARY KEY (client, seq))";

/// TPC-B (pgbench's built-in script) plus one ledger row per transaction; `:seq` is the number
/// of this client's committed transactions (`-D seq=0`). Each client keeps to accounts of its
/// own (`pglocal::TPCB_OWN_ACCOUNTS`, 8 clients × 10 000 of scale 1's 100 000): a transaction a
/// crash cut is replayed from its BEGIN, and with the stock script another client that changed
/// the same account in the gap makes the replayed `SELECT abalance` differ — the runtime then
/// aborts that client's connection (by design, README: never a wrong number), which this demo
/// would report as a failure although nothing went wrong (seen once in CI, stop 17).
const SCRIPT: &str = r"-- TPC-B plus a per-client gap-free ledger (mtcp demo --pg)
\set next :seq + 1
\set aid :client_id * 10000 + random(1, 10000)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO ledger VALUES (:client_id, :next, :delta);
END;
\set seq :next
";

/// Runs the demo in a fresh working directory, kept (with every process's log) on failure or
/// with `--keep`. Ctrl-C stops everything that was started.
/// What `mtcp demo --pg` takes from `mtcp demo`'s options.
pub struct Options {
    /// Keep the working directory (logs, files) instead of deleting it.
    pub keep: bool,
    /// Quieter output.
    pub quiet: bool,
}

pub async fn run(a: &Options) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mtcp-demo-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let r = tokio::select! {
        r = demo(a, &dir) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted: everything the demo started is stopped")),
    };
    if a.keep || r.is_err() {
        eprintln!(
            "working directory (logs of every process): {}",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

/// Owns the processes; dropping it (also when the demo is cancelled by Ctrl-C or fails) stops
/// the front-ends and the agent, then PostgreSQL, after saving PostgreSQL's log unless the demo
/// succeeded.
struct Running {
    pl: PgLocal,
    dir: PathBuf,
    ok: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.ok {
            let _ = std::fs::write(self.dir.join("postgresql.log"), self.pl.pg.log());
        }
    }
}

/// A step of the story.
#[derive(Default)]
struct Steps {
    drain_at: Option<Instant>,
    drained: Option<String>,
    undrained: bool,
    moved: bool,
    killed: Option<(String, Instant)>,
    restarted: bool,
}

async fn demo(a: &Options, dir: &Path) -> Result<()> {
    println!("== M-TCP demo: pgbench through PostgreSQL front-ends that are drained, moved and killed ==");
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    println!(
        "starting a throwaway PostgreSQL (initdb in a temporary directory{}), three front-ends and an agent ...",
        if root { ", server run as user postgres" } else { "" }
    );
    let opts = PgLocalOptions {
        mode: "eager".into(),
        ..Default::default()
    };
    let pl = tokio::task::block_in_place(|| PgLocal::start(&exe, dir, &opts))?;
    let mut run = Running {
        pl,
        dir: dir.to_path_buf(),
        ok: false,
    };
    let r = story(a, dir, &mut run).await;
    run.ok = r.is_ok();
    r
}

async fn story(a: &Options, dir: &Path, run: &mut Running) -> Result<()> {
    let pl = &mut run.pl;
    let version = pl.pg.psql("postgres", "SELECT version()")?;
    println!("PostgreSQL on {}:{}: {version}", pl.pg.host(), pl.pg.port());
    println!("cluster in eager mode: each front-end's sessions are replicated to the next one; commits are two-phase");
    for s in &pl.lc.servers {
        println!(
            "front-end {} (mtcp server ... pgfront) on {} (peer {}, admin {})",
            s.id, s.data, s.peer, s.admin
        );
    }
    println!(
        "agent on {} (admin {}): pgbench connects here",
        pl.lc.agent_listen, pl.lc.agent_admin
    );

    println!("pgbench -i -s 1, then {LEDGER_DDL} ...");
    tokio::task::block_in_place(|| pl.pg.pgbench_init("postgres", 1))?;
    pl.pg.psql("postgres", LEDGER_DDL)?;
    let (db, conn) = tokio_postgres::connect(&pl.pg.url("postgres"), tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL directly")?;
    tokio::spawn(conn);

    let script = dir.join("ledger.sql");
    std::fs::write(&script, SCRIPT)?;
    let out_path = dir.join("pgbench.out");
    let err_path = dir.join("pgbench.err");
    let (host, port) = pl.agent_addr();
    let args: Vec<String> = [
        "-h",
        &host,
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-n",
        "-f",
        &script.display().to_string(),
        "-D",
        "seq=0",
        "-c",
        &CLIENTS.to_string(),
        "-j",
        &THREADS.to_string(),
        "-T",
        &SECONDS.to_string(),
        "-M",
        "prepared",
        "--max-tries",
        "10",
        "postgres",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    println!("pgbench {} ...", args.join(" "));
    println!(
        "  each transaction: TPC-B's updates (each client on 10 000 accounts of its own) and INSERT INTO ledger VALUES (:client_id, :seq + 1, :delta);"
    );
    println!(
        "  a client's :seq counts its committed transactions (it advances after END succeeded)"
    );
    let mut bench = tokio::process::Command::new(mtcp_pgtmp::bin("pgbench")?)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting pgbench")?;
    let t0 = Instant::now();
    let mono0 = mtcp_agent::mono_us();
    let at = |i: Instant| i.saturating_duration_since(t0).as_secs_f64();
    let total = Duration::from_secs(SECONDS);
    let mut steps = Steps::default();
    let mut events: Vec<Event> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut last_tick = t0;
    let mut last_count = 0i64;
    let status = loop {
        let now = Instant::now();
        let el = now - t0;
        if now - last_tick >= Duration::from_secs(1) {
            last_tick = now;
            let n = ledger_count(&db).await.unwrap_or(last_count);
            if !a.quiet {
                let conns = placement(pl).await;
                println!(
                    "  [{:>5.1}s] {n:>6} transactions committed (ledger rows), {:>5}/s  sessions on {conns}",
                    el.as_secs_f64(),
                    n - last_count
                );
            }
            last_count = n;
        }
        if steps.drain_at.is_none() && el >= total / 4 {
            let s = busiest(pl).await.unwrap_or_else(|| "s1".into());
            let t = at(Instant::now());
            println!("  [{t:>5.1}s] >>> draining {s}, the front-end with most sessions (mtcp drain --id {s}) ...");
            let file = pl.lc.cluster_file.display().to_string();
            let t1 = Instant::now();
            let r = tokio::task::block_in_place(|| {
                pl.lc
                    .mtcp(&["drain", "--cluster", &file, "--id", &s, "--timeout", "20"])
            });
            match r {
                Ok(_) => events.push(Event {
                    t,
                    text: format!(
                        "drain {s} (mtcp drain): done in {:.0} ms, no session left on it",
                        t1.elapsed().as_secs_f64() * 1e3
                    ),
                }),
                Err(e) => {
                    events.push(Event {
                        t,
                        text: format!("drain {s} FAILED: {e:#}"),
                    });
                    problems.push(format!("the drain of {s} failed: {e:#}"));
                }
            }
            steps.drain_at = Some(Instant::now());
            steps.drained = Some(s);
        } else if let (false, Some(s), Some(d)) =
            (steps.undrained, steps.drained.clone(), steps.drain_at)
        {
            if d.elapsed() >= Duration::from_secs(1) {
                let t = at(Instant::now());
                match pl.lc.undrain(&s).await {
                    Ok(()) => events.push(Event {
                        t,
                        text: format!("undrain {s}: maintenance over, it takes sessions again"),
                    }),
                    Err(e) => problems.push(format!("undrain of {s} failed: {e:#}")),
                }
                steps.undrained = true;
            }
        }
        if !steps.moved && el >= total / 2 {
            let t = at(Instant::now());
            println!("  [{t:>5.1}s] >>> moving every session by hand (mtcp migrate --all) ...");
            let admin = pl.lc.agent_admin.clone();
            let r = tokio::task::block_in_place(|| {
                pl.lc.mtcp(&["migrate", "--agent", &admin, "--all"])
            });
            match r {
                Ok(out) => events.push(Event {
                    t,
                    text: format!(
                        "mtcp migrate --all: {} session(s) moved",
                        out.lines().filter(|l| l.contains(" -> ")).count()
                    ),
                }),
                Err(e) => {
                    events.push(Event {
                        t,
                        text: format!("mtcp migrate --all FAILED: {e:#}"),
                    });
                    problems.push(format!("the manual migration failed: {e:#}"));
                }
            }
            steps.moved = true;
        }
        if steps.killed.is_none() && el >= total * 3 / 4 {
            let s = busiest(pl).await.unwrap_or_else(|| "s1".into());
            let pid = pl.lc.pid(&s).unwrap_or(0);
            let t = at(Instant::now());
            println!("  [{t:>5.1}s] >>> kill -9 of {s} (pid {pid}), the front-end with most sessions ...");
            tokio::task::block_in_place(|| pl.lc.kill(&s))?;
            events.push(Event {
                t,
                text: format!("kill -9 {s} (pid {pid})"),
            });
            steps.killed = Some((s, Instant::now()));
        } else if let (false, Some((s, k))) = (steps.restarted, steps.killed.clone()) {
            if k.elapsed() >= Duration::from_secs(1) {
                let t = at(Instant::now());
                match pl.lc.restart_server_async(&s).await {
                    Ok(()) => events.push(Event {
                        t,
                        text: format!("{s} restarted (empty): three front-ends again"),
                    }),
                    Err(e) => problems.push(format!("restarting {s} failed: {e:#}")),
                }
                steps.restarted = true;
            }
        }
        if let Some(st) = bench.try_wait()? {
            break st;
        }
        if el > total + Duration::from_secs(30) {
            let _ = bench.kill().await;
            bail!(
                "pgbench did not finish within {:?}",
                total + Duration::from_secs(30)
            );
        }
        pl.lc.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = t0.elapsed();
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    println!(
        "pgbench finished after {:.1}s ({status}); its output is in {}",
        took.as_secs_f64(),
        out_path.display()
    );

    // The agent's view: every move of every session, by reason; moves of several sessions
    // for one event are shown as one line.
    let conns = pl.lc.status_async().await?;
    let MoveSummary {
        by_reason,
        failed_moves,
        from_replica,
        aborted,
    } = agent_moves(&conns, mono0, &mut events);
    events.sort_by(|x, y| x.t.total_cmp(&y.t));
    println!("\ntimeline (t = seconds since pgbench started; indented: the agent's moves):");
    for e in &events {
        println!("  t={:>6.3}s  {}", e.t, e.text);
    }

    // The database.
    let mut prepared = -1;
    let t_wait = Instant::now();
    while t_wait.elapsed() < Duration::from_secs(5) {
        prepared = one(&db, "SELECT count(*) FROM pg_prepared_xacts").await?;
        if prepared == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bench_stats = BenchStats::parse(&out);
    let rows = one(&db, "SELECT count(*) FROM ledger").await?;
    let history = one(&db, "SELECT count(*) FROM pgbench_history").await?;
    let sums = db
        .query_one(
            "SELECT (SELECT coalesce(sum(abalance), 0)::int8 FROM pgbench_accounts),
                    (SELECT coalesce(sum(tbalance), 0)::int8 FROM pgbench_tellers),
                    (SELECT coalesce(sum(bbalance), 0)::int8 FROM pgbench_branches),
                    (SELECT coalesce(sum(delta), 0)::int8 FROM pgbench_history),
                    (SELECT coalesce(sum(delta), 0)::int8 FROM ledger)",
            &[],
        )
        .await?;
    let sums: Vec<i64> = (0..5).map(|i| sums.get(i)).collect();
    let per_client = db
        .query(
            "SELECT client, count(*)::int8, min(seq), max(seq) FROM ledger GROUP BY client ORDER BY client",
            &[],
        )
        .await?;
    let per_client: Vec<(i32, i64, i32, i32)> = per_client
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();

    println!("\nreport:");
    let mut r = Report::default();
    match &bench_stats {
        Some(b) => {
            r.check(
                status.success() && b.failed == 0 && !err.contains("aborted"),
                format!(
                    "pgbench: {} transactions processed, {} failed, {} retried ({} retries), {:.0} tps; pgbench {status}",
                    b.processed, b.failed, b.retried, b.retries, b.tps
                ),
            );
            r.check(
                rows == b.processed,
                format!(
                    "ledger rows = transactions pgbench processed: {rows} = {}",
                    b.processed
                ),
            );
            r.check(
                history == b.processed,
                format!(
                    "pgbench_history rows = processed: {history} = {}",
                    b.processed
                ),
            );
        }
        None => r.check(
            false,
            format!(
                "pgbench's summary not found (exit {status}); see {}",
                out_path.display()
            ),
        ),
    }
    let gap_free = per_client
        .iter()
        .all(|&(_, n, lo, hi)| lo == 1 && i64::from(hi) == n);
    let spans: Vec<String> = per_client
        .iter()
        .map(|(c, n, lo, hi)| {
            if *lo == 1 && i64::from(*hi) == *n {
                format!("{c}:1..{hi}")
            } else {
                format!("{c}:{n} rows in {lo}..{hi}")
            }
        })
        .collect();
    r.check(
        gap_free && per_client.len() == CLIENTS as usize,
        format!(
            "per client, seqs are exactly 1..max (no gap, no duplicate): {}",
            spans.join(" ")
        ),
    );
    r.check(
        sums.iter().all(|s| *s == sums[0]),
        format!(
            "Σabalance = Σtbalance = Σbbalance = Σhistory.delta = Σledger.delta: {}",
            sums.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(" = ")
        ),
    );
    r.check(prepared == 0, format!("pg_prepared_xacts: {prepared} left"));
    let drain = by_reason.get("drain").copied().unwrap_or(0);
    let manual = by_reason.get("manual").copied().unwrap_or(0);
    let crash = by_reason.get("crash").copied().unwrap_or(0);
    r.check(
        drain > 0 && manual > 0 && crash > 0 && steps.restarted && steps.undrained,
        format!(
            "moves seen by the agent: drain {drain}, manual {manual}, crash {crash} ({from_replica} from a replica); {failed_moves} failed attempt(s)"
        ),
    );
    r.check(
        aborted.is_empty(),
        format!(
            "sessions aborted by the agent: {}",
            if aborted.is_empty() {
                "none".to_string()
            } else {
                aborted.join("; ")
            }
        ),
    );
    for p in &problems {
        r.check(false, p.clone());
    }
    if r.failed > 0 {
        let tail: Vec<&str> = err.lines().rev().take(10).collect();
        if !tail.is_empty() {
            println!("pgbench's stderr (last lines):");
            for l in tail.into_iter().rev() {
                println!("  {l}");
            }
        }
        bail!("{} check(s) failed", r.failed);
    }
    println!(
        "OK: every transaction pgbench was told committed is there exactly once, and the books balance, \
         though its {CLIENTS} sessions moved {} times between front-ends.",
        drain + manual + crash
    );
    Ok(())
}

/// Live sessions per front-end, e.g. `s1:3 s2:3 s3:2`.
async fn placement(pl: &PgLocal) -> String {
    let mut count: BTreeMap<String, usize> =
        pl.lc.servers.iter().map(|s| (s.id.clone(), 0)).collect();
    if let Ok(st) = pl.lc.status_async().await {
        for c in st.into_iter().filter(|c| c.is_live()) {
            *count.entry(c.server).or_default() += 1;
        }
    }
    count
        .iter()
        .map(|(s, n)| format!("{s}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The front-end holding most of the agent's live sessions.
async fn busiest(pl: &PgLocal) -> Option<String> {
    let st = pl.lc.status_async().await.ok()?;
    let mut count = BTreeMap::<String, usize>::new();
    for c in st.into_iter().filter(|c| c.is_live()) {
        *count.entry(c.server).or_default() += 1;
    }
    count.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s)
}
