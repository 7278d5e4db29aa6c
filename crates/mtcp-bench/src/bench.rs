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

#[derive(Serialize, Debug)]
pub struct ThroughputReport {
    pub client: &'static str,
    pub size_bytes: u64,
    pub rounds: u32,
    pub direct_mib_s: Vec<f64>,
    pub agent_mib_s: Vec<f64>,
    /// With `--tls`: through the agent of a TLS cluster, per round, and its median's ratio to
    /// the plain agent's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_agent_mib_s: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_to_agent_ratio: Option<f64>,
    pub direct_median_mib_s: f64,
    pub agent_median_mib_s: f64,
    pub ratio: f64,
    /// Reference: a bare user-space TCP relay (no M-TCP: no framing, retention or checksum) on
    /// its own thread, between the same client and the plain listener.
    pub bare_relay_mib_s: Vec<f64>,
    pub bare_relay_median_mib_s: f64,
    pub bare_relay_ratio: f64,
    /// Each round's agent / direct ratio (the two downloads of a round run back to back, so
    /// a slow spell of the machine hits both), and their median: less sensitive to drift over
    /// the run than `ratio`, the ratio of the two medians.
    pub round_ratios: Vec<f64>,
    pub ratio_median_of_rounds: f64,
    /// CPU seconds per GiB delivered, by process, for each path (what limits the agent path on
    /// a machine where all three processes share the cores).
    pub cpu_s_per_gib: PathsCpu,
    /// With `--fast-path`: the same download through an agent with the kernel fast path (the
    /// agent hands the client's TCP connection to the server; no process relays the bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<PathReport>,
    /// Well-known relays timed in the same rounds (socat, HAProxy), when installed.
    pub peers: Vec<PeerReport>,
}

#[derive(Serialize, Debug)]
pub struct PeerReport {
    pub name: &'static str,
    #[serde(flatten)]
    pub path: PathReport,
}

/// One path's downloads against direct TCP's in the same rounds.
#[derive(Serialize, Debug)]
pub struct PathReport {
    pub mib_s: Vec<f64>,
    pub median_mib_s: f64,
    /// Ratio of the medians against direct TCP.
    pub ratio: f64,
    /// Each round's ratio to direct's download of that round, and their median.
    pub round_ratios: Vec<f64>,
    pub ratio_median_of_rounds: f64,
    pub cpu_s_per_gib: PathCpu,
}

impl PathReport {
    fn of(mib_s: Vec<f64>, direct: &[f64], cpu_s_per_gib: PathCpu) -> Self {
        let round_ratios: Vec<f64> = mib_s.iter().zip(direct).map(|(x, d)| x / d).collect();
        PathReport {
            median_mib_s: median(&mib_s),
            ratio: median(&mib_s) / median(direct),
            ratio_median_of_rounds: median(&round_ratios),
            round_ratios,
            cpu_s_per_gib,
            mib_s,
        }
    }
}

/// CPU seconds per GiB delivered, per path.
#[derive(Serialize, Debug, Default)]
pub struct PathsCpu {
    pub direct: PathCpu,
    pub agent: PathCpu,
    pub bare_relay: PathCpu,
}

/// CPU seconds per GiB delivered, per process on one path (`None`: not on this path or not
/// measurable, e.g. the built-in client, which runs inside the bench process).
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct PathCpu {
    pub server: f64,
    pub relay: Option<f64>,
    pub client: Option<f64>,
}

impl PathCpu {
    fn total(&self) -> f64 {
        self.server + self.relay.unwrap_or(0.0) + self.client.unwrap_or(0.0)
    }
}

/// CPU seconds (user + system) of every waited-for child of this process so far.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
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
    /// Measured over the kernel fast path (`--fast-path`): the agent sees no bytes, so the
    /// first-byte figures are 0 and trigger -> RESUMED (which includes putting up and taking
    /// down the nftables fence) is the measure.
    #[serde(default)]
    pub fast_path: bool,
    /// `--breakdown`: where each move's time went, and the loopback floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<crate::breakdown::Breakdown>,
}

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

