//! How a connection ends when it cannot go on, and that a healthy idle one is left alone.

mod common;

use common::*;
use mtcp_harness::client::Client;
use std::time::{Duration, Instant};

/// Every server of the cluster is killed mid-download: the client program's connection ends
/// with an error (a reset, not a clean end that could pass for a complete response) within a
/// bounded time, and the agent logs why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_server_is_gone_the_client_sees_an_error_soon() {
    let dir = TempDir::new("endings-gone");
    file(&dir, "f.bin", 64 << 20, 8);
    // Eager mode: backups, replicas and watch connections do not keep a dead cluster alive.
    let lc = tokio::task::block_in_place(|| eager_cluster(&dir, 2, None, &[]));
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    c.rate = Some(8 << 20);
    let progress = c.progress.clone();
    let dl = tokio::spawn(async move { c.request("GET", "/f.bin", &[]).await });
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 1 << 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for s in &lc.servers {
        // SAFETY: kill(2) on child processes this test started.
        assert_eq!(
            unsafe { libc::kill(lc.pid(&s.id).unwrap() as i32, libc::SIGKILL) },
            0
        );
    }
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(20), dl)
        .await
        .expect("the client was left hanging")
        .unwrap();
    let err = r.expect_err("the download cannot complete with every server gone");
    // Bytes the agent already held may still drain first; the end itself must come soon after.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert!(
        err.to_string().contains("closed") || err.to_string().contains("reset"),
        "{err}"
    );
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        log.contains("closing the client connection: migration failed"),
        "agent did not say why"
    );
}

/// An idle keep-alive connection (no requests for 30 s) is never migrated by the silence
/// triggers: heartbeats keep it alive. Then it serves a request correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_not_migrated() {
    let dir = TempDir::new("endings-idle");
    let want = file(&dir, "f.bin", 1 << 20, 9);
    // Eager mode: the watch connection's heartbeats and the replication of an idle connection
    // must not move it either.
    let lc = tokio::task::block_in_place(|| eager_cluster(&dir, 2, None, &[]));
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    assert_eq!(c.request("GET", "/f.bin", &[]).await.unwrap().digest, want);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let st = lc.status_async().await.unwrap();
    let live = st.iter().find(|c| c.is_live()).expect("still open");
    assert_eq!(
        live.migrations, 0,
        "an idle, healthy connection moved: {:?}",
        live.timeline
    );
    assert_eq!(c.request("GET", "/f.bin", &[]).await.unwrap().digest, want);
}
