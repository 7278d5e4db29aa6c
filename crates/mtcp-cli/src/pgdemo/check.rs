//! Checking the outcome: pgbench's summary, the database's counts and the report of checks.

use anyhow::{Context, Result};

/// The checks made so far; `failed` counts those that failed.
#[derive(Default)]
pub(super) struct Report {
    pub(super) failed: usize,
}

impl Report {
    pub(super) fn check(&mut self, ok: bool, line: String) {
        println!("  [{}] {line}", if ok { " ok " } else { "FAIL" });
        self.failed += usize::from(!ok);
    }
}

/// pgbench's summary.
pub(super) struct BenchStats {
    pub(super) processed: i64,
    pub(super) failed: i64,
    pub(super) retried: i64,
    pub(super) retries: i64,
    pub(super) tps: f64,
}

impl BenchStats {
    pub(super) fn parse(out: &str) -> Option<Self> {
        let field = |prefix: &str| -> Option<&str> {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.split_whitespace().next())
        };
        let num = |prefix: &str| field(prefix).and_then(|v| v.parse::<i64>().ok());
        Some(BenchStats {
            processed: num("number of transactions actually processed: ")?,
            failed: num("number of failed transactions: ")?,
            retried: num("number of transactions retried: ").unwrap_or(0),
            retries: num("total number of retries: ").unwrap_or(0),
            tps: field("tps = ").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        })
    }
}

pub(super) async fn one(db: &tokio_postgres::Client, sql: &str) -> Result<i64> {
    Ok(db
        .query_one(sql, &[])
        .await
        .context(sql.to_string())?
        .get(0))
}

pub(super) async fn ledger_count(db: &tokio_postgres::Client) -> Result<i64> {
    one(db, "SELECT count(*) FROM ledger").await
}
