//! The Prometheus endpoint (`--metrics ADDR`) of servers and an agent, scraped with curl: the
//! counts follow manual moves, a refused move, a forged MIGRATE and a drain exactly; garbage,
//! oversized and silent requests on the metrics port are answered or closed and leave the
//! cluster serving; a connection being moved shows as `leaving`, not `detached`.

mod common;

use common::*;
use mtcp::proto::wire::{Migrate, Msg, RefuseCode};
use mtcp::proto::{Cid, Token};
use mtcp_harness::client::Client;
use mtcp_harness::local::{free_port, LocalCluster, LocalOptions};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A scrape: each series (name and labels, sorted) and its value.
struct Scrape {
    text: String,
    series: HashMap<String, f64>,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let mut series = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("series and value");
            let value: f64 = value.parse().expect("a number");
            series.insert(normalize(key), value);
        }
        Scrape { text, series }
    }

    /// The value of `name{labels}`; panics (showing the scrape) when the series is absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        l.sort();
        let key = if l.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}}}", l.join(","))
        };
        *self
            .series
            .get(&key)
            .unwrap_or_else(|| panic!("no series {key} in:\n{}", self.text))
    }
}

/// `name{b="1",a="2"}` → `name{a="2",b="1"}` (label values here hold no commas).
fn normalize(key: &str) -> String {
    match key.split_once('{') {
        None => key.to_string(),
        Some((name, rest)) => {
            let mut l: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            l.sort();
            format!("{name}{{{}}}", l.join(","))
        }
    }
}

/// `curl http://addr/path`: the HTTP status and body.
async fn curl(addr: &str, path: &str, method: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{addr}{path}"))
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_string())
}

async fn scrape(addr: &str) -> Scrape {
    let (code, body) = curl(addr, "/metrics", "GET").await;
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body)
}

