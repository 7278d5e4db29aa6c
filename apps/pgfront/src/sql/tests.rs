//! Tests of the SQL classifier: each rule, the lexer traps (keywords and `;` inside strings,
//! comments, dollar quotes and quoted identifiers), and properties over arbitrary text.

use super::*;
use proptest::prelude::*;
use TxnControl as T;

fn c(sql: &str) -> Classified {
    classify(sql.as_bytes())
}

fn first(sql: &str) -> TxnControl {
    c(sql).first
}

#[test]
fn transaction_control() {
    for sql in [
        "BEGIN",
        "begin;",
        "BEGIN WORK",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
    ] {
        assert_eq!(first(sql), T::Begin, "{sql}");
    }
    assert_eq!(first("START TRANSACTION READ ONLY"), T::Begin);
    assert_eq!(first("START"), T::None);
    for sql in [
        "COMMIT",
        "commit work",
        "COMMIT TRANSACTION AND NO CHAIN",
        "end;",
        "END",
    ] {
        assert_eq!(first(sql), T::Commit, "{sql}");
    }
    for sql in [
        "COMMIT AND CHAIN",
        "commit work and chain",
        "END AND CHAIN",
        "COMMIT PREPARED 'x'",
        "PREPARE TRANSACTION 'x'",
        "ROLLBACK PREPARED 'x'",
    ] {
        assert_eq!(first(sql), T::CommitOther, "{sql}");
    }
    for sql in [
        "ROLLBACK",
        "abort",
        "ROLLBACK WORK",
        "ABORT TRANSACTION AND NO CHAIN",
    ] {
        assert_eq!(first(sql), T::Rollback, "{sql}");
    }
    for sql in ["ROLLBACK AND CHAIN", "ABORT WORK AND CHAIN"] {
        assert_eq!(first(sql), T::RollbackOther, "{sql}");
    }
    for sql in [
        "ROLLBACK TO SAVEPOINT a",
        "rollback to a",
        "ROLLBACK TRANSACTION TO SAVEPOINT a",
        "SAVEPOINT a",
        "RELEASE SAVEPOINT a",
        "SELECT 1",
        "PREPARE q AS SELECT 1",
        "\"begin\"",
        "",
    ] {
        assert_eq!(first(sql), T::None, "{sql}");
        assert!(!c(sql).has_txn_control, "{sql}");
    }
    assert_eq!(TxnControl::default(), T::None);
}

#[test]
fn statement_counts() {
    let x = c("BEGIN; SELECT 1; COMMIT;");
    assert_eq!(
        (x.statements, x.first, x.has_txn_control),
        (3, T::Begin, true)
    );
    let x = c("SELECT 1; COMMIT");
    assert_eq!(
        (x.statements, x.first, x.has_txn_control),
        (2, T::None, true)
    );
    for empty in ["", ";;;", "  ; -- x\n ; /* y */", "/* only; a comment */"] {
        assert_eq!(c(empty), Classified::default(), "{empty:?}");
    }
    assert_eq!(c(";;SELECT 1;;").statements, 1);
    // `;` inside parentheses (rule actions) and SQL-standard bodies does not split.
    let rule = "CREATE RULE r AS ON INSERT TO t DO ALSO (NOTIFY t; SELECT 1); SELECT 2";
    assert_eq!((c(rule).statements, c(rule).notify), (2, true));
    let body = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; \
                SELECT CASE WHEN true THEN 1 END; END; LISTEN x";
    let x = c(body);
    assert_eq!(
        (x.statements, x.has_txn_control, x.pins_session),
        (2, false, true)
    );
    let proc = "create or replace procedure p() begin atomic insert into t values (1); end";
    assert_eq!((c(proc).statements, c(proc).has_txn_control), (1, false));
    // Only BEGIN ATOMIC opens a body: a function named begin does not swallow what follows.
    let named = "CREATE FUNCTION begin() RETURNS int AS 'select 1' LANGUAGE sql; LISTEN x";
    assert_eq!((c(named).statements, c(named).pins_session), (2, true));
}

