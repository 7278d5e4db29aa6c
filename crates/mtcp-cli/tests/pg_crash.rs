//! The PostgreSQL front-end in eager mode: a front-end killed at each step of the commit path,
//! and pgbench while serving front-ends are `kill -9`ed and one is stopped and continued. A
//! client told COMMIT has its transaction exactly once; a client told anything else has it at
//! most once; PostgreSQL's own sums agree.

mod common;

use common::{assert_tpcb_consistent, exe, TempDir};
use mtcp_harness::pglocal::{PgLocal, PgLocalOptions, TPCB_OWN_ACCOUNTS};
use std::process::Command;
use std::time::{Duration, Instant};

fn eager(two_phase: bool, app_args_for: Vec<(String, Vec<String>)>) -> PgLocalOptions {
    PgLocalOptions {
        mode: "eager".into(),
        two_phase,
        app_args_for,
        ..Default::default()
    }
}

/// `psql -c` each of `cmds` in one session through the agent: (success, stdout + stderr).
fn psql_agent(pl: &PgLocal, cmds: &[&str]) -> (bool, String) {
    let (host, port) = pl.agent_addr();
    let mut c = Command::new(mtcp_pgtmp::bin("psql").expect("psql"));
    c.args([
        "-X",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        &host,
        "-p",
        &port.to_string(),
    ]);
    c.args(["-U", "postgres", "-d", "postgres"]);
    for q in cmds {
        c.args(["-c", q]);
    }
    let out = c.output().expect("run psql");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn q(pl: &PgLocal, sql: &str) -> String {
    pl.pg.psql("postgres", sql).expect(sql)
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// s1 dies at each step of its first commit; the transaction is there once if the client was
/// told COMMIT, and not at all otherwise — with and without two-phase commit.
#[test]
fn a_crash_at_each_commit_step() {
    if !mtcp_pgtmp::require("a_crash_at_each_commit_step") {
        return;
    }
    for two_phase in [true, false] {
        for step in ["prepared", "durable", "committed", "replied"] {
            let dir = TempDir::new(&format!("pgcrash-{step}-{two_phase}"));
            let hook = vec![(
                "s1".to_string(),
                vec!["--crash-at".to_string(), step.to_string()],
            )];
            let mut pl =
                PgLocal::start(&exe(), dir.path(), &eager(two_phase, hook)).expect("start");
            q(&pl, "CREATE TABLE t (id int PRIMARY KEY, v text)");
            let (ok, out) =
                psql_agent(&pl, &["BEGIN", "INSERT INTO t VALUES (1, 'one')", "COMMIT"]);
            let died = pl.lc.reap_exited().iter().any(|(n, _)| n == "s1");
            assert!(
                died,
                "{step}/{two_phase}: s1 did not die at its crash point; psql said: {out}"
            );
            let rows: u32 = q(&pl, "SELECT count(*) FROM t").parse().unwrap();
            eprintln!("crash at {step}, two-phase {two_phase}: psql ok={ok}, rows={rows}");
            if ok {
                assert!(out.contains("COMMIT"), "{step}: {out}");
                assert_eq!(rows, 1, "{step}/{two_phase}: told COMMIT, so exactly once");
            } else {
                assert_eq!(
                    rows, 0,
                    "{step}/{two_phase}: not told COMMIT ({out}), so not at all"
                );
                assert!(
                    out.contains("40001") || out.contains("could not serialize"),
                    "{out}"
                );
            }
            // Only a durable point without two-phase commit leaves the outcome to an origin
            // that died before COMMIT: that transaction is rolled back and the client told so.
            let expect_ok = two_phase || step != "durable";
            assert_eq!(ok, expect_ok, "{step}/{two_phase}: {out}");
            eventually(
                "prepared transactions resolved",
                Duration::from_secs(5),
                || q(&pl, "SELECT count(*) FROM pg_prepared_xacts") == "0",
            );
            // The session goes on afterwards on its new server.
            let (ok, out) = psql_agent(
                &pl,
                &["INSERT INTO t VALUES (2, 'two')", "SELECT count(*) FROM t"],
            );
            assert!(ok, "{out}");
        }
    }
}

/// A statement prepared inside the transaction whose commit the front-end dies in is still
/// there for the rest of the session on the server that finished the commit: the commit point
/// carries the session's prepared statements as they are then (`lab_pg` found pgbench's
/// `-M prepared` clients told "prepared statement P_1 does not exist" after a crash in their
/// first transaction's commit).
#[test]
fn a_statement_prepared_in_a_transaction_outlives_a_crash_in_its_commit() {
    if !mtcp_pgtmp::require("a_statement_prepared_in_a_transaction_outlives_a_crash_in_its_commit")
    {
        return;
    }
    for (two_phase, step) in [(true, "durable"), (true, "committed"), (false, "committed")] {
        let dir = TempDir::new(&format!("pgcrash-prepared-{step}-{two_phase}"));
        let hook = vec![(
            "s1".to_string(),
            vec!["--crash-at".to_string(), step.to_string()],
        )];
        let mut pl = PgLocal::start(&exe(), dir.path(), &eager(two_phase, hook)).expect("start");
        q(&pl, "CREATE TABLE t (id int PRIMARY KEY)");
        let (ok, out) = psql_agent(
            &pl,
            &[
                "BEGIN",
                "PREPARE p AS SELECT 41 + $1",
                "SET application_name = 'moved'",
                "INSERT INTO t VALUES (1)",
                "COMMIT",
                "EXECUTE p(1)",
                "SHOW application_name",
            ],
        );
        let died = pl.lc.reap_exited().iter().any(|(n, _)| n == "s1");
        assert!(
            died,
            "{step}/{two_phase}: s1 did not die at its crash point: {out}"
        );
        assert!(ok, "{step}/{two_phase}: {out}");
        assert!(out.contains("42"), "{step}/{two_phase}: EXECUTE p: {out}");
        assert!(
            out.contains("moved"),
            "{step}/{two_phase}: the setting: {out}"
        );
        assert_eq!(q(&pl, "SELECT count(*) FROM t"), "1", "{step}/{two_phase}");
    }
}

/// pgbench (TPC-B, prepared) while the serving front-end is killed every 3 s and restarted, and
/// one front-end is stopped for 2 s: no failed transaction, and the database adds up.
#[test]
fn pgbench_prepared_survives_kill_9_and_sigstop() {
    pgbench_through_faults("prepared");
}

#[test]
fn pgbench_extended_survives_kill_9_and_sigstop() {
    pgbench_through_faults("extended");
}

#[test]
fn pgbench_simple_survives_kill_9_and_sigstop() {
    pgbench_through_faults("simple");
}

fn pgbench_through_faults(mode: &str) {
    if !mtcp_pgtmp::require(&format!("pgbench_{mode}_survives_kill_9_and_sigstop")) {
        return;
    }
    let dir = TempDir::new(&format!("pgcrash-pgbench-{mode}"));
    let mut pl = PgLocal::start(&exe(), dir.path(), &eager(true, Vec::new())).expect("start");
    pl.pg.pgbench_init("postgres", 1).expect("pgbench -i");
    let (host, port) = pl.agent_addr();
    // TPC-B with each client on its own accounts: with the stock script, a transaction
    // replayed after a crash re-reads an account another client may have changed in the gap,
    // and the runtime aborts that client (by design: never a wrong number; seen once in CI).
    // Disjoint accounts keep every replay identical, so any abort here is a real failure.
    let script = dir.path().join("tpcb-own-accounts.sql");
    std::fs::write(&script, TPCB_OWN_ACCOUNTS).expect("write script");
    let bench = Command::new(mtcp_pgtmp::bin("pgbench").expect("pgbench"))
        .args(["-h", &host, "-p", &port.to_string(), "-U", "postgres"])
        .arg("-f")
        .arg(&script)
        .args([
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            "20",
            "-M",
            "prepared",
            "--max-tries",
            "10",
        ])
        .arg("postgres")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    let mut faults = Vec::new();
    for round in 0..5 {
        std::thread::sleep(Duration::from_secs(3));
        let serving = busiest(&pl).unwrap_or_else(|| "s1".into());
        if round == 2 {
            pl.lc.sigstop(&serving).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            pl.lc.sigcont(&serving).unwrap();
            faults.push(format!("SIGSTOP {serving} 2 s"));
        } else {
            pl.lc.kill(&serving).unwrap();
            faults.push(format!("kill -9 {serving}"));
            std::thread::sleep(Duration::from_millis(500));
            pl.lc.restart_server(&serving).unwrap();
        }
    }
    // pgbench -T 20 ends by itself; a session stuck on a lock (a transaction left prepared)
    // must fail the test, not hang it.
    let mut bench = bench;
    let t0 = Instant::now();
    while bench.try_wait().expect("pgbench").is_none() {
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = bench.kill();
            let _ = bench.wait();
            panic!(
                "{mode}: pgbench still running 90 s after it started (faults: {faults:?}); prepared: [{}]; waiting: [{}]",
                q(&pl, "SELECT string_agg(gid, ', ') FROM pg_prepared_xacts"),
                q(&pl, "SELECT string_agg(pid || ' ' || wait_event_type || ': ' || left(query, 40), '; ') FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = bench.wait_with_output().expect("pgbench");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{mode}: faults: {faults:?}\n{text}");
    assert!(out.status.success(), "pgbench failed:\n{text}");
    assert_tpcb_consistent(&text, mode, |sql| q(&pl, sql));
    eventually(
        "no prepared transaction left",
        Duration::from_secs(5),
        || q(&pl, "SELECT count(*) FROM pg_prepared_xacts") == "0",
    );
}

/// The server holding most of the agent's connections.
fn busiest(pl: &PgLocal) -> Option<String> {
    let st = pl.lc.status().ok()?;
    let mut count = std::collections::HashMap::<String, usize>::new();
    for c in st {
        *count.entry(c.server).or_default() += 1;
    }
    count.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s)
}

/// What a front-end that died inside the commit path leaves when no other takes the session
/// over (its client and agent gone too): a prepared transaction holding its locks. The
/// front-ends roll it back once it is older than `--orphan-after-secs`.
#[test]
fn an_orphaned_prepared_transaction_is_rolled_back() {
    if !mtcp_pgtmp::require("an_orphaned_prepared_transaction_is_rolled_back") {
        return;
    }
    let dir = TempDir::new("pgcrash-orphan");
    let fast = vec!["--orphan-after-secs".to_string(), "1".to_string()];
    let all = ["s1", "s2", "s3"]
        .map(|s| (s.to_string(), fast.clone()))
        .to_vec();
    let pl = PgLocal::start(&exe(), dir.path(), &eager(true, all)).expect("start");
    q(&pl, "CREATE TABLE t (id int PRIMARY KEY)");
    let gid = "mtcp:00112233445566778899aabbccddeeff:0:0";
    q(
        &pl,
        &format!("BEGIN; INSERT INTO t VALUES (7); PREPARE TRANSACTION '{gid}'"),
    );
    assert_eq!(q(&pl, "SELECT count(*) FROM pg_prepared_xacts"), "1");
    eventually("the orphan rolled back", Duration::from_secs(15), || {
        q(&pl, "SELECT count(*) FROM pg_prepared_xacts") == "0"
    });
    assert_eq!(
        q(&pl, "SELECT count(*) FROM t"),
        "0",
        "rolled back, not committed"
    );
    // The row's lock is free again.
    q(&pl, "INSERT INTO t VALUES (7)");
}
