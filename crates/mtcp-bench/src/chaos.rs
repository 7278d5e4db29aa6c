//! `mtcp chaos`: a seeded, reproducible, time-bounded randomized fault test.
//!
//! One local cluster (servers running the HTTP app, an agent) serves a few files whose sizes
//! come from the seed. Each run opens one keep-alive connection through the agent, asks for 1–4
//! whole files or byte ranges and checks every body's SHA-256, while 0–3 faults hit the server
//! serving the connection at random downstream byte offsets: a drain (undrained afterwards), a
//! manual migration, and in eager mode a SIGKILL (the server is started again once the
//! connection has moved) or a SIGSTOP (SIGCONT once it has moved), and a manual move followed
//! 0–500 ms later by a SIGKILL or SIGSTOP of the server it moved to (issue 15). Now and then an
//! eager run kills every server: the client must then see an error soon, never a wrong byte.
//! `--peer-rtt-ms` and `--peer-loss-pct` emulate delay and loss between the servers on
//! loopback (every peer-channel message waits half the RTT, and that share of them another
//! 200 ms, as a retransmission would).
//!
//! Every choice of a run comes from an RNG seeded by (seed, run index), so a failing run is
//! reproduced by the same seed with enough runs (`--runs R+1`), which the failure line says.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use mtcp_harness::client::Client;
use mtcp_harness::local::{self, LocalCluster, LocalOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// State transfer mode of the cluster under test.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// State fetched from the origin at migration time: faults keep the origin alive.
    Lazy,
    /// State replicated ahead of time: faults also kill and stop servers.
    Eager,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Lazy => "lazy",
            Mode::Eager => "eager",
        }
    }
}

/// A kind of fault (`--faults`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultArg {
    /// Drain the serving server (`mtcp drain`), undrain it afterwards.
    Drain,
    /// Move the connection by hand (`mtcp migrate`).
    Manual,
    /// SIGKILL the serving server; start it again once the connection has moved.
    Kill,
    /// SIGSTOP the serving server; SIGCONT once the connection has moved.
    Stop,
    /// A run that kills every server: the client must see an error soon.
    KillAll,
    /// A manual move, then SIGKILL or SIGSTOP of the server it moved to 0–500 ms after it
    /// resumed (eager mode; issue 15); the server runs again once the connection has moved.
    AfterMove,
}

impl FaultArg {
    fn name(self) -> &'static str {
        match self {
            FaultArg::Drain => "drain",
            FaultArg::Manual => "manual",
            FaultArg::Kill => "kill",
            FaultArg::Stop => "stop",
            FaultArg::KillAll => "kill-all",
            FaultArg::AfterMove => "after-move",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Seed of every random choice (default: random; always printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most runs (one connection each).
    #[arg(long, default_value_t = 200)]
    pub runs: u64,
    /// Start at this run index (runs are independent: `--first-run R --runs R+1` repeats run
    /// R alone).
    #[arg(long, default_value_t = 0)]
    pub first_run: u64,
    /// Start no new run after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub time_limit: u64,
    /// Fail unless at least this many runs completed (within the time limit).
    #[arg(long, default_value_t = 0)]
    pub min_runs: u64,
    /// Cluster mode; `eager` adds kill, stop and kill-all faults.
    #[arg(long, value_enum, default_value_t = Mode::Lazy)]
    pub mode: Mode,
    /// Fault kinds to inject (comma-separated). Default: drain,manual in lazy mode, every kind
    /// in eager mode. `kill` needs eager mode; `stop` in lazy mode lets the stopped server run
    /// again once the agent has noticed its silence (the destination needs its state).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Option<Vec<FaultArg>>,
    /// Number of servers (at least 2).
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// `replicas = N` in the cluster file (eager mode).
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Round-trip time between servers, ms, emulated on loopback: every peer-channel message
    /// waits half of it (servers' hidden `--peer-delay-ms`).
    #[arg(long, default_value_t = 0)]
    pub peer_rtt_ms: u64,
    /// Loss between servers, percent, emulated on loopback: that share of peer-channel
    /// messages waits another 200 ms, as TCP does for a retransmission (`--peer-loss-pct`).
    #[arg(long, default_value_t = 0.0)]
    pub peer_loss_pct: f64,
    /// Working directory (cluster file, logs, served files), kept afterwards. Default: a
    /// temporary directory, deleted after a passing session (logs kept after a failure).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print a JSON summary on stdout (the progress lines go to stderr).
    #[arg(long)]
    pub json: bool,
    /// Print what every run did, not only the failed ones.
    #[arg(long)]
    pub verbose: bool,
}

/// Bound of one run.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// After every server is killed, the client must see an error within this.
const KILL_ALL_BOUND: Duration = Duration::from_secs(15);
/// A killed or stopped server's connection must have moved within this.
const MOVE_BOUND: Duration = Duration::from_secs(10);
/// A drain must be over within this.
const DRAIN_BOUND: Duration = Duration::from_secs(20);
/// After the client closes, the agent must no longer list the connection as live within this.
const CLOSE_BOUND: Duration = Duration::from_secs(5);
/// The agent must list a new connection within this after the client connected.
const OPEN_BOUND: Duration = Duration::from_secs(5);
/// Probability of a kill-all run (eager mode).
const KILL_ALL_P: f64 = 0.03;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The RNG seed of run `run` (`u64::MAX`: the served files).
fn run_seed(seed: u64, run: u64) -> u64 {
    splitmix64(seed ^ splitmix64(run))
}

/// One served file.
struct Served {
    name: String,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Drain,
    /// This many manual migrations back to back (each right after the previous one resumed).
    Manual(u8),
    Kill,
    Stop,
    /// A manual move, then the new server is killed (or stopped) this many ms after it resumed.
    AfterMove {
        stop: bool,
        after_ms: u64,
    },
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Drain => "drain",
            Fault::Manual(_) => "manual",
            Fault::Kill => "kill",
            Fault::Stop => "stop",
            Fault::AfterMove { stop: false, .. } => "move-then-kill",
            Fault::AfterMove { stop: true, .. } => "move-then-stop",
        }
    }
}

