//! Trigger policies end to end on loopback, with real `curl` and real processes:
//! * overload: servers with `--max-connections 2` and four downloads: two are hinted away from
//!   the server they all opened on, and every body is intact;
//! * throughput floor: a server whose session sockets are paced to 8 Mbit/s (a slow link, test
//!   hook `--throttle-mbit`) while the agent wants 40 Mbit/s: the connection moves to a fast
//!   server; and connections that are slow for other reasons — a slow client program, an
//!   application that sends little, an idle keep-alive connection — are never moved;
//! * RTT: with equal RTTs (loopback) and probes running, nothing moves; with one server's probe
//!   answers delayed (test hook `--probe-delay-ms`), the connection moves to the nearest server.

mod common;

use common::*;
use mtcp_harness::local::{sha256_file, LocalCluster, LocalOptions};
use std::time::{Duration, Instant};

fn start(
    dir: &TempDir,
    servers: usize,
    server_args: &[&str],
    server_args_for: &[(&str, &[&str])],
    agent_args: &[&str],
) -> LocalCluster {
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let opts = LocalOptions {
        servers,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        server_args: strings(server_args),
        server_args_for: server_args_for
            .iter()
            .map(|(id, a)| (id.to_string(), strings(a)))
            .collect(),
        agent_args: strings(agent_args),
        ..Default::default()
    };
    LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
}

/// Every migration the agent made (of live and finished connections): (from, to, reason).
fn moves(lc: &LocalCluster) -> Vec<(String, Option<String>, String)> {
    lc.status()
        .expect("agent status")
        .iter()
        .flat_map(|c| c.timeline.iter())
        .map(|e| {
            assert!(e.ok, "a migration failed: {e:?}");
            (e.from.clone(), e.to.clone(), e.reason.clone())
        })
        .collect()
}

