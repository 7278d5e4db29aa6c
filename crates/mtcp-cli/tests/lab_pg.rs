//! The PostgreSQL front-end over real round trips and loss (root: network namespaces).
//!
//! The lab's client host runs pgbench through a transparent agent (pgbench connects to the
//! service address; the agent intercepts it); front-ends run in s1..s3; PostgreSQL runs in the
//! router's namespace, which every front-end reaches over its own server link. The client's link
//! has a 20 ms round trip and 1 % loss, each server's link 2 ms and 1 % loss, so every
//! statement, every move, every fence and every commit crosses lossy links. Lazy: every
//! connection moved every 200 ms. Eager: the serving front-end `kill -9`ed every 3 s and once
//! stopped and continued. Then pgbench's own counts and PostgreSQL's sums must agree (no lost,
//! doubled or wrong transaction), and no prepared transaction may be left.
//! `MTCP_PG_LAB_LOSS_PCT` sets another loss on every link, to try a harsher network.

mod common;

use common::*;
use mtcp_harness::labcluster::{LabCluster, LabClusterOptions};
use mtcp_harness::local::strip_ansi;
use mtcp_harness::pglocal::TPCB_OWN_ACCOUNTS;
use mtcp_lab::{Host, Impairment, Lab, LabOptions};
use mtcp_pgtmp::{PgCluster, PgOptions};
use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// PostgreSQL's address for the front-ends: the router's end of s1's link (from s2 and s3 it
/// is reached over their own links, the router being their gateway).
const DB_ADDR: &str = "198.18.1.1";

/// Loss on each link, percent: 1, or `MTCP_PG_LAB_LOSS_PCT`.
fn loss_pct() -> f64 {
    std::env::var("MTCP_PG_LAB_LOSS_PCT")
        .map(|v| v.parse().expect("MTCP_PG_LAB_LOSS_PCT: a number"))
        .unwrap_or(1.0)
}

/// A database in the router's namespace and a front-end cluster in the lab. The database is
/// stopped first (field order), then the cluster and the lab.
struct PgLab {
    pg: PgCluster,
    lc: LabCluster,
}

impl PgLab {
    fn start(tag: &str, dir: &TempDir, mode: &str) -> PgLab {
        let lab = Lab::up(LabOptions {
            tag: tag.into(),
            servers: 3,
            client_link: Impairment {
                delay_ms: 20,
                loss_pct: loss_pct(),
                ..Default::default()
            },
            servers_link: Impairment {
                delay_ms: 2,
                loss_pct: loss_pct(),
                ..Default::default()
            },
            log_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        })
        .expect("lab up");
        let pg_opts = PgOptions {
            listen_also: vec![DB_ADDR.into()],
            trust_from: vec!["198.18.0.0/15".into()],
            ..Default::default()
        };
        let pg = lab
            .run_in(Host::Router, || PgCluster::start(&pg_opts))
            .expect("into the router's namespace")
            .expect("PostgreSQL in the router's namespace");
        lab.run_in(Host::Router, || pg.pgbench_init("postgres", 1))
            .expect("into the router's namespace")
            .expect("pgbench -i");
        let opts = LabClusterOptions {
            tag: tag.into(),
            servers: 3,
            mode: mode.into(),
            app: Some(vec![
                "pgfront".into(),
                "--backend".into(),
                format!("postgres://postgres@{DB_ADDR}:{}/postgres", pg.port()),
                "--two-phase".into(),
                "on".into(),
            ]),
            log: "info,mtcp_pgfront=debug".into(),
            ..Default::default()
        };
        let lc = LabCluster::on(lab, &exe(), dir.path(), &opts).expect("front-ends and agent");
        PgLab { pg, lc }
    }

    /// `psql -c SQL` inside the router's namespace (loopback to the database).
    fn sql(&self, q: &str) -> String {
        self.lc
            .lab
            .run_in(Host::Router, || self.pg.psql("postgres", q))
            .expect("into the router's namespace")
            .unwrap_or_else(|e| panic!("{q}: {e:#}"))
    }

    /// Starts `pgbench -c 4 -j 2 -T 20 -M mode` of [`TPCB_OWN_ACCOUNTS`] in the client host,
    /// to the service address (the agent intercepts it); its output goes to `dir`.
    fn pgbench(&self, dir: &TempDir, mode: &str) -> std::process::Child {
        let script = dir.path().join("tpcb-own-accounts.sql");
        std::fs::write(&script, TPCB_OWN_ACCOUNTS).expect("write script");
        let out = std::fs::File::create(dir.path().join("pgbench.out")).expect("output file");
        let svc = self.lc.service;
        self.lc
            .client_command(
                mtcp_pgtmp::bin("pgbench")
                    .expect("pgbench")
                    .to_str()
                    .unwrap(),
            )
            .args(["-h", &svc.ip().to_string(), "-p", &svc.port().to_string()])
            .args(["-U", "postgres", "-f"])
            .arg(&script)
            .args(["-c", "4", "-j", "2", "-T", "20", "-M", mode])
            .args(["--max-tries", "10", "postgres"])
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start pgbench")
    }