/// One request of a run and the bytes `[start, end)` of its file that must come back.
#[derive(Debug, Clone)]
struct Req {
    file: usize,
    /// `Range` header value, if any.
    range: Option<String>,
    start: u64,
    end: u64,
}

/// Everything a run does, drawn from its RNG before it starts.
#[derive(Debug, Clone)]
struct Plan {
    reqs: Vec<Req>,
    /// (downstream body byte offset of the run, fault), by offset.
    faults: Vec<(u64, Fault)>,
    /// Kill every server at this offset (eager mode; then there are no other faults).
    kill_all: Option<u64>,
    /// Client read rate (bytes/s), so faults land inside bodies; `None`: as fast as it goes.
    rate: Option<u64>,
}

impl Plan {
    fn draw(rng: &mut StdRng, files: &[Served], kinds: &[FaultArg]) -> Plan {
        // Per-connection faults, weighted; a stop costs the silence bound (~0.5 s): rarer.
        let weighted: Vec<(Fault, u32)> = kinds
            .iter()
            .filter_map(|k| match k {
                FaultArg::Drain => Some((Fault::Drain, 3)),
                FaultArg::Manual => Some((Fault::Manual(1), 3)),
                FaultArg::Kill => Some((Fault::Kill, 3)),
                FaultArg::Stop => Some((Fault::Stop, 1)),
                FaultArg::KillAll => None,
                FaultArg::AfterMove => Some((
                    Fault::AfterMove {
                        stop: false,
                        after_ms: 0,
                    },
                    3,
                )),
            })
            .collect();
        let kill_all_p = match (kinds.contains(&FaultArg::KillAll), weighted.is_empty()) {
            (false, _) => 0.0,
            (true, false) => KILL_ALL_P,
            (true, true) => 0.3,
        };
        let kill_all = rng.gen_bool(kill_all_p);
        let n = rng.gen_range(1..=4usize);
        let mut reqs = Vec::with_capacity(n);
        for i in 0..n {
            // A kill-all run starts with the largest file, so the kill lands inside a body.
            let file = if kill_all && i == 0 {
                (0..files.len())
                    .max_by_key(|&f| files[f].bytes.len())
                    .unwrap_or(0)
            } else {
                rng.gen_range(0..files.len())
            };
            let len = files[file].bytes.len() as u64;
            let req = if kill_all && i == 0 || rng.gen_bool(0.5) {
                Req {
                    file,
                    range: None,
                    start: 0,
                    end: len,
                }
            } else {
                match rng.gen_range(0..10) {
                    // bytes=a-b, sometimes with b past the end.
                    0..=5 => {
                        let a = rng.gen_range(0..len);
                        let b = if rng.gen_bool(0.1) {
                            rng.gen_range(len..len + 4096)
                        } else {
                            rng.gen_range(a..len)
                        };
                        Req {
                            file,
                            range: Some(format!("bytes={a}-{b}")),
                            start: a,
                            end: (b + 1).min(len),
                        }
                    }
                    // bytes=a-
                    6 | 7 => {
                        let a = rng.gen_range(0..len);
                        Req {
                            file,
                            range: Some(format!("bytes={a}-")),
                            start: a,
                            end: len,
                        }
                    }
                    // bytes=-n, sometimes more than the file.
                    _ => {
                        let s = rng.gen_range(1..=len + 1024);
                        Req {
                            file,
                            range: Some(format!("bytes=-{s}")),
                            start: len.saturating_sub(s),
                            end: len,
                        }
                    }
                }
            };
            reqs.push(req);
        }
        let total: u64 = reqs.iter().map(|r| r.end - r.start).sum();
        let rate = if kill_all {
            Some(16 << 20)
        } else if rng.gen_bool(0.6) {
            // Spread the run over 40–300 ms.
            let ms = rng.gen_range(40..=300u64);
            Some((total * 1000 / ms).max(4 << 20))
        } else {
            None
        };
        let mut faults = Vec::new();
        let mut kill_at = None;
        if kill_all {
            let first = reqs[0].end - reqs[0].start;
            kill_at = Some(rng.gen_range(0..(first / 4).max(1)));
        } else {
            let k = if weighted.is_empty() {
                0
            } else {
                rng.gen_range(0..=3)
            };
            let sum: u32 = weighted.iter().map(|w| w.1).sum();
            let mut stops = 0;
            for _ in 0..k {
                let mut x = rng.gen_range(0..sum);
                let f = weighted
                    .iter()
                    .find(|w| {
                        let hit = x < w.1;
                        x = x.saturating_sub(w.1);
                        hit
                    })
                    .map(|w| w.0)
                    .unwrap_or(Fault::Manual(1));
                // Now and then a burst: the next move starts right after the last resumed.
                let f = match f {
                    Fault::Manual(_) if rng.gen_bool(0.25) => Fault::Manual(rng.gen_range(2..=3)),
                    Fault::AfterMove { .. } => Fault::AfterMove {
                        stop: rng.gen_bool(0.3),
                        after_ms: rng.gen_range(0..=500),
                    },
                    f => f,
                };
                let at = rng.gen_range(0..total.max(1));
                // At most one stop a run.
                if matches!(f, Fault::Stop | Fault::AfterMove { stop: true, .. }) {
                    stops += 1;
                    if stops > 1 {
                        continue;
                    }
                }
                faults.push((at, f));
            }
            faults.sort_by_key(|&(o, _)| o);
        }
        Plan {
            reqs,
            faults,
            kill_all: kill_at,
            rate,
        }
    }

