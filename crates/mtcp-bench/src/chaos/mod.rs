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
use mtcp_harness::local::{self, LocalCluster, LocalOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod faults;
mod plan;

use faults::*;
use plan::*;

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
