//! Shared set-up for the end-to-end tests: a temp directory, a served file, a local cluster.
#![allow(dead_code)]

use mtcp_harness::local::{self, LocalCluster, LocalOptions};
use std::path::{Path, PathBuf};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("mtcp-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("www")).expect("create temp dir");
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; logs kept in {}", self.0.display());
            let _ = std::fs::remove_dir_all(self.0.join("www"));
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mtcp"))
}

/// Makes `www/<name>` of `size` bytes and returns its SHA-256.
pub fn file(dir: &TempDir, name: &str, size: u64, seed: u64) -> String {
    local::make_file(&dir.path().join("www").join(name), size, seed).expect("make file")
}

pub fn cluster(dir: &TempDir, servers: usize) -> LocalCluster {
    cluster_with(dir, servers, None)
}

pub fn cluster_with(dir: &TempDir, servers: usize, snapshot_every: Option<u64>) -> LocalCluster {
    cluster_args(dir, servers, snapshot_every, &[])
}

pub fn cluster_args(
    dir: &TempDir,
    servers: usize,
    snapshot_every: Option<u64>,
    server_args: &[&str],
) -> LocalCluster {
    cluster_mode(dir, servers, snapshot_every, server_args, "lazy")
}

/// A cluster of `servers` in `mode`, the HTTP app serving `dir/www`, debug logs in `dir`.
pub fn cluster_mode(
    dir: &TempDir,
    servers: usize,
    snapshot_every: Option<u64>,
    server_args: &[&str],
    mode: &str,
) -> LocalCluster {
    let opts = LocalOptions {
        servers,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        snapshot_every,
        server_args: server_args.iter().map(|s| s.to_string()).collect(),
        mode: mode.into(),
        ..Default::default()
    };
    LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
}

/// The server the agent's (only) live connection is on.
pub fn serving(lc: &LocalCluster) -> String {
    lc.status()
        .expect("agent status")
        .into_iter()
        .find(|c| c.is_live())
        .expect("a live connection")
        .server
}

pub fn data_port(lc: &LocalCluster, id: &str) -> u16 {
    let s = lc.servers.iter().find(|s| s.id == id).expect("server id");
    s.data.rsplit(':').next().unwrap().parse().unwrap()
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(b))
}

/// Starts `curl` downloading `http://{agent}/{path}` to `out` at most `rate` (curl's syntax).
pub fn spawn_curl(lc: &LocalCluster, path: &str, rate: &str, out: &Path) -> std::process::Child {
    std::process::Command::new("curl")
        .args(["-sS", "--fail", "--limit-rate", rate, "-o"])
        .arg(out)
        .arg(format!("http://{}/{path}", lc.agent_listen))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start curl")
}

/// A cluster of `servers` in eager mode (one backup per server).
pub fn eager_cluster(
    dir: &TempDir,
    servers: usize,
    snapshot_every: Option<u64>,
    server_args: &[&str],
) -> LocalCluster {
    cluster_mode(dir, servers, snapshot_every, server_args, "eager")
}

