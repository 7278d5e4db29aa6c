//! `mtcp bench throughput`: direct TCP, the agent, a bare user-space relay, the kernel fast path,
//! TLS and the well-known relays timed in the same rounds, with CPU seconds per GiB.

use super::*;

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

pub(super) async fn throughput(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
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
