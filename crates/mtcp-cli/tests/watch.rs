//! Eager mode's watch connection is one per agent and server, not one per connection (issue
//! 13): twenty keep-alive connections on s1 share one, so each costs the agent two descriptors
//! and s1 one. Its end after `kill -9` still moves every connection at once, and a drain's hint
//! still overtakes the data a slow reader has queued, because it comes on the watch connection.
//! And a server that stops right after an idle connection moved to it, before it answered the
//! new watch connection, is still taken for hung.

mod common;

use common::*;
use mtcp_harness::client::Client;
use std::time::{Duration, Instant};

const CONNS: usize = 20;

/// Established TCP connections process `pid` holds to `addr` (`ss`, iproute2).
fn conns_to(pid: u32, addr: &str) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "established", "dst", addr])
        .output()
        .expect("run ss (iproute2)");
    assert!(out.status.success(), "ss failed: {out:?}");
    let me = format!("pid={pid},");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&me))
        .count()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_share_one_watch_per_server_which_still_catches_a_kill() {
    let dir = TempDir::new("watch-pair");
    let want = file(&dir, "f.bin", 64 << 10, 3);
    let (lc, m1) = tokio::task::block_in_place(|| cluster_with_metrics_on_s1(&dir, 3, "eager"));
    let agent = lc.pid("agent").expect("the agent's pid");
    let s1 = lc.pid("s1").expect("s1's pid");
    let (agent_before, s1_before) = (open_fds(agent), open_fds(s1));
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(Client::connect(&lc.agent_listen).await.unwrap());
    }
    get_all(&mut conns, &want).await;
    // The watch connection is opened beside the first session, not before its answer: wait
    // (bounded) until s1 has seen it.
    let t0 = Instant::now();
    loop {
        let counts = tokio::task::block_in_place(|| {
            (
                metric(&m1, "mtcp_sessions{state=\"watch\"}"),
                metric(&m1, "mtcp_sessions{state=\"connection\"}"),
            )
        });
        if counts == (1.0, CONNS as f64) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "s1's (watch, connection) sessions: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Per connection: the client's socket and the session at the agent, the session at s1
    // (before: a watch connection more on each side). A few more for spares and the watch.
    // s1's pushes to its backups use pooled peer channels: as many as pushes ran at once, at
    // most the pool's bound per peer (decision 59) — a constant per server pair, counted apart.
    let (agent_fds, s1_fds) = (open_fds(agent) - agent_before, open_fds(s1) - s1_before);
    let pooled: usize = lc
        .servers
        .iter()
        .filter(|s| s.id != "s1")
        .map(|s| conns_to(s1, &s.peer))
        .sum();
    eprintln!(
        "descriptors for {CONNS} connections: agent +{agent_fds}, s1 +{s1_fds} ({pooled} pooled peer channels)"
    );
    assert!(agent_fds <= 2 * CONNS + 6, "agent +{agent_fds}");
    assert!(
        s1_fds - pooled.min(s1_fds) <= CONNS + 6,
        "s1 +{s1_fds}, {pooled} of them peer channels"
    );
    assert!(pooled <= 2 * 32, "{pooled} peer channels");

    // kill -9 of s1: every connection moves, and answers correctly.
    let killed = Instant::now();
    // SAFETY: kill(2) on a child process this test started.
    assert_eq!(unsafe { libc::kill(s1 as i32, libc::SIGKILL) }, 0);
    loop {
        let status = tokio::task::block_in_place(|| lc.status()).unwrap();
        let moved = status
            .iter()
            .filter(|c| c.bytes_down > 0 && c.server != "s1" && c.migrations == 1)
            .count();
        if moved == CONNS {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "{moved} of {CONNS} moved off the killed server: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("all moved {:?} after the kill", killed.elapsed());
    get_all(&mut conns, &want).await;
}

#[test]
fn a_drain_hint_overtakes_a_slow_readers_queued_data_on_the_watch() {
    let dir = TempDir::new("watch-hint");
    let size: u64 = 64 << 20;
    let want = file(&dir, "f.bin", size, 4);
    let lc = eager_cluster(&dir, 3, None, &[]);
    let out = dir.path().join("got.bin");
    // 1 MiB/s: what s1 has queued for this reader (its queue, both sockets' buffers) would
    // take seconds to get through; the watch connection carries nothing ahead of the hint.
    let mut curl = spawn_curl(&lc, "f.bin", "1M", &out);
    wait_for("the download to start", Duration::from_secs(20), || {
        len(&out) >= 2 << 20
    });
    let origin = serving(&lc);
    let t0 = Instant::now();
    let mut drain = std::process::Command::new(exe())
        .args(["drain", "--cluster"])
        .arg(&lc.cluster_file)
        .args(["--id", &origin])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start mtcp drain");
    let moved = loop {
        let status = lc.status().unwrap();
        if let Some(ev) = status
            .iter()
            .flat_map(|c| c.timeline.iter())
            .find(|e| e.ok && e.from == origin)
        {
            break ev.clone();
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = drain.kill();
            panic!("not moved off the draining server: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t0.elapsed();
    eprintln!("moved off the draining server {took:?} after the drain: {moved:?}");
    assert!(drain.wait().unwrap().success(), "mtcp drain failed");
    assert!(moved.reason.contains("drain"), "{moved:?}");
    assert!(
        took < Duration::from_secs(2),
        "the hint waited behind queued data: moved {took:?} after the drain"
    );
    // The rest would take a minute: what arrived until now (a second more, some of it from
    // the new server) must be the file's start, byte for byte.
    std::thread::sleep(Duration::from_secs(1));
    let _ = curl.kill();
    let _ = curl.wait();
    let got = std::fs::read(&out).unwrap();
    let file = std::fs::read(dir.path().join("www/f.bin")).unwrap();
    assert!(got.len() > 2 << 20, "{} bytes", got.len());
    assert_eq!(sha256(&got), sha256(&file[..got.len()]), "bytes differ");
    assert_eq!(sha256(&file), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_leaves_a_server_that_stopped_right_after_it_moved_there() {
    let dir = TempDir::new("watch-stop");
    let want = file(&dir, "f.bin", 256 << 10, 5);
    let lc = tokio::task::block_in_place(|| eager_cluster(&dir, 3, None, &[]));
    let mut conns = vec![Client::connect(&lc.agent_listen).await.unwrap()];
    get_all(&mut conns, &want).await;
    let origin = tokio::task::block_in_place(|| serving(&lc));
    let to = if origin == "s2" { "s3" } else { "s2" };
    let pid = lc.pid(to).expect("the destination's pid");
    tokio::task::block_in_place(|| {
        lc.mtcp(&["migrate", "--agent", &lc.agent_admin, "--all", "--to", to])
    })
    .unwrap();
    // At once: the agent's watch connection to it is not answered yet, and the session is
    // idle, so it expects nothing from it (decision 46).
    // SAFETY: kill(2) on a child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let left = loop {
        let status = tokio::task::block_in_place(|| lc.status()).unwrap();
        let c = &status[0];
        if c.migrations == 2 && c.server != to {
            break c.server.clone();
        }
        if stopped.elapsed() > Duration::from_secs(10) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            panic!("still on the stopped {to} after 10 s: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "left the stopped {to} for {left} {:?} after the stop",
        stopped.elapsed()
    );
    get_all(&mut conns, &want).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}
