//! Unmodified `curl` and `wget` in the lab's client namespace download through the transparent
//! agent (no proxy setting: they connect to the service address) while the serving server is
//! killed, stopped, blackholed, and starved of bandwidth — one scenario each, hashes equal. A
//! lab with a 40 ms client RTT moves a live download and reports the migration latency. The lab
//! leaves no namespace or process behind. Needs root (network namespaces, nftables, tc).

mod common;

use common::*;
use mtcp_harness::labcluster::{LabCluster, LabClusterOptions};
use mtcp_lab::Impairment;
use std::process::Stdio;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
enum Scenario {
    Kill,
    Stop,
    Blackhole,
    Starve,
}

#[test]
fn curl_and_wget_survive_kill_stop_blackhole_and_starvation_through_the_transparent_agent() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let tag = "lf";
    let dir = TempDir::new("lab-faults");
    let size: u64 = 24 << 20;
    let want = file(&dir, "f.bin", size, 31);
    let opts = LabClusterOptions {
        tag: tag.into(),
        servers: 3,
        mode: "eager".into(),
        root: dir.path().join("www"),
        // 100 Mbit/s server links are the bottleneck, so the data waits at the server (not in
        // the client host's buffers) when a fault strikes.
        servers_link: Impairment {
            rate_mbit: Some(100.0),
            ..Default::default()
        },
        // A connection whose server delivers under 10 Mbit/s for 2 s while it has data waiting
        // is moved (the starvation scenario).
        agent_args: ["--floor-mbit", "10", "--floor-window-ms", "2000"]
            .map(String::from)
            .to_vec(),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        ..Default::default()
    };
    let lc = LabCluster::start(&exe(), dir.path(), &opts).expect("lab cluster");
    let url = format!("http://{}/f.bin", lc.service);
    for (k, sc) in [
        Scenario::Kill,
        Scenario::Stop,
        Scenario::Blackhole,
        Scenario::Starve,
    ]
    .into_iter()
    .enumerate()
    {
        let before: Vec<String> = lc.status().unwrap().into_iter().map(|c| c.cid).collect();
        let rate = "1G";
        let (out_c, out_w) = (
            dir.path().join(format!("curl-{k}.bin")),
            dir.path().join(format!("wget-{k}.bin")),
        );
        let mut curl = lc
            .client_command("curl")
            .args(["-sS", "--fail", "--limit-rate", rate, "-o"])
            .arg(&out_c)
            .arg(&url)
            .stdin(Stdio::null())
            .spawn()
            .expect("curl");
        let mut wget = lc
            .client_command("wget")
            .args(["-q", "--tries=1", "--limit-rate", rate, "-O"])
            .arg(&out_w)
            .arg(&url)
            .stdin(Stdio::null())
            .spawn()
            .expect("wget");
        // Both under way, and the faster (flows share a link unfairly) still far from done.
        let at = size / 8;
        wait_for("both downloads under way", Duration::from_secs(30), || {
            len(&out_c).min(len(&out_w)) > 0 && len(&out_c).max(len(&out_w)) > at
        });
        let s = lc.serving().unwrap().expect("a live connection");
        match sc {
            Scenario::Kill => lc.kill_server(&s).unwrap(),
            Scenario::Stop => lc.stop_server(&s).unwrap(),
            Scenario::Blackhole => lc
                .impair_server(
                    &s,
                    Impairment {
                        blackhole: true,
                        ..Default::default()
                    },
                )
                .unwrap(),
            Scenario::Starve => lc
                .impair_server(
                    &s,
                    Impairment {
                        rate_mbit: Some(1.0),
                        ..Default::default()
                    },
                )
                .unwrap(),
        }
        let ok_c = wait_child(&mut curl, "curl", Duration::from_secs(90));
        let ok_w = wait_child(&mut wget, "wget", Duration::from_secs(90));
        assert!(ok_c && ok_w, "{sc:?}: curl ok {ok_c}, wget ok {ok_w}");
        assert_eq!(
            mtcp_harness::local::sha256_file(&out_c).unwrap(),
            want,
            "{sc:?}: curl's bytes"
        );
        assert_eq!(
            mtcp_harness::local::sha256_file(&out_w).unwrap(),
            want,
            "{sc:?}: wget's bytes"
        );
        let moved: Vec<String> = lc
            .status()
            .unwrap()
            .into_iter()
            .filter(|c| !before.contains(&c.cid))
            .flat_map(|c| c.timeline.into_iter())
            .filter(|e| e.ok && e.from == s)
            .map(|e| e.reason)
            .collect();
        assert_eq!(
            moved.len(),
            2,
            "{sc:?}: both connections left {s}: {moved:?}"
        );
        eprintln!("{sc:?} of {s}: moved because {moved:?}");
        if let Scenario::Starve = sc {
            // A link cut from 100 to 1 Mbit/s under load drops packets of every connection
            // through it, heartbeats too: the floor policy or the silence of the watch
            // connection moves the connection, whichever fires first (the floor policy alone
            // is tested in lab_policies.rs, on a link that was slow from the start).
            assert!(
                moved
                    .iter()
                    .all(|r| r.contains("floor") || r.contains("silent")),
                "a starved server is left for its starvation: {moved:?}"
            );
        }
        // Heal before the next scenario.
        match sc {
            Scenario::Kill => lc.start_server(&s).unwrap(),
            Scenario::Stop => lc.cont_server(&s).unwrap(),
            Scenario::Blackhole | Scenario::Starve => lc
                .impair_server(
                    &s,
                    Impairment {
                        rate_mbit: Some(100.0),
                        ..Default::default()
                    },
                )
                .unwrap(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(lc);
    assert_lab_gone(tag);
}

/// Every client↔server path has a 40 ms RTT (a delay line on the client's link): a live
/// download moves by hand and after a kill -9, intact, and the latencies are reported.
#[test]
fn a_40_ms_rtt_lab_moves_a_live_download() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let tag = "lr";
    let dir = TempDir::new("lab-rtt");
    let size: u64 = 16 << 20;
    let want = file(&dir, "f.bin", size, 32);
    let opts = LabClusterOptions {
        tag: tag.into(),
        servers: 3,
        mode: "eager".into(),
        root: dir.path().join("www"),
        client_link: Impairment {
            delay_ms: 40,
            ..Default::default()
        },
        // The servers' links are the bottleneck: the data waits at the server, not in the
        // client host's buffers, so the kill below always has a transfer to interrupt.
        servers_link: Impairment {
            rate_mbit: Some(30.0),
            ..Default::default()
        },
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        ..Default::default()
    };
    let lc = LabCluster::start(&exe(), dir.path(), &opts).expect("lab cluster");
    let out = dir.path().join("got.bin");
    let mut curl = lc
        .client_command("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(&out)
        .arg(format!("http://{}/f.bin", lc.service))
        .stdin(Stdio::null())
        .spawn()
        .expect("curl");
    wait_for("download under way", Duration::from_secs(30), || {
        len(&out) > size / 4
    });
    lc.migrate_all().expect("manual migration");
    wait_for("more of the download", Duration::from_secs(30), || {
        len(&out) > size / 2
    });
    let s = lc.serving().unwrap().expect("live");
    lc.kill_server(&s).unwrap();
    assert!(
        wait_child(&mut curl, "curl", Duration::from_secs(60)),
        "curl failed"
    );
    assert_eq!(mtcp_harness::local::sha256_file(&out).unwrap(), want);
    let events: Vec<_> = lc
        .status()
        .unwrap()
        .into_iter()
        .flat_map(|c| c.timeline.into_iter())
        .filter(|e| e.ok)
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        eprintln!(
            "40 ms RTT: {} -> {} ({}): RESUMED after {:.1} ms, first byte after {:.1} ms",
            e.from,
            e.to.as_deref().unwrap_or("?"),
            e.reason,
            e.resumed_us.unwrap_or(0) as f64 / 1e3,
            e.first_byte_us.unwrap_or(0) as f64 / 1e3
        );
        // A move needs at least one client round trip.
        assert!(e.first_byte_us.unwrap_or(0) >= 40_000, "{e:?}");
    }
    drop(lc);
    assert_lab_gone(tag);
}

/// `mtcp demo --lab` (the lab variant of the README's demo) exits 0.
#[test]
fn the_lab_demo_passes() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let out = std::process::Command::new(exe())
        .args(["demo", "--lab", "--size-mib", "32", "--rate-mib", "12"])
        .output()
        .expect("run mtcp demo --lab");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OK: every byte matched"), "{text}");
    assert_lab_gone("demo");
}
