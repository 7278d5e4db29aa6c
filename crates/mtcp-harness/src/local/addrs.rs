//! Addresses of a local cluster: free ports, the cluster file, waiting for listeners, agents'
//! admin sockets.

use super::*;

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
