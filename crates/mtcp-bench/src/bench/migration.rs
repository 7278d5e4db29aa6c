//! Moving a live download: migration latency (with and without TLS), and draining the server
//! that serves it.

use super::*;

#[derive(Serialize, Debug)]
pub struct MigrationReport {
    pub migrations: usize,
    pub first_byte_us_p50: u64,
    pub first_byte_us_p90: u64,
    pub first_byte_us_p99: u64,
    pub first_byte_us_max: u64,
    pub resumed_us_p50: u64,
    pub resumed_us_p99: u64,
    pub state_bytes_max: u64,
    pub transfer_sha256_ok: bool,
    /// Measured over the kernel fast path (`--fast-path`): the agent sees no bytes, so the
    /// first-byte figures are 0 and trigger -> RESUMED (which includes putting up and taking
    /// down the nftables fence) is the measure.
    #[serde(default)]
    pub fast_path: bool,
    /// `--breakdown`: where each move's time went, and the loopback floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<crate::breakdown::Breakdown>,
}

pub(super) async fn migration(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    if !a.tls {
        let rep = migration_run(a, dir, false).await?;
        return print_migration(a, &rep);
    }
    // A plain cluster, then one with TLS, in the same run (decision 45).
    let mut reps = Vec::new();
    for tls in [false, true] {
        let d = dir.join(if tls { "tls" } else { "plain" });
        std::fs::create_dir_all(d.join("www"))?;
        let rep = migration_run(a, &d, tls).await?;
        if !a.json {
            println!("{}:", if tls { "with TLS" } else { "without TLS" });
        }
        print_migration(a, &rep)?;
        reps.push(rep);
    }
    let ratio = |f: fn(&MigrationReport) -> u64| f(&reps[1]) as f64 / f(&reps[0]).max(1) as f64;
    let (fb, rs) = (ratio(|r| r.first_byte_us_p50), ratio(|r| r.resumed_us_p50));
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tls_to_plain_first_byte_p50": fb, "tls_to_plain_resumed_p50": rs})
        );
    } else {
        println!(
            "TLS / plain, p50: trigger -> first resumed byte {fb:.3}, trigger -> RESUMED {rs:.3}"
        );
    }
    Ok(())
}

async fn migration_run(a: &BenchArgs, dir: &std::path::Path, tls: bool) -> Result<MigrationReport> {
    // A transfer long enough to hold every migration: rate-limited client.
    let rate: u64 = 64 << 20;
    let secs = (a.migrations as u64 * (a.interval_ms + 30)) / 1000 + 3;
    let size = rate * secs;
    let file = dir.join("www/data.bin");
    let want = tokio::task::block_in_place(|| local::make_file(&file, size, 9))?;
    let floor = match a.breakdown {
        true => Some(tokio::task::block_in_place(crate::breakdown::floor)?),
        false => None,
    };
    let lc = if tls {
        let exe = std::env::current_exe().context("locating the mtcp binary")?;
        let opts = tls_cluster(a, dir);
        tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))?
    } else {
        start_maybe_fast(a, dir)?
    };
    let mut c = Client::connect(&lc.agent_listen).await?;
    c.rate = Some(rate);
    let dl = tokio::spawn(async move { c.request("GET", "/data.bin", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let mut done = 0;
    while done < a.migrations {
        if dl.is_finished() {
            bail!("transfer ended after {done} migrations; raise the size or lower --migrations");
        }
        lc.migrate_all()
            .await
            .with_context(|| format!("migration {done}"))?;
        done += 1;
        tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
        if t0.elapsed() > Duration::from_secs(secs + 30) {
            bail!("migrations took too long");
        }
    }
    let status = lc.status_async().await?;
    let r = dl.await??;
    let ok = r.status == 200 && r.body_len == size && r.digest == want;
    let events: Vec<_> = status
        .iter()
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .collect();
    let mut fb: Vec<u64> = events.iter().filter_map(|e| e.first_byte_us).collect();
    let mut rs: Vec<u64> = events.iter().filter_map(|e| e.resumed_us).collect();
    fb.sort_unstable();
    rs.sort_unstable();
    let mut rep = MigrationReport {
        migrations: events.len(),
        first_byte_us_p50: pct(&fb, 0.5),
        first_byte_us_p90: pct(&fb, 0.9),
        first_byte_us_p99: pct(&fb, 0.99),
        first_byte_us_max: fb.last().copied().unwrap_or(0),
        resumed_us_p50: pct(&rs, 0.5),
        resumed_us_p99: pct(&rs, 0.99),
        state_bytes_max: events
            .iter()
            .filter_map(|e| e.state_bytes)
            .max()
            .unwrap_or(0),
        transfer_sha256_ok: ok,
        fast_path: a.fast_path && !tls,
        breakdown: None,
    };
    if !ok {
        bail!("the migrated transfer's SHA-256 did not match");
    }
    if let Some(floor) = floor {
        // The processes write their traces as they go; stopping them flushes every line.
        drop(lc);
        rep.breakdown = Some(crate::breakdown::analyse(dir, floor)?);
    }
    Ok(rep)
}

fn print_migration(a: &BenchArgs, rep: &MigrationReport) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "migration latency, {} mode, loopback, {} migrations of one live download",
            a.mode, rep.migrations
        );
        if rep.fast_path {
            println!("  kernel fast path: the agent sees no bytes; on one host the origin hands the socket itself over (decision 56), else it is fenced, frozen and recreated");
        } else {
            println!("  trigger -> first resumed byte at the agent: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
                rep.first_byte_us_p50 as f64 / 1e3, rep.first_byte_us_p90 as f64 / 1e3, rep.first_byte_us_p99 as f64 / 1e3, rep.first_byte_us_max as f64 / 1e3);
        }
        println!(
            "  trigger -> RESUMED:                         p50 {:.3} ms  p99 {:.3} ms",
            rep.resumed_us_p50 as f64 / 1e3,
            rep.resumed_us_p99 as f64 / 1e3
        );
        println!(
            "  largest state record: {} bytes; transfer sha256 ok: {}",
            rep.state_bytes_max, rep.transfer_sha256_ok
        );
        if let Some(b) = &rep.breakdown {
            crate::breakdown::print(b);
        }
    }
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct DrainReport {
    pub mode: String,
    pub rate_mib_s: u64,
    /// Seconds from the drain request to the server reporting no connection, per drain.
    pub drain_secs: Vec<f64>,
    pub drain_secs_median: f64,
    pub drain_secs_max: f64,
    pub transfer_sha256_ok: bool,
}

