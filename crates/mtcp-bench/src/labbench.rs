//! Benchmarks in the network lab (root): migration latency against the client's RTT,
//! throughput through the transparent agent on a rate-limited link against a direct
//! connection, and the degrade experiment (a server's link degrades, the throughput-floor policy
//! moves the connection, the rate recovers), plotted as SVG.

use crate::args::BenchArgs;
use crate::plot::{Chart, Marker};
use crate::stats::{curl_secs, median, pct, CURL_TIMED};
use anyhow::{bail, Context, Result};
use mtcp_harness::labcluster::{LabCluster, LabClusterOptions, PLAIN_PORT};
use mtcp_harness::local;
use mtcp_lab::{Host, Impairment};
use serde::Serialize;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn exe() -> Result<std::path::PathBuf> {
    std::env::current_exe().context("locating the mtcp binary")
}

/// TCP connect time (one SYN / SYN-ACK round trip) from `from` to `to`, median of 5, in µs.
fn connect_rtt_us(lc: &LabCluster, from: Host, to: std::net::SocketAddr) -> Result<u64> {
    let v = lc.lab.run_in(from, move || {
        let mut v = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            if std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok() {
                v.push(t0.elapsed().as_micros() as u64);
            }
        }
        v.sort_unstable();
        v
    })?;
    v.get(v.len() / 2)
        .copied()
        .with_context(|| format!("cannot connect to {to}"))
}

