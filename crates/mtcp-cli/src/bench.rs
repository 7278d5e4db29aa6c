//! `mtcp bench`: throughput through the agent against a direct TCP download from the same server
//! in the same run, and migration latency (trigger to first resumed byte at the agent) over a
//! live transfer.

use crate::client::{Client, Hash};
use crate::local::{self, LocalCluster, LocalOptions};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    pub which: Which,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Test file size in MiB (throughput).
    #[arg(long, default_value_t = 512)]
    pub size_mib: u64,
    /// Downloads per path (throughput), alternating direct and agent.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Migrations to measure (migration).
    #[arg(long, default_value_t = 100)]
    pub migrations: u32,
    /// Pause between migrations in ms (migration).
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// The HTTP server's body bytes between snapshots (default: the server's own default).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Time the built-in client (XXH3 over every byte) instead of curl.
    #[arg(long)]
    pub builtin_client: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Which {
    Throughput,
    Migration,
}

#[derive(Serialize, Debug)]
pub struct ThroughputReport {
    pub client: &'static str,
    pub size_bytes: u64,
    pub rounds: u32,
    pub direct_mib_s: Vec<f64>,
    pub agent_mib_s: Vec<f64>,
    pub direct_median_mib_s: f64,
    pub agent_median_mib_s: f64,
    pub ratio: f64,
    /// Reference: a bare user-space TCP relay (no M-TCP: no framing, retention or checksum) on
    /// its own thread, between the same client and the plain listener.
    pub bare_relay_mib_s: Vec<f64>,
    pub bare_relay_median_mib_s: f64,
    pub bare_relay_ratio: f64,
}

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
}

pub async fn run(a: BenchArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mtcp-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www"))?;
    let r = match a.which {
        Which::Throughput => throughput(&a, &dir).await,
        Which::Migration => migration(&a, &dir).await,
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn start(dir: &std::path::Path, plain: bool, snapshot_every: Option<u64>) -> Result<LocalCluster> {
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    let opts = LocalOptions {
        servers: 3,
        root: dir.join("www"),
        plain_baseline: plain,
        log: "warn".into(),
        snapshot_every,
        server_args: Vec::new(),
    };
    tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn download(addr: &str, size: u64, want: &str) -> Result<f64> {
    let mut c = Client::connect(addr).await?;
    c.hash = Hash::Xxh3;
    let t0 = Instant::now();
    let r = c.request("GET", "/data.bin", &[]).await?;
    let secs = t0.elapsed().as_secs_f64();
    if r.status != 200 || r.body_len != size || r.digest != want {
        bail!(
            "download from {addr} came back wrong: status {} len {} digest {}",
            r.status,
            r.body_len,
            r.digest
        );
    }
    Ok(size as f64 / (1 << 20) as f64 / secs)
}

/// One timed download by curl (writing to /dev/null); checks status and length.
async fn download_curl(addr: &str, size: u64) -> Result<f64> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
        ])
        .arg(format!("http://{addr}/data.bin"))
        .output()
        .await
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    match f[..] {
        [code, n, t] if code == "200" && n.parse::<u64>().ok() == Some(size) => {
            let secs: f64 = t.parse().context("curl time")?;
            Ok(size as f64 / (1 << 20) as f64 / secs)
        }
        _ => bail!("curl download from {addr} came back wrong: {text}"),
    }
}

/// A minimal user-space TCP relay to `to` on its own thread and single-threaded runtime (like
/// the agent's), for a ceiling: what any relay costs on this machine. Returns its address.
fn bare_relay(to: &str) -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?.to_string();
    let to = to.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                return;
            };
            while let Ok((mut c, _)) = l.accept().await {
                let to = to.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(&to).await {
                        let _ = c.set_nodelay(true);
                        let _ = s.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional_with_sizes(
                            &mut c,
                            &mut s,
                            256 << 10,
                            256 << 10,
                        )
                        .await;
                    }
                });
            }
        })
    });
    Ok(addr)
}

async fn throughput(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    let size = a.size_mib << 20;
    let file = dir.join("www/data.bin");
    tokio::task::block_in_place(|| local::make_file(&file, size, 7))?;
    let want = {
        let b = std::fs::read(&file)?;
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&b))
    };
    let lc = start(dir, true, a.snapshot_every)?;
    let plain = lc.plain.clone().context("plain listener")?;
    // Warm the page cache and both paths once, checking every byte (XXH3) on the way.
    download(&plain, size, &want).await?;
    download(&lc.agent_listen, size, &want).await?;
    // The timed rounds use curl, a real client, when it is there (same for both paths).
    let curl = !a.builtin_client && local::have("curl");
    let relay = bare_relay(&plain)?;
    let (mut d, mut g, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        if curl {
            d.push(download_curl(&plain, size).await?);
            g.push(download_curl(&lc.agent_listen, size).await?);
            r.push(download_curl(&relay, size).await?);
        } else {
            d.push(download(&plain, size, &want).await?);
            g.push(download(&lc.agent_listen, size, &want).await?);
            r.push(download(&relay, size, &want).await?);
        }
    }
    let rep = ThroughputReport {
        client: if curl { "curl" } else { "built-in" },
        size_bytes: size,
        rounds: a.rounds,
        direct_median_mib_s: median(&d),
        agent_median_mib_s: median(&g),
        ratio: median(&g) / median(&d),
        bare_relay_median_mib_s: median(&r),
        bare_relay_ratio: median(&r) / median(&d),
        direct_mib_s: d,
        agent_mib_s: g,
        bare_relay_mib_s: r,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "throughput, {} MiB file, {} rounds, client {}, loopback, 2 cores shared by client, agent, server",
            a.size_mib, a.rounds, rep.client
        );
        println!(
            "  direct TCP   : {:>8.1} MiB/s (median)",
            rep.direct_median_mib_s
        );
        println!(
            "  through agent: {:>8.1} MiB/s (median)",
            rep.agent_median_mib_s
        );
        println!("  ratio        : {:>8.3}", rep.ratio);
        println!(
            "  reference, a bare user-space TCP relay: {:.1} MiB/s (median), ratio {:.3}",
            rep.bare_relay_median_mib_s, rep.bare_relay_ratio
        );
    }
    Ok(())
}

async fn migration(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    // A transfer long enough to hold every migration: rate-limited client.
    let rate: u64 = 64 << 20;
    let secs = (a.migrations as u64 * (a.interval_ms + 30)) / 1000 + 3;
    let size = rate * secs;
    let file = dir.join("www/data.bin");
    let want = tokio::task::block_in_place(|| local::make_file(&file, size, 9))?;
    let lc = start(dir, false, a.snapshot_every)?;
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
    let rep = MigrationReport {
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
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "migration latency, lazy mode, loopback, {} migrations of one live download",
            rep.migrations
        );
        println!("  trigger -> first resumed byte at the agent: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            rep.first_byte_us_p50 as f64 / 1e3, rep.first_byte_us_p90 as f64 / 1e3, rep.first_byte_us_p99 as f64 / 1e3, rep.first_byte_us_max as f64 / 1e3);
        println!(
            "  trigger -> RESUMED:                         p50 {:.3} ms  p99 {:.3} ms",
            rep.resumed_us_p50 as f64 / 1e3,
            rep.resumed_us_p99 as f64 / 1e3
        );
        println!(
            "  largest state record: {} bytes; transfer sha256 ok: {}",
            rep.state_bytes_max, rep.transfer_sha256_ok
        );
    }
    if !ok {
        bail!("the migrated transfer's SHA-256 did not match");
    }
    Ok(())
}
