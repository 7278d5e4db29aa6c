//! Idle connections cost no heartbeats (issue 13): a server beats on a session only while its
//! agent waits for something (input not yet answered, or a stream that may go on), and the
//! agent applies its silence bound only then. Keep-alive connections sitting idle get no
//! frames, are never taken for a silent server, and still answer; a server that hangs while
//! they are idle is left when a client next sends (its request starts the silence clock).

mod common;

use common::*;
use mtcp_harness::client::Client;
use mtcp_harness::local::LocalCluster;
use std::time::{Duration, Instant};

const CONNS: usize = 20;

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// The agent's connections that carried a request (not the cluster's start-up probes).
fn served(lc: &LocalCluster) -> Vec<mtcp_agent::ConnStatus> {
    let status = tokio::task::block_in_place(|| lc.status()).unwrap();
    status.into_iter().filter(|c| c.bytes_down > 0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_get_no_heartbeats_and_a_hung_server_is_left_on_the_next_request() {
    let dir = TempDir::new("idle");
    let want = file(&dir, "f.bin", 64 << 10, 5);
    let (lc, m1) = tokio::task::block_in_place(|| cluster_with_metrics_on_s1(&dir, 2, "lazy"));
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(Client::connect(&lc.agent_listen).await.unwrap());
    }
    get_all(&mut conns, &want).await;

    // Past the agent's acknowledgement (at its next 1 s tick) and the servers' 2 s linger
    // after it, idle sessions get no heartbeat at all (before: one every 100 ms each, 20 × 10 a
    // second here).
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    let before =
        tokio::task::block_in_place(|| metric(&m1, "mtcp_heartbeats_total{on=\"session\"}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after =
        tokio::task::block_in_place(|| metric(&m1, "mtcp_heartbeats_total{on=\"session\"}"));
    assert_eq!(after - before, 0.0, "idle sessions got heartbeats");
    // Requests and answers still work; nothing was taken for a silent server.
    get_all(&mut conns, &want).await;
    let status = served(&lc);
    assert_eq!(status.len(), CONNS);
    assert!(
        status.iter().all(|c| c.migrations == 0 && c.server == "s1"),
        "{status:?}"
    );

    // s1 hangs while the connections sit idle: nothing moves (nobody waits for s1) ...
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let pid = lc.pid("s1").expect("s1's pid");
    signal(pid, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status = tokio::task::block_in_place(|| lc.status());
    let moved = status
        .as_ref()
        .map(|s| s.iter().filter(|c| c.migrations > 0).count())
        .unwrap_or(0);
    if moved > 0 {
        signal(pid, libc::SIGCONT);
    }
    assert_eq!(
        moved, 0,
        "idle connections moved off a server nobody waited for"
    );

    // ... until a client sends: its request starts the silence clock, the agent leaves s1
    // (lazy mode: the destination needs s1's state, so s1 runs again once the move started).
    let mut c = conns.pop().unwrap();
    let want2 = want.clone();
    let req = tokio::spawn(async move {
        let r = c.request("GET", "/f.bin", &[]).await.unwrap();
        assert_eq!((r.status, r.digest.as_str()), (200, want2.as_str()));
        c
    });
    let log = dir.path().join("agent.log");
    let sent = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("migrating: server silent") {
            break;
        }
        if sent.elapsed() > Duration::from_secs(10) {
            signal(pid, libc::SIGCONT);
            panic!("the agent never noticed the stopped server after a request");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = sent.elapsed();
    signal(pid, libc::SIGCONT);
    let mut c = tokio::time::timeout(Duration::from_secs(20), req)
        .await
        .expect("the request was not answered after the move")
        .unwrap();
    eprintln!("hung server left {noticed:?} after the request");
    assert!(
        noticed >= Duration::from_millis(500),
        "left after {noticed:?}, before the silence bound"
    );
    let status = served(&lc);
    let moved: Vec<_> = status.iter().filter(|c| c.migrations > 0).collect();
    assert_eq!(moved.len(), 1, "{status:?}");
    assert_eq!(moved[0].server, "s2");
    assert!(
        moved[0].timeline[0].cause == Some(mtcp_agent::MoveCause::Silence),
        "{:?}",
        moved[0].timeline
    );
    // The moved connection and the others all still answer.
    let r = c.request("GET", "/f.bin", &[]).await.unwrap();
    assert_eq!((r.status, r.digest.as_str()), (200, want.as_str()));
    get_all(&mut conns, &want).await;
}

/// A session that starts — a new connection's, or one moved in — beats only once someone
/// waits for it (decision 57): before, every session beat every 100 ms for its first two
/// seconds, which in a drain of 9 000 idle connections was ~20 frames per move each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_start_or_move_in_get_no_heartbeats_until_someone_waits() {
    let dir = TempDir::new("idle-start");
    let want = file(&dir, "f.bin", 64 << 10, 5);
    let (lc, m1) = tokio::task::block_in_place(|| cluster_with_metrics_on_s1(&dir, 2, "lazy"));
    let beats =
        || tokio::task::block_in_place(|| metric(&m1, "mtcp_heartbeats_total{on=\"session\"}"));

    // New connections on s1 that have sent nothing.
    let before = beats();
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(Client::connect(&lc.agent_listen).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        beats() - before,
        0.0,
        "new sessions beat before anyone waited"
    );
    get_all(&mut conns, &want).await;

    // Moved away and back once idle: s1's new sessions for them beat no more than new ones.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let moved = lc.migrate(None, Some("s2")).await.expect("move to s2");
    assert!(moved.len() >= CONNS, "{moved:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = beats();
    let back = lc.migrate(None, Some("s1")).await.expect("move back to s1");
    assert!(back.iter().all(|(_, s)| s == "s1"), "{back:?}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        beats() - before,
        0.0,
        "sessions moved in beat before anyone waited"
    );
    // They still answer, from s1.
    get_all(&mut conns, &want).await;
    let status = served(&lc);
    assert_eq!(status.len(), CONNS);
    assert!(
        status.iter().all(|c| c.migrations == 2 && c.server == "s1"),
        "{status:?}"
    );
}
