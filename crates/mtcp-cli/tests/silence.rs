//! The silence trigger: the serving server stops (SIGSTOP) mid-download, so nothing arrives and
//! no reset ever comes. The agent notices within its RTT-derived bound and moves the connection;
//! in lazy mode the destination must wait for the origin's state, which it gets once the origin
//! runs again (SIGCONT). The download completes intact, and the stopped server, once resumed,
//! never serves the connection again.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn a_stopped_server_is_detected_by_silence_and_the_connection_moves() {
    let dir = TempDir::new("silence");
    // Larger than everything the server can have written ahead of the client by the stop (its
    // socket, the agent's, curl's): with 48 MiB a CI run found the whole body already out of
    // the server when it stopped, so the connection was idle, not silent, and nothing moved.
    let size: u64 = 128 << 20;
    let want = file(&dir, "f.bin", size, 11);
    let lc = cluster(&dir, 2);
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "f.bin", "16M", &out);
    let t0 = Instant::now();
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) < size / 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "download did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let origin = serving(&lc);
    let pid = lc.pid(&origin).unwrap();
    signal(pid, libc::SIGSTOP);
    let stopped = Instant::now();
    // The agent first delivers what it already holds, then finds the server silent (bound:
    // 300 ms by default) and starts moving the connection; it says so in its log.
    let log = dir.path().join("agent.log");
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("migrating: server silent") {
            break;
        }
        if stopped.elapsed() > Duration::from_secs(15) {
            signal(pid, libc::SIGCONT);
            panic!("the agent never noticed the stopped server");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // In lazy mode the destination needs the stopped origin's state: let it run again.
    std::thread::sleep(Duration::from_millis(200));
    signal(pid, libc::SIGCONT);
    let status = curl.wait().unwrap();
    assert!(status.success(), "curl failed: {status}");
    assert_eq!(
        mtcp_harness::local::sha256_file(&out).unwrap(),
        want,
        "downloaded bytes differ"
    );
    let conns = lc.status().unwrap();
    let ev: Vec<_> = conns
        .iter()
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .collect();
    assert!(
        ev.iter()
            .any(|e| e.cause == Some(mtcp_agent::MoveCause::Silence)
                && e.reason.starts_with("server silent")
                && e.from == origin),
        "{ev:?}"
    );
    // The resumed origin holds nothing for the connection any more.
    let key = mtcp::Cluster::load(&lc.cluster_file).unwrap().key;
    let admin = &lc.servers.iter().find(|s| s.id == origin).unwrap().admin;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let st = rt
        .block_on(mtcp::peer::admin_request(
            admin,
            &key,
            &origin,
            mtcp::proto::wire::Msg::AdminStatus,
        ))
        .unwrap();
    assert_eq!((st.connections, st.detached), (0, 0), "{st:?}");
    assert!(st.migrated_out >= 1);
}
