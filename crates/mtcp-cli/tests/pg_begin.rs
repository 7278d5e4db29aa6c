//! A plain BEGIN is answered by the front-end at once and runs on PostgreSQL with the
//! transaction's first statement (decision 68): the backend stays idle until that statement
//! comes, which then runs inside the transaction — sent as a simple Query, an extended-protocol
//! batch, or a COMMIT right after the BEGIN; the BEGIN itself sent as a simple Query or by the
//! extended protocol (unnamed, or a prepared statement) — and `--defer-begin off` runs every
//! BEGIN when it comes. Each case checks the table's rows directly on PostgreSQL.

mod common;

use common::*;
use mtcp_harness::pglocal::{PgLocal, PgLocalOptions};
use tokio_postgres::Client;

fn start(dir: &TempDir, defer: bool) -> PgLocal {
    let opts = PgLocalOptions {
        servers: 1,
        app_args_for: if defer {
            Vec::new()
        } else {
            vec![("s1".into(), vec!["--defer-begin".into(), "off".into()])]
        },
        ..Default::default()
    };
    PgLocal::start(&exe(), dir.path(), &opts).expect("start PG + a front-end")
}

/// The session's backend as PostgreSQL sees it: `state` of pg_stat_activity.
fn state(pl: &PgLocal, pid: &str) -> String {
    sql(
        pl,
        &format!("SELECT state FROM pg_stat_activity WHERE pid = {pid}"),
    )
}

/// A session through the agent and its backend's pid.
async fn session(pl: &PgLocal) -> (Client, String) {
    let (c, _task) = connect(pl).await;
    let pid = value(&c, "SELECT pg_backend_pid()").await.unwrap();
    (c, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_runs_with_the_transactions_first_statement() {
    if !mtcp_pgtmp::require("a_begin_runs_with_the_transactions_first_statement") {
        return;
    }
    let dir = TempDir::new("pg-begin");
    let pl = blocking(|| start(&dir, true));
    blocking(|| sql(&pl, "CREATE TABLE b (x int)"));
    let (c, pid) = session(&pl).await;

    // A simple Query after the BEGIN: the BEGIN runs with it, and ROLLBACK undoes it.
    c.simple_query("BEGIN").await.expect("BEGIN");
    assert_eq!(blocking(|| state(&pl, &pid)), "idle", "BEGIN ran at once");
    c.simple_query("INSERT INTO b VALUES (1)")
        .await
        .expect("INSERT");
    assert_eq!(blocking(|| state(&pl, &pid)), "idle in transaction");
    c.simple_query("ROLLBACK").await.expect("ROLLBACK");
    assert_eq!(blocking(|| sql(&pl, "SELECT count(*) FROM b")), "0");

    // An extended-protocol statement after it: the BEGIN runs first, by itself.
    c.simple_query("start transaction;").await.expect("START");
    let n = c
        .execute("INSERT INTO b VALUES ($1)", &[&2i32])
        .await
        .expect("extended INSERT");
    assert_eq!(n, 1);
    assert_eq!(
        blocking(|| sql(&pl, "SELECT count(*) FROM b")),
        "0",
        "visible before COMMIT"
    );
    c.simple_query("COMMIT").await.expect("COMMIT");
    assert_eq!(
        blocking(|| sql(&pl, "SELECT string_agg(x::text, ',') FROM b")),
        "2"
    );

    // A COMMIT right after the BEGIN (the commit path runs queries of its own first).
    c.simple_query("BEGIN WORK").await.expect("BEGIN WORK");
    c.simple_query("COMMIT").await.expect("empty COMMIT");
    assert_eq!(blocking(|| state(&pl, &pid)), "idle");

    // A BEGIN with a transaction mode is not deferred: its errors reach the client as such.
    let e = c
        .simple_query("BEGIN ISOLATION LEVEL NONSENSE")
        .await
        .expect_err("a bad BEGIN");
    assert_eq!(e.code().map(|s| s.code()), Some("42601"), "{e}");
    c.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("BEGIN RR");
    assert_eq!(blocking(|| state(&pl, &pid)), "idle in transaction");
    assert_eq!(
        value(&c, "SHOW transaction_isolation").await.unwrap(),
        "repeatable read"
    );
    c.simple_query("INSERT INTO b VALUES (3); COMMIT")
        .await
        .expect("INSERT; COMMIT");
    assert_eq!(
        blocking(|| sql(&pl, "SELECT string_agg(x::text, ',' ORDER BY x) FROM b")),
        "2,3"
    );
    // The session is still whole.
    assert_eq!(value(&c, "SELECT 40 + 2").await.unwrap(), "42");

    // By the extended protocol, unnamed: Parse/Bind/Describe/Execute/Sync in one batch.
    c.query_typed("BEGIN", &[]).await.expect("extended BEGIN");
    assert_eq!(
        blocking(|| state(&pl, &pid)),
        "idle",
        "extended BEGIN ran at once"
    );
    c.query_typed("INSERT INTO b VALUES (5)", &[])
        .await
        .expect("extended INSERT");
    assert_eq!(blocking(|| state(&pl, &pid)), "idle in transaction");
    c.simple_query("ROLLBACK").await.expect("ROLLBACK");
    // Named (as pgbench -M prepared): Bind/Execute/Sync of a statement prepared before.
    let begin = c.prepare("START TRANSACTION").await.expect("prepare");
    let ins = c
        .prepare("INSERT INTO b VALUES ($1)")
        .await
        .expect("prepare");
    c.execute(&begin, &[]).await.expect("prepared BEGIN");
    assert_eq!(
        blocking(|| state(&pl, &pid)),
        "idle",
        "prepared BEGIN ran at once"
    );
    c.execute(&ins, &[&6i32]).await.expect("prepared INSERT");
    assert_eq!(
        blocking(|| sql(&pl, "SELECT count(*) FROM b WHERE x = 6")),
        "0",
        "visible before COMMIT"
    );
    c.simple_query("COMMIT").await.expect("COMMIT");
    assert_eq!(
        blocking(|| sql(&pl, "SELECT string_agg(x::text, ',' ORDER BY x) FROM b")),
        "2,3,6",
        "the rolled-back 5 is not there, the committed 6 is"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_defer_begin_off_a_begin_runs_when_it_comes() {
    if !mtcp_pgtmp::require("with_defer_begin_off_a_begin_runs_when_it_comes") {
        return;
    }
    let dir = TempDir::new("pg-begin-off");
    let pl = blocking(|| start(&dir, false));
    blocking(|| sql(&pl, "CREATE TABLE b (x int)"));
    let (c, pid) = session(&pl).await;
    c.simple_query("BEGIN").await.expect("BEGIN");
    assert_eq!(blocking(|| state(&pl, &pid)), "idle in transaction");
    c.simple_query("INSERT INTO b VALUES (1)")
        .await
        .expect("INSERT");
    c.simple_query("COMMIT").await.expect("COMMIT");
    assert_eq!(blocking(|| sql(&pl, "SELECT count(*) FROM b")), "1");
}
