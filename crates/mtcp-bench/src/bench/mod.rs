//! `mtcp bench`: throughput through the agent against a direct TCP download from the same server
//! in the same run, and migration latency (trigger to first resumed byte at the agent) over a
//! live transfer.

pub use crate::args::{BenchArgs, Which};
use crate::stats::{cpu_secs, curl_secs, median, pct, CURL_TIMED};
use anyhow::{bail, Context, Result};
use mtcp_harness::client::{Client, Hash};
use mtcp_harness::local::{self, LocalCluster, LocalOptions};
use serde::Serialize;
use std::time::{Duration, Instant};

mod eager;
mod migration;
mod throughput;

use eager::{eager_cost, faults, soak, Fault};
pub use eager::{EagerCostReport, FaultReport, SoakReport};
use migration::{drain, migration};
pub use migration::{DrainReport, MigrationReport};
use throughput::throughput;
pub use throughput::{PathCpu, PathReport, PathsCpu, PeerReport, ThroughputReport};

pub async fn run(a: BenchArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("mtcp-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www"))?;
    // Removed also when the run is dropped half-way (SIGINT, SIGTERM).
    let _dir = RemoveDir(dir.clone());
    let r = match a.which {
        Which::Throughput => throughput(&a, &dir).await,
        Which::Migration => migration(&a, &dir).await,
        Which::Recovery => faults(&a, &dir, Fault::Kill).await,
        Which::Hung => faults(&a, &dir, Fault::Stop).await,
        Which::Soak => soak(&a, &dir).await,
        Which::EagerCost => eager_cost(&a, &dir).await,
        Which::LabRtt => crate::labbench::rtt(&a, &dir).await,
        Which::LabThroughput => crate::labbench::link_throughput(&a, &dir).await,
        Which::Degrade => crate::labbench::degrade(&a, &dir).await,
        Which::Drain => drain(&a, &dir).await,
        Which::Pg => crate::pgbench::run(&a, &dir).await,
        Which::Scale => crate::scalebench::scale(&a, &dir).await,
    };
    r
}

/// Removes a directory tree when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(a: &BenchArgs, dir: &std::path::Path, plain: bool) -> Result<LocalCluster> {
    start_mode(dir, &dir.join("www"), plain, a.snapshot_every, &a.mode)
}

/// The processes' `RUST_LOG`: warnings, and the moves' traces with `--breakdown`.
fn cluster_log(a: &BenchArgs) -> String {
    if a.breakdown {
        crate::breakdown::LOG.into()
    } else {
        "warn".into()
    }
}

/// A cluster whose agent uses the kernel fast path with `--fast-path` (root), else [`start`]
/// (with the moves traced under `--breakdown`).
fn start_maybe_fast(a: &BenchArgs, dir: &std::path::Path) -> Result<LocalCluster> {
    if !a.fast_path && !a.breakdown {
        return start(a, dir, false);
    }
    // SAFETY: geteuid has no preconditions.
    if a.fast_path && unsafe { libc::geteuid() } != 0 {
        bail!("--fast-path needs root (TCP_REPAIR and nftables)");
    }
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    let opts = LocalOptions {
        servers: 3,
        root: dir.join("www"),
        log: cluster_log(a),
        snapshot_every: a.snapshot_every,
        mode: a.mode.clone(),
        agent_args: if a.fast_path {
            vec!["--fast-path".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))
}

fn start_mode(
    dir: &std::path::Path,
    root: &std::path::Path,
    plain: bool,
    snapshot_every: Option<u64>,
    mode: &str,
) -> Result<LocalCluster> {
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    let opts = LocalOptions {
        servers: 3,
        root: root.to_path_buf(),
        plain_baseline: plain,
        log: "warn".into(),
        snapshot_every,
        server_args: Vec::new(),
        mode: mode.into(),
        ..Default::default()
    };
    tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))
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
        .args(CURL_TIMED)
        .arg(format!("http://{addr}/data.bin"))
        .output()
        .await
        .context("running curl")?;
    let secs = curl_secs(&out.stdout, size, addr)?;
    Ok(size as f64 / (1 << 20) as f64 / secs)
}

/// A TLS cluster of three servers (`--tls`) serving `dir/www`, in the run's mode.
fn tls_cluster(a: &BenchArgs, dir: &std::path::Path) -> LocalOptions {
    LocalOptions {
        servers: 3,
        root: dir.join("www"),
        log: cluster_log(a),
        snapshot_every: a.snapshot_every,
        mode: a.mode.clone(),
        tls: true,
        ..Default::default()
    }
}
