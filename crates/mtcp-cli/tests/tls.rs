//! TLS as a cluster option (issue 14, decision 45): `mtcp cert` makes the CA and the servers'
//! certificates, a TLS cluster carries a curl download byte-exact through a drain, a manual move
//! and (as root) a reset session; an agent refuses servers whose certificate is not from the
//! cluster's CA; servers refuse to start with a foreign, expired or mismatched certificate; and
//! a mismatched cluster (one side TLS, the other not) fails at once and by name, never hangs.

mod common;

use common::*;
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn tls_cluster(dir: &TempDir, servers: usize) -> LocalCluster {
    tls_cluster_mode(dir, servers, "lazy")
}

fn tls_cluster_mode(dir: &TempDir, servers: usize, mode: &str) -> LocalCluster {
    let opts = LocalOptions {
        servers,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        mode: mode.into(),
        tls: true,
        ..Default::default()
    };
    LocalCluster::start(&exe(), dir.path(), &opts).expect("start a TLS cluster")
}

fn log_of(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// curl through an agent, expected to fail: how long it took.
fn failing_curl(listen: &str) -> Duration {
    let t0 = Instant::now();
    let st = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "/dev/null"])
        .arg(format!("http://{listen}/f.bin"))
        .stdin(std::process::Stdio::null())
        .status()
        .expect("run curl");
    assert!(!st.success(), "the download must fail");
    t0.elapsed()
}

#[test]
fn curl_download_through_a_tls_cluster_survives_drain_manual_and_reset() {
    assert!(
        mtcp_harness::local::have("curl"),
        "curl is required for this test (scripts/test.sh installs it)"
    );
    let dir = TempDir::new("tls-download");
    let size: u64 = 96 << 20;
    let want = file(&dir, "big.bin", size, 45);
    let lc = tls_cluster(&dir, 3);
    let text = std::fs::read_to_string(&lc.cluster_file).unwrap();
    assert!(text.contains("[tls]"), "mtcp cert added no [tls]: {text}");
    let out = dir.path().join("got.bin");
    let root = is_root();
    let (status, step) = download_with_moves(&lc, "big.bin", size, "30M", &out, root);
    assert!(status.success(), "curl failed: {status}");
    assert_eq!(step, 3, "the download finished before every move was made");
    assert_eq!(
        mtcp_harness::local::sha256_file(&out).unwrap(),
        want,
        "downloaded bytes differ from the file"
    );
    let reasons: Vec<String> = lc
        .status()
        .unwrap()
        .iter()
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .map(|e| e.reason.clone())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("drain")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "manual"), "{reasons:?}");
    // The moves fetched state over TLS peer channels: no server logged a failed handshake.
    for s in &lc.servers {
        let log = log_of(dir.path(), &s.id);
        assert!(!log.contains("TLS handshake failed"), "{}: {log}", s.id);
    }
}

/// Eager mode over TLS: replicas go to backups over TLS peer channels, the agent's watch
/// connection is TLS, and a `kill -9` of the serving server is survived byte-exact.
#[test]
fn an_eager_tls_cluster_survives_kill_9_of_the_serving_server() {
    assert!(mtcp_harness::local::have("curl"), "curl is required");
    let dir = TempDir::new("tls-eager");
    let size: u64 = 64 << 20;
    let want = file(&dir, "big.bin", size, 48);
    let mut lc = tls_cluster_mode(&dir, 3, "eager");
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "big.bin", "20M", &out);
    wait_for("download progress", Duration::from_secs(60), || {
        len(&out) > size / 3
    });
    let on = serving(&lc);
    lc.kill(&on).expect("kill -9 the serving server");
    assert!(
        wait_child(&mut curl, "curl", Duration::from_secs(60)),
        "curl failed after the kill"
    );
    assert_eq!(mtcp_harness::local::sha256_file(&out).unwrap(), want);
    let after = lc.status().unwrap();
    let moved: Vec<_> = after
        .iter()
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok && e.from == on)
        .collect();
    assert!(!moved.is_empty(), "the connection left {on}: {after:?}");
}

