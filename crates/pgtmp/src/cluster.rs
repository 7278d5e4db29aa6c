//! A throwaway PostgreSQL cluster: its options, start (initdb, a free port), clients, stop.

use crate::sys::{
    command, free_port, is_postmaster_of, make_temp_dir, read_pidfile, remove_dir, run, run_as,
    tail, wait_dead, RunAs,
};
use crate::{available, bin, process_alive, HOST, START_ATTEMPTS};
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options for a throwaway cluster.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub max_connections: u32,
    pub max_prepared_transactions: u32,
    pub fsync: bool,
    /// More server settings, `(name, value)`: written to `postgresql.conf`, the value quoted.
    pub extra: Vec<(String, String)>,
    /// Addresses to listen on besides 127.0.0.1 (e.g. a network namespace's own; the cluster
    /// must be started inside that namespace).
    pub listen_also: Vec<String>,
    /// Networks (CIDR) whose clients are trusted too (`host all all CIDR trust`); only
    /// loopback is, by default.
    pub trust_from: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 100,
            max_prepared_transactions: 100,
            fsync: false,
            extra: Vec::new(),
            listen_also: Vec::new(),
            trust_from: Vec::new(),
        }
    }
}

/// A running throwaway PostgreSQL cluster on 127.0.0.1:port with trust auth, superuser `postgres`.
/// Dropping it stops the server (`pg_ctl stop -m immediate`; if the postmaster is still alive
/// 5 s later, SIGKILL to that PID only) and deletes its directory, also when a test panics.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    pub(crate) port: u16,
    pid: u32,
    shm_id: Option<i32>,
    pub(crate) who: Option<RunAs>,
    pub(crate) max_connections: u32,
}

impl PgCluster {
    /// Makes a cluster (`initdb`), starts it on a free port and waits until it accepts
    /// connections. The error includes the tail of the server log.
    pub fn start(opts: &PgOptions) -> Result<Self> {
        available().map_err(|r| anyhow!("cannot start a PostgreSQL cluster here: {r}"))?;
        let t0 = Instant::now();
        let who = run_as().map_err(|e| anyhow!(e))?;
        let dir = make_temp_dir("mtcp-pgtmp", who.as_ref())?;
        let max_connections = opts.max_connections;
        // From here on, Drop stops whatever was started and removes the directory.
        let mut pg = PgCluster {
            dir,
            port: 0,
            pid: 0,
            shm_id: None,
            who,
            max_connections,
        };
        let sock = pg.dir.join("sock");
        fs::create_dir(&sock).with_context(|| format!("creating {}", sock.display()))?;
        if let Some(u) = &pg.who {
            chown(&sock, Some(u.uid), Some(u.gid)).context("chown of the socket directory")?;
        }
        let mut c = pg.server_cmd("initdb")?;
        c.arg("-D").arg(pg.data());
        c.args("-U postgres -A trust -E UTF8 --no-locale --no-sync".split(' '));
        run(&mut c, "initdb")?;
        let fsync = if opts.fsync { "on" } else { "off" };
        let mpt = opts.max_prepared_transactions;
        let listen = std::iter::once(HOST)
            .chain(opts.listen_also.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(",");
        let mut conf = format!(
            "\n# mtcp-pgtmp\nlisten_addresses = '{listen}'\nunix_socket_directories = '{}'\n\
             max_connections = {max_connections}\nmax_prepared_transactions = {mpt}\nfsync = {fsync}\n",
            sock.display()
        );
        for (k, v) in &opts.extra {
            conf += &format!("{k} = '{}'\n", v.replace('\\', "\\\\").replace('\'', "''"));
        }
        append(&pg.data().join("postgresql.conf"), &conf)?;
        if !opts.trust_from.is_empty() {
            let hba: String = opts
                .trust_from
                .iter()
                .map(|net| format!("host all all {net} trust\n"))
                .collect();
            append(&pg.data().join("pg_hba.conf"), &hba)?;
        }
        let t_init = t0.elapsed();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            let _ = fs::remove_file(pg.log_path());
            let mut c = pg.server_cmd("pg_ctl")?;
            c.arg("-D").arg(pg.data()).arg("-l").arg(pg.log_path());
            c.args(["-w", "-t", "60", "-o", &format!("-p {port}"), "start"]);
            let out = c.output().context("running pg_ctl start")?;
            if out.status.success() {
                pg.port = port;
                (pg.pid, pg.shm_id) = read_pidfile(&pg.data()).context("no postmaster.pid")?;
                let total = t0.elapsed();
                tracing::debug!(target: "mtcp_pgtmp", dir = %pg.dir.display(), port, pid = pg.pid, ?t_init, ?total, "PostgreSQL started");
                return Ok(pg);
            }
            let log = pg.log();
            let in_use = log.contains("Address already in use") || log.contains("could not bind");
            pg.kill_server();
            if !in_use || attempt == START_ATTEMPTS {
                bail!(
                    "pg_ctl start (port {port}, attempt {attempt}) failed ({}): {}\n--- server log tail ---\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    tail(&log, 30)
                );
            }
            tracing::debug!(
                target: "mtcp_pgtmp",
                port,
                attempt,
                "PostgreSQL's port was taken meanwhile: retrying"
            );
        }
        unreachable!()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        HOST
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The `max_connections` the cluster was started with.
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{db}", self.port)
    }

