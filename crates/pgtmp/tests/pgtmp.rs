//! Real throwaway PostgreSQL clusters: start, pgbench, 2PC, PgBouncer, cleanup. These FAIL if
//! PostgreSQL is missing (CI installs it) unless MTCP_SKIP_PG=1.

use mtcp_pgtmp::{process_alive, require, PgBouncer, PgCluster, PgOptions};
use std::process::Command;
use std::time::Instant;

#[test]
fn cluster_pgbench_2pc_and_cleanup() {
    if !require("cluster_pgbench_2pc_and_cleanup") {
        return;
    }
    let opts = PgOptions {
        max_prepared_transactions: 37,
        ..PgOptions::default()
    };
    let t0 = Instant::now();
    let pg = PgCluster::start(&opts).expect("start a cluster");
    eprintln!(
        "cluster started in {:?} on port {} (pid {})",
        t0.elapsed(),
        pg.port(),
        pg.pid()
    );
    let (dir, pid) = (pg.dir().to_path_buf(), pg.pid());
    assert!(dir.is_dir() && process_alive(pid));
    assert_eq!(pg.host(), "127.0.0.1");
    assert_eq!(
        pg.url("bench"),
        format!("postgres://postgres@127.0.0.1:{}/bench", pg.port())
    );

    pg.create_db("bench").unwrap();
    let t = Instant::now();
    pg.pgbench_init("bench", 1).unwrap();
    eprintln!("pgbench -i -s 1 took {:?}", t.elapsed());
    assert_eq!(
        pg.psql("bench", "select count(*) from pgbench_branches")
            .unwrap(),
        "1"
    );
    assert_eq!(
        pg.psql("bench", "select count(*) from pgbench_accounts")
            .unwrap(),
        "100000"
    );
    assert_eq!(
        pg.psql("postgres", "show max_prepared_transactions")
            .unwrap(),
        "37"
    );
    assert_eq!(pg.psql("postgres", "show fsync").unwrap(), "off");
    assert_eq!(pg.psql("postgres", "show max_connections").unwrap(), "100");

    // Two-phase commit: prepare in one session, commit from another.
    pg.psql(
        "bench",
        "begin; update pgbench_branches set bbalance = bbalance + 5 where bid = 1; \
         prepare transaction 'mtcp_t1'",
    )
    .unwrap();
    assert_eq!(
        pg.psql("bench", "select gid from pg_prepared_xacts")
            .unwrap(),
        "mtcp_t1"
    );
    assert_eq!(
        pg.psql("bench", "select bbalance from pgbench_branches")
            .unwrap(),
        "0"
    );
    pg.psql("bench", "commit prepared 'mtcp_t1'").unwrap();
    assert_eq!(
        pg.psql("bench", "select bbalance from pgbench_branches")
            .unwrap(),
        "5"
    );
    assert_eq!(
        pg.psql("bench", "select count(*) from pg_prepared_xacts")
            .unwrap(),
        "0"
    );

    // Errors carry psql's stderr.
    let err = pg
        .psql("bench", "select * from no_such_table")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_table"), "{err}");
    assert!(pg
        .log()
        .contains("database system is ready to accept connections"));

    let t = Instant::now();
    drop(pg);
    eprintln!("drop (immediate stop + rm) took {:?}", t.elapsed());
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !process_alive(pid),
        "postmaster {pid} still alive after drop"
    );
}

#[test]
fn clean_stop_and_extra_settings() {
    if !require("clean_stop_and_extra_settings") {
        return;
    }
    let opts = PgOptions {
        max_connections: 40,
        extra: vec![
            ("cluster_name".into(), "it's pgtmp".into()),
            ("work_mem".into(), "8MB".into()),
        ],
        ..PgOptions::default()
    };
    let pg = PgCluster::start(&opts).expect("start a cluster");
    assert_eq!(pg.psql("postgres", "show max_connections").unwrap(), "40");
    assert_eq!(
        pg.psql("postgres", "show cluster_name").unwrap(),
        "it's pgtmp"
    );
    assert_eq!(pg.psql("postgres", "show work_mem").unwrap(), "8MB");
    let (dir, pid) = (pg.dir().to_path_buf(), pg.pid());
    let t = Instant::now();
    pg.stop().expect("clean stop");
    eprintln!("stop (fast) took {:?}", t.elapsed());
    assert!(!dir.exists() && !process_alive(pid));
}

#[test]
fn drop_on_panic_cleans_up() {
    if !require("drop_on_panic_cleans_up") {
        return;
    }
    // The panic below is deliberate: Drop must still stop the server and remove the directory.
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let pg = PgCluster::start(&PgOptions::default()).expect("start a cluster");
        *seen.lock().unwrap() = Some((pg.dir().to_path_buf(), pg.pid()));
        panic!("deliberate panic with a running cluster (testing cleanup on unwind)");
    });
    assert!(r.is_err());
    let (dir, pid) = seen.lock().unwrap().take().unwrap();
    assert!(!dir.exists() && !process_alive(pid));
}

#[test]
fn pgbouncer_session_mode() {
    if !require("pgbouncer_session_mode") {
        return;
    }
    let pg = PgCluster::start(&PgOptions::default()).expect("start a cluster");
    let t = Instant::now();
    let bouncer = match PgBouncer::start(&pg, 20) {
        Ok(b) => b,
        Err(e) if std::env::var("MTCP_SKIP_PG").as_deref() == Ok("1") => {
            let line = format!("SKIPPED: pgbouncer_session_mode: {e:#}\n");
            std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes()).unwrap();
            return;
        }
        Err(e) => panic!("{e:#}"),
    };
    eprintln!(
        "pgbouncer started in {:?} on port {}",
        t.elapsed(),
        bouncer.port()
    );
    let psql = mtcp_pgtmp::bin("psql").unwrap();
    let out = Command::new(psql)
        .env("PGCONNECT_TIMEOUT", "10")
        .args([
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &bouncer.port().to_string(),
        ])
        .args(["-U", "postgres", "-d", "postgres", "-c", "select 1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        bouncer.logs()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let pid = bouncer.pid();
    drop(bouncer);
    assert!(
        !process_alive(pid),
        "pgbouncer {pid} still alive after drop"
    );
}

#[test]
fn drop_kills_a_postmaster_that_pg_ctl_cannot_stop() {
    if !require("drop_kills_a_postmaster_that_pg_ctl_cannot_stop") {
        return;
    }
    let pg = PgCluster::start(&PgOptions::default()).expect("start a cluster");
    let (dir, pid) = (pg.dir().to_path_buf(), pg.pid());
    // Without its pid file pg_ctl cannot stop the server: Drop must SIGKILL the postmaster.
    std::fs::remove_file(dir.join("data/postmaster.pid")).unwrap();
    let t = Instant::now();
    drop(pg);
    eprintln!("drop with SIGKILL fallback took {:?}", t.elapsed());
    assert!(!dir.exists() && !process_alive(pid));
}