fn wait_curl(c: &mut std::process::Child, limit: Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().expect("wait curl") {
            assert!(st.success(), "curl failed: {st}");
            return;
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            panic!("curl did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn overload_hints_the_newest_connections_away() {
    let dir = TempDir::new("policy-overload");
    let size: u64 = 12 << 20;
    let want: Vec<String> = (0..4)
        .map(|i| file(&dir, &format!("f{i}.bin"), size, 100 + i))
        .collect();
    let lc = start(&dir, 3, &["--max-connections", "2"], &[], &[]);
    // Four downloads of ~3 s each; all open on s1 (first in the agent's list).
    let mut curls = Vec::new();
    for (i, want) in want.iter().enumerate() {
        let out = dir.path().join(format!("got{i}.bin"));
        curls.push((spawn_curl(&lc, &format!("f{i}.bin"), "4M", &out), out, want));
        std::thread::sleep(Duration::from_millis(150));
    }
    for (c, out, want) in &mut curls {
        wait_curl(c, Duration::from_secs(60));
        assert_eq!(
            &sha256_file(out).unwrap(),
            *want,
            "{} differs",
            out.display()
        );
    }
    let m = moves(&lc);
    // Two too many on s1: the two newest are hinted to the first alternate, which is then
    // exactly at its limit; nothing moves twice.
    let overload: Vec<_> = m
        .iter()
        .filter(|(_, _, r)| r == "hint (overload)")
        .collect();
    assert_eq!(overload.len(), 2, "{m:?}");
    assert!(
        overload
            .iter()
            .all(|(f, t, _)| f == "s1" && t.as_deref() == Some("s2")),
        "{m:?}"
    );
    assert_eq!(m.len(), 2, "{m:?}");
    let log = std::fs::read_to_string(dir.path().join("s1.log")).unwrap();
    assert_eq!(log.matches("overloaded: hinting").count(), 2);
}

#[test]
fn a_slow_server_is_left_by_the_throughput_floor() {
    let dir = TempDir::new("policy-floor");
    let size: u64 = 32 << 20;
    let want = file(&dir, "f.bin", size, 7);
    // s1's session sockets are paced to 8 Mbit/s (1 MB/s): its output queues up behind them.
    let lc = start(
        &dir,
        2,
        &[],
        &[("s1", &["--throttle-mbit", "8"])],
        &["--floor-mbit", "40", "--floor-window-ms", "1000"],
    );
    let out = dir.path().join("got.bin");
    let t0 = Instant::now();
    let mut curl = spawn_curl(&lc, "f.bin", "1G", &out);
    wait_curl(&mut curl, Duration::from_secs(60));
    let took = t0.elapsed();
    assert_eq!(sha256_file(&out).unwrap(), want);
    let m = moves(&lc);
    assert_eq!(m.len(), 1, "{m:?}");
    let (from, to, reason) = &m[0];
    assert_eq!((from.as_str(), to.as_deref()), ("s1", Some("s2")), "{m:?}");
    assert!(reason.starts_with("policy: throughput floor"), "{reason}");
    // 32 MiB at 1 MB/s would take 33 s; the move comes after about a second of evidence.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    eprintln!("moved: {reason}; download took {took:?}");
}

#[test]
fn the_floor_leaves_slow_clients_and_quiet_applications_alone() {
    let dir = TempDir::new("policy-floor-quiet");
    let big: u64 = 20 << 20;
    let want_big = file(&dir, "big.bin", big, 8);
    let want_small = file(&dir, "small.bin", 64 << 10, 9);
    let lc = start(
        &dir,
        2,
        &[],
        &[],
        &["--floor-mbit", "40", "--floor-window-ms", "1000"],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A client program reading steadily at 3 MB/s: once the socket buffers on the way are
        // full, the server has data waiting (its queue is full behind the agent, which waits on
        // the client) and the rate is under the floor — but it is the agent that waits, on its
        // client, and that time does not count.
        let slow = async {
            let mut c = mtcp_harness::client::Client::connect(&lc.agent_listen)
                .await
                .unwrap();
            c.rate = Some(3_000_000);
            let r = c.request("GET", "/big.bin", &[]).await.unwrap();
            assert_eq!((r.status, r.digest.as_str()), (200, want_big.as_str()));
            r.elapsed
        };
        // An application that sends little (64 KiB every 250 ms, 2 Mbit/s), then an idle
        // keep-alive connection, then one more request.
        let quiet = async {
            let mut c = mtcp_harness::client::Client::connect(&lc.agent_listen)
                .await
                .unwrap();
            for _ in 0..16 {
                let r = c.request("GET", "/small.bin", &[]).await.unwrap();
                assert_eq!((r.status, r.digest.as_str()), (200, want_small.as_str()));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let r = c.request("GET", "/small.bin", &[]).await.unwrap();
            assert_eq!((r.status, r.digest.as_str()), (200, want_small.as_str()));
        };
        let (took, ()) = tokio::join!(slow, quiet);
        eprintln!("slow client took {took:?}");
    });
    assert_eq!(moves(&lc), vec![]);
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(!log.contains("policy:"), "{log}");
}

#[test]
fn equal_rtts_never_move_a_connection() {
    let dir = TempDir::new("policy-rtt-equal");
    let size: u64 = 12 << 20;
    let want = file(&dir, "f.bin", size, 10);
    let lc = start(
        &dir,
        3,
        &[],
        &[],
        &[
            "--rtt-margin-ms",
            "10",
            "--rtt-hold-ms",
            "2000",
            "--probe-every-ms",
            "1000",
        ],
    );
    let out = dir.path().join("got.bin");
    // ~6 s at 2 MB/s: six rounds of probes to each of three servers.
    let mut curl = spawn_curl(&lc, "f.bin", "2M", &out);
    let t0 = Instant::now();
    let mut probed = false;
    while !probed && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
        probed = lc
            .status()
            .unwrap()
            .iter()
            .any(|c| c.is_live() && c.rtt_ms.len() == 3);
    }
    assert!(probed, "no RTT of every server after 5 s");
    wait_curl(&mut curl, Duration::from_secs(60));
    assert_eq!(sha256_file(&out).unwrap(), want);
    let st = lc.status().unwrap();
    assert_eq!(moves(&lc), vec![], "{st:?}");
    for c in st.iter().filter(|c| !c.rtt_ms.is_empty()) {
        eprintln!("rtt (ms): {:?}", c.rtt_ms);
    }
}

#[test]
fn the_rtt_policy_moves_to_the_nearest_server() {
    let dir = TempDir::new("policy-rtt");
    let size: u64 = 16 << 20;
    let want = file(&dir, "f.bin", size, 12);
    // Probe answers from s1 come 40 ms late and from s3 20 ms late: s2 is the nearest.
    let lc = start(
        &dir,
        3,
        &[],
        &[
            ("s1", &["--probe-delay-ms", "40"]),
            ("s3", &["--probe-delay-ms", "20"]),
        ],
        &["--rtt-margin-ms", "5", "--rtt-hold-ms", "1000"],
    );
    let out = dir.path().join("got.bin");
    let t0 = Instant::now();
    let mut curl = spawn_curl(&lc, "f.bin", "4M", &out);
    wait_curl(&mut curl, Duration::from_secs(60));
    assert_eq!(sha256_file(&out).unwrap(), want);
    let m = moves(&lc);
    assert_eq!(m.len(), 1, "{m:?}");
    let (from, to, reason) = &m[0];
    assert_eq!((from.as_str(), to.as_deref()), ("s1", Some("s2")), "{m:?}");
    assert!(reason.starts_with("policy: rtt (s2 better by "), "{reason}");
    eprintln!("moved: {reason}; download took {:?}", t0.elapsed());
}
