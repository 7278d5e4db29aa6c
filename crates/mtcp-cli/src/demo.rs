//! `mtcp demo`: three servers (eager mode) and an agent on loopback, a download through the agent
//! that moves three times mid-transfer — a drain, a manual migration, then the serving server is
//! killed with SIGKILL — checked by SHA-256.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mtcp_agent::admin::{Request, Response};
use mtcp_harness::client::Client;
use mtcp_harness::local::{self, LocalCluster, LocalOptions};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Size of the test file in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Download rate limit in MiB/s, so the migrations are visibly mid-transfer.
    #[arg(long, default_value_t = 80)]
    pub rate_mib: u64,
    /// Use the built-in HTTP client even if curl is installed.
    #[arg(long)]
    pub builtin_client: bool,
    /// Keep the working directory (logs, files) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Quieter output (no progress bar).
    #[arg(long)]
    pub quiet: bool,
    /// Run in the network lab instead (root): unmodified curl in the client's namespace talks
    /// to a service address, the transparent agent intercepts it; the connection moves by hand,
    /// then its server is killed, then its server's link is blackholed.
    #[arg(long)]
    pub lab: bool,
    /// The PostgreSQL story instead: real pgbench through three front-ends (pgfront, eager mode)
    /// of a throwaway PostgreSQL while they are drained, moved by hand and killed; then checks
    /// that no transaction was lost or applied twice.
    #[arg(long, conflicts_with = "lab")]
    pub pg: bool,
    /// Lab: round-trip time between the client and the servers, ms.
    #[arg(long, default_value_t = 20)]
    pub lab_rtt_ms: u32,
}