/// Whether the tests run as root (namespaces, nftables, `ss -K` need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Size of a file being written (0 before it exists).
pub fn len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Waits (bounded) until `f` holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits (bounded) for a client program; whether it succeeded. Kills it and panics after
/// `limit`.
pub fn wait_child(c: &mut std::process::Child, what: &str, limit: std::time::Duration) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st.success();
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Resets the server side of every established TCP connection on `port` (`ss -K`), so the agent
/// sees its session reset while the server process keeps running. Needs root.
pub fn reset_sessions(port: u16) -> Result<(), String> {
    let out = std::process::Command::new("ss")
        .args([
            "-K",
            "-t",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .map_err(|e| format!("ss: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // ss prints a header plus one line per destroyed socket.
    if !out.status.success() || text.lines().count() < 2 {
        return Err(format!(
            "ss destroyed nothing (status {}, output {text:?}, stderr {:?})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// curl downloads `path` (`size` bytes, at most `rate`) through the agent into `out` while its
/// connection is drained at 1/5, moved by hand at 2/5 and, with `reset`, has its session reset
/// with `ss -K` at 3/5 while the origin lives. Returns curl's exit status and how many of those
/// steps were taken before the download ended.
pub fn download_with_moves(
    lc: &LocalCluster,
    path: &str,
    size: u64,
    rate: &str,
    out: &Path,
    reset: bool,
) -> (std::process::ExitStatus, u32) {
    let mut curl = spawn_curl(lc, path, rate, out);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t0 = std::time::Instant::now();
    let mut step = 0;
    let status = loop {
        if let Some(st) = curl.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "download took too long"
        );
        let got = len(out);
        if step == 0 && got > size / 5 {
            let s = serving(lc);
            rt.block_on(mtcp_cli::demo::drain(lc, &s)).expect("drain");
            step = 1;
        } else if step == 1 && got > size * 2 / 5 {
            let r = lc
                .mtcp(&["migrate", "--agent", &lc.agent_admin, "--all"])
                .expect("manual migration");
            assert!(r.contains("->"), "{r}");
            step = 2;
        } else if step == 2 && got > size * 3 / 5 {
            if reset {
                let s = serving(lc);
                reset_sessions(data_port(lc, &s)).expect("reset the session");
            } else {
                eprintln!("!!! NOT ROOT: cannot reset the session with `ss -K`; this part of the test is NOT run !!!");
            }
            step = 3;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (status, step)
}

/// No namespace of lab `tag` is left.
pub fn assert_lab_gone(tag: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        !list.contains(&format!("mtcp-{tag}-")),
        "lab {tag} left namespaces behind: {list}"
    );
}

/// Waits (at most 90 s) for a download through the agent and checks it arrived whole: status
/// 200 and the body's digest equal to `want`.
pub async fn assert_download_intact(
    dl: tokio::task::JoinHandle<anyhow::Result<mtcp_harness::client::Response>>,
    want: &str,
) {
    let r = tokio::time::timeout(std::time::Duration::from_secs(90), dl)
        .await
        .expect("download finished")
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.digest, want, "the live download was corrupted");
}

/// A session on the data port `addr` opened with HELLO and the fast-path capability, as a probe
/// that is not a real agent speaks it; its reader (1 MiB frames) and writer.
pub async fn fast_path_hello(
    addr: &str,
) -> (
    mtcp::framed::FrameReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    use mtcp::framed;
    use mtcp::proto::wire::{self, Msg};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    framed::exchange_preamble(&mut s).await.unwrap();
    let (r, mut w) = s.into_split();
    let hello = Msg::Hello {
        caps: wire::CAP_DIRECT,
        orig_dst: None,
    };
    framed::write_msg(&mut w, &hello).await.unwrap();
    (framed::FrameReader::new(r, 1 << 20), w)
}

/// `servers` servers in `mode`, s1 with a metrics endpoint (`--metrics`); the cluster and that
/// endpoint's address.
pub fn cluster_with_metrics_on_s1(
    dir: &TempDir,
    servers: usize,
    mode: &str,
) -> (LocalCluster, String) {
    let m1 = format!("127.0.0.1:{}", local::free_port());
    let opts = LocalOptions {
        servers,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        mode: mode.into(),
        server_args_for: vec![("s1".into(), vec!["--metrics".into(), m1.clone()])],
        ..Default::default()
    };
    let lc = LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster");
    local::wait_listening(&m1, std::time::Duration::from_secs(10)).unwrap();
    (lc, m1)
}

/// The value of `series` (`name{labels}`, exactly as the endpoint prints it) from the metrics
/// endpoint at `addr`, scraped with curl; panics showing the scrape when it is absent.
pub fn metric(addr: &str, series: &str) -> f64 {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{addr}/metrics")])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// One GET of `/f.bin` on each keep-alive connection; each body's SHA-256 must be `want`.
pub async fn get_all(conns: &mut [mtcp_harness::client::Client], want: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c.request("GET", "/f.bin", &[]).await.unwrap();
        assert_eq!((r.status, r.digest.as_str()), (200, want), "connection {i}");
    }
}

/// A session from source address `src` to the data port `addr`, over TLS when `tls` is given:
/// preamble and HELLO. WELCOME gives the open session's halves; otherwise the refusal.
pub async fn hello_from(
    addr: &str,
    src: &str,
    tls: Option<&mtcp::tls::ClientTls>,
) -> Result<
    (
        mtcp::framed::FrameReader<mtcp::stream::ReadHalf>,
        mtcp::stream::WriteHalf,
    ),
    mtcp::proto::stream::Refusal,
> {
    use mtcp::framed::{self, FrameReader};
    use mtcp::proto::wire::Msg;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let tcp = sock.connect(addr.parse().unwrap()).await.unwrap();
    let mut s = match tls {
        Some(tls) => {
            let name = mtcp::tls::name_of_addr(addr).unwrap();
            tls.connect(name, tcp).await.expect("TLS handshake")
        }
        None => mtcp::stream::Stream::from(tcp),
    };
    framed::exchange_preamble(&mut s).await.unwrap();
    let (r, mut w) = s.into_split();
    let hello = Msg::Hello {
        caps: 0,
        orig_dst: None,
    };
    // A refused session may be closed before the HELLO is written.
    let _ = framed::write_msg(&mut w, &hello).await;
    let mut r = FrameReader::new(r, 4 << 20);
    match r
        .next_msg(std::time::Duration::from_secs(10))
        .await
        .unwrap()
    {
        Msg::Welcome(_) => Ok((r, w)),
        Msg::Refused { code, reason } => Err(mtcp::proto::stream::Refusal::new(code, reason)),
        other => panic!("expected WELCOME or REFUSED, got {other:?}"),
    }
}

/// An authenticated channel to server `id`'s port of kind `kind`, opened as server `from` with
/// the cluster's key.
pub async fn open(
    lc: &LocalCluster,
    id: &str,
    kind: mtcp::proto::PortKind,
    from: &str,
) -> mtcp::peer::Channel {
    let s = lc.servers.iter().find(|s| s.id == id).unwrap();
    let addr = match kind {
        mtcp::proto::PortKind::Peer => &s.peer,
        mtcp::proto::PortKind::Admin => &s.admin,
    };
    let opener = mtcp::peer::Opener {
        key: &lc.key,
        from,
        tls: lc.tls.as_ref(),
        hedge: mtcp::proto::trigger::MIN_RTO,
    };
    let t = std::time::Duration::from_secs(5);
    mtcp::peer::connect_authenticated(addr, opener, id, kind, 1 << 20, t)
        .await
        .unwrap()
}

/// One value from PostgreSQL directly (not through the front-ends).
pub fn sql(pl: &mtcp_harness::pglocal::PgLocal, q: &str) -> String {
    pl.pg
        .psql("postgres", q)
        .unwrap_or_else(|e| panic!("{q}: {e:#}"))
}

/// A tokio-postgres connection's task: it ends with the error of a FATAL message that came
/// while no query was waiting.
pub type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// A tokio-postgres session through the agent, and its connection task.
pub async fn connect(pl: &mtcp_harness::pglocal::PgLocal) -> (tokio_postgres::Client, ConnTask) {
    let (host, port) = pl.agent_addr();
    let conf = format!("host={host} port={port} user=postgres dbname=postgres");
    let (client, conn) = tokio_postgres::connect(&conf, tokio_postgres::NoTls)
        .await
        .expect("connect through the agent");
    (client, tokio::spawn(conn))
}

/// The first column of the first row of a simple query's answer.
pub async fn value(c: &tokio_postgres::Client, q: &str) -> Result<String, tokio_postgres::Error> {
    let rows = c.simple_query(q).await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

/// A blocking call (psql, the mtcp CLI) from a test on the multi-threaded runtime.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `mtcp migrate --all --to ID` through `lc`'s agent, in the background (it returns once the
/// move is over).
pub fn move_to(lc: &LocalCluster, id: &str) -> std::process::Child {
    use std::process::{Command, Stdio};
    Command::new(&lc.exe)
        .args(["migrate", "--agent", &lc.agent_admin, "--all", "--to", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mtcp migrate")
}

/// The log of process `name` (`agent`, `s1`, …) in `dir`, colours stripped.
pub fn log(dir: &TempDir, name: &str) -> String {
    let raw = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
    raw.lines()
        .map(local::strip_ansi)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last 40 lines of `s`.
pub fn tail(s: &str) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Downloads a `size`-byte file (made from `seed`) with curl through `lc`'s agent, from s1;
/// once a quarter is in, runs `fault`, then checks that curl got every byte (SHA-256).
pub fn download_through(
    dir: &TempDir,
    lc: &mut LocalCluster,
    size: u64,
    seed: u64,
    fault: impl FnOnce(&mut LocalCluster),
) {
    use std::time::Duration;
    let want = file(dir, "big.bin", size, seed);
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(lc, "big.bin", "4M", &out);
    wait_for("download progress", Duration::from_secs(60), || {
        len(&out) > size / 4
    });
    assert_eq!(serving(lc), "s1", "the download starts on s1");
    fault(lc);
    let ok = wait_child(&mut curl, "curl", Duration::from_secs(90));
    assert!(
        ok,
        "curl failed\n--- agent log tail:\n{}",
        tail(&log(dir, "agent"))
    );
    assert_eq!(local::sha256_file(&out).unwrap(), want, "the bytes differ");
}

/// A pgbench TPC-B run's output (`out`) against the database it ran on (`sql`: one query's
/// `psql -At` output): no client aborted, 0 failed transactions, one `pgbench_history` row per
/// transaction pgbench counted, Σ abalance = Σ tbalance = Σ bbalance = Σ delta. Returns the
/// transactions counted and the sums as read.
pub fn assert_tpcb_consistent(
    out: &str,
    what: &str,
    sql: impl Fn(&str) -> String,
) -> (u64, String) {
    assert!(!out.contains("aborted"), "{what}: a client aborted:\n{out}");
    assert!(
        out.contains("number of failed transactions: 0 "),
        "{what}:\n{out}"
    );
    let processed: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no count in pgbench's output:\n{out}"));
    let sums = sql(
        "SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts),
                (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches),
                (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
    );
    let v: Vec<i64> = sums.split('|').map(|x| x.parse().unwrap()).collect();
    assert_eq!(
        v[0] as u64, processed,
        "{what}: history rows = transactions pgbench counted ({sums})"
    );
    assert!(
        v[1] == v[2] && v[2] == v[3] && v[3] == v[4],
        "{what}: balances disagree: {sums}"
    );
    (processed, sums)
}