#[test]
fn agents_refuse_servers_outside_the_cluster_ca_and_servers_refuse_bad_certificates() {
    let dir = TempDir::new("tls-foreign");
    file(&dir, "f.bin", 1 << 20, 46);
    let lc = tls_cluster(&dir, 2);
    // Another cluster with its own CA: its server's certificate is well formed, but no
    // certificate of this cluster's CA.
    let other = TempDir::new("tls-foreign-other");
    file(&other, "f.bin", 1 << 20, 46);
    let mut rogue = tls_cluster(&other, 1);
    rogue.tls_ca = lc.tls_ca.clone();
    let (listen, _) = rogue
        .start_agent("trusting-ours", None, &[])
        .expect("agent starts");
    let took = failing_curl(&listen);
    assert!(took < Duration::from_secs(10), "refused after {took:?}");
    let log = log_of(other.path(), "trusting-ours");
    assert!(
        log.contains("not signed by this cluster's CA"),
        "the agent's log must say why: {log}"
    );

    // Servers check their own certificate at start: a foreign one, an expired one and a key
    // that is not the certificate's are refused with the file and the reason.
    let ours = lc.dir.join("tls");
    let theirs = other.path().join("tls");
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let with_files = |name: &str, crt: &std::path::Path, key: &std::path::Path| {
        std::fs::copy(crt, bad.join("s1.crt")).unwrap();
        std::fs::copy(key, bad.join("s1.key")).unwrap();
        let text = std::fs::read_to_string(&lc.cluster_file).unwrap();
        let text = text.replace(
            "cert = \"tls/{id}.crt\"\nkey = \"tls/{id}.key\"",
            &format!(
                "cert = \"{0}/{{id}}.crt\"\nkey = \"{0}/{{id}}.key\"",
                bad.display()
            ),
        );
        assert!(text.contains(&bad.display().to_string()), "{text}");
        let f = dir.path().join(format!("{name}.toml"));
        std::fs::write(&f, text).unwrap();
        let o = std::process::Command::new(exe())
            .args(["server", "--cluster"])
            .arg(&f)
            .args(["--id", "s1", "httpd", "--root"])
            .arg(dir.path().join("www"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{name}: the server must not start");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = with_files("foreign", &theirs.join("s1.crt"), &theirs.join("s1.key"));
    assert!(
        e.contains("not valid for server") && e.contains("UnknownIssuer"),
        "foreign: {e}"
    );
    let e = with_files("mismatched", &ours.join("s1.crt"), &ours.join("s2.key"));
    assert!(
        e.contains("is not the key of certificate"),
        "mismatched: {e}"
    );
    // `--days 0`: valid until now, expired by the time the server checks it.
    lc.mtcp(&[
        "cert",
        "--cluster",
        &lc.cluster_file.display().to_string(),
        "--out",
        &ours.display().to_string(),
        "--ids",
        "s1",
        "--days",
        "0",
    ])
    .expect("mtcp cert --days 0 with the cluster's CA");
    std::thread::sleep(Duration::from_millis(1100));
    let e = with_files("expired", &ours.join("s1.crt"), &ours.join("s1.key"));
    assert!(e.contains("expired"), "expired: {e}");
}

/// Writes our preamble and a HELLO to `addr` in plain M-TCP and returns what came back before
/// the server closed, and how long that took.
fn plain_hello(addr: &str) -> (Vec<u8>, Duration) {
    use mtcp::proto::wire::{preamble, Msg};
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = preamble(mtcp::proto::PROTOCOL_VERSION).to_vec();
    out.extend_from_slice(
        &Msg::Hello {
            caps: 0,
            orig_dst: None,
        }
        .to_frame(),
    );
    s.write_all(&out).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    (got, t0.elapsed())
}

#[test]
fn a_mismatched_cluster_fails_at_once_and_by_name() {
    assert!(mtcp_harness::local::have("curl"), "curl is required");
    let dir = TempDir::new("tls-mismatch");
    file(&dir, "f.bin", 1 << 20, 47);
    let mut lc = tls_cluster(&dir, 2);
    // Plain M-TCP on every TLS port: answered in plain M-TCP with a refusal naming TLS.
    for s in lc.servers.clone() {
        for (port, addr) in [("data", &s.data), ("peer", &s.peer), ("admin", &s.admin)] {
            let (got, took) = plain_hello(addr);
            let text = String::from_utf8_lossy(&got);
            assert!(
                got.starts_with(b"MTCP") && text.contains("requires TLS"),
                "{} {port}: {text:?}",
                s.id
            );
            assert!(took < Duration::from_secs(3), "{port}: took {took:?}");
        }
    }
    // Garbage that is neither TLS nor M-TCP: closed after a failed handshake, not held.
    let t0 = Instant::now();
    let mut g = std::net::TcpStream::connect(&lc.servers[0].data).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    g.write_all(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5, 9, 9, 9])
        .unwrap();
    let _ = g.read_to_end(&mut Vec::new());
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());

    // A plain agent for a TLS cluster: the refusal is in its log, curl fails at once.
    let ca = lc.tls_ca.take();
    let (listen, _) = lc.start_agent("plain", None, &[]).expect("agent starts");
    lc.tls_ca = ca;
    let took = failing_curl(&listen);
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    let log = log_of(dir.path(), "plain");
    assert!(log.contains("requires TLS"), "{log}");

    // A TLS agent for a plain cluster: its handshake fails on the server's plain preamble.
    let other = TempDir::new("tls-mismatch-plain");
    file(&other, "f.bin", 1 << 20, 47);
    let mut plain = cluster(&other, 1);
    plain.tls_ca = lc.tls_ca.clone();
    let (listen, _) = plain.start_agent("tls", None, &[]).expect("agent starts");
    let took = failing_curl(&listen);
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    let log = log_of(other.path(), "tls");
    assert!(log.contains("speaks plain M-TCP"), "{log}");
}

/// Connections that stall in their TLS handshake count against the session caps from their
/// accept (issue 14): with `--max-sessions-per-source 4`, four of them from 127.0.0.2 make a
/// fifth session from there, handshake done, refused `Busy` by name; once they are gone one is
/// served again. A download through the agent (from 127.0.0.1) is byte-exact meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_count_against_the_session_caps() {
    let dir = TempDir::new("tls-caps");
    let want = file(&dir, "f.bin", 4 << 20, 48);
    let lc = tokio::task::block_in_place(|| {
        let opts = LocalOptions {
            servers: 1,
            root: dir.path().join("www"),
            mode: "lazy".into(),
            tls: true,
            server_args: ["--max-sessions-per-source", "4"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        };
        LocalCluster::start(&exe(), dir.path(), &opts).expect("start a TLS cluster")
    });
    let tls = mtcp::tls::ClientTls::from_ca_file(lc.tls_ca.as_ref().unwrap()).unwrap();
    let data = lc.servers[0].data.clone();
    // A handshake's first byte, then nothing: the server waits in its handshake (≤ 5 s).
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(data.parse().unwrap()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &[0x16])
            .await
            .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    match hello_from(&data, "127.0.0.2", Some(&tls)).await.map(drop) {
        Err(mtcp::proto::stream::Refusal {
            code: mtcp::proto::wire::RefuseCode::Busy,
            reason,
        }) if reason.contains("from one address") => {}
        other => panic!("expected Busy (per source) with 4 stalled handshakes: {other:?}"),
    }
    // Another address is not affected, nor is the agent's client.
    hello_from(&data, "127.0.0.3", Some(&tls))
        .await
        .expect("a session from 127.0.0.3");
    let mut conns = vec![mtcp_harness::client::Client::connect(&lc.agent_listen)
        .await
        .unwrap()];
    get_all(&mut conns, &want).await;
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    hello_from(&data, "127.0.0.2", Some(&tls))
        .await
        .expect("served again once the stalled handshakes are gone");
}
