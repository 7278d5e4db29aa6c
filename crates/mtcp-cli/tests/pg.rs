//! The PostgreSQL front-end end to end (lazy mode): real pgbench runs through the agent while
//! every connection moves every 200 ms (no failure, bank sums and an exactly-once ledger
//! intact, nothing prepared or registered left behind), a random() result that a replay would
//! change aborts the connection instead of showing another number, garbage from one client
//! leaves the others alone, a pinned session ends with 57P01 when moved, and cancel requests
//! reach the backend.

mod common;

use common::*;
use mtcp_harness::local::strip_ansi;
use mtcp_harness::pglocal::{PgLocal, PgLocalOptions, TPCB_OWN_ACCOUNTS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{error::SqlState, NoTls};

const MOVE_EVERY: Duration = Duration::from_millis(200);
/// How long a client may wait for an answer that must come promptly (an error, a close).
const PROMPT: Duration = Duration::from_secs(5);

/// A throwaway PostgreSQL, three lazy front-ends and an agent, logs in `dir`.
fn start(dir: &TempDir) -> PgLocal {
    PgLocal::start(&exe(), dir.path(), &PgLocalOptions::default()).expect("start PG + front-ends")
}

/// `mtcp migrate --agent ADMIN --all`, killed after 10 s: its stdout, or why it failed.
fn migrate_all(exe: &Path, admin: &str) -> Result<String, String> {
    let mut c = Command::new(exe)
        .args(["migrate", "--agent", admin, "--all"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    while c.try_wait().map_err(|e| e.to_string())?.is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = c.kill();
            let _ = c.wait();
            return Err("mtcp migrate hung for 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = c.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match out.status.success() {
        true => Ok(text),
        false => Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))),
    }
}

/// [`migrate_all`] of this cluster's agent.
fn move_all(pl: &PgLocal) -> Result<String, String> {
    migrate_all(&pl.lc.exe, &pl.lc.agent_admin)
}

/// Migrations the agent logged so far (`migrated` lines of `agent.log`).
fn moves_logged(pl: &PgLocal) -> usize {
    let log = std::fs::read_to_string(pl.lc.dir.join("agent.log")).unwrap_or_default();
    log.lines()
        .map(strip_ansi)
        .filter(|l| {
            l.contains("mtcp_agent::relay: migrated ")
                || l.contains("mtcp_agent::direct: migrated (fast path)")
        })
        .count()
}

/// A thread running `mtcp migrate --all` every 200 ms until stopped (at most `limit`).
struct Mover {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u32, u32)>>,
}

