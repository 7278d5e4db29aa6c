//! `mtcp demo --pg` end to end: pgbench through the PostgreSQL front-ends while they are
//! drained, moved by hand and killed; the demo exits 0 and its report shows every check held.

use std::process::{Command, Stdio};

#[test]
fn pg_demo_exits_zero_with_its_report() {
    if !mtcp_pgtmp::require("pg_demo_exits_zero_with_its_report") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_mtcp"))
        .args(["demo", "--pg", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .expect("run mtcp demo --pg");
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo --pg failed:\n{so}\n{se}");
    for line in [
        "[ ok ] pgbench: ",
        " 0 failed,",
        "[ ok ] ledger rows = transactions pgbench processed: ",
        "[ ok ] pgbench_history rows = processed: ",
        "[ ok ] per client, seqs are exactly 1..max (no gap, no duplicate): ",
        "[ ok ] Σabalance = Σtbalance = Σbbalance = Σhistory.delta = Σledger.delta: ",
        "[ ok ] pg_prepared_xacts: 0 left",
        "[ ok ] moves seen by the agent: drain ",
        "[ ok ] sessions aborted by the agent: none",
        "(hint (drain))",
        "(manual)",
        "kill -9 s",
        "OK: every transaction pgbench was told committed is there exactly once",
    ] {
        assert!(so.contains(line), "missing {line:?} in:\n{so}\n{se}");
    }
    assert!(!so.contains("[FAIL]"), "{so}");
}
