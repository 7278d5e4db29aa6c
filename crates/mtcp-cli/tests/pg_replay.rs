//! A session moved inside its open transaction replays it on a new backend, after the fence
//! released the old backend's locks. A session that was waiting for one of those locks gets it
//! first; if that session's client waits for the moved one, no party can break the wait
//! (found by `lab_pg` at 5 % loss: pgbench's blocking `PQprepare` on one client while its
//! thread held another client's transaction open, decision 76). The replay's lock waits are
//! bounded: past the bound the moved session's client is disconnected, its transaction never
//! committed, and the other session goes on.

mod common;

use common::*;
use mtcp_harness::pglocal::{PgLocal, PgLocalOptions};
use std::time::{Duration, Instant};

/// The replay's bound in this test (`--replay-lock-timeout-ms`).
const BOUND_MS: u64 = 1000;

/// PostgreSQL and two lazy front-ends (two-phase commit off), each given `args`.
fn start(dir: &TempDir, args: Vec<String>) -> PgLocal {
    let opts = PgLocalOptions {
        servers: 2,
        two_phase: false,
        app_args_for: vec![("s1".into(), args.clone()), ("s2".into(), args)],
        ..Default::default()
    };
    blocking(|| PgLocal::start(&exe(), dir.path(), &opts)).expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_blocked_by_a_session_waiting_for_its_client_ends_instead_of_hanging() {
    let test = "a_replay_blocked_by_a_session_waiting_for_its_client_ends_instead_of_hanging";
    if !mtcp_pgtmp::require(test) {
        return;
    }
    let dir = TempDir::new("pg-replay");
    let bound = vec!["--replay-lock-timeout-ms".to_string(), BOUND_MS.to_string()];
    let pl = start(&dir, bound);
    blocking(|| {
        sql(
            &pl,
            "CREATE TABLE r (id int PRIMARY KEY, v int); INSERT INTO r VALUES (1, 0)",
        )
    });

    // A, through the agent: a transaction that holds row 1.
    let (a, a_task) = connect(&pl).await;
    a.batch_execute("BEGIN").await.expect("A: BEGIN");
    a.batch_execute("UPDATE r SET v = v + 1 WHERE id = 1")
        .await
        .expect("A: UPDATE");

    // B, straight to PostgreSQL: waits for row 1.
    let (b, b_conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pl.pg.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("B: connect");
    tokio::spawn(b_conn);
    let b = std::sync::Arc::new(b);
    b.batch_execute("BEGIN").await.expect("B: BEGIN");
    let b_update = {
        let b = b.clone();
        tokio::spawn(async move {
            b.batch_execute("UPDATE r SET v = v + 10 WHERE id = 1")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_update.is_finished(), "B did not wait for A's row lock");

    // A moves inside its transaction: the destination fences A's old backend (its lock goes
    // to B, which was waiting) and replays A's UPDATE, which now waits for B.
    let from = blocking(|| serving(&pl.lc));
    let to = if from == "s1" { "s2" } else { "s1" };
    let mut mv = move_to(&pl.lc, to);
    assert!(
        blocking(|| wait_child(&mut mv, "mtcp migrate", Duration::from_secs(20))),
        "mtcp migrate failed"
    );
    tokio::time::timeout(Duration::from_secs(20), b_update)
        .await
        .expect("B's UPDATE still waits: A's old backend was not fenced")
        .expect("B's task")
        .expect("B: UPDATE");

    // B's client commits only once A's next statement is answered (as pgbench's thread
    // would): A must be told something within the bound, not wait for B.
    let t0 = Instant::now();
    let next = tokio::time::timeout(
        Duration::from_secs(30),
        value(&a, "SELECT v FROM r WHERE id = 1"),
    )
    .await;
    let waited = t0.elapsed();
    let outcome = match next {
        Err(_) => panic!(
            "A's statement still unanswered after {waited:?}: the replay waits for B, B for A"
        ),
        Ok(r) => r,
    };
    assert!(
        outcome.is_err(),
        "A's replay cannot have taken row 1 (B holds it), yet A got an answer: {outcome:?}"
    );
    eprintln!("A's connection ended after {waited:?}: {outcome:?}");
    assert!(
        waited >= Duration::from_millis(BOUND_MS / 2),
        "A's connection ended before the replay's bound ({waited:?})"
    );
    let _ = a_task.await;
    b.batch_execute("COMMIT").await.expect("B: COMMIT");

    // A's transaction never committed, B's did: the row holds B's change only.
    assert_eq!(blocking(|| sql(&pl, "SELECT v FROM r WHERE id = 1")), "10");
    assert_eq!(
        blocking(|| sql(&pl, "SELECT count(*) FROM pg_prepared_xacts")),
        "0"
    );
    let s = log(&dir, from.as_str()) + &log(&dir, to);
    assert!(
        s.contains("divergence in downstream bytes"),
        "the servers' logs do not say why A's connection ended:\n{}",
        tail(&s)
    );
}

/// The replay's bound is the front-end's, not the session's: once the replay is over the
/// client's own `lock_timeout` is back (or the default), and later restart points carry the
/// client's value, not the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replays_lock_bound_leaves_the_clients_setting_alone() {
    let test = "the_replays_lock_bound_leaves_the_clients_setting_alone";
    if !mtcp_pgtmp::require(test) {
        return;
    }
    let dir = TempDir::new("pg-replay-setting");
    let pl = start(&dir, Vec::new());
    blocking(|| sql(&pl, "CREATE TABLE s (x int)"));
    let default = blocking(|| sql(&pl, "SHOW lock_timeout"));
    let mut moves = 0;
    let mut move_once = |pl: &PgLocal| {
        let from = serving(&pl.lc);
        let to = if from == "s1" { "s2" } else { "s1" };
        let mut mv = move_to(&pl.lc, to);
        assert!(
            wait_child(&mut mv, "mtcp migrate", Duration::from_secs(20)),
            "mtcp migrate failed"
        );
        moves += 1;
    };
    // Each ending of the replayed transaction: a SET made inside a transaction that rolls
    // back is undone, so the bound must not be lifted that way.
    let cases = [
        (None, "COMMIT"),
        (Some("7s"), "COMMIT"),
        (None, "ROLLBACK"),
        (Some("7s"), "ROLLBACK"),
    ];
    for (own, end) in cases {
        let (c, _task) = connect(&pl).await;
        if let Some(v) = own {
            c.batch_execute(&format!("SET lock_timeout = '{v}'"))
                .await
                .unwrap();
        }
        let want = own.map_or(default.clone(), str::to_string);
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("INSERT INTO s VALUES (1)").await.unwrap();
        // Moved inside the transaction: the INSERT is replayed under the bound.
        blocking(|| move_once(&pl));
        assert_eq!(
            value(&c, "SHOW lock_timeout").await.unwrap(),
            want,
            "after a replay ({own:?}, {end})"
        );
        c.batch_execute(end).await.unwrap();
        assert_eq!(
            value(&c, "SHOW lock_timeout").await.unwrap(),
            want,
            "after the replayed transaction's {end} ({own:?})"
        );
        // A restart point after it (a move between transactions restores from it).
        blocking(|| move_once(&pl));
        assert_eq!(
            value(&c, "SHOW lock_timeout").await.unwrap(),
            want,
            "after a move between transactions ({own:?}, {end})"
        );
    }
    assert_eq!(moves, 2 * cases.len());
    assert_eq!(blocking(|| sql(&pl, "SELECT count(*) FROM s")), "2");
}