    /// Waits for pgbench (at most 90 s: a session stuck on a lock fails the test rather than
    /// hanging it), then checks its counts against the database: no failed transaction, one
    /// history row per counted transaction, every balance sum equal to the sum of the deltas,
    /// no prepared transaction left. Returns the transactions counted.
    fn check(&self, dir: &TempDir, mut bench: std::process::Child, what: &str) -> u64 {
        let ok = wait_child(&mut bench, "pgbench", Duration::from_secs(90));
        let out = std::fs::read_to_string(dir.path().join("pgbench.out")).unwrap_or_default();
        assert!(ok, "{what}: pgbench failed or hung:\n{out}");
        let (processed, sums) = assert_tpcb_consistent(&out, what, |q| self.sql(q));
        assert!(processed > 0, "{what}:\n{out}");
        wait_for(
            "no prepared transaction left",
            Duration::from_secs(10),
            || self.sql("SELECT count(*) FROM pg_prepared_xacts") == "0",
        );
        eprintln!("{what}: {processed} transactions, balances {sums}");
        processed
    }

    /// The server holding most of the agent's live connections.
    fn busiest(&self) -> Option<String> {
        let mut count = HashMap::<String, usize>::new();
        for c in self.lc.status().ok()? {
            if c.is_live() {
                *count.entry(c.server).or_default() += 1;
            }
        }
        count.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s)
    }
}

fn root_or_say(test: &str) -> bool {
    if !is_root() {
        eprintln!("!!! NOT ROOT: {test} (namespaces, nftables) NOT run !!!");
        return false;
    }
    mtcp_pgtmp::require(test)
}

/// Lazy mode: every connection moved every 200 ms while pgbench runs over a 20 ms, lossy link.
#[test]
fn pgbench_over_lossy_links_with_moves_every_200ms() {
    let test = "pgbench_over_lossy_links_with_moves_every_200ms";
    if !root_or_say(test) {
        return;
    }
    let dir = TempDir::new("lab-pg-lazy");
    let pl = PgLab::start("pgl", &dir, "lazy");
    let bench = pl.pgbench(&dir, "extended");
    let t0 = Instant::now();
    let (mut calls, mut failed) = (0, 0);
    std::thread::sleep(Duration::from_secs(1));
    while t0.elapsed() < Duration::from_secs(19) {
        std::thread::sleep(Duration::from_millis(200));
        calls += 1;
        // A call can fail while pgbench opens its connections: counted, not fatal; the
        // transactions are what is checked.
        if let Err(e) = pl.lc.migrate_all() {
            failed += 1;
            eprintln!("migrate --all: {e:#}");
        }
    }
    pl.check(&dir, bench, "lazy, moves every 200 ms");
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let moves = log
        .lines()
        .filter(|l| strip_ansi(l).contains("mtcp_agent::relay: migrated "))
        .count();
    eprintln!("{calls} migrate --all calls ({failed} failed), {moves} moves");
    assert!(moves >= 20, "only {moves} moves happened");
}

/// Eager mode: the serving front-end `kill -9`ed every 3 s (and restarted), once stopped for
/// 2 s, while pgbench runs over a 20 ms, lossy link.
#[test]
fn pgbench_over_lossy_links_survives_kill_9_and_sigstop() {
    let test = "pgbench_over_lossy_links_survives_kill_9_and_sigstop";
    if !root_or_say(test) {
        return;
    }
    let dir = TempDir::new("lab-pg-eager");
    let pl = PgLab::start("pge", &dir, "eager");
    let bench = pl.pgbench(&dir, "prepared");
    let mut faults = Vec::new();
    for round in 0..5 {
        std::thread::sleep(Duration::from_secs(3));
        let serving = pl.busiest().unwrap_or_else(|| "s1".into());
        if round == 2 {
            pl.lc.stop_server(&serving).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            pl.lc.cont_server(&serving).unwrap();
            faults.push(format!("SIGSTOP {serving} 2 s"));
        } else {
            pl.lc.kill_server(&serving).unwrap();
            faults.push(format!("kill -9 {serving}"));
            std::thread::sleep(Duration::from_millis(500));
            pl.lc.start_server(&serving).unwrap();
        }
    }
    eprintln!("faults: {faults:?}");
    pl.check(&dir, bench, &format!("eager, faults {faults:?}"));
}