pub async fn run(a: DemoArgs) -> Result<()> {
    if a.pg {
        let o = crate::pgdemo::Options {
            keep: a.keep,
            quiet: a.quiet,
        };
        return crate::pgdemo::run(&o).await;
    }
    let dir = std::env::temp_dir().join(format!("mtcp-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www"))?;
    let r = if a.lab {
        tokio::task::block_in_place(|| lab_demo(&a, &dir))
    } else {
        demo(&a, &dir).await
    };
    if a.keep || r.is_err() {
        eprintln!(
            "working directory (logs of every process): {}",
            dir.display()
        );
        if !a.keep {
            // Keep logs of a failed run for inspection, but not the big files.
            let _ = std::fs::remove_dir_all(dir.join("www"));
            let _ = std::fs::remove_file(dir.join("download.bin"));
        }
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

async fn demo(a: &DemoArgs, dir: &std::path::Path) -> Result<()> {
    let size = a.size_mib << 20;
    println!("== M-TCP demo: one live TCP connection moves between servers mid-download ==");
    println!("making a {} MiB test file ...", a.size_mib);
    let file = dir.join("www").join("data.bin");
    let want = tokio::task::block_in_place(|| local::make_file(&file, size, 0x6d74_6370))?;
    println!("  sha256 {want}");
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    let opts = LocalOptions {
        servers: 3,
        root: dir.join("www"),
        plain_baseline: false,
        log: "info".into(),
        snapshot_every: None,
        server_args: Vec::new(),
        mode: "eager".into(),
        ..Default::default()
    };
    let mut lc = tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))?;
    println!("cluster in eager mode: each server's connections are replicated to the next server");
    for s in &lc.servers {
        println!(
            "server {} listening on {} (peer {}, admin {})",
            s.id, s.data, s.peer, s.admin
        );
    }
    println!(
        "agent listening on {} (admin {})",
        lc.agent_listen, lc.agent_admin
    );

    let out = dir.join("download.bin");
    let url = format!("http://{}/data.bin", lc.agent_listen);
    let use_curl = !a.builtin_client && local::have("curl");
    let rate = a.rate_mib << 20;
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    enum Dl {
        Curl(tokio::process::Child),
        Builtin(tokio::task::JoinHandle<Result<mtcp_harness::client::Response>>),
    }
    let mut dl = if use_curl {
        println!(
            "downloading {url} with curl (rate limit {} MiB/s) ...",
            a.rate_mib
        );
        Dl::Curl(
            tokio::process::Command::new("curl")
                .args(["-sS", "--fail", "--limit-rate", &rate.to_string(), "-o"])
                .arg(&out)
                .arg(&url)
                .kill_on_drop(true)
                .spawn()
                .context("starting curl")?,
        )
    } else {
        println!(
            "downloading {url} with the built-in client (rate limit {} MiB/s) ...",
            a.rate_mib
        );
        let mut c = Client::connect(&lc.agent_listen).await?;
        c.rate = Some(rate);
        c.progress = progress.clone();
        c.sink = Some(std::fs::File::create(&out)?);
        Dl::Builtin(tokio::spawn(async move {
            c.request("GET", "/data.bin", &[]).await
        }))
    };

    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let mut drained = false;
    let mut moved = false;
    let mut killed = false;
    let limit = Duration::from_secs(30 + 4 * size / rate.max(1));
    let done_ok = loop {
        let got = match &dl {
            Dl::Curl(_) => std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0),
            Dl::Builtin(_) => progress.load(Ordering::Relaxed),
        };
        bar.set_position(got);
        let serving = current_server(&lc).await;
        if let Some(s) = &serving {
            bar.set_message(format!("on {s}"));
        }
        if !drained && got >= size / 4 {
            if let Some(s) = serving.clone() {
                bar.println(format!(
                    "[{:>6.2}s] draining {s} (mtcp drain --id {s}) ...",
                    t0.elapsed().as_secs_f64()
                ));
                drain(&lc, &s).await?;
                drained = true;
            }
        } else if drained && !moved && got >= size * 3 / 5 {
            bar.println(format!(
                "[{:>6.2}s] manual migration (mtcp migrate --all) ...",
                t0.elapsed().as_secs_f64()
            ));
            lc.migrate_all().await.context("manual migration")?;
            moved = true;
        } else if moved && !killed && got >= size * 17 / 20 {
            if let Some(s) = serving.clone() {
                bar.println(format!(
                    "[{:>6.2}s] kill -9 of the serving server {s} (pid {}) ...",
                    t0.elapsed().as_secs_f64(),
                    lc.pid(&s).unwrap_or(0)
                ));
                tokio::task::block_in_place(|| lc.kill(&s))?;
                killed = true;
            }
        }
        let finished = match &mut dl {
            Dl::Curl(c) => c.try_wait()?.map(|st| st.success()),
            Dl::Builtin(h) if h.is_finished() => {
                Some(matches!(h.await, Ok(Ok(ref r)) if r.status == 200))
            }
            Dl::Builtin(_) => None,
        };
        if let Some(ok) = finished {
            break ok;
        }
        if t0.elapsed() > limit {
            bail!("download did not finish within {limit:?}");
        }
        lc.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    bar.finish();
    let took = t0.elapsed();
    let got = tokio::task::block_in_place(|| local::sha256_file(&out))?;
    let conns = lc.status_async().await?;
    println!("\ntimeline of migrations (t = seconds since the agent started):");
    let mut migrations = 0;
    for c in &conns {
        for e in &c.timeline {
            let lat = e
                .first_byte_us
                .or(e.resumed_us)
                .map(|u| format!("{:.3} ms", u as f64 / 1000.0))
                .unwrap_or_default();
            println!(
                "  t={:>7.3}s  {} -> {}  reason: {}  {}  state {} B",
                e.at_ms as f64 / 1000.0,
                e.from,
                e.to.as_deref().unwrap_or("(failed)"),
                e.reason,
                if e.ok {
                    format!("resumed, first byte after {lat}")
                } else {
                    format!("FAILED: {}", e.refusals.join("; "))
                },
                e.state_bytes.unwrap_or(0)
            );
            if e.ok {
                migrations += 1;
            }
        }
    }
    println!(
        "\ndownload finished in {:.2}s: {}",
        took.as_secs_f64(),
        if done_ok {
            "ok"
        } else {
            "client reported an error"
        }
    );
    println!("  sent     sha256 {want}");
    println!("  received sha256 {got}");
    lc.stop();
    if !done_ok {
        bail!("the download failed");
    }
    if got != want {
        bail!("SHA-256 mismatch: the bytes received differ from the file");
    }
    if migrations < 3 || !drained || !moved || !killed {
        bail!("expected at least 3 migrations (a drain, a manual one, a crash), saw {migrations}");
    }
    println!("OK: every byte matched, and the connection moved {migrations} times without the client noticing.");
    Ok(())
}

async fn current_server(lc: &LocalCluster) -> Option<String> {
    match mtcp_agent::admin::request(&lc.agent_admin, &Request::Status).await {
        Ok(Response::Status { connections }) => connections
            .into_iter()
            .find(|c| c.is_live())
            .map(|c| c.server),
        _ => None,
    }
}

