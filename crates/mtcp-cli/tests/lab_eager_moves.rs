//! Issue 15: in eager mode a connection survives its server dying right after a move, on a lab
//! whose server links have a 20 ms RTT and 2 % loss each way and whose server-to-server
//! traffic (the peer channels: claims, hand-overs, backup pushes) loses 10 % more in the router.
//! Three eager servers (one backup each), a forward agent in the client host, `curl
//! --limit-rate` downloading through it; cycles of: a manual move, then `kill -9` of the new
//! server 0–50 ms after the agent saw RESUMED (the move's answer), then the server restarted.
//! Every download's SHA-256 must equal the file's. `MTCP_PEER_LOSS_PERMILLE` sets the extra loss
//! (default 100 ‰). Seeds: `MTCP_FAULT_SEEDS=1,2,3` (the
//! default), one download each. `MTCP_EXE` runs another build of `mtcp` (e.g. an older one, to
//! see the test fail there). The lab leaves no namespace or process behind. Needs root (network
//! namespaces, nftables).
//!
//! Why these conditions: before decision 32 a destination answered RESUMED after waiting at
//! most 200 ms for its backup to store the new epoch's restart point; on a 40 ms server path
//! one lost segment makes that push late, and a kill right after RESUMED then finds only an
//! older epoch's replica (`Divergence`). The code before the fix (6dab18f) lost the download
//! at the first or second fault in every run; the 2 % of the issue alone rarely made the push
//! late, and a fault 0–500 ms after the move mostly came after the next regular push.

mod common;

use common::*;
use mtcp_harness::labcluster::{LabCluster, LabClusterOptions};
use mtcp_lab::{Host, Impairment};
use std::path::PathBuf;
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

/// Loss on the server-to-server paths only, per mille, on top of the links' own loss.
const PEER_LOSS_PERMILLE: u32 = 100;

/// [`PEER_LOSS_PERMILLE`], or `MTCP_PEER_LOSS_PERMILLE` to try a harsher path.
fn peer_loss() -> u32 {
    std::env::var("MTCP_PEER_LOSS_PERMILLE")
        .map(|v| v.parse().expect("MTCP_PEER_LOSS_PERMILLE: a number"))
        .unwrap_or(PEER_LOSS_PERMILLE)
}

/// Drops `permille` ‰ of the packets the router forwards from one server's link to another's
/// (an nftables table in the router's namespace, removed with the lab). The delay lines hand
/// the router single packets, so this is packet loss, not GSO-burst loss.
fn lose_between_servers(lc: &LabCluster, permille: u32) {
    let script = format!(
        "table inet mtcp_lab_peer_loss {{\n\tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tiifname \"rs*\" oifname \"rs*\" numgen random mod 1000 < {permille} drop\n\t}}\n}}\n"
    );
    lc.lab
        .nft(Host::Router, &script)
        .unwrap_or_else(|e| panic!("{e}: {script}"));
}