    fn describe(&self, files: &[Served]) -> String {
        let mut s = String::new();
        for (i, r) in self.reqs.iter().enumerate() {
            let _ = write!(
                s,
                "{}GET /{}{} ({} B)",
                if i > 0 { ", " } else { "" },
                files[r.file].name,
                r.range
                    .as_deref()
                    .map(|v| format!(" Range: {v}"))
                    .unwrap_or_default(),
                r.end - r.start
            );
        }
        if let Some(o) = self.kill_all {
            let _ = write!(s, "; kill-all at {o} B");
        }
        for (o, f) in &self.faults {
            match f {
                Fault::Manual(n) if *n > 1 => {
                    let _ = write!(s, "; {n} manual back to back at {o} B");
                }
                Fault::AfterMove { after_ms, .. } => {
                    let _ = write!(s, "; {} ({after_ms} ms) at {o} B", f.name());
                }
                f => {
                    let _ = write!(s, "; {} at {o} B", f.name());
                }
            }
        }
        match self.rate {
            Some(r) => {
                let _ = write!(s, "; rate {:.1} MiB/s", r as f64 / (1 << 20) as f64);
            }
            None => s += "; unlimited rate",
        }
        s
    }
}

/// Faults injected (counted when started).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub drain: u64,
    pub manual: u64,
    pub kill: u64,
    pub stop: u64,
    pub kill_all: u64,
    pub after_move: u64,
    /// Planned faults whose offset the run never reached (it ended first).
    pub skipped: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.drain + self.manual + self.kill + self.stop + self.kill_all + self.after_move
    }
    fn add(&mut self, f: Fault) {
        match f {
            Fault::Drain => self.drain += 1,
            Fault::Manual(_) => self.manual += 1,
            Fault::Kill => self.kill += 1,
            Fault::Stop => self.stop += 1,
            Fault::AfterMove { .. } => self.after_move += 1,
        }
    }
}

/// What happened in a run, with times since its start (printed when it fails).
struct Events {
    t0: Instant,
    lines: RefCell<Vec<String>>,
}

impl Events {
    fn new() -> Self {
        Self {
            t0: Instant::now(),
            lines: RefCell::new(Vec::new()),
        }
    }
    fn note(&self, what: impl AsRef<str>) {
        let t = self.t0.elapsed().as_secs_f64();
        self.lines
            .borrow_mut()
            .push(format!("{t:>8.3}s  {}", what.as_ref()));
    }
}

/// How a passing run ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Every response complete and correct.
    Complete,
    /// Kill-all run: the client saw an error soon after every server was killed.
    CleanError,
}

/// One failed run, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub run: u64,
    pub reason: String,
    pub reproduce: String,
}

/// A served file in the JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct FileSize {
    pub name: String,
    pub bytes: u64,
}

/// The JSON summary (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub mode: Mode,
    pub servers: usize,
    pub runs: u64,
    pub min_runs: u64,
    pub passed_runs: u64,
    pub clean_error_runs: u64,
    pub failed: u64,
    pub faults: Counts,
    pub elapsed_s: f64,
    pub files: Vec<FileSize>,
    pub failures: Vec<Failure>,
    pub dir: String,
    pub ok: bool,
}

/// Human output: stdout, or stderr when stdout carries the JSON summary.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    fn say(&self, s: impl AsRef<str>) {
        if self.json {
            eprintln!("{}", s.as_ref());
        } else {
            println!("{}", s.as_ref());
        }
    }
}

