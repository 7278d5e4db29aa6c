//! An M-TCP cluster inside a network lab (`mtcp-lab`, root only): server `si` runs in the lab's
//! host `si` (data, peer and admin ports on 198.18.i.2), and a transparent agent runs in the
//! client host, intercepting a service address. Client programs run in the client host with
//! [`LabCluster::client_command`] and need no proxy setting. Used by the lab tests and the lab
//! benchmarks; everything is removed with the lab when the cluster is dropped.

use anyhow::{bail, Context, Result};
use mtcp_agent::admin::{Request, Response};
use mtcp_lab::{Host, Impairment, Lab, LabOptions, LabProc};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Ports every server uses on its own address.
pub const DATA_PORT: u16 = 7000;
pub const PEER_PORT: u16 = 7100;
pub const ADMIN_PORT: u16 = 7200;
/// The plain-TCP (no M-TCP) listener of the HTTP app, for baselines.
pub const PLAIN_PORT: u16 = 8080;
/// The agent's ports in the client host.
pub const AGENT_LISTEN: &str = "127.0.0.1:15001";
pub const AGENT_ADMIN: &str = "127.0.0.1:15002";

/// How to start a [`LabCluster`].
#[derive(Debug, Clone)]
pub struct LabClusterOptions {
    pub tag: String,
    pub servers: u16,
    /// `"lazy"` or `"eager"`.
    pub mode: String,
    pub servers_link: Impairment,
    pub client_link: Impairment,
    /// Directory the servers serve.
    pub root: PathBuf,
    /// Extra `mtcp server` arguments (before the app).
    pub server_args: Vec<String>,
    /// Extra `httpd` arguments.
    pub app_args: Vec<String>,
    /// Another application and its arguments instead of `httpd --root ROOT` and `app_args`
    /// (e.g. `pgfront --backend URL`).
    pub app: Option<Vec<String>>,
    /// Extra `mtcp agent` arguments.
    pub agent_args: Vec<String>,
    /// `RUST_LOG` of the processes.
    pub log: String,
    /// Also serve plain TCP on [`PLAIN_PORT`] (baselines).
    pub plain: bool,
    /// Run the agent in forward mode: client programs connect to [`AGENT_LISTEN`] (then
    /// [`LabCluster::service`]) instead of being redirected from the service address.
    pub forward: bool,
}

impl Default for LabClusterOptions {
    fn default() -> Self {
        Self {
            tag: "mc".into(),
            servers: 3,
            mode: "eager".into(),
            servers_link: Impairment::default(),
            client_link: Impairment::default(),
            root: PathBuf::from("www"),
            server_args: Vec::new(),
            app_args: Vec::new(),
            app: None,
            agent_args: Vec::new(),
            log: "info".into(),
            plain: false,
            forward: false,
        }
    }
}

/// A running cluster in a lab. Dropping it tears the lab down (processes killed by PID,
/// namespaces, delay lines and nft tables removed).
pub struct LabCluster {
    // Declared first: dropped (torn down) before anything else.
    pub lab: Lab,
    pub dir: PathBuf,
    pub exe: PathBuf,
    pub cluster_file: PathBuf,
    /// The address client programs use: server 1's address, port 80 (nothing listens there;
    /// the agent intercepts it), or the agent's own [`AGENT_LISTEN`] in forward mode.
    pub service: SocketAddrV4,
    opts: LabClusterOptions,
    procs: Mutex<HashMap<String, LabProc>>,
    /// The agent's admin token ([`AGENT_ADMIN`] is TCP, inside the client host).
    admin_token: String,
}

fn server_host(id: &str) -> Result<Host> {
    let i: u16 = id
        .strip_prefix('s')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("not a server id: {id}"))?;
    Ok(Host::Server(i))
}

impl LabCluster {
    /// Makes the lab (`opts.tag`, its links impaired as `opts` says), then starts the cluster
    /// in it ([`LabCluster::on`]).
    pub fn start(exe: &Path, dir: &Path, opts: &LabClusterOptions) -> Result<Self> {
        let lab = Lab::up(LabOptions {
            tag: opts.tag.clone(),
            servers: opts.servers,
            servers_link: opts.servers_link,
            client_link: opts.client_link,
            log_dir: Some(dir.to_path_buf()),
            ..Default::default()
        })
        .context("lab up")?;
        Self::on(lab, exe, dir, opts)
    }

    /// Starts the servers and the agent in `lab`, made by the caller (with `opts.servers`
    /// servers; its links are left as they are), which may have started something the
    /// servers need first — a database in the router's namespace. The cluster owns the lab
    /// from here: dropping it (or an error here) tears the lab down.
    pub fn on(lab: Lab, exe: &Path, dir: &Path, opts: &LabClusterOptions) -> Result<Self> {
        if lab.servers() < opts.servers {
            bail!(
                "lab {:?} has {} server hosts, the cluster needs {}",
                lab.tag(),
                lab.servers(),
                opts.servers
            );
        }
        let key: [u8; 32] = rand::random();
        let mut text = format!(
            "key = \"{}\"\nmode = \"{}\"\nheartbeat_ms = 100\n",
            hex::encode(key),
            opts.mode
        );
        for i in 1..=opts.servers {
            let a = Host::Server(i).addr();
            text += &format!(
                "\n[[server]]\nid = \"s{i}\"\ndata = \"{a}:{DATA_PORT}\"\npeer = \"{a}:{PEER_PORT}\"\nadmin = \"{a}:{ADMIN_PORT}\"\n"
            );
        }
        let cluster_file = dir.join("cluster.toml");
        std::fs::File::create(&cluster_file)?.write_all(text.as_bytes())?;
        let lc = LabCluster {
            service: if opts.forward {
                AGENT_LISTEN.parse().expect("a socket address")
            } else {
                SocketAddrV4::new(Host::Server(1).addr(), 80)
            },
            lab,
            dir: dir.to_path_buf(),
            exe: exe.to_path_buf(),
            cluster_file,
            opts: opts.clone(),
            procs: Mutex::new(HashMap::new()),
            admin_token: hex::encode(rand::random::<[u8; 16]>()),
        };
        for i in 1..=opts.servers {
            lc.start_server(&format!("s{i}"))?;
        }
        lc.start_agent()?;
        Ok(lc)
    }

