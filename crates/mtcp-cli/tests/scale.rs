//! Issue 13: 2 000 concurrent keep-alive connections through one agent (`mtcp bench scale`),
//! in lazy and in eager mode: each does a GET whose body's SHA-256 is checked, idle memory and
//! descriptors per connection stay within the targets, a drain of the server holding them moves
//! every one (and its summary says so), and every connection then answers one more GET with
//! the right body.

mod common;

use clap::Parser;
use common::TempDir;
use mtcp_bench::bench::BenchArgs;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    bench: BenchArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_open_idle_small_drain_exactly_and_answer_again() {
    two_thousand("lazy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_eager_connections_share_watches_and_drain_exactly() {
    two_thousand("eager").await;
}

async fn two_thousand(mode: &str) {
    let dir = TempDir::new(&format!("scale-{mode}"));
    let exe = common::exe();
    let a = Args::parse_from([
        "bench",
        "scale",
        "--conns",
        "2000",
        "--mode",
        mode,
        "--exe",
        exe.to_str().expect("utf-8 path"),
    ])
    .bench;
    // Dropping the future on a timeout drops the cluster, which kills its processes.
    let rep = tokio::time::timeout(
        Duration::from_secs(240),
        mtcp_bench::scalebench::measure(&a, dir.path()),
    )
    .await
    .expect("bench scale within 240 s")
    .expect("bench scale");
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert_eq!(rep.conns, 2000);
    assert!(
        rep.all_ok_after_drain,
        "{} connection(s) failed after the drain: {:?}",
        rep.failed_after_drain, rep.first_failure
    );
    // The drain moved every connection, and its summary counts exactly that.
    let held: u32 = rep.held.iter().map(|h| h.1).sum();
    assert_eq!(held, 2000, "connections on the servers before the drain");
    let moved: u64 = rep.drains.iter().map(|d| d.moved).sum();
    let kept: u32 = rep.drains.iter().map(|d| d.kept_for_dead_agent).sum();
    let ended: u64 = rep.drains.iter().map(|d| d.ended).sum();
    let moving: u32 = rep.drains.iter().map(|d| d.still_moving).sum();
    if mode == "lazy" {
        assert_eq!(
            (moved, ended, kept, moving),
            (2000, 0, 0, 0),
            "drain summary"
        );
    } else {
        // Eager mode: a destination that got no answer from the (busy) origin within
        // origin_wait_ms takes the connection from a replica; the origin's copy is then
        // reported as still moving, never as kept for a dead agent.
        assert_eq!(
            (moved + u64::from(moving), ended, kept),
            (2000, 0, 0),
            "drain summary"
        );
    }
    // Idle memory per connection (issue 13 targets: agent 32 KiB, server 16 KiB; measured
    // 11-22 and 14-15.5 KiB). A server is given some slack for a noisy machine.
    let agent = rep.procs.iter().find(|p| p.name == "agent").unwrap();
    assert!(
        agent.kib_per_conn <= 32.0,
        "agent {:.1} KiB per idle connection",
        agent.kib_per_conn
    );
    for p in rep
        .procs
        .iter()
        .filter(|p| p.name != "agent" && p.conns > 0)
    {
        assert!(
            p.kib_per_conn <= 20.0,
            "{} {:.1} KiB per idle connection",
            p.name,
            p.kib_per_conn
        );
    }
    // Descriptors: two per connection in the agent, one in the server holding them (eager
    // mode too: one watch connection per agent and server, not per connection).
    assert!(agent.fds <= 2 * 2000 + 64, "agent holds {} fds", agent.fds);
    for p in rep
        .procs
        .iter()
        .filter(|p| p.name != "agent" && p.conns > 0)
    {
        assert!(
            p.fds <= p.conns as usize + 64,
            "{} holds {} fds for {} connections",
            p.name,
            p.fds,
            p.conns
        );
    }
}