/// Drains server `id` like `mtcp drain` does.
pub async fn drain(lc: &LocalCluster, id: &str) -> Result<()> {
    let cluster = mtcp::Cluster::load(&lc.cluster_file)?;
    let s = lc
        .servers
        .iter()
        .find(|s| s.id == id)
        .context("unknown server")?;
    local::drain_server(
        &s.admin,
        &cluster.key,
        lc.tls.as_ref(),
        id,
        Duration::from_secs(20),
    )
    .await?;
    Ok(())
}

/// `mtcp demo --lab`: the same story in the network lab, with a transparent agent.
fn lab_demo(a: &DemoArgs, dir: &std::path::Path) -> Result<()> {
    use mtcp_harness::labcluster::{LabCluster, LabClusterOptions};
    use mtcp_lab::Impairment;
    let size = a.size_mib << 20;
    println!("== M-TCP demo in the network lab: curl does not know M-TCP exists ==");
    let file = dir.join("www").join("data.bin");
    let want = local::make_file(&file, size, 0x6d74_6370)?;
    println!("made a {} MiB test file, sha256 {want}", a.size_mib);
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    let lc = LabCluster::start(
        &exe,
        dir,
        &LabClusterOptions {
            tag: "demo".into(),
            servers: 3,
            mode: "eager".into(),
            root: dir.join("www"),
            client_link: Impairment {
                delay_ms: a.lab_rtt_ms,
                ..Default::default()
            },
            // The servers' links set the pace (so the bytes wait at the server, not in the
            // client's socket buffers, when something happens to it).
            servers_link: Impairment {
                rate_mbit: Some((a.rate_mib * 8) as f64 * 1.048_576),
                ..Default::default()
            },
            log: "info".into(),
            ..Default::default()
        },
    )?;
    println!(
        "lab up: client 198.18.0.2, servers s1..s3 at 198.18.1.2..198.18.3.2 ({} ms RTT to the client); eager mode",
        a.lab_rtt_ms
    );
    println!(
        "transparent agent in the client namespace intercepts {} (nftables redirect)",
        lc.service
    );
    let out = dir.join("download.bin");
    let url = format!("http://{}/data.bin", lc.service);
    let rate = a.rate_mib << 20;
    println!(
        "client namespace: curl {url} (server links limited to {} MiB/s) ...",
        a.rate_mib
    );
    let mut curl = lc
        .client_command("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(&out)
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("starting curl in the lab")?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(60 + 4 * size / rate.max(1));
    let mut step = 0;
    let ok = loop {
        let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        let serving = lc.serving().ok().flatten();
        let at = t0.elapsed().as_secs_f64();
        if let Some(s) = serving {
            if step == 0 && got >= size / 4 {
                println!("[{at:>6.2}s] manual migration (mtcp migrate --all) off {s} ...");
                lc.migrate_all()?;
                step = 1;
            } else if step == 1 && got >= size / 2 {
                println!("[{at:>6.2}s] kill -9 of the serving server {s} ...");
                lc.kill_server(&s)?;
                step = 2;
            } else if step == 2 && got >= size * 3 / 4 {
                println!("[{at:>6.2}s] blackholing {s}'s link (every packet dropped) ...");
                lc.impair_server(
                    &s,
                    Impairment {
                        blackhole: true,
                        ..Default::default()
                    },
                )?;
                step = 3;
            }
        }
        if let Some(st) = curl.try_wait()? {
            break st.success();
        }
        if t0.elapsed() > limit {
            let _ = curl.kill();
            bail!("download did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let got = local::sha256_file(&out)?;
    let conns = lc.status()?;
    println!("\ntimeline of migrations:");
    let mut moves = 0;
    for c in conns.iter().filter(|c| c.bytes_down > 0) {
        for e in &c.timeline {
            println!(
                "  {} -> {}  reason: {}  {}",
                e.from,
                e.to.as_deref().unwrap_or("(failed)"),
                e.reason,
                if e.ok {
                    format!(
                        "first byte after {:.1} ms{}",
                        e.first_byte_us.unwrap_or(0) as f64 / 1e3,
                        if e.from_replica {
                            " (state from a replica)"
                        } else {
                            ""
                        }
                    )
                } else {
                    format!("FAILED: {}", e.refusals.join("; "))
                }
            );
            moves += usize::from(e.ok);
        }
    }
    println!("  sent     sha256 {want}");
    println!("  received sha256 {got}");
    drop(lc);
    if !ok {
        bail!("curl failed");
    }
    if got != want {
        bail!("SHA-256 mismatch");
    }
    if step < 3 || moves < 3 {
        bail!("expected 3 migrations (manual, kill, blackhole), saw {moves}");
    }
    println!("OK: every byte matched; curl never knew its connection moved {moves} times.");
    Ok(())
}