#[test]
fn strings_comments_and_quotes_hide_keywords() {
    for sql in [
        "SELECT 'BEGIN; LISTEN x; COMMIT'",
        "SELECT 'it''s; LISTEN x'",
        "SELECT E'\\'; LISTEN x; '",
        "SELECT e'\\\\\\'; LISTEN x'",
        "SELECT $$; LISTEN x; $$",
        "SELECT $tag$ $$; LISTEN x $tag$",
        "SELECT $a$ $A$; LISTEN x $a$",
        "SELECT \"; LISTEN x\"",
        "SELECT \"a\"\"; LISTEN x\"",
        "SELECT 1 -- ; LISTEN x",
        "SELECT 1 /* ; LISTEN x */",
        "SELECT 1 /* /* nested */ ; LISTEN x */",
        "SELECT 'unterminated; LISTEN x",
        "SELECT /* unterminated; LISTEN x",
    ] {
        let x = c(sql);
        assert_eq!((x.statements, x.pins_session), (1, false), "{sql}");
    }
    // The escape rules are the right ones: each string ends where PostgreSQL ends it.
    for sql in [
        "SELECT 'a\\'; LISTEN x",
        "SELECT E'a\\\\'; LISTEN x",
        "SELECT $$a$$; LISTEN x",
        "SELECT a$$b; LISTEN x",
        "SELECT $1; LISTEN x",
        "SELECT \"a\"\"\"; LISTEN x",
        "SELECT 1 /* /* */ */; LISTEN x",
        "SELECT 1 --x\r; LISTEN x",
        "SELECT U&'\\'; LISTEN x",
    ] {
        let x = c(sql);
        assert_eq!((x.statements, x.pins_session), (2, true), "{sql}");
    }
    // standard_conforming_strings off: backslashes escape in plain strings too.
    let off = b"SELECT 'a\\'; LISTEN x'";
    assert_eq!(classify_with(off, false).statements, 1);
    assert_eq!(classify_with(off, true).statements, 2);
    // Keywords in strings are not leading keywords; quoted identifiers are not keywords.
    assert!(!c("SELECT 'SET x = 1'").session_change);
    assert!(!c("SELECT 'set_config', $$pg_advisory_lock$$, 'NOTIFY'").session_change);
    assert!(c("SELECT '' || \"set_config\"('a', 'b', false)").session_change);
    // Non-UTF-8 bytes are identifier characters.
    let latin1 = b"SELECT caf\xe9; SET x = 1";
    assert_eq!(
        (classify(latin1).statements, classify(latin1).session_change),
        (2, true)
    );
}

#[test]
fn session_changes() {
    for sql in [
        "SET search_path = a",
        "set session authorization bob",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "RESET ALL",
        "DISCARD PLANS",
        "PREPARE q(int) AS SELECT $1",
        "DEALLOCATE ALL",
        "LOAD 'auto_explain'",
        "SELECT set_config('a.b', 'c', false)",
        "SELECT pg_catalog.SET_CONFIG('a.b', 'c', false)",
        "SELECT 1; SET x = 1",
    ] {
        assert!(c(sql).session_change, "{sql}");
    }
    for sql in [
        "UPDATE t SET x = 1",
        "SET LOCAL search_path = a",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "PREPARE TRANSACTION 'x'",
        "ALTER TABLE t ALTER c SET DEFAULT 1",
        "CREATE FUNCTION f() RETURNS int SET search_path = a AS 'select 1' LANGUAGE sql",
        "SELECT \"SET_CONFIG\"()",
    ] {
        assert!(!c(sql).session_change, "{sql}");
    }
}

