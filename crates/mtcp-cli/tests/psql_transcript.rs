//! A psql script run through the agent while its session moves between PostgreSQL front-ends
//! (`mtcp server … pgfront`) prints exactly what it prints run directly against PostgreSQL, and
//! leaves exactly the same data and schema behind.
//!
//! The script (`psql -X -a -f`, ON_ERROR_STOP off) covers settings, DDL, SQL-level prepared
//! statements, RETURNING, a transaction with savepoints, a cursor, COPY in both directions,
//! errors in and out of transactions and a statement that runs while the session moves. Its
//! moves are `\! $MOVE` lines: `MOVE` names a script that runs `mtcp migrate --all` for the run
//! through the agent and is `true` for the direct run, so psql echoes the same text in both.
//! Some moves happen between statements, some inside an open (or failed) transaction, which the
//! destination replays from its BEGIN (COPY input and a large result included), and one, in
//! the background, during `pg_sleep`. Deferred unique constraints fail at COMMIT, in a
//! transaction and in autocommit statements (which the front-end runs inside a BEGIN of its
//! own and commits through its commit path). Replayed transactions use no sequences: `nextval`
//! is not transactional, so a replay would read other values and the connection be aborted
//! (the output check), which is not what this test is about.

mod common;

use common::*;
use mtcp_harness::local::strip_ansi;
use mtcp_harness::pglocal::{PgLocal, PgLocalOptions};
use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The script. Keep its output deterministic: `ORDER BY` everywhere, no catalog-reading psql
/// meta commands, no times or OIDs.
const SCRIPT: &str = r#"-- M-TCP psql transcript: every \! $MOVE moves the session when run through the agent.
CREATE SCHEMA app;
SET search_path = app, public;
SET DateStyle = 'SQL, DMY';
SET extra_float_digits = 0;
SET intervalstyle = 'postgres_verbose';
SET TimeZone = 'America/New_York';
CREATE TABLE items (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    qty int NOT NULL CHECK (qty >= 0),
    price numeric(10,2),
    seen date,
    ratio float8
);
CREATE TABLE log (id int PRIMARY KEY, note text, at interval);
CREATE TABLE once (x int UNIQUE DEFERRABLE INITIALLY DEFERRED);
\! $MOVE
SHOW search_path;
SHOW DateStyle;
PREPARE ins(int, text) AS INSERT INTO log VALUES ($1, $2, make_interval(days => $1));
EXECUTE ins(1, 'first');
\! $MOVE
-- after a move: the settings and the prepared statement were restored on the new backend
EXECUTE ins(2, 'after a move');
SHOW DateStyle;
SELECT '2024-03-01'::date AS d, 1.0::float8 / 3 AS third, '1 day 2 hours'::interval AS i,
    '2024-03-10 12:00:00+00'::timestamptz AS t, 'héllo ✓' AS utf8;
INSERT INTO items (name, qty, price, seen, ratio)
    VALUES ('apple', 3, 1.25, '01/03/2024', 1.0 / 3) RETURNING id, name, seen, ratio;
INSERT INTO items (name, qty, price, seen, ratio)
    VALUES ('pear', 5, 0.8, '02/03/2024', 2.0 / 3), ('fig', 7, 3.1, '03/03/2024', 0.1)
    RETURNING *;