/// Scrapes `addr` until `ok` holds (counts are published a moment after the move they count
/// is answered), at most 10 s; returns the last scrape.
async fn scrape_until(addr: &str, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let t0 = Instant::now();
    loop {
        let s = scrape(addr).await;
        if ok(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: not seen in 10 s; last scrape of {addr}:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `bytes` to `addr` and reads until the endpoint closes (at most 10 s).
async fn poke(addr: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        r.is_ok(),
        "the metrics endpoint kept a garbage connection open"
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// One GET of the served file on `c`, checked.
async fn get(c: &mut Client, want: &str) {
    let r = c.request("GET", "/f.bin", &[]).await.unwrap();
    assert_eq!((r.status, r.digest.as_str()), (200, want));
}

fn mtcp(lc: &LocalCluster, args: &[&str]) -> String {
    tokio::task::block_in_place(|| lc.mtcp(args)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Three servers (`mode`) and an agent, each with `--metrics` on a port of its own; the
/// cluster and the metrics addresses of s1, s2, s3 and the agent.
async fn start(dir: &TempDir, mode: &str) -> (LocalCluster, [String; 4]) {
    let m: [String; 4] = std::array::from_fn(|_| format!("127.0.0.1:{}", free_port()));
    let lc = tokio::task::block_in_place(|| {
        let opts = LocalOptions {
            servers: 3,
            root: dir.path().join("www"),
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            mode: mode.into(),
            server_args_for: (0..3)
                .map(|i| {
                    (
                        format!("s{}", i + 1),
                        vec!["--metrics".into(), m[i].clone()],
                    )
                })
                .collect(),
            agent_args: vec!["--metrics".into(), m[3].clone()],
            ..Default::default()
        };
        LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
    });
    for a in &m {
        mtcp_harness::local::wait_listening_async(a, Duration::from_secs(10))
            .await
            .unwrap();
    }
    (lc, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_moves_refusals_and_a_drain_and_survive_garbage() {
    let dir = TempDir::new("metrics");
    let size = 1u64 << 20;
    let want = file(&dir, "f.bin", size, 7);
    let (lc, [m1, m2, m3, ma]) = start(&dir, "lazy").await;
    let admin = lc.agent_admin.clone();

    // Before anything: every move and refusal series is shown, at zero.
    let a = scrape(&ma).await;
    assert_eq!(
        a.get(
            "mtcp_moves_total",
            &[("reason", "manual"), ("outcome", "ok")]
        ),
        0.0
    );
    assert_eq!(a.get("mtcp_refusals_total", &[("code", "draining")]), 0.0);
    assert_eq!(a.get("mtcp_connections", &[("state", "live")]), 0.0);
    assert!(
        a.text.contains("# TYPE mtcp_moves_total counter"),
        "{}",
        a.text
    );
    // Decision 71's counters are shown before their first event too (the hedges' value is not
    // asserted: on loopback a handshake is answered within the hedge, but a loaded machine may
    // still start one).
    assert_eq!(a.get("mtcp_move_rounds_total", &[]), 0.0);
    assert!(
        a.text.contains("# TYPE mtcp_connect_hedges_total counter"),
        "{}",
        a.text
    );

    // One keep-alive connection: opened on s1 (first of --connect), then moved by hand to s2.
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    get(&mut c, &want).await;
    assert_eq!(
        scrape(&m1)
            .await
            .get("mtcp_connections", &[("state", "live")]),
        1.0
    );
    let out = mtcp(&lc, &["migrate", "--agent", &admin, "--all"]);
    assert!(out.contains("-> s2"), "{out}");
    get(&mut c, &want).await;

    // A move to a draining server: refused (Draining), and the agent's next candidate, s1,
    // takes it.
    mtcp(
        &lc,
        &[
            "drain",
            "--cluster",
            &lc.cluster_file.display().to_string(),
            "--id",
            "s3",
        ],
    );
    let out = mtcp(&lc, &["migrate", "--agent", &admin, "--all", "--to", "s3"]);
    assert!(out.contains("-> s1"), "{out}");
    get(&mut c, &want).await;

    // A forged MIGRATE on s2's data port: refused BadToken.
    let s2 = lc
        .servers
        .iter()
        .find(|s| s.id == "s2")
        .unwrap()
        .data
        .clone();
    let mut s = TcpStream::connect(&s2).await.unwrap();
    mtcp::framed::exchange_preamble(&mut s).await.unwrap();
    let (r, mut w) = s.into_split();
    let forged = Migrate {
        cid: Cid(rand::random()),
        epoch: 0,
        token: Token(rand::random()),
        origin: "s1".into(),
        down_recv: 0,
        sum_from: 0,
        down_sum: mtcp::proto::sum::checksum(&[]),
        up_sent: 0,
        up_base: 0,
        segs: vec![],
        holding: Default::default(),
    };
    mtcp::framed::write_msg(&mut w, &Msg::Migrate(forged))
        .await
        .unwrap();
    let mut r = mtcp::framed::FrameReader::new(r, 1 << 20);
    match r.next_msg(Duration::from_secs(10)).await.unwrap() {
        Msg::Refused { code, .. } => assert_eq!(code, RefuseCode::BadToken),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A drain of s1, which holds the connection: hinted away to s2.
    mtcp(
        &lc,
        &[
            "drain",
            "--cluster",
            &lc.cluster_file.display().to_string(),
            "--id",
            "s1",
        ],
    );
    get(&mut c, &want).await;

    let moves = |s: &Scrape, reason, outcome| {
        s.get(
            "mtcp_moves_total",
            &[("reason", reason), ("outcome", outcome)],
        )
    };
    let a = scrape_until(&ma, "the drain's move", |s| moves(s, "drain", "ok") == 1.0).await;
    assert_eq!(moves(&a, "manual", "ok"), 2.0);
    for reason in ["manual", "drain", "session_broke", "silence"] {
        assert_eq!(moves(&a, reason, "failed"), 0.0, "{reason}");
    }
    assert_eq!(a.get("mtcp_move_seconds_count", &[]), 3.0);
    assert!(
        a.text.contains("# TYPE mtcp_move_seconds histogram"),
        "{}",
        a.text
    );
    assert_eq!(a.get("mtcp_refusals_total", &[("code", "draining")]), 1.0);
    assert_eq!(a.get("mtcp_connections", &[("state", "live")]), 1.0);
    assert_eq!(a.get("mtcp_connections", &[("state", "moving")]), 0.0);
    assert!(a.get("mtcp_bytes_total", &[("direction", "down")]) >= 4.0 * size as f64);
    assert!(a.get("mtcp_bytes_total", &[("direction", "up")]) > 0.0);

    // s1: opened the connection, took it over once, handed it over twice, hinted it away once.
    let s = scrape(&m1).await;
    assert!(
        s.text.contains("# TYPE mtcp_connect_hedges_total counter"),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("mtcp_takeovers_total", &[("outcome", "from_origin")]),
        1.0
    );
    assert_eq!(s.get("mtcp_handovers_total", &[]), 2.0);
    // The drain repeats its hints while it waits (a hint can be lost with a broken session).
    assert!(s.get("mtcp_hints_total", &[("reason", "drain")]) >= 1.0);
    assert_eq!(s.get("mtcp_connections", &[("state", "live")]), 0.0);
    assert_eq!(s.get("mtcp_retention_bytes", &[]), 0.0);
    assert!(s.get("mtcp_bytes_total", &[("direction", "down")]) >= size as f64);
    // s2: took it over twice, handed it over once, refused the forgery; holds it now.
    // (Its old session of the move away may take a moment to end.)
    let s = scrape_until(&m2, "one session on s2", |s| {
        s.get("mtcp_sessions", &[("state", "connection")]) == 1.0
    })
    .await;
    assert_eq!(
        s.get("mtcp_takeovers_total", &[("outcome", "from_origin")]),
        2.0
    );
    assert_eq!(s.get("mtcp_takeover_seconds_count", &[]), 2.0);
    assert_eq!(
        s.get("mtcp_takeovers_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(s.get("mtcp_refusals_total", &[("code", "bad_token")]), 1.0);
    assert_eq!(s.get("mtcp_handovers_total", &[]), 1.0);
    assert_eq!(s.get("mtcp_connections", &[("state", "live")]), 1.0);
    // At least the snapshot of the restart point the connection moved with.
    assert!(s.get("mtcp_retention_bytes", &[]) > 0.0);
    assert_eq!(s.get("mtcp_replicas_held", &[]), 0.0);
    // s3: refused the move while draining, held nothing.
    let s = scrape(&m3).await;
    assert_eq!(s.get("mtcp_refusals_total", &[("code", "draining")]), 1.0);
    assert_eq!(
        s.get("mtcp_takeovers_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(s.get("mtcp_handovers_total", &[]), 0.0);

    // Only GET /metrics is served.
    assert_eq!(curl(&m2, "/", "GET").await.0, 404);
    assert_eq!(curl(&m2, "/metrics", "POST").await.0, 405);
    // Garbage is answered 400, an endless head 431, and both connections are closed.
    let r = poke(&m2, b"\x16\x03\x01\x00\xff\xfe\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r:?}");
    let r = poke(&m2, &[b'A'; 64 << 10]).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r:?}");
    // A silent client does not hold up a scrape, and is closed after the read timeout.
    // (Timed from before the connect: the endpoint's read timeout starts at its accept.)
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(&m2).await.unwrap();
    scrape(&m2).await;
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut b))
        .await
        .expect("a silent client is closed within 10 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "closed before its timeout"
    );
    // And the cluster serves as before: the connection, its server and its counts.
    get(&mut c, &want).await;
    let s = scrape(&m2).await;
    assert_eq!(s.get("mtcp_connections", &[("state", "live")]), 1.0);
    tokio::task::block_in_place(|| {
        let mut lc = lc;
        lc.check_alive().expect("every process still runs");
    });
}

/// Eager mode: the serving server's backup shows the replica it holds; after a `kill -9` of
/// the serving server the agent counts a `session_broke` move and the backup a takeover from
/// its replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_replicas_and_a_takeover_from_one_after_a_kill() {
    let dir = TempDir::new("metrics-eager");
    let want = file(&dir, "f.bin", 256 << 10, 8);
    let (mut lc, [_, m2, m3, ma]) = start(&dir, "eager").await;
    // Opened on s1, whose backup is s2.
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    get(&mut c, &want).await;
    let s = scrape_until(&m2, "s1's replica on s2", |s| {
        s.get("mtcp_replicas_held", &[]) == 1.0
    })
    .await;
    assert!(s.get("mtcp_replica_bytes", &[]) > 0.0);
    assert_eq!(scrape(&m3).await.get("mtcp_replicas_held", &[]), 0.0);

    tokio::task::block_in_place(|| lc.kill("s1")).unwrap();
    let a = scrape_until(&ma, "the move after the kill", |s| {
        s.get(
            "mtcp_moves_total",
            &[("reason", "session_broke"), ("outcome", "ok")],
        ) == 1.0
    })
    .await;
    assert_eq!(a.get("mtcp_move_seconds_count", &[]), 1.0);
    assert_eq!(a.get("mtcp_connections", &[("state", "live")]), 1.0);
    let s = scrape(&m2).await;
    assert_eq!(
        s.get("mtcp_takeovers_total", &[("outcome", "from_replica")]),
        1.0
    );
    assert_eq!(s.get("mtcp_connections", &[("state", "live")]), 1.0);
    get(&mut c, &want).await;
    // s2 now protects the connection on its own backup, s3.
    scrape_until(&m3, "s2's replica on s3", |s| {
        s.get("mtcp_replicas_held", &[]) == 1.0
    })
    .await;
}

/// `mtcp_connections{state="leaving"}` counts a connection whose agent closed its session to
/// move it (LEAVING), apart from `detached` (an agent that may be gone): while the destination
/// is stopped, the origin holds the connection as leaving; once the move ends, as live again or
/// not at all — and the connection answers byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_being_moved_is_leaving_not_detached() {
    let dir = TempDir::new("metrics-leaving");
    let want = file(&dir, "f.bin", 64 << 10, 8);
    let (lc, m1) = tokio::task::block_in_place(|| cluster_with_metrics_on_s1(&dir, 2, "lazy"));
    let mut conns = vec![Client::connect(&lc.agent_listen).await.unwrap()];
    get_all(&mut conns, &want).await;
    let leaving = "mtcp_connections{state=\"leaving\"}";
    let detached = "mtcp_connections{state=\"detached\"}";
    let live = "mtcp_connections{state=\"live\"}";
    assert_eq!(tokio::task::block_in_place(|| metric(&m1, live)), 1.0);
    let s2 = lc.pid("s2").expect("s2's pid");
    // SAFETY: kill(2) on a child process this test started.
    assert_eq!(unsafe { libc::kill(s2 as i32, libc::SIGSTOP) }, 0);
    let mut mv = std::process::Command::new(exe())
        .args(["migrate", "--agent", &lc.agent_admin, "--all", "--to", "s2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start mtcp migrate");
    let t0 = Instant::now();
    let seen = loop {
        let (l, d) = tokio::task::block_in_place(|| (metric(&m1, leaving), metric(&m1, detached)));
        if l == 1.0 {
            break d;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            // SAFETY: as above.
            unsafe { libc::kill(s2 as i32, libc::SIGCONT) };
            let _ = mv.kill();
            panic!("s1 never showed the connection as leaving (detached: {d})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(seen, 0.0, "a leaving connection also counted as detached");
    // SAFETY: as above.
    unsafe { libc::kill(s2 as i32, libc::SIGCONT) };
    tokio::task::block_in_place(|| wait_child(&mut mv, "mtcp migrate", Duration::from_secs(20)));
    get_all(&mut conns, &want).await;
    let t1 = Instant::now();
    while tokio::task::block_in_place(|| metric(&m1, leaving)) != 0.0 {
        assert!(t1.elapsed() < Duration::from_secs(5), "still leaving on s1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
