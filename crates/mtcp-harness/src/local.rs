//! A cluster of `mtcp` processes on loopback: writes the cluster file, starts servers and an
//! agent, talks to their admin ports, and kills every process it started (by PID) when dropped.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod addrs;
mod admin;
mod files;
mod procs;

pub use addrs::{
    admin_socket, free_port, reachable, wait_listening, wait_listening_async, write_cluster,
    write_cluster_with_key, ServerAddrs,
};
pub use admin::{drain_server, drain_server_report, DrainReport};
pub use files::{have, last_log_line, make_file, sha256_file, strip_ansi};

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
}