INSERT INTO items (name, qty) VALUES ('apple', 1);
SELECT 1 / 0 AS boom;
SELECT count(*) AS items FROM items;
SELECT id, name FROM items \gdesc
INSERT INTO log VALUES (3, 'two statements in one query string') \; SELECT count(*) AS logged FROM log;
\set n 4
SELECT :n * 2 AS doubled, :'n' AS quoted;
BEGIN;
INSERT INTO log VALUES (10, 'in a transaction');
SAVEPOINT a;
INSERT INTO log VALUES (11, 'rolled back to a');
SELECT id, note FROM log ORDER BY id;
ROLLBACK TO SAVEPOINT a;
\! $MOVE
SAVEPOINT b;
UPDATE items SET qty = qty + 1 WHERE name = 'apple' RETURNING name, qty;
SELECT 10 / (qty - qty) FROM items WHERE name = 'apple';
ROLLBACK TO SAVEPOINT b;
UPDATE items SET qty = qty + 10 WHERE name = 'pear' RETURNING name, qty;
RELEASE SAVEPOINT b;
EXECUTE ins(12, 'prepared, in a transaction');
SET extra_float_digits = 1;
\! $MOVE
SELECT id, note, at FROM log ORDER BY id;
SELECT ratio FROM items ORDER BY id;
COMMIT;
SHOW extra_float_digits;
BEGIN;
\! $MOVE
INSERT INTO log VALUES (15, 'begun before a move');
COMMIT;
START TRANSACTION;
\! $MOVE
COMMIT;
begin work;
ROLLBACK;
BEGIN;
DECLARE c CURSOR FOR SELECT id, name, qty FROM items ORDER BY id;
FETCH 2 FROM c;
\! $MOVE
FETCH 2 FROM c;
FETCH NEXT FROM c;
CLOSE c;
COMMIT;
COPY items (name, qty, price, seen, ratio) FROM STDIN;
kiwi	2	0.50	04/03/2024	0.25
plum	9	1.10	05/03/2024	\N
quince	0	\N	\N	-1.5e-7
\.
COPY items (name, qty) FROM STDIN;
lime	1
lemon	not a number
\.
\! $MOVE
COPY (SELECT name, qty, price, seen, ratio FROM items ORDER BY id) TO STDOUT;
COPY log TO STDOUT WITH (FORMAT csv, HEADER);
BEGIN;
COPY log (id, note) FROM STDIN WITH (FORMAT csv);
13,"copied, in a transaction"
14,moved before its commit
\.
SELECT g, md5(g::text) FROM generate_series(1, 2500) g;
NOTIFY chan, 'after commit';
\! $MOVE
COPY (SELECT g, repeat('x', g % 50) FROM generate_series(1, 3000) g) TO STDOUT;
COMMIT;
\! (sleep 0.2; $MOVE) &
SELECT pg_sleep(0.5) AS slept, 'after the sleep' AS note;
BEGIN;
INSERT INTO log VALUES (20, 'doomed', NULL);
SELECT 1 / 0 AS boom;
\! $MOVE
SELECT 'ignored: the transaction is aborted';
COMMIT;
BEGIN;
INSERT INTO log VALUES (30, 'committed after a failed one', '1 week');
DELETE FROM items WHERE qty = 0 RETURNING name;
\! $MOVE
COMMIT;
-- a deferred unique check fails at commit: in a transaction, then in autocommit
BEGIN;
INSERT INTO once VALUES (1), (1);
\! $MOVE
COMMIT;
INSERT INTO once VALUES (2), (2);
INSERT INTO once VALUES (3), (3) RETURNING x;
INSERT INTO once VALUES (4);
SELECT x FROM once ORDER BY x;
SELECT name, qty, price, seen, ratio, qty * ratio AS product FROM items ORDER BY id;
SELECT id, note, at FROM log ORDER BY id;
SELECT sum(qty) AS total, max(price) AS dearest, string_agg(name, ',' ORDER BY name) AS names
    FROM items;
DEALLOCATE ins;
EXECUTE ins(99, 'gone');
\! $MOVE
SHOW search_path;
SHOW TimeZone;
RESET extra_float_digits;
SHOW extra_float_digits;
"#;

/// How many `\! $MOVE` lines the script has (the background one included).
fn moves_in_script() -> usize {
    SCRIPT
        .lines()
        .filter(|l| l.starts_with("\\!") && l.contains("$MOVE"))
        .count()
}