fn spawn_curl(lc: &LabCluster, url: &str, rate: Option<&str>, out: &Path) -> Result<Child> {
    let mut c = lc.client_command("curl");
    c.args(["-sS", "--fail", "-o"]).arg(out);
    if let Some(r) = rate {
        c.args(["--limit-rate", r]);
    }
    c.arg(url).stdin(Stdio::null());
    c.spawn().context("starting curl in the lab's client")
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[derive(Serialize, Debug)]
pub struct RttRow {
    pub added_rtt_ms: u32,
    /// Measured client↔server and server↔server round trips (TCP connect time), µs.
    pub client_rtt_us: u64,
    pub server_rtt_us: u64,
    pub migrations: usize,
    pub first_byte_us_p50: u64,
    pub first_byte_us_p90: u64,
    pub first_byte_us_p99: u64,
    pub first_byte_us_max: u64,
    pub resumed_us_p50: u64,
    /// One client RTT + one server↔server RTT + 2 ms.
    pub target_us: u64,
    pub sha256_ok: bool,
}

/// Migration latency (manual moves of one live download) with the client's link adding each of
/// `--rtts` ms of round trip.
pub async fn rtt(a: &BenchArgs, dir: &Path) -> Result<()> {
    let size: u64 = 64 << 20;
    let file = dir.join("www/data.bin");
    let want = tokio::task::block_in_place(|| local::make_file(&file, size, 41))?;
    let mut rows = Vec::new();
    for &ms in &a.rtts {
        let d = dir.join(format!("rtt{ms}"));
        std::fs::create_dir_all(&d)?;
        let row = tokio::task::block_in_place(|| rtt_one(a, &d, dir, ms, size, &want))?;
        if !a.json {
            println!(
                "  +{:>3} ms RTT (measured client {:.2} ms, server-server {:.2} ms): {} moves, first byte p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  RESUMED p50 {:.2} ms  target {:.2} ms  sha256 {}",
                row.added_rtt_ms,
                row.client_rtt_us as f64 / 1e3,
                row.server_rtt_us as f64 / 1e3,
                row.migrations,
                row.first_byte_us_p50 as f64 / 1e3,
                row.first_byte_us_p90 as f64 / 1e3,
                row.first_byte_us_p99 as f64 / 1e3,
                row.first_byte_us_max as f64 / 1e3,
                row.resumed_us_p50 as f64 / 1e3,
                row.target_us as f64 / 1e3,
                if row.sha256_ok { "ok" } else { "MISMATCH" }
            );
        }
        rows.push(row);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    if rows.iter().any(|r| !r.sha256_ok) {
        bail!("a transfer's SHA-256 did not match");
    }
    Ok(())
}

fn rtt_one(a: &BenchArgs, d: &Path, root: &Path, ms: u32, size: u64, want: &str) -> Result<RttRow> {
    let exe = match &a.exe {
        Some(e) => e.clone(),
        None => exe()?,
    };
    let lc = LabCluster::start(
        &exe,
        d,
        &LabClusterOptions {
            tag: "brtt".into(),
            mode: a.mode.clone(),
            root: root.join("www"),
            client_link: Impairment {
                delay_ms: ms,
                ..Default::default()
            },
            servers_link: Impairment {
                loss_pct: a.loss_pct,
                ..Default::default()
            },
            log: "warn".into(),
            ..Default::default()
        },
    )?;
    let s1 =
        std::net::SocketAddr::from((Host::Server(1).addr(), mtcp_harness::labcluster::DATA_PORT));
    let s2 =
        std::net::SocketAddr::from((Host::Server(2).addr(), mtcp_harness::labcluster::DATA_PORT));
    let client_rtt_us = connect_rtt_us(&lc, Host::Client, s1)?;
    let server_rtt_us = connect_rtt_us(&lc, Host::Server(1), s2)?;
    let out = d.join("got.bin");
    let mut curl = spawn_curl(
        &lc,
        &format!("http://{}/data.bin", lc.service),
        Some("4M"),
        &out,
    )?;
    let t0 = Instant::now();
    while file_len(&out) < 1 << 20 {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the download did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..a.migrations {
        if curl.try_wait()?.is_some() {
            bail!("the download ended after {i} migrations; lower --migrations");
        }
        lc.migrate_all().with_context(|| format!("migration {i}"))?;
        std::thread::sleep(Duration::from_millis(a.interval_ms.max(ms as u64 * 3)));
    }
    let st = lc.status()?;
    let _ = curl.kill();
    let _ = curl.wait();
    // The transfer was cut short on purpose: check the bytes that arrived against the file.
    let got = std::fs::read(&out)?;
    let all = std::fs::read(root.join("www/data.bin"))?;
    let ok = got.len() as u64 <= size && all[..got.len()] == got[..] && !want.is_empty();
    let ev: Vec<_> = st
        .iter()
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .collect();
    let mut fb: Vec<u64> = ev.iter().filter_map(|e| e.first_byte_us).collect();
    let mut rs: Vec<u64> = ev.iter().filter_map(|e| e.resumed_us).collect();
    fb.sort_unstable();
    rs.sort_unstable();
    Ok(RttRow {
        added_rtt_ms: ms,
        client_rtt_us,
        server_rtt_us,
        migrations: ev.len(),
        first_byte_us_p50: pct(&fb, 0.5),
        first_byte_us_p90: pct(&fb, 0.9),
        first_byte_us_p99: pct(&fb, 0.99),
        first_byte_us_max: fb.last().copied().unwrap_or(0),
        resumed_us_p50: pct(&rs, 0.5),
        target_us: client_rtt_us + server_rtt_us + 2000,
        sha256_ok: ok,
    })
}

#[derive(Serialize, Debug)]
pub struct LinkThroughput {
    pub link_mbit: f64,
    pub size_bytes: u64,
    pub direct_mbit_s: Vec<f64>,
    pub agent_mbit_s: Vec<f64>,
    pub ratio: f64,
}

/// Throughput through the transparent agent against a direct connection, both over the same
/// rate-limited server link.
pub async fn link_throughput(a: &BenchArgs, dir: &Path) -> Result<()> {
    let size = a.size_mib << 20;
    let file = dir.join("www/data.bin");
    tokio::task::block_in_place(|| local::make_file(&file, size, 42))?;
    tokio::task::block_in_place(|| {
        let lc = LabCluster::start(
            &exe()?,
            dir,
            &LabClusterOptions {
                tag: "bthr".into(),
                servers: 2,
                mode: a.mode.clone(),
                root: dir.join("www"),
                servers_link: Impairment {
                    rate_mbit: Some(a.link_mbit),
                    ..Default::default()
                },
                log: "warn".into(),
                plain: true,
                ..Default::default()
            },
        )?;
        let direct = format!("http://{}:{PLAIN_PORT}/data.bin", Host::Server(1).addr());
        let agent = format!("http://{}/data.bin", lc.service);
        let time = |url: &str| -> Result<f64> {
            let out = lc
                .client_command("curl")
                .args(CURL_TIMED)
                .arg(url)
                .output()?;
            Ok(size as f64 * 8.0 / 1e6 / curl_secs(&out.stdout, size, url)?)
        };
        let (mut d, mut g) = (Vec::new(), Vec::new());
        for _ in 0..a.rounds() {
            d.push(time(&direct)?);
            g.push(time(&agent)?);
        }
        let med = median;
        let rep = LinkThroughput {
            link_mbit: a.link_mbit,
            size_bytes: size,
            ratio: med(&g) / med(&d),
            direct_mbit_s: d,
            agent_mbit_s: g,
        };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rep)?);
        } else {
            println!(
                "throughput over a {} Mbit/s server link, {} MiB, {} rounds, curl in the lab's client",
                a.link_mbit, a.size_mib, a.rounds()
            );
            println!(
                "  direct TCP             : {:>8.1} Mbit/s (median)",
                med(&rep.direct_mbit_s)
            );
            println!(
                "  through the transparent agent: {:>8.1} Mbit/s (median)",
                med(&rep.agent_mbit_s)
            );
            println!("  ratio: {:.3}", rep.ratio);
        }
        Ok(())
    })
}

