//! A cluster of `mtcp` processes on loopback: writes the cluster file, starts servers and an
//! agent, talks to their admin ports, and kills every process it started (by PID) when dropped.

use anyhow::{bail, Context, Result};
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
    id: &str,
    timeout: Duration,
) -> Result<mtcp::proto::wire::ServerStatus> {
    use mtcp::proto::wire::Msg;
    let t0 = Instant::now();
    let mut st = mtcp::peer::admin_request(admin, key, Msg::AdminDrain).await?;
    while st.connections > 0 {
        if t0.elapsed() > timeout {
            bail!(
                "{} connection(s) still on {id} after {timeout:?}",
                st.connections
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        st = mtcp::peer::admin_request(admin, key, Msg::AdminStatus).await?;
    }
    Ok(st)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
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

/// Writes a cluster file for `n` servers `s1..sN` on free loopback ports; returns its path and
/// the servers.
pub fn write_cluster(dir: &Path, n: usize) -> Result<(PathBuf, Vec<ServerAddrs>)> {
    let key: [u8; 32] = rand::random();
    let mut text = format!(
        "key = \"{}\"\nmode = \"lazy\"\nheartbeat_ms = 100\n",
        hex::encode(key)
    );
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

/// A running local cluster plus agent. Dropping it kills every process it started.
pub struct LocalCluster {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub cluster_file: PathBuf,
    pub servers: Vec<ServerAddrs>,
    pub agent_listen: String,
    pub agent_admin: String,
    /// Plain-TCP (no M-TCP) listener of server 1, for baselines.
    pub plain: Option<String>,
    children: Vec<(String, Child)>,
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
}

impl LocalCluster {
    /// Starts `opts.servers` servers running the HTTP app on `opts.root`, and an agent.
    /// Logs go to `dir/<name>.log`.
    pub fn start(exe: &Path, dir: &Path, opts: &LocalOptions) -> Result<Self> {
        let (cluster_file, servers) = write_cluster(dir, opts.servers)?;
        let mut lc = LocalCluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            cluster_file,
            servers: servers.clone(),
            agent_listen: format!("127.0.0.1:{}", free_port()),
            agent_admin: format!("127.0.0.1:{}", free_port()),
            plain: None,
            children: Vec::new(),
        };
        for (i, s) in servers.iter().enumerate() {
            let mut args: Vec<String> = vec![
                "server".into(),
                "--cluster".into(),
                lc.cluster_file.display().to_string(),
                "--id".into(),
                s.id.clone(),
            ];
            args.extend(opts.server_args.iter().cloned());
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
            lc.spawn(&s.id, &args, &opts.log)?;
        }
        for s in &servers {
            wait_listening(&s.data, Duration::from_secs(10))?;
            wait_listening(&s.admin, Duration::from_secs(10))?;
        }
        let connect = servers
            .iter()
            .map(|s| s.data.clone())
            .collect::<Vec<_>>()
            .join(",");
        let args: Vec<String> = vec![
            "agent".into(),
            "--connect".into(),
            connect,
            "--listen".into(),
            lc.agent_listen.clone(),
            "--admin".into(),
            lc.agent_admin.clone(),
        ];
        lc.spawn("agent", &args, &opts.log)?;
        wait_listening(&lc.agent_listen, Duration::from_secs(10))?;
        wait_listening(&lc.agent_admin, Duration::from_secs(10))?;
        if let Some(p) = &lc.plain {
            wait_listening(p, Duration::from_secs(10))?;
        }
        Ok(lc)
    }

    fn spawn(&mut self, name: &str, args: &[String], log: &str) -> Result<()> {
        let logf = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = Command::new(&self.exe)
            .args(args)
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {} {}", self.exe.display(), args.join(" ")))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// PID of a started process (`s1`, `agent`, …).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
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
        use mtcp_agent::admin::{request, Request, Response};
        let req = Request::Migrate {
            conn: None,
            to: None,
        };
        match request(&self.agent_admin, &req).await {
            Ok(Response::Migrated { results })
                if !results.is_empty() && results.iter().all(|r| r.ok) =>
            {
                Ok(())
            }
            other => bail!("migration failed: {other:?}"),
        }
    }

    /// Checks every child is still running; names the first that died.
    pub fn check_alive(&mut self) -> Result<()> {
        for (n, c) in &mut self.children {
            if let Some(st) = c.try_wait()? {
                bail!(
                    "{n} exited ({st}); see {}",
                    self.dir.join(format!("{n}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// Kills every started process and waits for them.
    pub fn stop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
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

/// Whether a program is on PATH.
pub fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