#[test]
fn eager_downloads_survive_their_new_server_killed_right_after_a_move_at_20_ms_rtt_and_lossy_peer_paths(
) {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let exe = std::env::var_os("MTCP_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(exe);
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
    let lc = LabCluster::start(&exe, dir.path(), &opts).expect("lab cluster");
    lose_between_servers(&lc, peer_loss());
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
        // Cycles of: a move, then a kill of the server it went to 0–50 ms after its RESUMED,
        // until the download nears its end.
        let mut cycle = 0u64;
        let mut here = 0;
        while len(&out) + (16 << 20) < size && cycle < 8 {
            let c = seed * 10 + cycle;
            cycle += 1;
            let after = Duration::from_millis(draw(c + 1000, 51));
            std::thread::sleep(Duration::from_millis(1200));
            // A refused move leaves the connection where it was (still served, still
            // protected): then that server is killed. A move that loses the connection shows
            // below (nothing moves it off the dead server, or curl fails).
            let t_move = Instant::now();
            if let Err(e) = lc.migrate_all() {
                eprintln!("seed {seed} cycle {cycle}: the manual move failed: {e:#}");
            }
            let took = t_move.elapsed();
            std::thread::sleep(after);
            let c = ours().expect("our connection");
            let (s, moves_before) = (c.server, c.timeline.len());
            lc.kill_server(&s).unwrap();
            let t_fault = Instant::now();
            let mono_fault = mtcp_agent::mono_us();
            // The connection leaves the dead server (or the move fails and curl sees a reset).
            let mut ev = None;
            let mut ended_in_order = false;
            while t_fault.elapsed() < Duration::from_secs(20) {
                let c = ours().expect("our connection");
                if let Some(e) = c.timeline.get(moves_before) {
                    ev = Some(e.clone());
                    break;
                }
                if c.state != "live" {
                    // The server had sent everything before the kill (a slow move let curl
                    // catch up): nothing was left to move. curl's bytes are checked below.
                    ended_in_order = c.is_closed();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if ev.is_none() && ended_in_order {
                eprintln!(
                    "seed {seed} cycle {cycle}: the download ended in order before the kill of {s} took effect; no more faults for this download"
                );
                lc.start_server(&s).unwrap();
                break;
            }
            let e = ev.unwrap_or_else(|| {
                panic!(
                    "seed {seed} cycle {cycle}: nothing moved the connection off {s} after its kill {after:?} after a move (logs in {})",
                    dir.path().display()
                )
            });
            eprintln!(
                "seed {seed} cycle {cycle}: move in {took:?}, kill of {s} {after:?} later: to {} ok {}, RESUMED {:.0} ms after the trigger (trigger {:.0} ms after the kill), from a replica: {}, refusals {:?}",
                e.to.as_deref().unwrap_or("?"),
                e.ok,
                e.resumed_us.unwrap_or(0) as f64 / 1e3,
                e.trigger_mono_us.unwrap_or(0) as f64 / 1e3 - mono_fault as f64 / 1e3,
                e.from_replica,
                e.refusals
            );
            assert!(
                e.ok && e.from == s,
                "seed {seed} cycle {cycle}: the connection did not survive the kill of {s} {after:?} after a move: {e:?} (logs in {})",
                dir.path().display()
            );
            faults += 1;
            here += 1;
            lc.start_server(&s).unwrap();
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
            mtcp_harness::local::sha256_file(&out).unwrap(),
            want,
            "seed {seed}: curl's bytes"
        );
    }
    eprintln!(
        "{faults} kills survived over {} downloads in {:?}",
        seeds.len(),
        t_all.elapsed()
    );
    drop(lc);
    assert_lab_gone(tag);
}

/// Counts "holding RESUMED" lines (the hook's mark) in each server's log.
fn holds(dir: &std::path::Path, servers: u16) -> Vec<usize> {
    (1..=servers)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("s{i}.log")))
                .unwrap_or_default()
                .matches("test hook: holding RESUMED")
                .count()
        })
        .collect()
}

