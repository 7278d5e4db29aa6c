//! The kernel fast path (`mtcp agent --fast-path`): the agent hands curl's TCP connection to
//! the server with TCP_REPAIR, and the connection itself moves between servers — a drain, a
//! manual migration, and a reset of the agent's control session while the origin lives — with
//! every byte intact (SHA-256). Needs root (TCP_REPAIR, nftables); without it the test says so
//! loudly and checks nothing.

mod common;

use common::*;
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::process::Command;
use std::time::{Duration, Instant};

/// `handoff`: servers take connections from each other as sockets (the default on one host,
/// decision 56); otherwise every move freezes the socket with `TCP_REPAIR` and recreates it.
fn fast_cluster(dir: &TempDir, handoff: bool) -> LocalCluster {
    let opts = LocalOptions {
        servers: 3,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        agent_args: vec!["--fast-path".into()],
        server_args: if handoff {
            vec![]
        } else {
            vec!["--no-local-handoff".into()]
        },
        ..Default::default()
    };
    LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
}

/// The fence table of the agent with `pid`, listed (`None`: no such table).
fn fence_table(pid: u32) -> Option<String> {
    let table = format!("{}{pid}", mtcp_repair::TABLE_PREFIX);
    let out = Command::new("nft")
        .args(["-nn", "list", "table", "inet", &table])
        .output()
        .expect("nft");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ready() -> bool {
    if !is_root() {
        eprintln!("!!! NOT ROOT: the kernel fast path needs TCP_REPAIR and nftables; fast-path tests are NOT run !!!");
        return false;
    }
    assert!(
        mtcp_harness::local::have("curl") && mtcp_harness::local::have("nft"),
        "curl and nft are required for this test (scripts/test.sh installs them)"
    );
    true
}

#[test]
fn fast_path_download_survives_drain_manual_and_session_reset() {
    download_survives_moves(true);
}

/// The same moves with `TCP_REPAIR` (the path across hosts): socket state frozen, fenced,
/// recreated.
#[test]
fn fast_path_download_survives_moves_with_tcp_repair() {
    download_survives_moves(false);
}

/// Moves logged by the servers of `dir`: (sockets handed over, sockets frozen and recreated).
fn moves_by_kind(dir: &std::path::Path) -> (usize, usize) {
    let (mut handed, mut frozen) = (0, 0);
    for id in ["s1", "s2", "s3"] {
        let log = std::fs::read_to_string(dir.join(format!("{id}.log"))).unwrap_or_default();
        handed += log
            .matches("fast-path connection handed over (its socket")
            .count();
        frozen += log
            .matches("fast-path connection frozen and handed over")
            .count();
    }
    (handed, frozen)
}

fn download_survives_moves(handoff: bool) {
    if !ready() {
        return;
    }
    let dir = TempDir::new(if handoff {
        "fastpath-handoff"
    } else {
        "fastpath-repair"
    });
    let size: u64 = 128 << 20;
    let want = file(&dir, "big.bin", size, 43);
    let lc = fast_cluster(&dir, handoff);
    let agent_pid = lc.pid("agent").expect("agent");
    let server_pids: Vec<u32> = ["s1", "s2", "s3"]
        .iter()
        .map(|s| lc.pid(s).expect("server"))
        .collect();
    let out = dir.path().join("got.bin");
    // The reset breaks the agent's control session while the server (and the client's
    // connection on it) lives: the agent moves the connection.
    let (status, step) = download_with_moves(&lc, "big.bin", size, "40M", &out, true);
    assert!(status.success(), "curl failed: {status}");
    assert_eq!(
        step, 3,
        "the download finished before every migration was triggered"
    );
    let got = mtcp_harness::local::sha256_file(&out).unwrap();
    assert_eq!(got, want, "downloaded bytes differ from the file");
    let conns = lc.status().unwrap();
    assert!(conns.iter().all(|c| c.fast_path), "{conns:?}");
    let reasons: Vec<&str> = conns
        .iter()
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .map(|e| e.reason.as_str())
        .collect();
    assert!(reasons.contains(&"hint (drain)"), "{reasons:?}");
    assert!(reasons.contains(&"manual"), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("session with")),
        "{reasons:?}"
    );
    let (handed, frozen) = moves_by_kind(dir.path());
    if handoff {
        assert!(
            handed >= 3 && frozen == 0,
            "handed {handed}, frozen {frozen}"
        );
    } else {
        assert!(
            frozen >= 3 && handed == 0,
            "handed {handed}, frozen {frozen}"
        );
    }
    // Every fence is down (no table has a fenced flow: the agent's fenced the hand-overs, the
    // origins' the moves), and the tables go with their processes.
    let table = fence_table(agent_pid);
    if handoff {
        // The agent handed the connection over as a socket too: it never needed a fence.
        assert_eq!(table, None, "the agent made a fence table");
        let logs = std::fs::read_to_string(dir.path().join("s1.log")).unwrap_or_default()
            + &std::fs::read_to_string(dir.path().join("s2.log")).unwrap_or_default()
            + &std::fs::read_to_string(dir.path().join("s3.log")).unwrap_or_default();
        assert!(
            logs.contains("the agent handed the client's socket over"),
            "no server took the new connection as a socket"
        );
    } else {
        let table = table.expect("the agent's fence table");
        assert!(!table.contains("elements"), "fences left up: {table}");
    }
    let origins: Vec<u32> = server_pids
        .iter()
        .copied()
        .filter(|p| fence_table(*p).is_some())
        .collect();
    if handoff {
        // No move needed a fence: no server made its table (decision 56).
        assert!(
            origins.is_empty(),
            "servers with a fence table: {origins:?}"
        );
    } else {
        assert!(!origins.is_empty(), "no origin fenced a move");
    }
    for p in &origins {
        let t = fence_table(*p).unwrap();
        assert!(!t.contains("elements"), "an origin's fences left up: {t}");
    }
    drop(lc);
    for p in std::iter::once(agent_pid).chain(origins) {
        assert_eq!(fence_table(p), None, "fence table of {p} left behind");
    }
}