pub async fn run(a: ChaosArgs) -> Result<()> {
    if a.servers < 2 {
        bail!("--servers must be at least 2 (a connection needs somewhere to move)");
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    let out = Out { json: a.json };
    let (dir, temp) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("mtcp-chaos-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(dir.join("www"))
        .with_context(|| format!("creating {}", dir.display()))?;
    out.say(format!(
        "chaos: seed {seed} (mode {}, {} servers, up to {} runs, time limit {} s; working directory {})",
        a.mode.as_str(),
        a.servers,
        a.runs,
        a.time_limit,
        dir.display()
    ));
    let r = chaos(&a, seed, &dir, out).await;
    if temp {
        if r.is_ok() {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            // Keep the logs of a failed session, not the served files.
            let _ = std::fs::remove_dir_all(dir.join("www"));
            out.say(format!("chaos: logs kept in {}", dir.display()));
        }
    }
    r
}

/// The served files: 3, sizes from the seed, mostly 64 KiB – 2 MiB, sometimes up to 8 MiB.
fn make_files(seed: u64, www: &Path) -> Result<Vec<Served>> {
    let mut rng = StdRng::seed_from_u64(run_seed(seed, u64::MAX));
    let mut files = Vec::new();
    for i in 0..3 {
        let size = if rng.gen_bool(0.75) {
            rng.gen_range(64 << 10..=2 << 20)
        } else {
            rng.gen_range(2 << 20..=8 << 20)
        };
        let name = format!("f{i}.bin");
        let path = www.join(&name);
        local::make_file(&path, size, rng.gen())?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        files.push(Served { name, bytes });
    }
    Ok(files)
}

/// The fault kinds of a session: `--faults`, or the mode's default.
fn fault_kinds(a: &ChaosArgs) -> Result<Vec<FaultArg>> {
    let kinds = match (&a.faults, a.mode) {
        (Some(k), _) => k.clone(),
        (None, Mode::Lazy) => vec![FaultArg::Drain, FaultArg::Manual],
        (None, Mode::Eager) => vec![
            FaultArg::Drain,
            FaultArg::Manual,
            FaultArg::Kill,
            FaultArg::Stop,
            FaultArg::KillAll,
            FaultArg::AfterMove,
        ],
    };
    if a.mode == Mode::Lazy && kinds.contains(&FaultArg::Kill) {
        bail!("--faults kill needs --mode eager: in lazy mode a connection's state dies with its server");
    }
    if a.mode == Mode::Lazy && kinds.contains(&FaultArg::AfterMove) {
        bail!("--faults after-move needs --mode eager: in lazy mode a connection's state dies with its server");
    }
    Ok(kinds)
}

/// The servers' test hooks that emulate delay and loss between them.
fn peer_path_args(a: &ChaosArgs) -> Result<Vec<String>> {
    if !(0.0..=100.0).contains(&a.peer_loss_pct) {
        bail!(
            "--peer-loss-pct must be within 0–100, not {}",
            a.peer_loss_pct
        );
    }
    let mut v = Vec::new();
    if a.peer_rtt_ms > 0 {
        v.extend(["--peer-delay-ms".into(), (a.peer_rtt_ms / 2).to_string()]);
    }
    if a.peer_loss_pct > 0.0 {
        v.extend(["--peer-loss-pct".into(), a.peer_loss_pct.to_string()]);
    }
    Ok(v)
}

async fn chaos(a: &ChaosArgs, seed: u64, dir: &Path, out: Out) -> Result<()> {
    let t0 = Instant::now();
    let kinds = fault_kinds(a)?;
    let files = tokio::task::block_in_place(|| make_files(seed, &dir.join("www")))?;
    let exe = std::env::current_exe().context("locating the mtcp binary")?;
    let opts = LocalOptions {
        servers: a.servers,
        root: dir.join("www"),
        log: "info".into(),
        mode: a.mode.as_str().into(),
        replicas: a.replicas,
        server_args: peer_path_args(a)?,
        ..Default::default()
    };
    let mut lc = tokio::task::block_in_place(|| LocalCluster::start(&exe, dir, &opts))
        .context("starting the local cluster")?;
    out.say(format!(
        "chaos: files {}",
        files
            .iter()
            .map(|f| format!("{} ({} B)", f.name, f.bytes.len()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut reproduce = format!(
        "mtcp chaos --seed {seed} --runs {{R}} --mode {}",
        a.mode.as_str()
    );
    if a.servers != 3 {
        let _ = write!(reproduce, " --servers {}", a.servers);
    }
    if let Some(f) = &a.faults {
        let names: Vec<&str> = f.iter().map(|k| k.name()).collect();
        let _ = write!(reproduce, " --faults {}", names.join(","));
    }
    if let Some(r) = a.replicas {
        let _ = write!(reproduce, " --replicas {r}");
    }
    if a.peer_rtt_ms > 0 {
        let _ = write!(reproduce, " --peer-rtt-ms {}", a.peer_rtt_ms);
    }
    if a.peer_loss_pct > 0.0 {
        let _ = write!(reproduce, " --peer-loss-pct {}", a.peer_loss_pct);
    }

    // Waiting for the agent's port to listen made one connection: let it end, so the first
    // run's connection is the only new one the agent lists.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(2) {
        let st = lc.status_async().await?;
        if !st.is_empty() && st.iter().all(|c| c.state != "live") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let counts = RefCell::new(Counts::default());
    let drained = RefCell::new(HashSet::new());
    let mut seen = HashSet::new();
    let mut failures: Vec<Failure> = Vec::new();
    let (mut done, mut clean_errors) = (0u64, 0u64);
    let mut fatal = None;
    for run in a.first_run..a.runs {
        if t0.elapsed() >= Duration::from_secs(a.time_limit) {
            out.say(format!(
                "chaos: time limit of {} s reached after {done} runs",
                a.time_limit
            ));
            break;
        }
        let mut rng = StdRng::seed_from_u64(run_seed(seed, run));
        let plan = Plan::draw(&mut rng, &files, &kinds);
        let ev = Events::new();
        ev.note(format!("plan: {}", plan.describe(&files)));
        let r = tokio::time::timeout(
            RUN_TIMEOUT,
            one_run(
                a.mode, &mut lc, &files, &plan, &mut seen, &ev, &counts, &drained,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow!("the run did not finish within {RUN_TIMEOUT:?}")));
        // Whatever happened: every server running, none stopped or draining.
        let healed = heal(&mut lc, &drained, &ev).await;
        let mut reason = match &r {
            Err(e) => Some(format!("{e:#}")),
            Ok(Ended::CleanError) => {
                clean_errors += 1;
                None
            }
            Ok(Ended::Complete) => None,
        };
        match healed {
            Ok(crashed) if crashed.is_empty() => {}
            Ok(crashed) => {
                let c = crashed.join("; ");
                reason = Some(match reason {
                    Some(r) => format!("{r}; {c}"),
                    None => c,
                });
            }
            Err(e) => {
                // The agent died, or a server cannot start again: nothing more to test.
                fatal = Some(format!("run {run}: {e:#}"));
                reason = Some(match reason {
                    Some(r) => format!("{r}; {e:#}"),
                    None => format!("{e:#}"),
                });
            }
        }
        done += 1;
        if let Some(reason) = reason {
            let rep = reproduce.replace("{R}", &(run + 1).to_string());
            out.say(format!(
                "chaos: run {run} FAILED (seed {seed}): {reason}; reproduce: {rep} (this run alone: add --first-run {run})"
            ));
            for l in ev.lines.borrow().iter() {
                out.say(format!("    {l}"));
            }
            failures.push(Failure {
                run,
                reason,
                reproduce: rep,
            });
        } else if a.verbose {
            out.say(format!("chaos: run {run} ok"));
            for l in ev.lines.borrow().iter() {
                out.say(format!("    {l}"));
            }
        }
        if fatal.is_some() {
            break;
        }
        if done % 20 == 0 {
            out.say(format!(
                "chaos: {done} runs, {} faults, {} failed, {:.1} s",
                counts.borrow().total(),
                failures.len(),
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    let took = t0.elapsed().as_secs_f64();
    lc.stop();
    let c = counts.borrow().clone();
    let failed = failures.len() as u64;
    out.say(format!(
        "chaos: {done} runs ({} faults: {} drain, {} manual, {} kill, {} stop, {} kill-all, {} after-move) in {took:.1} s, {failed} failed, seed {seed}",
        c.total(),
        c.drain,
        c.manual,
        c.kill,
        c.stop,
        c.kill_all,
        c.after_move
    ));
    let ok = failed == 0 && done >= a.min_runs && fatal.is_none();
    if a.json {
        let s = Summary {
            seed,
            mode: a.mode,
            servers: a.servers,
            runs: done,
            min_runs: a.min_runs,
            passed_runs: done - failed,
            clean_error_runs: clean_errors,
            failed,
            faults: c,
            elapsed_s: took,
            files: files
                .iter()
                .map(|f| FileSize {
                    name: f.name.clone(),
                    bytes: f.bytes.len() as u64,
                })
                .collect(),
            failures,
            dir: dir.display().to_string(),
            ok,
        };
        println!("{}", serde_json::to_string_pretty(&s)?);
    }
    if let Some(f) = fatal {
        bail!("chaos stopped early: {f}");
    }
    if failed > 0 {
        bail!("{failed} of {done} runs failed (seed {seed})");
    }
    if done < a.min_runs {
        bail!(
            "only {done} runs completed within {} s; --min-runs {}",
            a.time_limit,
            a.min_runs
        );
    }
    Ok(())
}

/// The agent's view of connection `cid`: (server, state).
async fn conn_of(lc: &LocalCluster, cid: &str) -> Result<(String, String)> {
    lc.status_async()
        .await?
        .into_iter()
        .find(|c| c.cid == cid)
        .map(|c| (c.server, c.state))
        .with_context(|| format!("the agent no longer lists connection {cid}"))
}

/// Waits until connection `cid` is live on a server other than `from`; returns that server.
async fn wait_moved(lc: &LocalCluster, cid: &str, from: &str) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let (server, state) = conn_of(lc, cid).await?;
        if state != "live" {
            bail!("the connection ended instead of moving off {from}: {state}");
        }
        if server != from {
            return Ok(server);
        }
        if t0.elapsed() > MOVE_BOUND {
            bail!("the connection is still on {from} after {MOVE_BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many moves of connection `cid` for silence the agent has logged.
fn silent_moves(agent_log: &Path, cid: &str) -> usize {
    std::fs::read_to_string(agent_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("migrating: server silent") && l.contains(cid))
        .count()
}

/// Waits until the run's body bytes reach `offset`; false if the run's requests ended first.
async fn reach(progress: &AtomicU64, offset: u64, finished: &Cell<bool>) -> bool {
    loop {
        if progress.load(Ordering::Relaxed) >= offset {
            return true;
        }
        if finished.get() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Injects the plan's faults as the run's bytes pass their offsets.
#[allow(clippy::too_many_arguments)]
async fn inject(
    mode: Mode,
    lc: &mut LocalCluster,
    cid: &str,
    plan: &Plan,
    progress: &AtomicU64,
    finished: &Cell<bool>,
    killed_at: &Cell<Option<Instant>>,
    ev: &Events,
    counts: &RefCell<Counts>,
    drained: &RefCell<HashSet<String>>,
) -> Result<()> {
    if let Some(off) = plan.kill_all {
        if !reach(progress, off, finished).await {
            ev.note("kill-all: the requests ended before its offset; not injected");
            return Ok(());
        }
        counts.borrow_mut().kill_all += 1;
        ev.note(format!(
            "kill-all at {} B",
            progress.load(Ordering::Relaxed)
        ));
        let ids: Vec<String> = lc.servers.iter().map(|s| s.id.clone()).collect();
        for id in &ids {
            lc.kill(id)?;
        }
        killed_at.set(Some(Instant::now()));
        return Ok(());
    }
    for (i, &(off, fault)) in plan.faults.iter().enumerate() {
        if !reach(progress, off, finished).await {
            let left = (plan.faults.len() - i) as u64;
            counts.borrow_mut().skipped += left;
            ev.note(format!("requests ended; {left} fault(s) not injected"));
            return Ok(());
        }
        let (server, state) = conn_of(lc, cid).await?;
        if state != "live" {
            bail!(
                "before {}: the connection is not live: {state}",
                fault.name()
            );
        }
        counts.borrow_mut().add(fault);
        ev.note(format!(
            "{} of {server} at {} B",
            fault.name(),
            progress.load(Ordering::Relaxed)
        ));
        let to = match fault {
            Fault::Drain => {
                drained.borrow_mut().insert(server.clone());
                lc.drain(&server, DRAIN_BOUND)
                    .await
                    .with_context(|| format!("draining {server}"))?;
                lc.undrain(&server)
                    .await
                    .with_context(|| format!("undraining {server}"))?;
                drained.borrow_mut().remove(&server);
                conn_of(lc, cid).await?.0
            }
            Fault::Manual(n) => {
                let mut path = server.clone();
                for k in 0..n {
                    let moved = lc
                        .migrate(Some(cid), None)
                        .await
                        .with_context(|| format!("manual migration {} of {n}", k + 1))?;
                    let to = moved
                        .into_iter()
                        .next()
                        .map(|(_, to)| to)
                        .unwrap_or_default();
                    path += " -> ";
                    path += &to;
                }
                if n > 1 {
                    ev.note(format!("burst of {n}: {path}"));
                }
                conn_of(lc, cid).await?.0
            }
            Fault::Kill => {
                lc.kill(&server)?;
                let to = wait_moved(lc, cid, &server)
                    .await
                    .with_context(|| format!("after SIGKILL of {server}"))?;
                lc.restart_server_async(&server)
                    .await
                    .with_context(|| format!("restarting {server}"))?;
                ev.note(format!("{server} restarted"));
                to
            }
            Fault::AfterMove { stop, after_ms } => {
                let moved = lc
                    .migrate(Some(cid), None)
                    .await
                    .context("the move before the fault")?;
                let to = moved
                    .into_iter()
                    .next()
                    .map(|(_, to)| to)
                    .context("the move named no server")?;
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                ev.note(format!(
                    "moved {server} -> {to}; {} {to} {after_ms} ms later",
                    if stop { "SIGSTOP" } else { "SIGKILL" }
                ));
                if stop {
                    lc.sigstop(&to)?;
                    let moved = wait_moved(lc, cid, &to).await;
                    lc.sigcont(&to)?;
                    moved.with_context(|| {
                        format!("after SIGSTOP of {to} {after_ms} ms after a move")
                    })?
                } else {
                    lc.kill(&to)?;
                    let next = wait_moved(lc, cid, &to).await.with_context(|| {
                        format!("after SIGKILL of {to} {after_ms} ms after a move")
                    })?;
                    lc.restart_server_async(&to)
                        .await
                        .with_context(|| format!("restarting {to}"))?;
                    ev.note(format!("{to} restarted"));
                    next
                }
            }
            Fault::Stop if mode == Mode::Eager => {
                lc.sigstop(&server)?;
                let moved = wait_moved(lc, cid, &server).await;
                lc.sigcont(&server)?;
                moved.with_context(|| format!("after SIGSTOP of {server}"))?
            }
            Fault::Stop => {
                // Lazy: the destination needs the origin's state, so the origin runs again
                // once the agent has noticed its silence and started to move the connection.
                let log = lc.dir.join("agent.log");
                let before = silent_moves(&log, cid);
                lc.sigstop(&server)?;
                let t0 = Instant::now();
                while silent_moves(&log, cid) == before && t0.elapsed() < MOVE_BOUND {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let noticed = silent_moves(&log, cid) > before;
                if noticed {
                    ev.note(format!(
                        "the agent noticed after {:.3} s",
                        t0.elapsed().as_secs_f64()
                    ));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                lc.sigcont(&server)?;
                if !noticed {
                    bail!("the agent did not notice the SIGSTOP of {server} within {MOVE_BOUND:?}");
                }
                wait_moved(lc, cid, &server)
                    .await
                    .with_context(|| format!("after SIGSTOP and SIGCONT of {server}"))?
            }
        };
        ev.note(format!("{} done: connection on {to}", fault.name()));
    }
    Ok(())
}

/// Whether a client error is the clean end expected when every server is gone: the
/// connection reset or closed, not a garbled response.
fn is_clean_end(e: &anyhow::Error) -> bool {
    let m = format!("{e:#}").to_ascii_lowercase();
    m.contains("closed") || m.contains("reset") || m.contains("broken pipe")
}

/// Checks one response against the bytes it must carry.
fn check(
    i: usize,
    req: &Req,
    files: &[Served],
    resp: &mtcp_harness::client::Response,
    ev: &Events,
) -> Result<()> {
    let f = &files[req.file];
    let want = &f.bytes[req.start as usize..req.end as usize];
    let what = format!(
        "request {i} (GET /{}{})",
        f.name,
        req.range
            .as_deref()
            .map(|r| format!(" Range: {r}"))
            .unwrap_or_default()
    );
    let code = if req.range.is_some() { 206 } else { 200 };
    if resp.status != code {
        bail!("{what}: status {} instead of {code}", resp.status);
    }
    if resp.body_len != want.len() as u64 {
        bail!(
            "{what}: {} body bytes instead of {}",
            resp.body_len,
            want.len()
        );
    }
    let sha = hex::encode(Sha256::digest(want));
    if resp.digest != sha {
        bail!(
            "CORRUPTION: {what}: the body's SHA-256 is {} instead of {sha} ({} bytes)",
            resp.digest,
            want.len()
        );
    }
    if req.range.is_some() {
        let cr = format!("bytes {}-{}/{}", req.start, req.end - 1, f.bytes.len());
        if resp.header("content-range") != Some(cr.as_str()) {
            bail!(
                "{what}: Content-Range {:?} instead of {cr:?}",
                resp.header("content-range")
            );
        }
    }
    ev.note(format!("{what}: {code}, {} B, sha256 ok", resp.body_len));
    Ok(())
}

/// The client side of a run: its requests in order, each checked.
async fn requests(
    client: &mut Client,
    files: &[Served],
    plan: &Plan,
    killed_at: &Cell<Option<Instant>>,
    ev: &Events,
) -> Result<Ended> {
    let err_after_kill = |e: anyhow::Error, what: String| -> Result<Ended> {
        match killed_at.get() {
            Some(t) if plan.kill_all.is_some() => {
                if !is_clean_end(&e) {
                    bail!("{what}: after every server was killed, an unexpected error: {e:#}");
                }
                ev.note(format!(
                    "{what}: clean error {:.3} s after the kill: {e:#}",
                    t.elapsed().as_secs_f64()
                ));
                Ok(Ended::CleanError)
            }
            _ => Err(e.context(what)),
        }
    };
    for (i, req) in plan.reqs.iter().enumerate() {
        let path = format!("/{}", files[req.file].name);
        let hdr = req.range.as_ref().map(|r| format!("Range: {r}"));
        let extra: Vec<&str> = hdr.iter().map(String::as_str).collect();
        match client.request("GET", &path, &extra).await {
            Ok(resp) => check(i, req, files, &resp, ev)?,
            Err(e) => {
                let what = format!(
                    "request {i} (GET {path}{}) after {} body bytes of the run",
                    hdr.as_deref().map(|h| format!(" {h}")).unwrap_or_default(),
                    client.progress.load(Ordering::Relaxed)
                );
                return err_after_kill(e, what);
            }
        }
    }
    if killed_at.get().is_some() {
        // Every server is gone but the responses were already on their way: the next request
        // on the connection must fail.
        for i in plan.reqs.len().. {
            let req = &plan.reqs[0];
            match client
                .request("GET", &format!("/{}", files[req.file].name), &[])
                .await
            {
                Ok(resp) => check(i, req, files, &resp, ev)?,
                Err(e) => return err_after_kill(e, format!("extra request {i}")),
            }
        }
    }
    Ok(Ended::Complete)
}

/// One run: connect, find the connection at the agent, run the requests while injecting the
/// faults, close, and check the agent lets the connection go.
#[allow(clippy::too_many_arguments)]
async fn one_run(
    mode: Mode,
    lc: &mut LocalCluster,
    files: &[Served],
    plan: &Plan,
    seen: &mut HashSet<String>,
    ev: &Events,
    counts: &RefCell<Counts>,
    drained: &RefCell<HashSet<String>>,
) -> Result<Ended> {
    seen.extend(lc.status_async().await?.into_iter().map(|c| c.cid));
    let mut client = Client::connect(&lc.agent_listen).await?;
    client.rate = plan.rate;
    let t0 = Instant::now();
    let (cid, server) = loop {
        let mut new: Vec<_> = lc
            .status_async()
            .await?
            .into_iter()
            .filter(|c| c.state == "live" && !seen.contains(&c.cid))
            .collect();
        // Nothing else connects to the agent: one new live connection is the client's.
        if new.len() == 1 {
            let c = new.remove(0);
            break (c.cid, c.server);
        }
        if t0.elapsed() > OPEN_BOUND {
            bail!(
                "the agent lists {} new live connections {OPEN_BOUND:?} after the client connected (expected 1)",
                new.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    seen.insert(cid.clone());
    ev.note(format!("connection {cid} on {server}"));

    let progress = client.progress.clone();
    let finished = Cell::new(false);
    let killed_at = Cell::new(None);
    let ended = {
        let client_side = async {
            let r = requests(&mut client, files, plan, &killed_at, ev).await;
            finished.set(true);
            r
        };
        let faults = inject(
            mode, lc, &cid, plan, &progress, &finished, &killed_at, ev, counts, drained,
        );
        let kill_bound = async {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(t) = killed_at.get() {
                    if t.elapsed() > KILL_ALL_BOUND {
                        return;
                    }
                }
            }
        };
        tokio::pin!(client_side, faults, kill_bound);
        let mut injected = false;
        let ended = loop {
            tokio::select! {
                r = &mut client_side => break r,
                r = &mut faults, if !injected => {
                    // A fault that could not be injected as planned fails the run now.
                    r?;
                    injected = true;
                }
                _ = &mut kill_bound => bail!(
                    "the client saw no error {KILL_ALL_BOUND:?} after every server was killed \
                     ({} body bytes received)",
                    progress.load(Ordering::Relaxed)
                ),
            }
        };
        // The requests are over: the fault in progress (if any) finishes; later ones are
        // skipped.
        let fault = if injected { Ok(()) } else { faults.await };
        match (ended, fault) {
            (Ok(e), Ok(())) => e,
            (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
            (Err(c), Err(f)) => bail!("{c:#}; and the fault in progress: {f:#}"),
        }
    };
    drop(client);
    if ended == Ended::Complete {
        let t0 = Instant::now();
        loop {
            let (server, state) = conn_of(lc, &cid).await?;
            if state != "live" {
                ev.note(format!("connection ended: {state}"));
                if state != "closed" {
                    bail!("after the client closed, the agent says the connection {state}");
                }
                break;
            }
            if t0.elapsed() > CLOSE_BOUND {
                bail!(
                    "the agent still lists the connection as live on {server} {CLOSE_BOUND:?} after the client closed"
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(ended)
}

/// After a run: stopped servers continue, drained ones are undrained, missing ones start
/// again. Returns the servers that exited on their own (the run fails, the session goes on);
/// an error (the agent exited, a server cannot start again) ends the session.
async fn heal(
    lc: &mut LocalCluster,
    drained: &RefCell<HashSet<String>>,
    ev: &Events,
) -> Result<Vec<String>> {
    let mut crashed = Vec::new();
    for (name, st) in lc.reap_exited() {
        let log = lc.dir.join(format!("{name}.log"));
        let last = local::last_log_line(&log);
        ev.note(format!("{name} exited on its own ({st}): {last}"));
        if name == "agent" {
            bail!("the agent exited ({st}): {last}; see {}", log.display());
        }
        crashed.push(format!(
            "{name} exited ({st}): {last}; see {}",
            log.display()
        ));
    }
    let ids: Vec<String> = lc.servers.iter().map(|s| s.id.clone()).collect();
    for id in &ids {
        if lc.is_stopped(id) {
            lc.sigcont(id)?;
        }
    }
    let to_undrain: Vec<String> = drained.borrow_mut().drain().collect();
    for id in &to_undrain {
        if lc.is_started(id) {
            lc.undrain(id)
                .await
                .with_context(|| format!("undraining {id}"))?;
        }
    }
    for id in &ids {
        if !lc.is_started(id) {
            lc.restart_server_async(id)
                .await
                .with_context(|| format!("starting {id} again"))?;
            ev.note(format!("{id} started again"));
        }
    }
    Ok(crashed)
}
