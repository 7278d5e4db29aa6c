//! A cluster of `mtcp` processes on loopback: writes the cluster file, starts servers and an
//! agent, talks to their admin ports, and kills every process it started (by PID) when dropped.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `mtcp drain`: tells server `id` (admin address `admin`) to hint every connection away, and
/// waits until none with an agent attached is left. Returns the server's last status.
pub async fn drain_server(
    admin: &str,
    key: &mtcp::proto::ClusterKey,
    tls: Option<&mtcp::tls::ClientTls>,
    id: &str,
    timeout: Duration,
) -> Result<mtcp::proto::wire::ServerStatus> {
    Ok(drain_until_empty(admin, key, tls, id, timeout).await?.1)
}

/// Starts a drain and waits until no connection with an agent is left; the status when the
/// drain began and at the end.
async fn drain_until_empty(
    admin: &str,
    key: &mtcp::proto::ClusterKey,
    tls: Option<&mtcp::tls::ClientTls>,
    id: &str,
    timeout: Duration,
) -> Result<(
    mtcp::proto::wire::ServerStatus,
    mtcp::proto::wire::ServerStatus,
)> {
    use mtcp::proto::wire::Msg;
    let t0 = Instant::now();
    let first = mtcp::peer::admin_request_over(admin, key, tls, id, Msg::AdminDrain).await?;
    let mut st = first.clone();
    while st.connections > 0 {
        if t0.elapsed() > timeout {
            bail!(
                "{} connection(s) still on {id} after {timeout:?}",
                st.connections
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        st = mtcp::peer::admin_request_over(admin, key, tls, id, Msg::AdminStatus).await?;
    }
    Ok((first, st))
}

/// What a drain did: connections moved off the server, connections that ended there meanwhile,
/// connections whose agent is gone (kept until the dead-session bound), and connections still
/// on their way to another server when the drain's time ran out.
#[derive(Debug, Clone)]
pub struct DrainReport {
    pub moved: u64,
    pub ended: u64,
    pub kept_for_dead_agent: u32,
    pub still_moving: u32,
    /// From the drain request until no connection was left live or on its way to another
    /// server (before the counts settled).
    pub empty_after: Duration,
}

/// How long the counts must stay the same, once no connection is live or on its way, before a
/// drain is reported.
const DRAIN_SETTLE: Duration = Duration::from_millis(100);

/// How long a drain waits, once no connection is live, for those the agent said it is moving
/// to be fetched. Past it they are reported as still moving: in eager mode a destination that
/// got no answer from this server within `origin_wait_ms` takes the connection from a backup's
/// replica, and this server's copy stays until the dead-session bound.
const LEAVING_WAIT: Duration = Duration::from_secs(2);

/// [`drain_server`], then what happened, once every connection whose agent said it is moving
/// it (`Msg::Leaving`) has been fetched and the counts have settled (`mtcp drain`).
pub async fn drain_server_report(
    admin: &str,
    key: &mtcp::proto::ClusterKey,
    tls: Option<&mtcp::tls::ClientTls>,
    id: &str,
    timeout: Duration,
) -> Result<DrainReport> {
    use mtcp::proto::wire::Msg;
    let t0 = Instant::now();
    let (first, mut st) = drain_until_empty(admin, key, tls, id, timeout).await?;
    let mut empty_after = (st.leaving == 0).then(|| t0.elapsed());
    let empty = Instant::now();
    let mut stable = Instant::now();
    while ((st.leaving > 0 && empty.elapsed() < LEAVING_WAIT) || stable.elapsed() < DRAIN_SETTLE)
        && t0.elapsed() < timeout
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = mtcp::peer::admin_request_over(admin, key, tls, id, Msg::AdminStatus).await?;
        if (
            next.detached,
            next.leaving,
            next.migrated_out,
            next.connections,
        ) != (st.detached, st.leaving, st.migrated_out, st.connections)
        {
            stable = Instant::now();
        }
        st = next;
        if st.leaving == 0 && st.connections == 0 && empty_after.is_none() {
            empty_after = Some(t0.elapsed());
        }
    }
    let moved = st.migrated_out.saturating_sub(first.migrated_out);
    let before =
        u64::from(first.connections) + u64::from(first.detached) + u64::from(first.leaving);
    Ok(DrainReport {
        moved,
        ended: before.saturating_sub(moved + u64::from(st.detached) + u64::from(st.leaving)),
        kept_for_dead_agent: st.detached,
        still_moving: st.leaving,
        empty_after: empty_after.unwrap_or_else(|| t0.elapsed()),
    })
}

/// A free TCP port on 127.0.0.1 for a listener started a moment later. It is taken *below* the
/// kernel's ephemeral range (`ip_local_port_range`), where outgoing connections never get their
/// ports — agents open spare, watch and probe connections all the time, and a port handed out
/// from the ephemeral range could be taken by one of them before the listener binds it.
///
/// A port is not handed out twice in a process (within the last 4096): the listener it is for
/// starts later, so a bind test alone cannot tell two callers apart, and a cluster takes a
/// dozen ports from ~22,000 (CI once saw two servers of one cluster given the same port).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.len() >= 4096 {
            // Long handed out: bound by their listeners by now, or free again.
            given.clear();
        }
        for _ in 0..1000 {
            let p = rand::Rng::gen_range(&mut rand::thread_rng(), 10_000..low);
            if !given.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
                given.insert(p);
                return p;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Addresses of one server of a local cluster.
#[derive(Debug, Clone)]
pub struct ServerAddrs {
    pub id: String,
    pub data: String,
    pub peer: String,
    pub admin: String,
}

/// Writes a cluster file for `n` servers `s1..sN` on free loopback ports with a fresh random
/// key, `mode = "{mode}"` and, if given, `replicas = N`; returns its path and the servers.
pub fn write_cluster(
    dir: &Path,
    n: usize,
    mode: &str,
    replicas: Option<u32>,
) -> Result<(PathBuf, Vec<ServerAddrs>)> {
    write_cluster_with_key(dir, n, mode, replicas, &rand::random(), &[])
}

/// [`write_cluster`] with a given key.
pub fn write_cluster_with_key(
    dir: &Path,
    n: usize,
    mode: &str,
    replicas: Option<u32>,
    key: &[u8; 32],
    fast_path: &[String],
) -> Result<(PathBuf, Vec<ServerAddrs>)> {
    let mut text = format!(
        "key = \"{}\"\nmode = \"{mode}\"\nheartbeat_ms = 100\n",
        hex::encode(key)
    );
    if let Some(r) = replicas {
        text += &format!("replicas = {r}\n");
    }
    if !fast_path.is_empty() {
        let list: Vec<String> = fast_path.iter().map(|a| format!("\"{a}\"")).collect();
        text += &format!("fast_path = [{}]\n", list.join(", "));
    }
    let mut servers = Vec::new();
    for i in 1..=n {
        let s = ServerAddrs {
            id: format!("s{i}"),
            data: format!("127.0.0.1:{}", free_port()),
            peer: format!("127.0.0.1:{}", free_port()),
            admin: format!("127.0.0.1:{}", free_port()),
        };
        text += &format!(
            "\n[[server]]\nid = \"{}\"\ndata = \"{}\"\npeer = \"{}\"\nadmin = \"{}\"\n",
            s.id, s.data, s.peer, s.admin
        );
        servers.push(s);
    }
    let path = dir.join("cluster.toml");
    std::fs::File::create(&path)?.write_all(text.as_bytes())?;
    Ok((path, servers))
}

/// Waits until `addr` accepts TCP connections, from async code (does not block the thread).
pub async fn wait_listening_async(addr: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listens on {addr} after {limit:?}")
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_listening(addr: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {addr} after {limit:?}")
}

/// Whether something accepts connections at `addr`: a Unix socket path (anything with a `/`)
/// or a TCP address.
pub fn reachable(addr: &str) -> bool {
    if addr.contains('/') {
        std::os::unix::net::UnixStream::connect(addr).is_ok()
    } else {
        std::net::TcpStream::connect(addr).is_ok()
    }
}

/// The admin socket of agent `name` of a cluster in `dir`: in `dir` when the path is short
/// enough for a Unix socket (108 bytes), else in the temp directory.
pub fn admin_socket(dir: &Path, name: &str) -> String {
    let p = dir.join(format!("{name}-admin.sock"));
    if p.as_os_str().len() < 100 {
        return p.display().to_string();
    }
    std::env::temp_dir()
        .join(format!(
            "mtcp-{}-{name}-{:08x}.sock",
            std::process::id(),
            rand::random::<u32>()
        ))
        .display()
        .to_string()
}

/// A running local cluster plus agent. Dropping it kills every process it started.
pub struct LocalCluster {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub cluster_file: PathBuf,
    /// The cluster key (also in the cluster file), for the servers' admin ports.
    pub key: mtcp::proto::ClusterKey,
    /// With [`LocalOptions::tls`]: the client side trusting the cluster's CA (admin ports).
    pub tls: Option<mtcp::tls::ClientTls>,
    /// With [`LocalOptions::tls`]: the cluster CA's certificate, for agents' `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    pub servers: Vec<ServerAddrs>,
    pub agent_listen: String,
    pub agent_admin: String,
    /// Plain-TCP (no M-TCP) listener of server 1, for baselines.
    pub plain: Option<String>,
    children: Vec<Proc>,
    /// The arguments every process was started with, by name (kept after it is killed, for
    /// [`LocalCluster::restart_server`]).
    args: HashMap<String, Vec<String>>,
    /// `RUST_LOG` for the children.
    log: String,
}

/// A started process.
struct Proc {
    name: String,
    child: Child,
    /// Sent SIGSTOP and not SIGCONT since.
    stopped: bool,
}

/// Options for [`LocalCluster::start`].
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub servers: usize,
    pub root: PathBuf,
    pub plain_baseline: bool,
    /// `RUST_LOG` for the children.
    pub log: String,
    pub snapshot_every: Option<u64>,
    /// Extra arguments for every `mtcp server` (before the application subcommand).
    pub server_args: Vec<String>,
    /// The cluster file's `mode` (`"lazy"` or `"eager"`).
    pub mode: String,
    /// The cluster file's `replicas = N`, written only when set.
    pub replicas: Option<u32>,
    /// Extra arguments for `mtcp agent`.
    pub agent_args: Vec<String>,
    /// Extra arguments for one server, by id (after `server_args`), e.g. a test hook on `s1`.
    pub server_args_for: Vec<(String, Vec<String>)>,
    /// Listening addresses of fast-path agents started later ([`LocalCluster::start_agent`]),
    /// for the cluster file's `fast_path` (the agent started here is added by itself when its
    /// `agent_args` hold `--fast-path`).
    pub fast_path_listen: Vec<String>,
    /// The application subcommand and its arguments for every server; empty: the HTTP app on
    /// `root` (with `snapshot_every`).
    pub app_args: Vec<String>,
    /// Extra arguments for one server's application (after `app_args`), by id.
    pub app_args_for: Vec<(String, Vec<String>)>,
    /// Servers listed in the cluster file but not started (a member that is down), by id; the
    /// agent is not told about them.
    pub absent: Vec<String>,
    /// TLS on every port: `mtcp cert --update-cluster` makes a CA and certificates in
    /// `dir/tls`, and agents get `--tls-ca`.
    pub tls: bool,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            servers: 3,
            root: PathBuf::from("www"),
            plain_baseline: false,
            log: "info".into(),
            snapshot_every: None,
            server_args: Vec::new(),
            mode: "lazy".into(),
            replicas: None,
            agent_args: Vec::new(),
            server_args_for: Vec::new(),
            fast_path_listen: Vec::new(),
            app_args: Vec::new(),
            app_args_for: Vec::new(),
            absent: Vec::new(),
            tls: false,
        }
    }
}

