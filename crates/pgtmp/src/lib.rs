//! Throwaway real PostgreSQL clusters (and a PgBouncer in front of one) for tests, demos and
//! benchmarks.
//!
//! [`PgCluster::start`] makes a fresh cluster in a temporary directory (`initdb`, trust auth,
//! superuser `postgres`) and starts it on 127.0.0.1 and a free port; dropping it stops the server
//! and deletes the directory, also when a test panics. PostgreSQL (and PgBouncer) refuse to run
//! as root, so as root the server programs run as Debian's `postgres` user, otherwise as the
//! current user. Client programs (`psql`, `pgbench`) run as the current user, over TCP.

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{CStr, CString};
use std::fs::{self, Permissions};
use std::io::{ErrorKind, Write};
use std::net::TcpListener;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const HOST: &str = "127.0.0.1";
const PG_ROOT: &str = "/usr/lib/postgresql";
/// Starts tried, each on a new port, when the free port found was taken meanwhile.
const START_ATTEMPTS: u32 = 3;

/// Options for a throwaway cluster.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub max_connections: u32,
    pub max_prepared_transactions: u32,
    pub fsync: bool,
    /// More server settings, `(name, value)`: written to `postgresql.conf`, the value quoted.
    pub extra: Vec<(String, String)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        let extra = Vec::new();
        PgOptions {
            max_connections: 100,
            max_prepared_transactions: 100,
            fsync: false,
            extra,
        }
    }
}

/// A running throwaway PostgreSQL cluster on 127.0.0.1:port with trust auth, superuser `postgres`.
/// Dropping it stops the server (`pg_ctl stop -m immediate`; if the postmaster is still alive
/// 5 s later, SIGKILL to that PID only) and deletes its directory, also when a test panics.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    pid: u32,
    shm_id: Option<i32>,
    who: Option<RunAs>,
    max_connections: u32,
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
        let mut conf = format!(
            "\n# mtcp-pgtmp\nlisten_addresses = '{HOST}'\nunix_socket_directories = '{}'\n\
             max_connections = {max_connections}\nmax_prepared_transactions = {mpt}\nfsync = {fsync}\n",
            sock.display()
        );
        for (k, v) in &opts.extra {
            conf += &format!("{k} = '{}'\n", v.replace('\\', "\\\\").replace('\'', "''"));
        }
        let conf_path = pg.data().join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .with_context(|| format!("writing {}", conf_path.display()))?;
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
                tracing::debug!(dir = %pg.dir.display(), port, pid = pg.pid, ?t_init, ?total, "PostgreSQL started");
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
        tracing::debug!(pid = self.pid, elapsed = ?t0.elapsed(), "PostgreSQL stopped");
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
            tracing::debug!("{e:#}");
        }
    }
}

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
                    tracing::debug!(port, pid = bouncer.pid(), elapsed = ?t0.elapsed(), "pgbouncer started");
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
            tracing::debug!("{e:#}");
        }
    }
}

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

#[derive(Clone, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// Who runs the server programs: `None` for the current user; as root, Debian's `postgres`.
fn run_as() -> Result<Option<RunAs>, String> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut res = std::ptr::null_mut();
    let (b, n) = (buf.as_mut_ptr(), buf.len());
    if unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, b, n, &mut res) } != 0 || res.is_null() {
        return Err(
            "running as root (PostgreSQL refuses root) and there is no `postgres` user to \
                    run it as: install the Debian package postgresql-15, which creates it"
                .into(),
        );
    }
    if pw.pw_uid == 0 {
        return Err("the `postgres` user has uid 0, and PostgreSQL refuses to run as root".into());
    }
    let home = unsafe { CStr::from_ptr(pw.pw_dir) }
        .to_string_lossy()
        .into_owned()
        .into();
    Ok(Some(RunAs {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        home,
    }))
}

/// A command with a clean libpq environment, run in `cwd`, as `who` if given.
fn command(prog: &Path, who: Option<&RunAs>, cwd: &Path) -> Command {
    let mut c = Command::new(prog);
    c.current_dir(cwd).stdin(Stdio::null());
    for var in "PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGDATA".split(' ') {
        c.env_remove(var);
    }
    c.env("PGCONNECT_TIMEOUT", "10").env("PGSSLMODE", "disable");
    if let Some(u) = who {
        c.uid(u.uid).gid(u.gid).env("HOME", &u.home); // std drops supplementary groups too
    }
    c
}

/// Runs a command to completion; an error (with its stderr) unless it exits 0.
fn run(c: &mut Command, what: &str) -> Result<Output> {
    let out = c.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("{what} failed ({}): {}", out.status, stderr.trim());
    }
    Ok(out)
}

/// A new private directory (mode 0700, owned by `owner` if given): under /tmp as root (the
/// `postgres` user must reach it), else under the temp dir if its path is short enough for unix
/// socket paths (~107 bytes).
fn make_temp_dir(prefix: &str, owner: Option<&RunAs>) -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let tmp = std::env::temp_dir();
    let base = if owner.is_none() && tmp.as_os_str().len() <= 60 {
        tmp
    } else {
        "/tmp".into()
    };
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{prefix}-{}-{n}-{nanos:x}", std::process::id()));
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            r => r.with_context(|| format!("creating {}", dir.display()))?,
        }
        let set_up = fs::set_permissions(&dir, Permissions::from_mode(0o700))
            .and_then(|()| owner.map_or(Ok(()), |u| chown(&dir, Some(u.uid), Some(u.gid))));
        if let Err(e) = set_up {
            let _ = fs::remove_dir(&dir);
            return Err(e).with_context(|| format!("setting up {}", dir.display()));
        }
        return Ok(dir);
    }
}

/// Removes a directory tree; retried briefly, as dying server processes may still write in it.
fn remove_dir(dir: &Path) -> Result<()> {
    for tries_left in (0..5).rev() {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if tries_left == 0 => {
                return Err(e).context(format!("removing {}", dir.display()))
            }
            Err(_) => sleep(Duration::from_millis(100)),
            Ok(()) => return Ok(()),
        }
    }
    unreachable!()
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((HOST, 0)).context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?.port())
}

/// The postmaster's PID and the id of its SysV shared memory segment (line 7: "key id").
fn read_pidfile(data: &Path) -> Option<(u32, Option<i32>)> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    Some((
        pid,
        lines
            .nth(5)
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok()),
    ))
}

/// Whether `pid`'s command line names `data` (guards the SIGKILL against a reused PID).
fn is_postmaster_of(pid: u32, data: &Path) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let data = data.as_os_str().as_encoded_bytes();
    !data.is_empty() && cmdline.windows(data.len()).any(|w| w == data)
}

fn wait_dead(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while process_alive(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(10));
    }
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