/// Decisions 43 and 45 on the same lab: the new server dies *before its RESUMED reaches the
/// agent*. Every server holds its RESUMED 300 ms after a finished takeover (a hidden hook; the
/// agent waits: that is below its silence bound); each cycle starts a manual move, waits until
/// the destination is holding, and kills it 0–250 ms into the hold. The agent's attempt fails,
/// it retries the old epoch elsewhere, and the origin's custody hands the connection out again
/// one epoch up (the dead destination's epoch fenced at its backup). Then the server is
/// restarted. SHA-256 compared per seed (`MTCP_FAULT_SEEDS`, default 1,2,3). Needs root.
#[test]
fn eager_downloads_survive_their_new_server_killed_before_its_resumed_at_20_ms_rtt_and_lossy_peer_paths(
) {
    if !is_root() {
        eprintln!("!!! NOT ROOT: lab tests (namespaces, nftables, tc) NOT run !!!");
        return;
    }
    let exe = std::env::var_os("MTCP_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(exe);
    let seeds: Vec<u64> = match std::env::var("MTCP_FAULT_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("MTCP_FAULT_SEEDS: numbers"))
            .collect(),
        Err(_) => vec![1, 2, 3],
    };
    let tag = "er";
    let dir = TempDir::new("lab-eager-resumed");
    let size: u64 = 40 << 20;
    let want = file(&dir, "f.bin", size, 43);
    let opts = LabClusterOptions {
        tag: tag.into(),
        servers: 3,
        mode: "eager".into(),
        root: dir.path().join("www"),
        servers_link: Impairment {
            delay_ms: 20,
            loss_pct: 2.0,
            ..Default::default()
        },
        forward: true,
        server_args: vec!["--hold-resumed-ms".into(), "300".into()],
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        ..Default::default()
    };
    let lc = LabCluster::start(&exe, dir.path(), &opts).expect("lab cluster");
    lose_between_servers(&lc, peer_loss());
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
        let mut cycle = 0u64;
        let mut here = 0;
        while len(&out) + (16 << 20) < size && cycle < 6 {
            let c = seed * 10 + cycle;
            cycle += 1;
            let into_hold = Duration::from_millis(draw(c + 2000, 251));
            std::thread::sleep(Duration::from_millis(1200));
            let marks = holds(dir.path(), 3);
            let moves_before = ours().expect("our connection").migrations;
            let killed = std::thread::scope(|sc| {
                let mv = sc.spawn(|| lc.migrate_all());
                // The destination finished its takeover and holds its RESUMED: kill it.
                let t = Instant::now();
                let held = loop {
                    let now = holds(dir.path(), 3);
                    if let Some(i) = (0..3).find(|&i| now[i] > marks[i]) {
                        break Some(format!("s{}", i + 1));
                    }
                    if mv.is_finished() || t.elapsed() > Duration::from_secs(20) {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                };
                if let Some(s) = &held {
                    std::thread::sleep(into_hold);
                    lc.kill_server(s).unwrap();
                }
                if let Err(e) = mv.join().expect("migrate thread") {
                    eprintln!("seed {seed} cycle {cycle}: the manual move failed: {e:#}");
                }
                held
            });
            let Some(s) = killed else {
                eprintln!("seed {seed} cycle {cycle}: no takeover reached its RESUMED (the move was refused); no fault this cycle");
                continue;
            };
            // The connection is served by a live server, moved by the manual move or by the
            // agent noticing the kill, or it ended in order meanwhile.
            let t = Instant::now();
            let c = loop {
                let c = ours().expect("our connection");
                if c.state != "live" || (c.server != s && c.migrations > moves_before) {
                    break c;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "seed {seed} cycle {cycle}: the connection stayed on {s}, killed {into_hold:?} into its hold (logs in {})",
                    dir.path().display()
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            lc.start_server(&s).unwrap();
            if c.state != "live" {
                eprintln!(
                    "seed {seed} cycle {cycle}: the download ended ({}) after the kill of {s}",
                    c.state
                );
                break;
            }
            let last = c.timeline.last();
            eprintln!(
                "seed {seed} cycle {cycle}: {s} killed {into_hold:?} into its hold; now on {} ({} moves since); last move: {:?}",
                c.server,
                c.migrations - moves_before,
                last.map(|e| (&e.from, &e.to, e.ok, &e.refusals))
            );
            assert!(
                last.is_some_and(|e| e.ok),
                "seed {seed} cycle {cycle}: the last move failed: {last:?} (logs in {})",
                dir.path().display()
            );
            faults += 1;
            here += 1;
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
            mtcp_harness::local::sha256_file(&out).unwrap(),
            want,
            "seed {seed}: curl's bytes"
        );
    }
    let logs: String = (1..=3)
        .map(|i| std::fs::read_to_string(dir.path().join(format!("s{i}.log"))).unwrap_or_default())
        .collect();
    eprintln!(
        "{faults} kills before RESUMED survived over {} downloads in {:?}; paths taken: re-handed from custody {}, fenced origin kept the state {}, unused RESUMED given up {}, claim passed over {}",
        seeds.len(),
        t_all.elapsed(),
        logs.matches("handed over again from custody").count(),
        logs.matches("keeping the fenced connection's state").count(),
        logs.matches("giving up an epoch whose RESUMED").count(),
        logs.matches("passing the claim over").count(),
    );
    drop(lc);
    assert_lab_gone(tag);
}