#[test]
fn pinned_sessions() {
    for sql in [
        "CREATE TEMP TABLE t (a int)",
        "create temporary table t (a int)",
        "CREATE GLOBAL TEMPORARY TABLE t (a int)",
        "CREATE LOCAL TEMP SEQUENCE s",
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
        "SELECT 1 AS a INTO TEMP t",
        "SELECT 1 INTO LOCAL TEMPORARY TABLE t",
        "LISTEN chan",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock_shared(1, 2)",
        "SELECT \"pg_advisory_lock\"(1)",
        "SELECT U&\"pg_advisory_\\006Cock\"(1)",
        "SELECT U&\"pg_advisory_!006Cock\" UESCAPE '!' (1)",
        "SELECT 1; LISTEN x",
    ] {
        assert!(c(sql).pins_session, "{sql}");
    }
    for sql in [
        "CREATE TABLE temp (a int)",
        "CREATE UNLOGGED TABLE t (a int)",
        "INSERT INTO temp VALUES (1)",
        "UNLISTEN *",
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
        "DECLARE c CURSOR FOR SELECT 'WITH HOLD'",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT pg_try_advisory_xact_lock(1)",
        "SELECT \"PG_ADVISORY_LOCK\"(1)",
        "SELECT 'LISTEN x'",
    ] {
        assert!(!c(sql).pins_session, "{sql}");
    }
}

#[test]
fn non_transactional_statements() {
    for sql in [
        "VACUUM",
        "vacuum full t",
        "CREATE DATABASE d",
        "DROP DATABASE IF EXISTS d",
        "CREATE TABLESPACE s LOCATION '/x'",
        "DROP TABLESPACE s",
        "ALTER SYSTEM SET work_mem = '1MB'",
        "ALTER DATABASE d SET TABLESPACE s",
        "CREATE INDEX CONCURRENTLY i ON t (a)",
        "DROP INDEX CONCURRENTLY i",
        "REINDEX (VERBOSE) TABLE CONCURRENTLY t",
        "REINDEX DATABASE d",
        "REINDEX (VERBOSE) SYSTEM",
        "CLUSTER",
        "CLUSTER VERBOSE",
        "CLUSTER (VERBOSE)",
        "DISCARD ALL",
        "COMMIT PREPARED 'x'",
        "CREATE SUBSCRIPTION s CONNECTION 'x' PUBLICATION p",
        "ALTER SUBSCRIPTION s REFRESH PUBLICATION",
        "CALL p()",
        "DO $$ BEGIN COMMIT; END $$",
        "SELECT 1; VACUUM",
    ] {
        assert!(c(sql).non_transactional, "{sql}");
    }
    for sql in [
        "CLUSTER t",
        "CLUSTER VERBOSE t USING i",
        "ANALYZE t",
        "CHECKPOINT",
        "REINDEX TABLE t",
        "CREATE INDEX i ON t (a)",
        "ALTER DATABASE d SET default_tablespace = s",
        "SELECT 'VACUUM'",
        "DISCARD PLANS",
    ] {
        assert!(!c(sql).non_transactional, "{sql}");
    }
}

#[test]
fn notify_and_copy() {
    assert!(c("NOTIFY chan, 'x'").notify);
    assert!(c("SELECT pg_notify('chan', 'x')").notify);
    assert!(!c("SELECT 'NOTIFY' -- notify").notify);
    assert_eq!(c("COPY t FROM STDIN").copy, Some(true));
    assert_eq!(
        c("copy t (a, b) from stdin with (format csv)").copy,
        Some(true)
    );
    assert_eq!(c("COPY (SELECT * FROM stdin) TO STDOUT").copy, Some(false));
    assert_eq!(c("COPY t TO STDOUT; SELECT 1").copy, Some(false));
    // PostgreSQL takes either word either way: the direction decides.
    assert_eq!(c("COPY t FROM STDOUT").copy, Some(true));
    for sql in [
        "COPY t TO '/tmp/x'",
        "COPY t FROM PROGRAM 'cat'",
        "SELECT 1; COPY t FROM STDIN",
    ] {
        assert_eq!(c(sql).copy, None, "{sql}");
    }
    assert_eq!(c("COPY (SELECT 1 FROM stdin)").copy, None);
}