/// A cluster whose agent uses the kernel fast path with `--fast-path` (root), else [`start`].
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

/// A minimal user-space TCP relay to `to` on its own thread and single-threaded runtime (like
/// the agent's), for a ceiling: what any relay costs on this machine. Returns its address.
/// Starts the bare relay on its own thread; returns its address and the `stat` file of that
/// thread (for its CPU time).
fn bare_relay(to: &str) -> Result<(String, String)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?.to_string();
    let to = to.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let _ = tx.send(format!("/proc/{}/task/{tid}/stat", std::process::id()));
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
    let stat = rx.recv().context("bare relay thread")?;
    Ok((addr, stat))
}

/// The paths the throughput bench times.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Agent,
    Relay,
    /// With `--fast-path`: an agent that hands the connection over (kernel fast path).
    Fast,
    /// A well-known relay (the index into the started ones).
    Peer(usize),
    /// With `--tls`: the agent of a cluster with `[tls]`.
    Tls,
}

async fn throughput(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    let size = a.size_mib << 20;
    let file = dir.join("www/data.bin");
    tokio::task::block_in_place(|| local::make_file(&file, size, 7))?;
    let want = {
        let b = std::fs::read(&file)?;
        format!("{:016x}", twox_hash::XxHash3_64::oneshot(&b))
    };
    // The fast-path agent's address goes into the cluster file (servers admit only listed ones).
    let fast_listen = format!("127.0.0.1:{}", local::free_port());
    let lc = {
        let exe = std::env::current_exe().context("locating the mtcp binary")?;
        let opts = LocalOptions {
            servers: 3,
            root: dir.join("www"),
            plain_baseline: true,
            log: "warn".into(),
            snapshot_every: a.snapshot_every,
            mode: a.mode.clone(),
            fast_path_listen: if a.fast_path {
                vec![fast_listen.clone()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))?
    };
    let plain = lc.plain.clone().context("plain listener")?;
    // Warm the page cache and both paths once, checking every byte (XXH3) on the way.
    download(&plain, size, &want).await?;
    download(&lc.agent_listen, size, &want).await?;
    // The timed rounds use curl, a real client, when it is there (same for both paths).
    let curl = !a.builtin_client && local::have("curl");
    let (relay, relay_stat) = bare_relay(&plain)?;
    let server_stat = format!("/proc/{}/stat", lc.pid("s1").context("server s1")?);
    let agent_stat = format!("/proc/{}/stat", lc.pid("agent").context("agent")?);
    let mut lc = lc;
    let mut order = vec![Path::Direct, Path::Agent, Path::Relay];
    let fast = if a.fast_path {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("--fast-path needs root (TCP_REPAIR and nftables)");
        }
        let (listen, _) = tokio::task::block_in_place(|| {
            lc.start_agent("agent-fast", Some(fast_listen.clone()), &["--fast-path"])
        })?;
        download(&listen, size, &want).await?;
        let stat = format!("/proc/{}/stat", lc.pid("agent-fast").context("agent-fast")?);
        order.push(Path::Fast);
        Some((listen, stat))
    } else {
        None
    };
    // Its own cluster (a TLS cluster's ports speak only TLS), serving the same file.
    let tls_lc = if a.tls {
        let exe = std::env::current_exe().context("locating the mtcp binary")?;
        let tdir = dir.join("tls-cluster");
        std::fs::create_dir_all(&tdir)?;
        let opts = tls_cluster(a, dir);
        let t = tokio::task::block_in_place(|| LocalCluster::start(&exe, &tdir, &opts))?;
        download(&t.agent_listen, size, &want).await?;
        order.push(Path::Tls);
        Some(t)
    } else {
        None
    };
    let mut tls_speeds = Vec::new();
    let mut peers = Vec::new();
    for haproxy in [false, true] {
        let started = tokio::task::block_in_place(|| match haproxy {
            false => crate::relays::Relay::socat(&plain),
            true => crate::relays::Relay::haproxy(&plain, dir),
        });
        match started {
            Ok(p) => {
                download(&p.listen, size, &want).await?;
                order.push(Path::Peer(peers.len()));
                peers.push(p);
            }
            Err(e) => eprintln!(
                "!!! NOT MEASURED: {e:#} (scripts/test.sh installs socat and HAProxy) !!!"
            ),
        }
    }
    let (mut d, mut g, mut r, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut p: Vec<Vec<f64>> = peers.iter().map(|_| Vec::new()).collect();
    // CPU seconds per path: [server, relay (agent or bare relay), client]; the peers after the
    // first four.
    let mut cpu = vec![[0.0f64; 3]; 4 + peers.len()];
    for round in 0..a.rounds() {
        // Each round runs the paths back to back, in an order that rotates, so neither a slow
        // spell of the machine nor a fixed position in the round favours one path.
        let n = order.len();
        for k in 0..n {
            let path = order[(k + round as usize) % n];
            let (addr, relay_stat, slot) = match path {
                Path::Direct => (&plain, None, 0),
                Path::Agent => (&lc.agent_listen, Some(&agent_stat), 1),
                Path::Relay => (&relay, Some(&relay_stat), 2),
                Path::Fast => {
                    let (l, s) = fast.as_ref().context("fast path agent")?;
                    (l, Some(s), 3)
                }
                Path::Peer(i) => (&peers[i].listen, None, 4 + i),
                // Its server and agent are other processes: no CPU accounting.
                Path::Tls => {
                    let t = tls_lc.as_ref().context("TLS cluster")?;
                    (&t.agent_listen, None, usize::MAX)
                }
            };
            let peer = match path {
                Path::Peer(i) => Some(&peers[i]),
                _ => None,
            };
            // CPU seconds so far of [server, relay, client] (`None`: not measurable).
            let sample = || {
                [
                    cpu_secs(&server_stat),
                    match peer {
                        Some(p) => p.cpu_secs(),
                        None => relay_stat.and_then(|p| cpu_secs(p)),
                    },
                    Some(children_cpu_secs()),
                ]
            };
            let before = sample();
            let speed = if curl {
                download_curl(addr, size).await?
            } else {
                download(addr, size, &want).await?
            };
            if let Some(p) = peer {
                tokio::task::block_in_place(|| p.settle());
            }
            for (k, (b, e)) in before.iter().zip(sample()).enumerate() {
                if let (Some(b), Some(e), Some(c)) = (b, e, cpu.get_mut(slot)) {
                    c[k] += e - b;
                }
            }
            match path {
                Path::Direct => d.push(speed),
                Path::Agent => g.push(speed),
                Path::Relay => r.push(speed),
                Path::Fast => f.push(speed),
                Path::Peer(i) => p[i].push(speed),
                Path::Tls => tls_speeds.push(speed),
            }
        }
    }
    let gib = (size as f64 / (1u64 << 30) as f64) * a.rounds() as f64;
    let per_gib = |c: [f64; 3], relay: bool| PathCpu {
        server: c[0] / gib,
        relay: relay.then(|| c[1] / gib),
        client: curl.then(|| c[2] / gib),
    };
    let round_ratios: Vec<f64> = g.iter().zip(&d).map(|(g, d)| g / d).collect();
    let fast_path = fast
        .is_some()
        .then(|| PathReport::of(f, &d, per_gib(cpu[3], true)));
    let peers: Vec<PeerReport> = peers
        .iter()
        .zip(p)
        .enumerate()
        .map(|(i, (peer, v))| PeerReport {
            name: peer.name,
            path: PathReport::of(v, &d, per_gib(cpu[4 + i], true)),
        })
        .collect();
    let rep = ThroughputReport {
        client: if curl { "curl" } else { "built-in" },
        size_bytes: size,
        rounds: a.rounds(),
        direct_median_mib_s: median(&d),
        agent_median_mib_s: median(&g),
        ratio: median(&g) / median(&d),
        bare_relay_median_mib_s: median(&r),
        bare_relay_ratio: median(&r) / median(&d),
        ratio_median_of_rounds: median(&round_ratios),
        round_ratios,
        cpu_s_per_gib: PathsCpu {
            direct: per_gib(cpu[0], false),
            agent: per_gib(cpu[1], true),
            bare_relay: per_gib(cpu[2], true),
        },
        tls_to_agent_ratio: a.tls.then(|| median(&tls_speeds) / median(&g)),
        tls_agent_mib_s: a.tls.then_some(tls_speeds),
        direct_mib_s: d,
        agent_mib_s: g,
        bare_relay_mib_s: r,
        fast_path,
        peers,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "throughput, {} MiB file, {} rounds, client {}, loopback, 2 cores shared by client, agent, server",
            a.size_mib, a.rounds(), rep.client
        );
        println!(
            "  direct TCP   : {:>8.1} MiB/s (median)",
            rep.direct_median_mib_s
        );
        println!(
            "  through agent: {:>8.1} MiB/s (median)",
            rep.agent_median_mib_s
        );
        println!("  ratio        : {:>8.3} (ratio of the medians)", rep.ratio);
        let (lo, hi) = rep
            .round_ratios
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        println!(
            "  per round    : {:>8.3} (median of the rounds' ratios; lowest {lo:.3}, highest {hi:.3})",
            rep.ratio_median_of_rounds
        );
        println!(
            "  reference, a bare user-space TCP relay: {:.1} MiB/s (median), ratio {:.3}",
            rep.bare_relay_median_mib_s, rep.bare_relay_ratio
        );
        if let (Some(t), Some(ratio)) = (&rep.tls_agent_mib_s, rep.tls_to_agent_ratio) {
            println!(
                "  agent, TLS   : {:>8.1} MiB/s (median), {ratio:.3} of the plain agent's (another cluster, same rounds)",
                median(t)
            );
        }
        if let Some(fp) = &rep.fast_path {
            let (lo, hi) = fp
                .round_ratios
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            println!(
                "  fast path    : {:>8.1} MiB/s (median), ratio {:.3}; per round {:.3} (lowest {lo:.3}, highest {hi:.3})",
                fp.median_mib_s, fp.ratio, fp.ratio_median_of_rounds
            );
        }
        for pr in &rep.peers {
            println!(
                "  {:<13}: {:>8.1} MiB/s (median), ratio {:.3}; per round {:.3}",
                pr.name, pr.path.median_mib_s, pr.path.ratio, pr.path.ratio_median_of_rounds
            );
        }
        let opt = |x: Option<f64>| x.map_or("     -".to_string(), |x| format!("{x:>6.3}"));
        println!("  CPU seconds per GiB   server   relay  client   total");
        let mut rows = vec![
            ("direct TCP", rep.cpu_s_per_gib.direct),
            ("through agent", rep.cpu_s_per_gib.agent),
            ("bare relay", rep.cpu_s_per_gib.bare_relay),
        ];
        if let Some(fp) = &rep.fast_path {
            rows.push(("fast path", fp.cpu_s_per_gib));
        }
        for pr in &rep.peers {
            rows.push((pr.name, pr.path.cpu_s_per_gib));
        }
        for (name, c) in rows {
            println!(
                "    {name:<16}  {:>6.3}  {}  {}  {:>6.3}",
                c.server,
                opt(c.relay),
                opt(c.client),
                c.total()
            );
        }
    }
    Ok(())
}

async fn migration(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
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
        fast_path: a.fast_path && !tls,
        breakdown: None,
    };
    if !ok {
        bail!("the migrated transfer's SHA-256 did not match");
    }
    let mut rep = rep;
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
            println!("  kernel fast path: the agent sees no bytes; trigger -> RESUMED includes the nftables fence (up and down)");
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
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
async fn faults(a: &BenchArgs, dir: &std::path::Path, fault: Fault) -> Result<()> {
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
            .find(|c| c.state == "live" && c.bytes_down > 0)
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
async fn soak(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
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
        .filter(|c| c.state == "live")
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
async fn eager_cost(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
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
async fn drain(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
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
