//! Eager mode: killing or stopping the serving server (recovery, hung), idle connections left
//! alone (soak), and what replication costs a download (eager-cost).

use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fault {
    Kill,
    Stop,
}

#[derive(Serialize, Debug)]
pub struct FaultReport {
    pub fault: &'static str,
    pub faults: usize,
    /// From the signal to the first resumed downstream byte at the agent.
    pub recovery_us_p50: u64,
    pub recovery_us_p90: u64,
    pub recovery_us_p99: u64,
    pub recovery_us_max: u64,
    /// From the signal to the agent's trigger (detection).
    pub detect_us_p50: u64,
    pub detect_us_max: u64,
    pub from_replica: usize,
    pub transfer_sha256_ok: bool,
    /// Per fault: signal to first resumed byte, µs.
    pub samples_us: Vec<u64>,
    /// Candidates that refused on the way (per fault, when any did).
    pub refusals: Vec<String>,
}

/// Eager mode: kills (or stops) the serving server `--faults` times during one live transfer,
/// restarting (or resuming) it after the connection moved, and measures from the signal to the
/// first resumed byte at the agent.
pub(super) async fn faults(a: &BenchArgs, dir: &std::path::Path, fault: Fault) -> Result<()> {
    let rate: u64 = 32 << 20;
    let per = match fault {
        Fault::Kill => 0.6,
        Fault::Stop => 1.5,
    };
    let secs = (a.faults as f64 * per) as u64 + 4;
    let size = rate * secs;
    let file = dir.join("www/data.bin");
    let want = tokio::task::block_in_place(|| local::make_file(&file, size, 11))?;
    let mut lc = start_mode(dir, &dir.join("www"), false, a.snapshot_every, "eager")?;
    let mut c = Client::connect(&lc.agent_listen).await?;
    c.rate = Some(rate);
    let dl = tokio::spawn(async move { c.request("GET", "/data.bin", &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Vec::new();
    let mut refusals = Vec::new();
    let t_end = Instant::now() + Duration::from_secs(secs + 60);
    for i in 0..a.faults {
        if dl.is_finished() {
            bail!("transfer ended after {i} faults; lower --faults");
        }
        let st = lc.status_async().await?;
        let conn = st
            .iter()
            .find(|c| c.is_live() && c.bytes_down > 0)
            .context("no live transfer")?;
        let victim = conn.server.clone();
        let seen = conn.timeline.len();
        let at = mtcp_agent::mono_us();
        match fault {
            Fault::Kill => tokio::task::block_in_place(|| lc.kill(&victim))?,
            Fault::Stop => tokio::task::block_in_place(|| lc.sigstop(&victim))?,
        }
        // Wait for the move and its first byte.
        let ev = loop {
            if Instant::now() > t_end {
                bail!("fault {i}: the connection did not move");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let st = lc.status_async().await?;
            let Some(c) = st.iter().find(|c| c.cid == conn.cid) else {
                bail!("fault {i}: the connection is gone");
            };
            if let Some(e) = c.timeline.get(seen) {
                if !e.ok {
                    bail!("fault {i}: migration failed: {:?}", e.refusals);
                }
                if e.first_byte_us.is_some() {
                    break e.clone();
                }
            }
        };
        let trig = ev
            .trigger_mono_us
            .context("agent reported no trigger time")?;
        samples.push((
            trig.saturating_sub(at),
            trig.saturating_sub(at) + ev.first_byte_us.unwrap_or(0),
            ev.from_replica,
        ));
        if !ev.refusals.is_empty() {
            refusals.push(format!("fault {i}: {}", ev.refusals.join("; ")));
        }
        match fault {
            Fault::Kill => lc.restart_server_async(&victim).await?,
            Fault::Stop => tokio::task::block_in_place(|| lc.sigcont(&victim))?,
        }
        // Let the new server's backups catch up before the next fault.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = dl.await??;
    let ok = r.status == 200 && r.body_len == size && r.digest == want;
    let mut det: Vec<u64> = samples.iter().map(|s| s.0).collect();
    let mut rec: Vec<u64> = samples.iter().map(|s| s.1).collect();
    det.sort_unstable();
    rec.sort_unstable();
    let rep = FaultReport {
        fault: match fault {
            Fault::Kill => "kill -9",
            Fault::Stop => "SIGSTOP",
        },
        faults: samples.len(),
        recovery_us_p50: pct(&rec, 0.5),
        recovery_us_p90: pct(&rec, 0.9),
        recovery_us_p99: pct(&rec, 0.99),
        recovery_us_max: rec.last().copied().unwrap_or(0),
        detect_us_p50: pct(&det, 0.5),
        detect_us_max: det.last().copied().unwrap_or(0),
        from_replica: samples.iter().filter(|s| s.2).count(),
        transfer_sha256_ok: ok,
        samples_us: samples.iter().map(|s| s.1).collect(),
        refusals,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        let ms = |us: u64| us as f64 / 1e3;
        println!(
            "{} of the serving server, eager mode, loopback, {} faults during one live download",
            rep.fault, rep.faults
        );
        println!(
            "  signal -> first resumed byte at the agent: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            ms(rep.recovery_us_p50), ms(rep.recovery_us_p90), ms(rep.recovery_us_p99), ms(rep.recovery_us_max)
        );
        println!(
            "  signal -> agent's trigger (detection):     p50 {:.3} ms  max {:.3} ms",
            ms(rep.detect_us_p50),
            ms(rep.detect_us_max)
        );
        println!(
            "  resumed from a replica: {} of {}; transfer sha256 ok: {}",
            rep.from_replica, rep.faults, rep.transfer_sha256_ok
        );
        for r in &rep.refusals {
            println!("  refused on the way: {r}");
        }
    }
    if !ok {
        bail!("the transfer's SHA-256 did not match");
    }
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct SoakReport {
    pub connections: u32,
    pub idle_secs: u64,
    pub false_migrations: u64,
    pub requests_ok_after: u32,
}

/// Eager mode: idle keep-alive connections, left alone; none may move, all must still serve.
pub(super) async fn soak(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    let file = dir.join("www/data.bin");
    let want = tokio::task::block_in_place(|| local::make_file(&file, 256 << 10, 12))?;
    let lc = start_mode(dir, &dir.join("www"), false, a.snapshot_every, "eager")?;
    let mut clients = Vec::new();
    for _ in 0..a.soak_conns {
        let mut c = Client::connect(&lc.agent_listen).await?;
        let r = c.request("GET", "/data.bin", &[]).await?;
        if r.digest != want {
            bail!("first request came back wrong");
        }
        clients.push(c);
    }
    if !a.json {
        println!(
            "soak: {} idle keep-alive connections for {} s (eager mode)...",
            a.soak_conns, a.soak_secs
        );
    }
    tokio::time::sleep(Duration::from_secs(a.soak_secs)).await;
    let st = lc.status_async().await?;
    let false_migrations: u64 = st
        .iter()
        .filter(|c| c.is_live())
        .map(|c| c.migrations)
        .sum();
    let mut ok = 0;
    for c in &mut clients {
        if c.request("GET", "/data.bin", &[]).await?.digest == want {
            ok += 1;
        }
    }
    let rep = SoakReport {
        connections: a.soak_conns,
        idle_secs: a.soak_secs,
        false_migrations,
        requests_ok_after: ok,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "  false migrations: {}; requests correct afterwards: {}/{}",
            rep.false_migrations, rep.requests_ok_after, rep.connections
        );
    }
    if false_migrations > 0 || ok != a.soak_conns {
        bail!("idle connections were disturbed");
    }
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct EagerCostReport {
    pub client: &'static str,
    pub size_bytes: u64,
    pub rounds: u32,
    pub lazy_1m_mib_s: f64,
    pub eager_1m_mib_s: f64,
    pub lazy_64k_mib_s: f64,
    pub eager_64k_mib_s: f64,
    /// 1 - eager / lazy, snapshots every 1 MiB.
    pub cost_1m: f64,
    /// 1 - eager / lazy, snapshots every 64 KiB.
    pub cost_64k: f64,
}

/// Four clusters serving the same file: lazy and eager, each with snapshots every 1 MiB and
/// every 64 KiB; downloads alternate between them (medians).
pub(super) async fn eager_cost(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    let size = a.size_mib << 20;
    let www = dir.join("www");
    let file = www.join("data.bin");
    tokio::task::block_in_place(|| local::make_file(&file, size, 7))?;
    let want = {
        let b = std::fs::read(&file)?;
        format!("{:016x}", twox_hash::XxHash3_64::oneshot(&b))
    };
    let mut clusters = Vec::new();
    for (name, mode, every) in [
        ("lazy-1m", "lazy", 1u64 << 20),
        ("eager-1m", "eager", 1 << 20),
        ("lazy-64k", "lazy", 64 << 10),
        ("eager-64k", "eager", 64 << 10),
    ] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        clusters.push(start_mode(&d, &www, false, Some(every), mode)?);
    }
    for lc in &clusters {
        download(&lc.agent_listen, size, &want).await?;
    }
    let curl = !a.builtin_client && local::have("curl");
    let mut v: [Vec<f64>; 4] = Default::default();
    for _ in 0..a.rounds() {
        for (i, lc) in clusters.iter().enumerate() {
            v[i].push(if curl {
                download_curl(&lc.agent_listen, size).await?
            } else {
                download(&lc.agent_listen, size, &want).await?
            });
        }
    }
    let (l, e1, l64, e64) = (median(&v[0]), median(&v[1]), median(&v[2]), median(&v[3]));
    let rep = EagerCostReport {
        client: if curl { "curl" } else { "built-in" },
        size_bytes: size,
        rounds: a.rounds(),
        lazy_1m_mib_s: l,
        eager_1m_mib_s: e1,
        lazy_64k_mib_s: l64,
        eager_64k_mib_s: e64,
        cost_1m: 1.0 - e1 / l,
        cost_64k: 1.0 - e64 / l64,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "eager replication cost, {} MiB file, {} rounds, client {}, through the agent",
            a.size_mib,
            a.rounds(),
            rep.client
        );
        println!("  lazy,  snapshot every 1 MiB : {l:>8.1} MiB/s (median)");
        println!(
            "  eager, snapshot every 1 MiB : {e1:>8.1} MiB/s (median)  cost {:+.1} %",
            rep.cost_1m * 100.0
        );
        println!("  lazy,  snapshot every 64 KiB: {l64:>8.1} MiB/s (median)");
        println!(
            "  eager, snapshot every 64 KiB: {e64:>8.1} MiB/s (median)  cost {:+.1} %",
            rep.cost_64k * 100.0
        );
    }
    Ok(())
}