    fn spawn(&self, name: &str, host: Host, args: &[String]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("RUST_LOG", &self.opts.log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let p = self.lab.spawn_command(host, cmd)?;
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), p);
        Ok(())
    }

    /// Waits until `addr` accepts TCP connections from `from`.
    fn wait_listening(&self, from: Host, addr: String, what: &str) -> Result<()> {
        let ok = self.lab.run_in(from, move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(a) = addr.parse() {
                    if std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok()
                    {
                        return true;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })?;
        if !ok {
            bail!(
                "{what} is not listening after 10 s (see {})",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Starts (or restarts) server `id` and waits until the client host reaches it.
    pub fn start_server(&self, id: &str) -> Result<()> {
        let host = server_host(id)?;
        let mut args: Vec<String> = vec![
            "server".into(),
            "--cluster".into(),
            self.cluster_file.display().to_string(),
            "--id".into(),
            id.into(),
        ];
        args.extend(self.opts.server_args.iter().cloned());
        match &self.opts.app {
            Some(app) => args.extend(app.iter().cloned()),
            None => {
                args.extend([
                    "httpd".into(),
                    "--root".into(),
                    self.opts.root.display().to_string(),
                ]);
                args.extend(self.opts.app_args.iter().cloned());
            }
        }
        if self.opts.plain {
            args.extend(["--plain".into(), format!("{}:{PLAIN_PORT}", host.addr())]);
        }
        self.spawn(id, host, &args)?;
        self.wait_listening(
            Host::Client,
            format!("{}:{DATA_PORT}", host.addr()),
            &format!("server {id}"),
        )
    }

    fn start_agent(&self) -> Result<()> {
        let connect = (1..=self.opts.servers)
            .map(|i| format!("{}:{DATA_PORT}", Host::Server(i).addr()))
            .collect::<Vec<_>>()
            .join(",");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--connect".into(),
            connect,
            "--listen".into(),
            AGENT_LISTEN.into(),
            "--admin".into(),
            AGENT_ADMIN.into(),
            "--admin-token-file".into(),
            self.admin_token_file()?.display().to_string(),
        ];
        if !self.opts.forward {
            args.extend([
                "--transparent".into(),
                "--service".into(),
                self.service.to_string(),
            ]);
        }
        args.extend(self.opts.agent_args.iter().cloned());
        self.spawn("agent", Host::Client, &args)?;
        self.wait_listening(Host::Client, AGENT_ADMIN.into(), "the agent")
    }

    /// Writes the agent's admin token to a file only its owner may read.
    fn admin_token_file(&self) -> Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.join("agent-admin.token");
        let _ = std::fs::remove_file(&p);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)?
            .write_all(self.admin_token.as_bytes())?;
        Ok(p)
    }

    fn proc(&self, name: &str) -> Result<LabProc> {
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .with_context(|| format!("no process {name}"))
    }

    /// `kill -9` of server `id`'s process.
    pub fn kill_server(&self, id: &str) -> Result<()> {
        let p = self.proc(id)?;
        self.lab.kill(&p)?;
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    pub fn stop_server(&self, id: &str) -> Result<()> {
        Ok(self.lab.stop(&self.proc(id)?)?)
    }

    pub fn cont_server(&self, id: &str) -> Result<()> {
        Ok(self.lab.cont(&self.proc(id)?)?)
    }

    /// Impairs server `id`'s link.
    pub fn impair_server(&self, id: &str, imp: Impairment) -> Result<()> {
        Ok(self.lab.impair(server_host(id)?, imp)?)
    }

    /// A command that runs `prog` in the client host.
    pub fn client_command(&self, prog: &str) -> Command {
        self.lab.command(Host::Client, prog)
    }

    /// One request to the agent's admin endpoint, from inside the client host: its answer,
    /// or why the request failed.
    fn admin(&self, req: Request) -> Result<std::result::Result<Response, String>> {
        let token = self.admin_token.clone();
        let r = self.lab.run_in(Host::Client, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(mtcp_agent::admin::request_with(
                AGENT_ADMIN,
                Some(&token),
                &req,
            ))
            .map_err(|e| e.to_string())
        })?;
        Ok(r)
    }

    /// The agent's connections (asked from inside the client host).
    pub fn status(&self) -> Result<Vec<mtcp_agent::ConnStatus>> {
        match self.admin(Request::Status)? {
            Ok(Response::Status { connections }) => Ok(connections),
            Ok(other) => bail!("agent answered {other:?}"),
            Err(e) => bail!("agent status: {e}"),
        }
    }

    /// Moves every connection (as `mtcp migrate --all`), from inside the client host.
    pub fn migrate_all(&self) -> Result<()> {
        match self.admin(Request::Migrate {
            conn: None,
            to: None,
        })? {
            Ok(Response::Migrated { results }) if results.iter().all(|r| r.ok) => Ok(()),
            other => bail!("migration failed: {other:?}"),
        }
    }

    /// The server the live connection that has received bytes is on.
    pub fn serving(&self) -> Result<Option<String>> {
        Ok(self
            .status()?
            .into_iter()
            .find(|c| c.is_live() && c.bytes_down > 0)
            .map(|c| c.server))
    }
}
