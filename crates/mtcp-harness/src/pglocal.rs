//! A PostgreSQL front-end cluster on loopback: a throwaway PostgreSQL, `mtcp server … pgfront`
//! servers in front of it and an agent. Used by the end-to-end tests, `mtcp demo --pg` and
//! `mtcp bench pg`; dropping it stops everything it started.

use crate::local::{LocalCluster, LocalOptions};
use anyhow::{Context, Result};
use mtcp_pgtmp::{PgCluster, PgOptions};
use std::path::Path;

/// pgbench's TPC-B (sort of), except that each client keeps to its own 10 000 accounts (client
/// `c`, counted from 0, updates accounts `c * 10000 + 1 ..= c * 10000 + 10000`: scale ≥ clients / 10). A
/// transaction moved mid-way is replayed from its BEGIN; with the stock script, another client
/// that changed the same account in the gap makes the replayed `SELECT abalance` differ, and the
/// runtime aborts the connection (by design: never a wrong number). Disjoint accounts keep every
/// replay identical, so any abort here is a real failure.
pub const TPCB_OWN_ACCOUNTS: &str = "\\set aid :client_id * 10000 + random(1, 10000)
\\set bid random(1, 1)
\\set tid random(1, 10)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
";

/// Options for [`PgLocal::start`].
#[derive(Debug, Clone)]
pub struct PgLocalOptions {
    pub servers: usize,
    /// `"lazy"` or `"eager"`.
    pub mode: String,
    pub two_phase: bool,
    /// `RUST_LOG` of the mtcp processes.
    pub log: String,
    /// Extra arguments for every `mtcp server` (before the application).
    pub server_args: Vec<String>,
    /// Extra arguments for one server's application, by id (e.g. a `--crash-at` hook on `s1`).
    pub app_args_for: Vec<(String, Vec<String>)>,
    /// Extra arguments for the agent (e.g. `--fast-path`).
    pub agent_args: Vec<String>,
    pub pg: PgOptions,
}

impl Default for PgLocalOptions {
    fn default() -> Self {
        PgLocalOptions {
            servers: 3,
            mode: "lazy".into(),
            two_phase: true,
            log: "info,mtcp_pgfront=debug".into(),
            server_args: Vec::new(),
            app_args_for: Vec::new(),
            agent_args: Vec::new(),
            pg: PgOptions::default(),
        }
    }
}

pub struct PgLocal {
    /// Declared first: the mtcp processes stop before the database does.
    pub lc: LocalCluster,
    pub pg: PgCluster,
}

impl PgLocal {
    /// Starts PostgreSQL, the front-ends and an agent; logs go to `dir`.
    pub fn start(exe: &Path, dir: &Path, opts: &PgLocalOptions) -> Result<Self> {
        let pg = PgCluster::start(&opts.pg).context("starting PostgreSQL")?;
        let lc = Self::start_on(exe, dir, &pg, opts)?;
        Ok(PgLocal { lc, pg })
    }

    /// Starts front-ends and an agent in front of a PostgreSQL that already runs (several such
    /// clusters can share one database; `opts.pg` is not used). Logs and the cluster file go to
    /// `dir`. The caller must drop the returned cluster before `pg`.
    pub fn start_on(
        exe: &Path,
        dir: &Path,
        pg: &PgCluster,
        opts: &PgLocalOptions,
    ) -> Result<LocalCluster> {
        let two_phase = if opts.two_phase { "on" } else { "off" };
        let app_args = vec![
            "pgfront".to_string(),
            "--backend".into(),
            pg.url("postgres"),
            "--two-phase".into(),
            two_phase.into(),
        ];
        let lopts = LocalOptions {
            servers: opts.servers,
            log: opts.log.clone(),
            server_args: opts.server_args.clone(),
            mode: opts.mode.clone(),
            app_args,
            app_args_for: opts.app_args_for.clone(),
            agent_args: opts.agent_args.clone(),
            ..Default::default()
        };
        LocalCluster::start(exe, dir, &lopts).context("starting the front-ends")
    }

    /// Host and port client programs connect to (the agent).
    pub fn agent_addr(&self) -> (String, u16) {
        split(&self.lc.agent_listen)
    }

    /// `postgres://postgres@AGENT/DB`.
    pub fn agent_url(&self, db: &str) -> String {
        format!("postgres://postgres@{}/{db}", self.lc.agent_listen)
    }
}

/// `host:port` as its two parts (port 0 when missing or not a number).
pub fn split(addr: &str) -> (String, u16) {
    let (h, p) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    (h.to_string(), p.parse().unwrap_or(0))
}