#[derive(Serialize, Debug)]
pub struct DegradeReport {
    pub link_mbit: f64,
    pub degraded_to_mbit: f64,
    pub good_mbit_s: f64,
    pub degraded_at_s: f64,
    pub migrated_at_s: Option<f64>,
    pub recovered_at_s: Option<f64>,
    /// From the degradation to the first 500 ms window back at ≥ 80 % of the good rate.
    pub recovery_s: Option<f64>,
    pub after_mbit_s: f64,
    pub samples: Vec<(f64, f64)>,
    pub svg: String,
}

/// The seed's headline experiment: a long download from a server whose link degrades while
/// another server's stays good; the throughput-floor policy moves the connection.
pub async fn degrade(a: &BenchArgs, dir: &Path) -> Result<()> {
    let size: u64 = 512 << 20;
    let file = dir.join("www/data.bin");
    tokio::task::block_in_place(|| local::make_file(&file, size, 43))?;
    let floor = a.link_mbit / 4.0;
    tokio::task::block_in_place(|| {
        let lc = LabCluster::start(
            &exe()?,
            dir,
            &LabClusterOptions {
                tag: "bdeg".into(),
                servers: 2,
                mode: a.mode.clone(),
                root: dir.join("www"),
                servers_link: Impairment {
                    rate_mbit: Some(a.link_mbit),
                    ..Default::default()
                },
                agent_args: vec![
                    "--floor-mbit".into(),
                    floor.to_string(),
                    "--floor-window-ms".into(),
                    "1000".into(),
                ],
                log: "warn".into(),
                ..Default::default()
            },
        )?;
        let out = dir.join("got.bin");
        let mut curl = spawn_curl(&lc, &format!("http://{}/data.bin", lc.service), None, &out)?;
        let step = Duration::from_millis(100);
        let (degrade_at, end) = (3.0, 10.0);
        let t0 = Instant::now();
        let t0_mono = mtcp_agent::mono_us();
        let mut samples = Vec::new();
        let mut last = 0u64;
        let mut degraded = false;
        let mut victim = String::new();
        while t0.elapsed().as_secs_f64() < end {
            std::thread::sleep(step);
            let n = file_len(&out);
            let t = t0.elapsed().as_secs_f64();
            samples.push((t, (n - last) as f64 * 8.0 / 1e6 / step.as_secs_f64()));
            last = n;
            if !degraded && t >= degrade_at {
                victim = lc.serving()?.context("no live connection")?;
                lc.impair_server(
                    &victim,
                    Impairment {
                        rate_mbit: Some(a.degrade_mbit),
                        ..Default::default()
                    },
                )?;
                degraded = true;
            }
            if curl.try_wait()?.is_some() {
                break;
            }
        }
        let st = lc.status()?;
        let _ = curl.kill();
        let _ = curl.wait();
        let t_deg = samples
            .iter()
            .find(|s| s.0 >= degrade_at)
            .map_or(degrade_at, |s| s.0);
        let mean = |from: f64, to: f64| {
            let v: Vec<f64> = samples
                .iter()
                .filter(|s| s.0 > from && s.0 <= to)
                .map(|s| s.1)
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let good = mean(1.0, t_deg);
        // Recovered: the first 500 ms window after the degradation back at 80 % of the good rate.
        let recovered = samples
            .windows(5)
            .find(|w| {
                w[0].0 > t_deg + 0.2 && w.iter().map(|s| s.1).sum::<f64>() / 5.0 >= 0.8 * good
            })
            .map(|w| w[0].0);
        let moves: Vec<_> = st
            .iter()
            .flat_map(|c| c.timeline.iter())
            .filter(|e| e.ok && e.from == victim)
            .collect();
        // The agent reports its trigger on CLOCK_MONOTONIC, the clock of `t0_mono`.
        let migrated_at = moves
            .first()
            .and_then(|e| e.trigger_mono_us)
            .map(|m| m.saturating_sub(t0_mono) as f64 / 1e6);
        let after = recovered.map_or(0.0, |r| mean(r, end));
        let mut markers = vec![Marker {
            t: t_deg,
            label: format!("{victim}'s link degraded to {} Mbit/s", a.degrade_mbit),
            color: "#c0392b",
        }];
        if let Some(m) = migrated_at {
            markers.push(Marker {
                t: m,
                label: format!(
                    "migrated {victim} -> {} ({})",
                    moves[0].to.as_deref().unwrap_or("?"),
                    moves[0].reason
                ),
                color: "#27ae60",
            });
        }
        let chart = Chart {
            title: format!(
                "M-TCP: download rate, server links {} Mbit/s, floor policy {} Mbit/s",
                a.link_mbit, floor
            ),
            x_label: "time (s)".into(),
            y_label: "Mbit/s at the client".into(),
            points: samples.clone(),
            markers,
        };
        std::fs::write(&a.out, chart.to_svg())
            .with_context(|| format!("writing {}", a.out.display()))?;
        let rep = DegradeReport {
            link_mbit: a.link_mbit,
            degraded_to_mbit: a.degrade_mbit,
            good_mbit_s: good,
            degraded_at_s: t_deg,
            migrated_at_s: migrated_at,
            recovered_at_s: recovered,
            recovery_s: recovered.map(|r| r - t_deg),
            after_mbit_s: after,
            samples,
            svg: a.out.display().to_string(),
        };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rep)?);
        } else {
            println!(
                "degrade: server links {} Mbit/s; at {:.1} s {victim}'s link drops to {} Mbit/s",
                a.link_mbit, rep.degraded_at_s, a.degrade_mbit
            );
            println!("  rate before: {:.1} Mbit/s", rep.good_mbit_s);
            for e in &moves {
                println!(
                    "  moved {} -> {}: {}",
                    e.from,
                    e.to.as_deref().unwrap_or("?"),
                    e.reason
                );
            }
            match rep.recovery_s {
                Some(r) => println!(
                    "  back at >= 80 % of the good rate {:.2} s after the degradation; {:.1} Mbit/s afterwards ({:.0} % of before)",
                    r,
                    rep.after_mbit_s,
                    100.0 * rep.after_mbit_s / rep.good_mbit_s.max(1e-9)
                ),
                None => println!("  did NOT recover to 80 % of the good rate"),
            }
            println!("  plot: {}", a.out.display());
        }
        if moves.is_empty() || recovered.is_none() {
            bail!("the connection did not move and recover");
        }
        Ok(())
    })
}
