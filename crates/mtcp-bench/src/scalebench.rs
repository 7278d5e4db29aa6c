//! `mtcp bench scale`: many idle keep-alive connections through one agent. Opens `--conns`
//! connections with 64 concurrent openers (each connect + one small GET), measures the rate and
//! every process's resident memory per connection, drains the server(s) holding them, and
//! checks that every connection answers one more GET with the right body.
//!
//! The cluster's processes log warnings to files in the run's scratch directory; set
//! `MTCP_BENCH_LOG` to another `RUST_LOG` filter (e.g. `warn,mtcp_breakdown=trace` for every
//! move's trace) to see more.

use crate::args::BenchArgs;
use crate::stats::pct;
use anyhow::{bail, Context, Result};
use mtcp_harness::client::Client;
use mtcp_harness::local::{self, LocalCluster, LocalOptions};
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Concurrent openers (and checkers).
const OPENERS: usize = 64;
/// Body of the small GET.
const BODY_LEN: u64 = 1024;
/// How long one connect + GET may take.
const PER_CONN: Duration = Duration::from_secs(30);
/// Pause between the last GET and the memory reading: idle connections give their buffers
/// back after a whole quiet ping tick (1 s) at the agent.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Serialize, Debug)]
pub struct ScaleReport {
    pub conns: usize,
    pub mode: String,
    pub openers: usize,
    pub open_secs: f64,
    pub conns_per_sec: f64,
    /// Connect + first GET, per connection.
    pub open_us_p50: u64,
    pub open_us_p99: u64,
    pub open_us_max: u64,
    pub procs: Vec<ProcMem>,
    /// Connections on each server before the drain.
    pub held: Vec<(String, u32)>,
    pub drains: Vec<DrainResult>,
    /// Every connection answered one more GET with the right body after the drain.
    pub all_ok_after_drain: bool,
    pub failed_after_drain: usize,
    /// What went wrong with the first connection that failed after the drain.
    pub first_failure: Option<String>,
    pub check_secs: f64,
}

#[derive(Serialize, Debug)]
pub struct ProcMem {
    pub name: String,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// Connections this process holds (the agent: all of them; a server: its own).
    pub conns: u64,
    /// (after - before) / conns, KiB; 0 when it holds none.
    pub kib_per_conn: f64,
    /// Open descriptors after opening.
    pub fds: usize,
    /// After the drain, once idle again.
    pub rss_after_drain_kib: u64,
    pub fds_after_drain: usize,
}

#[derive(Serialize, Debug)]
pub struct DrainResult {
    pub server: String,
    pub conns: u32,
    /// Drain request to no connection with an agent left.
    pub secs: f64,
    pub moved: u64,
    pub ended: u64,
    pub kept_for_dead_agent: u32,
    /// Still on their way to another server when the drain's time ran out.
    pub still_moving: u32,
    /// The agent's moves of this drain: trigger (the drain's HINT) to RESUMED, µs, p50/p99/max.
    pub move_us: [u64; 3],
    /// From the first of these moves' triggers to the last one's RESUMED, ms.
    pub moves_span_ms: u64,
    /// CPU time (user + system) each process spent during the drain, per connection moved,
    /// µs: (process, µs).
    pub cpu_us_per_move: Vec<(String, f64)>,
}

/// VmRSS of `pid`, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Runs `f(i)` for every `i < n` on [`OPENERS`] tasks; progress on stderr every second
/// unless `quiet`. Returns the results in index order and the wall time.
async fn fan_out<T, F, Fut>(n: usize, what: &str, quiet: bool, f: F) -> (Vec<Result<T>>, f64)
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let out: Arc<Mutex<Vec<Option<Result<T>>>>> =
        Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    let f = Arc::new(f);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..OPENERS.min(n.max(1)) {
        let (next, done, out, f) = (next.clone(), done.clone(), out.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let r = match tokio::time::timeout(PER_CONN, f(i)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("no answer within {PER_CONN:?}")),
                };
                out.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut last = Instant::now();
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !quiet && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            eprintln!(
                "  {what}: {}/{n} after {:.1} s",
                done.load(Ordering::Relaxed),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let v = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    (
        v.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("not run"))))
            .collect(),
        secs,
    )
}

async fn server_status(lc: &LocalCluster, id: &str) -> Result<mtcp::proto::wire::ServerStatus> {
    use mtcp::proto::wire::Msg;
    Ok(mtcp::peer::admin_request_over(
        lc.admin_of(id)?,
        &lc.key,
        lc.tls.as_ref(),
        id,
        Msg::AdminStatus,
    )
    .await?)
}