/// The fast path does not survive a crash (the kernel closes the client's connection with the
/// server process): a `kill -9` of the serving server must end curl with an error at once, not
/// hang it, and the agent must say why it gave the connection up.
#[test]
fn fast_path_connection_ends_with_an_error_when_its_server_is_killed() {
    if !ready() {
        return;
    }
    let dir = TempDir::new("fastpath-kill");
    let size: u64 = 64 << 20;
    file(&dir, "big.bin", size, 44);
    let mut lc = fast_cluster(&dir, true);
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "big.bin", "20M", &out);
    wait_for("the download to start", Duration::from_secs(20), || {
        len(&out) > 1 << 20
    });
    let s = serving(&lc);
    lc.kill(&s).unwrap();
    let t0 = Instant::now();
    let ok = wait_child(&mut curl, "curl", Duration::from_secs(20));
    assert!(!ok, "curl reported success for a cut transfer");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "curl took {:?} to see the end",
        t0.elapsed()
    );
    assert!(len(&out) < size);
    wait_for("the agent to give up", Duration::from_secs(10), || {
        lc.status().unwrap().iter().any(|c| c.aborted().is_some())
    });
}

/// A fast-path connection lives in its server process, so a hung server is not a reason to
/// move it (decision 69: no heartbeats on a fast-path session, no silence trigger): a server
/// stopped with `SIGSTOP` for several times the relay's silence bound keeps the connection,
/// and after `SIGCONT` the download completes with every byte intact, no move attempted.
#[test]
fn fast_path_connection_waits_out_a_stopped_server() {
    if !ready() {
        return;
    }
    let dir = TempDir::new("fastpath-stop");
    let size: u64 = 48 << 20;
    let want = file(&dir, "big.bin", size, 45);
    let mut lc = fast_cluster(&dir, true);
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "big.bin", "16M", &out);
    wait_for("the download to start", Duration::from_secs(20), || {
        len(&out) > 4 << 20
    });
    let s = serving(&lc);
    lc.sigstop(&s).unwrap();
    // The relay's silence bound at the default heartbeat is 3 × 100 ms + 2 × 200 ms.
    std::thread::sleep(Duration::from_millis(2_000));
    let during = lc.status().unwrap();
    lc.sigcont(&s).unwrap();
    assert!(
        wait_child(&mut curl, "curl", Duration::from_secs(60)),
        "curl failed after the server went on"
    );
    assert_eq!(
        mtcp_harness::local::sha256_file(&out).unwrap(),
        want,
        "downloaded bytes differ from the file"
    );
    for conns in [during, lc.status().unwrap()] {
        assert!(
            conns
                .iter()
                .all(|c| c.aborted().is_none() && c.timeline.is_empty()),
            "the agent acted on a stopped fast-path server: {conns:?}"
        );
    }
    let agent_log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(
        !agent_log.contains("migrating (fast path)"),
        "the agent tried to move the connection:\n{agent_log}"
    );
}
