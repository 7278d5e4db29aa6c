//! Throwaway real PostgreSQL clusters (and a PgBouncer in front of one) for tests, demos and
//! benchmarks.
//!
//! [`PgCluster::start`] makes a fresh cluster in a temporary directory (`initdb`, trust auth,
//! superuser `postgres`) and starts it on 127.0.0.1 and a free port; dropping it stops the server
//! and deletes the directory, also when a test panics. PostgreSQL (and PgBouncer) refuse to run
//! as root, so as root the server programs run as Debian's `postgres` user, otherwise as the
//! current user. Client programs (`psql`, `pgbench`) run as the current user, over TCP.

use anyhow::{bail, Result};
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use sys::{is_executable, on_path, run_as};

mod bouncer;
mod cluster;
mod sys;

pub use bouncer::PgBouncer;
pub use cluster::{PgCluster, PgOptions};

const HOST: &str = "127.0.0.1";
const PG_ROOT: &str = "/usr/lib/postgresql";
/// Starts tried, each on a new port, when the free port found was taken meanwhile.
const START_ATTEMPTS: u32 = 3;

/// Path of a PostgreSQL program (`initdb`, `pg_ctl`, `psql`, `pgbench`, `pg_dump`, …): the newest
/// `/usr/lib/postgresql/*/bin/NAME`, else NAME on PATH; else an error naming the Debian package.
pub fn bin(name: &str) -> Result<PathBuf> {
    let version = |s: &str| {
        s.split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<Vec<u32>>>()
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> =
        (fs::read_dir(PG_ROOT).into_iter().flatten().flatten())
            .filter_map(|e| {
                Some((
                    version(e.file_name().to_str()?)?,
                    e.path().join("bin").join(name),
                ))
            })
            .filter(|(_, path)| is_executable(path))
            .collect();
    found.sort();
    if let Some(path) = found.pop().map(|(_, p)| p).or_else(|| on_path(name)) {
        return Ok(path);
    }
    let pkg = match name {
        "psql" | "pg_dump" | "pg_dumpall" | "pg_restore" | "pg_isready" => "postgresql-client-15",
        _ => "postgresql-15",
    };
    bail!("PostgreSQL program `{name}` not found in {PG_ROOT}/*/bin nor on PATH: install the Debian package {pkg}")
}

/// Whether a cluster can be started here (`initdb`, `pg_ctl` and `psql` found and, as root, a
/// `postgres` user to run the server as): `Ok(())` or the reason.
pub fn available() -> Result<(), String> {
    for name in ["initdb", "pg_ctl", "psql"] {
        bin(name).map_err(|e| e.to_string())?;
    }
    run_as().map(drop)
}

/// For tests: `true` if a cluster can be started here. If not: with `MTCP_SKIP_PG=1` in the
/// environment, prints a loud `SKIPPED: …` line to stderr and returns `false`; otherwise panics
/// with the reason (CI installs PostgreSQL, so a missing one is a failure, not a skip).
pub fn require(test: &str) -> bool {
    let Err(reason) = available() else {
        return true;
    };
    if std::env::var("MTCP_SKIP_PG").as_deref() == Ok("1") {
        // Straight to fd 2: libtest would capture (and hide) an eprintln! of a passing test.
        let line = format!("SKIPPED: {test}: no PostgreSQL here ({reason}), and MTCP_SKIP_PG=1\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        return false;
    }
    panic!("{test}: PostgreSQL is needed but unavailable: {reason} (MTCP_SKIP_PG=1 skips)");
}

/// Path of `pgbouncer` if installed (`/usr/sbin/pgbouncer` or on PATH).
pub fn pgbouncer_bin() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/sbin/pgbouncer");
    is_executable(&p)
        .then_some(p)
        .or_else(|| on_path("pgbouncer"))
}

/// Whether a process exists and is not a zombie (Linux `/proc`).
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}
