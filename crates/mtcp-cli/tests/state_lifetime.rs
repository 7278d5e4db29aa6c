//! A server never keeps a connection's state forever: it is dropped on an orderly close, and
//! after a bounded time when the agent vanished without one.

mod common;

use common::*;
use mtcp::proto::wire::Msg;
use mtcp_harness::client::Client;
use std::time::{Duration, Instant};

async fn connections(lc: &mtcp_harness::local::LocalCluster, key: &mtcp::proto::ClusterKey) -> u32 {
    let mut n = 0;
    for s in &lc.servers {
        // Attached or not: state the server still keeps.
        let st = mtcp::peer::admin_request(&s.admin, key, &s.id, Msg::AdminStatus)
            .await
            .unwrap();
        n += st.connections + st.detached;
    }
    n
}

async fn wait_for(
    lc: &mtcp_harness::local::LocalCluster,
    key: &mtcp::proto::ClusterKey,
    want: u32,
    limit: Duration,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let n = connections(lc, key).await;
        if n == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "servers still hold {n} connection(s) after {limit:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_dropped_on_close_and_after_the_agent_vanishes() {
    let dir = TempDir::new("lifetime");
    let want = file(&dir, "f.bin", 16 << 20, 3);
    let lc =
        tokio::task::block_in_place(|| cluster_args(&dir, 2, None, &["--dead-session-secs", "2"]));
    let key = mtcp::Cluster::load(&lc.cluster_file).unwrap().key;

    // Orderly: a keep-alive connection with two requests and a migration, then the client closes.
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    let r = c.request("GET", "/f.bin", &[]).await.unwrap();
    assert_eq!(r.digest, want);
    assert_eq!(connections(&lc, &key).await, 1);
    lc.mtcp(&["migrate", "--agent", &lc.agent_admin, "--all"])
        .unwrap();
    let r = c.request("GET", "/f.bin", &[]).await.unwrap();
    assert_eq!(r.digest, want);
    assert_eq!(
        connections(&lc, &key).await,
        1,
        "the origin forgot it, the destination holds it"
    );
    drop(c);
    wait_for(&lc, &key, 0, Duration::from_secs(5)).await;

    // The agent dies mid-download (no M-TCP close ever comes): the state goes after the bound.
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    c.rate = Some(1 << 20);
    let dl = tokio::spawn(async move { c.request("GET", "/f.bin", &[]).await });
    wait_for(&lc, &key, 1, Duration::from_secs(5)).await;
    let agent = lc.pid("agent").expect("agent pid") as i32;
    // SAFETY: kill(2) on a child process this test started.
    assert_eq!(unsafe { libc::kill(agent, libc::SIGKILL) }, 0);
    let t_kill = Instant::now();
    // The client may still read what its socket buffer holds; it is not needed any more.
    dl.abort();
    // Held for about the bound (2 s; the janitor looks every second), not forever.
    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(t_kill.elapsed())).await;
    assert_eq!(
        connections(&lc, &key).await,
        1,
        "state must survive a short absence of the agent"
    );
    wait_for(&lc, &key, 0, Duration::from_secs(6)).await;
    let held = t_kill.elapsed();
    assert!(
        held >= Duration::from_secs(2),
        "dropped after {held:?}, before the 2 s bound"
    );
}