impl LocalCluster {
    /// Starts `opts.servers` servers running the HTTP app on `opts.root`, and an agent.
    /// Logs go to `dir/<name>.log`.
    pub fn start(exe: &Path, dir: &Path, opts: &LocalOptions) -> Result<Self> {
        let key: [u8; 32] = rand::random();
        let agent_listen = format!("127.0.0.1:{}", free_port());
        let mut fast_path = opts.fast_path_listen.clone();
        if opts.agent_args.iter().any(|a| a == "--fast-path") {
            fast_path.push(agent_listen.clone());
        }
        let (cluster_file, servers) = write_cluster_with_key(
            dir,
            opts.servers,
            &opts.mode,
            opts.replicas,
            &key,
            &fast_path,
        )?;
        let mut lc = LocalCluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            cluster_file,
            key: mtcp::proto::ClusterKey::from_bytes(key),
            tls: None,
            tls_ca: None,
            servers: servers.clone(),
            agent_listen,
            agent_admin: admin_socket(dir, "agent"),
            plain: None,
            children: Vec::new(),
            args: HashMap::new(),
            log: opts.log.clone(),
        };
        if opts.tls {
            lc.make_certs()?;
        }
        let started: Vec<ServerAddrs> = servers
            .iter()
            .filter(|s| !opts.absent.contains(&s.id))
            .cloned()
            .collect();
        for (i, s) in servers.iter().enumerate() {
            if opts.absent.contains(&s.id) {
                continue;
            }
            let mut args: Vec<String> = vec![
                "server".into(),
                "--cluster".into(),
                lc.cluster_file.display().to_string(),
                "--id".into(),
                s.id.clone(),
            ];
            args.extend(opts.server_args.iter().cloned());
            for (id, extra) in &opts.server_args_for {
                if *id == s.id {
                    args.extend(extra.iter().cloned());
                }
            }
            if !opts.app_args.is_empty() {
                args.extend(opts.app_args.iter().cloned());
                for (id, extra) in &opts.app_args_for {
                    if *id == s.id {
                        args.extend(extra.iter().cloned());
                    }
                }
                lc.spawn(&s.id, &args, false)?;
                continue;
            }
            args.extend([
                "httpd".into(),
                "--root".into(),
                opts.root.display().to_string(),
            ]);
            if let Some(n) = opts.snapshot_every {
                args.push("--snapshot-every".into());
                args.push(n.to_string());
            }
            if i == 0 && opts.plain_baseline {
                let p = format!("127.0.0.1:{}", free_port());
                args.push("--plain".into());
                args.push(p.clone());
                lc.plain = Some(p);
            }
            lc.spawn(&s.id, &args, false)?;
        }
        for s in &started {
            lc.wait_up(&s.data, &s.id)?;
            lc.wait_up(&s.admin, &s.id)?;
        }
        let connect = started
            .iter()
            .map(|s| s.data.clone())
            .collect::<Vec<_>>()
            .join(",");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--connect".into(),
            connect,
            "--listen".into(),
            lc.agent_listen.clone(),
            "--admin".into(),
            lc.agent_admin.clone(),
        ];
        if let Some(ca) = &lc.tls_ca {
            args.extend(["--tls-ca".into(), ca.display().to_string()]);
        }
        args.extend(opts.agent_args.iter().cloned());
        lc.spawn("agent", &args, false)?;
        let (listen, admin) = (lc.agent_listen.clone(), lc.agent_admin.clone());
        lc.wait_up(&listen, "agent")?;
        lc.wait_up(&admin, "agent")?;
        if let Some(p) = lc.plain.clone() {
            lc.wait_up(&p, "s1")?;
        }
        Ok(lc)
    }

    /// `mtcp cert --update-cluster` for this cluster: a CA and certificates in `dir/tls`, and
    /// the cluster file's `[tls]` section.
    fn make_certs(&mut self) -> Result<()> {
        let out = self.dir.join("tls");
        let o = Command::new(&self.exe)
            .args(["cert", "--cluster"])
            .arg(&self.cluster_file)
            .arg("--out")
            .arg(&out)
            .arg("--update-cluster")
            .output()
            .context("running mtcp cert")?;
        if !o.status.success() {
            bail!(
                "mtcp cert failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        let ca = out.join("ca.crt");
        self.tls = Some(mtcp::tls::ClientTls::from_ca_file(&ca)?);
        self.tls_ca = Some(ca);
        Ok(())
    }

    /// Starts one more agent, process `name`, for the same servers with `extra` arguments,
    /// listening on `listen` (or a free port), its admin endpoint a Unix socket in the cluster's
    /// directory unless `extra` holds `--admin`; returns its listening and admin addresses.
    pub fn start_agent(
        &mut self,
        name: &str,
        listen: Option<String>,
        extra: &[&str],
    ) -> Result<(String, String)> {
        let connect = self
            .servers
            .iter()
            .map(|s| s.data.clone())
            .collect::<Vec<_>>()
            .join(",");
        let listen = listen.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        // `extra` may name the admin endpoint itself (e.g. TCP with a token).
        let given = extra
            .iter()
            .position(|a| *a == "--admin")
            .and_then(|i| extra.get(i + 1));
        let admin = given.map_or_else(|| admin_socket(&self.dir, name), |a| a.to_string());
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--connect".into(),
            connect,
            "--listen".into(),
            listen.clone(),
        ];
        if given.is_none() {
            args.extend(["--admin".into(), admin.clone()]);
        }
        if let Some(ca) = &self.tls_ca {
            args.extend(["--tls-ca".into(), ca.display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, &args, false)?;
        self.wait_up(&listen, name)?;
        self.wait_up(&admin, name)?;
        Ok((listen, admin))
    }

    /// Waits until `addr` listens; if process `name` exits meanwhile, says so with the last
    /// line of its log (e.g. a cluster file the server refuses) instead of waiting it out.
    fn wait_up(&mut self, addr: &str, name: &str) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if reachable(addr) {
                return Ok(());
            }
            self.check_alive()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{name}: nothing listens on {addr} after 10 s")
    }

    /// Starts `mtcp ARGS…` as process `name`; its output goes to `dir/<name>.log` (appended
    /// to when `append`, e.g. for a restarted server).
    fn spawn(&mut self, name: &str, args: &[String], append: bool) -> Result<()> {
        let path = self.dir.join(format!("{name}.log"));
        let logf = if append {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?
        } else {
            std::fs::File::create(&path)?
        };
        let child = Command::new(&self.exe)
            .args(args)
            .env("RUST_LOG", &self.log)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {} {}", self.exe.display(), args.join(" ")))?;
        self.children.push(Proc {
            name: name.to_string(),
            child,
            stopped: false,
        });
        self.args.insert(name.to_string(), args.to_vec());
        Ok(())
    }

    fn proc_mut(&mut self, name: &str) -> Result<&mut Proc> {
        self.children
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no running process {name}"))
    }

    /// PID of a started process (`s1`, `agent`, …).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
    }

    /// Whether process `name` was started and not killed (it may have exited on its own; see
    /// [`LocalCluster::check_alive`]).
    pub fn is_started(&self, name: &str) -> bool {
        self.children.iter().any(|p| p.name == name)
    }

    /// Whether process `name` is stopped by [`LocalCluster::sigstop`].
    pub fn is_stopped(&self, name: &str) -> bool {
        self.children.iter().any(|p| p.name == name && p.stopped)
    }

    /// SIGKILLs process `name` (by its PID) and reaps it. It can be started again with
    /// [`LocalCluster::restart_server`].
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let i = self
            .children
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no running process {name}"))?;
        let mut p = self.children.remove(i);
        // Child::kill is SIGKILL by PID (a no-op error if it already exited); wait reaps it.
        let _ = p.child.kill();
        p.child.wait().with_context(|| format!("reaping {name}"))?;
        Ok(())
    }

    /// Sends `sig` to process `name` by its PID.
    fn signal(&mut self, name: &str, sig: i32) -> Result<&mut Proc> {
        let p = self.proc_mut(name)?;
        let pid = p.child.id() as libc::pid_t;
        // SAFETY: kill(2) on a child this cluster started and has not reaped (so the PID is
        // still ours).
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!(
                "kill({pid}, {sig}) for {name}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(p)
    }

    /// SIGSTOPs process `name`: it stays alive but runs no more (a hung server).
    pub fn sigstop(&mut self, name: &str) -> Result<()> {
        self.signal(name, libc::SIGSTOP)?.stopped = true;
        Ok(())
    }

    /// SIGCONTs process `name` after [`LocalCluster::sigstop`].
    pub fn sigcont(&mut self, name: &str) -> Result<()> {
        self.signal(name, libc::SIGCONT)?.stopped = false;
        Ok(())
    }

    /// Starts a fresh `mtcp server` with the id and arguments server `id` was first started
    /// with (after [`LocalCluster::kill`], or after it exited on its own), and waits until its
    /// data and admin ports listen.
    pub fn restart_server(&mut self, id: &str) -> Result<()> {
        let s = self.spawn_again(id)?;
        self.wait_up(&s.data, id)?;
        self.wait_up(&s.admin, id)
    }

    /// [`LocalCluster::restart_server`] from async code: waits without blocking the thread.
    pub async fn restart_server_async(&mut self, id: &str) -> Result<()> {
        let s = self.spawn_again(id)?;
        wait_listening_async(&s.data, Duration::from_secs(10)).await?;
        wait_listening_async(&s.admin, Duration::from_secs(10)).await
    }

    fn spawn_again(&mut self, id: &str) -> Result<ServerAddrs> {
        let s = self
            .servers
            .iter()
            .find(|s| s.id == id)
            .with_context(|| format!("unknown server {id}"))?
            .clone();
        if let Some(p) = self.children.iter_mut().find(|p| p.name == id) {
            if p.child.try_wait()?.is_none() {
                bail!("server {id} is still running");
            }
            self.children.retain(|p| p.name != id);
        }
        let args = self.args.get(id).cloned().context("no arguments kept")?;
        self.spawn(id, &args, true)?;
        Ok(s)
    }

    /// Removes started processes that exited on their own; returns their names and statuses.
    pub fn reap_exited(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        let mut gone = Vec::new();
        self.children.retain_mut(|p| match p.child.try_wait() {
            Ok(Some(st)) => {
                gone.push((p.name.clone(), st));
                false
            }
            _ => true,
        });
        gone
    }

    /// The admin address of server `id`.
    pub fn admin_of(&self, id: &str) -> Result<&str> {
        self.servers
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.admin.as_str())
            .with_context(|| format!("unknown server {id}"))
    }

    /// `mtcp drain` of server `id`: waits until no connection with an agent is left on it.
    pub async fn drain(&self, id: &str, timeout: Duration) -> Result<()> {
        drain_server(
            self.admin_of(id)?,
            &self.key,
            self.tls.as_ref(),
            id,
            timeout,
        )
        .await?;
        Ok(())
    }

    /// Ends a drain of server `id`: it accepts new and migrated connections again.
    pub async fn undrain(&self, id: &str) -> Result<()> {
        use mtcp::proto::wire::Msg;
        let st = mtcp::peer::admin_request_over(
            self.admin_of(id)?,
            &self.key,
            self.tls.as_ref(),
            id,
            Msg::AdminUndrain,
        )
        .await?;
        if st.draining {
            bail!("{id} still says it is draining");
        }
        Ok(())
    }

    /// Runs `mtcp ARGS…` to completion and returns its stdout (error with stderr on failure).
    pub fn mtcp(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.exe)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "mtcp {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's status over its admin port (from synchronous code, e.g. tests).
    pub fn status(&self) -> Result<Vec<mtcp_agent::ConnStatus>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(self.status_async())
    }

    /// The agent's status over its admin port.
    pub async fn status_async(&self) -> Result<Vec<mtcp_agent::ConnStatus>> {
        match mtcp_agent::admin::request(&self.agent_admin, &mtcp_agent::admin::Request::Status)
            .await
        {
            Ok(mtcp_agent::admin::Response::Status { connections }) => Ok(connections),
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(e) => bail!(e),
        }
    }

    /// Moves every live connection of the agent (`mtcp migrate --all`); errors unless at least
    /// one moved and none failed.
    pub async fn migrate_all(&self) -> Result<()> {
        self.migrate(None, None).await.map(|_| ())
    }

    /// Moves connection `cid` (every live one when `None`; `mtcp migrate --conn CID` /
    /// `--all`), to server `to` or the agent's choice. Returns `(cid, new server)` of each;
    /// errors unless at least one moved and none failed.
    pub async fn migrate(
        &self,
        cid: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<(String, String)>> {
        use mtcp_agent::admin::{request, Request, Response};
        let req = Request::Migrate {
            conn: cid.map(str::to_string),
            to: to.map(str::to_string),
        };
        match request(&self.agent_admin, &req).await {
            Ok(Response::Migrated { results })
                if !results.is_empty() && results.iter().all(|r| r.ok) =>
            {
                Ok(results.into_iter().map(|r| (r.cid, r.detail)).collect())
            }
            other => bail!("migration failed: {other:?}"),
        }
    }

    /// Checks every child is still running; names the first that died.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.children {
            if let Some(st) = p.child.try_wait()? {
                let log = self.dir.join(format!("{}.log", p.name));
                let last = last_log_line(&log);
                bail!("{} exited ({st}): {last}; see {}", p.name, log.display());
            }
        }
        Ok(())
    }

    /// Kills every started process (SIGCONT first for stopped ones) and waits for them.
    pub fn stop(&mut self) {
        for p in &mut self.children {
            if p.name.starts_with("agent") && !p.stopped {
                // Agents clean up on SIGTERM (the fast path's nftables table); give them a moment.
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(2) {
                    if let Ok(Some(_)) = p.child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if p.stopped {
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGCONT) };
                p.stopped = false;
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.children.clear();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `size` bytes of pseudo-random data (seeded) to `path`; returns its SHA-256 (hex).
pub fn make_file(path: &Path, size: u64, seed: u64) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut h = Sha256::new();
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            // xorshift64*: fast, and every MiB differs.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.flush()?;
    Ok(hex::encode(h.finalize()))
}

/// SHA-256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The last non-empty line of a log file, without terminal colour codes ("" if none).
pub fn last_log_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    strip_ansi(line).trim().to_string()
}

/// A log line without terminal colour codes (ANSI CSI sequences: ESC '[' … a final byte in
/// '@'..='~').
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a program is on PATH.
pub fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