/// `mtcp bench scale`: [`measure`], printed.
pub async fn scale(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    let rep = measure(a, dir).await?;
    let n = rep.conns;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{n} connections ({} mode): opened in {:.2} s = {:.0}/s (connect + GET p50 {} us, p99 {} us)",
            rep.mode, rep.open_secs, rep.conns_per_sec, rep.open_us_p50, rep.open_us_p99
        );
        for p in &rep.procs {
            println!(
                "  {:6} RSS {:>8} -> {:>8} KiB, {:>6} conns, {:>7.1} KiB/conn, {:>5} fds; after the drain {:>8} KiB, {:>5} fds",
                p.name, p.rss_before_kib, p.rss_after_kib, p.conns, p.kib_per_conn, p.fds, p.rss_after_drain_kib, p.fds_after_drain
            );
        }
        for d in &rep.drains {
            println!(
                "  drain {}: {} conns in {:.3} s (moved {}, ended {}, kept for a dead agent {}, still moving {}); agent's moves: trigger -> RESUMED p50 {} us, p99 {} us, max {} us, first trigger to last RESUMED {} ms",
                d.server, d.conns, d.secs, d.moved, d.ended, d.kept_for_dead_agent, d.still_moving,
                d.move_us[0], d.move_us[1], d.move_us[2], d.moves_span_ms
            );
            let cpu: Vec<String> = (d.cpu_us_per_move.iter())
                .map(|(name, us)| format!("{name} {us:.0} us"))
                .collect();
            println!("    CPU per connection moved: {}", cpu.join(", "));
        }
        println!(
            "  after the drain: {} of {n} connections answered with the right body ({:.2} s)",
            n - rep.failed_after_drain,
            rep.check_secs
        );
    }
    if let Some(e) = &rep.first_failure {
        bail!(
            "{} connection(s) failed after the drain, e.g.: {e}",
            rep.failed_after_drain
        );
    }
    Ok(())
}