/// `psql -X -a -f SCRIPT` against `host:port/db` with `MOVE` set to `mv`; stdout and stderr
/// both go to `out` (in the order psql writes them). Returns psql's exit code.
fn run_psql(dir: &Path, script: &Path, port: u16, db: &str, mv: &str, out: &Path) -> i32 {
    let f = File::create(out).expect("create output file");
    let mut c = Command::new(mtcp_pgtmp::bin("psql").expect("psql"));
    for var in "PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGPASSWORD \
                PGAPPNAME PGCLIENTENCODING PGDATESTYLE PGTZ PSQLRC"
        .split_whitespace()
    {
        c.env_remove(var);
    }
    c.env("PGSSLMODE", "disable")
        .env("PGGSSENCMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("LC_ALL", "C")
        .env("MOVE", mv)
        .current_dir(dir)
        .args(["-X", "-a", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-U"])
        .arg("postgres")
        .arg("-p")
        .arg(port.to_string())
        .arg("-d")
        .arg(db)
        .arg("-f")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup output file"))
        .stderr(f);
    let mut child = c.spawn().expect("start psql");
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait for psql") {
            return st.code().unwrap_or(-1);
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "psql -d {db} did not finish within 120 s; output so far:\n{}",
                fs::read_to_string(out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `pg_dump ARGS -d db` straight to PostgreSQL; the dump with what differs by run normalised
/// (the database name, the random `\restrict` keys of recent pg_dump versions).
fn dump(port: u16, db: &str, args: &[&str]) -> String {
    let out = Command::new(mtcp_pgtmp::bin("pg_dump").expect("pg_dump"))
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGOPTIONS")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
        .args(args)
        .args(["-d", db])
        .stdin(Stdio::null())
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump {args:?} -d {db} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 dump")
        .lines()
        .map(|l| {
            if l.starts_with("\\restrict ") || l.starts_with("\\unrestrict ") {
                l.split(' ').next().unwrap_or(l).to_string()
            } else {
                l.replace(db, "DB")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Panics with both texts (and `diff -u` of their files when available) if they differ.
fn assert_same(what: &str, dir: &Path, direct: &str, agent: &str) {
    if direct == agent {
        return;
    }
    let name = what.replace(' ', "_");
    let (a, b) = (
        dir.join(format!("{name}.direct")),
        dir.join(format!("{name}.agent")),
    );
    fs::write(&a, direct).unwrap();
    fs::write(&b, agent).unwrap();
    let diff = Command::new("diff")
        .arg("-u")
        .args([&a, &b])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(no diff: {e})"));
    panic!(
        "{what} differs between the direct run and the run through the agent\n\
         --- diff -u {} {} ---\n{diff}\n--- direct ---\n{direct}\n--- through the agent ---\n{agent}",
        a.display(),
        b.display()
    );
}

#[test]
fn psql_script_through_moves_prints_and_stores_what_it_does_directly() {
    if !mtcp_pgtmp::require("psql_transcript") {
        return;
    }
    let t0 = Instant::now();
    let dir = TempDir::new("psql-transcript");
    let d = dir.path();
    let pl = PgLocal::start(&exe(), d, &PgLocalOptions::default()).expect("start PgLocal");
    pl.pg.create_db("direct").expect("create db direct");
    pl.pg.create_db("viaagent").expect("create db viaagent");

    let script = d.join("script.sql");
    fs::write(&script, SCRIPT).unwrap();
    // The move: `mtcp migrate --all`, its outcome appended to moves.log (never to psql's output).
    let moves_log = d.join("moves.log");
    let mover = d.join("move.sh");
    fs::write(
        &mover,
        format!(
            "#!/bin/sh\nif out=$('{exe}' migrate --agent '{admin}' --all 2>&1); then\n  \
             echo \"ok $out\" >> '{log}'\nelse\n  echo \"FAILED $out\" >> '{log}'\nfi\n",
            exe = exe().display(),
            admin = pl.lc.agent_admin,
            log = moves_log.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&mover, fs::Permissions::from_mode(0o755)).unwrap();
    }

    let (direct_out, agent_out) = (d.join("out.direct"), d.join("out.agent"));
    let t_direct = Instant::now();
    let rc_direct = run_psql(d, &script, pl.pg.port(), "direct", "true", &direct_out);
    let t_direct = t_direct.elapsed();
    let (_, agent_port) = pl.agent_addr();
    let mv = mover.display().to_string();
    let t_agent = Instant::now();
    let rc_agent = run_psql(d, &script, agent_port, "viaagent", &mv, &agent_out);
    let t_agent = t_agent.elapsed();

    let direct = fs::read_to_string(&direct_out).unwrap();
    let agent = fs::read_to_string(&agent_out).unwrap();
    // The direct run itself went as planned (so that two equally broken runs do not pass).
    assert_eq!(rc_direct, 0, "direct psql failed:\n{direct}");
    for want in [
        "ERROR:  division by zero",
        "ERROR:  duplicate key value violates unique constraint \"items_name_key\"",
        "ERROR:  current transaction is aborted",
        "ERROR:  prepared statement \"ins\" does not exist",
        "ERROR:  invalid input syntax for type integer: \"not a number\"",
        "DETAIL:  Key (x)=(1) already exists.",
        "DETAIL:  Key (x)=(3) already exists.",
        "after the sleep",
        "kiwi\t2\t0.50\t04/03/2024\t0.25",
        "id,note,at",
        " 13 | copied, in a transaction ",
        "2500 | f7696a9b362ac5a51c3dc8f098b73923",
        "ROLLBACK",
    ] {
        assert!(
            direct.contains(want),
            "direct output lacks {want:?}:\n{direct}"
        );
    }
    assert!(
        !direct.contains("FATAL") && !direct.contains("connection to server"),
        "{direct}"
    );
    // Every move ran (the background one ends during pg_sleep, long before psql does)…
    let expected = moves_in_script();
    let t_moves = Instant::now();
    let logged = || fs::read_to_string(&moves_log).unwrap_or_default();
    while logged().lines().count() < expected && t_moves.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_same("psql output", d, &direct, &agent);
    assert_eq!(rc_agent, rc_direct, "psql's exit code");
    let moves = logged();
    assert!(
        moves
            .lines()
            .all(|l| l.starts_with("ok ") && l.contains("->")),
        "a move failed:\n{moves}"
    );
    assert_eq!(moves.lines().count(), expected, "moves made:\n{moves}");
    // … and the agent moved the session each time.
    let agent_log = strip_ansi(&fs::read_to_string(d.join("agent.log")).unwrap_or_default());
    let migrated = agent_log
        .lines()
        .filter(|l| l.contains("mtcp_agent::relay: migrated ") && l.contains(" to="))
        .count();
    assert!(
        migrated >= expected,
        "the agent logged {migrated} migrations, expected at least {expected}:\n{moves}"
    );

    let data = ["--data-only", "--no-owner", "--no-privileges"];
    let direct_data = dump(pl.pg.port(), "direct", &data);
    assert!(
        direct_data.contains("COPY app.items ") && direct_data.contains("app.items_id_seq"),
        "{direct_data}"
    );
    assert_same(
        "data dump",
        d,
        &direct_data,
        &dump(pl.pg.port(), "viaagent", &data),
    );
    let schema = ["--schema-only", "--no-owner", "--no-privileges"];
    assert_same(
        "schema dump",
        d,
        &dump(pl.pg.port(), "direct", &schema),
        &dump(pl.pg.port(), "viaagent", &schema),
    );
    // Nothing was left prepared by the commit path.
    let left = pl
        .pg
        .psql("postgres", "SELECT count(*) FROM pg_prepared_xacts")
        .unwrap();
    assert_eq!(left, "0", "prepared transactions left behind");
    eprintln!(
        "psql transcript: {expected} moves ({migrated} logged by the agent); direct run {t_direct:?}, \
         through the agent {t_agent:?}, whole test {:?}",
        t0.elapsed()
    );
}
