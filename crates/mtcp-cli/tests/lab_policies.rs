//! The trigger policies in the lab, with real links: a server on a slow link is left by the
//! throughput-floor policy, a distant server (40 ms more RTT) by the RTT policy, and an
//! overloaded server hints connections away. Unmodified curl through the transparent agent;
//! every hash checked. Needs root.

mod common;

use common::*;
use mtcp_harness::labcluster::{LabCluster, LabClusterOptions};
use mtcp_lab::Impairment;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

fn curl(lc: &LabCluster, out: &Path, rate: &str) -> Child {
    lc.client_command("curl")
        .args(["-sS", "--fail", "--limit-rate", rate, "-o"])
        .arg(out)
        .arg(format!("http://{}/f.bin", lc.service))
        .stdin(Stdio::null())
        .spawn()
        .expect("curl")
}

fn moves(lc: &LabCluster) -> Vec<(String, String, String)> {
    lc.status()
        .unwrap()
        .into_iter()
        .flat_map(|c| c.timeline.into_iter())
        .filter(|e| e.ok)
        .map(|e| (e.from, e.to.unwrap_or_default(), e.reason))
        .collect()
}

#[test]
fn a_server_on_a_slow_link_is_left_by_the_floor_policy() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let dir = TempDir::new("lab-floor");
    let size: u64 = 16 << 20;
    let want = file(&dir, "f.bin", size, 51);
    let lc = LabCluster::start(
        &exe(),
        dir.path(),
        &LabClusterOptions {
            tag: "lpf".into(),
            servers: 2,
            root: dir.path().join("www"),
            servers_link: Impairment {
                rate_mbit: Some(100.0),
                ..Default::default()
            },
            agent_args: ["--floor-mbit", "20", "--floor-window-ms", "1000"]
                .map(String::from)
                .to_vec(),
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            ..Default::default()
        },
    )
    .expect("lab cluster");
    // s1 (where new connections go) sits behind a 5 Mbit/s link from the start.
    lc.impair_server(
        "s1",
        Impairment {
            rate_mbit: Some(5.0),
            ..Default::default()
        },
    )
    .unwrap();
    let out = dir.path().join("got.bin");
    assert!(wait_child(
        &mut curl(&lc, &out, "1G"),
        "curl",
        Duration::from_secs(60)
    ));
    assert_eq!(mtcp_harness::local::sha256_file(&out).unwrap(), want);
    let m = moves(&lc);
    assert!(
        m.iter()
            .any(|(f, t, r)| f == "s1" && t == "s2" && r.contains("throughput floor")),
        "{m:?}"
    );
}

#[test]
fn a_distant_server_is_left_by_the_rtt_policy() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let dir = TempDir::new("lab-rtt-policy");
    let size: u64 = 16 << 20;
    let want = file(&dir, "f.bin", size, 52);
    let lc = LabCluster::start(
        &exe(),
        dir.path(),
        &LabClusterOptions {
            tag: "lpr".into(),
            servers: 2,
            root: dir.path().join("www"),
            // 20 Mbit/s links: the download lasts ~7 s, longer than the policy's hold time.
            servers_link: Impairment {
                rate_mbit: Some(20.0),
                ..Default::default()
            },
            agent_args: ["--rtt-margin-ms", "10", "--rtt-hold-ms", "2000"]
                .map(String::from)
                .to_vec(),
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            ..Default::default()
        },
    )
    .expect("lab cluster");
    // s1 is 40 ms further away than s2.
    lc.impair_server(
        "s1",
        Impairment {
            delay_ms: 40,
            rate_mbit: Some(20.0),
            ..Default::default()
        },
    )
    .unwrap();
    let out = dir.path().join("got.bin");
    assert!(wait_child(
        &mut curl(&lc, &out, "1G"),
        "curl",
        Duration::from_secs(60)
    ));
    assert_eq!(mtcp_harness::local::sha256_file(&out).unwrap(), want);
    let m = moves(&lc);
    assert_eq!(m.len(), 1, "exactly one move, no flapping: {m:?}");
    assert!(
        m[0].0 == "s1" && m[0].1 == "s2" && m[0].2.contains("rtt"),
        "{m:?}"
    );
}

#[test]
fn an_overloaded_server_hints_connections_away() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let dir = TempDir::new("lab-overload");
    let size: u64 = 8 << 20;
    let want = file(&dir, "f.bin", size, 53);
    let lc = LabCluster::start(
        &exe(),
        dir.path(),
        &LabClusterOptions {
            tag: "lpo".into(),
            servers: 3,
            root: dir.path().join("www"),
            // 20 Mbit/s links: the transfers stay at the servers for seconds (not in the
            // client host's buffers), long enough for the paced hints.
            servers_link: Impairment {
                rate_mbit: Some(20.0),
                ..Default::default()
            },
            server_args: vec!["--max-connections".into(), "1".into()],
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            ..Default::default()
        },
    )
    .expect("lab cluster");
    let outs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("got{i}.bin")))
        .collect();
    let clients: Vec<Child> = outs.iter().map(|o| curl(&lc, o, "1G")).collect();
    for mut c in clients {
        assert!(wait_child(&mut c, "curl", Duration::from_secs(60)));
    }
    for o in &outs {
        assert_eq!(mtcp_harness::local::sha256_file(o).unwrap(), want);
    }
    let m = moves(&lc);
    let hinted = m.iter().filter(|(_, _, r)| r.contains("overload")).count();
    assert!(hinted >= 2, "two of three connections hinted off s1: {m:?}");
}