/// Starts the cluster (from `a.exe` or this binary), opens `a.conns` connections, drains and
/// checks them (see the module doc); the cluster is stopped before it returns.
pub async fn measure(a: &BenchArgs, dir: &std::path::Path) -> Result<ScaleReport> {
    let n = a.conns as usize;
    if n == 0 {
        bail!("--conns must be at least 1");
    }
    let file = dir.join("www/small.bin");
    let want = Arc::new(local::make_file(&file, BODY_LEN, 13)?);
    let exe = match &a.exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating the mtcp binary")?,
    };
    let opts = LocalOptions {
        servers: 3,
        root: dir.join("www"),
        log: std::env::var("MTCP_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        mode: a.mode.clone(),
        agent_args: match a.fast_path {
            true => vec!["--fast-path".into()],
            false => Vec::new(),
        },
        ..Default::default()
    };
    let lc = tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))?;
    let names: Vec<String> = lc
        .servers
        .iter()
        .map(|s| s.id.clone())
        .chain(["agent".to_string()])
        .collect();
    let pids: Vec<u32> = names
        .iter()
        .map(|p| lc.pid(p).context("process not started"))
        .collect::<Result<_>>()?;
    let before: Vec<u64> = pids.iter().map(|&p| rss_kib(p).unwrap_or(0)).collect();
    let quiet = a.json;
    if !quiet {
        eprintln!(
            "opening {n} connections through the agent ({OPENERS} openers, {} mode{})",
            a.mode,
            if a.fast_path { ", fast path" } else { "" }
        );
    }

    // Open: connect + one GET each.
    let addr = Arc::new(lc.agent_listen.clone());
    let w = want.clone();
    let (opened, open_secs) = fan_out(n, "opened", quiet, move |_| {
        let (addr, want) = (addr.clone(), w.clone());
        async move {
            let t0 = Instant::now();
            let mut c = Client::connect(&addr).await?;
            let r = c.request("GET", "/small.bin", &[]).await?;
            if r.status != 200 || r.digest != *want {
                bail!("first GET: status {}, body sha256 {}", r.status, r.digest);
            }
            Ok((c, t0.elapsed().as_micros() as u64))
        }
    })
    .await;
    let mut clients = Vec::with_capacity(n);
    let mut lat = Vec::with_capacity(n);
    let mut errs = Vec::new();
    for r in opened {
        match r {
            Ok((c, us)) => {
                clients.push(Mutex::new(Some(c)));
                lat.push(us);
            }
            Err(e) => errs.push(e.to_string()),
        }
    }
    if !errs.is_empty() {
        bail!(
            "{} of {n} connections failed to open, e.g.: {}",
            errs.len(),
            errs[0]
        );
    }
    lat.sort_unstable();
    if !quiet {
        eprintln!(
            "opened {n} in {open_secs:.2} s ({:.0}/s); letting them go idle for {SETTLE:?}",
            n as f64 / open_secs
        );
    }
    tokio::time::sleep(SETTLE).await;

    // Memory and descriptors per process.
    let mut held = Vec::new();
    for s in &lc.servers {
        held.push((s.id.clone(), server_status(&lc, &s.id).await?.connections));
    }
    let procs: Vec<ProcMem> = names
        .iter()
        .zip(&pids)
        .zip(&before)
        .map(|((name, &pid), &b)| {
            let after = rss_kib(pid).unwrap_or(0);
            let conns = if name == "agent" {
                n as u64
            } else {
                held.iter()
                    .find(|(id, _)| id == name)
                    .map_or(0, |h| u64::from(h.1))
            };
            ProcMem {
                name: name.clone(),
                rss_before_kib: b,
                rss_after_kib: after,
                conns,
                kib_per_conn: if conns > 0 {
                    after.saturating_sub(b) as f64 / conns as f64
                } else {
                    0.0
                },
                fds: fd_count(pid),
                rss_after_drain_kib: 0,
                fds_after_drain: 0,
            }
        })
        .collect();
    let mut procs = procs;

    // Drain every server that holds connections, one after the other.
    let mut drains = Vec::new();
    for (id, count) in held.clone() {
        if count == 0 {
            continue;
        }
        if !quiet {
            eprintln!("draining {id} ({count} connections)");
        }
        let cpu = |pid: u32| crate::stats::cpu_secs(&format!("/proc/{pid}/stat")).unwrap_or(0.0);
        let cpu_before: Vec<f64> = pids.iter().map(|&p| cpu(p)).collect();
        let rep = local::drain_server_report(
            lc.admin_of(&id)?,
            &lc.key,
            lc.tls.as_ref(),
            &id,
            Duration::from_secs(60 + n as u64 / 100),
        )
        .await?;
        let per_move = rep.moved.max(1) as f64;
        let cpu_us_per_move = (names.iter().zip(&pids).zip(&cpu_before))
            .map(|((name, &pid), b)| (name.to_string(), (cpu(pid) - b) * 1e6 / per_move))
            .collect();
        // Each connection's last move away from this server, as the agent timed it.
        let st = lc.status_async().await?;
        let moves: Vec<&mtcp_agent::MigrationEvent> = st
            .iter()
            .filter_map(|c| c.timeline.iter().rev().find(|e| e.from == id && e.ok))
            .collect();
        let mut us: Vec<u64> = moves.iter().filter_map(|e| e.resumed_us).collect();
        us.sort_unstable();
        let first = moves.iter().map(|e| e.at_ms).min().unwrap_or(0);
        let last = (moves.iter())
            .map(|e| e.at_ms + e.resumed_us.unwrap_or(0) / 1000)
            .max()
            .unwrap_or(0);
        drains.push(DrainResult {
            server: id,
            conns: count,
            secs: rep.empty_after.as_secs_f64(),
            moved: rep.moved,
            ended: rep.ended,
            kept_for_dead_agent: rep.kept_for_dead_agent,
            still_moving: rep.still_moving,
            move_us: [
                pct(&us, 0.5),
                pct(&us, 0.99),
                us.last().copied().unwrap_or(0),
            ],
            moves_span_ms: last.saturating_sub(first),
            cpu_us_per_move,
        });
    }

    tokio::time::sleep(SETTLE).await;
    for (p, &pid) in procs.iter_mut().zip(&pids) {
        p.rss_after_drain_kib = rss_kib(pid).unwrap_or(0);
        p.fds_after_drain = fd_count(pid);
    }

    // One more GET on every connection.
    let clients = Arc::new(clients);
    let cl = clients.clone();
    let (checked, check_secs) = fan_out(n, "checked", quiet, move |i| {
        let (cl, want) = (cl.clone(), want.clone());
        async move {
            let mut c = cl[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .context("connection taken")?;
            let r = c.request("GET", "/small.bin", &[]).await?;
            if r.status != 200 || r.digest != *want {
                bail!(
                    "GET after the drain: status {}, body sha256 {}",
                    r.status,
                    r.digest
                );
            }
            Ok(())
        }
    })
    .await;
    let failed: Vec<String> = checked
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    let rep = ScaleReport {
        conns: n,
        mode: a.mode.clone(),
        openers: OPENERS,
        open_secs,
        conns_per_sec: n as f64 / open_secs,
        open_us_p50: pct(&lat, 0.5),
        open_us_p99: pct(&lat, 0.99),
        open_us_max: lat.last().copied().unwrap_or(0),
        procs,
        held,
        drains,
        all_ok_after_drain: failed.is_empty(),
        failed_after_drain: failed.len(),
        first_failure: failed.first().cloned(),
        check_secs,
    };
    drop(clients);
    drop(lc);
    Ok(rep)
}
