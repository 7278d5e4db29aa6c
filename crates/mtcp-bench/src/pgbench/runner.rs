//! Running pgbench and reading its report.

use super::*;

pub(super) fn progress(line: String) {
    eprintln!("{line}");
}

/// `pgbench -h HOST -p PORT -U postgres` with a clean libpq environment, killed if dropped.
pub(super) fn pgbench_cmd(host: &str, port: u16) -> Result<tokio::process::Command> {
    let mut c = tokio::process::Command::new(mtcp_pgtmp::bin("pgbench")?);
    for var in
        "PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGPASSWORD".split(' ')
    {
        c.env_remove(var);
    }
    c.env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "disable")
        .args(["-h", host, "-p", &port.to_string(), "-U", "postgres"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(c)
}

/// Runs pgbench (TPC-B, query protocol `protocol`) against `host:port`, database [`DB`],
/// bounded in time.
pub(super) async fn pgbench(
    host: &str,
    port: u16,
    (clients, threads): (u32, u32),
    protocol: &str,
    secs: u64,
) -> Result<Run> {
    let mut c = pgbench_cmd(host, port)?;
    c.args(["-c", &clients.to_string(), "-j", &threads.to_string()])
        .args(["-M", protocol])
        .args(["-T", &secs.to_string(), "-r", DB]);
    let what =
        format!("pgbench -c {clients} -j {threads} -M {protocol} -T {secs} on {host}:{port}");
    let out = tokio::time::timeout(Duration::from_secs(secs + 120), c.output())
        .await
        .with_context(|| format!("{what} did not finish"))?
        .with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r = parse_pgbench(&stdout, &stderr);
    match r {
        Some(r) => Ok(r),
        None => bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            stdout.trim(),
            stderr.trim()
        ),
    }
}

/// A short name for a statement of pgbench's script: its first word, with the table for
/// UPDATE, SELECT and INSERT (`UPDATE pgbench_accounts` → `UPDATE accounts`).
pub(super) fn statement_name(words: &[&str]) -> String {
    let verb = words[0].trim_end_matches(';').to_uppercase();
    let table = words
        .iter()
        .position(|w| matches!(w.to_uppercase().as_str(), "UPDATE" | "FROM" | "INTO"))
        .and_then(|i| words.get(i + 1))
        .map(|t| t.trim_start_matches("pgbench_").trim_end_matches(';'));
    match table {
        Some(t) => format!("{verb} {t}"),
        None => verb,
    }
}

/// The summary of a pgbench run (PostgreSQL 15's output); `None` without a tps line.
pub(super) fn parse_pgbench(stdout: &str, stderr: &str) -> Option<Run> {
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let first_num = |s: &str| -> Option<f64> {
        s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .find(|t| !t.is_empty())?
            .parse()
            .ok()
    };
    let tps = first_num(field("tps = ")?)?;
    let transactions = field("number of transactions actually processed:")
        .and_then(first_num)
        .unwrap_or(0.0) as u64;
    let failed = field("number of failed transactions:")
        .and_then(first_num)
        .unwrap_or(0.0) as u64;
    let errors: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains("error") || l.contains("aborted"))
        .map(str::to_string)
        .collect();
    // "pgbench: error: client 3 script 0 aborted in command 4 query 0: …"
    let aborted = stderr
        .lines()
        .filter(|l| l.contains("client ") && l.contains(" aborted"))
        .count() as u64;
    // "statement latencies in milliseconds and failures:", then "  0.081  0  BEGIN;" lines.
    let statements = stdout
        .lines()
        .skip_while(|l| !l.starts_with("statement latencies"))
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ms: f64 = f.next()?.parse().ok()?;
            let _failures = f.next()?;
            let sql: Vec<&str> = f.collect();
            (!sql.is_empty() && !sql[0].starts_with('\\')).then(|| (statement_name(&sql), ms))
        })
        .collect();
    Some(Run {
        tps,
        transactions,
        failed,
        aborted,
        errors,
        statements,
        cpu: [0.0; 5],
        machine: (0.0, 0.0),
    })
}