impl Mover {
    fn start(pl: &PgLocal, limit: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (exe, admin, flag) = (pl.lc.exe.clone(), pl.lc.agent_admin.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            let t0 = Instant::now();
            while !flag.load(Ordering::Relaxed) && t0.elapsed() < limit {
                std::thread::sleep(MOVE_EVERY);
                // Fails between pgbench's connections (nothing to move): counted, not fatal.
                match migrate_all(&exe, &admin) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        });
        Mover {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread; how many `mtcp migrate --all` calls succeeded and failed.
    fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("running");
        t.join().expect("mover thread panicked")
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a pgbench run reported.
struct Bench {
    processed: u64,
    failed: u64,
    out: String,
}

/// Runs pgbench through the agent (`args`, split at spaces, after the connection options) in
/// `dir`, its output kept in `dir/pgbench-NAME.out`; asserts it exited 0, no client aborted.
fn pgbench(pl: &PgLocal, dir: &Path, name: &str, args: &str, limit: Duration) -> Bench {
    let out_path = dir.join(format!("pgbench-{name}.out"));
    let out = std::fs::File::create(&out_path).expect("pgbench output file");
    let port = pl.agent_addr().1.to_string();
    let mut c = Command::new(mtcp_pgtmp::bin("pgbench").expect("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(args.split_whitespace())
        .arg("postgres")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start pgbench");
    let ok = wait_child(&mut c, "pgbench", limit);
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(ok, "pgbench {name} failed:\n{out}");
    assert!(
        !out.contains("aborted"),
        "pgbench {name}: a client aborted:\n{out}"
    );
    let number = |prefix: &str| -> u64 {
        let line = out.lines().find_map(|l| l.trim().strip_prefix(prefix));
        let line = line.unwrap_or_else(|| panic!("no {prefix:?} in pgbench's output:\n{out}"));
        let n = line.trim().split(|c: char| !c.is_ascii_digit()).next();
        n.and_then(|n| n.parse().ok()).expect("a number")
    };
    let processed = number("number of transactions actually processed:");
    let failed = number("number of failed transactions:");
    Bench {
        processed,
        failed,
        out,
    }
}

/// Waits (up to 3 s: the front-ends sweep every second) until no backend is registered.
fn assert_registry_empties(pl: &PgLocal) {
    let t0 = Instant::now();
    loop {
        let n = sql(pl, "SELECT count(*) FROM mtcp.backends");
        if n == "0" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{n} rows left in mtcp.backends 3 s after the clients ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fresh pgbench tables (scale 1), then `pgbench -c 8 -j 2 -T 20 -M mode` of
/// [`TPCB_OWN_ACCOUNTS`] with every connection moved every 200 ms, through front-ends with
/// `--two-phase on|off` (off, in lazy mode: commits run under `lock_state` with no commit point),
/// with an agent given `agent_args`.
fn pgbench_with_moves(mode: &str, two_phase: bool, agent_args: &[&str]) {
    let fast = if agent_args.is_empty() {
        ""
    } else {
        "_fast_path"
    };
    let name = format!("pgbench_moves_every_200ms_{mode}{fast}");
    if !mtcp_pgtmp::require(&name) {
        return;
    }
    let dir = TempDir::new(&format!("pg-bench-{mode}{fast}"));
    let opts = PgLocalOptions {
        two_phase,
        agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let mut pl = PgLocal::start(&exe(), dir.path(), &opts).expect("start PG + front-ends");
    pl.pg.pgbench_init("postgres", 1).expect("pgbench -i");
    let script = dir.path().join("tpcb.sql");
    std::fs::write(&script, TPCB_OWN_ACCOUNTS).unwrap();
    let mover = Mover::start(&pl, Duration::from_secs(40));
    let args = format!("-c 8 -j 2 -T 20 -M {mode} -f {}", script.display());
    let b = pgbench(&pl, dir.path(), mode, &args, Duration::from_secs(60));
    let (ok, failed) = mover.finish();
    let moves = moves_logged(&pl);
    eprintln!(
        "{name}: {} transactions, {moves} moves ({ok} migrate calls ok, {failed} failed)",
        b.processed
    );
    assert_eq!(b.failed, 0, "failed transactions:\n{}", b.out);
    assert!(b.processed > 0, "{}", b.out);
    let sums = sql(
        &pl,
        "SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts),
                (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches),
                (SELECT sum(delta) FROM pgbench_history), (SELECT count(*) FROM pg_prepared_xacts)",
    );
    let v: Vec<&str> = sums.split('|').collect();
    assert_eq!(v[0], b.processed.to_string(), "history rows vs processed");
    assert!(
        v[1] == v[4] && v[2] == v[4] && v[3] == v[4],
        "Σabalance|Σtbalance|Σbbalance|Σdelta differ: {sums}"
    );
    assert_eq!(v[5], "0", "prepared transactions left");
    assert!(moves >= 20, "only {moves} moves happened");
    assert_registry_empties(&pl);
    pl.lc.check_alive().expect("every mtcp process still runs");
}

#[test]
fn pgbench_moves_every_200ms_simple() {
    pgbench_with_moves("simple", false, &[]);
}

#[test]
fn pgbench_moves_every_200ms_extended() {
    pgbench_with_moves("extended", true, &[]);
}

#[test]
fn pgbench_moves_every_200ms_prepared() {
    pgbench_with_moves("prepared", true, &[]);
}

/// The same over the kernel fast path (root: TCP_REPAIR, nftables): pgbench's own connections
/// move, and the front-ends read and write them directly.
#[test]
fn pgbench_moves_every_200ms_simple_fast_path() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: the kernel fast path needs TCP_REPAIR and nftables; pgbench_moves_every_200ms_simple_fast_path is NOT run !!!");
        return;
    }
    pgbench_with_moves("simple", false, &["--fast-path"]);
}

/// Each client appends its own gap-free sequence (`seq` lives on in pgbench across a client's
/// transactions) and moves money, in one transaction.
const LEDGER_SCRIPT: &str = "\\set seq :seq + 1
\\set delta random(-5000, 5000)
\\set aid random(1, 100000)
BEGIN;
INSERT INTO ledger VALUES (:client_id, :seq, :delta);
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
END;
";

/// Transactions per client in pgbench's `-l` logs `dir/PREFIX.*` (failed ones excluded).
fn logged_per_client(dir: &Path, prefix: &str) -> BTreeMap<u64, u64> {
    let mut per = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path: PathBuf = e.path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if !file.starts_with(&format!("{prefix}.")) {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // client_id transaction_no time script_no time_epoch time_us …; time is "failed"
            // or "skipped" for transactions that did not commit.
            if f.len() >= 3 && f[2].parse::<u64>().is_ok() {
                *per.entry(f[0].parse().unwrap()).or_default() += 1;
            }
        }
    }
    per
}

#[test]
fn exactly_once_ledger() {
    if !mtcp_pgtmp::require("exactly_once_ledger") {
        return;
    }
    let dir = TempDir::new("pg-ledger");
    let mut pl = start(&dir);
    let script = dir.path().join("ledger.sql");
    std::fs::write(&script, LEDGER_SCRIPT).unwrap();
    for mode in ["prepared", "simple"] {
        pl.pg.pgbench_init("postgres", 1).expect("pgbench -i");
        sql(&pl, "DROP TABLE IF EXISTS ledger; CREATE TABLE ledger(client int, seq int, delta int, PRIMARY KEY(client, seq))");
        let moves0 = moves_logged(&pl);
        let mover = Mover::start(&pl, Duration::from_secs(35));
        let prefix = format!("ledger-{mode}");
        let args = format!(
            "-n -c 8 -j 2 -T 15 -M {mode} -D seq=0 -f {} -l --log-prefix {prefix}",
            script.display()
        );
        let b = pgbench(&pl, dir.path(), &prefix, &args, Duration::from_secs(50));
        mover.finish();
        let moves = moves_logged(&pl) - moves0;
        eprintln!(
            "exactly_once_ledger {mode}: {} transactions, {moves} moves",
            b.processed
        );
        assert_eq!(b.failed, 0, "failed transactions:\n{}", b.out);
        let rows = sql(
            &pl,
            "SELECT client, count(*), min(seq), max(seq) FROM ledger GROUP BY client ORDER BY client",
        );
        let logged = logged_per_client(dir.path(), &prefix);
        let mut total = 0;
        for r in rows.lines() {
            let v: Vec<u64> = r.split('|').map(|x| x.parse().unwrap()).collect();
            let (client, n, min, max) = (v[0], v[1], v[2], v[3]);
            assert!(
                min == 1 && max == n,
                "{mode}: client {client}'s seqs are not 1..{n}: min {min}, max {max}"
            );
            assert_eq!(
                logged.get(&client),
                Some(&n),
                "{mode}: client {client}: rows vs pgbench's log"
            );
            total += n;
        }
        assert_eq!(
            logged.len(),
            rows.lines().count(),
            "{mode}: clients in the log vs the ledger"
        );
        assert_eq!(total, b.processed, "{mode}: ledger rows vs processed");
        let sums = sql(&pl, "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM ledger), (SELECT count(*) FROM pg_prepared_xacts)");
        assert_eq!(
            sums, "t|0",
            "{mode}: Σabalance = Σdelta | prepared transactions left"
        );
        assert!(moves >= 20, "{mode}: only {moves} moves happened");
        assert_registry_empties(&pl);
    }
    pl.lc.check_alive().expect("every mtcp process still runs");
}

/// Moves a test's one session: waits until it is the agent's only live connection (a cancel
/// request's or a garbage connection may still be closing), then `mtcp migrate --all`.
async fn move_the_session(pl: &PgLocal) -> Result<String, String> {
    let t0 = Instant::now();
    loop {
        let st = pl.lc.status_async().await.expect("agent status");
        if st.iter().filter(|c| c.is_live()).count() == 1 {
            break;
        }
        assert!(t0.elapsed() < PROMPT, "not one live connection: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocking(|| move_all(pl))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_before_a_move_never_shows_a_different_number() {
    if !mtcp_pgtmp::require("random_before_a_move_never_shows_a_different_number") {
        return;
    }
    let dir = TempDir::new("pg-random");
    let pl = blocking(|| start(&dir));
    blocking(|| sql(&pl, "CREATE TABLE t(x float8)"));

    // Control: a deterministic answer replays identically, so the transaction survives a move.
    let (c, task) = connect(&pl).await;
    c.simple_query("BEGIN").await.unwrap();
    assert_eq!(value(&c, "SELECT 42").await.unwrap(), "42");
    c.simple_query("INSERT INTO t VALUES (42)").await.unwrap();
    move_the_session(&pl)
        .await
        .expect("move inside the deterministic transaction");
    assert_eq!(value(&c, "SELECT x FROM t").await.unwrap(), "42");
    c.simple_query("COMMIT")
        .await
        .expect("COMMIT after the move");
    assert_eq!(
        blocking(|| sql(&pl, "SELECT string_agg(x::text, ',') FROM t")),
        "42"
    );
    drop(c);
    let _ = task.await;

    // random(): the replay on the destination draws another number.
    let (c, task) = connect(&pl).await;
    c.simple_query("BEGIN").await.unwrap();
    let v = value(&c, "SELECT random()").await.unwrap();
    c.simple_query(&format!("INSERT INTO t VALUES ({v})"))
        .await
        .unwrap();
    let moved = move_the_session(&pl).await;
    eprintln!("move after random(): {moved:?}");
    let seen = tokio::time::timeout(PROMPT, value(&c, "SELECT x FROM t WHERE x <> 42"))
        .await
        .expect("the session hangs after the move");
    if let Ok(shown) = &seen {
        assert_eq!(*shown, v, "the client saw a different random number");
    }
    let commit = tokio::time::timeout(PROMPT, c.simple_query("COMMIT"))
        .await
        .expect("COMMIT hangs after the move");
    assert!(
        seen.is_err() && commit.is_err(),
        "the session went on after a move that changed random(): {seen:?} {commit:?}"
    );
    let _ = tokio::time::timeout(PROMPT, task)
        .await
        .expect("connection ends");
    blocking(|| {
        assert_eq!(
            sql(&pl, "SELECT string_agg(x::text, ',') FROM t"),
            "42",
            "committed"
        );
        assert_eq!(sql(&pl, "SELECT count(*) FROM pg_prepared_xacts"), "0");
    });
}

/// Sends `bytes` on a new raw connection through the agent (after a complete startup if
/// `startup`), half-closes it if `close`, and reads to its end (at most [`PROMPT`]: panics if
/// it stays open). Returns "SEVERITY SQLSTATE" of the first ErrorResponse, if one came.
async fn poke(pl: &PgLocal, startup: bool, bytes: &[u8], close: bool) -> Option<String> {
    let mut s = TcpStream::connect(&pl.lc.agent_listen).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    if startup {
        s.write_all(&startup_packet()).await.unwrap();
        // ReadyForQuery ends the answer to the startup: 'Z', length 5, status.
        while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
            let n = tokio::time::timeout(PROMPT, s.read(&mut b)).await;
            let n = n.expect("no ReadyForQuery after the startup").unwrap();
            assert!(n > 0, "closed during the startup: {got:?}");
            got.extend_from_slice(&b[..n]);
        }
        got.clear();
    }
    let _ = s.write_all(bytes).await;
    if close {
        let _ = s.shutdown().await;
    }
    let read = async {
        while let Ok(n @ 1..) = s.read(&mut b).await {
            got.extend_from_slice(&b[..n]);
        }
    };
    let what = String::from_utf8_lossy(&bytes[..bytes.len().min(12)]).into_owned();
    tokio::time::timeout(PROMPT, read)
        .await
        .unwrap_or_else(|_| panic!("{what:?}…: connection still open after {PROMPT:?}"));
    let mut rest = &got[..];
    while rest.len() >= 5 {
        let end = (1 + u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize).min(rest.len());
        if rest[0] == b'E' {
            let field = |t: u8| {
                let f = rest[5..end]
                    .split(|&b| b == 0)
                    .find(|f| f.first() == Some(&t));
                String::from_utf8_lossy(&f.unwrap_or(b" ")[1..]).into_owned()
            };
            return Some(format!("{} {}", field(b'S'), field(b'C')));
        }
        rest = &rest[end..];
    }
    None
}

fn startup_packet() -> Vec<u8> {
    let body = b"\0\x03\0\0user\0postgres\0database\0postgres\0\0";
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_one_client_leaves_others_alone() {
    if !mtcp_pgtmp::require("garbage_from_one_client_leaves_others_alone") {
        return;
    }
    let dir = TempDir::new("pg-garbage");
    let mut pl = blocking(|| start(&dir));
    blocking(|| sql(&pl, "CREATE TABLE g(a int)"));
    let (c, task) = connect(&pl).await;
    c.simple_query("BEGIN; INSERT INTO g VALUES (1)")
        .await
        .unwrap();

    // (a) Random bytes instead of a startup packet (16 KiB: whatever length the first four
    // bytes claim, PostgreSQL's startup limit of 10 000 bytes is there or exceeded).
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let mut junk = vec![0u8; 16 << 10];
    rand::RngCore::fill_bytes(&mut rng, &mut junk);
    if let Some(e) = poke(&pl, false, &junk, false).await {
        assert!(e.starts_with("FATAL "), "random bytes: {e}");
    }
    // (b) A message claiming 2^31-1 bytes.
    let e = poke(&pl, true, b"Q\x7f\xff\xff\xffSELECT 1", false).await;
    assert_eq!(e.as_deref(), Some("FATAL 08P01"), "length 2^31-1");
    // (c) A truncated startup packet, and a truncated Query after a startup, then a close.
    poke(&pl, false, &startup_packet()[..12], true).await;
    poke(&pl, true, b"Q\0\0\0\x64SELECT", true).await;
    // (d) A Query whose length (3) is less than the length field itself.
    let e = poke(&pl, true, b"Q\0\0\0\x03SELECT 1;\0", false).await;
    assert_eq!(e.as_deref(), Some("FATAL 08P01"), "length 3");

    // The other session goes on, also across a move, and commits.
    c.simple_query("INSERT INTO g VALUES (2)").await.unwrap();
    move_the_session(&pl).await.expect("move the good session");
    c.simple_query("INSERT INTO g VALUES (3); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        value(&c, "SELECT string_agg(a::text, ',' ORDER BY a) FROM g")
            .await
            .unwrap(),
        "1,2,3"
    );
    drop(c);
    let _ = task.await;
    blocking(|| pl.lc.check_alive()).expect("every mtcp process still runs");
}

/// The SQLSTATE a failed session reported: from the failed call, else from its connection
/// task (a FATAL that arrived while no query was waiting ends the task with it).
async fn sqlstate(e: tokio_postgres::Error, task: ConnTask) -> Option<SqlState> {
    if let Some(code) = e.code() {
        return Some(code.clone());
    }
    let end = tokio::time::timeout(PROMPT, task)
        .await
        .expect("connection task ends");
    end.expect("connection task").err()?.code().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_table_session_ends_with_57p01_on_a_move() {
    if !mtcp_pgtmp::require("temp_table_session_ends_with_57p01_on_a_move") {
        return;
    }
    let dir = TempDir::new("pg-temp");
    let pl = blocking(|| start(&dir));
    let (c, task) = connect(&pl).await;
    c.simple_query("CREATE TEMP TABLE x(a int)").await.unwrap();
    c.simple_query("INSERT INTO x VALUES (1)").await.unwrap();
    let moved = move_the_session(&pl).await;
    eprintln!("move of the pinned session: {moved:?}");
    let t0 = Instant::now();
    let r = tokio::time::timeout(PROMPT, c.simple_query("SELECT a FROM x"))
        .await
        .expect("the query hangs after the move");
    let e = r.expect_err("a session with a temporary table went on after a move");
    let code = sqlstate(e, task).await;
    assert_eq!(code, Some(SqlState::ADMIN_SHUTDOWN), "expected FATAL 57P01");
    assert!(t0.elapsed() < PROMPT, "57P01 took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_backend() {
    if !mtcp_pgtmp::require("cancel_request_reaches_the_backend") {
        return;
    }
    let dir = TempDir::new("pg-cancel");
    let pl = blocking(|| start(&dir));
    let (c, _task) = connect(&pl).await;
    let c = Arc::new(c);
    // Before any move, and after one (the key stays the same; the backend is a new one).
    for round in ["before a move", "after a move"] {
        if round == "after a move" {
            move_the_session(&pl).await.expect("move");
        }
        let c2 = c.clone();
        let q = tokio::spawn(async move { c2.simple_query("SELECT pg_sleep(30)").await.map(drop) });
        let active = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'";
        blocking(|| wait_for("pg_sleep to run", PROMPT, || sql(&pl, active) == "1"));
        let t0 = Instant::now();
        c.cancel_token()
            .cancel_query(NoTls)
            .await
            .expect("send the cancel request");
        let r = tokio::time::timeout(PROMPT, q)
            .await
            .unwrap_or_else(|_| panic!("{round}: pg_sleep(30) not cancelled within {PROMPT:?}"));
        let e = r.unwrap().expect_err("pg_sleep(30) finished?");
        assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{round}: {e:?}");
        eprintln!("{round}: cancelled in {:?}", t0.elapsed());
        assert_eq!(
            value(&c, "SELECT 1").await.unwrap(),
            "1",
            "{round}: session goes on"
        );
    }
}

/// A session that ends gives its backend back to the front-end's pool, reset: the next session
/// gets the same backend process, with none of the last one's settings, prepared statements or
/// open transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_backend_carries_nothing_of_its_last_session() {
    if !mtcp_pgtmp::require("a_pooled_backend_carries_nothing_of_its_last_session") {
        return;
    }
    let dir = TempDir::new("pg-pool");
    // One front-end: every session lands on the same pool.
    let opts = PgLocalOptions {
        servers: 1,
        ..Default::default()
    };
    let pl = blocking(|| PgLocal::start(&exe(), dir.path(), &opts)).expect("start");
    blocking(|| sql(&pl, "CREATE TABLE pooled (a int)"));
    let (a, task) = connect(&pl).await;
    let pid = value(&a, "SELECT pg_backend_pid()").await.unwrap();
    // (Each on its own: a PREPARE inside a multi-statement string pins a session.)
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    a.batch_execute("PREPARE p AS SELECT 1").await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO pooled VALUES (1)")
        .await
        .unwrap();
    assert_eq!(value(&a, "SHOW work_mem").await.unwrap(), "7MB");
    // Terminate with the transaction open.
    drop(a);
    let _ = task.await;
    let released = format!(
        "SELECT (SELECT count(*) FROM mtcp.backends WHERE pid = {pid}) = 0 \
         AND (SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}) = 1"
    );
    blocking(|| {
        wait_for("the backend to be released to the pool", PROMPT, || {
            sql(&pl, &released) == "t"
        })
    });
    let (b, _task) = connect(&pl).await;
    assert_eq!(
        value(&b, "SELECT pg_backend_pid()").await.unwrap(),
        pid,
        "the second session did not get the pooled backend"
    );
    let default_work_mem = blocking(|| sql(&pl, "SHOW work_mem"));
    assert_eq!(value(&b, "SHOW work_mem").await.unwrap(), default_work_mem);
    assert_eq!(
        value(&b, "SELECT count(*) FROM pg_prepared_statements")
            .await
            .unwrap(),
        "0"
    );
    assert_eq!(value(&b, "SELECT count(*) FROM pooled").await.unwrap(), "0");
    assert_eq!(blocking(|| sql(&pl, "SELECT count(*) FROM pooled")), "0");
    // It is registered again, for the new session.
    assert_eq!(
        blocking(|| sql(
            &pl,
            &format!("SELECT count(*) FROM mtcp.backends WHERE pid = {pid}")
        )),
        "1"
    );
}
