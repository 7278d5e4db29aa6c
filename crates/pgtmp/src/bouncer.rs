//! A throwaway PgBouncer in session pool mode in front of a cluster.

use crate::cluster::PgCluster;
use crate::sys::{command, free_port, make_temp_dir, remove_dir, tail};
use crate::{pgbouncer_bin, HOST, START_ATTEMPTS};
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// PgBouncer in session pool mode in front of a [`PgCluster`]. Dropping it kills it (by its PID:
/// SIGTERM, SIGKILL after 2 s) and removes its directory.
#[derive(Debug)]
pub struct PgBouncer {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    /// Starts pgbouncer on 127.0.0.1 and a free port in front of every database of `pg` (the `*`
    /// entry): session pool mode, `auth_type = trust`, pool size `max_clients`. As root it runs as
    /// the `postgres` user (pgbouncer refuses root). Its ini, log and pid files are in its own
    /// temporary directory.
    pub fn start(pg: &PgCluster, max_clients: u32) -> Result<Self> {
        let prog = pgbouncer_bin().ok_or_else(|| {
            anyhow!("pgbouncer not found (/usr/sbin/pgbouncer or PATH): install the Debian package pgbouncer")
        })?;
        if max_clients + 3 > pg.max_connections {
            tracing::warn!(
                target: "mtcp_pgtmp",
                max_clients,
                pg.max_connections,
                "pgbouncer pool > max_connections - 3"
            );
        }
        let t0 = Instant::now();
        let dir = make_temp_dir("mtcp-pgbouncer", pg.who.as_ref())?;
        let mut bouncer = PgBouncer {
            child: None,
            dir,
            port: 0,
        };
        let d = bouncer.dir.clone();
        fs::write(d.join("userlist.txt"), "\"postgres\" \"\"\n").context("writing auth_file")?;
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            let ini = format!(
                "[databases]\n* = host={HOST} port={}\n\n[pgbouncer]\nlisten_addr = {HOST}\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\n\
                 auth_file = {d}/userlist.txt\nadmin_users = postgres\npool_mode = session\n\
                 default_pool_size = {max_clients}\nmax_client_conn = {}\n\
                 ignore_startup_parameters = extra_float_digits\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
                pg.port,
                max_clients + 16,
                d = d.display()
            );
            fs::write(d.join("pgbouncer.ini"), ini).context("writing pgbouncer.ini")?;
            let _ = fs::remove_file(d.join("pgbouncer.log"));
            let stderr = fs::File::create(d.join("stderr")).context("creating stderr file")?;
            let mut c = command(&prog, pg.who.as_ref(), &d);
            c.arg("-q")
                .arg(d.join("pgbouncer.ini"))
                .stdout(Stdio::null())
                .stderr(stderr);
            bouncer.child = Some(
                c.spawn()
                    .with_context(|| format!("spawning {}", prog.display()))?,
            );
            // Ready once it logged listening on our port (a connect could reach a squatter).
            let listening = format!("listening on {HOST}:{port}");
            let deadline = Instant::now() + Duration::from_secs(10);
            let status = loop {
                if let Some(status) = bouncer.child.as_mut().expect("spawned").try_wait()? {
                    bouncer.child = None;
                    break status;
                }
                if fs::read_to_string(d.join("pgbouncer.log")).is_ok_and(|l| l.contains(&listening))
                {
                    bouncer.port = port;
                    tracing::debug!(target: "mtcp_pgtmp", port, pid = bouncer.pid(), elapsed = ?t0.elapsed(), "pgbouncer started");
                    return Ok(bouncer);
                }
                if Instant::now() > deadline {
                    bail!(
                        "pgbouncer did not listen on {HOST}:{port} within 10 s\n{}",
                        bouncer.logs()
                    );
                }
                sleep(Duration::from_millis(10));
            };
            let logs = bouncer.logs();
            if !logs.contains("Address already in use") || attempt == START_ATTEMPTS {
                bail!(
                    "pgbouncer (port {port}, attempt {attempt}) exited at start ({status})\n{logs}"
                );
            }
        }
        unreachable!()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// pgbouncer's log tail and stderr (for failure messages).
    pub fn logs(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        let (log, stderr) = (read("pgbouncer.log"), read("stderr"));
        format!(
            "--- pgbouncer log tail ---\n{}\n--- stderr ---\n{}",
            tail(&log, 30),
            stderr.trim()
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = remove_dir(&self.dir) {
            tracing::debug!(target: "mtcp_pgtmp", "{e:#}");
        }
    }
}