/// Statements with what [`classify`] should say about each alone.
const SAMPLES: [(&str, TxnControl, [bool; 4]); 8] = [
    // [session_change, pins_session, non_transactional, notify]
    ("SELECT 1", T::None, [false; 4]),
    ("BEGIN", T::Begin, [false; 4]),
    ("COMMIT", T::Commit, [false; 4]),
    ("SET x = 'a;b'", T::None, [true, false, false, false]),
    ("LISTEN \"a;b\"", T::None, [false, true, false, false]),
    ("VACUUM /* ; */ t", T::None, [false, false, true, false]),
    ("NOTIFY c, $q$;$q$", T::None, [false, false, false, true]),
    ("ROLLBACK AND CHAIN", T::RollbackOther, [false; 4]),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), scs: bool) {
        let x = classify_with(&data, scs);
        prop_assert!(x.statements <= data.len());
    }

    #[test]
    fn never_panics_on_sql_like_text(s in "([a-zA-Z_]{1,6}|[ ;()'\"$*/\\-\\\\&eEuU+]|--|/\\*|\\*/|\\$\\$){0,40}") {
        let _ = classify(s.as_bytes());
    }

    /// Joined statements: counted, and their flags OR'ed, whatever separates them.
    #[test]
    fn joined_statements(picks in proptest::collection::vec(0..SAMPLES.len(), 0..8),
                         seps in proptest::collection::vec(
                             prop::sample::select(vec![";", " ; ", ";\n-- c\n", "/* x */;", ";;"]), 8)) {
        let mut sql = String::new();
        for (k, &p) in picks.iter().enumerate() {
            sql.push_str(SAMPLES[p].0);
            sql.push_str(seps[k]);
        }
        let x = c(&sql);
        let any = |f: usize| picks.iter().any(|&p| SAMPLES[p].2[f]);
        prop_assert_eq!(x.statements, picks.len());
        prop_assert_eq!(x.first, picks.first().map_or(T::None, |&p| SAMPLES[p].1));
        prop_assert_eq!(x.has_txn_control, picks.iter().any(|&p| SAMPLES[p].1 != T::None));
        prop_assert_eq!([x.session_change, x.pins_session, x.non_transactional, x.notify],
                        [any(0), any(1), any(2), any(3)]);
    }
}

#[test]
fn plain_begins_and_what_is_not_one() {
    for (sql, tag) in [
        ("BEGIN", "BEGIN"),
        ("begin;", "BEGIN"),
        ("  Begin Work ;\n", "BEGIN"),
        ("BEGIN TRANSACTION", "BEGIN"),
        ("start\ttransaction;", "START TRANSACTION"),
    ] {
        assert_eq!(plain_begin(sql.as_bytes()), Some(tag), "{sql:?}");
    }
    for sql in [
        "",
        ";",
        "BEGIN;;",
        "BEGIN; SELECT 1",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "BEGIN READ ONLY",
        "BEGIN -- why",
        "/* c */ BEGIN",
        "START",
        "START TRANSACTION READ WRITE",
        "BEGINS",
        "COMMIT",
        "begin work transaction",
    ] {
        assert_eq!(plain_begin(sql.as_bytes()), None, "{sql:?}");
    }
    assert_eq!(plain_begin(b"BEGIN\xff"), None);
}

proptest! {
    /// Whatever `plain_begin` accepts, the classifier sees as one statement starting a
    /// transaction.
    #[test]
    fn a_plain_begin_is_one_begin(sql in "[ \t\n]{0,2}(?i:begin|start)( (?i:work|transaction))?[ ]{0,2};?[ \n]{0,2}") {
        if plain_begin(sql.as_bytes()).is_some() {
            let c = classify(sql.as_bytes());
            prop_assert_eq!(c.statements, 1);
            prop_assert_eq!(c.first, TxnControl::Begin);
        }
    }
}