    /// Runs `psql -X -q -At -v ON_ERROR_STOP=1 … -d DB -c SQL`; returns its stdout without the
    /// final newline. The error includes psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let mut c = self.client_cmd("psql", db)?;
        c.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        let shown: String = sql.chars().take(200).collect();
        let out = run(&mut c, &format!("psql -d {db} -c {shown:?}"))?;
        let s = String::from_utf8_lossy(&out.stdout);
        Ok(s.strip_suffix('\n').unwrap_or(&s).to_string())
    }

    /// `pgbench -i -s SCALE -q` into `db`.
    pub fn pgbench_init(&self, db: &str, scale: u32) -> Result<()> {
        let mut c = self.client_cmd("pgbench", db)?;
        c.args(["-i", "-s", &scale.to_string(), "-q"]);
        run(&mut c, &format!("pgbench -i -s {scale} -d {db}")).map(drop)
    }

    pub fn create_db(&self, name: &str) -> Result<()> {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        self.psql("postgres", &sql).map(drop)
    }

    /// The server log's contents (for failure messages); empty if unreadable.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Clean stop (`pg_ctl stop -m fast`), then deletes the directory.
    pub fn stop(mut self) -> Result<()> {
        let t0 = Instant::now();
        let mut c = self.server_cmd("pg_ctl")?;
        c.arg("-D")
            .arg(self.data())
            .args("-m fast -w -t 30 stop".split(' '));
        let stopped = run(&mut c, "pg_ctl stop -m fast").map(drop);
        self.kill_server(); // a no-op when the fast stop worked
        let removed = remove_dir(&self.dir);
        tracing::debug!(target: "mtcp_pgtmp", pid = self.pid, elapsed = ?t0.elapsed(), "PostgreSQL stopped");
        stopped.and(removed)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// A server program (`initdb`, `pg_ctl`), as `postgres` when we are root.
    fn server_cmd(&self, name: &str) -> Result<Command> {
        Ok(command(&bin(name)?, self.who.as_ref(), &self.dir))
    }

    /// A client program connected to `db` over TCP, as the current user.
    fn client_cmd(&self, name: &str, db: &str) -> Result<Command> {
        let mut c = command(&bin(name)?, None, &self.dir);
        c.args([
            "-h",
            HOST,
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ]);
        Ok(c)
    }

    /// Stops the server if one runs: `pg_ctl stop -m immediate`, then, if the postmaster is
    /// alive 5 s after we began and still is this cluster's, SIGKILL to it.
    fn kill_server(&mut self) {
        let from_file = read_pidfile(&self.data()).map(|(pid, _)| pid);
        let Some(pid) = from_file.or((self.pid != 0).then_some(self.pid)) else {
            return;
        };
        if !process_alive(pid) {
            return;
        }
        let t0 = Instant::now();
        if let Ok(mut c) = self.server_cmd("pg_ctl") {
            c.arg("-D")
                .arg(self.data())
                .args("-m immediate -w -t 5 stop".split(' '));
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        wait_dead(pid, Duration::from_secs(5).saturating_sub(t0.elapsed()));
        if process_alive(pid) && is_postmaster_of(pid, &self.data()) {
            tracing::debug!(
                target: "mtcp_pgtmp",
                pid,
                "postmaster alive 5 s after pg_ctl stop -m immediate: SIGKILL"
            );
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            wait_dead(pid, Duration::from_secs(2));
            if let Some(id) = self.shm_id {
                // The segment a clean stop removes: freed once its last user detaches.
                unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.kill_server();
        if let Err(e) = remove_dir(&self.dir) {
            tracing::debug!(target: "mtcp_pgtmp", "{e:#}");
        }
    }
}

/// Appends `text` to the configuration file at `path`.
fn append(path: &Path, text: &str) -> Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}
