//! Issue 15: in eager mode a connection survives its server dying soon after a move, on a lab
//! whose server links have a 20 ms RTT and 2 % loss each way. Three eager servers (one backup
//! each), a forward agent in the client host, `curl --limit-rate` downloading through it, moves
//! by hand every 1.5 s, then the serving server is `kill -9`ed or blackholed 0–500 ms after the
//! second of two moves (the kind of fault and the delay drawn from the seed), healed, and again
//! while the download lasts (two to four faults per download). Every download's SHA-256 must
//! equal the file's. Seeds: `MTCP_FAULT_SEEDS=1,2,3` (the default), one download each. The lab
//! leaves no namespace or process behind. Needs root (network namespaces, nftables).

mod common;

use common::*;
use mtcp_cli::labcluster::{LabCluster, LabClusterOptions};
use mtcp_lab::Impairment;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A small deterministic generator (xorshift64*), so a seed names a run.
fn draw(seed: u64, n: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Blackhole,
}

#[test]
fn eager_downloads_survive_their_server_dying_0_to_500_ms_after_a_move_at_20_ms_rtt_and_2_pct_loss()
{
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let seeds: Vec<u64> = match std::env::var("MTCP_FAULT_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("MTCP_FAULT_SEEDS: numbers"))
            .collect(),
        Err(_) => vec![1, 2, 3],
    };
    let tag = "em";
    let dir = TempDir::new("lab-eager-moves");
    // The agent↔curl loopback connection buffers up to ~10 MiB ahead of curl: the file is large
    // enough that the server still has data to send at every fault.
    let size: u64 = 40 << 20;
    let want = file(&dir, "f.bin", size, 41);
    let link = Impairment {
        delay_ms: 20,
        loss_pct: 2.0,
        ..Default::default()
    };
    let opts = LabClusterOptions {
        tag: tag.into(),
        servers: 3,
        mode: "eager".into(),
        root: dir.path().join("www"),
        servers_link: link,
        forward: true,
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        ..Default::default()
    };
    let lc = LabCluster::start(&exe(), dir.path(), &opts).expect("lab cluster");
    let url = format!("http://{}/f.bin", lc.service);
    let t_all = Instant::now();
    let mut faults = 0;
    for (k, &seed) in seeds.iter().enumerate() {
        let before: Vec<String> = lc.status().unwrap().into_iter().map(|c| c.cid).collect();
        let ours = || {
            lc.status()
                .unwrap()
                .into_iter()
                .find(|c| !before.contains(&c.cid))
        };
        let out = dir.path().join(format!("got-{k}.bin"));
        let mut curl = lc
            .client_command("curl")
            .args(["-sS", "--fail", "--limit-rate", "2500K", "-o"])
            .arg(&out)
            .arg(&url)
            .stdin(Stdio::null())
            .spawn()
            .expect("curl");
        wait_for("download under way", Duration::from_secs(30), || {
            len(&out) > 256 << 10
        });
        // Cycles of: two moves 1.5 s apart, then a fault of the serving server 0–500 ms after
        // the second one, until the download nears its end.
        let mut cycle = 0u64;
        let mut here = 0;
        while len(&out) + (16 << 20) < size && cycle < 4 {
            let c = seed * 10 + cycle;
            cycle += 1;
            let fault = if draw(c, 2) == 0 {
                Fault::Kill
            } else {
                Fault::Blackhole
            };
            let after = Duration::from_millis(draw(c + 1000, 501));
            let mut s = String::new();
            for _ in 0..2 {
                std::thread::sleep(Duration::from_millis(1500));
                lc.migrate_all().expect("manual move");
                s = ours().expect("our connection").server;
            }
            std::thread::sleep(after);
            let moves_before = ours().expect("our connection").timeline.len();
            match fault {
                Fault::Kill => lc.kill_server(&s).unwrap(),
                Fault::Blackhole => lc
                    .impair_server(
                        &s,
                        Impairment {
                            blackhole: true,
                            ..Default::default()
                        },
                    )
                    .unwrap(),
            }
            let t_fault = Instant::now();
            let mono_fault = mtcp_agent::mono_us();
            // The connection leaves the faulty server (or the move fails and curl sees a reset).
            let mut ev = None;
            while t_fault.elapsed() < Duration::from_secs(20) {
                let c = ours().expect("our connection");
                if let Some(e) = c.timeline.get(moves_before) {
                    ev = Some(e.clone());
                    break;
                }
                if c.state != "live" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let e = ev.unwrap_or_else(|| {
                panic!(
                    "seed {seed} cycle {cycle}: nothing moved the connection off {s} after its {fault:?} {after:?} after a move (logs in {})",
                    dir.path().display()
                )
            });
            eprintln!(
                "seed {seed} cycle {cycle}: {fault:?} of {s} {after:?} after a move: to {} ok {} because {:?}, RESUMED {:.0} ms after the trigger (trigger {:.0} ms after the fault), from a replica: {}, refusals {:?}",
                e.to.as_deref().unwrap_or("?"),
                e.ok,
                e.reason,
                e.resumed_us.unwrap_or(0) as f64 / 1e3,
                e.trigger_mono_us.unwrap_or(0) as f64 / 1e3 - mono_fault as f64 / 1e3,
                e.from_replica,
                e.refusals
            );
            assert!(
                e.ok && e.from == s,
                "seed {seed} cycle {cycle}: the connection did not survive the {fault:?} of {s} {after:?} after a move: {e:?} (logs in {})",
                dir.path().display()
            );
            faults += 1;
            here += 1;
            // Heal before the next cycle.
            match fault {
                Fault::Kill => lc.start_server(&s).unwrap(),
                Fault::Blackhole => lc.impair_server(&s, link).unwrap(),
            }
        }
        assert!(
            here >= 2,
            "seed {seed}: only {here} faults before the download neared its end"
        );
        let ok = wait_child(&mut curl, "curl", Duration::from_secs(60));
        assert!(
            ok,
            "seed {seed}: curl failed (logs in {})",
            dir.path().display()
        );
        assert_eq!(
            mtcp_cli::local::sha256_file(&out).unwrap(),
            want,
            "seed {seed}: curl's bytes"
        );
    }
    eprintln!(
        "{faults} faults survived over {} downloads in {:?}",
        seeds.len(),
        t_all.elapsed()
    );
    drop(lc);
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        !list.contains(&format!("mtcp-{tag}-")),
        "lab {tag} left namespaces behind: {list}"
    );
}