/// `mtcp bench drain`: one download read at `--rate-mib` by the built-in client; `--rounds`
/// times the server serving it is drained (timed until it reports no connection left), then
/// restarted so that it can serve again. The transfer's SHA-256 is checked at the end.
pub(super) async fn drain(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    let rate = a.rate_mib.max(1) << 20;
    // Per round: ~1 s of reading before the drain, the drain itself, the restart.
    let size = rate * (a.rounds() as u64 * 6 + 4);
    let file = dir.join("www/data.bin");
    let want = tokio::task::block_in_place(|| local::make_file(&file, size, 11))?;
    let mut lc = start_maybe_fast(a, dir)?;
    let cluster = mtcp::Cluster::load(&lc.cluster_file)?;
    let mut c = Client::connect(&lc.agent_listen).await?;
    c.rate = Some(rate);
    let dl = tokio::spawn(async move { c.request("GET", "/data.bin", &[]).await });
    let mut secs = Vec::new();
    for round in 0..a.rounds() {
        // Let the application run ahead of the slow reader: its queue and the socket buffers
        // fill, which is what a HINT has to get past.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if dl.is_finished() {
            bail!("transfer ended after {round} drains; lower --rounds");
        }
        let st = lc.status_async().await?;
        let id = st
            .first()
            .context("no connection at the agent")?
            .server
            .clone();
        let admin = lc
            .servers
            .iter()
            .find(|s| s.id == id)
            .context("unknown server")?
            .admin
            .clone();
        let t0 = Instant::now();
        local::drain_server(
            &admin,
            &cluster.key,
            lc.tls.as_ref(),
            &id,
            Duration::from_secs(60),
        )
        .await?;
        secs.push(t0.elapsed().as_secs_f64());
        if !a.json {
            println!(
                "  drain {round}: {id} empty after {:.3} s",
                t0.elapsed().as_secs_f64()
            );
        }
        // What an operator does: drain, then stop the server at once. `drain` returns only
        // when the state records it handed over have reached their destinations, so even in
        // lazy mode (where nothing else holds the state while it crosses) nothing is lost.
        tokio::task::block_in_place(|| -> Result<()> {
            lc.kill(&id)?;
            lc.restart_server(&id)
        })?;
    }
    let r = tokio::time::timeout(Duration::from_secs(size / rate + 60), dl)
        .await
        .context("the download did not finish")???;
    let ok = r.status == 200 && r.body_len == size && r.digest == want;
    let rep = DrainReport {
        mode: a.mode.clone(),
        rate_mib_s: a.rate_mib,
        drain_secs_median: median(&secs),
        drain_secs_max: secs.iter().cloned().fold(0.0, f64::max),
        drain_secs: secs,
        transfer_sha256_ok: ok,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "drain under a client reading {} MiB/s, {} mode{}: median {:.3} s, max {:.3} s; transfer sha256 ok: {}",
            rep.rate_mib_s, rep.mode, if a.fast_path { ", kernel fast path" } else { "" }, rep.drain_secs_median, rep.drain_secs_max, rep.transfer_sha256_ok
        );
    }
    if !ok {
        bail!("the drained transfer's SHA-256 did not match");
    }
    Ok(())
}
